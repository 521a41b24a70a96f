"""Training data: which examples a job trains on, and which adapter each one trains.

Owns `AdapterExample` (adapter, prompt, response), the selection of training instances from the
built-in suite or data files (`load_training_samples`), the assignment of instances to adapters
(one adapter, one per task or category, or explicit groups: `assign_adapters`; with each adapter's
config: `resolve_job_data`), and the tokenized dataset and collator that carry each row's adapter
name into the batch (`encode_training_examples`, `EncodedExamples`, `MixedAdapterCollator`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

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
    Sample,
    Template,
    samples_from_alpaca,
    samples_from_prompt_completion,
    samples_from_tasks,
)
from flora.methods import AdapterConfig
from flora.training.config import TrainConfig
from flora.training.hyperparameters import FULL, build_adapter_config


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


def resolve_job_data(
    config: TrainConfig,
) -> tuple[list[tuple[Sample, str]], list[str | None], dict[str, list[str]], dict[str, AdapterConfig]]:
    """What a job trains, before any model loads: ``(loaded, adapter_of, groups, adapter_configs)``.

    ``loaded``: `load_training_samples`; ``adapter_of`` and ``groups``: `assign_adapters`;
    ``adapter_configs``: each adapter's method config (``settings`` with its ``adapter_settings``).
    Raises for no examples, and for ``adapter_lr`` / ``adapter_settings`` naming adapters the job lacks.
    """
    loaded = load_training_samples(config)
    if not loaded:
        raise ValueError(f"no training examples in {config.data or 'the built-in suite'} (expected at least one)")
    adapter_of, groups = assign_adapters([s for s, _ in loaded], config)
    unknown_adapters = sorted((set(config.adapter_lr) | set(config.adapter_settings)) - set(groups))
    if unknown_adapters:
        raise ValueError(f"adapter_lr / adapter_settings name adapters {unknown_adapters} that this run does not "
                         f"train (adapters: {', '.join(groups) or 'none: full fine-tuning'})")  # fmt: skip
    adapter_configs = {
        name: build_adapter_config(config.method, {**config.settings, **config.adapter_settings.get(name, {})},
                                   f"adapter {name}: ")
        for name in groups
    }  # fmt: skip
    return loaded, adapter_of, groups, adapter_configs


def encode_training_examples(
    config: TrainConfig,
    loaded: Sequence[tuple[Sample, str]],
    adapter_of: Sequence[str | None],
    tokenizer,
    max_length: int | None,
) -> tuple[EncodedExamples, dict[str, Template], int]:
    """The tokenized training set of a job: ``(dataset, {template name: Template}, dropped)``.

    Each sample of ``loaded`` (`load_training_samples`) is rendered with ``config.template`` or its
    default template and trains ``adapter_of[i]``; examples are cut to ``max_length`` tokens, and
    those whose response is cut off entirely are dropped (``dropped`` counts them).
    """
    used = sorted({config.template or default for _, default in loaded})
    template_of = {name: Template(name, config.pos_examples if name == "sni" else 0, config.chat) for name in used}
    examples = [
        AdapterExample(adapter, template_of[config.template or default].render(sample, tokenizer), sample.references[0])
        for (sample, default), adapter in zip(loaded, adapter_of, strict=True)
    ]  # fmt: skip
    dataset = EncodedExamples(examples, tokenizer, max_length)
    kept = [i for i, item in enumerate(dataset.items) if any(label != -100 for label in item["labels"][1:])]
    if not kept:
        raise ValueError(f"every example's response is cut off by max_length={max_length} (no tokens to train on)")
    dropped = len(dataset.items) - len(kept)
    dataset.items = [dataset.items[i] for i in kept]
    return dataset, template_of, dropped


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
