"""``flora study run``: plan a study, open its store, run the unfinished packs, write the report.

Order: the spec is validated and the data checked (`flora.study.data`) and every trial planned and
checked as a training job before anything is written; then the study directory is locked (one run
at a time), its store opened (`flora.study.store.StudyStore.open_for_run`: new, continued, or
refused), and the packs holding unfinished trials run on the backend, each pack's results written
in one transaction as it finishes. A pack that raises marks its trials ``failed`` (with the error)
and the study goes on; a rerun trains them again. A pack interrupted with the run (killed, a session
ended) keeps its checkpoints in ``.work/<pack id>/`` and ``--resume`` continues it from the latest
(`flora.study.execute`); a pack's directory goes once its outcome is stored, ``.work`` once every
pack ran, and a run without ``--resume`` starts without it. At the end the report is written
(`flora.study.report`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from flora.study.backends import LocalBackend, RayBackend, describe_error
from flora.study.data import load_study_data
from flora.study.execute import PackJob
from flora.study.plan import plan_packs, plan_trials
from flora.study.progress import StudyProgress
from flora.study.spec import StudySpec
from flora.study.store import FINISHED, StudyStore, run_lock

WORK_DIR = ".work"  # the packs' checkpoints inside the study directory (kept while a pack is unfinished)


@dataclass
class RunSummary:
    """What one ``flora study run`` did."""

    directory: Path
    trials: int
    skipped: int
    ran: int
    failed: int
    statuses: dict[str, int]
    report: Path | None


def run_study(
    spec: StudySpec,
    out: str | Path,
    *,
    backend: str = "local",
    address: str | None = None,
    resume: bool = False,
    progress: bool = True,
    report: bool = True,
) -> RunSummary:
    """Run ``spec`` into the study directory ``out`` (see the module docstring)."""
    out = Path(out)
    data = load_study_data(spec.data)
    trials = plan_trials(spec, data)
    packs = plan_packs(trials, spec)
    if backend == "local":
        runner = LocalBackend(progress=progress)
    elif backend == "ray":
        runner = RayBackend(address, spec.run["num_cpus"], spec.run["num_gpus"])
    else:
        raise ValueError(f"backend {backend!r} is unknown (expected local or ray)")
    with run_lock(out):
        store = StudyStore.open_for_run(out, spec, trials, resume, data.split_record())
        if not resume:
            shutil.rmtree(out / WORK_DIR, ignore_errors=True)
        run = store.begin_run(backend)
        outcome = "interrupted"
        failed = 0
        try:
            statuses = store.statuses()
            jobs = []
            for pack in packs:
                remaining = [t for t in pack.trials if statuses.get(t.id) not in FINISHED]
                if remaining:
                    jobs.append(PackJob(pack.id, remaining, spec.data, spec.evaluation, spec.run["micro_batch_size"],
                                        str(out / WORK_DIR)))  # fmt: skip
            to_run = sum(len(job.trials) for job in jobs)
            bar = StudyProgress(len(trials), len(trials) - to_run, progress)
            order = {job.id: index for index, job in enumerate(jobs, start=1)}

            def started(job: PackJob) -> None:
                store.mark_running([t.id for t in job.trials], run, job.id, len(job.trials))
                if backend == "local":
                    bar.pack_started(order[job.id], len(jobs), len(job.trials))

            def on_step(ids: list[str], step: int, steps: int, losses: dict[str, float]) -> None:
                store.heartbeat(ids, step, steps)
                bar.step(step, steps, losses)

            def finished(job: PackJob, result) -> None:
                nonlocal failed
                if isinstance(result, BaseException):
                    failed += len(job.trials)
                    store.fail([t.id for t in job.trials], describe_error(result), run)
                else:
                    store.finish(result, run)
                shutil.rmtree(Path(job.work_dir) / job.id, ignore_errors=True)
                bar.pack_finished(len(job.trials))

            runner.run(jobs, started, on_step, finished)
            bar.close()
            outcome = "finished"
        finally:
            store.end_run(run, outcome)
            counts: dict[str, int] = {}
            for status in (store.statuses()[t.id] for t in trials):
                counts[status] = counts.get(status, 0) + 1
            store.close()
            if outcome == "finished":
                shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    written = None
    if report:
        from flora.study.report import write_report

        written = write_report(out)
    return RunSummary(out, len(trials), len(trials) - to_run, to_run, failed, counts, written)
