"""``flora study run / status / report`` end to end on a tiny model: the store, the report and the
tables behind its figures, a rerun that skips finished trials, an output directory holding another
study, a Super-NaturalInstructions directory as data, and an unstable (NaN) trial."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from flora.cli import main
from flora.study.plan import eval_steps
from flora.study.store import StudyStore
from study.support import FAST, smoke_args, stored_trials, write_sni_dir

FIGURES = ("learning-rate", "num-tasks", "full-fine-tuning", "params", "seen_unseen", "loss_curves")


@pytest.fixture(scope="module")
def smoke(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "study"
    assert main(smoke_args(tiny_dir, out)) == 0
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_store_holds_one_finished_row_per_trial(smoke):
    rows = stored_trials(smoke)
    assert len(rows) == 5 and {r["status"] for r in rows.values()} == {"done"}
    assert sorted(r["method"] for r in rows.values()) == ["full", "ia3", "lora", "lora", "lora"]
    packs = {}
    for row in rows.values():
        packs.setdefault(row["pack"], []).append(row["method"])
        checkpoints = json.loads(row["checkpoints"])
        assert [c["step"] for c in checkpoints] == eval_steps(8, 2) == [4, 8]
        assert row["best_step"] in (4, 8)
        best = next(c for c in checkpoints if c["step"] == row["best_step"])
        assert row["validation_rougeL"] == best["validation"]["rougeL"]
        assert best["validation"]["rougeL"] == max(c["validation"]["rougeL"] for c in checkpoints)
        scores = json.loads(row["scores"])
        assert scores["seen"]["n"] == 2 * row["num_tasks"] and scores["unseen"]["n"] == 2 * 2  # smoke: 2 instances
        assert row["seen_rougeL"] == scores["seen"]["rougeL"] and row["unseen_rougeL"] == scores["unseen"]["rougeL"]
        assert set(scores["tasks"]) >= {"compare_numbers", "delete_word"}
        assert len(json.loads(row["losses"])) == row["steps"] == 8 and row["trainable_params"] > 0
        assert row["wall_s"] > 0 and row["run"] == 1
    assert sorted(map(sorted, packs.values())) == [["full"], ["ia3", "lora", "lora", "lora"]]  # full FT alone
    full = next(r for r in rows.values() if r["method"] == "full")
    lora = [r for r in rows.values() if r["method"] == "lora"]
    assert full["trainable_params"] > 20 * max(r["trainable_params"] for r in lora)
    assert sorted(r["num_tasks"] for r in lora) == [2, 4, 4]


def test_the_report_and_its_tables_hold_the_stored_numbers(smoke):
    report = (smoke / "report.md").read_text()
    for name in FIGURES:
        png = smoke / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{name}.png" in report
    rows = stored_trials(smoke)
    trials = {r["id"]: r for r in read_csv(smoke / "tables" / "trials.csv")}
    assert set(trials) == set(rows)
    for trial_id, row in rows.items():
        for column in ("validation_rougeL", "seen_rougeL", "unseen_rougeL", "seen_exact_match", "trainable_params"):
            assert float(trials[trial_id][column]) == pytest.approx(row[column])
    table = read_csv(smoke / "tables" / "learning-rate.csv")
    lora = [r for r in rows.values() if r["method"] == "lora" and "learning-rate" in r["experiments"]]
    assert sorted(float(t["learning_rate"]) for t in table if t["method"] == "lora") == [1e-4, 1e-3]
    for entry in (t for t in table if t["method"] == "lora"):
        stored = [r["unseen_rougeL"] for r in lora if r["learning_rate"] == float(entry["learning_rate"])]
        assert float(entry["unseen_rougeL"]) == pytest.approx(statistics.fmean(stored), abs=0.01)
    headline = read_csv(smoke / "tables" / "headline.csv")
    assert {h["method"] for h in headline} == {"LoRA r4", "IA3", "Full FT"}
    best_lora = max((r for r in rows.values() if r["method"] == "lora"), key=lambda r: r["validation_rougeL"])
    lora_line = next(h for h in headline if h["method"] == "LoRA r4")
    assert float(lora_line["validation_rougeL"]) == pytest.approx(best_lora["validation_rougeL"])
    assert "## The papers' findings, one by one" in report and "Only LoRA and adapters" in report
    losses = read_csv(smoke / "tables" / "losses.csv")
    assert len(losses) == 5 * 8


def test_status_reports_counts_and_no_eta_left(smoke, capsys):
    assert main(["study", "status", str(smoke), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"]["done"] == 5 and status["eta_s"] == 0 and not status["active"]
    assert main(["study", "status", str(smoke)]) == 0
    assert "done 5, unstable 0, running 0, failed 0, pending 0" in capsys.readouterr().out


def test_a_rerun_skips_the_finished_trials(smoke, tiny_dir, capsys):
    before = stored_trials(smoke)
    assert main(smoke_args(tiny_dir, smoke)) == 0
    assert "(5 already finished, 0 run this time)" in capsys.readouterr().out
    assert stored_trials(smoke) == before
    store = StudyStore.open(smoke)
    assert [run["outcome"] for run in store.runs()] == ["finished", "finished"]
    store.close()


def test_a_directory_holding_another_study_is_refused_unless_resume(tiny_dir, tmp_path, capsys):
    spec = tmp_path / "mine.toml"
    spec.write_text(SPEC)
    out = tmp_path / "study"
    assert main(["study", "run", str(spec), "--model", tiny_dir, "--out", str(out), *FAST]) == 0
    first = stored_trials(out)
    assert len(first) == 2
    bigger = ["--set", 'experiments=[{name = "lr", method = "lora", learning_rate = [1e-3, 1e-2, 3e-2]}]']
    assert main(["study", "run", str(spec), "--model", tiny_dir, "--out", str(out), *FAST, *bigger]) == 2
    assert "holds another study ('mine'; differs in experiments)" in capsys.readouterr().err
    assert main(["study", "run", str(spec), "--model", tiny_dir, "--out", str(out), *FAST, *bigger, "--resume"]) == 0
    after = stored_trials(out)
    assert len(after) == 3 and all(after[i] == row for i, row in first.items())
    assert [r["run"] for r in after.values() if r["id"] not in first] == [2]
    store = StudyStore.open(out)
    assert len(store.trials()) == 3 and store.connection.execute("SELECT COUNT(*) FROM history").fetchone()[0] == 1
    store.close()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["study", "run", str(spec), "--model", tiny_dir, "--out", str(tmp_path / "other"), *FAST]) == 2
    assert "is not empty and holds no flora study (notes.txt)" in capsys.readouterr().err


SPEC = """
name = "mine"
seeds = [0]
[data]
tasks = ["reverse_words"]
test_tasks = ["delete_word"]
train_instances = 8
validation_instances = 2
seen_instances = 2
unseen_instances = 2
[training]
max_steps = 3
batch_size = 2
[evaluation]
evaluations = 1
[[experiments]]
name = "lr"
method = "lora"
learning_rate = [1e-3, 1e-2]
"""


def test_a_superni_directory_and_an_unstable_trial(tiny_dir, tmp_path):
    data = write_sni_dir(tmp_path / "sni", ["reverse_words", "add_numbers"], ["delete_word"], instances=12)
    spec = tmp_path / "sni.toml"
    spec.write_text(SPEC.replace('tasks = ["reverse_words"]\ntest_tasks = ["delete_word"]\n', "")
                    .replace("learning_rate = [1e-3, 1e-2]", "learning_rate = [1e-3, 1e30]"))  # fmt: skip
    out = tmp_path / "study"
    assert main(["study", "run", str(spec), "--data", str(data), "--model", tiny_dir, "--out", str(out), *FAST]) == 0
    rows = sorted(stored_trials(out).values(), key=lambda r: r["learning_rate"])
    assert [r["status"] for r in rows] == ["done", "unstable"]
    assert "NaN or infinite" in rows[1]["error"] and rows[1]["scores"] is None
    scores = json.loads(rows[0]["scores"])
    assert set(scores["tasks"]) == {"reverse_words", "add_numbers", "delete_word"}
    assert scores["seen"]["n"] == 2 * 2 and scores["unseen"]["n"] == 2  # instances 8-9 validate, 10-11 seen
    assert "## Failed and unstable trials" in (out / "report.md").read_text()
