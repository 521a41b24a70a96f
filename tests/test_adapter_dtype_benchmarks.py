"""The bfloat16-tables accuracy benchmark and the GPU script, run weight-free on the CPU (``random:tiny``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SNI = ROOT / "tests" / "data" / "fixtures" / "sni"
SMALL = ["--model", "random:tiny", "--adapters", "4", "--batch-size", "4", "--logit-rows", "3", "--new-tokens", "6",
         "--speed-rows", "2", "--speed-steps", "1", "--rounds", "1"]  # fmt: skip


def accuracy(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    run = [sys.executable, str(ROOT / "benchmarks" / "adapter_dtype_accuracy.py"), *SMALL, *options]
    env = {**os.environ, "FLORA_CACHE": str(tmp_path / "cache")}
    return subprocess.run(run, capture_output=True, text=True, env=env, timeout=600)


def test_accuracy_of_bfloat16_tables_on_sni_prompts(tmp_path):
    out = tmp_path / "accuracy.json"
    done = accuracy(tmp_path, "--data", str(SNI), "--prompts", "9", "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    prompts, logits, greedy = result["prompts"], result["logits"], result["greedy"]
    assert prompts["kind"] == "superni" and prompts["prompts"] == 9 and prompts["tasks"] == 3
    assert logits["positions"] == prompts["prompt_tokens"]  # every real prompt position, no padding
    # bfloat16 tables move the logits (they are used), by a small fraction of what the adapters do
    assert 0 < logits["max_abs_diff"] < logits["adapter_effect_max_abs"]
    assert 0 < logits["diff_over_effect"] < 0.05
    assert greedy["prompts"] == 9 and 0 <= greedy["identical"] <= greedy["tokens_before_first_difference"] <= 1
    assert len(greedy["first_difference_at"]) == len(greedy["float32_margin_at_difference"])
    assert len(greedy["first_difference_at"]) == round(9 * (1 - greedy["identical"]))
    systems = [record["system"] for record in result["speed"]["records"]]
    assert systems == ["base", "float32 tables", "bfloat16 tables"]
    mean_mb = result["adapters"]["mean_mb"]
    assert mean_mb["bfloat16"] == pytest.approx(mean_mb["float32"] / 2, rel=1e-2)


def test_accuracy_without_data_says_its_prompts_are_not_superni(tmp_path):
    out = tmp_path / "accuracy.json"
    done = accuracy(tmp_path, "--prompts", "5", "--json", str(out))
    assert done.returncode == 0, done.stderr
    prompts = json.loads(out.read_text())["prompts"]
    assert prompts["kind"] == "text" and prompts["prompts"] == 5
    assert prompts["note"] == "no --data: windows of harness.TEXT, not SuperNI prompts"


def test_accuracy_refuses_more_prompts_than_the_data_holds(tmp_path):
    done = accuracy(tmp_path, "--data", str(SNI), "--prompts", "1000")
    assert done.returncode != 0
    assert f"ValueError: --data {SNI}: " in done.stderr and "fewer than --prompts 1000" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_script_stops_without_cuda(tmp_path):
    env = {**os.environ, "DEVICE": "cuda", "PYTHON": sys.executable, "OUT_DIR": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert done.returncode == 1
    expected = f"gpu.sh: no CUDA device: torch.cuda.is_available() is False for {sys.executable} (DEVICE=cuda)."
    assert expected in done.stderr and not (tmp_path / "out").exists()  # stopped before writing anything
