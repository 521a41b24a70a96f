"""Many adapters under a memory cap (`flora.serve.registry`'s tiers), over real HTTP: 200 adapters of
mixed ranks served with room for about 10 in memory, every answer that of `AdapterModel.generate`
alone; the bytes held never above the cap; a cold load beside running requests; each kind of broken
adapter a 4xx that names it and fails only its own requests, evicting nothing; requests waiting for
their adapter's load not refused while the batch has room."""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time

import httpx
import pytest
import torch
from data.tiny import tiny_llama
from openai import OpenAI
from safetensors.torch import save_file

from flora import AdapterModel, LoraConfig
from flora.io import AdapterFiles, inspect_adapter_dir
from flora.serve import registry as registry_module
from flora.serve.engine import Engine, EngineLimits, EngineRequest, SamplingParams, Token
from flora.serve.metrics import ServerMetrics
from flora.serve.registry import AdapterRegistry
from serve.support import MAX_MODEL_LEN, LiveServer, save_adapters

RANKS = (2, 4, 8, 16)
COUNT = 200
COLD = "a198"  # an adapter the other tests do not ask for
PROMPTS = ["reverse the words: red green blue", "add 12 and 30", "sort: pear apple fig", "hello"]


@pytest.fixture(scope="module")
def many(tmp_path_factory, tokenizer):
    """``COUNT`` LoRA adapters (q and v projections, ranks cycling through ``RANKS``) in one directory."""
    directory = tmp_path_factory.mktemp("many")
    for start in range(0, COUNT, 50):  # one model per 50 adapters: a model's adapters share its memory
        configs = {f"a{i:03d}": LoraConfig(r=RANKS[i % len(RANKS)], alpha=8, target_modules=["q_proj", "v_proj"])
                   for i in range(start, start + 50)}  # fmt: skip
        save_adapters(tokenizer, directory, configs, seed=start)
    return directory


def _bytes(directory) -> dict[str, int]:
    """Each adapter's tensors' bytes (float64, the tiny model's dtype)."""
    return {path.name: inspect_adapter_dir(path).nbytes(8) for path in directory.iterdir()}


@pytest.fixture(scope="module")
def capped(tokenizer, many):
    """A server whose adapters' memory holds about 10 of them (the 10 largest, exactly)."""
    sizes = sorted(_bytes(many).values())
    cap_mb = sum(sizes[-10:]) / 2**20
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(many),
                      max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_loaded_adapters=COUNT,
                      adapter_memory_mb=cap_mb)  # fmt: skip
    registry = live.state.registry
    peaks = []
    apply = registry.apply

    def watched(model):  # bytes are only ever taken here (a read starts), so the peak is seen after it
        changed = apply(model)
        peaks.append(registry.held_bytes)
        return changed

    registry.apply = watched
    live.peaks = peaks
    yield live
    live.stop()


@pytest.fixture(scope="module")
def capped_client(capped):
    return OpenAI(base_url=f"{capped.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_mixed_stream_over_many_adapters_under_a_memory_cap_equals_generate_alone(
    capped, capped_client, tokenizer, reference, many
):
    jobs = [(f"a{(i * 37) % COUNT:03d}", PROMPTS[i % len(PROMPTS)]) for i in range(48)]  # 48 distinct adapters
    answers: dict[int, str] = {}

    def ask(index: int, model: str, prompt: str) -> None:
        reply = capped_client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0,
                                                 extra_body={"ignore_eos": True})  # fmt: skip
        answers[index] = reply.choices[0].text

    threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, (model, prompt) in enumerate(jobs):
        assert answers[index] == reference.text(model, str(many / model), tokenizer(prompt).input_ids, 5), model
    registry = capped.state.registry
    assert max(capped.peaks) <= registry.memory_bytes and registry.counters["evictions"] > 0
    assert sum(version.nbytes for version in registry.loaded()) <= registry.memory_bytes


def test_a_cold_load_does_not_stop_the_running_rows(capped, monkeypatch):
    reading = threading.Event()
    release = threading.Event()
    original = AdapterFiles.read

    def slow(files: AdapterFiles):
        if files.directory.name == COLD:
            reading.set()
            release.wait(timeout=60)  # held until the stream has shown that it goes on
        return original(files)

    monkeypatch.setattr(AdapterFiles, "read", slow)
    tokens_while_reading = []
    body = {"model": "a001", "prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    cold: dict[str, httpx.Response] = {}
    assert COLD not in capped.state.registry.current  # never asked for: read from disk
    cold_body = {"model": COLD, "prompt": "hello", "max_tokens": 2}
    cold_thread = threading.Thread(target=lambda: cold.update(
        response=httpx.post(f"{capped.url}/v1/completions", json=cold_body, timeout=120)))  # fmt: skip
    with httpx.stream("POST", f"{capped.url}/v1/completions", json=body, timeout=120) as stream:
        for number, line in enumerate(stream.iter_lines()):
            if number == 3:
                cold_thread.start()
                assert reading.wait(timeout=60)
            if reading.is_set() and not release.is_set() and line.startswith("data: {"):
                tokens_while_reading.append(line)
                if len(tokens_while_reading) == 5:
                    release.set()
    cold_thread.join()
    assert len(tokens_while_reading) == 5  # five tokens of the running request came out while COLD was read
    assert cold["response"].status_code == 200


def _broken_adapters(directory, many, tokenizer) -> dict[str, str]:
    """Broken adapter directories under ``directory``: name -> words the error must hold."""
    good = many / "a004"  # rank 2
    broken = {}
    shutil.copytree(good, directory / "corrupt")
    (directory / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 64 + b"not safetensors")
    broken["corrupt"] = "not a readable safetensors file"
    (directory / "pickled").mkdir()
    shutil.copy(good / "adapter_config.json", directory / "pickled")
    (directory / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    broken["pickled"] = "a pickle file, which flora refuses to load"
    wide = AdapterModel(tiny_llama(tokenizer), tokenizer)
    wide.add_adapter("w", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    tensors = {k: torch.cat([v, v], dim=-1).contiguous() if "lora_A" in k else v
               for k, v in _file_tensors(wide, "w", directory / "w").items()}  # fmt: skip
    shutil.copytree(directory / "w", directory / "wide")
    save_file(tensors, directory / "wide" / "adapter_model.safetensors")
    broken["wide"] = "has shape (2, 64) but LORA with this config on the base layer (32 -> 32) needs (2, 32)"
    shutil.copytree(good, directory / "ranked")
    config = json.loads((good / "adapter_config.json").read_text()) | {"r": 8}
    (directory / "ranked" / "adapter_config.json").write_text(json.dumps(config))
    broken["ranked"] = "has shape (2, 32) but LORA with this config on the base layer (32 -> 32) needs (8, 32)"
    shutil.rmtree(directory / "w")
    return broken


def _file_tensors(model: AdapterModel, name: str, path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    model.save_adapter(name, path)
    return load_file(path / "adapter_model.safetensors")


def test_each_broken_adapter_is_a_4xx_naming_it_for_its_requests_only_and_evicts_nothing(tokenizer, many, tmp_path):
    directory = tmp_path / "adapters"
    directory.mkdir()
    for name in ("a000", "a001", "a002", "a003"):
        shutil.copytree(many / name, directory / name)
    broken = _broken_adapters(directory, many, tokenizer)
    shutil.copytree(many / "a005", directory / "doomed")
    cap_mb = sum(inspect_adapter_dir(directory / name).nbytes(8) for name in ("a000", "a001", "doomed")) / 2**20
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(directory),
                      max_model_len=MAX_MODEL_LEN, adapter_memory_mb=cap_mb)  # fmt: skip
    try:
        url, registry = f"{live.url}/v1/completions", live.state.registry

        def ask(model: str, stream: bool = False) -> httpx.Response:
            body = {"model": model, "prompt": "hello", "max_tokens": 3, "stream": stream}
            return httpx.post(url, json=body, timeout=60)

        for name in ("a000", "a001", "doomed"):
            assert ask(name).status_code == 200
        shutil.rmtree(directory / "doomed")  # deleted while loaded: still served from memory
        assert ask("doomed").status_code == 200
        others = itertools.cycle(["a001", "a002", "a003"])
        while registry.current["doomed"].state != "unloaded":  # until it is evicted
            assert ask(next(others)).status_code == 200
        assert ask("a000").status_code == 200  # in memory, the most recent: what the requests beside use
        evictions = registry.counters["evictions"]
        # the deleted adapter: its files are gone (400), and after that the name is not served any more (404)
        answers = {(name, stream): (400, f"adapter {name!r} cannot be loaded: ", words)
                   for name, words in broken.items() for stream in (False, True)}  # fmt: skip
        answers[("doomed", False)] = (400, "adapter 'doomed' cannot be loaded: ", "does not exist")
        answers[("doomed", True)] = (404, "The model 'doomed' does not exist", "")
        for (name, stream), (status, prefix, words) in answers.items():
            beside: dict[str, httpx.Response] = {}
            good = threading.Thread(target=lambda beside=beside: beside.update(ok=ask("a000", stream=True)))
            good.start()
            response = ask(name, stream=stream)
            good.join()
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert prefix in error["message"] and words in error["message"], (name, error["message"])
            assert error["param"] == "model" and beside["ok"].status_code == 200
        assert registry.counters["evictions"] == evictions  # nothing was evicted for a broken adapter
        assert ask("a001").status_code == 200
    finally:
        live.stop()


def test_an_adapter_larger_than_the_memory_is_refused_naming_both_sizes(tokenizer, many, tmp_path):
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(many),
                      max_model_len=MAX_MODEL_LEN, adapter_memory_mb=0.001)  # fmt: skip
    try:
        response = httpx.post(f"{live.url}/v1/completions", json={"model": "a003", "prompt": "x"}, timeout=60)
        message = response.json()["error"]["message"]
        assert (
            response.status_code == 400 and "MB, more than the adapters' memory (--adapter-memory-mb 0.001)" in message
        )
    finally:
        live.stop()
    with pytest.raises(ValueError, match="--adapter big=.*more than the adapters' memory"):
        LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapters={"big": str(many / "a003")},
                   max_model_len=MAX_MODEL_LEN, adapter_memory_mb=0.001)  # fmt: skip


def test_requests_waiting_for_their_adapters_are_not_refused_while_the_batch_has_room(tokenizer, many):
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(many),
                      max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_queue=1)  # fmt: skip
    try:
        statuses: list[int] = []
        cold = [f"a{i:03d}" for i in range(150, 156)]  # six adapters never loaded, asked for at once
        threads = [threading.Thread(target=lambda m=m: statuses.append(httpx.post(
            f"{live.url}/v1/completions", json={"model": m, "prompt": "hi", "max_tokens": 3}, timeout=60).status_code))
            for m in cold]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 6
    finally:
        live.stop()


def test_an_empty_adapter_directory_warns_and_serves_the_base_model(tokenizer, tmp_path, caplog):
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(tmp_path),
                      max_model_len=MAX_MODEL_LEN)  # fmt: skip
    try:
        assert "is empty: only the base model 'tiny' is served" in caplog.text
        reply = httpx.post(f"{live.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert reply.status_code == 200
    finally:
        live.stop()


def test_the_registry_never_reads_past_its_memory(tokenizer, many):
    """Without a server: leases of many adapters under a cap of three, the engine's side run by hand."""
    model = AdapterModel(tiny_llama(tokenizer), tokenizer)
    names = [f"a{i:03d}" for i in range(0, 32, len(RANKS))]  # eight adapters of rank 2: three fit
    three = 3 * inspect_adapter_dir(many / names[0]).nbytes(8)
    registry = AdapterRegistry("tiny", many, max_loaded=COUNT, memory_mb=three / 2**20, model=model)
    try:
        leased = [registry.lease(name)[0] for name in names]
        while not all(v.settled.is_set() for v in leased[:3]):
            registry.apply(model)
            assert registry.held_bytes <= registry.memory_bytes
        assert [v.state for v in leased[3:]] == ["queued"] * 5  # every byte is held by a leased adapter
        for version in leased[:3]:
            registry.release(version)
        while not all(v.settled.is_set() for v in leased[3:6]):
            registry.apply(model)
            assert registry.held_bytes <= registry.memory_bytes
        assert registry.counters["evictions"] >= 3
    finally:
        registry.close()


def test_freed_heap_memory_is_returned_after_an_eviction_at_most_once_an_interval(tokenizer, many, monkeypatch):
    """An adapter's many small tensors stay in the allocator's heap when it leaves memory: the engine's
    side hands them back (`return_freed_memory`) after an eviction, not more often than `TRIM_INTERVAL_S`."""
    model = AdapterModel(tiny_llama(tokenizer), tokenizer)
    names = [f"a{i:03d}" for i in range(0, 12, len(RANKS))]  # three adapters of rank 2: one fits
    one = inspect_adapter_dir(many / names[0]).nbytes(8)
    trims = []
    monkeypatch.setattr(registry_module, "return_freed_memory", lambda: trims.append(True))
    monkeypatch.setattr(registry_module, "TRIM_INTERVAL_S", 3600.0)
    registry = AdapterRegistry("tiny", many, max_loaded=COUNT, memory_mb=one / 2**20, model=model)

    def serve(name: str) -> None:
        version, _ = registry.lease(name)
        while not version.settled.is_set():
            registry.apply(model)
        registry.release(version)

    try:
        serve(names[0])
        assert trims == []  # nothing left memory
        serve(names[1])  # evicts the first
        assert len(trims) == 1 and registry.counters["evictions"] == 1
        serve(names[2])  # evicts the second within the interval: not trimmed yet
        assert len(trims) == 1 and registry.counters["evictions"] == 2
        monkeypatch.setattr(registry_module, "TRIM_INTERVAL_S", 0.0)
        registry.apply(model)
        assert len(trims) == 2
        registry.apply(model)  # nothing freed since
        assert len(trims) == 2
    finally:
        registry.close()


def test_an_adapter_read_in_time_is_installed_at_the_step_boundary_that_started_its_read(tokenizer, many, monkeypatch):
    """A cold adapter does not wait one more decoding step when its read is quick; a slow read is
    waited for `READ_WAIT_S` at most and then installed at a later boundary."""
    model = AdapterModel(tiny_llama(tokenizer), tokenizer)
    registry = AdapterRegistry("tiny", many, max_loaded=COUNT, model=model)
    try:
        monkeypatch.setattr(registry_module, "READ_WAIT_S", 30.0)  # a quick read, however busy the machine
        quick, _ = registry.lease("a000")
        assert registry.apply(model) and quick.state == "ready"  # one boundary: read, then installed
        monkeypatch.setattr(registry_module, "READ_WAIT_S", 0.05)
        disk, read_files = threading.Event(), registry._read_files
        registry._read_files = lambda version: (disk.wait(), read_files(version))
        slow, _ = registry.lease("a001")
        assert not registry.apply(model) and slow.state == "reading"  # the engine went back to its step
        disk.set()
        while slow.state == "reading":
            time.sleep(0.01)
        assert registry.apply(model) and slow.state == "ready"
    finally:
        registry.close()


def test_a_request_for_a_cold_adapter_gets_its_first_token_in_the_step_that_reads_its_adapter(tokenizer, many):
    """Submitted while its adapter is still on disk (as the server does), it is admitted at the step
    boundary where the adapter is read and installed, not one or two steps later."""
    model = AdapterModel(tiny_llama(tokenizer), tokenizer)
    registry = AdapterRegistry("tiny", many, max_loaded=COUNT, model=model)
    engine = Engine(model, registry, EngineLimits(max_model_len=MAX_MODEL_LEN), ServerMetrics())
    try:
        events = []
        version, in_memory = registry.lease("a006")
        assert version.state == "queued" and not in_memory
        engine.submit(EngineRequest("cold", tokenizer("hi")["input_ids"], SamplingParams(max_tokens=3), version,
                                    events.append))  # fmt: skip
        engine.step_once()
        assert version.state == "ready" and [r.id for r in engine.running] == ["cold"]
        assert [type(event) for event in events] == [Token, Token]  # its prefill's token and a decoding step's
    finally:
        registry.close()


def test_responses_say_whether_their_adapter_was_in_memory(capped):
    name = "a197"  # not asked for by the other tests
    first, second = (httpx.post(f"{capped.url}/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2},
                                timeout=60) for _ in range(2))  # fmt: skip
    assert first.headers["x-flora-adapter-cache"] == "miss" and second.headers["x-flora-adapter-cache"] == "hit"
    base = httpx.post(f"{capped.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert "x-flora-adapter-cache" not in base.headers
