"""Helpers of the study tests: fast study settings, the smoke command line, reading a store, and
synthetic study stores (scores made up, written through the store's API: no model, no training)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from flora.data import build_suite, write_sni_task
from flora.study import load_spec
from flora.study.data import SPLITS, VALIDATION_SPLITS, load_study_data
from flora.study.execute import TrialOutcome
from flora.study.plan import Trial, plan_trials
from flora.study.store import StudyStore

# Settings that make a smoke study on the tiny model take seconds: float64 (no near-ties in greedy
# decoding), one pinned strategy, a short generation budget (a random model never stops by itself),
# the validation loss at 4 points (and step 0).
FAST = ["--set", "model.dtype=float64", "--set", "model.strategy=bmm", "--set", "evaluation.max_new_tokens=3",
        "--set", "evaluation.evaluations=4", "--no-progress"]  # fmt: skip


def smoke_args(tiny_dir: str, out: Path, *extra: str) -> list[str]:
    """``flora study run peft-instruction --profile smoke`` on the tiny model into ``out``."""
    return ["study", "run", "peft-instruction", "--profile", "smoke", "--model", tiny_dir, "--out", str(out),
            *FAST, *extra]  # fmt: skip


def stored_trials(out: Path) -> dict[str, dict]:
    """The trial rows of a study store, by id (read with plain sqlite3)."""
    connection = sqlite3.connect(out / "study.sqlite")
    connection.row_factory = sqlite3.Row
    try:
        return {row["id"]: dict(row) for row in connection.execute("SELECT * FROM trials")}
    finally:
        connection.close()


# Columns that say when and by which run a trial was trained, not what it produced.
WHEN = ("run", "started", "finished", "wall_s", "heartbeat", "progress")


def stored_results(out: Path) -> dict[str, dict]:
    """Each trial's row (without when and by which run), per-instance scores and learning curve."""
    connection = sqlite3.connect(out / "study.sqlite")
    try:
        cursor = connection.execute("SELECT id, split, task, instance FROM instances")
        items = {row[0]: tuple(row[1:]) for row in cursor}
        scores = connection.execute("SELECT trial, item, rougeL, exact_match, prediction FROM scores").fetchall()
        curves = connection.execute("SELECT trial, item, step, loss, tokens FROM curves").fetchall()
    finally:
        connection.close()
    rows = {i: {k: v for k, v in row.items() if k not in WHEN} for i, row in stored_trials(out).items()}
    for trial, item, *values in scores:
        rows[trial].setdefault("instances", {})[items[item]] = tuple(values)
    for trial, item, step, *values in curves:
        rows[trial].setdefault("curve", {})[(*items[item], step)] = tuple(values)
    return rows


def write_sni_dir(directory: Path, train: list[str], test: list[str], instances: int = 20) -> Path:
    """A Super-NaturalInstructions directory (``tasks/*.json``, ``splits/``) made from suite tasks."""
    suite = build_suite(0, n_train=instances, n_heldout=0, tasks=train + test)
    for task in suite.train:
        write_sni_task(task, directory / "tasks" / f"{task.name}.json")
    (directory / "splits").mkdir(parents=True, exist_ok=True)
    (directory / "splits" / "train_tasks.txt").write_text("\n".join(train) + "\n")
    (directory / "splits" / "test_tasks.txt").write_text("\n".join(test) + "\n")
    return directory


def synthetic_study(directory: Path, spec_text: str, score: Callable[[Trial, str, str, int], float],
                    curve: Callable[[Trial, int], float] | None = None,
                    diverged: Callable[[Trial], bool] = lambda t: False) -> Path:  # fmt: skip
    """A study store written through the store's own API, without training: every trial of the spec
    in ``spec_text`` (suite data) is finished, its instance scores ``score(trial, split, task, i)``
    (i: the instance's index in its task's split; both ROUGE-L and exact match) and, with ``curve``,
    its validation loss ``curve(trial, step)`` at steps 0, 4, 8 on every validation instance. A
    trial for which ``diverged(trial)`` holds is stored as unstable, with no scores."""
    spec_file = directory / "spec.toml"
    directory.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(spec_text)
    spec = load_spec(str(spec_file))
    data = load_study_data(spec.data)
    trials = plan_trials(spec, data)
    out = directory / "study"
    store = StudyStore.open_for_run(out, spec, trials, split=data.split_record())
    run = store.begin_run("local")
    outcomes = []
    for trial in trials:
        unstable = diverged(trial)
        instances = [] if unstable else [
            {"split": split, "task": task, "instance": sample.id, "rougeL": value, "exact_match": value,
             "prediction": ""}
            for split in SPLITS for task, samples in data.splits[split].items()
            if task in {s.task for s in data.samples(split, trial.num_tasks)}
            for i, sample in enumerate(samples) for value in [score(trial, split, task, i)]
        ]  # fmt: skip
        points = [] if curve is None else [
            {"split": split, "task": sample.task, "instance": sample.id, "step": step, "loss": curve(trial, step),
             "tokens": 3}
            for split in VALIDATION_SPLITS for sample in data.samples(split, trial.num_tasks) for step in (0, 4, 8)
        ]  # fmt: skip
        outcomes.append(TrialOutcome(
            id=trial.id, status="unstable" if unstable else "done", pack="p", pack_size=1, wall_s=1.0,
            trainable_params=0 if trial.zero_shot else 100 * (trial.size or 1), examples=8, steps=8,
            best_step=None if unstable else 8, checkpoints=[], losses=[1.0] * 8, scores=None,
            error="the loss became NaN" if unstable else None, instances=instances, curve=points,
        ))  # fmt: skip
    store.finish(outcomes, run)
    store.end_run(run, "finished")
    store.close()
    return out
