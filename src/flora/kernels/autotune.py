"""Pick the fastest strategy for a per-example operator by measuring, once per key.

The key names everything that changes which strategy wins: the operator and its layer shape,
the rank, the batch size, the number of tokens per row, the number of distinct adapters (each
bucketed to a power of two), the device and the dtype. All candidates compute the same function,
so the choice never changes results beyond float rounding.

Each candidate is timed with cold caches: before every timed call the tuner reads a buffer twice
the size of a CPU's last-level cache (or a GPU's L2). A layer measured alone would otherwise find
its per-row tables in cache, where in a model's forward the other layers' weights have pushed them
out: timed warm, a strategy that reads many tables (``bmm`` over distinct adapters) looks as cheap
as one that reads few (``stacked``, each adapter once), and the choice is wrong for the model.
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


FLUSH_BYTES = 64 * 2**20  # twice a 32 MiB last-level cache; an H100's L2 is 50 MiB


class Autotuner:
    """Times the candidates round-robin ``repeats`` times (after one warm-up call each), so a burst
    of load on the machine hits them alike, each with cold caches (a read of ``flush_bytes`` before
    it), and remembers the one with the best time."""

    def __init__(self, repeats: int = 5, flush_bytes: int = FLUSH_BYTES) -> None:
        self.repeats = repeats
        self.flush_bytes = flush_bytes
        self.choices: dict[Hashable, str] = {}
        self._flush: dict[torch.device, Tensor] = {}

    def pick(self, key: Hashable, candidates: dict[str, Callable[[], Tensor]]) -> str:
        """The name of the fastest of ``candidates`` (callables without side effects) for ``key``."""
        choice = self.choices.get(key)
        if choice is None:
            best = dict.fromkeys(candidates, float("inf"))
            with torch.no_grad():
                device = next(iter(candidates.values()))().device  # the first one's warm-up call
                for run in list(candidates.values())[1:]:
                    run()
                for _ in range(self.repeats):
                    for name, run in candidates.items():
                        self._cold(device)
                        best[name] = min(best[name], _seconds(run))
            choice = self.choices[key] = min(best, key=best.__getitem__)
        return choice

    def _cold(self, device: torch.device) -> None:
        """Push what the candidates read out of ``device``'s caches."""
        if self.flush_bytes:
            buffer = self._flush.get(device)
            if buffer is None:
                buffer = self._flush[device] = torch.ones(self.flush_bytes // 4, device=device)
            buffer.sum()


def _seconds(run: Callable[[], Tensor]) -> float:
    start = time.perf_counter()
    result = run()
    if result.is_cuda:
        torch.cuda.synchronize(result.device)
    return time.perf_counter() - start
