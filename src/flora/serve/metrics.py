"""The server's Prometheus metrics (``GET /metrics``), named and labelled as vLLM's.

Every name starts with ``prefix`` (``--metrics-prefix``: ``flora`` by default, ``vllm`` so that
dashboards made for vLLM read flora unchanged) and every series has a ``model_name`` label (the
served base model's name). vLLM's series (`vllm/v1/metrics/loggers.py`):

- gauges ``num_requests_running``, ``num_requests_waiting``, ``kv_cache_usage_perc`` (and its old
  name ``gpu_cache_usage_perc``), ``lora_requests_info``;
- counters ``prompt_tokens_total``, ``generation_tokens_total``, ``request_success_total``
  (label ``finished_reason``: ``stop``, ``length``, ``abort``, ``error``);
- histograms ``time_to_first_token_seconds``, ``inter_token_latency_seconds`` (and its old name
  ``time_per_output_token_seconds``, the same observations), ``e2e_request_latency_seconds``,
  ``request_queue_time_seconds`` (from arrival to admission into the batch: waiting for room and
  for the adapter's read), ``request_prompt_tokens``, ``request_generation_tokens`` (token
  counts), with vLLM's buckets.

The token counters, ``request_success_total`` and the latency histograms (but the old name) also
carry ``adapter`` (the request's adapter, `BASE_LABEL` for the base model), which vLLM's have not: a
query that sums over labels reads them as vLLM's. An adapter adds ~80 series (its histograms'
buckets mostly). flora's own: ``adapters_loaded``, ``adapter_loads_total``, ``adapter_hits_total``,
``adapter_evictions_total``.

``lora_requests_info`` (labels ``running_lora_adapters``, ``waiting_lora_adapters``: names joined
by commas; ``max_lora``: ``--max-loras``, empty when unlimited; value: the time it was read, as
vLLM's), ``kv_cache_usage_perc`` and the requests running and waiting are read from the engine when
``/metrics`` is scraped (the last two also after every step), all from one look at its requests.
``kv_cache_usage_perc`` is the running requests' tokens (prompt and generated) over the most the
slot cache may hold, ``max_num_seqs · max_model_len`` (1: no more room; the cache itself grows
on demand, `flora.serve.slot_cache`). Each server has a registry of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from flora.serve.engine import Engine, EngineRequest, Finished
    from flora.serve.registry import AdapterRegistry

BASE_LABEL = "(base)"
PREFIX = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# vLLM's buckets (vllm/v1/metrics/loggers.py), so that its dashboards' quantiles read the same
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


def count_buckets(largest: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``largest`` (vLLM's buckets of token counts)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > largest:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


@dataclass(frozen=True)
class _AdapterSeries:
    """The series of one adapter (bound once: a token costs no label lookup)."""

    prompt_tokens: Counter
    generation_tokens: Counter
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    e2e_latency: Histogram
    queue_time: Histogram


class ServerMetrics:
    """Every metric of one server, in ``self.registry`` (see the module docstring).

    Args:
        model_name: the ``model_name`` label: the served base model's name.
        prefix: the start of every name (``flora``; ``vllm`` for vLLM's dashboards).
        max_model_len: the largest bucket of the token-count histograms.
    """

    def __init__(self, model_name: str = "flora", prefix: str = "flora", max_model_len: int = 2048) -> None:
        if not PREFIX.fullmatch(prefix):
            raise ValueError(f"--metrics-prefix {prefix!r}: expected letters, digits and '_', not a digit first")
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.engine: Engine | None = None
        r, p, model, adapter = self.registry, prefix, ["model_name"], ["model_name", "adapter"]

        def gauge(name: str, doc: str, labels: list[str] = model) -> Gauge:
            return Gauge(f"{p}:{name}", doc, labels, registry=r)

        def counter(name: str, doc: str, labels: list[str] = model) -> Counter:
            return Counter(f"{p}:{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets, labels: list[str] = adapter) -> Histogram:
            return Histogram(f"{p}:{name}", doc, labels, buckets=buckets, registry=r)

        self.running = gauge("num_requests_running", "Requests in the running batch.").labels(model_name)
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be admitted.").labels(model_name)
        usage = "Tokens of the running requests over max_num_seqs * max_model_len (1: full)."
        self.kv_cache_usage = [gauge(name, usage).labels(model_name)
                               for name in ("kv_cache_usage_perc", "gpu_cache_usage_perc")]  # fmt: skip
        self.lora_info = gauge(
            "lora_requests_info", "Running and waiting adapters; value: when it was read.",
            ["model_name", "max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        )  # fmt: skip
        self.adapters_loaded = gauge("adapters_loaded", "Adapters in memory.").labels(model_name)
        self.adapter_counters = {
            "loads": counter("adapter_loads", "Adapter loads (misses).").labels(model_name),
            "hits": counter("adapter_hits", "Requests whose adapter was in memory.").labels(model_name),
            "evictions": counter("adapter_evictions", "Adapters evicted (LRU).").labels(model_name),
        }
        self.request_success = counter("request_success", "Finished requests, per adapter and finish reason.",
                                       ["model_name", "adapter", "finished_reason"])  # fmt: skip
        self._families = {
            "prompt_tokens": counter("prompt_tokens", "Prompt tokens processed.", adapter),
            "generation_tokens": counter("generation_tokens", "Tokens generated.", adapter),
            "time_to_first_token": histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS),
            "inter_token_latency": histogram("inter_token_latency_seconds", "Time between two tokens of a request.",
                                             TOKEN_LATENCY_BUCKETS),
            "e2e_latency": histogram("e2e_request_latency_seconds", "Time from arrival to the end.",
                                     REQUEST_LATENCY_BUCKETS),
            "queue_time": histogram("request_queue_time_seconds", "Time from arrival to admission into the batch.",
                                    REQUEST_LATENCY_BUCKETS),
        }  # fmt: skip
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds", "Time between two tokens of a request (inter_token_latency's old name).",
            TOKEN_LATENCY_BUCKETS, model,
        ).labels(model_name)  # fmt: skip
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens of each finished request.",
                                               count_buckets(max_model_len), model).labels(model_name)  # fmt: skip
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Tokens generated for each finished request.",
                                                   count_buckets(max_model_len), model).labels(model_name)  # fmt: skip
        self._series: dict[str | None, _AdapterSeries] = {}
        self._seen = {"loads": 0, "hits": 0, "evictions": 0}

    def track(self, engine: Engine) -> None:
        """Read what ``engine`` runs when scraped (``lora_requests_info``, ``kv_cache_usage_perc``)."""
        self.engine = engine

    def series(self, adapter_name: str | None) -> _AdapterSeries:
        """The series of ``adapter_name`` (``None``: the base model)."""
        series = self._series.get(adapter_name)
        if series is None:
            label = BASE_LABEL if adapter_name is None else adapter_name
            bound = {key: family.labels(self.model_name, label) for key, family in self._families.items()}
            series = self._series[adapter_name] = _AdapterSeries(**bound)
        return series

    def exposition(self) -> bytes:
        if self.engine is not None:
            self._read_engine(self.engine)
        return generate_latest(self.registry)

    def _read_engine(self, engine: Engine) -> None:
        running, waiting = list(engine.running), engine.waiting_requests()  # copies: the engine's thread changes them
        self.set_queue(len(running), len(waiting))  # as the adapters below, not as of the last step
        limits = engine.limits
        tokens = sum(len(r.prompt_ids) + len(r.generated) for r in running)
        for gauge in self.kv_cache_usage:
            gauge.set(tokens / (limits.max_num_seqs * limits.max_model_len))
        max_lora = "" if limits.max_loras is None else str(limits.max_loras)
        self.lora_info.clear()  # one series, the latest, as a reader takes the newest anyway
        self.lora_info.labels(self.model_name, max_lora, _names(waiting), _names(running)).set_to_current_time()

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def set_adapters(self, registry: AdapterRegistry) -> None:
        self.adapters_loaded.set(len(registry.loaded()))
        for key, counter in self.adapter_counters.items():
            total = registry.counters[key]
            if total > self._seen[key]:
                counter.inc(total - self._seen[key])
                self._seen[key] = total

    def admitted(self, request: EngineRequest, now: float) -> None:
        """``request`` joined the batch at ``now`` (``time.monotonic``)."""
        self.series(request.adapter_name).queue_time.observe(now - request.arrival)

    def prompt_tokens(self, request: EngineRequest) -> None:
        """``request``'s prompt was processed (prefilled)."""
        self.series(request.adapter_name).prompt_tokens.inc(len(request.prompt_ids))

    def token(self, request: EngineRequest, now: float) -> None:
        """A token of ``request`` was generated at ``now`` (``time.monotonic``)."""
        series = self.series(request.adapter_name)
        series.generation_tokens.inc()
        if request.first_token_at is None:
            request.first_token_at = now
            series.time_to_first_token.observe(now - request.arrival)
        else:
            series.inter_token_latency.observe(now - request.last_token_at)
            self.time_per_output_token.observe(now - request.last_token_at)
        request.last_token_at = now

    def finished(self, request: EngineRequest, event: Finished, seconds: float) -> None:
        """``request`` ended ``seconds`` after it arrived, for ``event.reason``."""
        adapter = request.adapter_name
        self.request_success.labels(self.model_name, BASE_LABEL if adapter is None else adapter, event.reason).inc()
        self.series(adapter).e2e_latency.observe(seconds)
        self.request_prompt_tokens.observe(len(request.prompt_ids))
        self.request_generation_tokens.observe(len(request.generated))


def _names(requests: list[EngineRequest]) -> str:
    """The distinct adapters of ``requests``, sorted and joined by commas (the base model is none)."""
    return ",".join(sorted({r.adapter_name for r in requests if r.adapter_name is not None}))
