"""Evaluation: batched greedy generation where every row uses its own adapter, then official scores.

`evaluate` takes samples (any mix of tasks), a template, and a routing (which adapter each task
or category uses; one adapter for all; or none), generates greedily in batches sorted by prompt
length, and scores each prediction with `flora.metrics` (exact match and ROUGE-L, per task, per
category, per adapter, for seen and unseen tasks, overall). `EvalResult` writes the scores with
every setting as JSON, and the predictions as JSONL.

Generation, per row: from exactly the prompt ids (`flora.data.encode_prompt`); at most the
row's task budget of new tokens (its longest reference in tokens plus a margin, unless fixed);
stopped at EOS, and at the first newline when no reference of its task has one. A row's
prediction depends only on its own prompt and adapter, never on its batch-mates' settings.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from flora.data.encoding import collate_prompts, encode_prompt, pad_token_id
from flora.data.formats import write_text_atomic
from flora.data.templates import Sample, Template
from flora.metrics import mean_scores, score_instance

BASE_NAMES = ("__base__", "none", "base")
DEFAULT_MARGIN = 8
METRIC_DESCRIPTION = (
    "Super-NaturalInstructions official: ROUGE-L F-measure of rouge_score RougeScorer(['rougeL'], "
    "use_stemmer=True) with its default tokenizer; exact match after lower-casing, removing "
    "string.punctuation and collapsing white space (articles kept); max over references; mean x 100"
)


@dataclass
class EvalRow:
    """One instance's prediction and scores (0..100)."""

    task: str
    id: str
    category: str
    seen: bool | None
    metric: str
    adapter: str | None
    prompt: str
    prediction: str
    references: list[str]
    exact_match: float
    rougeL: float  # noqa: N815  (the official metric's name)


@dataclass
class EvalResult:
    """Rows, aggregated scores and the settings that produced them."""

    rows: list[EvalRow]
    scores: dict[str, Any]
    settings: dict[str, Any]
    time_s: float

    def to_json(self) -> dict[str, Any]:
        return {"scores": self.scores, "settings": self.settings, "time_s": round(self.time_s, 3)}

    def write_json(self, path: str | os.PathLike) -> Path:
        """Scores and settings as JSON (atomic)."""
        return write_text_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")

    def write_predictions(self, path: str | os.PathLike) -> Path:
        """One JSON line per instance: task, id, adapter, prompt, prediction, references, scores (atomic)."""
        lines = [json.dumps(asdict(row), ensure_ascii=False) for row in self.rows]
        return write_text_atomic(path, "".join(line + "\n" for line in lines))


# -- routing ------------------------------------------------------------------------------------


def _is_base(name: str | None) -> bool:
    return name is None or name in BASE_NAMES


def resolve_routes(
    samples: Sequence[Sample],
    routes: Mapping[str, str | None] | None = None,
    adapter: str | None = None,
    available: Collection[str] | None = None,
) -> list[str | None]:
    """The adapter of each sample: ``[n]`` names, None for the base model.

    Args:
        routes: ``{task or category or "*": adapter name}``; a task's own entry wins over its
            category's, and ``"*"`` over ``adapter``. ``"__base__"``/``"none"``/None mean the base model.
        adapter: the adapter of every sample no route names (None: the base model).
        available: the adapters that exist, to check the names against.
    """
    routes = dict(routes or {})
    default = routes.pop("*", adapter)
    tasks = {s.task for s in samples}
    categories = {s.category for s in samples}
    unknown = [key for key in routes if key not in tasks and key not in categories]
    if unknown:
        raise KeyError(
            f"route key(s) {', '.join(map(repr, unknown))} name no task or category of the data "
            f"(it has {len(tasks)} tasks in categories: {', '.join(sorted(categories))})"
        )
    names = [routes.get(s.task, routes.get(s.category, default)) for s in samples]
    names = [None if _is_base(n) else n for n in names]
    if available is not None:
        missing = sorted({n for n in names if n is not None and n not in available})
        if missing:
            raise KeyError(
                f"adapter(s) {', '.join(map(repr, missing))} are routed to but not loaded "
                f"(loaded: {', '.join(sorted(available)) or 'none'})"
            )
    return names


# -- generation ---------------------------------------------------------------------------------


def newline_token_mask(tokenizer: Any) -> Tensor:
    """BoolTensor ``[vocab]``: True for every token whose text contains a newline."""
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    return torch.tensor(["\n" in text for text in texts], dtype=torch.bool)


class RowStop(StoppingCriteria):
    """Per row: done after ``budgets[i]`` new tokens, or after a newline token where ``at_newline[i]``."""

    def __init__(self, prompt_width: int, budgets: Sequence[int], at_newline: Sequence[bool], newline: Tensor | None):
        self.prompt_width = prompt_width
        self.budgets = torch.tensor(list(budgets), dtype=torch.long)
        self.at_newline = torch.tensor(list(at_newline), dtype=torch.bool)
        self.newline = newline

    def __call__(self, input_ids: Tensor, scores: Any = None, **kwargs: Any) -> Tensor:
        done = (input_ids.shape[1] - self.prompt_width) >= self.budgets.to(input_ids.device)
        if self.newline is not None and bool(self.at_newline.any()):
            last = input_ids[:, -1].cpu()
            in_vocab = last < len(self.newline)
            is_newline = torch.zeros_like(in_vocab)
            is_newline[in_vocab] = self.newline[last[in_vocab]]
            done = done | (is_newline & self.at_newline).to(input_ids.device)
        return done


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(model, "generation_config", None) or getattr(
        getattr(model, "base_model", None), "generation_config", None
    )
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(ids)


def _supports_adapters(model: Any) -> bool:
    return hasattr(model, "list_adapters") and hasattr(model, "routed")


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    adapter_names: Sequence[str | None] | None = None,
    max_new_tokens: int | Sequence[int] = 32,
    stop_at_newline: bool | Sequence[bool] = False,
    batch_size: int = 16,
    progress: bool = True,
    newline_mask: Tensor | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompt_ids`` (``[n]`` lists of ids), in their order.

    Rows are batched by prompt length (longest first), left-padded, and each row ``i`` runs
    through ``adapter_names[i]`` (None: the base model) for at most ``max_new_tokens[i]`` tokens,
    stopping at EOS and, where ``stop_at_newline[i]``, at the first newline. Returns ``[n]``
    strings, stripped of white space.
    """
    n = len(prompt_ids)
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    newline_rows = [stop_at_newline] * n if isinstance(stop_at_newline, bool) else list(stop_at_newline)
    names = list(adapter_names) if adapter_names is not None else [None] * n
    if not len(budgets) == len(newline_rows) == len(names) == n:
        raise ValueError(
            f"{n} prompts but {len(budgets)} budgets, {len(newline_rows)} stop flags and {len(names)} adapter "
            f"names (expected one of each per prompt)"
        )
    if any(b < 1 for b in budgets):
        raise ValueError(f"max_new_tokens must be >= 1, got {min(budgets)}")
    adapters = _supports_adapters(model)
    if not adapters and any(name is not None for name in names):
        raise ValueError(f"{type(model).__name__} cannot route rows to adapters; wrap it in flora.AdapterModel")
    if newline_mask is None and any(newline_rows):
        newline_mask = newline_token_mask(tokenizer)
    pad = pad_token_id(tokenizer)
    stops = eos_ids(model, tokenizer)
    order = sorted(range(n), key=lambda i: (-len(prompt_ids[i]), i))
    device = getattr(model, "device", torch.device("cpu"))
    outputs: list[str] = [""] * n
    with tqdm(total=n, desc="generate", unit="row", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            input_ids, mask = collate_prompts([prompt_ids[i] for i in rows], pad)
            width = input_ids.shape[1]
            criteria = StoppingCriteriaList(
                [RowStop(width, [budgets[i] for i in rows], [newline_rows[i] for i in rows], newline_mask)]
            )
            kwargs: dict[str, Any] = dict(
                attention_mask=mask.to(device),
                max_new_tokens=max(budgets[i] for i in rows),
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=stops or None,
                stopping_criteria=criteria,
            )
            if adapters:
                kwargs["adapter_names"] = [names[i] for i in rows]
            with torch.no_grad():
                generated = model.generate(input_ids.to(device), **kwargs)
            for offset, i in enumerate(rows):
                new = generated[offset, width:].tolist()
                cut = min([new.index(e) for e in stops if e in new] + [budgets[i]])
                text = tokenizer.decode(new[:cut], skip_special_tokens=True)
                if newline_rows[i]:
                    text = text.split("\n", 1)[0]
                outputs[i] = text.strip()
            bar.update(len(rows))
            if on_batch is not None:
                on_batch(len(rows))
    return outputs


# -- evaluation ---------------------------------------------------------------------------------


def task_budgets(tokenizer: Any, samples: Sequence[Sample], margin: int = DEFAULT_MARGIN) -> dict[str, int]:
    """Per task: the longest reference of its samples in tokens, plus ``margin``."""
    longest: dict[str, int] = {}
    for sample in samples:
        for reference in sample.references:
            length = len(tokenizer(reference, add_special_tokens=False)["input_ids"])
            longest[sample.task] = max(longest.get(sample.task, 0), length)
    return {task: length + margin for task, length in longest.items()}


def task_stops_at_newline(samples: Sequence[Sample]) -> dict[str, bool]:
    """Per task: True when none of its samples' references contains a newline."""
    stops: dict[str, bool] = {}
    for sample in samples:
        single_line = all("\n" not in r.strip() for r in sample.references)
        stops[sample.task] = stops.get(sample.task, True) and single_line
    return stops


def _group(rows: Sequence[EvalRow], key: Callable[[EvalRow], Any]) -> dict[Any, list[EvalRow]]:
    groups: dict[Any, list[EvalRow]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def aggregate(rows: Sequence[EvalRow], task_info: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Scores overall, for seen and unseen tasks, per category, per adapter and per task."""
    as_scores = [{"exact_match": r.exact_match, "rougeL": r.rougeL} for r in rows]
    scores: dict[str, Any] = {"overall": mean_scores(as_scores)}
    if any(r.seen is not None for r in rows):
        for label, flag in (("seen", True), ("unseen", False)):
            chosen = [s for s, r in zip(as_scores, rows, strict=True) if r.seen is flag]
            scores[label] = mean_scores(chosen)
            scores[label]["tasks"] = len({r.task for r in rows if r.seen is flag})
    scores["categories"] = {
        category: mean_scores({"exact_match": r.exact_match, "rougeL": r.rougeL} for r in members)
        | {"tasks": len({r.task for r in members})}
        for category, members in sorted(_group(rows, lambda r: r.category).items())
    }
    scores["adapters"] = {
        name or "__base__": mean_scores({"exact_match": r.exact_match, "rougeL": r.rougeL} for r in members)
        for name, members in _group(rows, lambda r: r.adapter).items()
    }
    tasks = {}
    for task, members in _group(rows, lambda r: r.task).items():
        first = members[0]
        entry = mean_scores({"exact_match": r.exact_match, "rougeL": r.rougeL} for r in members)
        entry.update(category=first.category, seen=first.seen, metric=first.metric, adapter=first.adapter)
        entry["score"] = entry[first.metric]
        entry.update((task_info or {}).get(task, {}))
        tasks[task] = entry
    scores["tasks"] = tasks
    return scores


def evaluate(
    model: Any,
    samples: Sequence[Sample],
    tokenizer: Any = None,
    *,
    template: Template | None = None,
    adapters: Mapping[str, str | os.PathLike] | None = None,
    routes: Mapping[str, str | None] | None = None,
    adapter: str | None = None,
    seen_tasks: Collection[str] | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    new_token_margin: int = DEFAULT_MARGIN,
    progress: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Generate a prediction for every sample and score it.

    Args:
        model: a `flora.AdapterModel` (or a plain transformers model when no adapter is used).
        samples: ``[n]`` `Sample` s of any mix of tasks (see `flora.data.samples_from_tasks`).
        tokenizer: defaults to ``model.tokenizer``.
        template: how samples become prompts (default: the SNI definition-only template).
        adapters: ``{name: PEFT directory}`` to load first (names already loaded are kept).
        routes: ``{task or category or "*": adapter name}`` (see `resolve_routes`).
        adapter: the adapter of every row no route names (None: the base model).
        seen_tasks: the tasks seen in training (others count as unseen); None: not reported.
        batch_size: rows per generate call.
        max_new_tokens: a fixed budget for every row; None: per task, its longest reference
            in tokens plus ``new_token_margin``.
        settings: extra entries for the result's settings (e.g. the model's name).

    Returns:
        an `EvalResult` whose ``scores`` hold ``overall``, ``seen``/``unseen``, ``categories``,
        ``adapters`` and ``tasks`` (each ``exact_match``, ``rougeL`` in 0..100 and ``n``).
    """
    if not samples:
        raise ValueError("no samples to evaluate (expected at least one)")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer= or use a model with a .tokenizer")
    template = template or Template()
    for name, path in (adapters or {}).items():
        if name not in model.list_adapters():
            model.load_adapter(str(path), adapter_name=name)
    available = model.list_adapters() if _supports_adapters(model) else []
    names = resolve_routes(samples, routes, adapter, available)
    prompts = [template.render(s, tokenizer) for s in samples]
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    if max_new_tokens is not None:
        budgets = {s.task: max_new_tokens for s in samples}
    else:
        budgets = task_budgets(tokenizer, samples, new_token_margin)
    newline = task_stops_at_newline(samples)
    started = time.perf_counter()
    predictions = generate_texts(
        model, tokenizer, prompt_ids, names,
        max_new_tokens=[budgets[s.task] for s in samples],
        stop_at_newline=[newline[s.task] for s in samples],
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    seen = set(seen_tasks) if seen_tasks is not None else None
    rows = []
    for sample, name, prompt, prediction in zip(samples, names, prompts, predictions, strict=True):
        scores = score_instance(prediction, sample.references)
        rows.append(
            EvalRow(
                task=sample.task,
                id=sample.id,
                category=sample.category,
                seen=None if seen is None else sample.task in seen,
                metric=sample.metric,
                adapter=name,
                prompt=prompt,
                prediction=prediction,
                references=list(sample.references),
                exact_match=scores["exact_match"],
                rougeL=scores["rougeL"],
            )  # fmt: skip
        )
    task_info = {task: {"max_new_tokens": budgets[task], "stop_at_newline": newline[task]} for task in budgets}
    all_settings: dict[str, Any] = dict(settings or {})
    all_settings.update(
        template=template.describe(tokenizer),
        adapters={n: str(p) for n, p in (adapters or {}).items()} or None,
        routes=dict(routes or {}) or None,
        default_adapter=adapter,
        batch_size=batch_size,
        max_new_tokens=(
            max_new_tokens if max_new_tokens is not None else f"per task: longest reference + {new_token_margin}"
        ),
        new_token_margin=new_token_margin,
        decoding="greedy; stop at EOS, and at the first newline for tasks whose references are single-line",
        metrics=METRIC_DESCRIPTION,
        instances=len(samples),
        tasks=len(budgets),
        bos_token_added=bool(prompt_ids and prompt_ids[0][:1] == [getattr(tokenizer, "bos_token_id", None)]),
        generation_time_s=round(elapsed, 3),
        rows_per_s=round(len(samples) / elapsed, 3) if elapsed > 0 else None,
        versions=_versions(),
        device=str(getattr(model, "device", "cpu")),
        torch_threads=torch.get_num_threads(),
    )
    return EvalResult(rows=rows, scores=aggregate(rows, task_info), settings=all_settings, time_s=elapsed)


def _versions() -> dict[str, str]:
    import transformers

    import flora

    return {
        "flora": getattr(flora, "__version__", "?"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
