"""The engine: continuous batching of requests that each use their own adapter, on one thread.

Every iteration of the engine's loop, between two decoding steps:

1. the adapter registry's pending work is applied (adapters read on a worker thread are installed,
   evicted or retired ones removed);
2. aborted requests (client gone, stop string seen) leave the batch at once;
3. waiting requests are admitted while the limits allow (``max_num_seqs`` rows,
   ``max_num_batched_tokens`` tokens per step, ``max_loras`` distinct adapters in the batch); a
   request whose adapter is still loading, or would be one adapter too many, is skipped, not
   waited for. Admitted requests are prefilled in groups of similar prompt length
   (`prefill_groups`), one model step per group over its left-padded prompts with each row's
   adapter (`AdapterModel.step`, which also puts prompt- and prefix-tuning rows' virtual tokens
   in front), and their keys and values take the next slots of the running batch's cache
   (`flora.serve.slot_cache`);
4. one decoding step for all running rows: one model step of ``[rows, 1]`` tokens over the shared
   cache with each row's adapter (the `AdapterBatch` is reused while the rows stay the same), then
   every row's next token (`flora.serve.sampling`). Every batch, prefill's too, is made to
   ``carry`` what the layers compiled for the last one of its shape (`flora.methods.batch`);
5. finished rows leave: end of sequence, ``max_tokens``, or the context limit. The rows that stay
   keep their slots where they can (`slot_order`), so that the cache moves only the rows from past
   the new end and the next batch differs from the last only in the rows that changed.

Each row sees only its own columns of the cache (the attention mask) at its own positions, so its
tokens are those of `AdapterModel.generate` for that prompt alone, whatever shares the batch.

``batching`` picks the policy: ``continuous`` (the above), ``static`` (a batch is formed only when
none runs, and runs to completion) or ``one-adapter`` (the batch holds one adapter's requests at a
time, as a server switching PEFT's active adapter would): the last two are baselines for the
load benchmark.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flora.model import AdapterModel
from flora.serve.logits import LogitsSettings, RowHistory, TokenLogprob, adjust_logits, chosen_logprobs
from flora.serve.metrics import ServerMetrics
from flora.serve.registry import AdapterRegistry, AdapterVersion
from flora.serve.sampling import next_tokens
from flora.serve.slot_cache import SlotCache

logger = logging.getLogger("flora.serve")

BATCHING = ("continuous", "static", "one-adapter")
# What one more prefill forward costs, in prompt tokens: a forward reads every weight from memory and
# runs every layer's Python whatever its length. SmolLM2-135M on 2 CPU cores: ~45 ms for a 4-token
# prompt, ~0.7 ms per further token (with LoRA adapters: ~65 ms and ~0.8 ms).
FORWARD_COST_TOKENS = 48
# Token-rows times vocabulary of one forward that keeps every prompt position's logits (for prompt
# log probabilities): 2^26 float32 logits, 256 MiB (SmolLM2: 1365 token-rows).
PROMPT_LOGITS_TOKENS = 2**26


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_queue`` (HTTP 429)."""


@dataclass(frozen=True)
class SamplingParams:
    """How a request's tokens are chosen, what is reported of them and when it ends.

    ``logprobs``: report each generated token's log probability and those of its ``logprobs`` likeliest
    alternatives (``None``: nothing); ``prompt_logprobs``: the same for every prompt token but the
    first. ``max_tokens`` 0 scores the prompt only (with ``prompt_logprobs``)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    logits: LogitsSettings = LogitsSettings()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class Finished:
    """The request ended: ``reason`` is ``stop``, ``length``, ``abort`` or ``error`` (``message`` says
    why). ``stop_reason``: the stop string or stop token id that ended it (``None`` for end of
    sequence). ``by_token``: its last token ended it (end of sequence or a stop token) and is not
    part of its text."""

    reason: str
    message: str | None = None
    stop_reason: int | str | None = None
    by_token: bool = False


@dataclass(frozen=True)
class Token:
    """A generated token, its log probabilities when asked for, and ``finish`` when it was the last."""

    token_id: int
    logprob: TokenLogprob | None = None
    finish: Finished | None = None


@dataclass(frozen=True)
class PromptLogprobs:
    """Per prompt token, its log probability given the ones before (``None`` for the first)."""

    entries: tuple[TokenLogprob | None, ...]


@dataclass(eq=False)
class EngineRequest:
    """A request as the engine sees it. ``emit`` delivers its events (thread-safe, non-blocking)."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterVersion | None
    emit: Callable[[Token | PromptLogprobs | Finished], None]
    arrival: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    seed: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def adapter_name(self) -> str | None:
        return None if self.adapter is None else self.adapter.name


@dataclass(frozen=True)
class EngineLimits:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    max_queue: int = 1024
    max_loras: int | None = None  # distinct adapters in the running batch at most (vLLM's --max-loras)

    def admits_adapter(self, batch: set[AdapterVersion], adapter: AdapterVersion | None) -> bool:
        """Whether a request on ``adapter`` may join a batch running ``batch``'s adapters under
        ``max_loras`` (the base model is no adapter)."""
        return adapter is None or adapter in batch or self.max_loras is None or len(batch) < self.max_loras


class Engine:
    """Continuous batching over an `AdapterModel` (see the module docstring). `start` runs the loop
    on a thread of its own; `submit` and `abort` may be called from any thread."""

    def __init__(
        self,
        model: AdapterModel,
        registry: AdapterRegistry,
        limits: EngineLimits,
        metrics: ServerMetrics,
        batching: str = "continuous",
        eos_token_ids: set[int] | None = None,
        pad_token_id: int = 0,
    ) -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching {batching!r} is unknown (expected one of {', '.join(BATCHING)})")
        self.model = model
        self.registry = registry
        self.limits = limits
        self.metrics = metrics
        self.batching = batching
        self.eos_token_ids = eos_token_ids or set()
        self.pad_token_id = pad_token_id
        self._inbox: deque[EngineRequest] = deque()
        self._aborts: dict[str, Finished] = {}
        self._wakeup = threading.Condition()
        self._seeds = itertools.count(0x5EED)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.waiting: list[EngineRequest] = []
        self.running: list[EngineRequest] = []
        self._cache = SlotCache()
        self._batch = None  # the running rows' `AdapterBatch`; None: to be made (`_decode`)
        self._rows: dict[str, Tensor] = {}  # per running row: "position" (of its next token), sampling settings
        self._tokens: Tensor | None = None  # [rows]: each running row's last token
        self._vocabulary = model.base_model.get_output_embeddings().weight.shape[0]

    # -- any thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="flora-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, *requests: EngineRequest) -> None:
        """Queue ``requests`` (all or none: `QueueFullError` when more than ``max_queue`` would wait
        beyond the batch's free slots). Requests whose adapter is still being read may be queued
        before it is: they wait apart from the count, and join at the step boundary it is installed."""
        with self._wakeup:
            free = max(0, self.limits.max_num_seqs - len(self.running))
            admissible = [
                r for r in (*self._inbox, *self.waiting, *requests) if r.adapter is None or r.adapter.state == "ready"
            ]
            if len(admissible) - free > self.limits.max_queue:
                raise QueueFullError(
                    f"the server is at capacity: {self.limits.max_queue} requests are already waiting (--max-queue)"
                )
            for request in requests:
                if request.params.seed is None:
                    request.seed = next(self._seeds) * 7919 + int(time.time_ns() % 1_000_003)
                else:
                    request.seed = request.params.seed
                self._inbox.append(request)
            self._wakeup.notify()

    def abort(self, request_id: str, finish: Finished = Finished("abort")) -> None:
        """End ``request_id`` at the next step boundary: its slot is freed, and it is counted and
        logged as ``finish`` (a client gone: ``abort``; a stop string seen: ``stop``)."""
        with self._wakeup:
            self._aborts.setdefault(request_id, finish)
            self._wakeup.notify()

    def wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    @property
    def queued(self) -> int:
        return len(self._inbox) + len(self.waiting)

    def waiting_requests(self) -> list[EngineRequest]:
        """Every request not yet admitted, those submitted since the last step too (any thread)."""
        with self._wakeup:
            return [*self.waiting, *self._inbox]

    # -- the engine's thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                idle = not (self._inbox or self._aborts or self.running or self._admissible())
                if idle and not self.registry.waiting_installs() and not self._stopping:
                    self._wakeup.wait(timeout=0.5)
                if self._stopping:
                    break
            self.step_once()
        for request in self.running + self.waiting + list(self._inbox):
            self._finish(request, Finished("abort", "the server is shutting down"))

    def step_once(self) -> None:
        """One pass of the loop (the engine's thread, or a test's when the engine is not started):
        the requests submitted and aborted since the last, then one step."""
        with self._wakeup:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            aborts, self._aborts = self._aborts, {}
        try:
            with torch.inference_mode():
                self._step(aborts)
        except Exception as err:  # noqa: BLE001  (a failed step fails its requests, not the server)
            logger.exception("engine step failed")
            for request in self.running + self.waiting:
                self._finish(request, Finished("error", f"the engine failed: {err}"))
            self.running, self.waiting, self._cache, self._batch, self._rows = [], [], SlotCache(), None, {}

    def _step(self, aborts: dict[str, Finished]) -> None:
        if self.registry.apply(self.model):
            self._batch = None  # adapters changed: the batch is made again
        for request in [r for r in self.waiting if r.id in aborts]:
            self.waiting.remove(request)
            self._finish(request, aborts[request.id])
        for request in [r for r in self.waiting if r.adapter is not None and r.adapter.state == "failed"]:
            self.waiting.remove(request)
            self._finish(request, Finished("error", request.adapter.error))
        if aborts and any(r.id in aborts for r in self.running):
            for request in self.running:
                if request.id in aborts:
                    self._finish(request, aborts[request.id])
            self._keep([row for row, r in enumerate(self.running) if r.id not in aborts])
        admitted = self._admit()
        now = time.monotonic()
        for request in admitted:
            self.metrics.admitted(request, now)
        for scoring in (False, True):  # prompts whose every position's logits are kept forward apart
            kind = [r for r in admitted if (r.params.prompt_logprobs is not None) is scoring]
            for group in prefill_groups(kind, PROMPT_LOGITS_TOKENS // self._vocabulary if scoring else None):
                self._prefill(group, every_position=scoring)
        if self.running:
            self._decode()
        self.metrics.set_queue(running=len(self.running), waiting=self.queued)
        self.metrics.set_adapters(self.registry)

    def _admissible(self) -> bool:
        return any(r.adapter is None or r.adapter.state in ("ready", "failed") for r in self.waiting)

    def _admit(self) -> list[EngineRequest]:
        """Waiting requests to join now, in arrival order, under the limits and the batching policy."""
        if self.batching == "static" and self.running:
            return []
        rows = self.limits.max_num_seqs - len(self.running)
        tokens = self.limits.max_num_batched_tokens - len(self.running)
        only: tuple[AdapterVersion | None] | None = None
        if self.batching == "one-adapter" and self.running:
            only = (self.running[0].adapter,)
        adapters = {r.adapter for r in self.running if r.adapter is not None}
        admitted = []
        for request in self.waiting:
            if rows <= 0:
                break
            if request.adapter is not None and request.adapter.state != "ready":
                continue  # still loading: others go first
            if only is not None and request.adapter is not only[0]:
                continue
            if not self.limits.admits_adapter(adapters, request.adapter):
                continue  # --max-loras distinct adapters run: requests on them go first
            if len(request.prompt_ids) > tokens and (admitted or self.running):
                break  # first come, first served: a long prompt is not overtaken by shorter ones
            admitted.append(request)
            if request.adapter is not None:
                adapters.add(request.adapter)
            rows -= 1
            tokens -= len(request.prompt_ids)
            if self.batching == "one-adapter" and only is None:
                only = (request.adapter,)
        taken = set(map(id, admitted))
        self.waiting = [r for r in self.waiting if id(r) not in taken]
        return admitted

    def _prefill(self, requests: list[EngineRequest], every_position: bool) -> None:
        """One forward over the new requests' prompts; their caches join the running batch, but for
        requests that only score their prompt (``max_tokens`` 0). With ``every_position`` the logits
        of every prompt position are kept and each request's prompt log probabilities delivered."""
        model, device = self.model, self.model.device
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(requests), width, dtype=torch.long)
        for row, request in enumerate(requests):
            ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        batch = model.routing([r.adapter.internal if r.adapter else None for r in requests], carry=True)
        output = model.step(ids, (mask.cumsum(1) - 1).clamp(min=0), mask, batch,
                            logits_to_keep=0 if every_position else 1)  # fmt: skip
        if every_position:
            for row, request in enumerate(requests):
                request.emit(prompt_logprobs(output.logits[row], request.prompt_ids, request.params.prompt_logprobs))
        for request in requests:
            self.metrics.prompt_tokens(request)
        joining = [row for row, r in enumerate(requests) if r.params.max_tokens > 0]
        for request in requests:
            if request.params.max_tokens == 0:
                self._finish(request, Finished("length"))
        if not joining:
            return
        cache, columns, logits = output.cache, output.columns, output.logits[:, -1]
        if len(joining) < len(requests):
            index = torch.tensor(joining, device=device)
            cache.batch_select_indices(index)
            columns, logits = columns[index], logits[index]
            requests = [requests[row] for row in joining]
        self._cache.admit(cache, columns)
        self.running.extend(requests)
        self._batch = None
        params = [r.params for r in requests]
        new_rows = {
            "position": torch.tensor([len(r.prompt_ids) for r in requests], device=device),
            "temperature": torch.tensor([p.temperature for p in params], device=device),
            "top_p": torch.tensor([p.top_p for p in params], device=device),
            "top_k": torch.tensor([p.top_k for p in params], device=device),
            "min_p": torch.tensor([p.min_p for p in params], device=device),
        }
        self._rows = {
            key: torch.cat([self._rows[key], value]) if self._rows else value for key, value in new_rows.items()
        }
        self._sample(logits, first_row=len(self.running) - len(requests))

    def _decode(self) -> None:
        """One token for every running row."""
        mask = self._cache.next_step()
        if self._batch is None:
            self._batch = self.model.routing(
                [r.adapter.internal if r.adapter else None for r in self.running], carry=True
            )
        positions = self._rows["position"].unsqueeze(1)
        output = self.model.step(self._tokens.unsqueeze(1), positions, mask, self._batch, cache=self._cache)
        self._rows["position"] = self._rows["position"] + 1
        self._sample(output.logits[:, -1], first_row=0)

    def _sample(self, logits: Tensor, first_row: int) -> None:
        """Choose the next token of running rows ``first_row..`` from their logits ``[rows, vocab]``,
        deliver it, and retire finished rows."""
        requests = self.running[first_row:]
        rows = slice(first_row, None)
        changed = adjust_logits(
            logits, [r.params.logits for r in requests], [RowHistory(r.prompt_ids, r.generated) for r in requests],
            [self._stop_ids(r) for r in requests],
        )  # fmt: skip
        tokens = next_tokens(
            changed, self._rows["temperature"][rows], self._rows["top_p"][rows],
            [r.seed for r in requests], [len(r.generated) for r in requests],
            self._rows["top_k"][rows], self._rows["min_p"][rows],
        )  # fmt: skip
        self._tokens = tokens if first_row == 0 else torch.cat([self._tokens[:first_row], tokens])
        reported = [offset for offset, r in enumerate(requests) if r.params.logprobs is not None]
        logprobs: dict[int, TokenLogprob] = {}
        if reported:
            index = torch.tensor(reported, device=logits.device)
            values = chosen_logprobs(logits.index_select(0, index), tokens.index_select(0, index),
                                     [requests[offset].params.logprobs for offset in reported])  # fmt: skip
            logprobs = dict(zip(reported, values, strict=True))
        now = time.monotonic()
        finished: dict[int, Finished] = {}
        for offset, (request, token_id) in enumerate(zip(requests, tokens.tolist(), strict=True)):
            request.generated.append(token_id)
            self.metrics.token(request, now)
            done = self._finish_reason(request, token_id)
            request.emit(Token(token_id, logprobs.get(offset), done))
            if done is not None:
                finished[first_row + offset] = done
        if finished:
            for row, done in finished.items():
                self._finish(self.running[row], done, emit=False)
            self._keep([row for row in range(len(self.running)) if row not in finished])

    def _stop_ids(self, request: EngineRequest) -> frozenset[int]:
        """The tokens that would end ``request``: its stop tokens, and end of sequence unless ignored."""
        if request.params.ignore_eos:
            return request.params.stop_token_ids
        return request.params.stop_token_ids | self.eos_token_ids

    def _finish_reason(self, request: EngineRequest, token_id: int) -> Finished | None:
        count = len(request.generated)
        if count >= request.params.logits.min_tokens:
            if token_id in self.eos_token_ids and not request.params.ignore_eos:
                return Finished("stop", by_token=True)
            if token_id in request.params.stop_token_ids:
                return Finished("stop", stop_reason=token_id, by_token=True)
        if count >= request.params.max_tokens or len(request.prompt_ids) + count >= self.limits.max_model_len:
            return Finished("length")
        return None

    def _keep(self, rows: list[int]) -> None:
        """Only these running rows (ascending) stay, each in its slot where it can (`slot_order`)."""
        rows = slot_order(rows)
        self.running = [self.running[row] for row in rows]
        self._cache.keep(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.model.device)
        self._rows = {key: value.index_select(0, index) for key, value in self._rows.items()}
        self._tokens = self._tokens.index_select(0, index)
        self._batch = None

    def _finish(self, request: EngineRequest, event: Finished, emit: bool = True) -> None:
        """``request`` ends with ``event`` (counted, logged, and sent unless its last token carried it)."""
        if request.adapter is not None:
            self.registry.release(request.adapter)
        seconds = time.monotonic() - request.arrival
        self.metrics.finished(request, event, seconds)
        logger.info(
            "request %s adapter=%s prompt_tokens=%d completion_tokens=%d seconds=%.3f finish=%s%s",
            request.id, request.adapter_name or "(base)", len(request.prompt_ids), len(request.generated), seconds,
            event.reason, f" ({event.message})" if event.message else "",
        )  # fmt: skip
        if emit:
            request.emit(event)


def prefill_groups(requests: list[EngineRequest], max_token_rows: int | None = None) -> list[list[EngineRequest]]:
    """``requests`` split into prefill forwards of similar prompt length. A forward left-pads its
    prompts to the longest, so prompts of 16 and 128 tokens together compute 256 token-rows for
    144; each forward also costs `FORWARD_COST_TOKENS`. The split minimises ``Σ (FORWARD_COST_TOKENS
    + longest · count)`` over groups of consecutive requests by length (dynamic programming,
    ``O(n²)`` for ``n <= max_num_seqs``), with ``longest · count <= max_token_rows`` for groups of
    more than one request when given."""
    ordered = sorted(requests, key=lambda r: len(r.prompt_ids))
    lengths = [len(r.prompt_ids) for r in ordered]
    best, start = [0.0] + [float("inf")] * len(ordered), [0] * (len(ordered) + 1)
    for stop in range(1, len(ordered) + 1):  # best[stop]: the first ``stop`` requests; last group from start[stop]
        for first in range(stop):
            token_rows = lengths[stop - 1] * (stop - first)
            if max_token_rows is not None and stop - first > 1 and token_rows > max_token_rows:
                continue
            cost = best[first] + FORWARD_COST_TOKENS + token_rows
            if cost < best[stop]:
                best[stop], start[stop] = cost, first
    groups, stop = [], len(ordered)
    while stop:
        groups.append(ordered[start[stop] : stop])
        stop = start[stop]
    return groups[::-1]


def slot_order(rows: list[int]) -> list[int]:
    """The order of the rows that stay (``rows``, ascending) that keeps each in its slot where it can:
    a slot whose row left takes a staying row from past the new end. Rows keep their slot of the
    key/value cache (`SlotCache`) and their adapter's row of the per-row tables
    (`flora.methods.slot_tables`) from one batch to the next:
    ``[0, 2, 3, 5]`` of 6 rows -> ``[0, 5, 2, 3]``."""
    staying = set(rows)
    movers = iter(row for row in rows if row >= len(rows))
    return [slot if slot in staying else next(movers) for slot in range(len(rows))]


def prompt_logprobs(logits: Tensor, prompt_ids: list[int], top: int) -> PromptLogprobs:
    """A prompt's log probabilities from its row of a forward's logits ``[positions, vocab]`` (the
    prompt's tokens last: left padding and virtual tokens come before them)."""
    length = len(prompt_ids)
    if length == 1:
        return PromptLogprobs((None,))
    following = torch.tensor(prompt_ids[1:], device=logits.device)
    values = chosen_logprobs(logits[-length:-1], following, [top] * (length - 1))
    return PromptLogprobs((None, *values))
