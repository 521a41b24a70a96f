"""The settings of a training job: `TrainConfig`, its defaults, and its validation.

Owns `TrainConfig` (every setting; stored as ``train_config.json``, read back by `TrainConfig.load`),
what a valid value is for each setting (`TrainConfig.normalized`: types converted, defaults per
method resolved, choices and ranges checked), which settings decide what is trained
(`TrainConfig.identity`, compared on resume) and which ``TrainingArguments`` flora sets itself
(``--training-arg`` may not override them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from flora.data import suite as suite_module
from flora.data.templates import TEMPLATE_NAMES, Template
from flora.methods.base import ADAPTER_NAME
from flora.model import STRATEGIES
from flora.training.hyperparameters import FULL, coerce_settings, coerce_value, config_class, json_or_text, method_names

DEFAULT_LEARNING_RATES = {"lora": 1e-3, "flora": 8e-3, "ia3": 5e-3, FULL: 2e-5}
FALLBACK_LEARNING_RATE = 1e-3
DTYPES = ("float32", "bfloat16", "float16", "float64")
DEVICES = ("auto", "cpu")
DATA_FORMATS = ("auto", "sni", "alpaca", "jsonl")
ADAPTER_PER = ("task", "category")
CONFIG_FILE = "train_config.json"
# Settings that may change between the runs of one job (resume) without changing what is trained.
NOT_IDENTITY = ("output_dir", "resume", "overwrite", "progress", "save_steps", "save_total_limit", "logging_steps")
# TrainingArguments that `train` sets itself: --training-arg may not override them.
OWN_TRAINING_ARGS = {
    "output_dir": "--output-dir", "learning_rate": "--learning-rate", "max_steps": "--max-steps",
    "num_train_epochs": "--epochs", "per_device_train_batch_size": "--batch-size / --micro-batch-size",
    "gradient_accumulation_steps": "--batch-size / --micro-batch-size", "seed": "--seed",
    "lr_scheduler_type": "--lr-scheduler", "warmup_steps": "--warmup-steps / --warmup-ratio",
    "weight_decay": "--weight-decay", "max_grad_norm": "--max-grad-norm", "save_steps": "--save-steps",
    "save_strategy": "--save-steps", "save_total_limit": "--save-total-limit", "logging_steps": "--logging-steps",
    "remove_unused_columns": None, "report_to": None, "disable_tqdm": "--no-progress", "use_cpu": "--device",
}  # fmt: skip


@dataclass
class TrainConfig:
    """Every setting of a training job (written to ``train_config.json``).

    Model and method:
        model: ``"smollm2-135m"`` or a local transformers directory.
        method: ``"full"`` (full fine-tuning) or a method of `flora.methods.METHODS` (``"lora"``,
            ``"flora"``, ``"ia3"``, ...).
        settings: the method's hyperparameters, by config field (``{"r": 8, "alpha": 16}``).
    Data:
        data: files or directories (Super-NaturalInstructions task file / directory / a directory
            written by ``flora tasks export``, Alpaca JSON(L), prompt/completion JSONL); empty: the
            built-in suite.
        tasks: task names or categories to train on (default: the suite's seen tasks; all tasks of
            the files).
        split: a split directory (its ``train_tasks.txt``) or split file restricting SNI tasks.
        max_instances: instances per task (None: all). suite_seed / suite_train: the built-in
            suite's seed and training instances per task.
        template: ``"sni"`` / ``"alpaca"`` / ``"plain"`` (default: per format; SNI for the suite).
        max_length: cut examples to this many tokens (default: the model's maximum).
    Adapters:
        adapter_name: the adapter's name when there is one.
        adapter_per: ``"task"`` or ``"category"``: one adapter per task or category.
        adapters: explicit groups ``{name: [task or category, ...]}``; ``"*"`` takes the rest.
        adapter_lr: learning rate per adapter; adapter_settings: hyperparameters per adapter.
    Schedule:
        epochs / max_steps (max_steps wins when set), learning_rate (default per method),
        lr_scheduler (any of transformers' SchedulerType), warmup_ratio or warmup_steps,
        weight_decay, max_grad_norm; batch_size: examples per optimizer step over all processes,
        micro_batch_size: examples per forward pass per process (the rest is gradient accumulation).
    Run:
        output_dir, seed, save_steps (0: no checkpoints), save_total_limit, logging_steps, dtype,
        device (``"auto"`` or ``"cpu"``), strategy (`AdapterModel` strategy), training_args
        (more ``TrainingArguments``), resume, overwrite, progress.
    """

    model: str = "smollm2-135m"
    method: str = "lora"
    settings: dict[str, Any] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    data_format: str = "auto"
    tasks: list[str] | None = None
    split: str | None = None
    max_instances: int | None = None
    suite_seed: int = 0
    suite_train: int = suite_module.DEFAULT_TRAIN
    template: str | None = None
    pos_examples: int = 0
    chat: bool = False
    max_length: int | None = None
    adapter_name: str = "default"
    adapter_per: str | None = None
    adapters: dict[str, list[str]] = field(default_factory=dict)
    adapter_lr: dict[str, float] = field(default_factory=dict)
    adapter_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_dir: str = "runs/train"
    epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float | None = None
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    micro_batch_size: int | None = None
    seed: int = 0
    save_steps: int = 100
    save_total_limit: int | None = 3
    logging_steps: int = 10
    dtype: str = "float32"
    device: str = "auto"
    strategy: str = "auto"
    training_args: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "settings") -> TrainConfig:
        problem = cls.unknown_settings(data)
        if problem:
            raise ValueError(f"{source}: unknown training setting {problem}")
        return cls(**data)

    @classmethod
    def unknown_settings(cls, names: Iterable[str]) -> str | None:
        """``"'a', 'b' (valid: ...)"`` for the ``names`` that are no setting; None when all are."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in names if k not in known]
        return f"{', '.join(map(repr, unknown))} (valid: {', '.join(sorted(known))})" if unknown else None

    @classmethod
    def load(cls, output_dir: str | os.PathLike) -> TrainConfig:
        """The settings stored in ``<output_dir>/train_config.json`` (``resume`` and ``overwrite`` off)."""
        path = Path(output_dir) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (not a flora training run?)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise ValueError(f"{path}: expected a JSON object with a 'config' object")
        stored = cls.from_dict(data["config"], str(path))
        return dataclasses.replace(stored, resume=False, overwrite=False)  # per invocation, not part of the run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def steps_for(self, examples: int) -> int:
        """Optimizer steps of this job over ``examples`` training examples: ``max_steps``, else
        ``ceil(epochs x ceil(examples / batch_size))`` (as Trainer counts them)."""
        return self.max_steps or math.ceil(self.epochs * math.ceil(examples / self.batch_size))

    def identity(self) -> dict[str, Any]:
        """The settings that decide what is trained (all but output dir, resume, checkpoints, logging)."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IDENTITY}

    def normalized(self) -> TrainConfig:
        """A validated copy with types converted and defaults resolved (learning rate per method)."""
        c = dataclasses.replace(self)
        c.method = str(c.method).lower()
        if c.method != FULL:
            config_class(c.method)
            c.settings = coerce_settings(c.method, c.settings)
        elif c.settings:
            raise ValueError(f"method 'full' takes no hyperparameters (got {sorted(c.settings)})")
        c.data = [str(p) for p in ([c.data] if isinstance(c.data, str | os.PathLike) else c.data)]
        c.tasks = _name_list(c.tasks)
        c.adapters = {str(k): _name_list(v) or [] for k, v in c.adapters.items()}
        c.adapter_lr = {str(k): coerce_value(v, float, f"adapter_lr {k}") for k, v in c.adapter_lr.items()}
        if c.method != FULL:
            c.adapter_settings = {
                str(k): coerce_settings(c.method, v, f"adapter {k}: ") for k, v in c.adapter_settings.items()
            }
        if c.learning_rate is None:
            c.learning_rate = DEFAULT_LEARNING_RATES.get(c.method, FALLBACK_LEARNING_RATE)
        c.learning_rate = coerce_value(c.learning_rate, float, "learning_rate")
        c.training_args = _coerce_training_args(c.training_args)
        _check_choice("method", c.method, method_names())
        _check_choice("data_format", c.data_format, DATA_FORMATS)
        _check_choice("dtype", c.dtype, DTYPES)
        _check_choice("device", c.device, DEVICES)
        _check_choice("strategy", c.strategy, STRATEGIES)
        if c.template is not None:
            _check_choice("template", c.template, TEMPLATE_NAMES)
        if c.adapter_per is not None:
            _check_choice("adapter_per", c.adapter_per, ADAPTER_PER)
        _check_number("learning_rate", c.learning_rate, low=0, strict=True)
        _check_number("epochs", c.epochs, low=0, strict=True)
        _check_number("batch_size", c.batch_size, low=1)
        _check_number("warmup_ratio", c.warmup_ratio, low=0, high=1)
        _check_number("weight_decay", c.weight_decay, low=0)
        _check_number("max_grad_norm", c.max_grad_norm, low=0)
        _check_number("save_steps", c.save_steps, low=0)
        _check_number("logging_steps", c.logging_steps, low=1)
        _check_number("pos_examples", c.pos_examples, low=0)
        _check_number("suite_train", c.suite_train, low=1)
        for name in ("max_steps", "micro_batch_size", "max_length", "max_instances", "save_total_limit"):
            if getattr(c, name) is not None:
                _check_number(name, getattr(c, name), low=1)
        if c.warmup_steps is not None:
            _check_number("warmup_steps", c.warmup_steps, low=0)
        for name, lr in c.adapter_lr.items():
            _check_number(f"adapter_lr {name}", lr, low=0)
        if c.resume and c.overwrite:
            raise ValueError("resume and overwrite exclude each other (resume continues a run, overwrite replaces it)")
        if c.method == FULL and (c.adapter_per or c.adapters or c.adapter_lr or c.adapter_settings):
            raise ValueError("method 'full' trains the whole model: adapter_per, adapters, adapter_lr and "
                             "adapter_settings need an adapter method (e.g. lora)")  # fmt: skip
        if c.adapter_per and c.adapters:
            raise ValueError("give adapter_per (one adapter per task or category) or explicit adapters, not both")
        for name in [*c.adapters, c.adapter_name]:
            _check_adapter_name(name)
        Template(c.template or "sni", c.pos_examples, c.chat)  # validates the combination
        return c


def _name_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    names = [str(v).strip() for v in value if str(v).strip()]
    return names or None


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not valid (expected one of {', '.join(map(str, choices))})")


def _check_number(name: str, value: Any, low: float | None = None, high: float | None = None, strict=False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name}={value!r}: expected a number")
    if low is not None and (value < low or (strict and value == low)):
        raise ValueError(f"{name}={value!r}: expected a number {'>' if strict else '>='} {low}")
    if high is not None and value >= high:
        raise ValueError(f"{name}={value!r}: expected a number < {high}")


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or name == "__base__":
        raise ValueError(f"adapter name {name!r} is invalid (expected letters, digits, '_' or '-')")


def _coerce_training_args(values: Mapping[str, Any]) -> dict[str, Any]:
    known = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    result = {}
    for key, value in values.items():
        if key in OWN_TRAINING_ARGS:
            option = OWN_TRAINING_ARGS[key]
            raise ValueError(f"training arg {key!r} is set by flora" + (f"; use {option}" if option else ""))
        if key not in known:
            close = [k for k in known if key in k or k in key][:8]
            raise ValueError(f"{key!r} is not a TrainingArguments field" + (f" (close: {', '.join(close)})" if close
                             else " (see transformers.TrainingArguments)"))  # fmt: skip
        if isinstance(value, str):
            default = known[key].default
            if isinstance(default, bool):
                value = coerce_value(value, bool, f"training arg {key}")
            elif isinstance(default, int | float) and not isinstance(default, bool):
                value = coerce_value(value, float if isinstance(default, float) else int, f"training arg {key}")
            else:
                value = json_or_text(value) if value[:1] in "[{" or value in ("null", "true", "false") else value
        result[key] = value
    return result
