"""``/metrics`` as vLLM names it: ``--metrics-prefix vllm``, ``model_name`` on every series, ``adapter``
on token counters and histograms, finish reasons as they happened, ``lora_requests_info`` and
``kv_cache_usage_perc`` read while requests run and wait."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from data.tiny import tiny_llama
from prometheus_client.parser import text_string_to_metric_families

from flora import AdapterModel
from flora.serve.engine import Engine, EngineLimits, EngineRequest, SamplingParams
from flora.serve.metrics import (
    REQUEST_LATENCY_BUCKETS,
    TOKEN_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    ServerMetrics,
    count_buckets,
)
from flora.serve.registry import AdapterRegistry
from serve.support import LiveServer

PROMPT = "reverse the words: red green blue"
SERVED = "served-tiny"
SEQS, LEN = 4, 128


class Gate:
    """A forward pre-hook: 20 ms a forward, and the engine held before its next forward while closed."""

    def __init__(self) -> None:
        self.open, self.holding = threading.Event(), threading.Event()
        self.open.set()

    def __call__(self, *_) -> None:
        if not self.open.is_set():
            self.holding.set()
            self.open.wait()
        time.sleep(0.02)

    def hold(self) -> None:
        """Return once the engine waits before a forward (what it runs stays as it is)."""
        self.holding.clear()
        self.open.clear()
        assert self.holding.wait(timeout=30)


@pytest.fixture
def vllm_named(tokenizer, adapter_dir):
    """``--metrics-prefix vllm``, one adapter per step (``--max-loras 1``), 20 ms a forward, held at will."""
    slow = tiny_llama(tokenizer)
    gate = Gate()
    slow.register_forward_pre_hook(gate)
    live = LiveServer(AdapterModel(slow, tokenizer), adapter_dir=str(adapter_dir), served_model_name=SERVED,
                      metrics_prefix="vllm", max_loras=1, max_num_seqs=SEQS, max_model_len=LEN)  # fmt: skip
    live.gate = gate
    yield live
    gate.open.set()
    live.stop()


def _samples(live: LiveServer) -> list:
    text = httpx.get(f"{live.url}/metrics", timeout=60).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def _complete(live: LiveServer, model: str, tokens: int) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{live.url}/v1/completions", json=body, timeout=60).json()


def test_vllm_names_with_model_name_and_adapter_labels(vllm_named, tokenizer):
    prompt = len(tokenizer(PROMPT).input_ids)
    for model, tokens in [("lora2", 5), ("lora2", 5), (SERVED, 3)]:
        assert _complete(vllm_named, model, tokens)["usage"]["completion_tokens"] == tokens
    samples = _samples(vllm_named)
    assert [s.name for s in samples if not s.name.startswith("vllm:")] == []
    assert [s for s in samples if s.labels.get("model_name") != SERVED] == []

    def value(name: str, **labels: str) -> float:
        found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    lora, base = {"adapter": "lora2"}, {"adapter": "(base)"}
    assert value("vllm:request_success_total", **lora, finished_reason="length") == 2
    assert value("vllm:request_success_total", **base, finished_reason="length") == 1
    assert value("vllm:prompt_tokens_total", **lora) == 2 * prompt
    assert value("vllm:prompt_tokens_total", **base) == prompt
    assert (value("vllm:generation_tokens_total", **lora), value("vllm:generation_tokens_total", **base)) == (10, 3)
    assert value("vllm:time_to_first_token_seconds_count", **lora) == 2
    assert value("vllm:inter_token_latency_seconds_count", **lora) == 8  # 4 gaps in each of 2 requests
    assert value("vllm:e2e_request_latency_seconds_count", **lora) == 2
    assert value("vllm:request_queue_time_seconds_count", **lora) == 2
    assert (
        0
        <= value("vllm:request_queue_time_seconds_sum", **lora)
        < value("vllm:e2e_request_latency_seconds_sum", **lora)
    )
    # the old name and the token-count histograms: the model's only, as vLLM's
    assert value("vllm:time_per_output_token_seconds_count") == 8 + 2
    assert value("vllm:request_prompt_tokens_sum") == 3 * prompt
    assert value("vllm:request_generation_tokens_sum") == 5 + 5 + 3
    assert value("vllm:request_generation_tokens_bucket", le="2.0") == 0
    assert value("vllm:request_generation_tokens_bucket", le="5.0") == 3
    for name, buckets in [
        ("e2e_request_latency_seconds", REQUEST_LATENCY_BUCKETS),
        ("request_queue_time_seconds", REQUEST_LATENCY_BUCKETS),
        ("time_to_first_token_seconds", TTFT_BUCKETS),
        ("inter_token_latency_seconds", TOKEN_LATENCY_BUCKETS),
    ]:  # vLLM's buckets
        edges = [s.labels["le"] for s in samples if s.name == f"vllm:{name}_bucket" and s.labels["adapter"] == "lora2"]
        assert edges == [*map(str, buckets), "+Inf"], name
    assert value("vllm:adapter_loads_total") == 1 and value("vllm:adapter_hits_total") == 1
    assert value("vllm:adapters_loaded") == 1
    assert value("vllm:num_requests_running") == 0 and value("vllm:num_requests_waiting") == 0
    assert value("vllm:kv_cache_usage_perc") == 0 and value("vllm:gpu_cache_usage_perc") == 0


def test_lora_requests_info_and_kv_cache_usage_while_requests_run_and_wait(vllm_named, tokenizer):
    prompt = len(tokenizer(PROMPT).input_ids)
    body = {"model": "lora2", "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True, "stream": True}
    waiting: dict = {}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{vllm_named.url}/v1/completions", json=body) as first:
        lines = first.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # lora2 runs
        later = threading.Thread(target=lambda: waiting.update(_complete(vllm_named, "lora4", 3)))
        later.start()  # lora4 waits: --max-loras 1
        deadline = time.monotonic() + 30
        while vllm_named.metric("vllm:num_requests_waiting") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        vllm_named.gate.hold()
        (running,) = vllm_named.state.engine.running
        tokens = len(running.prompt_ids) + len(running.generated)
        before = time.time()
        samples = _samples(vllm_named)
        after = time.time()
        vllm_named.gate.open.set()
        info = [s for s in samples if s.name == "vllm:lora_requests_info"]
        assert [s.labels for s in info] == [{"model_name": SERVED, "max_lora": "1", "running_lora_adapters": "lora2",
                                             "waiting_lora_adapters": "lora4"}]  # fmt: skip
        assert before <= info[0].value <= after  # when it was read, as vLLM's
        usage = {s.name: s.value for s in samples if s.name.endswith("cache_usage_perc")}
        assert usage["vllm:kv_cache_usage_perc"] == usage["vllm:gpu_cache_usage_perc"]
        assert usage["vllm:kv_cache_usage_perc"] == tokens / (SEQS * LEN) and tokens > prompt
    # the stream closed early: lora2's request ends as aborted, then lora4's runs
    later.join()
    assert waiting["usage"]["completion_tokens"] == 3
    assert vllm_named.metric("vllm:request_success_total", adapter="lora2", finished_reason="abort") == 1
    assert vllm_named.metric("vllm:request_success_total", adapter="lora4", finished_reason="length") == 1
    idle = [s.labels for s in _samples(vllm_named) if s.name == "vllm:lora_requests_info"]
    assert idle == [{"model_name": SERVED, "max_lora": "1", "running_lora_adapters": "", "waiting_lora_adapters": ""}]


def test_a_request_submitted_since_the_last_step_is_waiting_in_every_metric(tokenizer, adapter_dir):
    """Scraped before the engine's next step takes it in, a new request is waiting in the queue gauge and
    in ``lora_requests_info`` alike (the two were read from different places: one said 1, the other none)."""
    model = AdapterModel(tiny_llama(tokenizer), tokenizer)
    registry = AdapterRegistry("tiny", adapter_dir, model=model)
    metrics = ServerMetrics("tiny")
    engine = Engine(model, registry, EngineLimits(), metrics)  # not started: requests stay submitted
    metrics.track(engine)
    try:
        version, _ = registry.lease("lora2")
        engine.submit(EngineRequest("r", tokenizer("hi")["input_ids"], SamplingParams(max_tokens=1), version,
                                    lambda event: None))  # fmt: skip
        samples = [s for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples]
        (info,) = [s.labels for s in samples if s.name == "flora:lora_requests_info"]
        assert info["waiting_lora_adapters"] == "lora2" and info["running_lora_adapters"] == ""
        assert [s.value for s in samples if s.name == "flora:num_requests_waiting"] == [1]
        assert [s.value for s in samples if s.name == "flora:num_requests_running"] == [0]
    finally:
        registry.close()


def test_the_default_prefix_is_flora_and_a_bad_prefix_is_refused(server):
    names = {s.name for s in _samples(server)}
    assert "flora:num_requests_running" in names and not any(n.startswith("vllm:") for n in names)
    assert 'max_lora=""' in httpx.get(f"{server.url}/metrics").text  # no --max-loras: unlimited
    for prefix in ("vllm-x", "1abc", "", "a:b"):
        with pytest.raises(ValueError, match="--metrics-prefix"):
            ServerMetrics(prefix=prefix)
    assert count_buckets(128) == [1, 2, 5, 10, 20, 50, 100]
