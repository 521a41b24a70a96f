"""Base models without weights (``random:NAME``, `flora.random_base`): the architecture from a config,
the same random weights at every load, a byte-level tokenizer, and benchmarks that run on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flora import AdapterModel, LoraConfig, load_base
from flora.random_base import ARCHITECTURES, MARKER

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_random_model_has_the_architecture_and_the_same_weights_at_every_load(cache):
    model, tokenizer = load_base("random:tiny")
    again, _ = load_base("random:tiny")
    for key, value in ARCHITECTURES["tiny"].items():
        if key not in ("model_type", "rope_parameters"):
            assert getattr(model.config, key) == value, key
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    directory = cache / "models" / "random-tiny"
    assert (directory / MARKER).is_file() and not list(directory.glob("*.safetensors"))  # no weights written
    ids = tokenizer(["Hello, wörld"], return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "Hello, wörld" and ids.shape[1] == len("Hello, wörld".encode())
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, model.config.eos_token_id)
    assert model(ids).logits.shape == (1, ids.shape[1], ARCHITECTURES["tiny"]["vocab_size"])


def test_an_unknown_architecture_is_refused_naming_the_known_ones(cache):
    with pytest.raises(FileNotFoundError, match=r"no architecture 'nope' .*random:smollm2-135m, random:llama-1b"):
        load_base("random:nope")


def test_adapters_trained_and_served_on_a_random_model(cache, tmp_path):
    model = AdapterModel.from_pretrained("random:tiny")
    model.add_adapter("a", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        model.adapter_parameters("a")["model.layers.0.self_attn.q_proj.lora_B.weight"].fill_(0.5)
    ids = model.tokenizer(["one", "two"], return_tensors="pt", padding=True)
    out = model.generate(**ids, adapter_names=["a", None], max_new_tokens=3, do_sample=False)
    alone = model.generate(**{k: v[:1] for k, v in ids.items()}, adapter_names=["a"], max_new_tokens=3, do_sample=False)
    assert torch.equal(out[0], alone[0])


@pytest.mark.parametrize(
    "command",
    [
        ["decode_memory.py", "--rows", "2", "--steps", "1", "--rounds", "1", "--prompt-tokens", "4"],
        ["batch_generation.py", "--rows", "2", "--distinct", "1,2", "--flora-ranks", "1", "--new-tokens", "2",
         "--prompt-tokens", "4", "--decode-steps", "1", "--rounds", "1", "--head-to-head-rounds", "1", "--skip-peft"],
    ],
)  # fmt: skip
def test_benchmarks_run_without_weights(cache, tmp_path, command):
    out = tmp_path / "result.json"
    run = [sys.executable, str(BENCHMARKS / command[0]), "--model", "random:tiny", *command[1:], "--json", str(out)]
    subprocess.run(run, check=True, capture_output=True, env={**os.environ, "FLORA_CACHE": str(cache)}, timeout=600)
    result = json.loads(out.read_text())
    assert result["model"] == "random:tiny" and result["records"]
    assert all(record.get("ratio_to_base") is None or record["ratio_to_base"] > 0 for record in result["records"])


def test_serve_load_repeats_flora_with_its_adapters_in_memory(cache, tmp_path):
    """``flora-warm`` sends flora's requests again on its server: the adapters flora's run read are not read again."""
    out = tmp_path / "result.json"
    run = [sys.executable, str(BENCHMARKS / "serve_load.py"), "--model", "random:tiny",
           "--systems", "base,flora,flora-warm", "--adapters", "64", "--distributions", "uniform",
           "--requests", "6", "--rate", "50", "--repeats", "1", "--output-tokens", "2-4", "--prompt-tokens", "4-8",
           "--log-dir", str(tmp_path / "logs"), "--json", str(out)]  # fmt: skip
    subprocess.run(run, check=True, capture_output=True, env={**os.environ, "FLORA_CACHE": str(cache)}, timeout=600)
    result = json.loads(out.read_text())
    runs = {record["system"]: record for record in result["records"]}
    assert [record["system"] for record in result["records"]] == ["base", "flora", "flora-warm"]
    assert all(record["finished"] == 6 for record in runs.values())
    assert runs["flora"]["adapter_misses"] > 0 and runs["flora-warm"]["adapter_misses"] == 0
    assert result["targets"]["flora_warm_over_base_tokens"]["ratio"] > 0


def test_serve_load_refuses_flora_warm_without_flora(tmp_path):
    run = [sys.executable, str(BENCHMARKS / "serve_load.py"), "--systems", "base,flora-warm"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "flora-warm repeats flora's 64-uniform run" in done.stderr


def test_adapter_read_times_the_read_against_safetensors_load_file(cache, tmp_path):
    out = tmp_path / "result.json"
    run = [sys.executable, str(BENCHMARKS / "adapter_read.py"), "--model", "random:tiny", "--adapters", "2",
           "--held", "1", "--rounds", "2", "--json", str(out)]  # fmt: skip
    subprocess.run(run, check=True, capture_output=True, env={**os.environ, "FLORA_CACHE": str(cache)}, timeout=600)
    result = json.loads(out.read_text())
    assert result["model"] == "random:tiny" and result["tensors_per_adapter"] > 0
    assert set(result["median_ms"]) == {"read_ms", "read_cpu_ms", "load_file_ms", "install_ms", "delete_ms"}
    assert all(value > 0 for value in result["median_ms"].values()) and result["read_over_load_file"] > 0
