"""The server's Prometheus metrics (``GET /metrics``), named like vLLM's with a ``flora:`` prefix.

Gauges: requests running and waiting, adapters loaded. Counters: adapter loads, hits and
evictions, prompt and generated tokens, requests per adapter and finish reason. Histograms: time to
first token, inter-token latency, end-to-end latency. Each server has a registry of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from flora.serve.engine import EngineRequest, Finished
    from flora.serve.registry import AdapterRegistry

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
BASE_LABEL = "(base)"


class ServerMetrics:
    """Every metric of one server, in ``self.registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("flora:num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("flora:num_requests_waiting", "Requests waiting to be admitted.", registry=r)
        self.adapters_loaded = Gauge("flora:adapters_loaded", "Adapters in memory.", registry=r)
        self.adapter_loads = Counter("flora:adapter_loads", "Adapter loads (misses).", registry=r)
        self.adapter_hits = Counter("flora:adapter_hits", "Requests whose adapter was in memory.", registry=r)
        self.adapter_evictions = Counter("flora:adapter_evictions", "Adapters evicted (LRU).", registry=r)
        self.prompt_tokens_total = Counter("flora:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("flora:generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter(
            "flora:requests",
            "Finished requests, per adapter and finish reason.",
            ["adapter", "finish_reason"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "flora:time_to_first_token_seconds", "Time to first token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "flora:inter_token_latency_seconds", "Time between two tokens of a request.", buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.e2e_latency = Histogram(
            "flora:e2e_request_latency_seconds", "Time from arrival to the last token.", buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self._seen = {"loads": 0, "hits": 0, "evictions": 0}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def set_adapters(self, registry: AdapterRegistry) -> None:
        self.adapters_loaded.set(len(registry.loaded()))
        for key, counter in (("loads", self.adapter_loads), ("hits", self.adapter_hits),
                             ("evictions", self.adapter_evictions)):  # fmt: skip
            total = registry.counters[key]
            if total > self._seen[key]:
                counter.inc(total - self._seen[key])
                self._seen[key] = total

    def prompt_tokens(self, count: int) -> None:
        self.prompt_tokens_total.inc(count)

    def token(self, request: EngineRequest, now: float) -> None:
        """A token of ``request`` was generated at ``now`` (``time.monotonic``)."""
        self.generation_tokens.inc()
        if request.first_token_at is None:
            request.first_token_at = now
            self.time_to_first_token.observe(now - request.arrival)
        else:
            self.inter_token_latency.observe(now - request.last_token_at)
        request.last_token_at = now

    def finished(self, request: EngineRequest, event: Finished, seconds: float) -> None:
        self.requests.labels(request.adapter_name or BASE_LABEL, event.reason).inc()
        if request.generated:
            self.e2e_latency.observe(seconds)
