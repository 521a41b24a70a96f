"""``flora study run / status / report`` end to end on a tiny model: the store (trials, per-instance
scores, learning curves, the data split), the report (intervals, captions, the zero-shot row) and the
tables behind its figures, a rerun that skips finished trials, an output directory holding another
study, an older store resumed, a Super-NaturalInstructions directory as data, and an unstable (NaN) trial."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from flora.cli import main
from flora.study.plan import eval_steps
from flora.study.store import StudyStore
from study.support import FAST, smoke_args, stored_trials, write_sni_dir

FIGURES = ("learning-rate", "size", "num-tasks", "full-fine-tuning", "params", "learning_curves", "loss_curves")


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
    assert eval_steps(8, 8) == list(range(9)) and eval_steps(36, 8) == [0, 4, 9, 14, 18, 22, 27, 32, 36]
    assert len(rows) == 7 and {r["status"] for r in rows.values()} == {"done"}
    assert sorted(r["method"] for r in rows.values()) == ["full", "ia3", "lora", "lora", "lora", "lora", "zero_shot"]
    packs = {}
    for row in rows.values():
        packs.setdefault(row["pack"], []).append(row["method"])
        checkpoints = json.loads(row["checkpoints"])
        steps = eval_steps(8, 4) if row["method"] != "zero_shot" else [0]
        assert [c["step"] for c in checkpoints] == steps
        assert all(c["validation_loss"] > 0 and c["validation_tasks_loss"] > 0 for c in checkpoints)
        assert row["best_step"] == row["steps"] == (8 if row["method"] != "zero_shot" else 0)  # the final step
        scores = json.loads(row["scores"])
        assert scores["seen"]["n"] == 2 * row["num_tasks"] and scores["unseen"]["n"] == 2 * 2  # smoke: 2 instances
        assert scores["validation"]["n"] == 2 * row["num_tasks"] and scores["validation_tasks"]["n"] == 2
        assert row["seen_rougeL"] == scores["seen"]["rougeL"] and row["unseen_rougeL"] == scores["unseen"]["rougeL"]
        assert row["validation_rougeL"] == scores["validation"]["rougeL"]
        assert set(scores["tasks"]) >= {"compare_numbers", "delete_word"}
        assert len(json.loads(row["losses"])) == row["steps"] and row["wall_s"] > 0 and row["run"] == 1
    assert sorted(map(sorted, packs.values())) == [["full"], ["ia3", "lora", "lora", "lora", "lora"], ["zero_shot"]]
    full = next(r for r in rows.values() if r["method"] == "full")
    lora = [r for r in rows.values() if r["method"] == "lora"]
    assert full["trainable_params"] > 20 * max(r["trainable_params"] for r in lora)
    assert sorted(r["num_tasks"] for r in lora) == [2, 4, 4, 4]


def test_every_instance_score_and_curve_point_is_stored(smoke):
    connection = sqlite3.connect(smoke / "study.sqlite")
    try:
        items = dict(connection.execute("SELECT split, COUNT(*) FROM instances GROUP BY split").fetchall())
        assert items == {"validation": 8, "validation_tasks": 2, "seen": 8, "unseen": 4}  # 4 training tasks
        for trial_id, row in stored_trials(smoke).items():
            per_split = dict(connection.execute(
                "SELECT i.split, COUNT(*) FROM scores s JOIN instances i ON s.item = i.id WHERE s.trial = ? "
                "GROUP BY i.split", (trial_id,)).fetchall())  # fmt: skip
            tasks = row["num_tasks"]
            assert per_split == {"validation": 2 * tasks, "validation_tasks": 2, "seen": 2 * tasks, "unseen": 4}
            mean = connection.execute(
                "SELECT AVG(s.rougeL) FROM scores s JOIN instances i ON s.item = i.id WHERE s.trial = ? AND "
                "i.split = 'unseen'", (trial_id,)).fetchone()[0]  # fmt: skip
            assert mean == pytest.approx(row["unseen_rougeL"])
            points = connection.execute("SELECT COUNT(*), COUNT(DISTINCT step) FROM curves WHERE trial = ?",
                                        (trial_id,)).fetchone()  # fmt: skip
            steps = 5 if row["method"] != "zero_shot" else 1  # steps 0, 2, 4, 6, 8
            assert points == (steps * (2 * tasks + 2), steps)
    finally:
        connection.close()


def test_the_report_and_its_tables_hold_the_stored_numbers(smoke):
    report = (smoke / "report.md").read_text()
    for name in FIGURES:
        png = smoke / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{name}.png" in report
    assert report.count("*Figure ") == len(FIGURES) and "Metric: " in report and "step 8" in report
    rows = stored_trials(smoke)
    trials = {r["id"]: r for r in read_csv(smoke / "tables" / "trials.csv")}
    assert set(trials) == set(rows)
    for trial_id, row in rows.items():
        for column in ("validation_rougeL", "seen_rougeL", "unseen_rougeL", "seen_exact_match"):
            assert float(trials[trial_id][column]) == pytest.approx(row[column])
    table = read_csv(smoke / "tables" / "learning-rate.csv")
    lora = [r for r in rows.values() if r["method"] == "lora" and "learning-rate" in r["experiments"]]
    assert sorted(float(t["learning_rate"]) for t in table if t["method"] == "lora") == [1e-3, 1e-2]
    for entry in (t for t in table if t["method"] == "lora"):
        (stored,) = [r["unseen_rougeL"] for r in lora if r["learning_rate"] == float(entry["learning_rate"])]
        assert float(entry["unseen"]) == pytest.approx(stored)  # one seed: the macro mean = the micro mean here
        assert float(entry["unseen_low"]) <= float(entry["unseen"]) <= float(entry["unseen_high"])
    headline = read_csv(smoke / "tables" / "headline.csv")
    assert [h["series"] for h in headline][0] == "Zero-shot base model"
    assert {h["series"] for h in headline} >= {"LoRA r4", "IA3", "Full FT"} or {h["series"] for h in headline} >= {
        "LoRA r2", "IA3", "Full FT"}  # fmt: skip
    assert "| Zero-shot base model |" in report and "[" in report.split("| Zero-shot base model |")[1].split("\n")[0]
    split = read_csv(smoke / "tables" / "split.csv")
    assert sorted(r["role"] for r in split) == ["test", "test", "train", "train", "train", "train", "validation"]
    assert "## The papers' findings, one by one" in report and "   - rule: " in report and "## Closing note" in report
    assert "the model-size axis is untested" in report
    losses = read_csv(smoke / "tables" / "losses.csv")
    assert len(losses) == 6 * 8


def test_status_reports_counts_and_no_eta_left(smoke, capsys):
    assert main(["study", "status", str(smoke), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"]["done"] == 7 and status["eta_s"] == 0 and not status["active"]
    assert main(["study", "status", str(smoke)]) == 0
    assert "done 7, unstable 0, running 0, failed 0, pending 0" in capsys.readouterr().out


def test_a_rerun_skips_the_finished_trials(smoke, tiny_dir, capsys):
    before = stored_trials(smoke)
    assert main(smoke_args(tiny_dir, smoke)) == 0
    assert "(7 already finished, 0 run this time)" in capsys.readouterr().out
    assert stored_trials(smoke) == before
    store = StudyStore.open(smoke)
    assert [run["outcome"] for run in store.runs()] == ["finished", "finished"]
    store.close()


def test_a_trial_trained_again_sheds_its_last_finish(smoke, tmp_path):
    """A failed trial run again is running from its new start: no finish time or wall time of the
    failed attempt (the report's hours per run read them)."""
    out = tmp_path / "study"
    shutil.copytree(smoke, out)
    store = StudyStore.open(out)
    trial = next(iter(stored_trials(out)))
    first = store.begin_run("local")
    store.fail([trial], "Traceback ...\nRuntimeError: out of memory", first)
    second = store.begin_run("local")
    store.mark_running([trial], second, "p", 1)
    store.close()
    row = stored_trials(out)[trial]
    assert (row["status"], row["run"], row["finished"], row["wall_s"], row["error"]) == ("running", second, None,
                                                                                         None, None)  # fmt: skip


def test_a_directory_holding_another_study_is_refused_unless_resume(tiny_dir, tmp_path, capsys):
    spec = tmp_path / "mine.toml"
    spec.write_text(SPEC)
    out = tmp_path / "study"
    assert main(["study", "run", str(spec), "--model", tiny_dir, "--out", str(out), *FAST]) == 0
    first = stored_trials(out)
    assert len(first) == 3  # two learning rates and the zero-shot base model
    bigger = ["--set", 'experiments=[{name = "lr", method = "lora", learning_rate = [1e-3, 1e-2, 3e-2]}]']
    assert main(["study", "run", str(spec), "--model", tiny_dir, "--out", str(out), *FAST, *bigger]) == 2
    assert "holds another study ('mine'; differs in experiments)" in capsys.readouterr().err
    assert main(["study", "run", str(spec), "--model", tiny_dir, "--out", str(out), *FAST, *bigger, "--resume"]) == 0
    after = stored_trials(out)
    assert len(after) == 4 and all(after[i] == row for i, row in first.items())
    assert [r["run"] for r in after.values() if r["id"] not in first] == [2]
    store = StudyStore.open(out)
    assert len(store.trials()) == 4 and store.connection.execute("SELECT COUNT(*) FROM history").fetchone()[0] == 1
    store.close()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["study", "run", str(spec), "--model", tiny_dir, "--out", str(tmp_path / "other"), *FAST]) == 2
    assert "is not empty and holds no flora study (notes.txt)" in capsys.readouterr().err


SPEC = """
name = "mine"
seeds = [0]
[data]
tasks = ["reverse_words", "add_numbers"]
test_tasks = ["delete_word"]
validation_tasks = 1
validation_task_instances = 2
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
    data = write_sni_dir(tmp_path / "sni", ["reverse_words", "add_numbers", "count_words"], ["delete_word"],
                         instances=12)  # fmt: skip
    spec = tmp_path / "sni.toml"
    spec.write_text(SPEC.replace('tasks = ["reverse_words", "add_numbers"]\ntest_tasks = ["delete_word"]\n', "")
                    .replace("learning_rate = [1e-3, 1e-2]", "learning_rate = [1e-3, 1e30]"))  # fmt: skip
    out = tmp_path / "study"
    assert main(["study", "run", str(spec), "--data", str(data), "--model", tiny_dir, "--out", str(out), *FAST]) == 0
    rows = sorted((r for r in stored_trials(out).values() if r["method"] == "lora"), key=lambda r: r["learning_rate"])
    assert [r["status"] for r in rows] == ["done", "unstable"]
    assert "NaN or infinite" in rows[1]["error"] and rows[1]["scores"] is None
    scores = json.loads(rows[0]["scores"])
    assert len(set(scores["tasks"]) - {"delete_word"}) == 2 and "delete_word" in scores["tasks"]
    assert scores["seen"]["n"] == 2 * 2 and scores["unseen"]["n"] == 2  # instances 8-9 validate, 10-11 seen
    split = json.loads(sqlite3.connect(out / "study.sqlite").execute("SELECT split FROM study").fetchone()[0])
    (held,) = [t for t, e in split.items() if e["role"] == "validation"]  # one training-split task held out
    assert held not in scores["tasks"] and split[held]["splits"]["validation_tasks"]
    report = (out / "report.md").read_text()
    assert "## Failed and unstable trials" in report


def test_a_store_of_the_previous_design_resumes_into_the_new_one(tiny_dir, tmp_path):
    spec = tmp_path / "mine.toml"
    spec.write_text(SPEC)
    out = tmp_path / "study"
    out.mkdir()
    old = sqlite3.connect(out / "study.sqlite")  # the first schema: no split column, no score tables
    old.executescript(
        "CREATE TABLE study (id INTEGER PRIMARY KEY CHECK (id = 1), name TEXT NOT NULL, fingerprint TEXT NOT NULL, "
        "spec TEXT NOT NULL, plan TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, flora_version TEXT);"
        "INSERT INTO study VALUES (1, 'mine', 'old', '{\"name\": \"mine\"}', '[]', 0, 0, '0.1');"
    )
    old.commit()
    old.close()
    assert main(["study", "run", str(spec), "--model", tiny_dir, "--out", str(out), *FAST, "--resume"]) == 0
    store = StudyStore.open(out)
    assert len(store.trials()) == 3 and store.spec()["split"] and len(store.runs()) == 1
    store.close()
