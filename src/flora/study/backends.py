"""Where packs run: in this process (``local``) or as Ray tasks on a Ray cluster (``ray``).

A backend takes the packs to run (`flora.study.execute.PackJob`) and three callbacks of the driver:
``started(job)`` when a pack is handed out, ``on_step(trial_ids, step, steps, losses)`` while it
trains (local only), and ``finished(job, outcomes or exception)`` when it is done. Only the driver
writes the study store; Ray workers return their `TrialOutcome` s to it.

Ray: every pack is a ``ray.remote`` task with ``run.num_cpus`` / ``run.num_gpus``
(``[run]`` in the spec), scheduled by Ray on the cluster at ``address`` (``ray.init(address=...)``;
None: the Ray instance this process already joined, else a new local one). Workers need flora,
the model and the data at the same paths as the driver.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from flora.study.execute import PackJob, TrialOutcome, run_pack

BACKENDS = ("local", "ray")
Started = Callable[[PackJob], None]
Finished = Callable[[PackJob, "list[TrialOutcome] | BaseException"], None]


def describe_error(error: BaseException) -> str:
    """The error's type, message and the end of its traceback (what a failed trial stores)."""
    text = "".join(traceback.format_exception(error)).strip()
    return text[-4000:]


class LocalBackend:
    """Runs the packs one after the other in this process (generation progress bars on a terminal only)."""

    name = "local"

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress

    def run(self, jobs: Sequence[PackJob], started: Started, on_step, finished: Finished) -> None:
        for job in jobs:
            started(job)
            try:
                outcomes = run_pack(job, on_step=on_step, progress=self.progress and sys.stderr.isatty())
            except Exception as err:  # a failed pack is a result; the study goes on
                finished(job, err)
            else:
                finished(job, outcomes)


def _run_remote(job: PackJob) -> list[TrialOutcome]:
    return run_pack(job)


class RayBackend:
    """Runs every pack as a Ray task with ``num_cpus`` / ``num_gpus``; results come back to the driver."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 init: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.init = dict(init or {})

    def run(self, jobs: Sequence[PackJob], started: Started, on_step, finished: Finished) -> None:
        try:
            import ray
        except ImportError:
            raise ValueError("--backend ray needs Ray: pip install 'flora[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=True, **self.init)
        task = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)(_run_remote)
        pending = {}
        for job in jobs:
            started(job)
            pending[task.remote(job)] = job
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                outcomes = ray.get(done[0])
            except Exception as err:
                finished(job, err)
            else:
                finished(job, outcomes)
