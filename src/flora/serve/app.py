"""The HTTP API: FastAPI routes with vLLM's paths and OpenAI's request and response shapes.

- ``POST /v1/completions``, ``POST /v1/chat/completions``: ``model`` names the adapter (or the base
  model); ``stream`` sends server-sent events (``data: {json}`` chunks, then ``data: [DONE]``), with
  a last chunk holding ``usage`` when ``stream_options.include_usage``; every response has ``usage``.
- ``GET /v1/models``; ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter`` (off unless
  ``runtime_lora_updating``; paths confined to the registry's roots: 403 otherwise).
- ``GET /health``, ``GET /metrics`` (Prometheus): open even with an API key (`flora.serve.auth`: 401
  for any other route without ``Authorization: Bearer KEY``).

Errors have OpenAI's shape (`flora.serve.protocol.error_body`): 400 for bad input (validation,
malformed JSON, a prompt past the context, an adapter that cannot be served), 404 for an unknown
model, 429 when the queue is full. A client that goes away, streaming or not, frees its slot in the
batch at once. Requests are tokenized here and detokenized here, incrementally; the engine only
sees token ids.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedTokenizerBase

from flora import __version__
from flora.serve.auth import APIKeyMiddleware
from flora.serve.engine import Engine, EngineRequest, Finished, QueueFullError, SamplingParams, Token
from flora.serve.metrics import ServerMetrics
from flora.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
    error_body,
)
from flora.serve.registry import (
    AdapterAccessError,
    AdapterLoadError,
    AdapterRegistry,
    AdapterVersion,
    UnknownAdapterError,
)

DISCONNECT_POLL_S = 0.25
RUNTIME_UPDATES_OFF = ("Loading and unloading adapters at run time is off on this server: start it with "
                       "--enable-runtime-lora-updating (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=true)")  # fmt: skip


class APIError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class ServerState:
    """What the routes share: the served names, the tokenizer, the engine and its adapters."""

    base_name: str
    base_path: str
    tokenizer: PreTrainedTokenizerBase
    engine: Engine
    registry: AdapterRegistry
    metrics: ServerMetrics
    max_model_len: int
    created: int
    api_key: str | None = None  # every route but /health, /version and /metrics needs it
    runtime_lora_updating: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter are on


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application of a server (its engine is started and stopped with the app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.engine.stop()
        state.registry.close()

    app = FastAPI(title="flora", version=__version__, lifespan=lifespan)
    if state.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=state.api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(error_body(err.status, err.message, err.param), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(_describe(e) for e in err.errors())
        return JSONResponse(error_body(400, f"invalid request: {problems}"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        exposition = await asyncio.to_thread(state.metrics.exposition)  # ~30 ms with 64 adapters' series
        return Response(exposition, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [_card(state.base_name, state.base_path, None, state.created, state.max_model_len)]
        for name, entry in state.registry.names().items():
            path, created = (entry.path, entry.created) if isinstance(entry, AdapterVersion) else (entry, state.created)
            cards.append(_card(name, str(path), state.base_name, created, state.max_model_len))
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = state.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        _check_token_ids(ids, len(state.tokenizer))
        return await _generate(state, request, body, ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except ValueError as err:
            raise APIError(400, str(err), "messages") from None
        except Exception as err:  # noqa: BLE001  (the template itself rejects the conversation)
            raise APIError(400, f"messages: the chat template cannot render them ({err})", "messages") from None
        ids = state.tokenizer(text, add_special_tokens=False).input_ids
        return await _generate(state, request, body, ids, body.max_completion_tokens or body.max_tokens, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> Response:
        if not state.runtime_lora_updating:
            raise APIError(403, RUNTIME_UPDATES_OFF)
        try:  # off the event loop: paths are resolved and the config read
            version = await asyncio.to_thread(state.registry.register, body.lora_name, body.lora_path,
                                              inplace=body.load_inplace, confined=True)  # fmt: skip
        except AdapterAccessError as err:
            raise APIError(403, str(err), "lora_path") from None
        except AdapterLoadError as err:
            raise APIError(400, str(err), err.param) from None
        state.registry.hold(version)  # while it loads, so that it is not evicted before anyone uses it
        try:
            await asyncio.to_thread(version.settled.wait)
        finally:
            state.registry.release(version)
        if version.state == "failed":
            raise APIError(400, version.error or f"adapter {body.lora_name!r} failed to load", "lora_path")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> Response:
        if not state.runtime_lora_updating:
            raise APIError(403, RUNTIME_UPDATES_OFF)
        try:
            state.registry.unregister(body.lora_name)
        except UnknownAdapterError as err:
            raise APIError(404, err.args[0], "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
    return f"{where}: {error.get('msg', 'invalid')}"


def _card(name: str, root: str, parent: str | None, created: int, max_model_len: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "flora", "root": root, "parent": parent,
            "max_model_len": max_model_len}  # fmt: skip


def _check_token_ids(ids: list[int], vocabulary: int) -> None:
    if not ids:
        raise APIError(400, "prompt: the prompt is empty (expected at least one token)", "prompt")
    bad = [i for i in ids if not 0 <= i < vocabulary]
    if bad:
        raise APIError(400, f"prompt: token id {bad[0]} is out of range (expected 0 <= id < {vocabulary})", "prompt")


# -- one generation request ----------------------------------------------------------------------


async def _generate(
    state: ServerState, request: Request, body: CompletionRequest | ChatCompletionRequest, ids: list[int],
    max_tokens: int | None, chat: bool,
) -> Response:  # fmt: skip
    problem = body.unsupported()
    if problem:
        raise APIError(400, problem)
    limit = state.max_model_len
    if len(ids) >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your request has "
                            f"{len(ids)} input tokens. Please reduce the length of the input.", "prompt")  # fmt: skip
    if max_tokens is None:
        max_tokens = limit - len(ids)
    if len(ids) + max_tokens > limit:
        message = (f"This model's maximum context length is {limit} tokens. However, you requested "
                   f"{len(ids) + max_tokens} tokens ({len(ids)} in the input, {max_tokens} in the completion). "
                   f"Please reduce the length of the input or of max_tokens.")  # fmt: skip
        raise APIError(400, message, "max_tokens")
    params = SamplingParams(max_tokens=max_tokens, min_tokens=min(body.min_tokens, max_tokens),
                            temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                            ignore_eos=body.ignore_eos)  # fmt: skip
    adapter = _lease(state, body.model)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Token | Finished] = asyncio.Queue()
    engine_request = EngineRequest(
        id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", prompt_ids=ids, params=params, adapter=adapter,
        emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
    )  # fmt: skip
    try:
        state.engine.submit(engine_request)
    except QueueFullError as err:
        if adapter is not None:
            state.registry.release(adapter)
        raise APIError(429, str(err)) from None
    stream = _Completion(state, engine_request, events, body, chat)
    if body.stream:
        return StreamingResponse(stream.sse(), media_type="text/event-stream")
    return await stream.whole(request)


def _lease(state: ServerState, model: str) -> AdapterVersion | None:
    if model == state.base_name:
        return None
    try:
        return state.registry.lease(model)
    except UnknownAdapterError as err:
        raise APIError(404, err.args[0], "model") from None
    except AdapterAccessError as err:
        raise APIError(403, str(err), "model") from None
    except AdapterLoadError as err:
        raise APIError(400, str(err), "model") from None


class _Completion:
    """The events of one engine request turned into text, chunks and a response."""

    def __init__(self, state: ServerState, engine_request: EngineRequest, events: asyncio.Queue,
                 body: CompletionRequest | ChatCompletionRequest, chat: bool) -> None:  # fmt: skip
        self.state, self.request, self.events, self.body, self.chat = state, engine_request, events, body, chat
        self.created = int(time.time())
        self.tokens: list[int] = []
        self.text = ""  # text delivered so far
        self.finish: str | None = None
        self.error: str | None = None

    async def next_delta(self) -> str | None:
        """The next piece of text (``None`` once finished): tokens are decoded incrementally and stop
        strings cut the text (and end the request)."""
        while self.finish is None:
            event = await self.events.get()
            if isinstance(event, Finished):
                self.finish, self.error = event.reason, event.message
                if event.reason == "error":
                    return None
                return self._flush(final=True)
            self.tokens.append(event.token_id)
            delta = self._flush(final=False)
            if delta:
                return delta
        return None

    def _flush(self, final: bool) -> str:
        text = self.state.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the next token
        for stop in self.body.stop:
            at = text.find(stop, max(0, len(self.text) - len(stop)))
            if at != -1:
                text = text[:at]
                if self.finish is None:
                    self.finish = "stop"
                    self.state.engine.abort(self.request.id)
                break
        delta, self.text = text[len(self.text) :], text
        return delta

    @property
    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.request.prompt_ids), len(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chunk(self, delta: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant"} if role else {}
            if delta is not None:
                message["content"] = delta
            choice = {"index": 0, "delta": message, "logprobs": None, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return {"id": self.request.id, "object": kind, "created": self.created, "model": self.body.model,
                "choices": [choice]}  # fmt: skip

    async def sse(self) -> AsyncIterator[str]:
        """Server-sent events; a client that disconnects (the response task is cancelled) aborts it."""
        try:
            if self.chat:
                yield _event(self._chunk("", None, role=True))
            while (delta := await self.next_delta()) is not None:
                if delta:
                    yield _event(self._chunk(delta, None))
                if self.finish is not None:
                    break
            if self.finish == "error":
                yield _event(error_body(500, self.error or "generation failed"))
            else:
                yield _event(self._chunk("" if not self.chat else None, self.finish))
                options = self.body.stream_options
                if options is not None and options.include_usage:
                    usage = {**self._chunk(None, None), "choices": [], "usage": self.usage}
                    yield _event(usage)
            yield "data: [DONE]\n\n"
        finally:
            if self.finish is None:
                self.state.engine.abort(self.request.id)

    async def whole(self, http_request: Request) -> Response:
        """The complete response, or nothing if the client went away first (the request is aborted)."""

        async def collect() -> str:
            parts = []
            while (delta := await self.next_delta()) is not None:
                parts.append(delta)
                if self.finish is not None:
                    break
            return "".join(parts)

        async def gone() -> None:
            while not await http_request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)

        text_task, gone_task = asyncio.create_task(collect()), asyncio.create_task(gone())
        try:
            await asyncio.wait({text_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone_task.cancel()
        if not text_task.done():
            text_task.cancel()
            self.state.engine.abort(self.request.id)
            return Response(status_code=499)
        text = text_task.result()
        if self.finish == "error":
            raise APIError(500, self.error or "generation failed")
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": self.finish}  # fmt: skip
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish}
            kind = "text_completion"
        return JSONResponse({"id": self.request.id, "object": kind, "created": self.created, "model": self.body.model,
                             "choices": [choice], "usage": self.usage})  # fmt: skip


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
