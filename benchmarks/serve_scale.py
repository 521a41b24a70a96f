"""Scale benchmark of `flora serve`: thousands of adapters under a memory cap (S-LoRA's workload, at
this machine's scale), vLLM's CPU build on the same trace, and replicas on Ray Serve.

Adapters: PEFT-format LoRA on ``q_proj`` and ``v_proj`` (PEFT's default for Llama models), adapter
``i`` of rank 4, 8, 16, 32 in turn (0.9-7.4 MB each on SmolLM2-135M), random, written once under
flora's cache and reused (`serve_workload.mixed_adapter_set`). Trace: ``--requests`` requests with
Poisson arrivals at ``--rate``, prompt and output lengths as ``serve_load.py``'s; every run replays
the same arrivals and lengths, and draws each request's adapter over the first ``n`` adapters by a
power law with alpha 1 (S-LoRA's: ``p(i) ∝ 1/i``) or uniformly (the same draw for every system).

Runs (``--systems``):

- ``flora``: one process (``flora serve``, both cores) at each ``--adapters`` count, power law, and
  uniform at the largest; ``--adapter-memory-mb`` (default 128: about 38 of these adapters,
  3.3 MiB on average, of the 55-95 distinct ones a run at 500 or more meets; the 2,000 are 6.9 GB)
  is below what a run needs, so adapters are evicted and read again;
- ``vllm``: vLLM's CPU build (``make vllm-env``) with its own way to many adapters: every adapter is
  found on first use by its filesystem LoRA resolver (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``,
  ``VLLM_PLUGINS=lora_filesystem_resolver``), ``--max-loras`` in a step and ``--max-cpu-loras`` in
  memory; at the counts of ``--vllm-adapters`` (a run that does not finish by ``--deadline`` says so);
- ``ray-multiplexed`` and ``ray-random``: ``flora serve --replicas 2`` (one CPU each) on Ray Serve,
  routed by adapter (model multiplexing) or at random, at the largest count, power law, and on the
  ``--ray-workloads`` (e.g. ``16-uniform:12``: a working set larger than a replica holds). Beside
  each pair: what the trace allows (`routing_bound`: LRU caches on two replicas, ideal
  multiplexing against random routing). Under a long power-law tail most adapters come once and
  load once whatever the routing, which caps what multiplexing can save.

Per run: output tokens/s, p50/p99 TTFT, TPOT and end-to-end latency, for all requests and for warm and
cold-adapter requests apart (flora says per response whether it loaded the adapter,
``x-flora-adapter-cache``; for vLLM, cold is an adapter's first request in the trace), adapter loads,
hits and evictions (``/metrics``), errors, and the peak resident memory of the server's processes
(sampled every 0.2 s). ``--repeats N`` runs flora's power-law counts N times, interleaved, and the
targets read the medians. Usage:

    cd benchmarks && python serve_scale.py --json results/serve_scale.json --figure results/serve_scale.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import httpx
from harness import write_json
from prometheus_client.parser import text_string_to_metric_families
from serve_client import figures, outcome_records, percentiles, run_load
from serve_load import comma_list, int_range, positive_float, positive_int, positive_ints
from serve_servers import REPO, VLLM_PYTHON, Server, ServerSpec, vllm_available
from serve_workload import Workload, draw_requests, mixed_adapter_set, route

from flora import load_base
from flora.base import resolve_model_dir

SYSTEMS = ("flora", "vllm", "ray-multiplexed", "ray-random")
RANKS = (4, 8, 16, 32)
TARGETS = ("q_proj", "v_proj")
POWER_LAW = 1.0
WARMUP = 2


RAY_WORKLOAD = re.compile(r"[1-9][0-9]*-(zipf|uniform)(:[1-9][0-9]*)?")


def ray_workloads(text: str) -> list[str]:
    """``COUNT-zipf`` or ``COUNT-uniform``, each with an optional ``:HELD``, comma-separated."""
    workloads = comma_list(text)
    for workload in workloads:
        if not RAY_WORKLOAD.fullmatch(workload):
            raise argparse.ArgumentTypeError(f"{workload!r}: expected COUNT-zipf or COUNT-uniform, optionally :HELD "
                                             f"(e.g. 2000-zipf or 16-uniform:12)")  # fmt: skip
    return workloads


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--systems", type=comma_list, default=list(SYSTEMS), help="of: " + ", ".join(SYSTEMS))
    parser.add_argument("--adapters", type=positive_ints, default=[8, 100, 500, 2000], help="adapter counts")
    parser.add_argument("--vllm-adapters", type=positive_ints, default=[8, 100], help="vLLM's adapter counts")
    parser.add_argument("--requests", type=positive_int, default=96)
    parser.add_argument("--rate", type=positive_float, default=2.5, help="mean arrival rate, requests/s (Poisson)")
    parser.add_argument("--prompt-tokens", type=int_range, default=(16, 128))
    parser.add_argument("--output-tokens", type=int_range, default=(16, 64))
    parser.add_argument("--deadline", type=positive_float, default=150.0, help="seconds per run after the first send")
    parser.add_argument("--adapter-memory-mb", type=positive_float, default=128.0)
    parser.add_argument("--max-loaded-adapters", type=positive_int, default=2000)
    parser.add_argument("--max-num-seqs", type=positive_int, default=32)
    parser.add_argument("--ray-workloads", type=ray_workloads,
                        help="the Ray runs' workloads, COUNT-zipf or COUNT-uniform, each with :HELD for the "
                             "adapters a replica holds at most (default: the largest count, zipf, "
                             "--max-loaded-adapters)")  # fmt: skip
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="runs of flora's power-law counts, interleaved (8, 100, ..., 8, 100, ...)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", type=Path, default=REPO / "runs" / "serve_scale")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--figure", type=Path, help="draw output tokens/s against the number of adapters here (PNG)")
    return parser.parse_args()


class PeakMemory:
    """The largest resident memory of a process and its descendants, sampled on a thread."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid, self.every_s, self.peak_mb = pid, every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, tree_resident_mb(self.pid))
            self._stop.wait(self.every_s)


def tree_resident_mb(pid: int) -> float:
    """Resident memory (VmRSS) of ``pid`` and every process descended from it, in MB."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grew = {pid}, True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in tree and child not in tree:
                tree.add(child)
                grew = True
    total = 0.0
    for member in tree:
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def adapter_counters(url: str) -> dict[str, float]:
    """flora's adapter loads, hits and evictions from ``/metrics`` (summed over replicas); {} for vLLM."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    counters = {}
    for family in text_string_to_metric_families(text):
        for kind in ("adapter_loads", "adapter_hits", "adapter_evictions"):
            if family.name.endswith(f":{kind}"):
                counters[kind] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return counters


def flora_spec(args, adapter_dir: Path, replicas: int = 1, routing: str | None = None, held: int | None = None):
    """`flora serve` on ``adapter_dir``; ``replicas`` > 1: on Ray Serve with ``routing``, each replica holding
    ``held`` adapters at most (default: ``--max-loaded-adapters``)."""
    held = held or args.max_loaded_adapters
    command = [sys.executable, "-m", "flora", "serve", "--model", args.model, "--adapter-dir", str(adapter_dir),
               "--host", "127.0.0.1", "--port", "{port}", "--max-num-seqs", str(args.max_num_seqs),
               "--max-loaded-adapters", str(held),
               "--adapter-memory-mb", str(args.adapter_memory_mb)]  # fmt: skip
    name = "flora"
    if replicas > 1:
        command += ["--replicas", str(replicas), "--routing", routing]
        name = f"ray-{routing}"
    return ServerSpec(name=name, command=tuple(command), startup_timeout_s=600.0)


def resolver_view(adapter_dir: Path, names: list[str], model_path: str) -> Path:
    """``names`` of ``adapter_dir`` as vLLM's filesystem resolver takes them: it serves an adapter only if
    its config's ``base_model_name_or_path`` is the path vLLM loaded the model from (not the served name
    flora records), so each gets a directory beside ``adapter_dir`` with that config and its tensors linked."""
    view = adapter_dir.with_name(adapter_dir.name + "-vllm-view")
    for name in names:
        (view / name).mkdir(parents=True, exist_ok=True)
        config = json.loads((adapter_dir / name / "adapter_config.json").read_text())
        (view / name / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": model_path}))
        tensors = view / name / "adapter_model.safetensors"
        if not tensors.exists():
            tensors.symlink_to(adapter_dir / name / "adapter_model.safetensors")
    return view


def vllm_spec(args, adapter_dir: Path, names: list[str]) -> ServerSpec:
    """vLLM's CPU server finding each adapter on first use (its filesystem resolver, over `resolver_view`)."""
    model_path = str(resolve_model_dir(args.model))
    adapter_dir = resolver_view(adapter_dir, names, model_path)
    command = (str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model",
               model_path, "--served-model-name", args.model, "--host", "127.0.0.1",
               "--port", "{port}", "--enable-lora", "--max-lora-rank", str(max(RANKS)), "--max-loras", "32",
               "--max-cpu-loras", str(min(args.max_loaded_adapters, 256)), "--max-num-seqs", str(args.max_num_seqs),
               "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.2", "--max-model-len", "2048",
               "--no-enable-prefix-caching", "--disable-uvicorn-access-log")  # fmt: skip
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_PLUGINS": "lora_filesystem_resolver",
           "VLLM_LORA_RESOLVER_CACHE_DIR": str(adapter_dir)}  # fmt: skip
    return ServerSpec(name="vllm", command=command, env=env, startup_timeout_s=600.0)


def run(spec: ServerSpec, workload: Workload, args, log_name: str) -> dict:
    """One measured run of ``workload`` on a server started from ``spec``."""
    server = Server(spec, args.log_dir / f"{log_name}.log")
    with server as url:
        warm_up = workload.requests[:WARMUP]
        run_load(url, warm_up, lambda r: r.adapter, deadline_s=120.0)  # its adapters come first in the trace too
        before = adapter_counters(url)
        with PeakMemory(server.process.pid) as memory:
            outcomes, start = run_load(url, workload.requests, lambda r: r.adapter, args.deadline)
        after = adapter_counters(url)
    seen, first_use = set(), []
    for request in workload.requests:
        first_use.append(request.adapter not in seen)
        seen.add(request.adapter)
    result = {"system": spec.name, "adapters": workload.adapters, "distribution": workload.distribution,
              **figures(outcomes, start), "peak_resident_mb": round(memory.peak_mb, 1),
              "adapter_counters": {k: after.get(k, 0) - before.get(k, 0) for k in after},
              "startup_s": server.startup_s}  # fmt: skip
    for label, cold in (("warm", False), ("cold", True)):
        chosen = [o for o, first in zip(outcomes, first_use, strict=True)
                  if o.finished and ((o.adapter_cache == "miss") if o.adapter_cache else first) == cold]  # fmt: skip
        result[f"{label}_requests"] = len(chosen)
        result[f"{label}_ttft_s"] = percentiles([o.ttft_s for o in chosen])
    result["outcomes"] = outcome_records(outcomes, start)
    loads = result["adapter_counters"].get("adapter_loads")
    print(f"{spec.name:<16} {workload.name:<14} {result['finished']}/{result['requests']} finished, "
          f"{result['errors']} errors, {result.get('output_tokens_per_s') or 0:6.1f} tok/s, "
          f"peak {result['peak_resident_mb']:.0f} MB, loads {loads}")  # fmt: skip
    return result


def medians(runs: list[dict]) -> dict:
    """One run of a system and workload standing for its repeats: the median of output tokens/s and of the
    p99 TTFTs (all, warm, cold), the largest peak memory, every repeat's adapter counters and errors added."""
    if len(runs) == 1:
        return runs[0]

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    merged = dict(
        runs[-1],
        repeats=len(runs),
        output_tokens_per_s=median([r.get("output_tokens_per_s") for r in runs]),
        peak_resident_mb=max(r["peak_resident_mb"] for r in runs),
        errors=sum(r["errors"] for r in runs),
    )
    for key in ("ttft_s", "warm_ttft_s", "cold_ttft_s"):
        merged[key] = dict(runs[-1][key], p99=median([r[key]["p99"] for r in runs]))
    merged["output_tokens_per_s_runs"] = [r.get("output_tokens_per_s") for r in runs]
    return merged


def by_workload(runs: list[dict], system: str) -> dict[tuple[int, str], dict]:
    """``{(adapters, distribution): medians of the repeats}`` of ``system``'s runs."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in runs:
        if r["system"] == system:
            groups.setdefault((r["adapters"], r["distribution"]), []).append(r)
    return {key: medians(group) for key, group in groups.items()}


def summary(runs: list[dict], args) -> dict:
    """The issue's targets, from the runs (medians over repeats)."""
    flora = by_workload(runs, "flora")
    smallest, largest = min(args.adapters), max(args.adapters)
    checks = {}
    low, high = flora.get((smallest, "zipf")), flora.get((largest, "zipf"))
    if low and high and low.get("output_tokens_per_s") and high.get("output_tokens_per_s"):
        ratio = high["output_tokens_per_s"] / low["output_tokens_per_s"]
        checks[f"tokens_per_s_{largest}_over_{smallest}"] = {"value": round(ratio, 3), "target": ">= 0.95",
                                                             "met": ratio >= 0.95}  # fmt: skip
        bound = 1.1 * (low["peak_resident_mb"] + args.adapter_memory_mb)
        checks[f"peak_resident_mb_{largest}"] = {"value": high["peak_resident_mb"], "bound": round(bound, 1),
                                                 "met": high["peak_resident_mb"] <= bound}  # fmt: skip
        cold, warm = high["cold_ttft_s"]["p99"], high["warm_ttft_s"]["p99"]
        if cold is not None and warm is not None:
            checks["cold_over_warm_p99_ttft"] = {
                "value": round(cold / warm, 3),
                "target": "<= 2",
                "met": cold <= 2 * warm,
            }
        errors = sum(r["errors"] for r in flora.values())
        checks["errors"] = {"value": errors, "met": errors == 0}
    for key, pair in ray_pairs(runs).items():
        name = f"{key[0]}-{key[1]}"
        loads = {system: pair[system]["adapter_counters"].get("adapter_loads") for system in pair}
        if loads["ray-multiplexed"] and loads["ray-random"]:
            factor = loads["ray-random"] / loads["ray-multiplexed"]
            checks[f"ray_loads_random_over_multiplexed_{name}"] = {
                "value": round(factor, 2), "target": ">= 2", "met": factor >= 2,
                "allowed_by_the_trace": pair["ray-multiplexed"].get("routing_bound")}  # fmt: skip
        one = flora.get(key)
        if one and one.get("output_tokens_per_s") and pair["ray-multiplexed"].get("output_tokens_per_s"):
            share = pair["ray-multiplexed"]["output_tokens_per_s"] / one["output_tokens_per_s"]
            checks[f"ray_multiplexed_over_one_process_{name}"] = {"value": round(share, 3), "target": ">= 0.9",
                                                                  "met": share >= 0.9}  # fmt: skip
    return checks


def replica_holds(args, adapters: dict[str, Path], count: int, held: int | None) -> int:
    """About how many of a workload's ``count`` adapters a Ray replica holds: its adapter count limit
    ``held``, or its memory over their mean size, whichever is less."""
    held = held or args.max_loaded_adapters
    sizes = [path.joinpath("adapter_model.safetensors").stat().st_size for path in list(adapters.values())[:count]]
    return max(1, min(held, int(args.adapter_memory_mb * 2**20 / statistics.mean(sizes))))


def ray_pairs(runs: list[dict]) -> dict[tuple[int, str], dict[str, dict]]:
    """``{(adapters, distribution): {"ray-multiplexed": run, "ray-random": run}}`` for workloads run both ways."""
    pairs: dict[tuple[int, str], dict[str, dict]] = {}
    for r in runs:
        if r["system"].startswith("ray-"):
            pairs.setdefault((r["adapters"], r["distribution"]), {})[r["system"]] = r
    return {key: pair for key, pair in pairs.items() if len(pair) == 2}


def routing_bound(adapters: list[str], held: int, replicas: int = 2, draws: int = 20) -> dict:
    """What routing can save on a trace: the loads of LRU caches of ``held`` adapters on ``replicas``
    replicas when each request goes to a replica that holds its adapter if one does (else to a random
    one: ideal multiplexing), and when every request goes to a random replica (the mean of ``draws``
    draws). A trace whose adapters mostly come once (a long power-law tail) loads each of those once
    whatever the routing, which caps the ratio."""

    def loads(choose) -> int:
        caches = [OrderedDict() for _ in range(replicas)]
        count = 0
        for adapter in adapters:
            cache = caches[choose(adapter, caches)]
            if adapter in cache:
                cache.move_to_end(adapter)
                continue
            count += 1
            cache[adapter] = None
            if len(cache) > held:
                cache.popitem(last=False)
        return count

    rng = random.Random(0)
    sticky = statistics.mean(
        loads(lambda a, caches: next((i for i, c in enumerate(caches) if a in c), rng.randrange(replicas)))
        for _ in range(draws)
    )
    scattered = statistics.mean(loads(lambda a, caches: rng.randrange(replicas)) for _ in range(draws))
    return {"multiplexed_loads": sticky, "random_loads": scattered, "ratio": round(scattered / sticky, 2)}


def main() -> None:
    args = parse_args()
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"--systems {sorted(unknown)}: expected some of {', '.join(SYSTEMS)}")
    largest = max(args.adapters + args.vllm_adapters)
    adapters = mixed_adapter_set(args.model, largest, RANKS, TARGETS, seed=args.seed)
    adapter_dir = next(iter(adapters.values())).parent
    _, tokenizer = load_base(args.model)
    requests = draw_requests(tokenizer, args.requests + WARMUP, args.rate, args.prompt_tokens, args.output_tokens,
                             args.seed)  # fmt: skip
    names = list(adapters)

    def workload(count: int, distribution: str) -> Workload:
        return route(requests, names[:count], distribution, args.seed + 1, exponent=POWER_LAW)

    plan = []
    if "flora" in args.systems:
        for _ in range(args.repeats):
            plan += [(flora_spec(args, adapter_dir), workload(n, "zipf")) for n in sorted(args.adapters)]
        plan.append((flora_spec(args, adapter_dir), workload(max(args.adapters), "uniform")))
    if "vllm" in args.systems:
        if vllm_available():
            plan += [(vllm_spec(args, adapter_dir, names[:n]), workload(n, "zipf")) for n in sorted(args.vllm_adapters)]
        else:
            print("vllm: skipped (no .venv-vllm: run `make vllm-env`)")
    for ray_workload in args.ray_workloads or [f"{max(args.adapters)}-zipf"]:
        shape, _, held = ray_workload.partition(":")
        count, _, distribution = shape.partition("-")
        for routing in ("multiplexed", "random"):
            if f"ray-{routing}" in args.systems:
                spec = flora_spec(args, adapter_dir, replicas=2, routing=routing, held=int(held) if held else None)
                plan.append((spec, workload(int(count), distribution)))
    started = time.time()
    runs = []
    for spec, chosen in plan:
        try:
            runs.append(run(spec, chosen, args, f"{spec.name}-{chosen.name}"))
        except (RuntimeError, TimeoutError) as err:
            print(f"{spec.name} {chosen.name}: {err}")
            runs.append({"system": spec.name, "adapters": chosen.adapters, "distribution": chosen.distribution,
                         "error": str(err)[:2000]})  # fmt: skip
            continue
        if spec.name.startswith("ray-"):
            held = int(spec.command[spec.command.index("--max-loaded-adapters") + 1])
            runs[-1]["replica_max_loaded_adapters"] = held
            runs[-1]["routing_bound"] = routing_bound([r.adapter for r in chosen.requests],
                                                      replica_holds(args, adapters, chosen.adapters, held))  # fmt: skip
    checks = summary([r for r in runs if "error" not in r], args)
    if args.figure:
        draw(runs, args.model, args.figure)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    for name, check in checks.items():
        print(f"{name}: {check}")
    if args.json:
        write_json(args.json, {
            "benchmark": "serve_scale", "model": args.model, "platform": platform.platform(),
            "cpus": os.cpu_count(), "settings": settings,
            "ranks": RANKS, "targets": TARGETS, "power_law_alpha": POWER_LAW, "seconds": round(time.time() - started),
            "summary": checks, "runs": runs,
        })  # fmt: skip


def draw(runs: list[dict], model: str, path: Path) -> None:
    """Output tokens/s against the number of adapters (log scale), power law: flora's median with its
    repeats' range, vLLM's runs, the 0.95x line under flora's smallest count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for system, style in (("flora", "o-"), ("vllm", "s--")):
        groups: dict[int, list[float]] = {}
        for r in runs:
            if r["system"] == system and r.get("distribution") == "zipf" and r.get("output_tokens_per_s"):
                groups.setdefault(r["adapters"], []).append(r["output_tokens_per_s"])
        if not groups:
            continue
        counts = sorted(groups)
        middle = [statistics.median(groups[n]) for n in counts]
        low = [m - min(groups[n]) for m, n in zip(middle, counts, strict=True)]
        high = [max(groups[n]) - m for m, n in zip(middle, counts, strict=True)]
        axes.errorbar(counts, middle, yerr=[low, high], fmt=style, capsize=3,
                      label="flora serve (one process)" if system == "flora" else "vLLM CPU")  # fmt: skip
        if system == "flora":
            axes.axhline(0.95 * middle[0], color="grey", linestyle=":", label=f"0.95x at {counts[0]} adapters")
    axes.set_xscale("log")
    counts = sorted({r["adapters"] for r in runs if r.get("distribution") == "zipf"})
    axes.set_xticks(counts, [str(n) for n in counts])
    axes.minorticks_off()
    axes.set_xlabel("adapters (power law, alpha 1)")
    axes.set_ylabel("output tokens/s")
    axes.set_ylim(bottom=0)
    axes.legend()
    axes.set_title(f"Serving many LoRA adapters on {os.cpu_count()} CPU cores ({model})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
