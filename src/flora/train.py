"""Training: one adapter, many adapters at once in one mixed batch, or the whole model.

Two entry points:

- `train` (also ``flora.train(...)``: the module is callable, and ``flora train`` on the command
  line) runs a whole training job from a `TrainConfig`: base model, method and hyperparameters,
  data (built-in suite tasks or categories, Super-NaturalInstructions / Alpaca / prompt-completion
  files), one adapter or one per task / category / explicit group, schedule, checkpoints, resume.
  It writes ``<output_dir>/adapters/<name>/`` (Hugging Face PEFT format; ``model/`` for full
  fine-tuning), ``train_config.json`` (every setting), ``train_log.jsonl`` (one record per
  optimizer step) and ``train_result.json``.
- `train_adapters` trains adapters already added to an in-memory `AdapterModel` on a list of
  `AdapterExample` (no files but Trainer's own).

Every example names the adapter it trains; a batch mixes examples of different adapters and each
row goes through its own adapter, so one run over one copy of the base model trains them all. The
loss is on the response tokens only (labels are -100 on the prompt and on padding) and is averaged
over the response tokens of the whole optimizer step (all micro-batches, all processes).
`transformers.Trainer` owns the loop, the schedule, gradient accumulation, logging, the progress
bar and data parallelism (``torchrun``); `FloraTrainer` adds per-adapter learning rates (optimizer
parameter groups), checkpoints that hold only the adapters (plus optimizer, scheduler and RNG
state) written atomically, and a stop with a clear error when the loss or a gradient is not finite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from flora.data import collate_examples, encode_example
from flora.data import suite as suite_module
from flora.data.formats import (
    DataFormatError,
    detect_format,
    load_alpaca,
    load_prompt_completion,
    load_sni,
    read_task_names,
)
from flora.data.templates import (
    TEMPLATE_NAMES,
    Sample,
    Template,
    samples_from_alpaca,
    samples_from_prompt_completion,
    samples_from_tasks,
)
from flora.io import KEY_PREFIX, read_adapter_dir
from flora.methods import METHODS, AdapterConfig
from flora.methods.base import ADAPTER_NAME
from flora.model import STRATEGIES, AdapterModel

FULL = "full"
DEFAULT_LEARNING_RATES = {"lora": 1e-3, "flora": 8e-3, "ia3": 5e-3, FULL: 2e-5}
FALLBACK_LEARNING_RATE = 1e-3
DTYPES = ("float32", "bfloat16", "float16", "float64")
DEVICES = ("auto", "cpu")
DATA_FORMATS = ("auto", "sni", "alpaca", "jsonl")
ADAPTER_PER = ("task", "category")
CONFIG_FILE = "train_config.json"
LOG_FILE = "train_log.jsonl"
RESULT_FILE = "train_result.json"
ADAPTERS_DIR = "adapters"
MODEL_DIR = "model"
STAGING_PREFIX = ".staging-"
TRAINER_STATE_FILE = "trainer_state.json"
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


class TrainingDivergedError(FloatingPointError):
    """The loss or a gradient became NaN or infinite; training stopped before that step's update."""


# -- methods and their hyperparameters ------------------------------------------------------------


def _config_classes() -> dict[str, type]:
    """``{peft_type: config class}`` of every adapter method `AdapterModel.add_adapter` takes."""
    classes: dict[str, type] = {key: config for key, (config, _) in METHODS.items()}
    try:  # prompt and prefix tuning (virtual tokens), where this version of flora has them
        from flora.virtual_tokens import VIRTUAL_METHODS
    except ImportError:
        VIRTUAL_METHODS = {}
    classes.update(VIRTUAL_METHODS)
    return classes


def method_names() -> list[str]:
    """What ``method=`` accepts: ``"full"`` and every adapter method (`flora.methods.METHODS`, prompt
    and prefix tuning)."""
    return [FULL, *(name.lower() for name in _config_classes())]


def config_class(method: str) -> type[AdapterConfig]:
    """The config dataclass of ``method`` (case-insensitive); a clear error for an unknown one."""
    classes = _config_classes()
    key = str(method).upper()
    if key not in classes:
        raise ValueError(f"unknown method {method!r} (expected one of {', '.join(method_names())})")
    return classes[key]


def setting_types(cls: type[AdapterConfig]) -> dict[str, Any]:
    """``{field: type}`` of the hyperparameters a method's config takes (what ``--set`` accepts)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name != "base_model_name_or_path"}


def parse_assignments(items: Sequence[str], what: str = "--set") -> dict[str, str]:
    """``["r=8", "alpha=16"] -> {"r": "8", "alpha": "16"}``."""
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"{what} {item!r}: expected KEY=VALUE")
        result[key] = value.strip()
    return result


_REGEX_CHARS = set("*+?[](){}|^$\\")


def coerce_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` (a Python value, or a string from the command line) converted to the type ``hint``.

    Strings may be JSON (``[...]``, ``{...}``, ``null``, numbers); lists also take ``a,b,c``. For a
    ``list[str] | str`` field (``target_modules``) a plain string is a comma-separated list of
    module names, unless it is ``all-linear`` or a regular expression (has ``*+?[](){}|^$\\``).
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return _json_or_text(value) if isinstance(value, str) else value
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.strip().lower() in ("none", "null") and len(members) < len(args):
            return None
        if value is None and len(members) < len(args):
            return None
        if isinstance(value, str) and str in members and any(typing.get_origin(m) is list for m in members):
            text = value.strip()
            if text.startswith("["):
                return coerce_value(text, next(m for m in members if typing.get_origin(m) is list), where)
            if text == "all-linear" or _REGEX_CHARS & set(text):
                return text
            return [part.strip() for part in text.split(",") if part.strip()]
        for member in members:
            try:
                return coerce_value(value, member, where)
            except ValueError:
                pass
        raise ValueError(f"{where}: {value!r} is not a {_type_name(hint)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}: {value!r} is not a boolean (expected true or false)")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"{where}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not an integer") from None
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: {value!r} is not a number")
        if isinstance(value, int | float):
            return float(value)
        try:
            return float(str(value).strip())
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not a number") from None
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: {value!r} is not a string")
        return value
    if origin is list:
        (item_type,) = args or (Any,)
        if isinstance(value, str):
            text = value.strip()
            value = _json(text, where) if text.startswith("[") else [p.strip() for p in text.split(",") if p.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: {value!r} is not a list")
        return [coerce_value(v, item_type, where) for v in value]
    if origin is dict:
        key_type, value_type = args or (str, Any)
        if isinstance(value, str):
            value = _json(value.strip(), where)
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {value!r} is not a JSON object (expected e.g. '{{\"q_proj\": 4}}')")
        return {coerce_value(k, key_type, where): coerce_value(v, value_type, where) for k, v in value.items()}
    return value


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: {text!r} is not valid JSON ({err.msg})") from None


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


def coerce_settings(method: str, settings: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``settings`` checked against ``method``'s config fields and converted to their types."""
    cls = config_class(method)
    fields = setting_types(cls)
    unknown = [key for key in settings if key not in fields]
    if unknown:
        raise ValueError(
            f"{where}{method} has no hyperparameter {', '.join(map(repr, unknown))} (valid: {', '.join(fields)})"
        )
    return {key: coerce_value(value, fields[key], f"{where}{method} {key}") for key, value in settings.items()}


def build_adapter_config(method: str, settings: Mapping[str, Any], where: str = "") -> AdapterConfig:
    """``method``'s config with ``settings`` (validated and converted: see `coerce_settings`)."""
    values = coerce_settings(method, settings, where)
    try:
        return config_class(method)(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}{method} settings {values}: {err}") from None


# -- the job's settings ---------------------------------------------------------------------------


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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ValueError(f"{source}: unknown training setting {', '.join(map(repr, unknown))} "
                             f"(valid: {', '.join(sorted(known))})")  # fmt: skip
        return cls(**data)

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
                value = _json_or_text(value) if value[:1] in "[{" or value in ("null", "true", "false") else value
        result[key] = value
    return result


# -- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterExample:
    """One training example: the adapter it trains (None: the base model), the prompt and the response."""

    adapter: str | None
    prompt: str
    response: str


def _wanted(config: TrainConfig) -> list[str] | None:
    """The tasks or categories asked for: ``tasks``, else those the explicit groups name (without '*')."""
    if config.tasks:
        return config.tasks
    named = [name for names in config.adapters.values() for name in names]
    if named and "*" not in named:
        return list(dict.fromkeys(named))
    return None


def load_training_samples(config: TrainConfig) -> list[tuple[Sample, str]]:
    """``(sample, default template name)`` for every training instance the config selects.

    Built-in suite: the training instances (distinct from the held-out instances that
    ``flora eval`` scores, drawn with the same seed). Files: as ``flora eval`` reads them, except
    that a directory written by ``flora tasks export`` gives its ``train/`` tasks (those of the
    default split's seen tasks unless ``tasks`` or ``split`` say otherwise).
    """
    limit = config.max_instances
    wanted = _wanted(config)
    if not config.data:
        if config.split:
            raise ValueError("split applies to data files; the built-in suite has its default split")
        names = wanted if wanted is not None else suite_module.default_split()[0]
        suite = suite_module.build_suite(config.suite_seed, config.suite_train, suite_module.DEFAULT_HELDOUT, names)
        return [(s, "sni") for s in samples_from_tasks(suite.train, limit)]
    found: list[tuple[Sample, str]] = []
    for entry in config.data:
        path = Path(entry)
        if path.is_file() and not path.read_text(encoding="utf-8", errors="replace").strip():
            raise DataFormatError(f"{path}: the file is empty (expected training records)")
        before = len(found)
        split = Path(config.split) if config.split else None
        if path.is_dir() and (path / "suite.json").is_file() and (path / "train").is_dir():
            if split is None and wanted is None:  # default: the seen tasks of the default split
                split = path / "splits" / "default"
            path = path / "train"
        fmt = detect_format(path) if config.data_format == "auto" else config.data_format
        if fmt == "sni":
            names = None
            if split is not None:
                names = read_task_names(split / "train_tasks.txt") if split.is_dir() else read_task_names(split)
            found += [(s, "sni") for s in samples_from_tasks(load_sni(path, names), limit)]
        else:
            if split is not None:
                raise ValueError(f"split applies to Super-NaturalInstructions data, not {fmt!r} ({entry})")
            if fmt == "alpaca":
                samples, template = samples_from_alpaca(load_alpaca(path), path.stem), "alpaca"
            else:
                samples, template = samples_from_prompt_completion(load_prompt_completion(path), path.stem), "plain"
            found += [(s, template) for s in (samples[:limit] if limit else samples)]
        if len(found) == before:
            raise DataFormatError(f"{entry}: no training instances in it")
    if wanted is not None:
        present = {s.task for s, _ in found} | {s.category for s, _ in found}
        missing = [name for name in wanted if name not in present]
        if missing:
            tasks = sorted({s.task for s, _ in found})
            raise KeyError(f"task or category {', '.join(map(repr, missing))} is not in the data "
                           f"(tasks there: {', '.join(tasks[:12])}{' ...' if len(tasks) > 12 else ''})")  # fmt: skip
        found = [(s, t) for s, t in found if s.task in wanted or s.category in wanted]
    return found


def safe_adapter_name(text: str, lower: bool = False) -> str:
    """``"Word Order" -> "word_order"`` (with ``lower``): a valid adapter name made from a task or category."""
    name = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_-")
    name = name.lower() if lower else name
    if not name:
        raise ValueError(f"cannot make an adapter name out of {text!r}")
    return name


def assign_adapters(samples: Sequence[Sample], config: TrainConfig) -> tuple[list[str | None], dict[str, list[str]]]:
    """``(adapter of each sample, {adapter: its tasks})``: one adapter, one per task or category, or
    the explicit groups of ``config.adapters``. ``method="full"``: ``None`` for every sample."""
    if config.method == FULL:
        return [None] * len(samples), {}
    names: list[str] = []
    if config.adapters:
        rest = [name for name, members in config.adapters.items() if "*" in members]
        if len(rest) > 1:
            raise ValueError(f"adapters {rest} both take '*' (the rest); at most one may")
        unassigned: set[str] = set()
        for sample in samples:
            hits = [n for n, members in config.adapters.items() if sample.task in members or sample.category in members]
            if len(hits) > 1:
                raise ValueError(f"task {sample.task!r} belongs to adapters {hits}; each task may train one adapter")
            if not hits and not rest:
                unassigned.add(sample.task)
            names.append(hits[0] if hits else (rest[0] if rest else ""))
        if unassigned:
            raise ValueError(f"tasks {sorted(unassigned)} belong to no adapter; add them to an adapter "
                             f"(NAME=TASK,...) or give one adapter '*' for the rest")  # fmt: skip
    elif config.adapter_per == "task":
        names = [safe_adapter_name(s.task) for s in samples]
    elif config.adapter_per == "category":
        names = [safe_adapter_name(s.category, lower=True) for s in samples]
    else:
        names = [config.adapter_name] * len(samples)
    groups: dict[str, list[str]] = {}
    for sample, name in zip(samples, names, strict=True):
        if sample.task not in groups.setdefault(name, []):
            groups[name].append(sample.task)
    idle = {name: members for name, members in config.adapters.items() if name not in groups}
    if idle:
        raise ValueError(f"adapters {idle} have no training examples (their tasks or categories are not in the data)")
    if config.adapter_per:
        sources: dict[str, set[str]] = {}
        for sample, name in zip(samples, names, strict=True):
            sources.setdefault(name, set()).add(sample.task if config.adapter_per == "task" else sample.category)
        clashes = {name: sorted(s) for name, s in sources.items() if len(s) > 1}
        if clashes:
            raise ValueError(f"different {config.adapter_per}s give the same adapter name: {clashes}")
    return names, {name: sorted(groups[name]) for name in sorted(groups)}


class EncodedExamples(Dataset):
    """Tokenized examples (`flora.data.encode_example`) with the adapter each one trains."""

    def __init__(self, examples: Sequence[AdapterExample], tokenizer, max_length: int | None = None) -> None:
        self.items = [
            {**encode_example(tokenizer, e.prompt, e.response, max_length), "adapter_name": e.adapter} for e in examples
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class MixedAdapterCollator:
    """`flora.data.collate_examples` (right padding, labels -100 on padding), plus
    ``adapter_names``: one per row, which `AdapterModel.forward` routes by."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        batch = collate_examples(items, self.pad_token_id)
        batch["adapter_names"] = [item["adapter_name"] for item in items]
        return batch


# -- the trainer ----------------------------------------------------------------------------------


class StepStats:
    """What the micro-batches of one optimizer step saw, on this process."""

    def __init__(self, adapters: Sequence[str]) -> None:
        self.adapters = list(adapters)
        self.reset()

    def reset(self) -> None:
        self.loss: torch.Tensor | float = 0.0
        self.tokens: torch.Tensor | int = 0
        self.rows = [0] * len(self.adapters)
        self.micro_batches = 0

    def add(self, loss: torch.Tensor, inputs: Mapping[str, Any]) -> None:
        self.loss = self.loss + loss.detach().to(torch.float64)
        mask = inputs.get("attention_mask")
        if mask is not None:
            self.tokens = self.tokens + mask.sum()
        index = {name: i for i, name in enumerate(self.adapters)}
        for name in inputs.get("adapter_names") or ():
            if name in index:
                self.rows[index[name]] += 1
        self.micro_batches += 1


class FloraTrainer(Trainer):
    """`transformers.Trainer` for an `AdapterModel`.

    - Per-adapter learning rates: one optimizer parameter group per adapter (``adapter_lr``).
    - Checkpoints hold each adapter in PEFT format (``checkpoint-N/adapters/<name>/``), or the base
      model for full fine-tuning, plus Trainer's optimizer, scheduler, RNG and state files; never the
      frozen base weights. A checkpoint is written into ``.staging-checkpoint-N`` and renamed into
      place once complete, so a killed run never leaves a partial ``checkpoint-N``.
    - A NaN or infinite loss or gradient stops the run (`TrainingDivergedError`) before the step's
      update; the checkpoints already written are kept.
    """

    def __init__(self, *args, adapter_lr: Mapping[str, float] | None = None, full: bool = False,
                 log_path: str | os.PathLike | None = None, **kwargs) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.adapter_lr = dict(adapter_lr or {})
        self.full = full
        self._loss_shifts_labels = True  # a causal LM: count the label tokens after the shift
        adapters = [] if full else self._adapter_model().list_adapters()
        self.step_stats = StepStats(adapters)
        self.step_logger = StepLogCallback(self, log_path)
        self.add_callback(self.step_logger)

    def _adapter_model(self) -> AdapterModel:
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, AdapterModel):
            raise TypeError(f"FloraTrainer trains a flora.AdapterModel, got {type(model).__name__}")
        return model

    # -- optimizer: one parameter group per adapter ---------------------------------------------

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.full or not self.adapter_lr:
            return super().create_optimizer(model)
        adapter_model = self._adapter_model()
        decay = set(self.get_decay_parameter_names(adapter_model))
        names_of = {id(p): n for n, p in adapter_model.named_parameters()}
        groups, grouped = [], set()
        for adapter in adapter_model.list_adapters():
            params = [p for p in adapter_model.adapter_parameters(adapter).values() if p.requires_grad]
            grouped |= {id(p) for p in params}
            lr = self.adapter_lr.get(adapter, self.args.learning_rate)
            for with_decay in (True, False):
                chosen = [p for p in params if (names_of[id(p)] in decay) == with_decay]
                if chosen:
                    wd = self.args.weight_decay if with_decay else 0.0
                    groups.append({"params": chosen, "lr": lr, "weight_decay": wd, "adapter": adapter})
        other = [p for p in adapter_model.parameters() if p.requires_grad and id(p) not in grouped]
        if other:
            groups.append({"params": other, "weight_decay": self.args.weight_decay})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, adapter_model)
        if not isinstance(optimizer_cls, type) or any(k in optimizer_kwargs for k in ("params", "model")):
            raise ValueError(f"per-adapter learning rates need a plain torch optimizer (optim={self.args.optim!r})")
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, *args, **kwargs):
        # No key/value cache in training: it would only hold memory.
        return super().compute_loss(model, {**inputs, "use_cache": False}, *args, **kwargs)

    # -- per-step statistics --------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        view = {"attention_mask": inputs.get("attention_mask"), "adapter_names": inputs.get("adapter_names")}
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.step_stats.add(loss, view)
        return loss

    # -- checkpoints: adapters only, written atomically -----------------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self._adapter_model()
        if self.full:
            model.base_model.save_pretrained(output_dir)
            if model.tokenizer is not None:
                model.tokenizer.save_pretrained(output_dir)
        else:
            for name in model.list_adapters():
                model.save_adapter(name, Path(output_dir) / ADAPTERS_DIR / name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_checkpoint_weights(self._adapter_model(), resume_from_checkpoint, self.full)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging = os.path.join(run_dir, name), os.path.join(run_dir, STAGING_PREFIX + name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.store_flos()
        self.save_model(staging, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        if self.args.should_save:
            for callback in [*self.callback_handler.callbacks, self.control]:
                if isinstance(callback, ExportableState):
                    key = callback.__class__.__name__
                    if isinstance(self.state.stateful_callbacks.get(key), list):
                        self.state.stateful_callbacks[key].append(callback.state())
                    else:
                        self.state.stateful_callbacks[key] = callback.state()
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE_FILE))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _fsync_tree(staging)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_dir(run_dir)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()


def load_checkpoint_weights(model: AdapterModel, checkpoint: str | os.PathLike, full: bool = False) -> None:
    """Load what a `FloraTrainer` checkpoint holds (every adapter, or the base model) into ``model``."""
    if full:
        load_model_weights(model.base_model, Path(checkpoint))
        return
    for name in model.list_adapters():
        load_adapter_weights(model, name, Path(checkpoint) / ADAPTERS_DIR / name)


def load_adapter_weights(model: AdapterModel, name: str, directory: Path) -> None:
    """Copy the tensors of a saved adapter directory into adapter ``name``'s parameters, in place."""
    _, tensors = read_adapter_dir(directory)
    params = model.adapter_parameters(name)
    stored = {key.removeprefix(KEY_PREFIX): tensor for key, tensor in tensors.items()}
    if set(stored) != set(params):
        raise ValueError(f"checkpoint adapter {directory} does not match adapter {name!r} of this run "
                         f"({len(stored)} tensors there, {len(params)} here)")  # fmt: skip
    with torch.no_grad():
        for key, parameter in params.items():
            if stored[key].shape != parameter.shape:
                raise ValueError(f"{directory}: {key} has shape {tuple(stored[key].shape)}, the adapter "
                                 f"{tuple(parameter.shape)}")  # fmt: skip
            parameter.copy_(stored[key])


def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load the safetensors weights written by ``save_pretrained`` (one file or shards) into ``model``."""
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors (expected a full fine-tuning checkpoint)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied and "lm_head" not in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{directory}: weights do not match the model (missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]})")  # fmt: skip


def _fsync_tree(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(root)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StepLogCallback(TrainerCallback):
    """One JSON record per optimizer step (``train_log.jsonl``) and the NaN/Inf guard.

    Record: ``step``, ``epoch``, ``loss`` (mean over the step's response tokens, all processes),
    ``learning_rate`` (used by this step), ``tokens`` (non-padding, all processes), ``tokens_per_s``,
    ``examples``, ``adapters`` (examples per adapter, when there are several), ``learning_rates``
    (per adapter, when they differ). Before each update the loss and the gradients are checked: a
    NaN or infinite value stops the run with `TrainingDivergedError`, on every process at once.
    """

    def __init__(self, trainer: FloraTrainer, path: str | os.PathLike | None) -> None:
        self.trainer = trainer
        self.path = Path(path) if path is not None else None
        self.started = time.perf_counter()
        self.record: dict[str, Any] | None = None
        self.losses: list[float] = []  # this session's step losses (all processes)

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        stats = self.trainer.step_stats
        seconds = time.perf_counter() - self.started
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        bad_grads = torch.stack([~torch.isfinite(g).all() for g in grads]).any() if grads else torch.tensor(False)
        loss = torch.as_tensor(stats.loss, dtype=torch.float64, device=args.device)
        values = torch.stack([
            torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0),
            (~torch.isfinite(loss)).to(torch.float64) + bad_grads.to(args.device, torch.float64),
            torch.as_tensor(stats.tokens, dtype=torch.float64, device=args.device),
            torch.tensor(float(stats.micro_batches), dtype=torch.float64, device=args.device),
        ] + [torch.tensor(float(n), dtype=torch.float64, device=args.device) for n in stats.rows])  # fmt: skip
        if args.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)
        values = values.tolist()
        stats.reset()
        step = state.global_step + 1
        rows = [int(n) for n in values[4:]]
        record: dict[str, Any] = {"step": step, "epoch": None, "loss": values[0] / max(args.world_size, 1)}
        groups = optimizer.param_groups if optimizer is not None else []
        factor = next((g["lr"] / g["initial_lr"] for g in groups if g.get("initial_lr")), None)
        record["learning_rate"] = args.learning_rate * factor if factor is not None else None
        adapter_lrs = {g["adapter"]: g["lr"] for g in groups if "adapter" in g}
        if adapter_lrs:
            record["learning_rates"] = adapter_lrs
        record["tokens"] = int(values[2])
        record["tokens_per_s"] = round(values[2] / seconds, 1) if seconds > 0 else None
        record["examples"] = sum(rows) if rows else None
        if len(stats.adapters) > 1:
            record["adapters"] = dict(zip(stats.adapters, rows, strict=True))
        if values[1] > 0:
            record.update(loss=None, nonfinite=True)
            self._write(args, record)
            last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
            raise TrainingDivergedError(
                f"the loss or a gradient became NaN or infinite at step {step} (learning rate "
                f"{record['learning_rate']}); training stopped before that step's update. "
                + (f"The last good checkpoint is {last}. " if last else "No checkpoint was written yet. ")
                + "Lower the learning rate and start again (--overwrite), or resume from that checkpoint."
            )
        self.losses.append(record["loss"])
        self.record = record

    def on_step_end(self, args, state, control, **kwargs):
        if self.record is not None:
            self.record["epoch"] = round(state.epoch, 4) if state.epoch is not None else None
            self._write(args, self.record)
            self.record = None

    def _write(self, args, record: dict[str, Any]) -> None:
        if self.path is None or not args.should_save:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


# -- output directory -----------------------------------------------------------------------------


def _artifacts(directory: Path) -> list[Path]:
    """What a flora training run writes into its output directory."""
    fixed = [directory / n for n in (CONFIG_FILE, LOG_FILE, RESULT_FILE, ADAPTERS_DIR, MODEL_DIR)]
    checkpoints = [p for p in directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()]
    staging = list(directory.glob(f"{STAGING_PREFIX}*"))
    return [p for p in fixed if p.exists()] + checkpoints + staging


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_output_dir(config: TrainConfig) -> tuple[str, str | None]:
    """What to do with ``config.output_dir``: ``("new" | "overwrite" | "resume", checkpoint or None)``.

    Raises when it holds a different run (unless ``overwrite``), or this run without ``resume``.
    Reads only: safe on every process.
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output dir {str(out)!r} is a file")
    entries = [p for p in out.iterdir() if not p.name.startswith(STAGING_PREFIX)] if out.is_dir() else []
    if not entries:
        return "new", None
    if config.overwrite:
        return "overwrite", None
    if not (out / CONFIG_FILE).is_file():
        raise ValueError(f"output dir {str(out)!r} is not empty and holds no flora training run "
                         f"({', '.join(sorted(p.name for p in entries)[:5])}); choose another directory "
                         f"or pass --overwrite (it removes only flora's own files)")  # fmt: skip
    stored = TrainConfig.load(out).normalized().identity()
    current = config.identity()
    differences = [f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now"
                   for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]  # fmt: skip
    if differences:
        raise ValueError(f"output dir {str(out)!r} holds a different run ({'; '.join(differences[:6])}); "
                         f"pass --overwrite to replace it, or choose another --output-dir")  # fmt: skip
    checkpoint = get_last_checkpoint(str(out))
    if not config.resume:
        where = f"last checkpoint {Path(checkpoint).name}" if checkpoint else "no checkpoint yet"
        done = " (finished)" if (out / RESULT_FILE).is_file() else ""
        raise ValueError(f"output dir {str(out)!r} already holds this run{done} ({where}); pass --resume to "
                         f"continue it or --overwrite to start over")  # fmt: skip
    return "resume", checkpoint


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the log records of steps up to ``last_step`` (those the checkpoint holds)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
    from flora.data.formats import write_text_atomic

    write_text_atomic(path, "".join(line + "\n" for line in kept))


# -- the job --------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What `train` produced: output directory, adapter directories, metrics and the trained model."""

    output_dir: Path
    adapters: dict[str, Path]
    model_dir: Path | None
    metrics: dict[str, Any]
    global_step: int
    resumed_from: str | None
    model: AdapterModel = field(repr=False)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _batch_layout(config: TrainConfig, world: int) -> tuple[int, int]:
    """``(per-process micro-batch, gradient accumulation steps)`` giving ``config.batch_size`` per step."""
    if config.micro_batch_size is None:
        if config.batch_size % world:
            raise ValueError(f"batch_size {config.batch_size} does not split evenly over {world} processes "
                             f"(expected a multiple of {world})")  # fmt: skip
        return config.batch_size // world, 1
    per_step = config.micro_batch_size * world
    if config.batch_size % per_step:
        raise ValueError(f"batch_size {config.batch_size} is not a multiple of micro_batch_size "
                         f"{config.micro_batch_size} x {world} process(es) = {per_step}")  # fmt: skip
    return config.micro_batch_size, config.batch_size // per_step


def _say(message: str, args: TrainingArguments | None = None) -> None:
    if args is None or args.should_log:
        print(f"flora train: {message}", file=sys.stderr, flush=True)


def train(config: TrainConfig | Mapping[str, Any] | None = None, **overrides: Any) -> TrainResult:
    """Run a training job (see `TrainConfig` for every setting; keyword arguments override ``config``).

        import flora.train
        result = flora.train(model="smollm2-135m", method="lora", settings={"r": 8, "alpha": 16},
                             tasks=["Word Order"], adapter_per="task", max_steps=200, output_dir="runs/x")
        result.adapters  # {"reverse_words": Path("runs/x/adapters/reverse_words"), ...}

    Writes ``adapters/<name>/`` (PEFT format) or ``model/`` (full fine-tuning), ``train_config.json``,
    ``train_log.jsonl``, ``train_result.json`` and ``checkpoint-N/`` into ``output_dir``. Under
    ``torchrun`` every process runs this with the same settings (data parallelism).
    """
    if isinstance(config, Mapping):
        config = TrainConfig.from_dict(config)
    base = config or TrainConfig()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise TypeError(f"train() got unknown setting {', '.join(map(repr, unknown))} "
                        f"(valid: {', '.join(sorted(known))})")  # fmt: skip
    config = dataclasses.replace(base, **overrides).normalized()
    world = _world_size()
    micro_batch, accumulation = _batch_layout(config, world)

    # Data and adapters first: bad input fails before the model is loaded.
    loaded = load_training_samples(config)
    if not loaded:
        raise ValueError(f"no training examples in {config.data or 'the built-in suite'} (expected at least one)")
    samples = [s for s, _ in loaded]
    adapter_of, groups = assign_adapters(samples, config)
    unknown_adapters = sorted((set(config.adapter_lr) | set(config.adapter_settings)) - set(groups))
    if unknown_adapters:
        raise ValueError(f"adapter_lr / adapter_settings name adapters {unknown_adapters} that this run does not "
                         f"train (adapters: {', '.join(groups) or 'none: full fine-tuning'})")  # fmt: skip
    adapter_configs = {
        name: build_adapter_config(config.method, {**config.settings, **config.adapter_settings.get(name, {})},
                                   f"adapter {name}: ")
        for name in groups
    }  # fmt: skip

    args = _training_arguments(config, micro_batch, accumulation, multiple=len(groups) > 1)
    if args.world_size != world:
        raise RuntimeError(f"WORLD_SIZE says {world} processes but the distributed state has {args.world_size}")
    mode, checkpoint = check_output_dir(config)
    out = Path(config.output_dir)
    _barrier()
    if args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        for path in out.glob(f"{STAGING_PREFIX}*"):
            _remove(path)
        if mode == "overwrite":
            for path in _artifacts(out):
                _remove(path)
        if mode == "resume" and checkpoint is not None:
            state = json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text())
            _truncate_log(out / LOG_FILE, int(state["global_step"]))
        if mode != "resume" or checkpoint is None:
            (out / LOG_FILE).unlink(missing_ok=True)
    _barrier()

    # The model, with its adapters initialised from the seed (identically on every process).
    import transformers

    model = AdapterModel.from_pretrained(config.model, dtype=getattr(torch, config.dtype), strategy=config.strategy)
    tokenizer = model.tokenizer
    transformers.set_seed(config.seed)
    if config.method == FULL:
        for parameter in model.base_model.parameters():
            parameter.requires_grad_(True)
    for name, adapter_config in adapter_configs.items():
        model.add_adapter(name, adapter_config)

    used = sorted({config.template or default for _, default in loaded})
    template_of = {name: Template(name, config.pos_examples if name == "sni" else 0, config.chat) for name in used}
    examples = [
        AdapterExample(adapter, template_of[config.template or default].render(sample, tokenizer), sample.references[0])
        for (sample, default), adapter in zip(loaded, adapter_of, strict=True)
    ]
    max_length = config.max_length or getattr(model.config, "max_position_embeddings", None)
    dataset = EncodedExamples(examples, tokenizer, max_length)
    kept = [i for i, item in enumerate(dataset.items) if any(label != -100 for label in item["labels"][1:])]
    if not kept:
        raise ValueError(f"every example's response is cut off by max_length={max_length} (no tokens to train on)")
    if len(kept) < len(dataset.items):
        _say(f"dropped {len(dataset.items) - len(kept)} examples whose response max_length={max_length} cuts off", args)
        dataset.items = [dataset.items[i] for i in kept]

    if args.should_save and mode != "resume":
        _write_config(out, config, args, micro_batch, accumulation, groups, adapter_configs, dataset, template_of)
    steps = config.max_steps or math.ceil(config.epochs * math.ceil(len(dataset) / config.batch_size))
    _say(f"{len(dataset)} examples, {len(groups) or 'full model'}"
         f"{' adapters' if len(groups) > 1 else ' adapter' if groups else ''}, {steps} steps of {config.batch_size} "
         f"({world} process(es) x {micro_batch} x {accumulation} accumulation), method {config.method}"
         + (f"; resuming from {checkpoint}" if checkpoint else ""), args)  # fmt: skip
    if config.resume and mode != "resume":
        _say(f"nothing to resume in {out}: starting a new run", args)

    trainer = FloraTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=MixedAdapterCollator(tokenizer.pad_token_id),
        adapter_lr=config.adapter_lr,
        full=config.method == FULL,
        log_path=out / LOG_FILE,
    )
    state = json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text()) if checkpoint else {}
    if checkpoint and state.get("global_step", 0) >= state.get("max_steps", math.inf) > 0:
        # A finished run: Trainer would take one more step; load the checkpoint and save again.
        load_checkpoint_weights(model, checkpoint, config.method == FULL)
        previous = out / RESULT_FILE
        metrics = json.loads(previous.read_text()).get("metrics", {}) if previous.is_file() else {}
        global_step = int(state["global_step"])
    else:
        output = trainer.train(resume_from_checkpoint=checkpoint)
        metrics, global_step = dict(output.metrics), trainer.state.global_step
        losses = trainer.step_logger.losses
        if losses:  # Trainer's own figure is process 0's share under torchrun; this is over all processes
            metrics["train_loss"] = sum(losses) / len(losses)
    model.eval()

    adapters: dict[str, Path] = {}
    model_dir = None
    if args.should_save:
        if config.method == FULL:
            model_dir = out / MODEL_DIR
            model.base_model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
        for name in groups:
            adapters[name] = model.save_adapter(name, out / ADAPTERS_DIR / name)
        result = {"global_step": global_step, "metrics": metrics, "resumed_from": checkpoint,
                  "adapters": {k: str(v) for k, v in adapters.items()},
                  "model": str(model_dir) if model_dir else None}  # fmt: skip
        from flora.data.formats import write_text_atomic

        write_text_atomic(out / RESULT_FILE, json.dumps(result, indent=1) + "\n")
    else:
        adapters = {name: out / ADAPTERS_DIR / name for name in groups}
        model_dir = out / MODEL_DIR if config.method == FULL else None
    _barrier()
    return TrainResult(out, adapters, model_dir, metrics, global_step, checkpoint, model)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _training_arguments(config: TrainConfig, micro_batch: int, accumulation: int, multiple: bool) -> TrainingArguments:
    warmup: float = config.warmup_steps if config.warmup_steps is not None else config.warmup_ratio
    extra = dict(config.training_args)
    extra.setdefault("dataloader_pin_memory", torch.cuda.is_available() and config.device != "cpu")
    if _world_size() > 1 and config.method != FULL:
        extra.setdefault("ddp_find_unused_parameters", multiple)
    args = TrainingArguments(
        output_dir=config.output_dir,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=not config.progress,
        use_cpu=config.device == "cpu" or (_world_size() > 1 and not torch.cuda.is_available()),
        **extra,
    )
    args.world_size  # noqa: B018  (sets up the distributed state now)
    return args


def _write_config(out, config, args, micro_batch, accumulation, groups, adapter_configs, dataset, template_of) -> None:
    import transformers

    from flora import __version__

    counts: dict[str, int] = {}
    for item in dataset.items:
        counts[item["adapter_name"] or FULL] = counts.get(item["adapter_name"] or FULL, 0) + 1
    adapters = {
        name: {"tasks": tasks, "examples": counts.get(name, 0),
               "learning_rate": config.adapter_lr.get(name, config.learning_rate),
               "config": adapter_configs[name].to_peft_dict()}
        for name, tasks in groups.items()
    }  # fmt: skip
    templates = {name: template.describe() for name, template in template_of.items() if config.template in (None, name)}
    data = {
        "config": config.to_dict(),
        "resolved": {
            "adapters": adapters, "examples": len(dataset), "world_size": args.world_size,
            "per_device_batch_size": micro_batch, "gradient_accumulation_steps": accumulation,
            "templates": templates,
            "versions": {"flora": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        },
    }  # fmt: skip
    from flora.data.formats import write_text_atomic

    write_text_atomic(out / CONFIG_FILE, json.dumps(data, indent=1, default=str) + "\n")


# -- in-memory training of adapters already in a model -------------------------------------------


def train_adapters(
    model: AdapterModel,
    examples: Sequence[AdapterExample],
    output_dir: str | Path,
    *,
    learning_rate: float = 1e-3,
    max_steps: int = 100,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    warmup_ratio: float = 0.1,
    seed: int = 0,
    logging_steps: int = 10,
    adapter_lr: Mapping[str, float] | None = None,
    **training_arguments,
) -> dict:
    """Train every adapter named in ``examples`` (all must already be in ``model``) in one run.

    Returns Trainer's training metrics. Extra keyword arguments go to ``TrainingArguments``.
    """
    unknown = sorted({e.adapter for e in examples} - set(model.list_adapters()) - {None})
    if unknown:
        raise ValueError(f"examples name adapters {unknown} that the model lacks (loaded: {model.list_adapters()})")
    if not examples:
        raise ValueError("no training examples (expected at least one)")
    random.Random(seed).shuffle(examples := list(examples))
    training_arguments.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    args = TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=learning_rate,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        lr_scheduler_type="linear",
        warmup_steps=int(warmup_ratio * max_steps),
        seed=seed,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        **training_arguments,
    )
    trainer = FloraTrainer(
        model=model,
        args=args,
        train_dataset=EncodedExamples(examples, model.tokenizer),
        data_collator=MixedAdapterCollator(model.tokenizer.pad_token_id),
        adapter_lr=adapter_lr,
    )
    result = trainer.train()
    model.eval()
    return result.metrics


class _CallableModule(types.ModuleType):
    """Makes ``flora.train(...)`` call `train` while ``flora.train.X`` stays this module."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
