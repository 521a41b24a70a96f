"""``flora study status``: how far a study is: trials done, running, failed, pending, and an ETA.

A ``running`` trial whose study directory no ``flora study run`` holds (its process was killed)
is shown as interrupted: the next run trains it again. The ETA is the number of trials left times
the mean cost of a finished trial (its pack's wall time divided by the pack's size).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flora.study.store import STATUSES, StudyStore, run_active


def study_status(directory: str | Path) -> dict[str, Any]:
    """The status of the study in ``directory`` as data (what ``flora study status --json`` prints)."""
    store = StudyStore.open(directory)
    try:
        study, trials, runs = store.spec(), store.trials(), store.runs()
    finally:
        store.connection.close()
    active = run_active(directory)
    counts = dict.fromkeys(STATUSES, 0)
    for trial in trials:
        counts[trial["status"]] += 1
    finished = [t for t in trials if t["status"] in ("done", "unstable") and t["wall_s"]]
    cost = sum(t["wall_s"] / max(t["pack_size"] or 1, 1) for t in finished) / len(finished) if finished else None
    left = counts["pending"] + counts["running"] + counts["failed"]
    now = time.time()
    running = [{"id": t["id"], **_point(t), "pack": t["pack"], "progress": t["progress"],
                "heartbeat_age_s": round(now - t["heartbeat"], 1) if t["heartbeat"] else None,
                "interrupted": not active} for t in trials if t["status"] == "running"]  # fmt: skip
    failed = [{"id": t["id"], **_point(t), "error": (t["error"] or "").strip().splitlines()[-1:]}
              for t in trials if t["status"] == "failed"]  # fmt: skip
    unstable = [{"id": t["id"], **_point(t), "error": t["error"]} for t in trials if t["status"] == "unstable"]
    return {
        "name": study["name"], "profile": study["spec"].get("profile"), "directory": str(directory),
        "trials": len(trials), "counts": counts, "active": active, "running": running, "failed": failed,
        "unstable": unstable, "trial_cost_s": round(cost, 1) if cost else None,
        "eta_s": round(cost * left) if cost is not None and left else (0 if not left else None),
        "runs": len(runs), "last_run": runs[-1] if runs else None,
    }  # fmt: skip


def _point(trial: dict[str, Any]) -> dict[str, Any]:
    return {k: trial[k] for k in ("method", "learning_rate", "size", "num_tasks", "seed")}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown (no trial finished yet)"
    minutes, s = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{s:02d}s"


def format_status(status: dict[str, Any]) -> str:
    """The status as text."""
    c = status["counts"]
    lines = [
        f"study {status['name']!r} (profile {status['profile']}) in {status['directory']}: {status['trials']} trials",
        f"  done {c['done']}, unstable {c['unstable']}, running {c['running']}, failed {c['failed']}, "
        f"pending {c['pending']}",
        f"  a run is {'active' if status['active'] else 'not active'}; "
        f"ETA {_duration(status['eta_s']) if c['done'] + c['unstable'] < status['trials'] else 'done'}"
        + (f" (mean cost of a trial {_duration(status['trial_cost_s'])})" if status["trial_cost_s"] else ""),
    ]  # fmt: skip
    for trial in status["running"]:
        progress = trial["progress"] or {}
        where = f"step {progress.get('step')}/{progress.get('steps')}" if progress else "starting"
        state = "interrupted (no run holds the study; the next run trains it again)" if trial["interrupted"] else where
        lines.append(f"  running {trial['id']} {_describe(trial)}: {state}")
    for trial in status["failed"]:
        lines.append(f"  failed  {trial['id']} {_describe(trial)}: {' '.join(trial['error'])}")
    for trial in status["unstable"]:
        lines.append(f"  unstable {trial['id']} {_describe(trial)}: {trial['error']}")
    return "\n".join(lines)


def _describe(trial: dict[str, Any]) -> str:
    size = f" size {trial['size']}" if trial["size"] is not None else ""
    return f"{trial['method']} lr {trial['learning_rate']:g}{size} tasks {trial['num_tasks']} seed {trial['seed']}"
