"""Helpers of the study tests: fast study settings, the smoke command line, reading a store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from flora.data import build_suite, write_sni_task

# Settings that make a smoke study on the tiny model take seconds: float64 (no near-ties in greedy
# decoding), one pinned strategy, a short generation budget (a random model never stops by itself).
FAST = ["--set", "model.dtype=float64", "--set", "model.strategy=bmm", "--set", "evaluation.max_new_tokens=3",
        "--no-progress"]  # fmt: skip


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


def write_sni_dir(directory: Path, train: list[str], test: list[str], instances: int = 20) -> Path:
    """A Super-NaturalInstructions directory (``tasks/*.json``, ``splits/``) made from suite tasks."""
    suite = build_suite(0, n_train=instances, n_heldout=0, tasks=train + test)
    for task in suite.train:
        write_sni_task(task, directory / "tasks" / f"{task.name}.json")
    (directory / "splits").mkdir(parents=True, exist_ok=True)
    (directory / "splits" / "train_tasks.txt").write_text("\n".join(train) + "\n")
    (directory / "splits" / "test_tasks.txt").write_text("\n".join(test) + "\n")
    return directory
