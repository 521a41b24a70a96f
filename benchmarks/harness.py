"""What the benchmark scripts share: inputs, random adapters, interleaved timing and the JSON file.

Every system of a run is timed round by round, interleaved (round 1 of every system, then round
2, ...), so machine noise hits each alike; a figure is the median over rounds. A system measured
against a reference (the bare model) is timed next to its own call of the reference (before and
after it in turn), in every round: its ratio is the median of those paired ratios, which the
minute-to-minute swings of a shared machine (10-20% here) move far less than a ratio of medians
taken minutes apart.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from flora.io import atomic_write

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TEXT = (
    "The history of adapters in machine learning begins with small bottleneck layers inserted into "
    "large networks so that one frozen model could serve many tasks. Low-rank adaptation replaced the "
    "bottleneck with a pair of thin matrices whose product is added to a frozen weight, and serving "
    "systems learned to batch requests that use different adapters on the same base model. "
)


@dataclass
class Case:
    """One measured system: ``run()`` does one unit of work (a generate call, a training step).
    With a ``reference``, every timed call follows a call of the reference, and ``ratios`` holds
    ``reference seconds / own seconds`` per pair."""

    record: dict
    run: Callable[[], object]
    reference: Case | None = None
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def ratio_to_reference(self) -> float:
        return statistics.median(self.ratios)


def token_rows(tokenizer, rows: int, length: int) -> torch.Tensor:
    """``[rows, length]`` ids of English text, each row a different window."""
    ids = tokenizer(TEXT * 6).input_ids
    return torch.tensor([ids[7 * row : 7 * row + length] for row in range(rows)])


def randomize(parameters: dict[str, torch.Tensor], seed: int) -> None:
    """Give a fresh adapter random, non-identity values (LoRA ``B``, FLoRA's factors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, parameter in parameters.items():
            if "lora_B" in key:
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
            elif "flora" in key:
                parameter.copy_(1 + 0.05 * torch.randn(parameter.shape, generator=generator))


def assignment(rows: int, distinct: int, prefix: str) -> list[str]:
    """Row i uses adapter ``prefix + str(i % distinct)``: every adapter appears, rows interleaved."""
    return [f"{prefix}{row % distinct}" for row in range(rows)]


def measure(cases: list[Case], rounds: int) -> None:
    """One warm-up call per case (it also autotunes), then ``rounds`` interleaved timed rounds. A
    case that is another's reference is timed in those pairs (not on its own), first in even rounds
    and second in odd ones: two calls of the same computation differ by a few percent by their
    place in a pair on this machine, which the alternation cancels."""
    for case in tqdm(cases, desc="warm-up (and autotune)"):
        case.run()
    references = {id(case.reference) for case in cases if case.reference is not None}
    for round_ in tqdm(range(rounds), desc="rounds"):
        for case in cases:
            if id(case) in references:
                continue
            if case.reference is None:
                _timed(case)
                continue
            first, second = (case.reference, case) if round_ % 2 == 0 else (case, case.reference)
            times = {id(first): _timed(first), id(second): _timed(second)}
            case.ratios.append(times[id(case.reference)] / times[id(case)])


def _timed(case: Case) -> float:
    start = time.perf_counter()
    case.run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    case.seconds.append(seconds := time.perf_counter() - start)
    return seconds


def add_device_options(parser) -> None:
    """``--device``, ``--dtype`` (the model's) and ``--adapter-dtype`` (LoRA's tables: `AdapterModel.adapter_dtype`)."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="the model's (default: float32)")
    parser.add_argument("--adapter-dtype", choices=tuple(DTYPES), help="LoRA's per-row tables (default: the model's)")


def machine(device: str) -> dict:
    """Where a run ran: threads and platform, and the GPU's name on CUDA."""
    info = {"cpus": torch.get_num_threads(), "platform": platform.platform(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    print(f"wrote {path}")
