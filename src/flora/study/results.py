"""A study's results as the report reads them: cells, learning rates chosen on validation, scores with
intervals, paired differences and learning curves, all from the study store.

A *cell* is a grid point without its seed (method, size, number of training tasks, model,
learning rate); its finished trials are its seeds. A *series* is a cell without its learning rate:
the cells of a learning-rate sweep. Scores are per instance in the store (`flora.study.store`);
a cell's score on a split is the mean over seeds of the macro mean over tasks
(`flora.study.stats`), of ``evaluation.metric`` (ROUGE-L, exact match, or ``primary``: each
task's own metric).

Selection (`StudyResults.choose`) reads validation scores only: for the seen-task scores the
``validation`` split (held-out instances of the training tasks), for the unseen-task scores the
``validation_tasks`` split (tasks never trained on). `StudyResults.validation_mean` refuses a
test split, so no code path can choose on test scores. A chosen learning rate at either end of its
sweep (or a series that sweeps none) is *unbracketed*: the optimum may lie outside the grid.
Every trial is reported at its final step (`flora.study.execute`), so every comparison is at the
same step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flora.study import stats
from flora.study.data import SELECTED_ON, SPLITS, VALIDATION_SPLITS
from flora.study.plan import ZERO_SHOT
from flora.study.stats import Estimate, Layout


@dataclass(frozen=True, order=True)
class SeriesKey:
    """A learning-rate sweep: a grid point without its learning rate and seed."""

    method: str
    size: int | None
    num_tasks: int
    model: str

    def sort_key(self) -> tuple:
        return (self.method, self.size is None, self.size or 0, self.num_tasks, self.model)


@dataclass(frozen=True)
class CellKey:
    """A grid point without its seed."""

    series: SeriesKey
    learning_rate: float

    @property
    def method(self) -> str:
        return self.series.method

    @property
    def name(self) -> str:
        """A stable name (bootstrap arms are seeded by it)."""
        s = self.series
        return f"{s.method}|{s.size}|{s.num_tasks}|{s.model}|{self.learning_rate!r}"


@dataclass
class Cell:
    """A cell's trial rows (every status) and its finished ones (its seeds)."""

    key: CellKey
    trials: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> list[dict[str, Any]]:
        return sorted((t for t in self.trials if t["status"] == "done"), key=lambda t: t["seed"])

    @property
    def unstable(self) -> int:
        return sum(t["status"] == "unstable" for t in self.trials)

    @property
    def experiments(self) -> set[str]:
        return {name for t in self.trials for name in t["experiments"]}

    @property
    def trainable_params(self) -> int | None:
        return max((t["trainable_params"] or 0 for t in self.trials), default=0) or None


@dataclass(frozen=True)
class Choice:
    """The learning rate chosen for a test split among a series' (or several series') cells, by the
    mean validation score; ``edge``: None (bracketed), ``"lowest"`` / ``"highest"`` (the chosen rate
    is an end of its sweep) or ``"not swept"`` (one rate only)."""

    cell: CellKey
    split: str
    values: dict[CellKey, float]
    edge: str | None

    @property
    def bracketed(self) -> bool:
        return self.edge is None


class StudyResults:
    """The cells of a study and what the report computes from them (see the module docstring)."""

    def __init__(self, spec: dict[str, Any], split: dict[str, Any], rows: Sequence[dict[str, Any]],
                 scores: Iterable[dict[str, Any]], curves: Iterable[dict[str, Any]]) -> None:  # fmt: skip
        self.spec = spec
        self.split = split
        self.metric = spec["evaluation"]["metric"]
        self.rows = list(rows)
        self.cells: dict[CellKey, Cell] = {}
        self.zero_shot: Cell | None = None
        for row in self.rows:
            key = CellKey(SeriesKey(row["method"], row["size"], row["num_tasks"], row["model"]), row["learning_rate"])
            cell = self.cells.setdefault(key, Cell(key))
            cell.trials.append(row)
            if row["method"] == ZERO_SHOT:
                self.zero_shot = cell
        self._scores: dict[str, dict[str, dict[tuple[str, str], float]]] = {}  # trial -> split -> instance
        for record in scores:
            by_split = self._scores.setdefault(record["trial"], {}).setdefault(record["split"], {})
            by_split[(record["task"], record["instance"])] = record[self._metric_of(record["task"])]
        self._curves: dict[str, dict[tuple[str, str, str], dict[int, float]]] = {}
        for record in curves:
            point = self._curves.setdefault(record["trial"], {}).setdefault(
                (record["split"], record["task"], record["instance"]), {})  # fmt: skip
            point[record["step"]] = math.nan if record["loss"] is None else record["loss"]
        self._cache: dict[tuple, Estimate] = {}

    @classmethod
    def load(cls, store) -> StudyResults:
        """The results of the trials of ``store``'s current plan."""
        study, rows = store.spec(), store.trials()
        ids = [row["id"] for row in rows]
        return cls(study["spec"], study["split"], rows, store.instance_scores(ids), store.curves(ids))

    def _metric_of(self, task: str) -> str:
        if self.metric != "primary":
            return self.metric
        return self.split.get(task, {}).get("metric", "rougeL")

    # -- tasks and layouts ------------------------------------------------------------------------

    def training_tasks(self) -> list[str]:
        """The training tasks in the order ``num_tasks`` takes them."""
        return sorted((t for t, entry in self.split.items() if entry["role"] == "train"),
                      key=lambda t: self.split[t]["order"])  # fmt: skip

    def tasks_with(self, split: str) -> list[str]:
        """Every task with instances in ``split``, in the study's order."""
        return sorted((t for t, entry in self.split.items() if entry["splits"].get(split)),
                      key=lambda t: self.split[t]["order"])  # fmt: skip

    def tasks(self, cell: CellKey, split: str) -> list[str]:
        """The tasks of ``split`` that ``cell`` is scored on: its own training tasks for the seen
        splits (the first ``num_tasks``), every task of the split otherwise."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is unknown (expected one of {', '.join(SPLITS)})")
        if split in ("validation", "seen"):
            return self.training_tasks()[: cell.series.num_tasks]
        return self.tasks_with(split)

    def has(self, split: str) -> bool:
        """Whether the study has instances in ``split`` (and a finished trial scored on them)."""
        return any(entry["splits"].get(split) for entry in self.split.values()) and any(
            by_split.get(split) for by_split in self._scores.values())  # fmt: skip

    def layout(self, split: str, tasks: Sequence[str]) -> tuple[Layout, list[tuple[str, str, str]]]:
        """The layout of ``tasks``' instances in ``split`` and the instance keys in its order."""
        chosen = [t for t in tasks if self.split[t]["splits"].get(split)]
        keys = [(split, t, i) for t in chosen for i in self.split[t]["splits"][split]]
        return Layout(tuple(chosen), tuple(len(self.split[t]["splits"][split]) for t in chosen)), keys

    def matrix(self, cell: CellKey, split: str, tasks: Sequence[str] | None = None) -> tuple[np.ndarray, Layout]:
        """``([seeds, instances] scores, layout)`` of ``cell`` on ``split`` (``tasks``: a subset)."""
        layout, keys = self.layout(split, tasks if tasks is not None else self.tasks(cell, split))
        rows = [self._scores.get(t["id"], {}).get(split, {}) for t in self.cells[cell].done]
        if not rows:
            raise ValueError(f"cell {cell.name} has no finished trial (nothing to score)")
        return stats.seed_matrix(rows, [k[1:] for k in keys]), layout

    # -- selection: validation scores only --------------------------------------------------------

    def validation_mean(self, cell: CellKey, split: str) -> float:
        """The point score of ``cell`` on a validation split (the only scores selection reads)."""
        if split not in VALIDATION_SPLITS:
            raise ValueError(f"selection reads validation scores only (got split {split!r}; expected one of "
                             f"{', '.join(VALIDATION_SPLITS)})")  # fmt: skip
        values, layout = self.matrix(cell, split)
        return float(stats.macro_means(values, layout).mean())

    def choose(self, cells: Iterable[CellKey], test_split: str) -> Choice:
        """The cell with the best mean validation score for ``test_split`` (ties: the lower learning
        rate), and whether its learning rate is bracketed within its own series' sweep."""
        split = SELECTED_ON[test_split]
        candidates = [c for c in cells if self.cells[c].done]
        if not candidates:
            raise ValueError("no finished cell to choose from")
        values = {c: self.validation_mean(c, split) for c in candidates}
        best = max(candidates, key=lambda c: (values[c], -c.learning_rate))
        grid = sorted(c.learning_rate for c in candidates if c.series == best.series)
        edge = None
        if len(grid) < 2:
            edge = "not swept"
        elif best.learning_rate == grid[0]:
            edge = "lowest"
        elif best.learning_rate == grid[-1]:
            edge = "highest"
        return Choice(best, split, values, edge)

    def methods(self) -> list[str]:
        """The trained methods with a finished trial, in plan order."""
        return list(dict.fromkeys(c.method for c in self.cells if c.method != ZERO_SHOT and self.cells[c].done))

    def most_tasks(self, method: str) -> list[CellKey]:
        """The finished cells of ``method`` on its largest number of training tasks."""
        cells = [c for c in self.cells if c.method == method and self.cells[c].done]
        most = max((c.series.num_tasks for c in cells), default=0)
        return [c for c in cells if c.series.num_tasks == most]

    def sweep(self, method: str, size: int | None = None) -> list[CellKey]:
        """The learning-rate sweep of ``method`` (of ``size`` when given) on its most training tasks:
        the series with the most finished learning rates (the headline's and the findings' candidates)."""
        by_series: dict[SeriesKey, list[CellKey]] = {}
        for c in self.most_tasks(method):
            if size is None or c.series.size == size:
                by_series.setdefault(c.series, []).append(c)
        if not by_series:
            return []
        return sorted(max(by_series.values(), key=len), key=lambda c: c.learning_rate)

    def series(self, method: str | None = None) -> dict[SeriesKey, list[CellKey]]:
        """Each series' cells (learning rates ascending), of ``method`` or of every trained method."""
        out: dict[SeriesKey, list[CellKey]] = {}
        for key in sorted(self.cells, key=lambda k: (k.series.sort_key(), k.learning_rate)):
            if key.method != ZERO_SHOT and (method is None or key.method == method):
                out.setdefault(key.series, []).append(key)
        return out

    # -- estimates ---------------------------------------------------------------------------------

    def score(self, cell: CellKey, split: str, tasks: Sequence[str] | None = None) -> Estimate:
        """The score of ``cell`` on ``split`` with its 95 % interval."""
        key = ("score", cell, split, tuple(tasks) if tasks is not None else None)
        if key not in self._cache:
            values, layout = self.matrix(cell, split, tasks)
            self._cache[key] = stats.bootstrap({cell.name: values}, layout, stats.mean_of(cell.name))
        return self._cache[key]

    def difference(self, first: CellKey, second: CellKey, split: str, tasks: Sequence[str] | None = None) -> Estimate:
        """``first - second`` on ``split``, paired on the tasks they share (``tasks``, else the first's)."""
        tasks = list(tasks) if tasks is not None else self.tasks(first, split)
        key = ("difference", first, second, split, tuple(tasks))
        if key not in self._cache:
            arms = self._arms([first, second], split, tasks)
            self._cache[key] = stats.bootstrap(arms, self.layout(split, tasks)[0],
                                               stats.difference(first.name, second.name))  # fmt: skip
        return self._cache[key]

    def contrast(self, terms: Sequence[tuple[float, CellKey]], split: str, tasks: Sequence[str]) -> Estimate:
        """``Σ weight x score`` over ``terms`` (e.g. a difference of differences), paired on ``tasks``."""
        cells = [c for _, c in terms]
        arms = self._arms(cells, split, tasks)
        return stats.bootstrap(arms, self.layout(split, tasks)[0],
                               lambda means: sum(w * means[c.name] for w, c in terms))  # fmt: skip

    def _arms(self, cells: Sequence[CellKey], split: str, tasks: Sequence[str]) -> dict[str, np.ndarray]:
        return {c.name: self.matrix(c, split, tasks)[0] for c in dict.fromkeys(cells)}

    def best_rate_ratio(self, first: Sequence[CellKey], second: Sequence[CellKey], split: str) -> Estimate:
        """log10 of (the best learning rate of ``first``'s sweep / that of ``second``'s), the best by
        mean score on the validation split ``split``, with its bootstrap interval: the argmax is
        recomputed in every replicate (both sweeps on the same task and instance draws)."""
        if split not in VALIDATION_SPLITS:
            raise ValueError(f"learning rates are chosen on validation scores only (got split {split!r})")
        cells = [*first, *second]
        tasks = self.tasks(cells[0], split)
        arms = self._arms(cells, split, tasks)

        def best(group: Sequence[CellKey], means) -> np.ndarray:
            stacked = np.stack([means[c.name] for c in group], axis=-1)  # [R, rates]
            return np.log10(np.asarray([c.learning_rate for c in group]))[np.argmax(stacked, axis=-1)]

        return stats.bootstrap(arms, self.layout(split, tasks)[0],
                               lambda means: best(first, means) - best(second, means), components=False)  # fmt: skip

    # -- learning curves --------------------------------------------------------------------------

    def curve_steps(self, cell: CellKey) -> list[int]:
        steps: set[int] = set()
        for trial in self.cells[cell].done:
            for points in self._curves.get(trial["id"], {}).values():
                steps |= set(points)
        return sorted(steps)

    def curve_matrix(self, cell: CellKey, split: str, tasks: Sequence[str] | None = None,
                     steps: Sequence[int] | None = None) -> tuple[np.ndarray, Layout, list[int]]:  # fmt: skip
        """``([seeds, instances, steps] validation losses, layout, steps)`` of ``cell`` (the instances
        that every seed measured at every step)."""
        if split not in VALIDATION_SPLITS:
            raise ValueError(f"learning curves are measured on validation splits (got {split!r})")
        steps = list(steps) if steps is not None else self.curve_steps(cell)
        trials = [self._curves.get(t["id"], {}) for t in self.cells[cell].done]
        measured = {k for k in set.intersection(*(set(c) for c in trials)) if k[0] == split} if trials else set()
        wanted = tasks if tasks is not None else self.tasks(cell, split)
        chosen = [t for t in wanted if any((split, t, i) in measured for i in self.split[t]["splits"].get(split, []))]
        keys = [(split, t, i) for t in chosen for i in self.split[t]["splits"][split] if (split, t, i) in measured]
        layout = Layout(tuple(chosen), tuple(sum(k[1] == t for k in keys) for t in chosen))
        values = np.array([[[c[k].get(s, math.nan) for s in steps] for k in keys] for c in trials])
        return values, layout, steps

    def mean_curve(self, cell: CellKey, split: str) -> tuple[list[int], np.ndarray]:
        """``(steps, mean validation loss per step)``: macro mean over tasks, mean over seeds."""
        values, layout, steps = self.curve_matrix(cell, split)
        return steps, stats.macro_means(values, layout).mean(axis=0)

    def curve_band(self, cell: CellKey, split: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, mean, low, high)``: the validation loss of ``cell`` per measured step with 95 % intervals."""
        values, layout, steps = self.curve_matrix(cell, split)
        return (steps, *stats.pointwise(values, layout, cell.name))

    def training_loss(self, cell: CellKey) -> list[float]:
        """The training loss per step, mean over the cell's finished seeds (up to the shortest)."""
        losses = [t["losses"] for t in self.cells[cell].done if t.get("losses")]
        if not losses:
            return []
        length = min(map(len, losses))
        return [float(np.mean([run[i] for run in losses])) for i in range(length)]

    def learning_speed(self, first: CellKey, second: CellKey, split: str, fraction: float = 0.9) -> Estimate:
        """``t(first) - t(second)``, where t is the share of training after which the mean validation
        loss has made ``fraction`` of its improvement from step 0 to the final step (`time_to`),
        with its interval (tasks, instances and seeds resampled; both on the same draws)."""
        steps = sorted(set(self.curve_steps(first)) & set(self.curve_steps(second)))
        tasks = self.tasks(first, split)
        a, layout, _ = self.curve_matrix(first, split, tasks, steps)
        b, layout_b, _ = self.curve_matrix(second, split, tasks, steps)
        if layout != layout_b:
            raise ValueError("the two curves were measured on different validation instances")
        return stats.bootstrap({first.name: a, second.name: b}, layout,
                               lambda m: time_to(m[first.name], steps, fraction) - time_to(m[second.name], steps,
                                                                                          fraction))  # fmt: skip


def time_to(curves: np.ndarray, steps: Sequence[int], fraction: float = 0.9) -> np.ndarray:
    """``curves [R, points]`` (a loss at each of ``steps``, the first 0) -> ``[R]``: the share of the
    last step at which the loss first comes within ``1 - fraction`` of its total improvement
    ``L(0) - L(last)`` (linear between measured steps); NaN where it did not improve.

    With ``target = L(0) - fraction (L(0) - L(last))`` and k the first point with ``L(k) <= target``:
    ``t = s(k-1) + (L(k-1) - target) / (L(k-1) - L(k)) (s(k) - s(k-1))``, reported as ``t / s(last)``.
    """
    curves = np.atleast_2d(curves)
    steps_array = np.asarray(steps, dtype=float)
    start, end = curves[:, 0], curves[:, -1]
    target = start - fraction * (start - end)
    reached = curves <= target[:, None]
    k = np.argmax(reached, axis=1)
    k = np.maximum(k, 1)
    before, after = curves[np.arange(len(k)), k - 1], curves[np.arange(len(k)), k]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.clip((before - target) / (before - after), 0.0, 1.0)
    t = steps_array[k - 1] + share * (steps_array[k] - steps_array[k - 1])
    return np.where(start > end, t / steps_array[-1], np.nan)
