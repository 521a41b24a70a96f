"""One HTTP generation request's choices: their text as tokens arrive, cut at stop strings, their log
probabilities, and the OpenAI-shaped responses and stream chunks built from them.

A request for ``P`` prompts with ``n`` choices each (``best_of`` >= ``n`` generated) is ``P · best_of``
engine requests; choice ``i`` of prompt ``p`` has index ``p · n + i``. Each engine request's text is
a `ChoiceText`:

- tokens are decoded as they come (the text of all tokens so far, so that characters spanning tokens
  come out whole); a token that ended the request (end of sequence, a stop token id) is not text;
- once ``min_tokens`` tokens are out, the first occurrence of any stop string ends the text (before
  the stop string, or after it with ``include_stop_str_in_output``) and the request (counted as
  ``stop``, with the string as ``stop_reason``);
- text that could still become a stop string (a suffix that is the beginning of one) and an
  incomplete character are held back until the next token decides, as vLLM does: no part of a stop
  string ever reaches the client, streamed or not, whatever the token boundaries.

A token's log probabilities go out with the text it begins in. With ``best_of > n`` the ``n`` choices
of a prompt are its sequences with the highest mean log probability per token (OpenAI's rule);
they are not streamed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from flora.serve.engine import EngineRequest, Finished, PromptLogprobs, Token
from flora.serve.logits import TokenLogprob
from flora.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body

Event = Token | PromptLogprobs | Finished


@dataclass(frozen=True)
class TextOptions:
    """How a choice's tokens become text."""

    stops: Sequence[str] = ()
    include_stop: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = 0


class ChoiceText:
    """One sequence's text and log probabilities as its tokens arrive (see the module docstring).
    ``on_stop(stop)`` is called once when a stop string ends it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, options: TextOptions, on_stop: Callable[[str], None]):
        self.tokenizer, self.options, self.on_stop = tokenizer, options, on_stop
        self.token_ids: list[int] = []  # the tokens of the text
        self.logprobs: list[TokenLogprob | None] = []  # one per token of ``token_ids``
        self.generated = 0  # tokens generated, the one that ended the request included
        self.text = ""  # the text so far (cut at a stop string once one is seen)
        self.sent = 0  # characters of ``text`` delivered
        self.reported = 0  # tokens whose log probabilities were delivered
        self.logprob_offset = 0  # where the next reported token's text begins (completions' text_offset)
        self.finish: Finished | None = None
        self.prompt_logprobs: PromptLogprobs | None = None
        self.ending: tuple[int, TokenLogprob | None] | None = None  # the token that ended it (EOS, a stop token)
        self._starts: dict[int, int] = {0: 0}  # token position -> where its text begins
        self._search_from = 0  # no stop string begins before this character

    def add(self, event: Event) -> None:
        if isinstance(event, PromptLogprobs):
            self.prompt_logprobs = event
        elif isinstance(event, Finished):
            self.finish = self.finish or event
        elif self.finish is None:  # tokens generated after a stop string was seen are not part of the answer
            self.generated += 1
            if event.finish is None or not event.finish.by_token:
                self.token_ids.append(event.token_id)
                self.logprobs.append(event.logprob)
                self.text = self._decode(len(self.token_ids))
                self._cut_at_stop()
            else:  # not part of the text, but its log probability is reported as vLLM does (lm-eval's
                self.ending = (event.token_id, event.logprob)  # echo scoring drops the last token it gets)
            if event.finish is not None:
                self.finish = self.finish or event.finish

    def _decode(self, tokens: int) -> str:
        return self.tokenizer.decode(self.token_ids[:tokens], skip_special_tokens=self.options.skip_special_tokens)

    def _cut_at_stop(self) -> None:
        """End the text at the first stop string that begins in the text of the ``min_tokens``-th token or later."""
        if not self.options.stops:
            return
        if self.generated < self.options.min_tokens:
            self._search_from = len(self.text)
            return
        found = [(at, stop) for stop in self.options.stops if (at := self.text.find(stop, self._search_from)) != -1]
        if found:
            at, stop = min(found)
            self.text = self.text[: at + (len(stop) if self.options.include_stop else 0)]
            self.finish = Finished("stop", stop_reason=stop)
            self.on_stop(stop)
        else:  # a later match ends in later text (less the characters that pieces of one may merge into)
            self._search_from = max(self._search_from, len(self.text) - max(map(len, self.options.stops)) - 3)

    def delta(self) -> str:
        """Text not delivered yet that no later token can change; marks it delivered."""
        end = len(self.text) if self.finish is not None else len(self.text) - self._held_back()
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece

    def _held_back(self) -> int:
        """Characters at the end of the text that may still change: an incomplete character, or the
        longest suffix that begins a stop string."""
        text = self.text
        held = len(text) - len(text.rstrip("\ufffd"))
        if self.generated >= self.options.min_tokens:
            tail = text[self.sent :]
            for stop in self.options.stops:
                for length in range(min(len(stop) - 1, len(tail)), held, -1):
                    if tail.endswith(stop[:length]):
                        held = length
                        break
        return held

    def new_tokens(self) -> list[int]:
        """Positions in ``token_ids`` of the tokens not reported yet whose text begins in the text
        delivered so far (all the text's tokens once finished); marks them reported."""
        count = len(self.token_ids) if self.finish is not None and self.sent >= len(self.text) else None
        if count is None or len(self.text) < len(self._decode(len(self.token_ids))):
            count = self._tokens_before(self.sent)
        positions = list(range(self.reported, count))
        self.reported = max(self.reported, count)
        return positions

    def _tokens_before(self, chars: int) -> int:
        """How many tokens' text begins before character ``chars`` (binary search over the tokens)."""
        low, high = 0, len(self.token_ids)  # the first position whose text begins at ``chars`` or later
        while low < high:
            middle = (low + high) // 2
            if middle not in self._starts:
                self._starts[middle] = len(self._decode(middle))
            if self._starts[middle] >= chars:
                high = middle
            else:
                low = middle + 1
        return low


def completion_logprobs(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], values: Sequence[TokenLogprob | None], offset: int
) -> dict[str, Any]:
    """OpenAI's completions ``logprobs`` for tokens ``ids`` (``values``: theirs, ``None`` for a prompt's
    first token), their text beginning at character ``offset``. ``top_logprobs`` holds the likeliest
    tokens and the chosen one (vLLM's)."""
    tokens = tokenizer.batch_decode([[i] for i in ids])
    offsets, top = [], []
    for token, value in zip(tokens, values, strict=True):
        offsets.append(offset)
        offset += len(token)
        if value is None:
            top.append(None)
        else:
            alternatives = {tokenizer.decode([i]): v for i, v in value.top}
            top.append({**alternatives, token: value.logprob})
    return {"tokens": tokens, "token_logprobs": [v.logprob if v else None for v in values], "top_logprobs": top,
            "text_offset": offsets}  # fmt: skip


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], values: Sequence[TokenLogprob]) -> list:
    """OpenAI's chat ``logprobs.content`` for tokens ``ids``."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return [entry(i, v.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in v.top]}
            for i, v in zip(ids, values, strict=True)]  # fmt: skip


class Completion:
    """The choices of one request, fed by their engine requests' events (see the module docstring).

    Args:
        id: the response's id.
        requests: per prompt, its ``best_of`` engine requests (their ``emit`` is set here).
        echoes: per prompt, the text put in front of its choices (completions' ``echo``), else ``None``.
        abort: ends an engine request early, counted as the given finish.
    """

    def __init__(
        self, id: str, body: CompletionRequest | ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase,
        requests: list[list[EngineRequest]], echoes: list[str | None], abort: Callable[[str, Finished], None],
    ) -> None:  # fmt: skip
        self.id, self.body, self.tokenizer, self.requests, self.echoes = id, body, tokenizer, requests, echoes
        self.abort = abort
        self.chat = isinstance(body, ChatCompletionRequest)
        self.created = int(time.time())
        self.events: asyncio.Queue[tuple[int, int, Event]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        options = TextOptions(tuple(body.stop), body.include_stop_str_in_output, body.skip_special_tokens,
                              body.min_tokens)  # fmt: skip
        self.texts: list[list[ChoiceText]] = []
        for p, group in enumerate(requests):
            self.texts.append([])
            for s, request in enumerate(group):
                request.emit = self._emitter(loop, p, s)
                stopped = lambda stop, rid=request.id: abort(rid, Finished("stop", stop_reason=stop))  # noqa: E731
                self.texts[-1].append(ChoiceText(tokenizer, options, stopped))

    def _emitter(self, loop: asyncio.AbstractEventLoop, p: int, s: int) -> Callable[[Event], None]:
        """Engine events of sequence ``s`` of prompt ``p``, put in the queue on the event loop's thread."""
        return lambda event: loop.call_soon_threadsafe(self.events.put_nowait, (p, s, event))

    @property
    def reports_logprobs(self) -> bool:
        return bool(self.body.logprobs) if self.chat else self.body.logprobs is not None

    @property
    def choices(self) -> list[ChoiceText]:
        return [text for group in self.texts for text in group]

    @property
    def finished(self) -> bool:
        return all(text.finish is not None for text in self.choices)

    @property
    def error(self) -> str | None:
        failed = [t.finish for t in self.choices if t.finish is not None and t.finish.reason == "error"]
        return (failed[0].message or "generation failed") if failed else None

    def abort_unfinished(self) -> None:
        ids = [request.id for group in self.requests for request in group]
        for text, request_id in zip(self.choices, ids, strict=True):
            if text.finish is None:
                self.abort(request_id, Finished("abort"))

    async def next_event(self) -> tuple[int, int]:
        """Apply the next engine event to its choice; returns its prompt and sequence."""
        p, s, event = await self.events.get()
        self.texts[p][s].add(event)
        return p, s

    @property
    def usage(self) -> dict[str, int]:
        prompt = sum(len(group[0].prompt_ids) for group in self.requests)
        completion = sum(text.generated for text in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _best(self, p: int) -> list[ChoiceText]:
        """Prompt ``p``'s ``n`` choices: with ``best_of`` its sequences of highest mean log probability."""
        group = self.texts[p]
        if len(group) == self.body.n:
            return group

        def mean_logprob(text: ChoiceText) -> float:
            return sum(v.logprob for v in text.logprobs if v) / max(1, len(text.logprobs))

        return sorted(group, key=mean_logprob, reverse=True)[: self.body.n]

    # -- the whole response --------------------------------------------------------------------

    async def whole(self) -> dict[str, Any]:
        """The response once every choice has finished."""
        while not self.finished:
            await self.next_event()
        choices = []
        for p in range(len(self.texts)):
            for i, text in enumerate(self._best(p)):
                text.delta()
                positions = text.new_tokens() if self.reports_logprobs else []
                choice = self._choice(p, text, text.text, positions, echo=True, finishing=True)
                choices.append(choice | {"index": p * self.body.n + i})
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.body.model, "choices": choices,
                "usage": self.usage}  # fmt: skip

    def _choice(self, p: int, text: ChoiceText, piece: str, positions: list[int], echo: bool, finishing: bool,
                role: bool = False) -> dict[str, Any]:  # fmt: skip
        """One choice of a response or of a chunk: ``piece`` of its text, the log probabilities of its
        tokens at ``positions`` (and, with ``echo``, the prompt in front)."""
        finish = text.finish if finishing else None
        ids = [text.token_ids[i] for i in positions]
        values = [text.logprobs[i] for i in positions]
        if finish is not None and text.ending is not None and not self.chat:
            ids, values = ids + [text.ending[0]], values + [text.ending[1]]
        choice: dict[str, Any] = {"finish_reason": finish.reason if finish else None,
                                  "stop_reason": finish.stop_reason if finish else None}  # fmt: skip
        if self.chat:
            logprobs = {"content": chat_logprobs(self.tokenizer, ids, values)} if self.reports_logprobs else None
            content = "message" if not self.body.stream else "delta"
            message: dict[str, Any] = {"role": "assistant"} if (role or not self.body.stream) else {}
            if piece or not self.body.stream:
                message["content"] = piece
            return {content: message, "logprobs": logprobs} | choice
        if echo and self.echoes[p] is not None:
            piece = self.echoes[p] + piece
            if text.prompt_logprobs is not None:
                prompt = self.requests[p][0].prompt_ids
                ids, values = list(prompt) + ids, list(text.prompt_logprobs.entries) + values
        logprobs = None
        if self.reports_logprobs:
            logprobs = completion_logprobs(self.tokenizer, ids, values, text.logprob_offset)
            text.logprob_offset += sum(len(t) for t in logprobs["tokens"])
        return {"text": piece, "logprobs": logprobs} | choice

    # -- the stream ----------------------------------------------------------------------------

    async def sse(self) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of a choice's text; a client that disconnects (the
        response task is cancelled) aborts what has not finished."""
        n, kind = self.body.n, "chat.completion.chunk" if self.chat else "text_completion"
        options = self.body.stream_options
        every_chunk_usage = options is not None and options.continuous_usage_stats

        def chunk(choices: list[dict[str, Any]]) -> str:
            payload = {"id": self.id, "object": kind, "created": self.created, "model": self.body.model,
                       "choices": choices}  # fmt: skip
            if every_chunk_usage:
                payload["usage"] = self.usage
            return _event(payload)

        started: set[tuple[int, int]] = set()  # choices whose first chunk went out
        ended: set[tuple[int, int]] = set()  # choices whose last chunk went out
        try:
            while not self.finished:
                p, s = await self.next_event()
                if self.error is not None:
                    break
                text = self.texts[p][s]
                if (p, s) in ended:
                    continue
                opening = (p, s) not in started
                piece, positions = text.delta(), text.new_tokens() if self.reports_logprobs else []
                if not (opening or piece or positions or text.finish is not None):
                    continue
                started.add((p, s))
                if text.finish is not None:
                    ended.add((p, s))
                choice = self._choice(p, text, piece, positions, echo=opening, finishing=text.finish is not None,
                                      role=opening)  # fmt: skip
                yield chunk([choice | {"index": p * n + s}])
            if self.error is not None:
                yield _event(error_body(500, self.error))
            elif options is not None and options.include_usage:
                yield _event({"id": self.id, "object": kind, "created": self.created, "model": self.body.model,
                              "choices": [], "usage": self.usage})  # fmt: skip
            yield "data: [DONE]\n\n"
        finally:
            self.abort_unfinished()


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
