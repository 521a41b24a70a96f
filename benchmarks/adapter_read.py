"""What a server's cold adapter costs before it can run: reading its file, installing it, deleting it.

On ``serve_load.py``'s adapters (LoRA r8 on every linear layer, 420 tensors, PEFT format), per
adapter and in milliseconds, median over ``--rounds`` rounds of ``--adapters`` adapters each (the
files in the page cache, as a server's repeated reads are):

- ``read``: `AdapterFiles.read`, what the server's reader thread runs, against ``load_file``
  (safetensors' tensor-by-tensor read, `reference`), timed in alternating pairs, with the thread's
  CPU time beside the wall time;
- ``install`` and ``delete``: `AdapterModel.install_adapter` of the tensors read, then
  `delete_adapter`, on a model holding ``--held`` adapters already (a server's engine thread runs
  both between two decoding steps). Usage:

    python benchmarks/adapter_read.py --json benchmarks/results/adapter_read.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import write_json
from safetensors.torch import load_file
from serve_workload import adapter_set

from flora import AdapterModel, load_base
from flora.io import WEIGHTS_NAME, inspect_adapter_dir, read_adapter_dir

FIGURES = ("read_ms", "read_cpu_ms", "load_file_ms", "install_ms", "delete_ms")


def timed(call: Callable[[], Any]) -> tuple[Any, float, float]:
    """``call()``'s result, and its wall and this thread's CPU milliseconds."""
    wall, cpu = time.perf_counter(), time.thread_time()
    result = call()
    return result, (time.perf_counter() - wall) * 1e3, (time.thread_time() - cpu) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=16, help="adapters read, installed and deleted per round")
    parser.add_argument("--held", type=int, default=30, help="adapters already installed (a server's LRU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if min(args.adapters, args.rounds, args.rank) < 1 or args.held < 0:
        parser.error(f"--adapters {args.adapters}, --rounds {args.rounds} and --rank {args.rank}: expected at "
                     f"least 1; --held {args.held}: expected at least 0")  # fmt: skip
    paths = list(adapter_set(args.model, args.held + args.adapters, args.rank).values())
    model = AdapterModel(*load_base(args.model))
    model.eval()
    model.adapters_read_only = True  # as a server's
    for i, path in enumerate(paths[: args.held]):
        model.install_adapter(f"held{i}", *read_adapter_dir(path))
    cold = [inspect_adapter_dir(path) for path in paths[args.held :]]
    figures: dict[str, list[float]] = {key: [] for key in FIGURES}
    for files in cold:  # warm-up: the page cache
        load_file(files.directory / WEIGHTS_NAME)
        files.read()
    for round_ in range(args.rounds):
        for i, files in enumerate(cold):
            theirs = functools.partial(load_file, files.directory / WEIGHTS_NAME)
            if (round_ + i) % 2:  # which of the pair goes first alternates
                (tensors, read_ms, read_cpu_ms), (_, load_ms, _) = timed(files.read), timed(theirs)
            else:
                (_, load_ms, _), (tensors, read_ms, read_cpu_ms) = timed(theirs), timed(files.read)
            _, install_ms, _ = timed(functools.partial(model.install_adapter, "cold", files.config, tensors))
            _, delete_ms, _ = timed(functools.partial(model.delete_adapter, "cold"))
            for key, value in zip(FIGURES, (read_ms, read_cpu_ms, load_ms, install_ms, delete_ms), strict=True):
                figures[key].append(value)
    medians = {key: statistics.median(values) for key, values in figures.items()}
    result = {"benchmark": "adapter_read", "model": args.model, "rank": args.rank,
              "tensors_per_adapter": len(cold[0].shapes), "held": args.held, "adapters": args.adapters,
              "rounds": args.rounds, "median_ms": medians}  # fmt: skip
    result["read_over_load_file"] = statistics.median(
        r / f for r, f in zip(figures["read_ms"], figures["load_file_ms"], strict=True)
    )
    for key, value in result["median_ms"].items():
        print(f"{key:>14}: {value:.2f}")
    print(f"read / load_file: {result['read_over_load_file']:.3f} (median of pairs)")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
