"""Resume: a ``flora train`` process killed with SIGKILL while it writes a checkpoint leaves no
partial checkpoint, and ``--resume`` reaches the same adapters, losses and log as a run that was
never interrupted (same seed, same data order)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import TASKS, log_records, save_tiny_model

from flora.cli import main
from flora.training import train

# Runs `flora` with one change: after writing the RNG state of checkpoint 6 into its staging
# directory (the checkpoint is not complete yet), it marks a file and sleeps until killed.
KILLABLE = """
import os, sys, time
import flora.training as t
original = t.FloraTrainer._save_rng_state
def save_rng_state(self, output_dir):
    original(self, output_dir)
    if self.state.global_step == 6:
        open(os.environ["FLORA_TEST_MARK"], "w").close()
        time.sleep(600)
t.FloraTrainer._save_rng_state = save_rng_state
from flora.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def arguments(tiny_dir: str, out: Path) -> list[str]:
    return ["train", "--model", tiny_dir, "--output-dir", str(out), "--tasks", ",".join(TASKS), "--adapter-per",
            "task", "--suite-train", "8", "--max-steps", "8", "--batch-size", "4", "--save-steps", "2",
            "--set", "r=4", "--set", "dropout=0.1", "--adapter-lr", "add_numbers=3e-3", "--strategy", "bmm",
            "--no-progress"]  # fmt: skip


def test_killed_run_resumes_to_the_same_adapters(tiny_dir, tmp_path):
    reference = tmp_path / "reference"
    assert main(arguments(tiny_dir, reference)) == 0

    out = tmp_path / "killed"
    mark = tmp_path / "mark"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLORA_TEST_MARK": str(mark)}
    process = subprocess.Popen([sys.executable, "-c", KILLABLE, *arguments(tiny_dir, out)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not mark.exists():
            if process.poll() is not None:
                pytest.fail(f"the run ended before checkpoint 6: {process.stdout.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the run did not reach checkpoint 6 in time")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert (out / ".staging-checkpoint-6").is_dir() and not (out / "checkpoint-6").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert [r["step"] for r in log_records(out)] == [1, 2, 3, 4, 5, 6]
    assert not (out / "adapters").exists()

    assert main(["train", "--output-dir", str(out), "--resume", "--no-progress"]) == 0  # settings from the run
    assert not list(out.glob(".staging-*"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    for name in TASKS:
        resumed = load_file(out / "adapters" / name / "adapter_model.safetensors")
        expected = load_file(reference / "adapters" / name / "adapter_model.safetensors")
        assert resumed.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(resumed[key], expected[key], rtol=1e-6, atol=1e-8)
    resumed_log, expected_log = log_records(out), log_records(reference)
    assert [r["step"] for r in resumed_log] == list(range(1, 9))
    assert [r["adapters"] for r in resumed_log] == [r["adapters"] for r in expected_log]  # same data order
    assert [r["loss"] for r in resumed_log] == pytest.approx([r["loss"] for r in expected_log], rel=1e-6)
    result = json.loads((out / "train_result.json").read_text())
    assert result["resumed_from"] == str(out / "checkpoint-4") and result["global_step"] == 8


def test_resume_is_refused_for_a_different_run_and_allowed_for_the_same(tiny_dir, tmp_path):
    out = tmp_path / "run"
    settings = dict(model=tiny_dir, output_dir=str(out), tasks=["reverse_words"], suite_train=4, max_steps=2,
                    batch_size=2, save_steps=1, strategy="bmm", progress=False)  # fmt: skip
    first = train(**settings)
    with pytest.raises(ValueError, match=r"already holds this run \(finished\) .*pass --resume .* or --overwrite"):
        train(**settings)
    with pytest.raises(ValueError, match=r"holds a different run \(learning_rate: 0\.001 there, 0\.002 now\)"):
        train(**settings, learning_rate=2e-3, resume=True)
    again = train(**settings, resume=True)  # finished: nothing more to train, the same adapter
    assert again.global_step == 2 and again.resumed_from == str(out / "checkpoint-2")
    for key, parameter in first.model.adapter_parameters("default").items():
        torch.testing.assert_close(again.model.adapter_parameters("default")[key], parameter, rtol=0, atol=0)
    assert len(log_records(out)) == 2
    replaced = train(**settings, learning_rate=2e-3, overwrite=True)
    assert replaced.resumed_from is None
    assert json.loads((out / "train_config.json").read_text())["config"]["learning_rate"] == 2e-3
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        train(**settings, resume=True, overwrite=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty and holds no flora training run \(notes\.txt\)"):
        train(**{**settings, "output_dir": str(foreign)})
    train(**{**settings, "output_dir": str(foreign)}, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"  # --overwrite removes only flora's own files
