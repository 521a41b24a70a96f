"""Study specs: a TOML file naming the model, the data, the grid's axes and the fixed settings.

A spec (see ``docs/studies.md``; the built-in ones are ``flora/study/specs/*.toml``)::

    name = "my-study"
    seeds = [42]
    default_profile = "smoke"          # the profile used when none is asked for
    [model]       name, dtype, strategy, device (auto or cpu)
    [data]        source ("suite" or "superni"), path, train_split, test_split, tasks, test_tasks,
                  suite_seed, train_instances, validation_instances, seen_instances,
                  unseen_instances, validation_tasks, validation_task_instances, task_order_seed,
                  template, max_length
    [training]    max_steps or epochs, batch_size, lr_scheduler, warmup_ratio, weight_decay,
                  max_grad_norm, adapter_per, training_args (more TrainingArguments, e.g.
                  ``{bf16 = true}``); [training.<method>]: the same keys for one method
    [evaluation]  evaluations (validation-loss points during training), loss_instances, metric,
                  zero_shot, batch_size, new_token_margin (a row's budget of new tokens: its task's
                  longest reference + margin), max_new_tokens (a cap on that budget)
    [methods.<method>]  fixed hyperparameters of that method (its config's fields)
    [run]         pack, pack_size, micro_batch_size, num_cpus, num_gpus (how, not what: not part
                  of the study's identity)
    [report]      findings ("peft-instruction", "flora-domains" or "none"), margin (the
                  non-inferiority margin, in score points)
    [[experiments]]  name, plot, and the axes: method, learning_rate, size, num_tasks, model, seed
    [profiles.<name>]  a partial spec merged over the rest (tables merge key by key; any other
                  value, ``experiments`` included, is replaced)

An experiment is the product of its axes. ``learning_rate`` and ``size`` take a value, a list, or a
table by method (``{lora = [1e-4, 1e-3], bottleneck = 1e-4}``); every method of the experiment
needs a learning rate. ``size`` is the method's size knob (`SIZE_SETTINGS`: LoRA/FLoRA rank ``r``,
the bottleneck ``size``, prompt/prefix ``num_virtual_tokens``); LoRA's ``alpha`` follows ``r``
(alpha = r, as the PEFT study) unless ``[methods.lora]`` fixes it. ``num_tasks`` trains on the
first n training tasks (in an order shuffled by ``data.task_order_seed``); ``seed`` defaults to
``seeds``. The union of the experiments' trials is the study (a trial in two experiments runs once).

Everything is checked when the spec loads: unknown keys, axes and methods, values of the wrong
type, method hyperparameters; the errors name the key and list what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora.methods import METHODS
from flora.training.config import ADAPTER_PER, DEVICES, DTYPES, TrainConfig
from flora.training.hyperparameters import FULL, coerce_settings, method_names

SPECS_DIR = Path(__file__).parent / "specs"
AXES = ("method", "learning_rate", "size", "num_tasks", "model", "seed")
SIZE_SETTINGS = {method.name: method.size for method in METHODS.values() if method.size}  # method -> its size field
FINDINGS = ("peft-instruction", "flora-domains", "none")
DATA_SOURCES = ("suite", "superni")
METRICS = ("rougeL", "exact_match", "primary")  # primary: each task's own metric

# Per section: {key: (kind, default)}. Kinds: str, int, float, bool, strs (list of strings),
# names (a string or a list of strings), ints. None: no default (the key may be absent).
SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "model": {"name": ("str", "smollm2-135m"), "dtype": ("str", "float32"), "strategy": ("str", "auto"),
              "device": ("str", "auto")},
    "data": {
        "source": ("str", "suite"), "path": ("str", None), "train_split": ("str", "splits/train_tasks.txt"),
        "test_split": ("str", "splits/test_tasks.txt"), "tasks": ("names", None), "test_tasks": ("names", None),
        "suite_seed": ("int", 0), "train_instances": ("int", 100), "validation_instances": ("int", 10),
        "seen_instances": ("int", 20), "unseen_instances": ("int", 100), "validation_tasks": ("int", 0),
        "validation_task_instances": ("int", 20), "task_order_seed": ("int", 0), "template": ("str", "sni"),
        "max_length": ("int", None),
    },
    "training": {
        "max_steps": ("int", None), "epochs": ("float", 1.0), "batch_size": ("int", 8),
        "lr_scheduler": ("str", "linear"), "warmup_ratio": ("float", 0.03), "weight_decay": ("float", 0.0),
        "max_grad_norm": ("float", 1.0), "adapter_per": ("str", None), "training_args": ("table", None),
    },
    "evaluation": {
        "evaluations": ("int", 8), "loss_instances": ("int", None), "metric": ("str", "rougeL"),
        "zero_shot": ("bool", True), "batch_size": ("int", 16), "max_new_tokens": ("int", None),
        "new_token_margin": ("int", 8),
    },
    "run": {
        "pack": ("bool", True), "pack_size": ("int", 8), "micro_batch_size": ("int", None),
        "num_cpus": ("float", 1.0), "num_gpus": ("float", 0.0),
    },
    "report": {"findings": ("str", "none"), "margin": ("float", 2.0)},
}  # fmt: skip
TOP_LEVEL = ("name", "description", "default_profile", "seeds", *SCHEMA, "methods", "experiments", "profiles")
EXPERIMENT_KEYS = ("name", "plot", *AXES)
NOT_IDENTITY = ("description", "default_profile", "profile", "run", "report", "source")  # how, not what


@dataclass(frozen=True)
class Experiment:
    """One sub-grid: its name, the axis on its figures' x axis, and its axes' values.

    ``learning_rate`` and ``size`` are ``{method: [values]}`` (size None: the method's default);
    ``num_tasks`` is ``[n or None]`` (None: every training task).
    """

    name: str
    plot: str | None
    method: tuple[str, ...]
    learning_rate: dict[str, tuple[float, ...]]
    size: dict[str, tuple[int | None, ...]]
    num_tasks: tuple[int | None, ...]
    model: tuple[str, ...]
    seed: tuple[int, ...]


@dataclass
class StudySpec:
    """A loaded, validated study spec with its profile applied (`load_spec`)."""

    name: str
    description: str
    profile: str | None
    source: str
    seeds: list[int]
    model: dict[str, Any]
    data: dict[str, Any]
    training: dict[str, Any]
    training_by_method: dict[str, dict[str, Any]]
    evaluation: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    run: dict[str, Any]
    report: dict[str, Any]
    experiments: list[Experiment]

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain data (what the study store keeps)."""
        return {
            "name": self.name, "description": self.description, "profile": self.profile, "source": self.source,
            "seeds": self.seeds, "model": self.model, "data": self.data,
            "training": {**self.training, **self.training_by_method}, "evaluation": self.evaluation,
            "methods": self.methods, "run": self.run, "report": self.report,
            "experiments": [_experiment_dict(e) for e in self.experiments],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudySpec:
        """A spec back from `to_dict` (validated again)."""
        data = dict(data)
        return _build(data, data.get("profile"), str(data.get("source", "<stored>")))

    def identity(self) -> dict[str, Any]:
        """What decides the study's results: the spec without run, report, description and profile name."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IDENTITY}

    def fingerprint(self) -> str:
        return digest(self.identity())

    def training_for(self, method: str) -> dict[str, Any]:
        """The training settings of ``method``: ``[training]`` with ``[training.<method>]`` over it."""
        return {**self.training, **self.training_by_method.get(method, {})}


def digest(data: Any) -> str:
    """A short stable hash of JSON-able ``data``."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def builtin_specs() -> list[str]:
    """Names of the specs shipped with flora (``flora study run NAME``)."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.toml"))


def read_spec_file(name_or_path: str) -> tuple[dict[str, Any], str, Path | None]:
    """``(raw TOML data, source, directory for relative paths)`` of a built-in name or a TOML path."""
    path = Path(name_or_path)
    if path.suffix != ".toml" and (SPECS_DIR / f"{name_or_path}.toml").is_file():
        path, base = SPECS_DIR / f"{name_or_path}.toml", None
    elif path.is_file():
        base = path.resolve().parent
    else:
        raise FileNotFoundError(f"study spec {name_or_path!r} is neither a file nor a built-in spec "
                                f"(built-in: {', '.join(builtin_specs())})")  # fmt: skip
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    return data, str(path if base is not None else name_or_path), base


def load_spec(
    name_or_path: str,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> StudySpec:
    """Load a spec (a built-in name or a TOML path), apply ``profile`` (default: its
    ``default_profile``) and ``overrides`` (``{"training.max_steps": 10, ...}``), and validate it."""
    raw, source, base = read_spec_file(name_or_path)
    profiles = raw.pop("profiles", {})
    if not isinstance(profiles, dict) or not all(isinstance(p, dict) for p in profiles.values()):
        raise ValueError(f"{source}: 'profiles' must be a table of tables ([profiles.<name>])")
    profile = profile or raw.get("default_profile")
    if profile is not None:
        if profile not in profiles:
            raise ValueError(f"{source}: no profile {profile!r} (profiles: {', '.join(profiles) or 'none'})")
        if "profiles" in profiles[profile]:
            raise ValueError(f"{source}: profile {profile!r} may not define profiles")
        raw = merge(raw, profiles[profile])
    if base is not None and isinstance(raw.get("data"), dict) and isinstance(raw["data"].get("path"), str):
        raw["data"]["path"] = str((base / raw["data"]["path"]).resolve())
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, source)
    return _build(raw, profile, source)


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: tables key by key, any other value replaced."""
    result = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.max_steps=10"`` -> ``("training.max_steps", 10)``: the value is read as TOML
    (numbers, booleans, ``[lists]``, ``{tables}``, quoted strings), else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected SECTION.KEY=VALUE (e.g. training.max_steps=10)")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip(), parsed


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    target = raw
    for part in parts[:-1]:
        nxt = target.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"{source}: cannot set {dotted!r}: {part!r} is not a table")
        target = nxt
    target[parts[-1]] = value


# -- validation ------------------------------------------------------------------------------------


def _build(raw: dict[str, Any], profile: str | None, source: str) -> StudySpec:
    where = source
    unknown = [k for k in raw if k not in TOP_LEVEL and k not in ("profile", "source")]
    if unknown:
        raise ValueError(
            f"{where}: unknown key {', '.join(map(repr, unknown))} (expected one of {', '.join(TOP_LEVEL)})"
        )
    name = _value(raw.get("name"), "str", f"{where}: name")
    if not name:
        raise ValueError(f"{where}: 'name' is missing (expected the study's name)")
    description = _value(raw.get("description", ""), "str", f"{where}: description")
    seeds = _value(raw.get("seeds", [0]), "ints", f"{where}: seeds")
    if not seeds:
        raise ValueError(f"{where}: seeds is empty (expected at least one seed)")
    sections: dict[str, dict[str, Any]] = {}
    training_by_method: dict[str, dict[str, Any]] = {}
    names = method_names()
    for section, schema in SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise ValueError(f"{where}: [{section}] must be a table, got {given!r}")
        if section == "training":
            for method in [k for k, v in given.items() if isinstance(v, dict) and k not in schema]:
                if method not in names:
                    raise ValueError(f"{where}: [training.{method}]: {method!r} is not a method "
                                     f"(expected one of {', '.join(names)})")  # fmt: skip
                training_by_method[method] = _section(given[method], schema, f"{where}: training.{method}",
                                                      defaults=False)  # fmt: skip
            given = {k: v for k, v in given.items() if k not in training_by_method}
        sections[section] = _section(given, schema, f"{where}: {section}")
    _check_sections(sections, training_by_method, where)
    methods_raw = raw.get("methods", {})
    if not isinstance(methods_raw, dict):
        raise ValueError(f"{where}: [methods] must be a table of tables ([methods.<method>])")
    methods: dict[str, dict[str, Any]] = {}
    for method, settings in methods_raw.items():
        if method not in names or method == FULL:
            raise ValueError(f"{where}: [methods.{method}]: {method!r} is not an adapter method "
                             f"(expected one of {', '.join(n for n in names if n != FULL)})")  # fmt: skip
        if not isinstance(settings, dict):
            raise ValueError(f"{where}: [methods.{method}] must be a table of the method's hyperparameters")
        methods[method] = coerce_settings(method, settings, f"{where}: methods.{method}: ")
    experiments_raw = raw.get("experiments")
    if not isinstance(experiments_raw, list) or not experiments_raw:
        raise ValueError(f"{where}: no [[experiments]] (expected at least one, each with method and learning_rate)")
    experiments = [_experiment(e, i, seeds, sections["model"]["name"], where) for i, e in enumerate(experiments_raw)]
    seen: set[str] = set()
    for experiment in experiments:
        if experiment.name in seen:
            raise ValueError(f"{where}: two experiments are named {experiment.name!r} (names must be unique)")
        seen.add(experiment.name)
    return StudySpec(name, description, profile, source, seeds, sections["model"], sections["data"],
                     sections["training"], training_by_method, sections["evaluation"], methods, sections["run"],
                     sections["report"], experiments)  # fmt: skip


def _section(given: dict[str, Any], schema: dict[str, tuple[str, Any]], where: str, defaults: bool = True) -> dict:
    unknown = [k for k in given if k not in schema]
    if unknown:
        raise ValueError(f"{where}: unknown key {', '.join(map(repr, unknown))} (expected one of {', '.join(schema)})")
    result = {key: default for key, (_, default) in schema.items()} if defaults else {}
    for key, value in given.items():
        result[key] = _value(value, schema[key][0], f"{where}.{key}")
    return result


def _check_sections(s: dict[str, dict[str, Any]], by_method: dict[str, dict[str, Any]], where: str) -> None:
    def choice(section: str, key: str, choices) -> None:
        value = s[section][key]
        if value is not None and value not in choices:
            raise ValueError(f"{where}: {section}.{key} {value!r} is not valid (expected one of {', '.join(choices)})")

    from transformers.trainer_utils import SchedulerType

    schedulers = [t.value for t in SchedulerType]
    for method, training in [("", s["training"]), *by_method.items()]:
        if training.get("lr_scheduler") is not None and training["lr_scheduler"] not in schedulers:
            raise ValueError(
                f"{where}: training{'.' + method if method else ''}.lr_scheduler "
                f"{training['lr_scheduler']!r} is not valid (expected one of {', '.join(schedulers)})"
            )
    choice("data", "source", DATA_SOURCES)
    choice("model", "dtype", DTYPES)
    choice("model", "device", DEVICES)
    choice("training", "adapter_per", ADAPTER_PER)
    choice("evaluation", "metric", METRICS)
    choice("report", "findings", FINDINGS)
    positive = [("data", "train_instances"), ("training", "batch_size"), ("evaluation", "evaluations"),
                ("evaluation", "batch_size"), ("run", "pack_size")]  # fmt: skip
    for section, key in positive:
        if s[section][key] < 1:
            raise ValueError(f"{where}: {section}.{key}={s[section][key]} is invalid (expected an integer >= 1)")
    for key in ("validation_instances", "seen_instances", "unseen_instances", "validation_tasks",
                "validation_task_instances"):  # fmt: skip
        if s["data"][key] < 0:
            raise ValueError(f"{where}: data.{key}={s['data'][key]} is invalid (expected an integer >= 0)")
    if s["data"]["validation_instances"] < 1:
        raise ValueError(f"{where}: data.validation_instances must be >= 1 (learning rates are chosen on them)")
    if s["data"]["validation_tasks"] and s["data"]["validation_task_instances"] < 1:
        raise ValueError(f"{where}: data.validation_task_instances must be >= 1 when there are validation tasks")
    loss_instances = s["evaluation"]["loss_instances"]
    if loss_instances is not None and loss_instances < 1:
        raise ValueError(f"{where}: evaluation.loss_instances={loss_instances} is invalid (expected an integer >= 1, "
                         f"or leave it out: every validation instance)")  # fmt: skip
    if not s["report"]["margin"] >= 0:
        raise ValueError(f"{where}: report.margin={s['report']['margin']} is invalid (expected a number >= 0)")
    for method, training in [("", s["training"]), *by_method.items()]:
        # TrainConfig checks the values (scheduler name, ranges) as the trials will use them.
        merged = {**s["training"], **training}
        fields = {k: v for k, v in merged.items() if v is not None}
        try:
            TrainConfig(**fields).normalized()
        except ValueError as err:
            raise ValueError(f"{where}: training{'.' + method if method else ''}: {err}") from None


def _experiment(raw: Any, index: int, seeds: list[int], model: str, where: str) -> Experiment:
    at = f"{where}: experiments[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{at}: expected a table ([[experiments]]), got {raw!r}")
    unknown = [k for k in raw if k not in EXPERIMENT_KEYS]
    if unknown:
        raise ValueError(f"{at}: unknown axis or key {', '.join(map(repr, unknown))} "
                         f"(axes: {', '.join(AXES)}; keys: name, plot)")  # fmt: skip
    name = _value(raw.get("name"), "str", f"{at}.name")
    if not name:
        raise ValueError(f"{at}: 'name' is missing")
    at = f"{where}: experiment {name!r}"
    plot = _value(raw.get("plot"), "str", f"{at}.plot")
    if plot is not None and plot not in AXES:
        raise ValueError(f"{at}: plot {plot!r} is not an axis (expected one of {', '.join(AXES)})")
    if "method" not in raw or "learning_rate" not in raw:
        raise ValueError(f"{at}: needs the axes 'method' and 'learning_rate'")
    methods = tuple(_listed(raw["method"], "str", f"{at}.method"))
    names = method_names()
    for method in methods:
        if method not in names:
            raise ValueError(f"{at}: unknown method {method!r} (expected one of {', '.join(names)})")
    rates = _by_method(raw["learning_rate"], "float", methods, f"{at}.learning_rate")
    for method in methods:
        if method not in rates:
            raise ValueError(f"{at}: learning_rate has no value for method {method!r}")
        for rate in rates[method]:
            if not rate > 0 or math.isinf(rate):
                raise ValueError(f"{at}.learning_rate: {rate!r} is invalid (expected a number > 0)")
    sizes: dict[str, tuple[int | None, ...]] = {}
    if "size" in raw:
        sizes = _by_method(raw["size"], "int", methods, f"{at}.size")
        for method, values in sizes.items():
            if method not in SIZE_SETTINGS:
                raise ValueError(f"{at}.size: method {method!r} has no size (size applies to "
                                 f"{', '.join(SIZE_SETTINGS)}; give size as a table by method)")  # fmt: skip
            if any(v < 1 for v in values):
                raise ValueError(f"{at}.size: {list(values)} (expected integers >= 1)")
    sizes = {m: sizes.get(m, (None,)) for m in methods}
    num_tasks = tuple(_listed(raw["num_tasks"], "int", f"{at}.num_tasks")) if "num_tasks" in raw else (None,)
    if any(n is not None and n < 1 for n in num_tasks):
        raise ValueError(f"{at}.num_tasks: {list(num_tasks)} (expected integers >= 1)")
    models = tuple(_listed(raw["model"], "str", f"{at}.model")) if "model" in raw else (model,)
    seed = tuple(_listed(raw["seed"], "int", f"{at}.seed")) if "seed" in raw else tuple(seeds)
    for axis, values in (("method", methods), ("num_tasks", num_tasks), ("model", models), ("seed", seed)):
        if not values:
            raise ValueError(f"{at}.{axis} is empty (expected at least one value)")
    return Experiment(name, plot, methods, rates, sizes, num_tasks, models, seed)


def _by_method(value: Any, kind: str, methods: tuple[str, ...], where: str) -> dict[str, tuple]:
    if isinstance(value, dict):
        extra = [m for m in value if m not in methods]
        if extra:
            raise ValueError(f"{where}: method {', '.join(map(repr, extra))} is not an axis value of this "
                             f"experiment (methods: {', '.join(methods)})")  # fmt: skip
        return {m: tuple(_listed(v, kind, f"{where}.{m}")) for m, v in value.items()}
    values = tuple(_listed(value, kind, where))
    return {m: values for m in methods}


def _listed(value: Any, kind: str, where: str) -> list:
    items = value if isinstance(value, list) else [value]
    return [_value(item, kind, where) for item in items]


_KIND_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "ints": "a list of integers", "strs": "a list of strings",
               "names": "a string or a list of strings", "table": "a table"}  # fmt: skip


def _value(value: Any, kind: str, where: str) -> Any:
    """``value`` checked against ``kind`` (floats also take integers); None passes."""
    if value is None:
        return None
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "ints": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        "strs": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "names": isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
        "table": isinstance(value, dict),
    }[kind]
    if not ok:
        raise ValueError(f"{where}: {value!r} is not {_KIND_NAMES[kind]}")
    if kind == "float":
        if math.isnan(value):
            raise ValueError(f"{where}: {value!r} is not a number")
        return float(value)
    if kind == "names" and isinstance(value, str):
        return [value]
    return value


def _experiment_dict(e: Experiment) -> dict[str, Any]:
    return {"name": e.name, "plot": e.plot, "method": list(e.method),
            "learning_rate": {m: list(v) for m, v in e.learning_rate.items()},
            "size": {m: list(v) for m, v in e.size.items() if v != (None,)},
            "num_tasks": list(e.num_tasks) if e.num_tasks != (None,) else None,
            "model": list(e.model), "seed": list(e.seed)}  # fmt: skip
