"""The tables behind a study's report, built from the store's trial rows.

Owns the flat per-trial record (`trial_records`), the per-experiment summaries (mean and standard
deviation over seeds for each method and x value: `experiment_table`), the category x method table
of one-adapter-per-category studies (`category_table`), the best trial of each method by
validation score (`best_by_method`), and CSV / markdown renderings. Scores are 0..100; ``seen`` is
ROUGE-L on held-out instances of a trial's training tasks, ``unseen`` on the test tasks.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

METHOD_NAMES = {"lora": "LoRA", "flora": "FLoRA", "ia3": "IA3", "bottleneck": "Adapter", "bitfit": "BitFit",
                "prompt_tuning": "Prompt tuning", "prefix_tuning": "Prefix tuning", "full": "Full FT"}  # fmt: skip
SIZE_NAMES = {"lora": "r", "flora": "r", "bottleneck": "size", "prompt_tuning": "tokens", "prefix_tuning": "tokens"}
RECORD_COLUMNS = (
    "id", "experiments", "method", "learning_rate", "size", "num_tasks", "model", "seed", "status",
    "trainable_params", "examples", "steps", "best_step", "validation_rougeL", "seen_rougeL", "seen_exact_match",
    "unseen_rougeL", "unseen_exact_match", "overall_rougeL", "overall_exact_match", "wall_s", "pack_size", "error",
)  # fmt: skip


def method_label(method: str, size: int | None = None) -> str:
    """``"LoRA r8"``, ``"IA3"``: a method (and its size) as the report names it."""
    name = METHOD_NAMES.get(method, method)
    return f"{name} {SIZE_NAMES[method]}{size}" if size is not None and method in SIZE_NAMES else name


def trial_records(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat record per trial row (`RECORD_COLUMNS`; ``experiments`` joined by ``;``)."""
    records = []
    for row in rows:
        record = {column: row.get(column) for column in RECORD_COLUMNS}
        record["experiments"] = ";".join(row["experiments"])
        record["error"] = (row.get("error") or "").strip().splitlines()[-1] if row.get("error") else None
        records.append(record)
    return records


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for no values; std None for one value)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def experiment_axis(experiment: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """The x axis of an experiment's figure: its ``plot``, else the first axis along which one method's
    trials take several values (methods may each sit at their own learning rate: that is no axis)."""
    if experiment.get("plot"):
        return experiment["plot"]
    methods = {r["method"] for r in records}
    for axis in ("learning_rate", "size", "num_tasks", "model"):
        if any(len({r[axis] for r in records if r["method"] == method}) > 1 for method in methods):
            return axis
    return "learning_rate"


def experiment_table(records: Sequence[dict[str, Any]], axis: str) -> list[dict[str, Any]]:
    """Per series (method, and size when size is not the x axis) and x value: the mean and standard
    deviation over seeds of validation, seen and unseen ROUGE-L, the trials, the unstable ones, the
    trainable parameters."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        size = record["size"] if axis != "size" else None
        groups.setdefault((record["method"], size, record[axis]), []).append(record)
    table = []
    for (method, size, x), members in sorted(groups.items(), key=lambda kv: (kv[0][0], _sortable(kv[0][1]),
                                                                              _sortable(kv[0][2]))):  # fmt: skip
        done = [m for m in members if m["status"] == "done"]
        row: dict[str, Any] = {"series": method_label(method, size), "method": method, axis: x}
        for column in ("validation_rougeL", "seen_rougeL", "unseen_rougeL"):
            mean, std = mean_std([m[column] for m in done])
            row[column], row[f"{column}_std"] = _round(mean), _round(std)
        row["trials"] = len(members)
        row["done"] = len(done)
        row["unstable"] = sum(m["status"] == "unstable" for m in members)
        row["trainable_params"] = max((m["trainable_params"] or 0) for m in members) or None
        table.append(row)
    return table


def best_by_method(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each method, the finished trial with the best validation ROUGE-L (as the paper selects),
    in the order methods first appear. Validation scores compare only over one validation set (held-out
    instances of the training tasks), so only trials on the most training tasks take part: the
    number-of-tasks axis's smaller task sets are left out."""
    done = [r for r in records if r["status"] == "done" and r["validation_rougeL"] is not None]
    most = max((r["num_tasks"] or 0 for r in done), default=0)
    best: dict[str, dict[str, Any]] = {}
    for record in done:
        if (record["num_tasks"] or 0) != most:
            continue
        current = best.get(record["method"])
        if current is None or record["validation_rougeL"] > current["validation_rougeL"]:
            best[record["method"]] = record
    return list(best.values())


def category_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Category x trial (method and size) table of the category scores: per category the mean over
    its tasks of each task's primary metric (exact match or ROUGE-L). Trials with the same method,
    size and learning rate are averaged over seeds. Returns ``(columns, rows)``; the last row is the
    mean over categories."""
    done = [row for row in rows if row["status"] == "done" and row.get("scores")]
    rates: dict[str, set[float]] = {}
    for row in done:
        rates.setdefault(method_label(row["method"], row["size"]), set()).add(row["learning_rate"])
    columns: dict[str, list[dict[str, Any]]] = {}
    for row in done:
        label = method_label(row["method"], row["size"])
        if len(rates[label]) > 1:
            label = f"{label} lr {format_rate(row['learning_rate'])}"
        columns.setdefault(label, []).append(row)
    per_column: dict[str, dict[str, float]] = {}
    for label, members in columns.items():
        sums: dict[str, list[float]] = {}
        for member in members:
            for category, value in category_scores(member["scores"]).items():
                sums.setdefault(category, []).append(value)
        per_column[label] = {c: statistics.fmean(v) for c, v in sums.items()}
    categories = sorted({c for values in per_column.values() for c in values})
    table = [{"category": c, **{label: _round(per_column[label].get(c)) for label in per_column}} for c in categories]
    if categories:
        table.append({"category": "mean", **{label: _round(statistics.fmean(per_column[label].values()))
                                              for label in per_column}})  # fmt: skip
    return list(per_column), table


def category_scores(scores: dict[str, Any]) -> dict[str, float]:
    """Per category, the mean over its tasks of each task's primary-metric score."""
    by_category: dict[str, list[float]] = {}
    for task in scores.get("tasks", {}).values():
        if task.get("score") is not None:
            by_category.setdefault(task["category"], []).append(task["score"])
    return {c: statistics.fmean(v) for c, v in by_category.items()}


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _cell(row.get(c)) for c in columns})
    return out.getvalue()


def to_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_display(row.get(c), c) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> Any:
    return "" if value is None else value


# Columns holding a setting rather than a score: shown as written (1e-02, not 0.0).
EXACT_COLUMNS = frozenset({"learning_rate"})


def format_rate(value: float) -> str:
    """A learning rate as written in specs: 1e-02, 8e-03, 1.5e-04 (0.3 and 0 as they are)."""
    if value == 0 or abs(value) >= 0.1:
        return f"{value:g}"
    exponent = math.floor(math.log10(abs(value)))
    return f"{round(value / 10**exponent, 6):g}e{exponent:+03d}"


def _display(value: Any, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and column in EXACT_COLUMNS:
        return format_rate(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e6):
            return f"{value:.0e}" if abs(value) < 1e-2 else f"{value:.3g}"
        return f"{value:.1f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(value, digits)


def _sortable(value: Any) -> tuple:
    return (value is None, value if value is not None else 0)
