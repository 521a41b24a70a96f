"""Requests that cannot hurt the server: a body over ``--max-request-bytes`` is a 413 (declared or sent
in chunks), a prompt that cannot fit the context is a 400 without being tokenized, and requests
beside them are served as usual. (What they cost in time and memory: benchmarks/serve_big_requests.py.)"""

from __future__ import annotations

import json

import httpx
import pytest
from data.tiny import tiny_llama

from flora import AdapterModel
from flora.serve.app import longest_token_chars
from serve.support import MAX_MODEL_LEN, LiveServer

LIMIT = 2**20


@pytest.fixture(scope="module")
def small_server(tokenizer, adapter_dir):
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(adapter_dir),
                      max_model_len=MAX_MODEL_LEN, max_request_bytes=LIMIT)  # fmt: skip
    yield live
    live.stop()


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def test_a_body_over_the_limit_is_413_declared_or_chunked(small_server):
    url = f"{small_server.url}/v1/completions"
    body = json.dumps({"model": "lora2", "prompt": "x" * (3 * LIMIT), "max_tokens": 2}).encode()
    assert "more than this server accepts (1048576 bytes" in _error(httpx.post(url, content=body, timeout=60), 413)

    def chunks():
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    chunked = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert "--max-request-bytes" in _error(chunked, 413)
    fine = httpx.post(url, json={"model": "lora2", "prompt": "hello", "max_tokens": 2, "temperature": 0}, timeout=60)
    assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] == 2


def test_a_prompt_longer_than_the_context_can_hold_is_400_untokenized(small_server, tokenizer, monkeypatch):
    longest = longest_token_chars(tokenizer)
    text = "y" * (MAX_MODEL_LEN * longest + 1)  # fits the body limit, cannot fit the context
    calls = []
    original = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    body = {"model": "lora2", "prompt": text, "max_tokens": 2}
    message = _error(httpx.post(f"{small_server.url}/v1/completions", json=body, timeout=60), 400)
    assert f"{len(text)} characters" in message and f"at most {longest} characters each" in message
    assert not any(len(a[0]) == len(text) for a in calls if a and isinstance(a[0], str))  # never tokenized
    chat = {"model": "lora2", "messages": [{"role": "user", "content": text}]}
    assert "maximum context length" in _error(httpx.post(f"{small_server.url}/v1/chat/completions", json=chat), 400)
