"""A study killed with SIGKILL in the middle of a trial and run again: the trials finished before
the kill are not trained again, the interrupted ones continue from their pack's latest checkpoint,
and the final store equals that of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from flora.cli import main
from study.support import smoke_args, stored_results, stored_trials


def poll(out: Path) -> list[tuple[str, str | None]]:
    path = out / "study.sqlite"
    if not path.is_file():
        return []
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return connection.execute("SELECT status, progress FROM trials").fetchall()
        finally:
            connection.close()
    except sqlite3.Error:
        return []


def step(progress: str) -> int:
    return json.loads(progress)["step"]


def test_a_killed_study_resumes_to_the_same_store(tiny_dir, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    command = [sys.executable, "-m", "flora", *smoke_args(tiny_dir, killed)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once a pack is done and the next one is past its first checkpoint
            rows = poll(killed)
            if any(s == "done" for s, _ in rows) and any(s == "running" and p and step(p) > 2 for s, p in rows):
                break
            assert process.poll() is None, "the study finished before it could be killed"
            time.sleep(0.02)
        else:
            raise AssertionError("no trial was ever seen training")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    before = stored_trials(killed)
    done_before = {i for i, r in before.items() if r["status"] == "done"}
    running = {i for i, r in before.items() if r["status"] == "running"}
    assert done_before and running and {r["status"] for r in before.values()} <= {"done", "running", "pending"}
    (pack,) = {before[i]["pack"] for i in running}
    assert [p.name for p in (killed / ".work" / pack).glob("checkpoint-*")]  # what the rerun continues from

    assert main(smoke_args(tiny_dir, killed)) == 0
    after = stored_trials(killed)
    for trial_id in done_before:  # not trained again
        assert after[trial_id] == before[trial_id]
    assert {after[i]["run"] for i in running} == {2}
    assert {r["status"] for r in after.values()} == {"done"}

    assert main(smoke_args(tiny_dir, whole)) == 0
    assert stored_results(killed) == stored_results(whole)
