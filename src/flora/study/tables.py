"""The tables behind a study's report, and the one place its numbers are rounded.

Owns the flat per-trial record (`trial_records`), the per-cell tables with 95 % intervals
(`cell_table`: one row per cell of an experiment, the learning rate chosen on validation marked),
the headline (`headline_rows`: each method's setting chosen on validation, with the zero-shot
base model), the category x method table of one-adapter-per-category studies (`category_table`),
and CSV / markdown renderings. CSV files hold the numbers as computed (no rounding); markdown shows
them through `fmt` (one decimal for scores), once: a number is never rounded twice. A score column
``c`` with ``c_low`` / ``c_high`` beside it is shown as ``value [low, high]``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from flora.study.stats import Estimate

if TYPE_CHECKING:
    from flora.study.results import CellKey, StudyResults

METHOD_NAMES = {"lora": "LoRA", "flora": "FLoRA", "ia3": "IA3", "bottleneck": "Adapter", "bitfit": "BitFit",
                "prompt_tuning": "Prompt tuning", "prefix_tuning": "Prefix tuning", "full": "Full FT",
                "zero_shot": "Zero-shot base model"}  # fmt: skip
SIZE_NAMES = {"lora": "r", "flora": "r", "bottleneck": "size", "prompt_tuning": "tokens", "prefix_tuning": "tokens"}
SIZE_AXES = {"lora": "rank", "flora": "rank", "bottleneck": "adapter size", "prompt_tuning": "virtual tokens",
             "prefix_tuning": "virtual tokens"}  # fmt: skip
RECORD_COLUMNS = (
    "id", "experiments", "method", "learning_rate", "size", "num_tasks", "model", "seed", "status",
    "trainable_params", "examples", "steps", "best_step", "validation_rougeL", "seen_rougeL", "seen_exact_match",
    "unseen_rougeL", "unseen_exact_match", "overall_rougeL", "overall_exact_match", "wall_s", "pack_size", "error",
)  # fmt: skip
# Columns holding a setting rather than a score: shown as written (1e-02, not 0.0).
EXACT_COLUMNS = frozenset({"learning_rate"})


def fmt(value: float | None, digits: int = 1, signed: bool = False) -> str:
    """The report's one rounding of a number: ``digits`` decimals (``-`` for None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_estimate(estimate: Estimate | None, signed: bool = False, digits: int = 1) -> str:
    """``"14.0 [10.2, 17.9]"``: an estimate with its 95 % interval."""
    if estimate is None:
        return "-"
    return (f"{fmt(estimate.value, digits, signed)} [{fmt(estimate.low, digits, signed)}, "
            f"{fmt(estimate.high, digits, signed)}]")  # fmt: skip


def format_rate(value: float) -> str:
    """A learning rate as written in specs: 1e-02, 8e-03, 1.5e-04 (0.3 and 0 as they are)."""
    if value == 0 or abs(value) >= 0.1:
        return f"{value:g}"
    exponent = math.floor(math.log10(abs(value)))
    return f"{round(value / 10**exponent, 6):g}e{exponent:+03d}"


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


def _interval(row: dict[str, Any], column: str, estimate: Estimate | None) -> None:
    row[column] = estimate.value if estimate else None
    row[f"{column}_low"] = estimate.low if estimate else None
    row[f"{column}_high"] = estimate.high if estimate else None


def cell_row(results: StudyResults, cell: CellKey, splits: Sequence[str]) -> dict[str, Any]:
    """A cell's settings, seeds, mean validation scores (points: what selection reads) and its
    test scores with their 95 % intervals (``<split>``, ``<split>_low``, ``<split>_high``)."""
    entry = results.cells[cell]
    done = bool(entry.done)
    row: dict[str, Any] = {
        "series": method_label(cell.method, cell.series.size), "method": cell.method, "size": cell.series.size,
        "num_tasks": cell.series.num_tasks, "learning_rate": cell.learning_rate, "model": cell.series.model,
        "seeds": len(entry.done), "unstable": entry.unstable, "trainable_params": entry.trainable_params,
    }  # fmt: skip
    for split in ("validation", "validation_tasks"):
        has = done and results.has(split)
        row[split] = results.validation_mean(cell, split) if has and results.tasks(cell, split) else None
    for split in splits:
        _interval(row, split, results.score(cell, split) if done else None)
    return row


def cell_table(results: StudyResults, cells: Sequence[CellKey], splits: Sequence[str]) -> list[dict[str, Any]]:
    """One `cell_row` per cell (in order), with ``chosen``: the test splits for which the cell's
    learning rate is its series' choice on validation, and ``edge`` when that choice is unbracketed."""
    rows = []
    by_series: dict[Any, list[CellKey]] = {}
    for cell in cells:
        by_series.setdefault(cell.series, []).append(cell)
    chosen: dict[CellKey, list[str]] = {}
    edges: dict[CellKey, str] = {}
    for series_cells in by_series.values():
        sweep = [c for c in results.series().get(series_cells[0].series, []) if results.cells[c].done]
        for split in splits:
            if sweep:
                choice = results.choose(sweep, split)
                chosen.setdefault(choice.cell, []).append(split)
                if not choice.bracketed:
                    edges[choice.cell] = choice.edge
    for cell in cells:
        row = cell_row(results, cell, splits)
        row["chosen"] = "/".join(chosen.get(cell, []))
        row["edge"] = edges.get(cell, "") if cell in chosen else ""
        rows.append(row)
    return rows


def headline_rows(results: StudyResults, splits: Sequence[str]) -> list[dict[str, Any]]:
    """The zero-shot base model, then per method its learning rate chosen on validation in its
    sweep (`StudyResults.sweep`), once per test split in ``splits`` (one row when both choose it)."""
    rows = []
    if results.zero_shot is not None and results.zero_shot.done:
        row = cell_row(results, results.zero_shot.key, splits)
        row.update(chosen="", edge="")
        rows.append(row)
    for method in results.methods():
        candidates = results.sweep(method)
        picks: dict[CellKey, list[tuple[str, str | None]]] = {}
        for split in splits:
            choice = results.choose(candidates, split)
            picks.setdefault(choice.cell, []).append((split, choice.edge))
        for cell, chosen_for in picks.items():
            row = cell_row(results, cell, splits)
            row["chosen"] = "/".join(s for s, _ in chosen_for)
            row["edge"] = "; ".join(f"{s}: {e}" for s, e in chosen_for if e)
            rows.append(row)
    return rows


def category_table(results: StudyResults, cells: Sequence[CellKey], split: str) -> tuple[list[str], list[dict]]:
    """Category x cell: per category the cell's score on that category's tasks of ``split`` with
    its interval; the last row is every task (the headline score). Returns ``(columns, rows)``."""
    columns = [f"{method_label(c.method, c.series.size)} lr {format_rate(c.learning_rate)}" for c in cells]
    tasks = {c: results.tasks(c, split) for c in cells}
    categories = sorted({results.split[t]["category"] for c in cells for t in tasks[c]})
    rows = []
    for category in [*categories, None]:
        row: dict[str, Any] = {"category": category or "all tasks"}
        for column, cell in zip(columns, cells, strict=True):
            chosen = [t for t in tasks[cell] if category is None or results.split[t]["category"] == category]
            _interval(row, column, results.score(cell, split, chosen) if chosen else None)
        rows.append(row)
    return columns, rows


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    return out.getvalue()


def to_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_display(row, c) for c in columns) + " |")
    return "\n".join(lines)


def _display(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return "-"
    if f"{column}_low" in row:
        return f"{fmt(value)} [{fmt(row[f'{column}_low'])}, {fmt(row[f'{column}_high'])}]"
    if isinstance(value, float) and column in EXACT_COLUMNS:
        return format_rate(value)
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)
