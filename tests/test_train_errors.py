"""Bad input to ``flora train`` fails with a message naming the problem: unknown method or
hyperparameter, empty or malformed data, an adapter setting for an adapter the run lacks, and a
learning rate that makes the loss NaN (the run stops; the checkpoints written so far stay)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_train import log_records, save_tiny_model

from flora.cli import main
from flora.training import TrainingDivergedError, train


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def run_cli(capsys, tiny_dir, out, *extra: str) -> tuple[int, str]:
    code = main(["train", "--model", tiny_dir, "--output-dir", str(out), "--tasks", "reverse_words",
                 "--suite-train", "4", "--max-steps", "2", "--batch-size", "2", "--strategy", "bmm",
                 "--no-progress", *extra])  # fmt: skip
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "lorra"], "unknown method 'lorra' (expected one of full, lora, flora, ia3"),
        (["--set", "rank=4"], "lora has no hyperparameter 'rank' (valid: target_modules, exclude_modules, r, alpha"),
        (["--method", "ia3", "--set", "r=4"], "ia3 has no hyperparameter 'r' (valid: target_modules"),
        (["--set", "alpha=big"], "lora alpha: 'big' is not a number"),
        (["--set", "r"], "--set 'r': expected KEY=VALUE"),
        (["--adapter-lr", "other=1e-3"], "adapter_lr / adapter_settings name adapters ['other'] that this run does"),
        (["--adapter-set", "default:depth=2"], "adapter default: lora has no hyperparameter 'depth'"),
        (["--tasks", "no_such_task"], "unknown suite task or category 'no_such_task'"),
        (["--learning-rate", "-1"], "learning_rate=-1.0: expected a number > 0"),
        (["--batch-size", "3", "--micro-batch-size", "2"], "batch_size 3 is not a multiple of micro_batch_size 2"),
        (["--training-arg", "learning_rate=1"], "training arg 'learning_rate' is set by flora; use --learning-rate"),
        (["--lr-scheduler", "sometimes"], "sometimes is not a valid SchedulerType"),
        (["--method", "full", "--adapter-per", "task"], "method 'full' trains the whole model"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(capsys, tiny_dir, tmp_path, extra, message):
    code, err = run_cli(capsys, tiny_dir, tmp_path / "out", *extra)
    assert code == 2 and f"flora: error: {message}" in err, err
    assert not (tmp_path / "out" / "adapters").exists()


def test_empty_or_malformed_data_is_refused(capsys, tiny_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, err = run_cli(capsys, tiny_dir, tmp_path / "a", "--data", str(empty), "--tasks", "empty")
    assert code == 2 and f"{empty}: the file is empty (expected training records)" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    code, err = run_cli(capsys, tiny_dir, tmp_path / "b", "--data", str(broken), "--tasks", "broken")
    assert code == 2 and f"{broken}: line 2: not valid JSON" in err
    missing_field = tmp_path / "fields.jsonl"
    missing_field.write_text('{"prompt": "a"}\n')
    code, err = run_cli(capsys, tiny_dir, tmp_path / "c", "--data", str(missing_field), "--format", "jsonl")
    assert code == 2 and "line 1: missing field 'completion'" in err
    no_instances = tmp_path / "none.json"
    no_instances.write_text("[]")
    code, err = run_cli(capsys, tiny_dir, tmp_path / "d", "--data", str(no_instances), "--format", "alpaca")
    assert code == 2 and f"{no_instances}: no training instances in it" in err
    code, err = run_cli(capsys, tiny_dir, tmp_path / "e", "--data", str(tmp_path / "absent.jsonl"))
    assert code == 2 and "absent.jsonl' does not exist" in err


def test_a_learning_rate_that_makes_the_loss_nan_stops_the_run_and_keeps_the_checkpoints(capsys, tiny_dir, tmp_path):
    out = tmp_path / "nan"
    settings = dict(model=tiny_dir, output_dir=str(out), tasks=["reverse_words"], suite_train=8, max_steps=8,
                    batch_size=4, save_steps=1, learning_rate=1e30, strategy="bmm", progress=False)  # fmt: skip
    with pytest.raises(TrainingDivergedError, match=r"NaN or infinite at step (\d+) .*last good checkpoint is .*"):
        train(**settings)
    records = log_records(out)
    bad = records[-1]["step"]
    assert records[-1]["nonfinite"] is True and all(r["loss"] is not None for r in records[:-1])
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [int(p.name.split("-")[1]) for p in checkpoints][-1] == bad - 1  # the failing step saved nothing
    for checkpoint in checkpoints:
        tensors = load_file(checkpoint / "adapters" / "default" / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not (out / "adapters").exists() and not list(out.glob(".staging-*"))
    code = main(["train", "--output-dir", str(out), "--resume", "--no-progress"])
    assert code == 1 and "became NaN or infinite" in capsys.readouterr().err
