"""Data parallelism: ``torchrun --nproc_per_node 2 -m flora train`` (gloo, CPU) trains several adapters
in mixed batches and gives the same adapters as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train import TASKS, log_records, save_tiny_model

from flora.training import train


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def test_two_processes_train_the_same_adapters_as_one(tiny_dir, tmp_path):
    settings = dict(tasks=TASKS, adapter_per="task", suite_train=8, max_steps=6, batch_size=4, save_steps=3,
                    settings={"r": 4}, adapter_lr={"add_numbers": 3e-3}, adapter_settings={"add_numbers": {"r": 2}},
                    strategy="bmm", progress=False)  # fmt: skip
    single = train(model=tiny_dir, output_dir=str(tmp_path / "one"), **settings)

    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "flora",
               "train", "--model", tiny_dir, "--output-dir", str(out), "--tasks", ",".join(TASKS), "--adapter-per",
               "task", "--suite-train", "8", "--max-steps", "6", "--batch-size", "4", "--save-steps", "3",
               "--set", "r=4", "--adapter-lr", "add_numbers=3e-3", "--adapter-set", "add_numbers:r=2",
               "--strategy", "bmm", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    for name in TASKS:
        parallel = load_file(out / "adapters" / name / "adapter_model.safetensors")
        expected = load_file(single.adapters[name] / "adapter_model.safetensors")
        for key in expected:
            torch.testing.assert_close(parallel[key], expected[key], rtol=1e-4, atol=1e-6)
    two, one = log_records(out), log_records(tmp_path / "one")
    assert [r["adapters"] for r in two] == [r["adapters"] for r in one]  # the same global batches
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert any(0 in r["adapters"].values() for r in one)  # a step where one adapter is unused by every process
    assert {p.name for p in (out / "checkpoint-3").glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
