"""Uncertainty of a study's scores: a hierarchical bootstrap over seeds, tasks and instances.

A *cell* of a study is one grid point without its seed (method, size, learning rate, number of
tasks, model); its trials are the cell's seeds. Its scores are per instance, ``X[s, j]`` for seed
``s`` and instance ``j`` of a `Layout` (tasks in order, each with its instances). The score of a
cell is the mean over seeds of the macro mean over tasks (each task's mean over its instances):

    score = (1/S) Σ_s (1/T) Σ_t (1/n_t) Σ_{i ∈ t} X[s, t, i]

Its 95 % interval comes from `REPLICATES` bootstrap replicates, each of which

1. resamples the tasks (T of them, with replacement),
2. resamples the instances of each drawn task (n_t of them, with replacement), and
3. resamples the seeds of each arm (S of them, with replacement; only when S > 1),

and recomputes the statistic; the interval is the 2.5th to 97.5th percentile of the replicates.
Two arms that share tasks and instances (every comparison of one study) are *paired*: the same
task and instance draws serve both, so what the tasks have in common cancels in a difference.
Seeds are resampled independently per arm (seed 42 of LoRA and seed 42 of IA3 are not the same
draw of anything). The task and instance draws come from a generator seeded `BOOTSTRAP_SEED`, and
each arm's seed draws from one seeded by its name, so a report is the same every time it is written.

With one seed the interval covers the sampling of tasks and instances only (what another seed
would change is not in it). Resampling both stages (tasks, then instances within them) is
conservative when the tasks' true scores differ little: the instance noise enters twice.

`Estimate` also carries the bootstrap variance with only the seeds resampled and with only the
data (tasks, instances) resampled: `needed` uses them to say how many more tasks or seeds would
make an interval exclude a value (a power estimate from the observed variance).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

REPLICATES = 2000
BOOTSTRAP_SEED = 2024
LEVEL = 0.95
_Z = 1.959963984540054  # the standard normal's 97.5th percentile
_BLOCK = 250  # replicates drawn per block (bounds memory: S x block x T x max n values)


@dataclass(frozen=True)
class Layout:
    """The columns of a score array: ``tasks`` in order, task t holding ``counts[t]`` instances
    (its columns are ``offsets[t] .. offsets[t] + counts[t] - 1``)."""

    tasks: tuple[str, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.tasks) != len(self.counts) or not self.tasks:
            raise ValueError(f"a layout needs at least one task and a count per task (got {len(self.tasks)} tasks, "
                             f"{len(self.counts)} counts)")  # fmt: skip
        if min(self.counts) < 1:
            raise ValueError(f"every task needs at least one instance (counts {list(self.counts)})")

    @property
    def size(self) -> int:
        return sum(self.counts)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    @property
    def per_task(self) -> str:
        """Instances per task: ``"60"``, or ``"5-20"`` when tasks differ."""
        low, high = min(self.counts), max(self.counts)
        return f"{low}" if low == high else f"{low}-{high}"


@dataclass(frozen=True)
class Estimate:
    """A statistic, its bootstrap interval, what it was computed over (tasks, instances per task,
    seeds: the most of any arm), and the bootstrap variance from seeds only and from the data
    (tasks and instances) only (None when not computed)."""

    value: float
    low: float
    high: float
    tasks: int
    instances: str
    seeds: int
    seed_variance: float | None = None
    data_variance: float | None = None

    @property
    def n(self) -> str:
        """``"10 tasks x 60 instances, 3 seeds"``."""
        return f"{self.tasks} tasks x {self.instances} instances, {self.seeds} seed{'s' if self.seeds != 1 else ''}"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def macro_means(values: np.ndarray, layout: Layout) -> np.ndarray:
    """``values [S, N, *rest]`` -> ``[S, *rest]``: per seed, the mean over tasks of each task's mean."""
    sums = np.add.reduceat(values, layout.offsets, axis=1)
    counts = np.asarray(layout.counts, dtype=float).reshape((1, -1) + (1,) * (values.ndim - 2))
    return (sums / counts).mean(axis=1)


def _arm_rng(name: str) -> np.random.Generator:
    return np.random.default_rng([BOOTSTRAP_SEED, zlib.crc32(name.encode())])


def resampled_means(arms: Mapping[str, np.ndarray], layout: Layout, replicates: int = REPLICATES,
                    resample_data: bool = True, resample_seeds: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    """Per arm ``[S, N, *rest]``, its ``[replicates, *rest]`` bootstrap means (see the module
    docstring): one task and instance draw per replicate shared by all arms (paired), seeds drawn per arm."""
    for name, values in arms.items():
        if values.ndim < 2 or values.shape[1] != layout.size or values.shape[0] < 1:
            raise ValueError(f"arm {name!r}: scores of shape {values.shape} do not fit the layout of "
                             f"{layout.size} instances (expected [seeds, {layout.size}, ...])")  # fmt: skip
    counts = np.asarray(layout.counts)
    offsets = layout.offsets
    widest = int(counts.max())
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    per_seed = {name: [] for name in arms}
    for start in range(0, replicates, _BLOCK):
        block = min(_BLOCK, replicates - start)
        if resample_data:
            tasks = rng.integers(len(counts), size=(block, len(counts)))
            positions = np.floor(rng.random((block, len(counts), widest)) * counts[tasks][..., None]).astype(np.int64)
        else:
            tasks = np.broadcast_to(np.arange(len(counts)), (block, len(counts)))
            positions = np.broadcast_to(np.arange(widest), (block, len(counts), widest)) % counts[tasks][..., None]
        mask = np.arange(widest) < counts[tasks][..., None]  # [block, T, widest]
        columns = offsets[tasks][..., None] + np.where(mask, positions, 0)
        weights = mask / counts[tasks][..., None] / len(counts)  # macro mean as a weighted sum
        for name, values in arms.items():
            gathered = values[:, columns]  # [S, block, T, widest, *rest]
            w = weights.reshape(weights.shape + (1,) * (values.ndim - 2))
            per_seed[name].append((gathered * w).sum(axis=(2, 3)))  # [S, block, *rest]
    out = {}
    for name, blocks in per_seed.items():
        means = np.concatenate(blocks, axis=1)  # [S, replicates, *rest]
        seeds = means.shape[0]
        if resample_seeds and seeds > 1:
            drawn = _arm_rng(name).integers(seeds, size=(replicates, seeds))
            out[name] = means[drawn, np.arange(replicates)[:, None]].mean(axis=1)
        else:
            out[name] = means.mean(axis=0)
    return out


Statistic = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def bootstrap(arms: Mapping[str, np.ndarray], layout: Layout, statistic: Statistic, replicates: int = REPLICATES,
              components: bool = True) -> Estimate:  # fmt: skip
    """``statistic`` of the arms' means and its interval.

    ``arms``: ``{name: [S, N, *rest]}`` per-instance scores (or curves) on ``layout``;
    ``statistic``: ``{name: [R, *rest]}`` -> ``[R]``, applied to the point means (R = 1) and to
    every replicate. ``components``: also the variance from seeds only and from data only.
    """
    point = float(statistic({name: macro_means(v, layout).mean(axis=0)[None] for name, v in arms.items()})[0])
    replicas = statistic(resampled_means(arms, layout, replicates))
    finite = replicas[np.isfinite(replicas)]
    if finite.size < replicates // 2:
        low = high = math.nan
    else:
        low, high = (float(q) for q in np.percentile(finite, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2]))
    seeds = max(v.shape[0] for v in arms.values())
    seed_var = data_var = None
    if components and finite.size:
        data_var = _variance(statistic(resampled_means(arms, layout, replicates, resample_seeds=False)))
        seed_var = _variance(statistic(resampled_means(arms, layout, replicates, resample_data=False))) if seeds > 1 \
            else 0.0  # fmt: skip
    return Estimate(point, low, high, len(layout.tasks), layout.per_task, seeds, seed_var, data_var)


def pointwise(values: np.ndarray, layout: Layout, name: str, replicates: int = REPLICATES
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``values [S, N, P]`` (e.g. a curve's P points) -> ``(mean, low, high)``, each ``[P]``: the
    point means and each point's 95 % interval (one draw of tasks, instances and seeds for all points)."""
    mean = macro_means(values, layout).mean(axis=0)
    replicas = resampled_means({name: values}, layout, replicates)[name]
    low, high = np.nanpercentile(replicas, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2], axis=0)
    return mean, low, high


def _variance(replicas: np.ndarray) -> float:
    finite = replicas[np.isfinite(replicas)]
    return float(finite.var(ddof=1)) if finite.size > 1 else math.nan


def mean_of(name: str) -> Statistic:
    """The mean score of one arm."""
    return lambda means: means[name]


def difference(first: str, second: str) -> Statistic:
    """``first - second`` (a paired difference when both arms share the layout)."""
    return lambda means: means[first] - means[second]


def interval(values: np.ndarray, layout: Layout, replicates: int = REPLICATES) -> Estimate:
    """The score of one cell (``values [S, N]``) with its interval."""
    return bootstrap({"cell": values}, layout, mean_of("cell"), replicates)


@dataclass(frozen=True)
class Needed:
    """How much more data would make an interval exclude a value, if the estimate stayed as it is:
    ``data`` times the tasks (at the same instances per task) and ``seeds`` times the seeds;
    None: no amount would (the estimate sits on the value)."""

    data: float | None
    seeds: float | None


def needed(estimate: Estimate, boundary: float) -> Needed:
    """The growth in tasks and seeds after which ``estimate``'s interval, of the same centre, would
    exclude ``boundary``: its variance ``v_seed / k_s + v_data / k_d`` must fall below
    ``((value - boundary) / 1.96)²``. Tasks grow first; seeds too when the seed variance alone is
    more than half of that budget (then both grow by the same factor)."""
    gap = abs(estimate.value - boundary)
    if estimate.data_variance is None or not math.isfinite(estimate.data_variance) or gap < 1e-9:
        return Needed(None, None)
    budget = (gap / _Z) ** 2
    v_seed, v_data = estimate.seed_variance or 0.0, estimate.data_variance
    if v_seed + v_data <= budget:
        return Needed(1.0, 1.0)
    if v_seed <= budget / 2:
        return Needed(max(1.0, v_data / (budget - v_seed)), 1.0)
    factor = (v_seed + v_data) / budget
    return Needed(factor, factor)


def seed_matrix(rows: Sequence[Mapping[tuple[str, str], float]], layout_keys: Sequence[tuple[str, str]]) -> np.ndarray:
    """``[S, N]`` scores of a cell's seeds (``rows``: per seed ``{(task, instance): score}``) in the
    order of ``layout_keys``; raises if a seed lacks an instance (the arms would not be paired)."""
    matrix = np.empty((len(rows), len(layout_keys)))
    for s, row in enumerate(rows):
        missing = [key for key in layout_keys if key not in row]
        if missing:
            raise ValueError(f"a trial has no score for {len(missing)} of the {len(layout_keys)} instances "
                             f"(first: task {missing[0][0]!r}, instance {missing[0][1]!r})")  # fmt: skip
        matrix[s] = [row[key] for key in layout_keys]
    return matrix


_F_DRAWS = 400_000


def f_quantiles(df1: int, df2: int) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the F(df1, df2) distribution, by simulation
    (`_F_DRAWS` draws from a generator seeded `BOOTSTRAP_SEED`: about three significant digits)."""
    rng = np.random.default_rng([BOOTSTRAP_SEED, df1, df2])
    draws = (rng.chisquare(df1, _F_DRAWS) / df1) / (rng.chisquare(df2, _F_DRAWS) / df2)
    low, high = np.percentile(draws, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return float(low), float(high)


def variance_ratio(first: Sequence[Sequence[float]], second: Sequence[float]) -> tuple[float, float, float, int, int]:
    """``(ratio, low, high, df1, df2)``: the pooled variance of the groups ``first`` (each a list of
    per-seed scores) over the variance of ``second``, with its 95 % interval under normal seed
    noise (ratio / F quantiles); NaN where a variance is missing or the second is 0."""
    groups = [list(g) for g in first if len(g) > 1]
    df1 = sum(len(g) - 1 for g in groups)
    df2 = len(second) - 1
    if df1 < 1 or df2 < 1:
        return math.nan, math.nan, math.nan, df1, df2
    pooled = sum((len(g) - 1) * float(np.var(g, ddof=1)) for g in groups) / df1
    base = float(np.var(list(second), ddof=1))
    if base == 0:
        return math.nan, math.nan, math.nan, df1, df2
    ratio = pooled / base
    low_q, high_q = f_quantiles(df1, df2)
    return ratio, ratio / high_q, ratio / low_q, df1, df2
