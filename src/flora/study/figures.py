"""The report's figures (matplotlib, Agg backend, PNG), each drawn from a table or curve of the store.

Every figure plots one quantity per axis, every score with its 95 % interval (error bars or a
band) and says its n; series differ in colour *and* marker or line style; a legend names only
what is drawn. The zero-shot base model is a dashed grey line where its score applies.

- `experiment_figure`: a score against an experiment's axis (learning rate, number of training
  tasks, method), one panel per score column; for sizes, one panel per kind of size (LoRA / FLoRA
  rank, adapter size, virtual tokens): they are different quantities;
- `params_figure`: score against trainable parameters (log scale);
- `loss_figure`: training loss per step, an exponential moving average over the raw loss drawn faint;
- `curve_figure`: validation loss at the measured steps, with 95 % intervals;
- `category_figure`: the category x method table as a heat map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flora.io import atomic_write  # noqa: E402
from flora.study.tables import METHOD_NAMES, SIZE_AXES, fmt, format_rate  # noqa: E402

AXIS_LABELS = {"learning_rate": "learning rate", "size": "size", "num_tasks": "training tasks", "model": "model",
               "seed": "seed", "method": "method"}  # fmt: skip
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
BASELINE = {"color": "0.45", "linestyle": (0, (4, 3)), "linewidth": 1.2}


def style(index: int) -> dict[str, Any]:
    """The colour, marker and line style of the ``index``-th series (none shares all three)."""
    return {"color": f"C{index % 10}", "marker": MARKERS[index % len(MARKERS)],
            "linestyle": LINESTYLES[(index // 2) % len(LINESTYLES)]}  # fmt: skip


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight",
                                               metadata={"Software": None}))  # fmt: skip
    plt.close(fig)
    return path


def _errors(rows: Sequence[dict[str, Any]], column: str) -> np.ndarray:
    """``[2, n]`` asymmetric error bars (value - low, high - value) of ``column``."""
    bars = np.array([[r[column] - r[f"{column}_low"] for r in rows], [r[f"{column}_high"] - r[column] for r in rows]])
    return np.maximum(bars, 0.0)  # a degenerate interval may sit a rounding error off its point


def _ticks(ax, values: Sequence[float], label) -> None:
    """Ticks at exactly ``values`` on a log axis, labelled as written (1e-03, 32), no minor ticks."""
    ax.set_xticks(values, [label(v) for v in values])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _baseline(ax, value: float | None) -> None:
    if value is not None and math.isfinite(value):
        ax.axhline(value, label="zero-shot base model", **BASELINE)


def experiment_figure(rows: Sequence[dict[str, Any]], axis: str, panels: Sequence[tuple[str, str]], path: Path,
                      title: str, baseline: dict[str, float | None], n: str) -> Path:  # fmt: skip
    """Score against ``axis`` (rows: `flora.study.tables.cell_table` rows), one line per series.

    ``panels``: ``(column, title)`` per score column; ``baseline``: the zero-shot score per column;
    ``n``: what the intervals are over (in the title).
    """
    if axis == "size":
        return _size_figure(rows, panels, path, title, baseline, n)
    numeric = axis != "method"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = row["series"] if axis != "method" else "all"
        groups.setdefault(label, []).append(row)
    for ax, (column, panel_title) in zip(axes[0], panels, strict=True):
        if numeric:
            for index, (label, members) in enumerate(groups.items()):
                points = sorted((r for r in members if r.get(column) is not None), key=lambda r: r[axis])
                if points:
                    ax.errorbar([r[axis] for r in points], [r[column] for r in points], yerr=_errors(points, column),
                                capsize=3, label=label, **style(index))  # fmt: skip
            if axis == "learning_rate":
                ax.set_xscale("log")
                _ticks(ax, sorted({r[axis] for r in rows}), format_rate)
            if axis == "num_tasks":
                ax.set_xticks(sorted({r[axis] for r in rows}))
        else:
            points = [r for r in rows if r.get(column) is not None]
            labels = [f"{r['series']}\nlr {format_rate(r['learning_rate'])}" for r in points]
            for index, r in enumerate(points):
                ax.errorbar([index], [r[column]], yerr=_errors([r], column), capsize=4, **style(index))
            ax.set_xticks(range(len(points)), labels, rotation=30, ha="right", fontsize=8)
        _baseline(ax, baseline.get(column))
        ax.set_xlabel(AXIS_LABELS.get(axis, axis))
        ax.set_ylabel(panel_title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{title}\n(bars: 95 % intervals; {n})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _size_figure(rows, panels, path: Path, title: str, baseline: dict[str, float | None], n: str) -> Path:
    kinds = list(dict.fromkeys(SIZE_AXES.get(r["method"], "size") for r in rows))
    fig, axes = plt.subplots(len(panels), len(kinds), figsize=(4.6 * len(kinds), 3.6 * len(panels)), squeeze=False)
    for i, (column, panel_title) in enumerate(panels):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            members = [r for r in rows if SIZE_AXES.get(r["method"], "size") == kind]
            for index, method in enumerate(dict.fromkeys(r["method"] for r in members)):
                points = sorted((r for r in members if r["method"] == method and r.get(column) is not None),
                                key=lambda r: r["size"])  # fmt: skip
                if points:
                    rates = sorted({format_rate(r["learning_rate"]) for r in points})
                    ax.errorbar([r["size"] for r in points], [r[column] for r in points], yerr=_errors(points, column),
                                capsize=3, label=f"{METHOD_NAMES.get(method, method)} (lr {', '.join(rates)})",
                                **style(index))  # fmt: skip
            _baseline(ax, baseline.get(column))
            ax.set_xscale("log", base=2)
            _ticks(ax, sorted({r["size"] for r in members}), str)
            ax.set_xlabel(kind)
            ax.set_ylabel(panel_title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{title}\n(bars: 95 % intervals; {n})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def params_figure(rows: Sequence[dict[str, Any]], column: str, label: str, path: Path, baseline: float | None,
                  n: str) -> Path:  # fmt: skip
    """``column`` against trainable parameters (log scale), one point per row, its interval as a bar."""
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    points = [r for r in rows if r.get(column) is not None and r.get("trainable_params")]
    for index, r in enumerate(points):
        ax.errorbar([r["trainable_params"]], [r[column]], yerr=_errors([r], column), capsize=3, linestyle="none",
                    label=f"{r['series']} lr {format_rate(r['learning_rate'])}",
                    **{k: v for k, v in style(index).items() if k != "linestyle"})  # fmt: skip
    _baseline(ax, baseline)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"{label} against trainable parameters\n(bars: 95 % intervals; {n})", fontsize=10)
    return _save(fig, path)


def ema(values: Sequence[float], span: int) -> np.ndarray:
    """The exponential moving average ``m_t = a x_t + (1 - a) m_{t-1}``, ``a = 2 / (span + 1)``,
    started at ``m_0 = x_0``."""
    alpha = 2.0 / (span + 1)
    out = np.empty(len(values))
    for t, value in enumerate(values):
        out[t] = value if t == 0 else alpha * value + (1 - alpha) * out[t - 1]
    return out


def loss_figure(series: dict[str, dict[str, list[float]]], path: Path, seeds: dict[str, int]) -> Path:
    """Training loss per step: ``series`` is ``{panel (method): {line label: mean loss per step}}``;
    each line an EMA (span a tenth of the steps) over its raw loss, drawn faint in the same colour."""
    panels = list(series)
    columns = min(3, max(len(panels), 1))
    lines = math.ceil(max(len(panels), 1) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5.0 * columns, 3.6 * lines), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for index, (label, losses) in enumerate(series[panel].items()):
            steps = np.arange(1, len(losses) + 1)
            look = style(index)
            ax.plot(steps, losses, color=look["color"], alpha=0.25, linewidth=0.8)
            count = seeds.get(label, 1)
            ax.plot(
                steps,
                ema(losses, max(2, len(losses) // 10)),
                color=look["color"],
                linestyle=look["linestyle"],
                linewidth=1.6,
                label=f"{label} ({count} seed{'s' if count != 1 else ''})",
            )
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("Training loss per step: EMA (bold) over the raw loss (faint), mean over seeds", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def curve_figure(series: dict[str, dict[str, tuple[list[int], np.ndarray, np.ndarray, np.ndarray]]], path: Path,
                 ylabel: str, n: str) -> Path:  # fmt: skip
    """Validation loss at the measured steps: ``{panel: {label: (steps, mean, low, high)}}``, a line
    with markers per label and its 95 % intervals as error bars (shifted a little per label, so
    overlapping ones stay apart)."""
    panels = list(series)
    columns = min(3, max(len(panels), 1))
    lines = math.ceil(max(len(panels), 1) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5.0 * columns, 3.6 * lines), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        labels = list(series[panel].items())
        for index, (label, (steps, mean, low, high)) in enumerate(labels):
            shift = (index - (len(labels) - 1) / 2) * 0.012 * (max(steps) - min(steps) or 1)
            x = np.asarray(steps, dtype=float) + shift
            bars = np.maximum([mean - low, high - mean], 0.0)
            ax.errorbar(x, mean, yerr=bars, capsize=2, elinewidth=0.8, markersize=4, label=label, **style(index))
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{ylabel} during training (bars: 95 % intervals; {n})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def category_figure(columns: Sequence[str], table: Sequence[dict[str, Any]], path: Path, label: str) -> Path:
    """The category x cell table as a heat map (score 0..100 in every cell; intervals in the table)."""
    fig, ax = plt.subplots(figsize=(1.4 * len(columns) + 3.5, 0.38 * len(table) + 1.6))
    values = [[row[c] if row.get(c) is not None else float("nan") for c in columns] for row in table]
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(table)), [row["category"] for row in table], fontsize=8)
    for i, line in enumerate(values):
        for j, value in enumerate(line):
            if not math.isnan(value):
                ax.text(j, i, fmt(value, 0), ha="center", va="center", fontsize=7,
                        color="white" if value < 60 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title("Category x method (95 % intervals in the table beside it)", fontsize=10)
    return _save(fig, path)
