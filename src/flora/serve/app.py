"""The HTTP API: FastAPI routes with vLLM's paths and OpenAI's request and response shapes.

- ``POST /v1/completions``, ``POST /v1/chat/completions``: ``model`` names the adapter (or the base
  model); a prompt, a list of prompts, or token ids; ``n`` (and ``best_of``) choices each, every one
  an engine request with its own sampling settings (`flora.serve.logits`, `flora.serve.sampling`);
  ``logprobs``, ``echo`` (the prompt's log probabilities; ``max_tokens`` 0 scores the prompt only);
  ``stream`` sends server-sent events (``data: {json}`` chunks, then ``data: [DONE]``), with a last
  chunk holding ``usage`` when ``stream_options.include_usage``. Text, stop strings and log
  probabilities of each choice: `flora.serve.completion`.
- ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` (vLLM's; lm-evaluation-harness
  uses them as its remote tokenizer).
- ``GET /v1/models``; ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter`` (off unless
  ``runtime_lora_updating``; paths confined to the registry's roots: 403 otherwise).
- ``GET /health``, ``GET /metrics`` (Prometheus): open even with an API key (`flora.serve.auth`: 401
  for any other route without ``Authorization: Bearer KEY``).

Errors have OpenAI's shape (`flora.serve.protocol.error_body`): 400 for bad input (validation, an
unsupported or unknown field, malformed JSON, a prompt past the context, an adapter that cannot be
served), 404 for an unknown model, 413 for a body over ``max_request_bytes`` (`flora.serve.body_limit`),
429 when the queue is full. Text prompts are tokenized off the event loop, and one that cannot fit the
context whatever its tokens (more characters than ``max_model_len`` of the longest token hold) is
refused without being tokenized. A client that goes away, streaming or not, frees its slots in the
batch at once. The engine only sees token ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedTokenizerBase

from flora import __version__
from flora.serve.auth import APIKeyMiddleware
from flora.serve.body_limit import BodyLimitMiddleware
from flora.serve.completion import Completion
from flora.serve.engine import Engine, EngineRequest, QueueFullError, SamplingParams
from flora.serve.logits import LogitsSettings
from flora.serve.metrics import ServerMetrics
from flora.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
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


DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20  # 8 MiB: 128 prompts of 2048 tokens of text fit
ADAPTER_CACHE_HEADER = "x-flora-adapter-cache"  # "hit": the adapter was in the model; "miss": it was loaded


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
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # a larger body is refused (413) unread
    max_token_chars: int = 0  # the most characters a token stands for (0: worked out from the tokenizer)

    def __post_init__(self) -> None:
        if not self.max_token_chars:
            self.max_token_chars = longest_token_chars(self.tokenizer)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application of a server (its engine is started and stopped with the app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.engine.stop()
        state.registry.close()

    app = FastAPI(title="flora", version=__version__, lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.max_request_bytes)
    if state.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=state.api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(error_body(err.status, err.message, err.param), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        problems = "; ".join(_describe(e) for e in errors)
        return JSONResponse(error_body(400, f"invalid request: {problems}", _field(errors[0]) if errors else None),
                            status_code=400)  # fmt: skip

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
        prompts = []
        for prompt in body.prompts():
            ids = await _tokenize(state, prompt, body.add_special_tokens, "prompt")
            prompts.append((ids, (prompt if isinstance(prompt, str) else state.tokenizer.decode(ids))
                            if body.echo else None))  # fmt: skip
        return await _generate(state, request, body, prompts, body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        ids = await _tokenize(state, _render_chat(state, body), body.add_special_tokens, "messages")
        return await _generate(state, request, body, [(ids, None)], body.max_completion_tokens or body.max_tokens)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> dict[str, Any]:
        _check_model(state, body.model)
        if isinstance(body, TokenizeChatRequest):
            ids = await _tokenize(state, _render_chat(state, body), body.add_special_tokens, "messages")
        else:
            ids = await _tokenize(state, body.prompt, body.add_special_tokens, "prompt")
        strings = state.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": strings}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tokenizer = state.tokenizer
        settings = {k: v for k, v in tokenizer.init_kwargs.items() if isinstance(v, str | int | float | bool)}
        return settings | {"tokenizer_class": type(tokenizer).__name__, "chat_template": tokenizer.chat_template,
                           "model_max_length": state.max_model_len, "eos_token": tokenizer.eos_token,
                           "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token}  # fmt: skip

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        _check_model(state, body.model)
        _check_ids(state, body.tokens, "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

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
            await _settled(version)
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


def longest_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters one token of ``tokenizer`` decodes to: text of ``c`` characters is at least
    ``c / longest`` tokens."""
    return max(len(text) for text in tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))


def _field(error: dict[str, Any]) -> str | None:
    """The request field a validation error is about (``None`` for the whole body)."""
    return ".".join(str(p) for p in error.get("loc", ()) if p != "body") or None


def _describe(error: dict[str, Any]) -> str:
    where = _field(error) or "body"
    if error.get("type") == "extra_forbidden":
        return f"{where}: this field is not supported by this server (see the API reference in docs/serving.md)"
    message = error.get("msg", "invalid").removeprefix("Value error, ")
    return message if where == "body" else f"{where}: {message}"


def _card(name: str, root: str, parent: str | None, created: int, max_model_len: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "flora", "root": root, "parent": parent,
            "max_model_len": max_model_len}  # fmt: skip


def _render_chat(state: ServerState, body: ChatCompletionRequest | TokenizeChatRequest) -> str:
    """``body``'s messages as text, with the tokenizer's chat template."""
    try:
        messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                    for m in body.messages]  # fmt: skip
        return state.tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt, tokenize=False,
            continue_final_message=body.continue_final_message, **(body.chat_template_kwargs or {}),
        )  # fmt: skip
    except ValueError as err:
        raise APIError(400, str(err), "messages") from None
    except Exception as err:  # noqa: BLE001  (the template itself rejects the conversation)
        raise APIError(400, f"messages: the chat template cannot render them ({err})", "messages") from None


def _check_model(state: ServerState, model: str | None) -> None:
    """A 404 unless ``model`` (when given) is served."""
    if model is not None and model != state.base_name and model not in state.registry.names():
        shown = model if len(model) <= 100 else f"{model[:100]}..."
        raise APIError(404, f"The model {shown!r} does not exist.", "model")


def _check_ids(state: ServerState, ids: list[int], param: str) -> None:
    vocabulary = len(state.tokenizer)
    bad = [i for i in ids if not 0 <= i < vocabulary]
    if bad:
        raise APIError(400, f"{param}: token id {bad[0]} is out of range (expected 0 <= id < {vocabulary})", param)


async def _tokenize(state: ServerState, prompt: str | list[int], special_tokens: bool, param: str) -> list[int]:
    """A prompt's token ids (text is tokenized off the event loop), checked: known ids, not empty, and
    shorter than the context. Text that cannot fit the context whatever it holds (more characters than
    ``max_model_len`` tokens of the longest token can hold) is refused without tokenizing it."""
    limit = state.max_model_len
    if isinstance(prompt, str):
        if len(prompt) > limit * state.max_token_chars:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your request has "
                                f"{len(prompt)} characters, more than {limit} tokens can hold (at most "
                                f"{state.max_token_chars} characters each). Please reduce the length of the input.",
                           param)  # fmt: skip
        ids = await asyncio.to_thread(lambda: state.tokenizer(prompt, add_special_tokens=special_tokens).input_ids)
    else:
        ids = prompt
    if not ids:
        raise APIError(400, f"{param}: the prompt is empty (expected at least one token)", param)
    _check_ids(state, ids, param)
    if len(ids) >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your request has "
                            f"{len(ids)} input tokens. Please reduce the length of the input.", param)  # fmt: skip
    return ids


# -- one generation request ----------------------------------------------------------------------


async def _generate(
    state: ServerState, request: Request, body: CompletionRequest | ChatCompletionRequest,
    prompts: list[tuple[list[int], str | None]], max_tokens: int | None,
) -> Response:  # fmt: skip
    """Run ``prompts`` (token ids and the text echoed in front of their choices) with ``body``'s
    settings: ``best_of`` (or ``n``) engine requests each, answered as one response or stream."""
    limit = state.max_model_len
    longest = max(len(ids) for ids, _ in prompts)
    if max_tokens is not None and longest + max_tokens > limit:
        message = (f"This model's maximum context length is {limit} tokens. However, you requested "
                   f"{longest + max_tokens} tokens ({longest} in the input, {max_tokens} in the completion). "
                   f"Please reduce the length of the input or of max_tokens.")  # fmt: skip
        raise APIError(400, message, "max_tokens")
    token_fields = {"logit_bias": [int(t) for t in body.logit_bias or {}], "stop_token_ids": body.stop_token_ids or [],
                    "allowed_token_ids": body.allowed_token_ids or []}  # fmt: skip
    for field, ids in token_fields.items():
        _check_ids(state, ids, field)
    sequences = getattr(body, "best_of", None) or body.n
    adapter, in_memory = await _lease(state, body.model)
    headers = {} if adapter is None else {ADAPTER_CACHE_HEADER: "hit" if in_memory else "miss"}
    if adapter is not None:
        for _ in range(len(prompts) * sequences - 1):
            state.registry.hold(adapter)  # every engine request releases it when it ends
    base = f"{'chatcmpl' if isinstance(body, ChatCompletionRequest) else 'cmpl'}-{uuid.uuid4().hex}"
    groups = []
    for p, (ids, _) in enumerate(prompts):
        params = sampling_params(body, max_tokens if max_tokens is not None else limit - len(ids), sequences > body.n)
        groups.append([EngineRequest(id=f"{base}-{p}-{s}", prompt_ids=ids, adapter=adapter, emit=_unset,
                                     params=replace(params, seed=None if params.seed is None else params.seed + s))
                       for s in range(sequences)])  # fmt: skip
    completion = Completion(base, body, state.tokenizer, groups, [echo for _, echo in prompts], state.engine.abort)
    try:  # before its adapter is read: the engine admits it at the step boundary where the adapter is installed
        state.engine.submit(*[r for group in groups for r in group])
    except QueueFullError as err:
        if adapter is not None:
            for _ in range(len(prompts) * sequences):
                state.registry.release(adapter)
        raise APIError(429, str(err)) from None
    if adapter is not None:  # a request whose adapter cannot be loaded is answered with the reason, nothing sent
        await _settled(adapter)
        if adapter.state == "failed":  # the engine ends its requests, and releases the adapter, at its next step
            raise APIError(400, adapter.error or f"adapter {body.model!r} cannot be loaded", "model")
    if body.stream:
        return StreamingResponse(completion.sse(), media_type="text/event-stream", headers=headers)
    return await _whole(completion, request, headers)


def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int, ranked: bool) -> SamplingParams:
    """The engine's settings of one sequence of ``body`` (``ranked``: its log probability is needed to
    rank ``best_of`` sequences even when the client asked for none)."""
    if isinstance(body, ChatCompletionRequest):
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt_logprobs = None
    else:
        logprobs = body.logprobs
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    if ranked and logprobs is None:
        logprobs = 0
    logits = LogitsSettings(
        logit_bias=tuple((int(t), b) for t, b in (body.logit_bias or {}).items()),
        allowed_token_ids=tuple(body.allowed_token_ids) if body.allowed_token_ids else None,
        min_tokens=min(body.min_tokens, max_tokens), repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
    )  # fmt: skip
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
        min_p=body.min_p, seed=body.seed, logits=logits, stop_token_ids=frozenset(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
    )  # fmt: skip


def _unset(event) -> None:
    raise AssertionError("an engine request's emit is set by its Completion")


async def _whole(completion: Completion, http_request: Request, headers: dict[str, str]) -> Response:
    """The complete response, or nothing if the client went away first (its requests are aborted)."""

    async def gone() -> None:
        while not await http_request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    answer, gone_task = asyncio.create_task(completion.whole()), asyncio.create_task(gone())
    try:
        await asyncio.wait({answer, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone_task.cancel()
    if not answer.done():
        answer.cancel()
        completion.abort_unfinished()
        return Response(status_code=499)
    if completion.error is not None:
        raise APIError(500, completion.error)
    return JSONResponse(answer.result(), headers=headers)


async def _lease(state: ServerState, model: str) -> tuple[AdapterVersion | None, bool]:
    """``model``'s adapter (``None`` for the base model), leased, and whether it was in the model
    already; one not in memory is queued to be read (`_settled` waits for it)."""
    if model == state.base_name:
        return None, True
    try:
        return await asyncio.to_thread(state.registry.lease, model)
    except UnknownAdapterError as err:
        raise APIError(404, err.args[0], "model") from None
    except AdapterAccessError as err:
        raise APIError(403, str(err), "model") from None
    except AdapterLoadError as err:
        raise APIError(400, str(err), "model") from None


async def _settled(version: AdapterVersion) -> None:
    """Wait, on the event loop and without a thread, until ``version`` is ready or failed."""
    if version.settled.is_set():
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake() -> None:  # on the thread that settles it
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    version.on_settled(wake)
    await done
