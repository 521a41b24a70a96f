"""Verdicts from intervals: when a study may say that it agrees or disagrees with a paper's claim.

A claim is about a quantity x (a difference of two scores, a difference of differences, a log
ratio of learning rates): ``x > b`` or ``x < b`` for a boundary b. With the 95 % interval
``[low, high]`` of x (`flora.study.stats`), a `Rule` says

- *agrees* when the interval lies entirely on the claim's side (``low > b`` for ``x > b``),
- *disagrees* when it lies entirely on the other side, boundary included (``high <= b``),
- *cannot tell* otherwise (the interval holds b), or when the interval could not be computed.

Superiority ("A is better than B") is ``A - B > 0``. Non-inferiority ("A is at least as good as
B") is ``A - B > -margin`` with a stated margin in score points: it agrees when A is shown to be no
worse than B by more than the margin, disagrees when A is shown to be worse by more than it.
"Not close" is ``A - B < -margin``. A claim with several parts (LoRA *and* adapters) agrees when
every part agrees, disagrees when some part disagrees, and cannot tell otherwise (`combine`).

For *cannot tell*, `to_decide` turns the observed variance into a power estimate: how many tasks
(and seeds) would make the interval exclude the boundary if the estimate stayed where it is
(`flora.study.stats.needed`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from flora.study.stats import Estimate, needed

AGREES, DISAGREES, CANNOT_TELL = "agrees", "disagrees", "cannot tell"


@dataclass(frozen=True)
class Rule:
    """A claim ``x > boundary`` (``above``) or ``x < boundary``, judged on the 95 % interval of x."""

    boundary: float
    above: bool

    def verdict(self, estimate: Estimate | None) -> str:
        if estimate is None or not (math.isfinite(estimate.low) and math.isfinite(estimate.high)):
            return CANNOT_TELL
        low, high, b = estimate.low, estimate.high, self.boundary
        if self.above:
            return AGREES if low > b else DISAGREES if high <= b else CANNOT_TELL
        return AGREES if high < b else DISAGREES if low >= b else CANNOT_TELL

    def describe(self, quantity: str) -> str:
        """The rule in words, for the report."""
        side, other = ("above", "at or below") if self.above else ("below", "at or above")
        return (f"agrees when the 95 % interval of {quantity} lies {side} {self.boundary:g}, disagrees when it lies "
                f"{other} {self.boundary:g}, otherwise cannot tell")  # fmt: skip


SUPERIORITY = Rule(0.0, above=True)
LOWER = Rule(0.0, above=False)


def non_inferiority(margin: float) -> Rule:
    """``A - B > -margin``: A at least as good as B, within ``margin`` points."""
    return Rule(-margin, above=True)


def not_close(margin: float) -> Rule:
    """``A - B < -margin``: A worse than B by more than ``margin`` points."""
    return Rule(-margin, above=False)


def combine(verdicts: Iterable[str]) -> str:
    """A claim of several parts: agrees when all agree, disagrees when any disagrees, else cannot tell."""
    verdicts = list(verdicts)
    if not verdicts:
        return CANNOT_TELL
    if all(v == AGREES for v in verdicts):
        return AGREES
    return DISAGREES if DISAGREES in verdicts else CANNOT_TELL


def to_decide(estimate: Estimate, rule: Rule) -> str:
    """What would decide a *cannot tell*: the tasks (and seeds) after which an interval of the same
    centre would exclude the rule's boundary, from the observed seed and data variance."""
    if estimate.data_variance is None:  # a statistic like an argmax over a grid: no variance to scale
        return "more validation instances, tasks or seeds, or a finer grid (the choice varies between replicates)"
    need = needed(estimate, rule.boundary)
    if need.data is None:
        return (f"no amount of data: the estimate sits on the boundary {rule.boundary:g} (an interval half as wide "
                f"as now, {estimate.half_width:.1f}, would still hold it)")  # fmt: skip
    tasks = math.ceil(estimate.tasks * need.data)
    text = f"about {tasks} tasks ({need.data:.1f}x the {estimate.tasks} now, at {estimate.instances} instances each)"
    if need.seeds and need.seeds > 1:
        text += f" and {math.ceil(estimate.seeds * need.seeds)} seeds ({need.seeds:.1f}x)"
    return text + " if the estimate stayed where it is"
