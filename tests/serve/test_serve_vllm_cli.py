"""vLLM's command line for adapters on ``flora serve``: ``--enable-lora``, ``--lora-modules`` (pairs and
JSON), ``--max-loras`` (enforced at every step), ``--max-lora-rank`` (refused at request, load and start
time), ``--max-cpu-loras``, the environment's keys and switches; unknown vLLM flags refused."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import httpx
import pytest
import torch
from data.tiny import tiny_llama
from openai import OpenAI

from flora import AdapterModel, LoraConfig
from flora.cli import build_parser
from flora.cli.serve import settings_from_args
from flora.kernels.autotune import machine_fingerprint
from flora.serve import ServeSettings, build_state
from flora.serve.registry import AdapterLoadError, AdapterRegistry, AdapterVersion
from serve.support import LiveServer, save_adapters

PROMPT = "reverse the words: red green blue"


def _settings(argv: list[str], environ: dict[str, str] | None = None) -> ServeSettings:
    return settings_from_args(build_parser("serve").parse_args(["serve", *argv]), environ or {})


def _complete(url: str, model: str, tokens: int = 6) -> str:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=tokens, temperature=0,
                                      extra_body={"ignore_eos": True})  # fmt: skip
    return reply.choices[0].text


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_a_vllm_command_line_parses_into_serve_settings(adapter_dir):
    a, b = str(adapter_dir / "lora2"), str(adapter_dir / "lora4")
    argv = ["--model", "tiny", "--enable-lora", "--lora-modules", f"a={a}", f"b={b}", "--max-loras", "4",
            "--max-lora-rank", "16", "--max-cpu-loras", "8"]  # fmt: skip
    assert _settings(argv) == ServeSettings(model="tiny", adapters={"a": a, "b": b}, max_loras=4, max_lora_rank=16,
                                            max_loaded_adapters=8)  # fmt: skip


def test_lora_modules_json_form_repeated_flags_and_vllm_spellings(adapter_dir):
    paths = {name: str(adapter_dir / name) for name in ("lora2", "lora4", "flora", "ia3")}
    argv = ["--model", "tiny", "--served-model-name", "base", "--adapter", f"pinned={paths['ia3']}",
            "--lora-modules", json.dumps({"name": "c", "path": paths["lora2"], "base_model_name": "tiny"}),
            f"d={paths['lora4']}", "--lora-modules", json.dumps({"name": "e", "path": paths["flora"]}),
            "--dtype", "half", "--host", "0.0.0.0", "--port", "9000", "--max-model-len", "64", "--max-num-seqs", "4",
            "--max-num-batched-tokens", "256", "--max-loaded-adapters", "5", "--metrics-prefix", "vllm"]  # fmt: skip
    assert _settings(argv) == ServeSettings(
        model="tiny", served_model_name="base", dtype="half", host="0.0.0.0", port=9000, max_model_len=64,
        max_num_seqs=4, max_num_batched_tokens=256, max_loaded_adapters=5, metrics_prefix="vllm",
        adapters={"pinned": paths["ia3"], "c": paths["lora2"], "d": paths["lora4"], "e": paths["flora"]},
    )  # fmt: skip
    served_name = json.dumps({"name": "f", "path": paths["lora2"], "base_model_name": "base"})
    assert _settings(["--model", "tiny", "--served-model-name", "base", "--lora-modules", served_name]).adapters == {
        "f": paths["lora2"]
    }


@pytest.mark.parametrize(
    ("modules", "words"),
    [
        ([json.dumps({"name": "a", "path": "P", "base_model_name": "meta-llama/Llama-3"})],
         "base_model_name 'meta-llama/Llama-3' is not this server's base model ('tiny')"),
        (['{"name": "a", "path": '], "not valid JSON"),
        ([json.dumps({"name": "a"})], "a JSON object with the strings 'name', 'path'"),
        ([json.dumps({"name": "a", "path": "P", "long_lora_max_len": 4})], "a JSON object with the strings"),
        (["lora2=P", "lora2=P"], "the name 'lora2' is given twice"),
        (["a=/nowhere/at/all"], "is not a directory"),
    ],
)  # fmt: skip
def test_bad_lora_modules_are_refused_naming_the_value(adapter_dir, modules, words):
    modules = [m.replace("P", str(adapter_dir / "lora2")) for m in modules]
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        _settings(["--model", "tiny", "--lora-modules", *modules])
    assert words in str(raised.value) and "--lora-modules" in str(raised.value)


def test_a_name_given_by_adapter_and_lora_modules_is_refused(adapter_dir):
    path = str(adapter_dir / "lora2")
    with pytest.raises(ValueError, match="the name 'x' is given twice"):
        _settings(["--adapter", f"x={path}", "--lora-modules", f"x={path}"])


@pytest.mark.parametrize("flag", [["--gpu-memory-utilization", "0.9"], ["--tensor-parallel-size", "2"],
                                  ["--enforce-eager"], ["--kv-cache-dtype", "fp8"]])  # fmt: skip
def test_other_vllm_flags_are_refused(flag, capsys):
    with pytest.raises(SystemExit) as raised:
        build_parser("serve").parse_args(["serve", *flag])
    assert raised.value.code == 2 and f"unrecognized arguments: {' '.join(flag)}" in capsys.readouterr().err


def test_the_api_key_and_the_runtime_switch_from_flags_and_the_environment():
    assert _settings([]).api_key is None and not _settings([]).enable_runtime_lora_updating
    assert _settings([], {"VLLM_API_KEY": "v"}).api_key == "v"
    assert _settings([], {"VLLM_API_KEY": "v", "FLORA_API_KEY": "f"}).api_key == "f"
    assert _settings(["--api-key", "k"], {"VLLM_API_KEY": "v", "FLORA_API_KEY": "f"}).api_key == "k"
    assert "sekret-47" not in repr(_settings(["--api-key", "sekret-47"]))  # settings may be logged: not the key
    for value, on in [("true", True), ("1", True), (" TRUE ", True), ("0", False), ("false", False), ("", False)]:
        assert _settings([], {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": value}).enable_runtime_lora_updating is on, value
    assert _settings(["--enable-runtime-lora-updating"]).enable_runtime_lora_updating
    roots = _settings(["--allowed-adapter-paths", "/a", "/b", "--allowed-adapter-paths", "/c"]).allowed_adapter_paths
    assert roots == ["/a", "/b", "/c"]


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"max_loras": 0}, "--max-loras 0: expected a positive number"),
        ({"max_lora_rank": -1}, "--max-lora-rank -1: expected a positive number"),
        ({"max_loras": 65}, "--max-loras 65 is more than --max-cpu-loras (--max-loaded-adapters) 64"),
        ({"api_key": ""}, "--api-key: the key is empty"),
        ({"dtype": "fp8"}, "--dtype 'fp8'"),
        ({"adapter_dtype": "int8"}, "--adapter-dtype 'int8': expected one of float32, bfloat16, float16"),
    ],
)
def test_settings_out_of_range_are_refused(settings, words):
    with pytest.raises(ValueError) as raised:
        ServeSettings(**settings).check()
    assert words in str(raised.value)


def test_a_server_started_from_a_vllm_command_line(tokenizer, reference, adapter_dir):
    a, b = str(adapter_dir / "lora2"), str(adapter_dir / "flora")
    settings = _settings(["--model", "tiny", "--enable-lora", "--lora-modules", f"a={a}", f"b={b}", "--max-loras", "4",
                          "--max-lora-rank", "16", "--max-cpu-loras", "8", "--max-model-len", "128"])  # fmt: skip
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "model"}
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), **fields)
    try:
        ids = tokenizer(PROMPT).input_ids
        assert _complete(live.url, "a") == reference.text("lora2", a, ids, 6)
        assert _complete(live.url, "b") == reference.text("flora", b, ids, 6)
        assert {card["id"] for card in httpx.get(f"{live.url}/v1/models").json()["data"]} == {"tiny", "a", "b"}
        assert {v.name for v in live.state.registry.loaded() if v.pinned} == {"a", "b"}
        assert (live.state.registry.max_loaded, live.state.registry.max_rank) == (8, 16)
        assert live.state.engine.limits.max_loras == 4
        assert live.metric("flora:lora_requests_info", max_lora="4") > 0
    finally:
        live.stop()


def test_adapter_dtype_sets_the_tables_of_the_served_model(tokenizer, tmp_path, monkeypatch):
    """``--adapter-dtype bfloat16``: the served model's LoRA tables in bfloat16 (`AdapterModel.adapter_dtype`)."""
    monkeypatch.setenv("FLORA_CACHE", str(tmp_path))  # the autotuner's file (--autotune-cache auto)
    settings = _settings(["--model", "tiny", "--adapter-dtype", "bfloat16", "--max-model-len", "128"])
    assert settings.adapter_dtype == "bfloat16"
    assert _settings(["--lora-dtype", "bfloat16"]).adapter_dtype == "bfloat16"  # vLLM's name
    assert _settings(["--lora-dtype", "auto"]).adapter_dtype is None  # the model's
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "model"}
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), **fields)
    try:
        assert live.state.engine.model.adapter_dtype is torch.bfloat16
    finally:
        live.stop()


def test_the_autotuners_choices_are_kept_in_a_file_per_machine_unless_none(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FLORA_CACHE", str(tmp_path))
    assert _settings([]).autotune_cache == "auto"
    assert _settings(["--autotune-cache", "none"]).autotune_cache is None
    assert _settings(["--autotune-cache", str(tmp_path / "mine.json")]).autotune_cache == str(tmp_path / "mine.json")
    for setting, path in (("auto", tmp_path / "autotune" / f"{machine_fingerprint('cpu')}.json"),
                          (str(tmp_path / "mine.json"), tmp_path / "mine.json"), (None, None)):  # fmt: skip
        live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), autotune_cache=setting, max_model_len=128)
        try:
            assert live.state.engine.model.runtime.tuner.path == path
        finally:
            live.stop()


# -- --max-lora-rank ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rank_limited(tokenizer, adapter_dir, tmp_path_factory):
    """At most rank 2; run-time loading on from the test's temporary directories."""
    live = LiveServer(AdapterModel(tiny_llama(tokenizer), tokenizer), adapter_dir=str(adapter_dir), max_lora_rank=2,
                      enable_runtime_lora_updating=True, allowed_adapter_paths=[str(tmp_path_factory.getbasetemp())],
                      max_model_len=128)  # fmt: skip
    yield live
    live.stop()


def test_an_adapter_dir_adapter_above_max_lora_rank_is_a_400_at_request_time(rank_limited, tokenizer, reference,
                                                                              adapter_dir):  # fmt: skip
    request = {"model": "lora4", "prompt": PROMPT, "max_tokens": 4}
    error = _error(httpx.post(f"{rank_limited.url}/v1/completions", json=request, timeout=60), 400)
    assert error["message"] == "adapter 'lora4' has rank 4, above the server's --max-lora-rank 2"
    assert error["param"] == "model" and error["type"] == "BadRequestError"
    ids = tokenizer(PROMPT).input_ids
    for name in ("lora2", "ia3", "prompt"):  # rank 2 (the limit), and methods without a rank
        assert _complete(rank_limited.url, name) == reference.text(name, str(adapter_dir / name), ids, 6)
    assert "lora4" not in {v.name for v in rank_limited.state.registry.loaded()}


def test_a_runtime_load_above_max_lora_rank_is_a_400_naming_rank_and_limit(rank_limited, tokenizer, tmp_path):
    patterned = LoraConfig(r=2, rank_pattern={"v_proj": 8}, target_modules=["q_proj", "v_proj"])
    path = save_adapters(tokenizer, tmp_path, {"patterned": patterned})["patterned"]
    load = {"lora_name": "patterned", "lora_path": path}
    error = _error(httpx.post(f"{rank_limited.url}/v1/load_lora_adapter", json=load, timeout=60), 400)
    assert error["message"] == "adapter 'patterned' has rank 8, above the server's --max-lora-rank 2"
    assert error["param"] == "lora_path"
    request = {"model": "patterned", "prompt": PROMPT}
    assert httpx.post(f"{rank_limited.url}/v1/completions", json=request, timeout=60).status_code == 404


def test_a_pinned_adapter_above_max_lora_rank_stops_the_start(tokenizer, adapter_dir):
    settings = ServeSettings(model="tiny", adapters={"big": str(adapter_dir / "lora4")}, max_lora_rank=3)
    with pytest.raises(ValueError) as raised:
        build_state(settings, model=AdapterModel(tiny_llama(tokenizer), tokenizer))
    assert str(raised.value) == (f"--adapter big={adapter_dir / 'lora4'}: adapter 'big' has rank 4, above the "
                                 f"server's --max-lora-rank 3")  # fmt: skip


def test_the_files_read_are_checked_again(adapter_dir):
    registry = AdapterRegistry("tiny", max_rank=2)
    version = AdapterVersion("swapped", "adapter-0", adapter_dir / "lora4")  # files changed after they were checked
    with pytest.raises(AdapterLoadError):
        registry._inspect(version, "model")
    assert version.state == "failed"
    assert version.error == ("adapter 'swapped' cannot be loaded: adapter 'swapped' has rank 4, above the server's "
                             "--max-lora-rank 2")  # fmt: skip
    registry.close()


# -- --max-loras -------------------------------------------------------------------------------------


def test_max_loras_bounds_the_distinct_adapters_of_every_step(tokenizer, reference, adapter_dir):
    base = tiny_llama(tokenizer)
    seen: list[int] = []  # distinct adapters of the running rows at every forward (on the engine's thread)
    engine = {}

    def step(*_) -> None:
        if "engine" in engine:
            seen.append(len({r.adapter for r in engine["engine"].running if r.adapter is not None}))
        time.sleep(0.01)  # requests overlap

    base.register_forward_pre_hook(step)
    live = LiveServer(AdapterModel(base, tokenizer), adapter_dir=str(adapter_dir), max_loras=2, max_num_seqs=8,
                      max_model_len=128)  # fmt: skip
    adapters = ["lora2", "lora4", "flora", "ia3"]
    try:
        for name in adapters:
            _complete(live.url, name, tokens=1)  # loaded before the burst: admission waits on nothing else
        engine["engine"] = live.state.engine
        jobs = [*adapters, *adapters, "tiny"]
        results: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i, m: results.__setitem__(i, _complete(live.url, m, 12)),
                                    args=(i, m)) for i, m in enumerate(jobs)]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        live.stop()
    assert max(seen) == 2, seen  # reached, never passed
    ids = tokenizer(PROMPT).input_ids
    for index, name in enumerate(jobs):
        path = None if name == "tiny" else str(adapter_dir / name)
        assert results[index] == reference.text(None if name == "tiny" else name, path, ids, 12), name
