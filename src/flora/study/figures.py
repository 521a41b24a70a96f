"""The report's figures (matplotlib, Agg backend, PNG), each drawn from a table of `flora.study.tables`.

- `experiment_figure`: seen and unseen ROUGE-L against an experiment's axis (learning rate, size,
  number of training tasks), one line per method (mean over seeds, bars: standard deviation),
  unstable trials (NaN) as crosses on the x axis;
- `params_figure`: score against trainable parameters (log scale), every finished trial;
- `seen_unseen_figure`: unseen against seen ROUGE-L, every finished trial;
- `loss_figure`: training-loss curves, one panel per method, colour by learning rate;
- `category_figure`: the category x method table as a heat map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flora.io import atomic_write  # noqa: E402
from flora.study.tables import METHOD_NAMES, format_rate, method_label  # noqa: E402

AXIS_LABELS = {"learning_rate": "learning rate", "size": "rank / adapter size / virtual tokens",
               "num_tasks": "training tasks", "model": "model", "seed": "seed", "method": "method"}  # fmt: skip
LOG_AXES = ("learning_rate", "size")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight",
                                               metadata={"Software": None}))  # fmt: skip
    plt.close(fig)
    return path


def _panels(has_unseen: bool) -> list[tuple[str, str]]:
    panels = [("seen_rougeL", "seen tasks (held-out instances)")]
    if has_unseen:
        panels.append(("unseen_rougeL", "unseen tasks"))
    return panels


def experiment_figure(table: Sequence[dict[str, Any]], axis: str, path: Path, title: str, has_unseen: bool) -> Path:
    """Score against ``axis``, one line per series of `flora.study.tables.experiment_table`."""
    panels = _panels(has_unseen)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    series = list(dict.fromkeys(row["series"] for row in table))
    numeric = all(isinstance(row[axis], int | float) for row in table)
    for ax, (column, label) in zip(axes[0], panels, strict=True):
        for index, name in enumerate(series):
            rows = [row for row in table if row["series"] == name]
            color = f"C{index % 10}"
            xs = [row[axis] if numeric else str(row[axis]) for row in rows if row[column] is not None]
            ys = [row[column] for row in rows if row[column] is not None]
            errors = [row[f"{column}_std"] or 0 for row in rows if row[column] is not None]
            if xs:
                ax.errorbar(xs, ys, yerr=errors if any(errors) else None, marker="o", color=color, label=name,
                            capsize=3)  # fmt: skip
            unstable = [row[axis] if numeric else str(row[axis]) for row in rows if row["unstable"]]
            if unstable:
                ax.scatter(unstable, [0] * len(unstable), marker="x", s=60, color=color)
        if numeric and axis in LOG_AXES and all(row[axis] and row[axis] > 0 for row in table):
            ax.set_xscale("log", base=2 if axis == "size" else 10)
        ax.set_xlabel(AXIS_LABELS.get(axis, axis))
        ax.set_ylabel("ROUGE-L")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(title + ("  (x at 0: unstable, NaN)" if any(r["unstable"] for r in table) else ""), fontsize=11)
    return _save(fig, path)


def params_figure(records: Sequence[dict[str, Any]], path: Path, has_unseen: bool) -> Path:
    """Score against trainable parameters (log scale), one colour per method."""
    panels = _panels(has_unseen)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in records))
    for ax, (column, label) in zip(axes[0], panels, strict=True):
        for index, method in enumerate(methods):
            chosen = [r for r in records if r["method"] == method and r["status"] == "done" and r[column] is not None]
            if chosen:
                ax.scatter([r["trainable_params"] for r in chosen], [r[column] for r in chosen], color=f"C{index}",
                           label=METHOD_NAMES.get(method, method), alpha=0.8)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("ROUGE-L")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Score against trainable parameters (every finished trial)", fontsize=11)
    return _save(fig, path)


def seen_unseen_figure(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Unseen against seen ROUGE-L, one point per finished trial."""
    fig, ax = plt.subplots(figsize=(5, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in records))
    for index, method in enumerate(methods):
        chosen = [r for r in records if r["method"] == method and r["status"] == "done"
                  and r["seen_rougeL"] is not None and r["unseen_rougeL"] is not None]  # fmt: skip
        if chosen:
            ax.scatter([r["seen_rougeL"] for r in chosen], [r["unseen_rougeL"] for r in chosen], color=f"C{index}",
                       label=METHOD_NAMES.get(method, method), alpha=0.8)  # fmt: skip
    ax.set_xlabel("seen ROUGE-L")
    ax.set_ylabel("unseen ROUGE-L")
    ax.set_title("Seen against unseen tasks", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def loss_figure(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Training loss per step (moving average over 5% of the steps), one panel per method, one line
    per trial coloured by its learning rate."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("losses")))
    columns = min(3, max(len(methods), 1))
    lines = math.ceil(max(len(methods), 1) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.6 * columns, 3.3 * lines), squeeze=False)
    rates = sorted({r["learning_rate"] for r in rows if r.get("losses")})
    cmap = plt.get_cmap("viridis")

    def colour(rate: float):
        if len(rates) < 2:
            return cmap(0.4)
        low, high = math.log10(rates[0]), math.log10(rates[-1])
        return cmap((math.log10(rate) - low) / (high - low) * 0.9)

    for ax, method in zip(axes.flat, methods, strict=False):
        chosen = [r for r in rows if r["method"] == method and r.get("losses")]
        several_tasks = len({r["num_tasks"] for r in chosen}) > 1
        for row in chosen:
            losses = row["losses"]
            window = max(1, len(losses) // 20)
            style = "--" if row["status"] == "unstable" else "-"
            label = f"{method_label(method, row['size'])} lr {format_rate(row['learning_rate'])}"
            label += f", {row['num_tasks']} tasks" if several_tasks else ""
            ax.plot(range(1, len(losses) + 1), _smooth(losses, window), style, color=colour(row["learning_rate"]),
                    lw=1.2, label=label)  # fmt: skip
        ax.set_title(METHOD_NAMES.get(method, method), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if len(labels) <= 8:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.suptitle("Training loss (dashed: unstable)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def category_figure(columns: Sequence[str], table: Sequence[dict[str, Any]], path: Path) -> Path:
    """The category x method table as a heat map (score 0..100 in every cell)."""
    rows = [row for row in table]
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 3, 0.38 * len(rows) + 1.5))
    values = [[row[c] if row[c] is not None else float("nan") for c in columns] for row in rows]
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [row["category"] for row in rows], fontsize=8)
    for i, line in enumerate(values):
        for j, value in enumerate(line):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 60 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, label="score (primary metric)")
    ax.set_title("Category x method: each row routed to its category's adapter", fontsize=10)
    return _save(fig, path)
