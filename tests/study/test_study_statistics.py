"""The study's statistics (`flora.study.stats`): the hierarchical bootstrap covers a known mean at about
its nominal rate (and a bootstrap that ignores a level of the sampling does not), pairs arms that share
tasks and instances, resamples seeds, and turns the observed variance into a power estimate; the
learning-speed statistic and the F quantiles behind the instability rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flora.study import stats
from flora.study.results import time_to

TASKS, INSTANCES, DRAWS, REPLICATES = 10, 5, 1000, 1000
TASK_SD = 1.0  # of a task's logit: tasks differ a lot, as SuperNI's do


def population_mean() -> float:
    """The expected score of a random task: E[sigmoid(N(0, TASK_SD))] x 100 (numerically)."""
    z = np.random.default_rng(99).normal(0, TASK_SD, 4_000_000)
    return float((1 / (1 + np.exp(-z))).mean() * 100)


def draw_study(rng: np.random.Generator, seeds: int = 1, seed_sd: float = 0.0) -> np.ndarray:
    """A synthetic study: TASKS random tasks (a success probability each), INSTANCES right/wrong
    (0 or 100) instances per task, ``seeds`` runs that shift every probability by N(0, seed_sd)."""
    p = 1 / (1 + np.exp(-rng.normal(0, TASK_SD, TASKS)))
    shifts = rng.normal(0, seed_sd, seeds)
    return np.stack([(rng.random((TASKS, INSTANCES)) < np.clip(p[:, None] + shift, 0, 1)).ravel() * 100.0
                     for shift in shifts])  # fmt: skip


def coverage(interval, seeds: int = 1, seed_sd: float = 0.0) -> float:
    """The share of DRAWS synthetic studies whose interval holds the population mean."""
    truth = population_mean()
    rng = np.random.default_rng(7)
    layout = stats.Layout(tuple(f"t{i}" for i in range(TASKS)), (INSTANCES,) * TASKS)
    hits = 0
    for _ in range(DRAWS):
        low, high = interval(draw_study(rng, seeds, seed_sd), layout)
        hits += low <= truth <= high
    return hits / DRAWS


def hierarchical(values, layout):
    estimate = stats.interval(values, layout, REPLICATES)
    return estimate.low, estimate.high


def tasks_only(values, layout):
    """Broken: tasks resampled, each keeps its instances (no instance level)."""
    means = values.mean(axis=0).reshape(TASKS, INSTANCES).mean(axis=1)
    draws = means[np.random.default_rng(1).integers(TASKS, size=(REPLICATES, TASKS))].mean(axis=1)
    return tuple(np.percentile(draws, [2.5, 97.5]))


def instances_only(values, layout):
    """Broken: every instance an independent draw (no task level)."""
    flat = values.mean(axis=0)
    draws = flat[np.random.default_rng(1).integers(flat.size, size=(REPLICATES, flat.size))].mean(axis=1)
    return tuple(np.percentile(draws, [2.5, 97.5]))


def test_the_hierarchical_bootstrap_covers_a_known_mean_at_about_95_percent():
    # 1000 synthetic studies: a binomial standard error of 0.7 points around the true coverage.
    assert 0.93 <= coverage(hierarchical) <= 0.985


def test_bootstraps_missing_a_level_of_the_sampling_undercover():
    assert coverage(tasks_only) < 0.93  # about 0.91: no instance level
    assert coverage(instances_only) < 0.90  # about 0.87: no task level


def test_seeds_are_resampled_when_there_are_several():
    # Three seeds that shift every task: their spread must widen the interval...
    rng = np.random.default_rng(3)
    values = draw_study(rng, seeds=3, seed_sd=0.15)
    layout = stats.Layout(tuple(f"t{i}" for i in range(TASKS)), (INSTANCES,) * TASKS)
    with_seeds = stats.interval(values, layout)
    averaged = stats.interval(values.mean(axis=0, keepdims=True), layout)
    assert with_seeds.value == pytest.approx(averaged.value)
    assert with_seeds.high - with_seeds.low > averaged.high - averaged.low
    assert with_seeds.seeds == 3 and with_seeds.seed_variance > 0 and averaged.seed_variance == 0
    # ...and the interval keeps about its coverage of the mean over seeds.
    assert 0.92 <= coverage(hierarchical, seeds=3, seed_sd=0.05) <= 0.99


def test_arms_sharing_tasks_and_instances_are_paired():
    rng = np.random.default_rng(5)
    values = draw_study(rng)
    layout = stats.Layout(tuple(f"t{i}" for i in range(TASKS)), (INSTANCES,) * TASKS)
    shifted = stats.bootstrap({"a": values + 3.0, "b": values}, layout, stats.difference("a", "b"))
    assert (shifted.value, shifted.low, shifted.high) == pytest.approx((3.0, 3.0, 3.0))  # the same draws for both
    other = stats.bootstrap({"a": draw_study(rng), "b": values}, layout, stats.difference("a", "b"))
    assert other.high - other.low > 5  # two unrelated arms do not cancel


def test_a_macro_mean_weighs_tasks_equally():
    layout = stats.Layout(("a", "b"), (1, 3))
    values = np.array([[100.0, 0.0, 0.0, 0.0]])
    assert stats.macro_means(values, layout).tolist() == [50.0]  # not 25: the one-instance task counts as much
    with pytest.raises(ValueError, match=r"do not fit the layout of 4 instances"):
        stats.resampled_means({"x": np.zeros((1, 3))}, layout, 10)


def test_the_power_estimate_scales_the_observed_variance():
    # An interval of half-width 1.96 x sqrt(4 + 0) around 3 holds 0; (3 / 1.96)^2 = 2.34 is the budget:
    # 4 / 2.34 = 1.71x the tasks would exclude 0 if the estimate stayed at 3.
    estimate = stats.Estimate(3.0, -0.9, 6.9, tasks=10, instances="60", seeds=2, seed_variance=0.0, data_variance=4.0)
    need = stats.needed(estimate, 0.0)
    assert need.data == pytest.approx(4.0 / (3.0 / 1.959963984540054) ** 2) and need.seeds == 1.0
    seedy = stats.Estimate(3.0, -0.9, 6.9, tasks=10, instances="60", seeds=2, seed_variance=3.0, data_variance=1.0)
    assert stats.needed(seedy, 0.0).seeds == pytest.approx(4.0 / (3.0 / 1.959963984540054) ** 2)  # seeds grow too
    assert stats.needed(estimate, 3.0).data is None  # on the boundary: no amount decides it


def test_time_to_a_fraction_of_the_improvement():
    steps = [0, 2, 4, 8]
    curves = np.array([[10.0, 6.0, 2.0, 0.0],   # 90 % of the drop (to 1.0) between steps 4 and 8: 6 / 8
                       [10.0, 0.5, 0.2, 0.0],   # reached by step 2 (at 1.0 after 1.89 of 2 steps)
                       [1.0, 2.0, 3.0, 4.0]])  # fmt: skip  # got worse: no time
    times = time_to(curves, steps, 0.9)
    assert times[0] == pytest.approx(6 / 8)
    assert times[1] == pytest.approx((10 - 1) / (10 - 0.5) * 2 / 8)
    assert math.isnan(times[2])


def test_f_quantiles_and_the_variance_ratio():
    assert stats.f_quantiles(2, 2) == pytest.approx((1 / 39.0, 39.0), rel=0.02)  # F(2, 2): 0.0256, 39.0
    ratio, low, high, df1, df2 = stats.variance_ratio([[1.0, 3.0], [2.0, 6.0]], [5.0, 6.0])
    assert (df1, df2) == (2, 1) and ratio == pytest.approx(((2.0 + 8.0) / 2) / 0.5)
    assert low < ratio < high
    assert math.isnan(stats.variance_ratio([[1.0, 2.0]], [3.0])[0])  # one seed: no variance
