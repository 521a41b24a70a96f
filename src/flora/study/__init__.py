"""Studies: a grid of training runs (trials) from a spec, run resumably, stored in SQLite, reported.

``flora study run SPEC --out DIR`` runs a study, ``flora study status DIR`` tells how far it is,
``flora study report DIR`` writes ``report.md`` with figures and tables. Built-in specs:
``peft-instruction`` (He, 2024: PEFT methods x learning rate x size x number of tasks, seen and
unseen Super-NaturalInstructions tasks) and ``flora-domains`` (Wen & Chaudhuri, 2024: one adapter
per category, FLoRA vs LoRA vs IA3), each with profiles ``smoke``, ``cpu`` and ``paper``.

Modules, in the order a run uses them:

- `spec`: the TOML spec, its profiles and its validation (`load_spec`, `StudySpec`).
- `data`: the study's tasks and the instances trials train and are scored on (`load_study_data`).
- `plan`: the trials (one per grid point; id = hash of what decides its result) and their packs.
- `execute`: one pack: packed training, validation-loss curves, every split scored per instance at the end.
- `backends`: where packs run: this process, or Ray tasks.
- `store`: the SQLite store (a row per trial, its per-instance scores and curve) and the run lock.
- `progress`: the progress bars of a run.
- `runner`: `run_study`, which ties them together.
- `status`: `study_status` (done, running, failed, ETA).
- `stats`: the hierarchical bootstrap (tasks, instances, seeds) and the power estimate.
- `results`: cells, learning rates chosen on validation only, scores and differences with intervals.
- `verdicts`: agrees / disagrees / cannot tell from an interval (superiority, non-inferiority).
- `tables`, `figures`, `findings`, `report`: the report.
"""

from typing import Any

# Imported on first use: `flora study status` reads the store without loading torch.
_EXPORTS = {
    "RunSummary": "flora.study.runner", "run_study": "flora.study.runner", "StudySpec": "flora.study.spec",
    "builtin_specs": "flora.study.spec", "load_spec": "flora.study.spec", "parse_override": "flora.study.spec",
    "format_status": "flora.study.status", "study_status": "flora.study.status",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
