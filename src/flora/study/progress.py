"""The progress display of ``flora study run``: a bar of trials and a bar of the current pack's steps.

Both are tqdm bars on stderr. When stderr is not a terminal (a log file under ``nohup``) they
print at most every 30 seconds.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class StudyProgress:
    """``trials`` (finished out of planned) and ``steps`` (of the pack training now, with its mean loss)."""

    def __init__(self, total: int, done: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.interval = 0.1 if sys.stderr.isatty() else 30.0
        self.trials = tqdm(total=total, initial=done, desc="trials", unit="trial", position=0, disable=not enabled,
                           dynamic_ncols=True, mininterval=self.interval)  # fmt: skip
        self.steps: tqdm | None = None

    def pack_started(self, index: int, count: int, trials: int) -> None:
        self.pack_finished(0)
        self.steps = tqdm(total=None, desc=f"pack {index}/{count}: {trials} trial{'s' if trials > 1 else ''}",
                          unit="step", position=1, leave=False, disable=not self.enabled, dynamic_ncols=True,
                          mininterval=self.interval)  # fmt: skip

    def step(self, step: int, steps: int, losses: dict[str, float]) -> None:
        if self.steps is None:
            return
        self.steps.total = steps
        self.steps.n = step
        if losses:
            self.steps.set_postfix(loss=f"{sum(losses.values()) / len(losses):.3f}", refresh=False)
        self.steps.refresh() if self.interval < 1 else self.steps.update(0)

    def pack_finished(self, trials: int) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None
        if trials:
            self.trials.update(trials)

    def close(self) -> None:
        self.pack_finished(0)
        self.trials.close()
