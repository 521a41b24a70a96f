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

Measuring costs a few tens of milliseconds per key, and a server meets some forty keys in its first
minute (batch sizes, prompt lengths, adapter counts): a tuner given a ``path`` keeps its choices
there (JSON, written atomically after each new one) and starts from them, as Triton's and
TensorRT's timing caches do. Choices hold for one machine: `machine_fingerprint` names the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import torch
from torch import Tensor

from flora.io import atomic_write

logger = logging.getLogger("flora")


def token_bucket(tokens: int) -> int:
    """1 for decoding, else the next power of two (prefill shapes of similar length share a key; so
    do batches of similar size and composition)."""
    return 1 if tokens <= 1 else 1 << (tokens - 1).bit_length()


FLUSH_BYTES = 64 * 2**20  # twice a 32 MiB last-level cache; an H100's L2 is 50 MiB


class Autotuner:
    """Times the candidates round-robin ``repeats`` times (after one warm-up call each), so a burst
    of load on the machine hits them alike, each with cold caches (a read of ``flush_bytes`` before
    it), and remembers the one with the best time."""

    def __init__(self, repeats: int = 5, flush_bytes: int = FLUSH_BYTES, path: str | os.PathLike | None = None) -> None:
        self.repeats = repeats
        self.flush_bytes = flush_bytes
        self.choices: dict[Hashable, str] = {}
        self.path = None if path is None else Path(path)
        self._saved: dict[str, str] = self._load() if self.path is not None else {}
        self._flush: dict[torch.device, Tensor] = {}

    def known(self, key: Hashable) -> str | None:
        """The choice for ``key`` measured before (by this tuner or, through ``path``, an earlier one)."""
        choice = self.choices.get(key)
        if choice is None and self._saved:
            choice = self._saved.get(repr(key))
            if choice is not None:
                self.choices[key] = choice
        return choice

    def pick(self, key: Hashable, candidates: dict[str, Callable[[], Tensor]]) -> str:
        """The name of the fastest of ``candidates`` (callables without side effects) for ``key``."""
        choice = self.known(key)
        if choice not in candidates:
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
            if self.path is not None:
                self._save(repr(key), choice)
        return choice

    def _load(self) -> dict[str, str]:
        """The choices kept at ``path``; none (with a warning) from a file that is not a tuner's."""
        try:
            saved = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            logger.warning("autotune cache %s cannot be read (%s): measuring again", self.path, err)
            return {}
        if not isinstance(saved, dict) or not all(isinstance(v, str) for v in saved.values()):
            logger.warning("autotune cache %s is not a JSON object of choices: measuring again", self.path)
            return {}
        return saved

    def _save(self, key: str, choice: str) -> None:
        """Add one choice to ``path`` (with what other processes added since it was read)."""
        self._saved = {**self._load(), **self._saved, key: choice}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(self._saved, indent=0, sort_keys=True)))
        except OSError as err:
            logger.warning("autotune cache %s cannot be written (%s): choices kept in memory only", self.path, err)

    def _cold(self, device: torch.device) -> None:
        """Push what the candidates read out of ``device``'s caches."""
        if self.flush_bytes:
            buffer = self._flush.get(device)
            if buffer is None:
                buffer = self._flush[device] = torch.ones(self.flush_bytes // 4, device=device)
            buffer.sum()


def machine_fingerprint(device: str | torch.device = "cpu") -> str:
    """A short name for what decides a strategy's speed here: the processor (and GPU), the core and
    thread counts, and torch's version."""
    device = torch.device(device)
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            processor = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                             processor)  # fmt: skip
    except OSError:
        pass
    parts = [processor, str(os.cpu_count()), str(torch.get_num_threads()), torch.__version__, device.type]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _seconds(run: Callable[[], Tensor]) -> float:
    start = time.perf_counter()
    result = run()
    if result.is_cuda:
        torch.cuda.synchronize(result.device)
    return time.perf_counter() - start
