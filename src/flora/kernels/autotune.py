"""Pick the fastest strategy for a per-example operator by measuring, once per key.

The key names everything that changes which strategy wins: the operator and its layer shape,
the rank, the batch size, the number of tokens per row, the number of distinct adapters (each
bucketed to a power of two), the device and the dtype. All candidates compute the same function,
so the choice never changes results beyond float rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import torch
from torch import Tensor


def token_bucket(tokens: int) -> int:
    """1 for decoding, else the next power of two (prefill shapes of similar length share a key; so
    do batches of similar size and composition)."""
    return 1 if tokens <= 1 else 1 << (tokens - 1).bit_length()


class Autotuner:
    """Times the candidates round-robin ``repeats`` times (after one warm-up call each), so a burst
    of load on the machine hits them alike, and remembers the one with the best time."""

    def __init__(self, repeats: int = 5) -> None:
        self.repeats = repeats
        self.choices: dict[Hashable, str] = {}

    def pick(self, key: Hashable, candidates: dict[str, Callable[[], Tensor]]) -> str:
        """The name of the fastest of ``candidates`` (callables without side effects) for ``key``."""
        choice = self.choices.get(key)
        if choice is None:
            best = dict.fromkeys(candidates, float("inf"))
            with torch.no_grad():
                for run in candidates.values():
                    run()
                for _ in range(self.repeats):
                    for name, run in candidates.items():
                        best[name] = min(best[name], _seconds(run))
            choice = self.choices[key] = min(best, key=best.__getitem__)
        return choice


def _seconds(run: Callable[[], Tensor]) -> float:
    start = time.perf_counter()
    result = run()
    if result.is_cuda:
        torch.cuda.synchronize(result.device)
    return time.perf_counter() - start
