"""The smoke profile of ``peft-instruction`` on SmolLM2-135M (shortened to one pack): it trains, stores
and reports, and LoRA or IA3 learns something in a few steps of the built-in suite."""

from __future__ import annotations

import json

import pytest

from flora.cli import main
from study.support import stored_trials


@pytest.mark.real_model
def test_the_smoke_study_runs_on_the_real_model(tmp_path):
    out = tmp_path / "study"
    one_pack = 'experiments=[{name = "learning-rate", method = ["lora", "ia3"], learning_rate = {lora = 1e-2, ia3 = 1e-2}, size = {lora = 4}}]'  # noqa: E501
    assert main(["study", "run", "peft-instruction", "--profile", "smoke", "--out", str(out), "--no-progress",
                 "--set", one_pack, "--set", "training.max_steps=6",
                 "--set", "evaluation.evaluations=2"]) == 0  # fmt: skip
    rows = stored_trials(out)
    assert sorted(r["method"] for r in rows.values()) == ["ia3", "lora", "zero_shot"]
    assert {r["status"] for r in rows.values()} == {"done"} and len({r["pack"] for r in rows.values()}) == 2
    trained = [r for r in rows.values() if r["method"] != "zero_shot"]
    assert max(r["seen_rougeL"] for r in trained) > 0  # zero-shot SmolLM2 scores about 0 on these tasks
    for row in trained:  # the validation loss falls from step 0 to the end
        checkpoints = json.loads(row["checkpoints"])
        assert checkpoints[-1]["validation_loss"] < checkpoints[0]["validation_loss"]
    assert (out / "report.md").is_file() and (out / "figures" / "learning_curves.png").is_file()
