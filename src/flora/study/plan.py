"""The trials of a study and the packs they train in.

A `Trial` is one training run: a point of an experiment's grid (method, learning rate, size,
number of training tasks, model, seed) with the study's fixed settings, as a
`flora.training.TrainConfig`. Its id is a hash of everything that decides its result (the
training settings, the data and the evaluation), so a rerun finds the trials it already has, and a
trial two experiments share runs once.

With ``evaluation.zero_shot`` the study also plans one *zero-shot* trial per model: the base
model itself, not trained, scored like every other trial (the baseline of every table and figure).

A `Pack` is a set of trials trained together as adapters of one model in one mixed batch
(`flora.training.packing`): trials pack when they share the model and the schedule
(`flora.training.packing.SHARED_SETTINGS`) and their number of steps (the same ``max_steps``, or the
same data, batch size and epochs). Trials are grouped in plan order and cut into packs of nearly
equal size, at most ``run.pack_size``; full fine-tuning changes the base model and trains alone, as do
the zero-shot trial and every trial with ``run.pack = false``. Packs are planned over the whole study, so a
rerun trains the unfinished trials of a pack in the same company as the first run did.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from flora.study.data import StudyData
from flora.study.spec import SIZE_SETTINGS, StudySpec, digest
from flora.training.config import TrainConfig
from flora.training.hyperparameters import FULL, build_adapter_config
from flora.training.packing import shared_settings

ZERO_SHOT = "zero_shot"  # the method of the zero-shot trial: the base model, untrained
# TrainConfig fields that decide a run's number of steps when it is given in epochs.
EPOCH_LENGTH = ("epochs", "batch_size", "data", "tasks", "max_instances", "suite_seed", "suite_train", "template",
                "max_length", "pos_examples", "chat")  # fmt: skip


@dataclass(frozen=True)
class Trial:
    """One training run of the study (``config``: its `TrainConfig` fields, without an output directory)."""

    id: str
    experiments: tuple[str, ...]
    method: str
    learning_rate: float
    size: int | None
    num_tasks: int
    model: str
    seed: int
    config: dict[str, Any] = field(repr=False)

    @property
    def key(self) -> str:
        """Its name inside a pack (its adapters are ``"<key>-<adapter>"``)."""
        return f"t{self.id}"

    def settings(self) -> dict[str, Any]:
        """The trial's grid point."""
        return {"method": self.method, "learning_rate": self.learning_rate, "size": self.size,
                "num_tasks": self.num_tasks, "model": self.model, "seed": self.seed}  # fmt: skip

    @property
    def zero_shot(self) -> bool:
        return self.method == ZERO_SHOT

    def train_config(self, output_dir: str = "runs/study") -> TrainConfig:
        if self.zero_shot:
            raise ValueError(f"trial {self.id} is the zero-shot base model: it has no training job")
        return TrainConfig(**self.config, output_dir=output_dir)


@dataclass(frozen=True)
class Pack:
    """Trials trained together; ``id`` is a hash of their ids."""

    id: str
    trials: tuple[Trial, ...]


def plan_trials(spec: StudySpec, data: StudyData) -> list[Trial]:
    """Every trial of ``spec``'s experiments, in order (the zero-shot trials first, then by experiment,
    method, learning rate, size, number of tasks, model, seed), each once; checked as training jobs."""
    trials: dict[str, Trial] = {}
    if spec.evaluation["zero_shot"]:
        for model in dict.fromkeys(m for experiment in spec.experiments for m in experiment.model):
            trial = _zero_shot(spec, data, model)
            trials[trial.id] = trial
    for experiment in spec.experiments:
        for method in experiment.method:
            points = itertools.product(experiment.learning_rate[method], experiment.size[method],
                                       experiment.num_tasks, experiment.model, experiment.seed)  # fmt: skip
            for rate, size, num_tasks, model, seed in points:
                trial = _trial(spec, data, experiment.name, method, rate, size, num_tasks, model, seed)
                if trial.id in trials:
                    known = trials[trial.id]
                    if experiment.name not in known.experiments:
                        trials[trial.id] = _with_experiment(known, experiment.name)
                else:
                    trials[trial.id] = trial
    return list(trials.values())


def _with_experiment(trial: Trial, name: str) -> Trial:
    return Trial(trial.id, (*trial.experiments, name), trial.method, trial.learning_rate, trial.size,
                 trial.num_tasks, trial.model, trial.seed, trial.config)  # fmt: skip


def _trial(spec: StudySpec, data: StudyData, experiment: str, method: str, rate: float, size: int | None,
           num_tasks: int | None, model: str, seed: int) -> Trial:  # fmt: skip
    where = f"experiment {experiment!r}, method {method}, learning rate {rate:g}" + (
        f", size {size}" if size is not None else "")  # fmt: skip
    settings = dict(spec.methods.get(method, {}))
    if size is not None:
        settings[SIZE_SETTINGS[method]] = size
        if method == "lora" and "alpha" not in spec.methods.get("lora", {}):
            settings["alpha"] = float(size)  # alpha = r, as the PEFT study
    training = {k: v for k, v in spec.training_for(method).items() if v is not None}
    try:
        fields = data.train_fields(num_tasks)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    config = {
        "model": model, "method": method, "settings": settings, "learning_rate": rate, "seed": seed,
        "dtype": spec.model["dtype"], "strategy": spec.model["strategy"], "device": spec.model["device"], **fields,
        **training,
        "save_steps": 0, "progress": False,
    }  # fmt: skip
    if method == FULL:
        config.pop("adapter_per", None)
    try:
        normalized = TrainConfig(**config).normalized()
    except (ValueError, KeyError) as err:
        raise ValueError(f"{where}: {err}") from None
    resolved_size = None
    if method in SIZE_SETTINGS:
        resolved_size = getattr(build_adapter_config(method, normalized.settings), SIZE_SETTINGS[method])
    identity = {"train": normalized.identity(), "data": data.spec, "evaluation": spec.evaluation}
    return Trial(digest(identity)[:12], (experiment,), method, rate, resolved_size, len(fields["tasks"]), model, seed,
                 config)  # fmt: skip


def _zero_shot(spec: StudySpec, data: StudyData, model: str) -> Trial:
    config = {"model": model, **{k: spec.model[k] for k in ("dtype", "strategy", "device")}}
    identity = {ZERO_SHOT: config, "data": data.spec, "evaluation": spec.evaluation}
    return Trial(digest(identity)[:12], (), ZERO_SHOT, 0.0, None, len(data.train_tasks), model, 0, config)


def plan_packs(trials: list[Trial], spec: StudySpec) -> list[Pack]:
    """``trials`` grouped into packs (see the module docstring), in plan order."""
    groups: dict[str, list[Trial]] = {}
    for trial in trials:
        alone = trial.zero_shot or trial.method == FULL or not spec.run["pack"]
        if alone:
            key = f"alone:{trial.id}"
        else:
            config = trial.train_config().normalized()
            length = config.max_steps or {name: getattr(config, name) for name in EPOCH_LENGTH}
            key = json.dumps([shared_settings(config), length], sort_keys=True, default=str)
        groups.setdefault(key, []).append(trial)
    packs = []
    for members in groups.values():
        count = -(-len(members) // spec.run["pack_size"])  # packs of nearly equal size, none above pack_size
        bounds = [round(i * len(members) / count) for i in range(count + 1)]
        for start, stop in itertools.pairwise(bounds):
            chunk = tuple(members[start:stop])
            packs.append(Pack(digest([t.id for t in chunk])[:12], chunk))
    order = {trial.id: index for index, trial in enumerate(trials)}
    return sorted(packs, key=lambda pack: order[pack.trials[0].id])


def eval_steps(steps: int, evaluations: int) -> list[int]:
    """The steps at which a trial's validation loss is measured: 0 (before training) and ``evaluations``
    evenly spaced optimizer steps, the last at the end."""
    return sorted({0} | {max(1, round(steps * i / evaluations)) for i in range(1, evaluations + 1)})
