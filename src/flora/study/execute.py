"""Running one pack of trials: train them together, evaluate at checkpoints, keep the best, score it.

`run_pack` is a plain function of a picklable `PackJob` (what the local and the Ray backends
call): it loads the base model once, trains the pack's trials as adapters of it
(`flora.training.packing.train_packed`), and after each of ``evaluation.evaluations`` evenly spaced
steps scores every trial still training on its validation instances, all trials' rows in one
mixed batch, each row through its trial's adapter (`flora.evaluate.generate_texts`). A trial keeps
the weights of its best checkpoint by validation ROUGE-L (or ``select_by``; ties: the earlier one),
as the PEFT study selects; after training those weights are restored and every trial is scored on
its seen instances (held-out instances of its training tasks) and the unseen tasks, again in one
mixed batch. Scores are the official metrics (`flora.metrics`) aggregated by `flora.evaluate.aggregate`.

A trial whose loss or gradient became NaN or infinite is ``"unstable"``: its checkpoints so far
are kept, it gets no test scores, and its pack-mates go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flora.data.encoding import encode_prompt
from flora.data.templates import Sample, Template
from flora.evaluate import EvalRow, aggregate, generate_texts, newline_token_mask, task_budgets, task_stops_at_newline
from flora.metrics import score_instance
from flora.study.data import StudyData, load_study_data
from flora.study.plan import Trial, eval_steps
from flora.training.data import safe_adapter_name
from flora.training.hyperparameters import FULL

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
    """What one trial of a pack produced (a row of the study store)."""

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


@dataclass
class _Row:
    key: str
    sample: Sample
    adapter: str | None  # the adapter's name in the packed model (None: the base model)
    seen: bool | None


@dataclass
class _Best:
    score: float = float("-inf")
    step: int | None = None
    weights: list[Tensor] = field(default_factory=list)


ProgressFn = Callable[[list[str], int, int, dict[str, float]], None]


def run_pack(job: PackJob, on_step: ProgressFn | None = None, progress: bool = False) -> list[TrialOutcome]:
    """Train, select and score the trials of ``job`` (see the module docstring).

    ``on_step(trial_ids, step, steps, {trial id: loss})`` is called after every optimizer step.
    """
    from flora.model import AdapterModel
    from flora.training.packing import train_packed

    started = time.perf_counter()
    data = load_study_data(job.data)
    trials = {trial.key: trial for trial in job.trials}
    configs = {key: trial.train_config(str(Path(job.work_dir) / job.id)) for key, trial in trials.items()}
    first = next(iter(configs.values())).normalized()
    model = AdapterModel.from_pretrained(first.model, dtype=getattr(torch, first.dtype), strategy=first.strategy)
    scorer = _Scorer(model, Template(data.spec["template"]), job.evaluation, progress)
    best = {key: _Best() for key in trials}
    checkpoints: dict[str, list[dict[str, Any]]] = {key: [] for key in trials}
    recent: dict[str, list[float]] = {key: [] for key in trials}

    def step_done(step: int, steps: int, losses: dict[str, float]) -> None:
        for key, loss in losses.items():
            recent[key].append(loss)
        if on_step is not None:
            on_step([trials[k].id for k in trials], step, steps, {trials[k].id: v for k, v in losses.items()})

    def evaluate(step: int, keys: list[str]) -> None:
        model.eval()  # no dropout while generating; Trainer's next step sets train mode again
        rows = [_Row(key, s, _route(model, key, trials[key], s, data), None)
                for key in keys for task in data.tasks_for(trials[key].num_tasks)
                for s in data.validation[task]]  # fmt: skip
        scores = scorer.score(rows)
        for key in keys:
            validation = {k: scores[key]["overall"][k] for k in ("rougeL", "exact_match")}
            loss = sum(recent[key]) / len(recent[key]) if recent[key] else None
            checkpoints[key].append({"step": step, "train_loss": loss, "validation": validation})
            recent[key] = []
            value = validation[job.evaluation["select_by"]]
            if value > best[key].score:
                best[key] = _Best(value, step, [p.detach().clone() for p in _weights(model, key, trials[key])])

    result = train_packed(
        configs, Path(job.work_dir) / job.id, micro_batch_size=job.micro_batch_size, model=model,
        eval_steps=lambda steps: eval_steps(steps, job.evaluation["evaluations"]), on_evaluate=evaluate,
        on_step=step_done,
    )  # fmt: skip

    finished = [key for key in trials if result.members[key].diverged_step is None and best[key].step is not None]
    with torch.no_grad():
        for key in finished:
            for parameter, saved in zip(_weights(model, key, trials[key]), best[key].weights, strict=True):
                parameter.copy_(saved)
    rows = []
    for key in finished:
        trial = trials[key]
        rows += [_Row(key, s, _route(model, key, trial, s, data), True)
                 for task in data.tasks_for(trial.num_tasks) for s in data.seen[task]]  # fmt: skip
        rows += [_Row(key, s, _route(model, key, trial, s, data), False) for task in data.test_tasks
                 for s in data.unseen[task]]  # fmt: skip
    final = scorer.score(rows) if rows else {}
    wall = time.perf_counter() - started
    outcomes = []
    for key, trial in trials.items():
        member = result.members[key]
        unstable = member.diverged_step is not None
        outcomes.append(TrialOutcome(
            id=trial.id, status=UNSTABLE if unstable else DONE, pack=job.id, pack_size=len(trials),
            wall_s=round(wall, 3), trainable_params=member.trainable_parameters, examples=member.examples,
            steps=result.steps if not unstable else member.diverged_step - 1, best_step=best[key].step,
            checkpoints=checkpoints[key], losses=member.losses, scores=final.get(key), error=member.error,
        ))  # fmt: skip
    return outcomes


def _weights(model, key: str, trial: Trial) -> list[Tensor]:
    """The trained tensors of ``trial`` in ``model``: its adapters', or the whole model's (full fine-tuning)."""
    if trial.method == FULL:
        return [p for p in model.base_model.parameters() if p.requires_grad]
    prefix = f"{key}-"
    return [p for name in model.list_adapters() if name.startswith(prefix)
            for p in model.adapter_parameters(name).values()]  # fmt: skip


def _route(model, key: str, trial: Trial, sample: Sample, data: StudyData) -> str | None:
    """The adapter a row of ``trial`` runs through: its task's (or category's) adapter, its only
    adapter, or the base model (full fine-tuning; a task that no per-task/category adapter covers)."""
    if trial.method == FULL:
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


class _Scorer:
    """Greedy generation for rows of many trials in one mixed batch, scored per trial."""

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

    def score(self, rows: Sequence[_Row]) -> dict[str, dict[str, Any]]:
        """``{trial key: flora.evaluate.aggregate scores}`` of ``rows``."""
        samples = list({(r.sample.task, r.sample.id): r.sample for r in rows}.values())
        budgets = task_budgets(self.tokenizer, samples, self.evaluation["new_token_margin"])
        cap = self.evaluation["max_new_tokens"]
        if cap is not None:
            budgets = {task: min(budget, cap) for task, budget in budgets.items()}
        newline = task_stops_at_newline(samples)
        predictions = generate_texts(
            self.model, self.tokenizer, [self._prompt(r.sample)[1] for r in rows], [r.adapter for r in rows],
            max_new_tokens=[budgets[r.sample.task] for r in rows],
            stop_at_newline=[newline[r.sample.task] for r in rows],
            batch_size=self.evaluation["batch_size"], progress=self.progress, newline_mask=self.newline,
        )  # fmt: skip
        by_key: dict[str, list[EvalRow]] = {}
        for row, prediction in zip(rows, predictions, strict=True):
            scores = score_instance(prediction, row.sample.references)
            by_key.setdefault(row.key, []).append(EvalRow(
                task=row.sample.task, id=row.sample.id, category=row.sample.category, seen=row.seen,
                metric=row.sample.metric, adapter=row.adapter.split("-", 1)[1] if row.adapter else None,
                prompt=self._prompt(row.sample)[0], prediction=prediction, references=list(row.sample.references),
                exact_match=scores["exact_match"], rougeL=scores["rougeL"],
            ))  # fmt: skip
        return {key: aggregate(members) for key, members in by_key.items()}
