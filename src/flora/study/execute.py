"""Running one pack of trials: train them together, measure their learning curves, score them.

`run_pack` is a plain function of a picklable `PackJob` (what the local and the Ray backends
call): it loads the base model once and trains the pack's trials as adapters of it
(`flora.training.packing.train_packed`). At step 0 and after each of ``evaluation.evaluations``
evenly spaced steps it measures every trial's teacher-forced validation loss (no generation: a
learning curve is cheap) on its validation instances (held-out instances of its training tasks) and
on the validation tasks, all trials' rows in one mixed batch, each row through its trial's adapter.
After the last step every trial generates (greedy, `flora.evaluate.generate_texts`) for the four
splits of `flora.study.data.SPLITS`, again in one mixed batch, and each prediction is scored with
the official metrics (`flora.metrics`). Every trial is reported at its final step: nothing here
chooses a checkpoint, so no score of any split, test or validation, decides what is reported.

Per trial the outcome holds the per-instance scores of every split, the per-instance validation
losses at every measured step, and aggregates (`flora.evaluate.aggregate` of the test splits, the
validation splits' means) for the store's headline columns. Evaluation runs in the model's dtype
(float32 unless ``model.dtype`` says otherwise), also when training ran under bfloat16 autocast.

At each measured step the pack also writes a checkpoint (`flora.training.packing`'s, in
``<work_dir>/<pack id>/``, the latest kept) that holds the curves measured so far and the time spent;
a pack run again (a study resumed after a kill) continues from it, and its outcome equals that of an
uninterrupted run. The runner removes a pack's directory once its outcome is stored.

A trial whose loss or gradient became NaN or infinite is ``"unstable"``: its curve so far is kept,
it gets no scores, and its pack-mates go on. The zero-shot trial (the base model) trains nothing:
its curve is one point (step 0) and it is scored like the others.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flora.data.encoding import encode_example, encode_prompt
from flora.data.templates import Sample, Template
from flora.evaluate import EvalRow, aggregate, generate_texts, newline_token_mask, task_budgets, task_stops_at_newline
from flora.metrics import mean_scores, score_instance
from flora.study.data import SPLITS, TEST_SPLITS, VALIDATION_SPLITS, StudyData, load_study_data
from flora.study.plan import Trial, eval_steps
from flora.training.data import safe_adapter_name
from flora.training.hyperparameters import FULL
from flora.training.memory import release_freed_memory
from flora.training.response_loss import validation_losses

DONE, UNSTABLE = "done", "unstable"


@dataclass
class PackJob:
    """Everything a worker needs to run a pack: its trials, the study's data and evaluation settings."""

    id: str
    trials: list[Trial]
    data: dict[str, Any]
    evaluation: dict[str, Any]
    micro_batch_size: int | None
    work_dir: str


@dataclass
class TrialOutcome:
    """What one trial of a pack produced (a row of the study store, its instance scores and its curve).

    ``instances``: per scored instance ``{"split", "task", "instance", "rougeL", "exact_match",
    "prediction"}``; ``curve``: per measured step and validation instance ``{"split", "task",
    "instance", "step", "loss", "tokens"}``; ``checkpoints``: per measured step its mean training
    loss since the previous one and the mean validation loss of each validation split.
    """

    id: str
    status: str
    pack: str
    pack_size: int
    wall_s: float
    trainable_params: int
    examples: int
    steps: int
    best_step: int | None
    checkpoints: list[dict[str, Any]]
    losses: list[float]
    scores: dict[str, Any] | None
    error: str | None = None
    instances: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Row:
    key: str
    sample: Sample
    adapter: str | None  # the adapter's name in the packed model (None: the base model)
    split: str


ProgressFn = Callable[[list[str], int, int, dict[str, float]], None]


def run_pack(job: PackJob, on_step: ProgressFn | None = None, progress: bool = False) -> list[TrialOutcome]:
    """Train, measure and score the trials of ``job`` (see the module docstring).

    ``on_step(trial_ids, step, steps, {trial id: loss})`` is called after every optimizer step.
    """
    from flora.model import AdapterModel
    from flora.training.packing import train_packed

    release_freed_memory()  # a worker runs pack after pack (see flora.training.memory)
    data = load_study_data(job.data)
    trials = {trial.key: trial for trial in job.trials}
    first = job.trials[0]  # every trial of a pack has the same model, dtype and strategy
    model = AdapterModel.from_pretrained(first.model, dtype=getattr(torch, first.config["dtype"]),
                                         strategy=first.config["strategy"])  # fmt: skip
    template = Template(data.spec["template"])
    scorer = _Scorer(model, template, job.evaluation, progress)
    curves = _Curves(model, template, data, job.evaluation)
    state = _PackState(curves)
    recent: dict[str, list[float]] = {key: [] for key in trials}

    def measure(step: int, keys: list[str]) -> None:
        curves.measure(step, {key: trials[key] for key in keys}, recent)
        release_freed_memory()  # the end of a phase (see flora.training.memory)

    if first.zero_shot:
        if len(trials) > 1:
            raise ValueError(f"pack {job.id}: the zero-shot trial is scored alone (got {len(trials)} trials)")
        measure(0, list(trials))
        members = {first.key: _ZeroShot()}
        steps = 0
    else:

        def step_done(step: int, steps: int, losses: dict[str, float]) -> None:
            for key, loss in losses.items():
                recent[key].append(loss)
            if on_step is not None:
                on_step([trials[k].id for k in trials], step, steps, {trials[k].id: v for k, v in losses.items()})

        work = Path(job.work_dir) / job.id
        configs = {key: trial.train_config(str(work)) for key, trial in trials.items()}
        measured = functools.partial(eval_steps, evaluations=job.evaluation["evaluations"])
        result = train_packed(
            configs, work, micro_batch_size=job.micro_batch_size, model=model, eval_steps=measured,
            on_evaluate=measure, on_step=step_done, checkpoint_steps=measured, resume=True, extra_state=state,
        )  # fmt: skip
        members, steps = result.members, result.steps

    finished = [key for key in trials if members[key].diverged_step is None]
    rows = [_Row(key, sample, _route(model, key, trials[key], sample, data), split)
            for key in finished for split in SPLITS
            for sample in data.samples(split, trials[key].num_tasks)]  # fmt: skip
    scored = scorer.score(rows) if rows else {}
    wall = state.elapsed()
    outcomes = []
    for key, trial in trials.items():
        member = members[key]
        unstable = member.diverged_step is not None
        instances = scored.get(key, [])
        outcomes.append(TrialOutcome(
            id=trial.id, status=UNSTABLE if unstable else DONE, pack=job.id, pack_size=len(trials),
            wall_s=round(wall, 3), trainable_params=member.trainable_parameters, examples=member.examples,
            steps=steps if not unstable else member.diverged_step - 1, best_step=None if unstable else steps,
            checkpoints=curves.checkpoints.get(key, []), losses=member.losses,
            scores=_summary(instances) if instances else None, error=member.error,
            instances=[_instance_record(r, s) for r, s in instances], curve=curves.rows.get(key, []),
        ))  # fmt: skip
    return outcomes


@dataclass
class _ZeroShot:
    """The zero-shot trial's stand-in for a trained member's result: nothing trained."""

    diverged_step: int | None = None
    trainable_parameters: int = 0
    examples: int = 0
    losses: list[float] = field(default_factory=list)
    error: str | None = None


def _instance_record(row: _Row, scored: EvalRow) -> dict[str, Any]:
    return {"split": row.split, "task": row.sample.task, "instance": row.sample.id, "rougeL": scored.rougeL,
            "exact_match": scored.exact_match, "prediction": scored.prediction}  # fmt: skip


def _summary(instances: list[tuple[_Row, EvalRow]]) -> dict[str, Any]:
    """`flora.evaluate.aggregate` of the test splits (seen, unseen), with each validation split's
    mean scores beside it (micro means: over instances)."""
    scores = aggregate([scored for row, scored in instances if row.split in TEST_SPLITS])
    for split in VALIDATION_SPLITS:
        chosen = [{"rougeL": s.rougeL, "exact_match": s.exact_match} for row, s in instances if row.split == split]
        if chosen:
            scores[split] = mean_scores(chosen) | {"tasks": len({r.sample.task for r, _ in instances
                                                                 if r.split == split})}  # fmt: skip
    return scores


def _route(model, key: str, trial: Trial, sample: Sample, data: StudyData) -> str | None:
    """The adapter a row of ``trial`` runs through: its task's (or category's) adapter, its only
    adapter, or the base model (zero-shot; full fine-tuning; a task that no per-task/category adapter covers)."""
    if trial.zero_shot or trial.method == FULL:
        return None
    per = trial.config.get("adapter_per")
    if per == "task":
        name = safe_adapter_name(sample.task)
    elif per == "category":
        name = safe_adapter_name(data.categories.get(sample.task, sample.category), lower=True)
    else:
        name = trial.train_config().adapter_name
    full = f"{key}-{name}"
    return full if full in model.list_adapters() else None


class _PackState:
    """What a pack's checkpoints keep for `run_pack` (``extra_state`` of `train_packed`): the learning
    curves measured so far and the seconds spent on the pack before, so that a resumed pack reports
    the curves and the wall time of an uninterrupted one (less the work lost after the checkpoint)."""

    def __init__(self, curves: _Curves) -> None:
        self.curves = curves
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"checkpoints": self.curves.checkpoints, "rows": self.curves.rows, "elapsed_s": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curves.checkpoints, self.curves.rows = state["checkpoints"], state["rows"]
        self.started = time.perf_counter() - state["elapsed_s"]


class _Curves:
    """Teacher-forced validation losses of the trials of a pack at the measured steps (their learning curves)."""

    def __init__(self, model, template: Template, data: StudyData, evaluation: dict[str, Any]) -> None:
        self.model = model
        self.template = template
        self.data = data
        self.evaluation = evaluation
        self.encoded: dict[tuple[str, str], dict[str, Any]] = {}
        self.checkpoints: dict[str, list[dict[str, Any]]] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}

    def _samples(self, split: str, trial: Trial) -> list[Sample]:
        limit = self.evaluation["loss_instances"]
        by_task: dict[str, list[Sample]] = {}
        for sample in self.data.samples(split, trial.num_tasks):
            by_task.setdefault(sample.task, []).append(sample)
        return [s for samples in by_task.values() for s in (samples[:limit] if limit else samples)]

    def _encode(self, sample: Sample) -> dict[str, Any]:
        key = (sample.task, sample.id)
        if key not in self.encoded:
            tokenizer = self.model.tokenizer
            self.encoded[key] = encode_example(tokenizer, self.template.render(sample, tokenizer),
                                               sample.references[0], self.data.spec["max_length"])  # fmt: skip
        return self.encoded[key]

    def measure(self, step: int, trials: dict[str, Trial], recent: dict[str, list[float]]) -> None:
        """Every row of ``trials``' validation splits through its trial's adapter, in one mixed batch."""
        rows = [(key, split, sample) for key, trial in trials.items() for split in VALIDATION_SPLITS
                for sample in self._samples(split, trial)]  # fmt: skip
        losses = validation_losses(
            self.model, [self._encode(s) for _, _, s in rows],
            [_route(self.model, key, trials[key], s, self.data) for key, _, s in rows], self.evaluation["batch_size"],
        )  # fmt: skip
        per_split: dict[tuple[str, str], dict[str, list[float]]] = {}
        for (key, split, sample), (loss, tokens) in zip(rows, losses, strict=True):
            loss = loss if math.isfinite(loss) else None  # a diverging trial's weights may overflow
            self.rows.setdefault(key, []).append({"split": split, "task": sample.task, "instance": sample.id,
                                                  "step": step, "loss": loss, "tokens": tokens})  # fmt: skip
            per_split.setdefault((key, split), {}).setdefault(sample.task, []).append(loss)
        for key in trials:
            point: dict[str, Any] = {"step": step,
                                     "train_loss": statistics.fmean(recent[key]) if recent[key] else None}  # fmt: skip
            for split in VALIDATION_SPLITS:
                tasks = per_split.get((key, split))
                finite = tasks and all(loss is not None for v in tasks.values() for loss in v)
                point[f"{split}_loss"] = statistics.fmean(map(statistics.fmean, tasks.values())) if finite else None
            self.checkpoints.setdefault(key, []).append(point)
            recent[key] = []


class _Scorer:
    """Greedy generation for rows of many trials in one mixed batch, scored per row."""

    def __init__(self, model, template: Template, evaluation: dict[str, Any], progress: bool) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.template = template
        self.evaluation = evaluation
        self.progress = progress
        self.newline = newline_token_mask(self.tokenizer)
        self.prompts: dict[tuple[str, str], tuple[str, list[int]]] = {}

    def _prompt(self, sample: Sample) -> tuple[str, list[int]]:
        key = (sample.task, sample.id)
        if key not in self.prompts:
            text = self.template.render(sample, self.tokenizer)
            self.prompts[key] = (text, encode_prompt(self.tokenizer, text))
        return self.prompts[key]

    def score(self, rows: Sequence[_Row]) -> dict[str, list[tuple[_Row, EvalRow]]]:
        """``{trial key: [(row, its scored EvalRow)]}`` of ``rows``."""
        samples = list({(r.sample.task, r.sample.id): r.sample for r in rows}.values())
        budgets = task_budgets(self.tokenizer, samples, self.evaluation["new_token_margin"])
        cap = self.evaluation["max_new_tokens"]
        if cap is not None:
            budgets = {task: min(budget, cap) for task, budget in budgets.items()}
        newline = task_stops_at_newline(samples)
        self.model.eval()
        predictions = generate_texts(
            self.model, self.tokenizer, [self._prompt(r.sample)[1] for r in rows], [r.adapter for r in rows],
            max_new_tokens=[budgets[r.sample.task] for r in rows],
            stop_at_newline=[newline[r.sample.task] for r in rows],
            batch_size=self.evaluation["batch_size"], progress=self.progress, newline_mask=self.newline,
            on_batch=lambda rows: release_freed_memory(),  # batch after batch of other shapes (flora.training.memory)
        )  # fmt: skip
        by_key: dict[str, list[tuple[_Row, EvalRow]]] = {}
        for row, prediction in zip(rows, predictions, strict=True):
            scores = score_instance(prediction, row.sample.references)
            by_key.setdefault(row.key, []).append((row, EvalRow(
                task=row.sample.task, id=row.sample.id, category=row.sample.category,
                seen=row.split == "seen" if row.split in TEST_SPLITS else None, metric=row.sample.metric,
                adapter=row.adapter.split("-", 1)[1] if row.adapter else None, prompt=self._prompt(row.sample)[0],
                prediction=prediction, references=list(row.sample.references), exact_match=scores["exact_match"],
                rougeL=scores["rougeL"],
            )))  # fmt: skip
        return by_key
