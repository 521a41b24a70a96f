"""The study store: one SQLite file (``<study dir>/study.sqlite``) holding the spec and one row per trial.

Why SQLite: it is in the standard library, one file to keep or commit, readable from any tool
(``sqlite3``, pandas), and transactional: every change is one transaction in WAL mode, so a
process killed at any moment leaves the rows as they were before or after a change, never half
written. Only the driver process writes (Ray workers return their results to it).

Tables:

- ``study`` (one row): name, the resolved spec (JSON) and its fingerprint (`StudySpec.fingerprint`),
  the ids of the trials the spec plans, creation / update times, flora version.
- ``history``: specs the study had before a ``--resume`` with a changed spec replaced them.
- ``runs``: one row per ``flora study run``: backend, host, pid, start / end, how it ended.
- ``trials``: one row per trial: id, experiments, grid point (method, learning_rate, size,
  num_tasks, model, seed), config (JSON), status (``pending``, ``running``, ``done``, ``unstable``,
  ``failed``), run and pack that produced it, times (``wall_s`` is the pack's wall time,
  SIGSTOP pauses included), progress (``step``/``steps``, heartbeat), trainable parameters,
  examples, steps, the step its scores are from (``best_step``: the final step), checkpoints
  (JSON, one per measured step: step, mean training loss since the previous one, mean validation
  loss of each validation split), losses (JSON, one per step), scores (JSON: overall, seen,
  unseen, categories, adapters, tasks; validation, validation_tasks; ROUGE-L and exact match), the
  headline scores as columns (micro means: ``validation_rougeL``, ``seen_rougeL``,
  ``seen_exact_match``, ``unseen_rougeL``, ``unseen_exact_match``, ``overall_*``) and the error.
- ``instances``: every evaluation instance of the study's data split (`flora.study.data.SPLITS`):
  an integer id, its split, task and instance id; the study row's ``split`` holds the whole
  split (JSON, `flora.study.data.StudyData.split_record`: each task's role, category, metric).
- ``scores``: per trial and instance, ROUGE-L, exact match and the prediction (what every
  interval of the report is computed from).
- ``curves``: per trial, validation instance and measured step, the teacher-forced loss on the
  instance's response tokens (NULL: not finite) and their number (the learning curves).

What a directory may hold (`open_for_run`): nothing (a new study), this study (same fingerprint:
the run continues it: ``done`` and ``unstable`` trials are kept, ``pending``, ``failed`` and
``running`` ones (interrupted) are trained again from the start), or another study: refused,
unless ``resume``: then the new spec replaces the stored one (kept in ``history``), trials of the
new plan that are already done are kept, and stored trials outside the new plan stay in the file
but leave status and report. A directory holding anything else is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flora.study.execute import TrialOutcome
    from flora.study.plan import Trial
    from flora.study.spec import StudySpec

STORE_FILE = "study.sqlite"
LOCK_FILE = ".study.lock"
FINISHED = ("done", "unstable")
STATUSES = ("pending", "running", "done", "unstable", "failed")
JSON_COLUMNS = ("experiments", "config", "progress", "checkpoints", "losses", "scores")
HEADLINE = {"seen_rougeL": ("seen", "rougeL"), "seen_exact_match": ("seen", "exact_match"),
            "unseen_rougeL": ("unseen", "rougeL"), "unseen_exact_match": ("unseen", "exact_match"),
            "overall_rougeL": ("overall", "rougeL"), "overall_exact_match": ("overall", "exact_match")}  # fmt: skip

_SCHEMA = """
CREATE TABLE IF NOT EXISTS study (
    id INTEGER PRIMARY KEY CHECK (id = 1), name TEXT NOT NULL, fingerprint TEXT NOT NULL, spec TEXT NOT NULL,
    plan TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, flora_version TEXT, split TEXT);
CREATE TABLE IF NOT EXISTS history (changed REAL NOT NULL, fingerprint TEXT NOT NULL, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL NOT NULL, finished REAL, backend TEXT, host TEXT, pid INTEGER,
    argv TEXT, outcome TEXT);
CREATE TABLE IF NOT EXISTS trials (
    id TEXT PRIMARY KEY, experiments TEXT NOT NULL, method TEXT NOT NULL, learning_rate REAL NOT NULL, size INTEGER,
    num_tasks INTEGER NOT NULL, model TEXT NOT NULL, seed INTEGER NOT NULL, config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', run INTEGER, pack TEXT, pack_size INTEGER, started REAL, finished REAL,
    wall_s REAL, progress TEXT, heartbeat REAL, trainable_params INTEGER, examples INTEGER, steps INTEGER,
    best_step INTEGER, checkpoints TEXT, losses TEXT, scores TEXT, validation_rougeL REAL, seen_rougeL REAL,
    seen_exact_match REAL, unseen_rougeL REAL, unseen_exact_match REAL, overall_rougeL REAL,
    overall_exact_match REAL, error TEXT);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY, split TEXT NOT NULL, task TEXT NOT NULL, instance TEXT NOT NULL,
    UNIQUE (split, task, instance));
CREATE TABLE IF NOT EXISTS scores (
    trial TEXT NOT NULL, item INTEGER NOT NULL REFERENCES instances (id), rougeL REAL NOT NULL,
    exact_match REAL NOT NULL, prediction TEXT NOT NULL, PRIMARY KEY (trial, item)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS curves (
    trial TEXT NOT NULL, item INTEGER NOT NULL REFERENCES instances (id), step INTEGER NOT NULL, loss REAL,
    tokens INTEGER NOT NULL, PRIMARY KEY (trial, item, step)) WITHOUT ROWID;
"""
# Columns added since the first stores: (table, column, type). Opening an older store adds them.
_ADDED_COLUMNS = (("study", "split", "TEXT"),)


class StudyStore:
    """A study directory's store (see the module docstring). Use `open_for_run` to run, `open` to read."""

    def __init__(self, directory: Path, connection: sqlite3.Connection) -> None:
        self.directory = directory
        self.connection = connection

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | os.PathLike) -> StudyStore:
        """An existing study (to read its status or write its report)."""
        directory = Path(directory)
        path = directory / STORE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{str(directory)!r} holds no flora study (no {STORE_FILE}; "
                                    f"start one with `flora study run SPEC --out {directory}`)")  # fmt: skip
        return cls(directory, _connect(path))

    @classmethod
    def open_for_run(cls, directory: str | os.PathLike, spec: StudySpec, plan: Sequence[Trial],
                     resume: bool = False, split: dict[str, Any] | None = None) -> StudyStore:  # fmt: skip
        """The store of ``directory`` ready to run ``spec`` (new, continued, or replaced with ``resume``);
        ``split``: the data split (`flora.study.data.StudyData.split_record`) the trials are scored on."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"--out {str(directory)!r} is a file (expected a directory)")
        path = directory / STORE_FILE
        if not path.is_file():
            entries = [p.name for p in directory.iterdir() if p.name != LOCK_FILE] if directory.is_dir() else []
            if entries:
                raise ValueError(f"--out {str(directory)!r} is not empty and holds no flora study "
                                 f"({', '.join(sorted(entries)[:5])}); choose another directory")  # fmt: skip
            directory.mkdir(parents=True, exist_ok=True)
            store = cls(directory, _connect(path))
            store._create(spec, plan, split or {})
            return store
        store = cls(directory, _connect(path))
        stored = store.spec()
        if stored.get("fingerprint") != spec.fingerprint():
            if not resume:
                differences = _differences(json.loads(store._study()["spec"]), spec.to_dict())
                store.close()
                raise ValueError(f"--out {str(directory)!r} holds another study ({stored['name']!r}; differs in "
                                 f"{differences}); choose another directory, or pass --resume to continue it with "
                                 f"this spec (its finished trials that the new spec keeps are reused)")  # fmt: skip
            store._replace_spec(spec, plan, split or {})
        else:
            store._update_plan(spec, plan, split or {})
        return store

    def _create(self, spec: StudySpec, plan: Sequence[Trial], split: dict[str, Any]) -> None:
        from flora import __version__

        now = time.time()
        with self.connection:
            self.connection.execute(
                "INSERT INTO study (id, name, fingerprint, spec, plan, created, updated, flora_version, split) "
                "VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)",
                (spec.name, spec.fingerprint(), _dumps(spec.to_dict()), _dumps([t.id for t in plan]), now, now,
                 __version__, _dumps(split)),
            )  # fmt: skip
            self._register(plan, split)

    def _replace_spec(self, spec: StudySpec, plan: Sequence[Trial], split: dict[str, Any]) -> None:
        old = self._study()
        with self.connection:
            self.connection.execute("INSERT INTO history (changed, fingerprint, spec) VALUES (?, ?, ?)",
                                    (time.time(), old["fingerprint"], old["spec"]))  # fmt: skip
            self.connection.execute(
                "UPDATE study SET name = ?, fingerprint = ?, spec = ?, plan = ?, updated = ?, split = ?",
                (spec.name, spec.fingerprint(), _dumps(spec.to_dict()), _dumps([t.id for t in plan]), time.time(),
                 _dumps(split)),
            )  # fmt: skip
            self._register(plan, split)

    def _update_plan(self, spec: StudySpec, plan: Sequence[Trial], split: dict[str, Any]) -> None:
        with self.connection:  # run settings (packing, resources) may change between runs of one study
            self.connection.execute("UPDATE study SET spec = ?, updated = ?, split = ?",
                                    (_dumps(spec.to_dict()), time.time(), _dumps(split)))  # fmt: skip
            self._register(plan, split)

    def _register(self, plan: Sequence[Trial], split: dict[str, Any]) -> None:
        self.connection.executemany(
            "INSERT OR IGNORE INTO instances (split, task, instance) VALUES (?, ?, ?)",
            [(name, task, instance) for task, entry in split.items() for name, ids in entry["splits"].items()
             for instance in ids],
        )  # fmt: skip
        for trial in plan:
            self.connection.execute(
                "INSERT INTO trials (id, experiments, method, learning_rate, size, num_tasks, model, seed, config) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET experiments = excluded.experiments",
                (trial.id, _dumps(list(trial.experiments)), trial.method, trial.learning_rate, trial.size,
                 trial.num_tasks, trial.model, trial.seed, _dumps(trial.config)),
            )  # fmt: skip

    def close(self) -> None:
        """Close the file (the WAL folded back into it, so the one file holds everything)."""
        with contextlib.suppress(sqlite3.Error):
            self.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.connection.close()

    # -- reading ---------------------------------------------------------------------------------

    def _study(self) -> sqlite3.Row:
        row = self.connection.execute("SELECT * FROM study WHERE id = 1").fetchone()
        if row is None:
            raise ValueError(f"{self.directory / STORE_FILE}: no study row (not a flora study store?)")
        return row

    def spec(self) -> dict[str, Any]:
        """``{"name", "fingerprint", "spec" (dict), "plan" (trial ids), "created", "updated", "flora_version",
        "split" (dict: the data split; empty for stores older than it)}``."""
        row = dict(self._study())
        row["spec"], row["plan"] = json.loads(row["spec"]), json.loads(row["plan"])
        row["split"] = json.loads(row["split"]) if row.get("split") else {}
        return row

    def trials(self, in_plan: bool = True) -> list[dict[str, Any]]:
        """Trial rows (JSON columns decoded), in plan order; ``in_plan``: only the current spec's."""
        rows = {row["id"]: _decode(row) for row in self.connection.execute("SELECT * FROM trials")}
        plan = self.spec()["plan"]
        ordered = [rows[i] for i in plan if i in rows]
        return ordered if in_plan else ordered + [r for i, r in rows.items() if i not in set(plan)]

    def instance_scores(self, trials: Iterable[str]) -> list[dict[str, Any]]:
        """Per instance scores of ``trials``: ``{"trial", "split", "task", "instance", "rougeL",
        "exact_match", "prediction"}``."""
        return self._per_item(
            "SELECT s.trial, i.split, i.task, i.instance, s.rougeL, s.exact_match, s.prediction "
            "FROM scores s JOIN instances i ON s.item = i.id WHERE s.trial IN ({})",
            trials,
        )

    def curves(self, trials: Iterable[str]) -> list[dict[str, Any]]:
        """Learning-curve points of ``trials``: ``{"trial", "split", "task", "instance", "step", "loss", "tokens"}``."""
        return self._per_item(
            "SELECT c.trial, i.split, i.task, i.instance, c.step, c.loss, c.tokens "
            "FROM curves c JOIN instances i ON c.item = i.id WHERE c.trial IN ({})",
            trials,
        )

    def _per_item(self, query: str, trials: Iterable[str]) -> list[dict[str, Any]]:
        ids = list(trials)
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            chunk = ids[start : start + 500]
            rows += [dict(r) for r in self.connection.execute(query.format(",".join("?" * len(chunk))), chunk)]
        return rows

    def statuses(self) -> dict[str, str]:
        return {row["id"]: row["status"] for row in self.connection.execute("SELECT id, status FROM trials")}

    def runs(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self.connection.execute("SELECT * FROM runs ORDER BY id")]

    # -- writing (the driver process) ------------------------------------------------------------

    def begin_run(self, backend: str) -> int:
        with self.connection:
            cursor = self.connection.execute(
                "INSERT INTO runs (started, backend, host, pid, argv) VALUES (?, ?, ?, ?, ?)",
                (time.time(), backend, socket.gethostname(), os.getpid(), _dumps(sys.argv)),
            )
        return int(cursor.lastrowid)

    def end_run(self, run: int, outcome: str) -> None:
        with self.connection:
            self.connection.execute(
                "UPDATE runs SET finished = ?, outcome = ? WHERE id = ?", (time.time(), outcome, run)
            )

    def mark_running(self, ids: Iterable[str], run: int, pack: str, pack_size: int) -> None:
        now = time.time()
        with self.connection:
            self.connection.executemany(
                "UPDATE trials SET status = 'running', run = ?, pack = ?, pack_size = ?, started = ?, heartbeat = ?, "
                "progress = NULL, error = NULL, finished = NULL, wall_s = NULL WHERE id = ?",
                [(run, pack, pack_size, now, now, i) for i in ids],
            )  # fmt: skip

    def heartbeat(self, ids: Iterable[str], step: int, steps: int) -> None:
        with self.connection:
            progress = _dumps({"step": step, "steps": steps})
            self.connection.executemany("UPDATE trials SET progress = ?, heartbeat = ? WHERE id = ?",
                                        [(progress, time.time(), i) for i in ids])  # fmt: skip

    def finish(self, outcomes: Sequence[TrialOutcome], run: int) -> None:
        """Write the results of a pack, all in one transaction."""
        now = time.time()
        with self.connection:
            for o in outcomes:
                scores = _dumps(o.scores) if o.scores is not None else None
                headline = {column: ((o.scores or {}).get(part) or {}).get(metric)
                            for column, (part, metric) in HEADLINE.items()}  # fmt: skip
                validation = ((o.scores or {}).get("validation") or {}).get("rougeL")
                self._write_items(o)
                self.connection.execute(
                    "UPDATE trials SET status = ?, run = ?, pack = ?, pack_size = ?, finished = ?, wall_s = ?, "
                    "heartbeat = ?, trainable_params = ?, examples = ?, steps = ?, best_step = ?, checkpoints = ?, "
                    "losses = ?, scores = ?, validation_rougeL = ?, seen_rougeL = ?, seen_exact_match = ?, "
                    "unseen_rougeL = ?, unseen_exact_match = ?, overall_rougeL = ?, overall_exact_match = ?, "
                    "error = ? WHERE id = ?",
                    (o.status, run, o.pack, o.pack_size, now, o.wall_s, now, o.trainable_params, o.examples, o.steps,
                     o.best_step, _dumps(o.checkpoints), _dumps(o.losses), scores, validation,
                     *headline.values(), o.error, o.id),
                )  # fmt: skip

    def _write_items(self, outcome: TrialOutcome) -> None:
        """A trial's instance scores and curve, replacing any it had (a trial trained again)."""
        items = {(r["split"], r["task"], r["instance"]): r["id"] for r in
                 self.connection.execute("SELECT id, split, task, instance FROM instances")}  # fmt: skip
        for table in ("scores", "curves"):
            self.connection.execute(f"DELETE FROM {table} WHERE trial = ?", (outcome.id,))

        def item(row: dict[str, Any]) -> int:
            key = (row["split"], row["task"], row["instance"])
            if key not in items:
                raise ValueError(f"trial {outcome.id}: instance {row['instance']!r} of task {row['task']!r} is not "
                                 f"in the study's {row['split']!r} split")  # fmt: skip
            return items[key]

        self.connection.executemany(
            "INSERT INTO scores (trial, item, rougeL, exact_match, prediction) VALUES (?, ?, ?, ?, ?)",
            [(outcome.id, item(r), r["rougeL"], r["exact_match"], r["prediction"]) for r in outcome.instances],
        )  # fmt: skip
        self.connection.executemany(
            "INSERT INTO curves (trial, item, step, loss, tokens) VALUES (?, ?, ?, ?, ?)",
            [(outcome.id, item(r), r["step"], r["loss"], r["tokens"]) for r in outcome.curve],
        )  # fmt: skip

    def fail(self, ids: Iterable[str], error: str, run: int) -> None:
        with self.connection:
            self.connection.executemany("UPDATE trials SET status = 'failed', run = ?, finished = ?, error = ? "
                                        "WHERE id = ?", [(run, time.time(), error, i) for i in ids])  # fmt: skip


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Held while a ``flora study run`` writes to ``directory``; a second run is refused."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_FILE, "a+")  # noqa: SIM115  (held for the block)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ValueError(f"another `flora study run` ({holder}) is writing to {str(directory)!r}; wait for it "
                             f"or stop it first") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
        (directory / LOCK_FILE).unlink(missing_ok=True)  # nothing left behind in a finished study directory
    finally:
        handle.close()


def run_active(directory: str | os.PathLike) -> bool:
    """Whether a ``flora study run`` holds ``directory``'s lock now."""
    path = Path(directory) / LOCK_FILE
    if not path.is_file():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=30)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.executescript(_SCHEMA)
    for table, column, kind in _ADDED_COLUMNS:
        if column not in {row["name"] for row in connection.execute(f"PRAGMA table_info({table})")}:
            with connection:
                connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    return connection


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False, default=str)


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    for column in JSON_COLUMNS:
        if data.get(column) is not None:
            data[column] = json.loads(data[column])
    return data


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if k not in ("run", "report", "description", "profile", "source")
            and old.get(k) != new.get(k)]  # fmt: skip
    return ", ".join(keys) or "settings"
