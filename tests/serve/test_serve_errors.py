"""Bad input gets a clear 4xx in OpenAI's error shape, and the server serves on; a full queue gets 429;
the OpenAPI schema holds (schemathesis finds no 5xx)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from data.tiny import tiny_llama

from flora import AdapterModel
from serve.support import MAX_MODEL_LEN, LiveServer

PROMPT = "add 12 and 30"
JSON = {"content-type": "application/json"}


def _post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=60, **kwargs)


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error["message"]


def _still_serving(server) -> None:
    body = {"model": "lora2", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    assert _post(server, "/v1/completions", json=body).json()["usage"]["completion_tokens"] >= 1


def test_unknown_model_is_404_listing_what_is_served(server):
    message = _error(_post(server, "/v1/completions", json={"model": "nope", "prompt": PROMPT}), 404)
    assert "'nope'" in message and "'tiny'" in message and "'lora4'" in message
    chat = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    assert "'nope'" in _error(_post(server, "/v1/chat/completions", json=chat), 404)
    _still_serving(server)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"prompt": "word " * (2 * MAX_MODEL_LEN)}, "maximum context length"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 10 * MAX_MODEL_LEN}, "maximum context length"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"prompt": 17}, "prompt"),
        ({"prompt": ""}, "empty"),
        ({"prompt": [1, 2, 10**9]}, "out of range"),
        ({"stop": [""]}, "stop"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": 3, "stream": True}, "best_of"),
        ({"suffix": "and then"}, "suffix"),
        ({"tools": [{"type": "function"}]}, "tools: this field is not supported"),
        ({"frobnicate": 1}, "frobnicate: this field is not supported"),
        ({"temperature": float("nan")}, "finite number"),
        ({"logit_bias": {"abc": 1}}, "not a token id"),
        ({"logit_bias": {"5": 500}}, "expected -100 to 100"),
        ({"stop_token_ids": [10**9]}, "out of range"),
        ({"prompt": []}, "empty"),
        ({"model": None}, "model"),
    ],
)
def test_invalid_completion_requests_are_400(server, body, words):
    request = {"model": "lora4", "prompt": PROMPT, "max_tokens": 4, **body}
    raw = json.dumps(request).encode()  # Python's json writes NaN as JavaScript does; httpx's json= refuses it
    assert words in _error(_post(server, "/v1/completions", content=raw, headers=JSON), 400)
    _still_serving(server)


def test_malformed_json_and_bad_chat_messages_are_400(server):
    raw = _post(
        server,
        "/v1/completions",
        content=b'{"model": "lora4", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert "invalid request" in _error(raw, 400)
    assert "messages" in _error(_post(server, "/v1/chat/completions", json={"model": "lora4", "messages": []}), 400)
    bad_role = {"model": "lora4", "messages": [{"role": "wizard", "content": "hi"}]}
    assert "role" in _error(_post(server, "/v1/chat/completions", json=bad_role), 400)
    messages = [{"role": "user", "content": "hi"}]
    for field, value, words in [
        ("tools", [{"type": "function", "function": {"name": "f"}}], "tool calling is not supported"),
        ("tool_choice", "auto", "tool calling is not supported"),
        ("response_format", {"type": "json_object"}, "'json_object' is not supported"),
        ("top_logprobs", 2, "needs logprobs"),
        ("echo", True, "echo: this field is not supported"),
    ]:
        chat = {"model": "lora4", "messages": messages, field: value}
        assert words in _error(_post(server, "/v1/chat/completions", json=chat), 400), field
    _still_serving(server)


@pytest.mark.parametrize("name", ["../lora4", "a/b", "..", "x/../../etc"])
def test_adapter_names_that_look_like_paths_are_refused(server, adapter_dir, name):
    load = {"lora_name": name, "lora_path": str(adapter_dir / "lora4")}
    assert "may not contain" in _error(_post(server, "/v1/load_lora_adapter", json=load), 400)
    assert "does not exist" in _error(_post(server, "/v1/completions", json={"model": name, "prompt": PROMPT}), 404)
    _still_serving(server)


def test_load_errors_and_unload_of_an_unknown_adapter(server, tmp_path):
    missing = {"lora_name": "ghost", "lora_path": str(tmp_path / "nowhere")}
    assert "not a PEFT adapter directory" in _error(_post(server, "/v1/load_lora_adapter", json=missing), 400)
    assert "cannot be found" in _error(_post(server, "/v1/unload_lora_adapter", json={"lora_name": "ghost"}), 404)
    assert "lora_path" in _error(_post(server, "/v1/load_lora_adapter", json={"lora_name": "x"}), 400)
    _still_serving(server)


def test_a_waiting_client_that_leaves_is_dropped_and_a_full_queue_answers_429(tokenizer, adapter_dir):
    slow = tiny_llama(tokenizer)
    slow.register_forward_pre_hook(lambda *_: time.sleep(0.02))  # 20 ms a step: the slot stays taken
    live = LiveServer(AdapterModel(slow, tokenizer), adapter_dir=str(adapter_dir), max_num_seqs=1, max_queue=1,
                      max_model_len=MAX_MODEL_LEN)  # fmt: skip
    long = {"model": "lora4", "prompt": PROMPT, "max_tokens": 110, "temperature": 0, "ignore_eos": True, "stream": True}

    def wait_for(condition) -> None:
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.02)

    try:
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{live.url}/v1/completions", json=long) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # running: the only slot is taken
            with pytest.raises(httpx.ReadTimeout):  # a client that gives up while its request waits
                httpx.post(f"{live.url}/v1/completions", json={**long, "model": "lora2", "stream": False}, timeout=0.5)
            wait_for(lambda: live.metric("flora:request_success_total", adapter="lora2", finished_reason="abort") == 1)
            assert live.metric("flora:num_requests_running") == 1
            waiting = threading.Thread(target=lambda: _post(live, "/v1/completions", json={**long, "stream": False}))
            waiting.start()
            wait_for(lambda: live.metric("flora:num_requests_waiting") == 1)
            assert "at capacity" in _error(_post(live, "/v1/completions", json=long), 429)
        waiting.join()
        wait_for(lambda: live.metric("flora:num_requests_running") + live.metric("flora:num_requests_waiting") == 0)
        _still_serving(live)
    finally:
        live.stop()


def test_metrics_report_queues_adapters_latencies_and_tokens(server):
    _still_serving(server)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("flora:num_requests_running", "flora:num_requests_waiting", "flora:adapters_loaded",
                 "flora:adapter_loads_total", "flora:adapter_hits_total", "flora:adapter_evictions_total",
                 "flora:time_to_first_token_seconds_bucket", "flora:inter_token_latency_seconds_bucket",
                 "flora:e2e_request_latency_seconds_bucket", "flora:prompt_tokens_total",
                 "flora:generation_tokens_total", 'flora:request_success_total{adapter="lora2"'):  # fmt: skip
        assert name in text, name
    assert server.metric("flora:generation_tokens_total") >= 3
    assert httpx.get(f"{server.url}/health").status_code == 200
