"""Schemathesis over the server's OpenAPI schema: requests generated for every operation, valid and
invalid, sent over real HTTP (its command line, as a user runs it), and none answered with a 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def test_no_generated_request_gets_a_server_error(server, tmp_path):
    run = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "25", "--seed", "7", "--request-timeout", "60", "--workers", "1", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,  # it writes a cache where it runs
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or "passed" in run.stdout, run.stdout[-3000:]
