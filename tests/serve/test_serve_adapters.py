"""The adapter registry through the API: loading on first use, LRU eviction under a cap, pinned
adapters, vLLM's load/unload endpoints (any method), in-place reloads while requests run, and
adapter files that cannot be served."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
from data.tiny import tiny_llama
from openai import OpenAI

from flora import AdapterModel, LoraConfig
from serve.support import ADAPTERS, LiveServer, save_adapters

PROMPT = "reverse the words: red green blue"


@pytest.fixture(scope="module")
def capped(tokenizer, adapter_dir):
    """A server holding at most 2 adapters, ``lora2`` pinned."""
    pinned = {"pinned": str(adapter_dir / "lora2")}
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(adapter_dir), adapters=pinned,
                      max_loaded_adapters=2, max_model_len=128)  # fmt: skip
    yield live
    live.stop()


def _complete(url: str, model: str, tokens: int = 6, **extra) -> str:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=tokens, temperature=0,
                                      extra_body={"ignore_eos": True, **extra})  # fmt: skip
    return reply.choices[0].text


def test_least_recently_used_adapters_are_evicted_and_reloaded_under_a_cap(capped, tokenizer, reference, adapter_dir):
    ids = tokenizer(PROMPT).input_ids
    for model in ["lora4", "flora", "ia3", "lora4", "prompt", "flora"]:
        assert _complete(capped.url, model) == reference.text(model, str(adapter_dir / model), ids, 6), model
        assert capped.metric("flora:adapters_loaded") <= 2
    # pinned + 1 slot: every switch between the unpinned adapters evicts the previous one
    assert capped.metric("flora:adapter_evictions_total") >= 4
    assert capped.metric("flora:adapter_loads_total") >= 6  # lora4 and flora were loaded twice
    assert _complete(capped.url, "pinned") == reference.text("lora2", str(adapter_dir / "lora2"), ids, 6)
    assert "pinned" in {entry.name for entry in capped.state.registry.loaded()}


def test_load_and_unload_adapters_of_any_method_at_run_time(server, tokenizer, reference, adapter_dir, tmp_path):
    ids = tokenizer(PROMPT).input_ids
    for method in ("ia3", "prompt", "lora4"):
        name = f"runtime-{method}"
        response = httpx.post(f"{server.url}/v1/load_lora_adapter",
                              json={"lora_name": name, "lora_path": str(adapter_dir / method)})  # fmt: skip
        assert response.status_code == 200, response.text
        assert _complete(server.url, name) == reference.text(method, str(adapter_dir / method), ids, 6)
        again = httpx.post(f"{server.url}/v1/load_lora_adapter",
                           json={"lora_name": name, "lora_path": str(adapter_dir / method)})  # fmt: skip
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
        assert httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            _complete(server.url, name)


def test_load_inplace_while_requests_run(server, tokenizer, reference, tmp_path):
    old = save_adapters(tokenizer, tmp_path / "v1", {"swap": LoraConfig(r=4, alpha=8)}, seed=1)["swap"]
    new = save_adapters(tokenizer, tmp_path / "v2", {"swap": LoraConfig(r=2, alpha=8)}, seed=2)["swap"]
    ids = tokenizer(PROMPT).input_ids
    load = {"lora_name": "swap", "lora_path": old}
    assert httpx.post(f"{server.url}/v1/load_lora_adapter", json=load).status_code == 200
    body = {"model": "swap", "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    texts = []
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.url}/v1/completions", json=body) as running:
        events = (json.loads(line[6:]) for line in running.iter_lines() if line.startswith("data: {"))
        texts.append(next(events)["choices"][0]["text"])  # the request is running on the old version
        swap = httpx.post(f"{server.url}/v1/load_lora_adapter",
                          json={"lora_name": "swap", "lora_path": new, "load_inplace": True})  # fmt: skip
        assert swap.status_code == 200, swap.text
        after = _complete(server.url, "swap")  # a later request gets the new version
        texts.extend(event["choices"][0]["text"] for event in events)
    assert "".join(texts) == reference.text("swap-old", old, ids, 100)  # the running one finished on the old
    assert after == reference.text("swap-new", new, ids, 6) != reference.text("swap-old", old, ids, 6)


def _broken_adapters(tokenizer, directory):
    """Adapter directories that must be refused: corrupt weights, a pickle, another base model."""
    good = save_adapters(tokenizer, directory / "good", {"x": LoraConfig(r=2)})["x"]
    corrupt = directory / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage, not safetensors")
    pickled = directory / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    other = AdapterModel(tiny_llama(tokenizer, seed=0), tokenizer)
    other.base_model.model.layers[0].self_attn.q_proj = type(other.base_model.model.layers[0].self_attn.q_proj)(
        32, 16, bias=False
    )  # a base model with another q_proj shape
    other.add_adapter("y", LoraConfig(r=2, target_modules=["q_proj"]))
    foreign = other.save_adapter("y", directory / "foreign")
    return {"corrupt": (corrupt, "not a readable safetensors file"), "pickled": (pickled, "pickle"),
            "foreign": (foreign, "shape")}  # fmt: skip


def test_adapter_files_that_cannot_be_served_are_refused_and_the_server_serves_on(server, tokenizer, tmp_path):
    for name, (path, words) in _broken_adapters(tokenizer, tmp_path).items():
        response = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
        assert response.status_code == 400, (name, response.text)
        assert words in response.json()["error"]["message"], (name, response.json())
    assert _complete(server.url, "lora4")  # still serving


def test_broken_entries_of_the_adapter_dir_fail_their_requests_only(tokenizer, tmp_path):
    directory = tmp_path / "dir"
    directory.mkdir()
    broken = _broken_adapters(tokenizer, tmp_path)
    for name, (path, _) in broken.items():
        shutil.copytree(path, directory / name)
    save_adapters(tokenizer, directory, {"fine": ADAPTERS["lora2"]})
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(directory), max_model_len=128)
    try:
        for name, (_, words) in broken.items():
            with pytest.raises(openai.APIStatusError) as raised:
                _complete(live.url, name)
            assert raised.value.status_code in (400, 500) and words in raised.value.message, (name, raised.value)
        assert _complete(live.url, "fine")
    finally:
        live.stop()
