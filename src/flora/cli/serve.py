"""``flora serve``: the OpenAI-compatible server, every request with its own adapter (`flora.serve`).

vLLM's flags for serving adapters are accepted under vLLM's names (``--enable-lora``,
``--lora-modules``, ``--max-loras``, ``--max-lora-rank``, ``--max-cpu-loras``, ``--api-key``,
``--enable-runtime-lora-updating``); other vLLM flags are refused. The table of them:
docs/serving.md. ``--replicas N`` (or ``--ray-address``) runs the server as a Ray Serve application
of N engines instead (`flora.serve.replicas`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping

from flora.cli.options import parse_adapters

_EPILOG = """examples:
  flora serve --model smollm2-135m --adapter-dir adapters/ --port 8000
  flora serve --model smollm2-135m --adapter reverse=runs/demo/reverse_words --max-loaded-adapters 32
  flora serve --enable-lora --lora-modules a=adapters/a b=adapters/b --max-loras 4 --max-lora-rank 16 --api-key KEY
  flora serve --model smollm2-135m --adapter-dir adapters/ --replicas 2 --num-cpus-per-replica 1   # on Ray Serve
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "reverse", "prompt": "Hello", "max_tokens": 16}'

environment: FLORA_API_KEY or VLLM_API_KEY (the key, when --api-key is not given);
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=true (the same as --enable-runtime-lora-updating)
"""
TRUE = ("1", "true")  # vLLM's spellings of an environment switch, case ignored


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the base model and many adapters over an OpenAI-compatible HTTP API",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or a local transformers directory")
    p.add_argument("--served-model-name", help="the name requests use for the base model (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    a = p.add_argument_group("adapters")
    a.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="an adapter loaded at start and pinned in memory (repeatable)")  # fmt: skip
    a.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH|JSON",
                   help="vLLM's spelling of --adapter: NAME=PATH or '{\"name\": ..., \"path\": ..., "
                        "\"base_model_name\": ...}', several after one flag, repeatable")  # fmt: skip
    a.add_argument("--adapter-dir", help="every PEFT adapter directory inside is servable by its name, loaded on use")
    a.add_argument("--enable-lora", action="store_true", help="accepted for vLLM's command lines (always on)")
    a.add_argument("--max-loaded-adapters", "--max-cpu-loras", type=int, default=64, dest="max_loaded_adapters",
                   help="adapters in memory at most; the least recently used are evicted (default: 64)")  # fmt: skip
    a.add_argument("--adapter-memory-mb", type=float, help="megabytes of adapter weights in memory at most")
    a.add_argument("--max-loras", type=int,
                   help="distinct adapters in the running batch at most (default: no limit; vLLM's is 1)")  # fmt: skip
    a.add_argument("--max-lora-rank", type=int,
                   help="adapters of a higher rank are refused (default: no limit; vLLM's is 16)")  # fmt: skip
    a.add_argument("--enable-runtime-lora-updating", action="store_true",
                   help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default)")  # fmt: skip
    a.add_argument("--allowed-adapter-paths", nargs="+", action="extend", default=[], metavar="ROOT",
                   help="directories run-time loads may read from, besides --adapter-dir")  # fmt: skip
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=32, help="requests in the running batch at most (default: 32)")
    e.add_argument(
        "--max-num-batched-tokens", type=int, help="tokens per step at most (default: max(max-model-len, 2048))"
    )
    e.add_argument("--max-model-len", type=int, help="prompt + completion tokens at most (default: the model's)")
    e.add_argument("--max-queue", type=int, default=1024, help="waiting requests at most; past it: 429 (default: 1024)")
    e.add_argument("--max-request-bytes", type=int, default=8 * 2**20,
                   help="a request body larger than this is refused unread: 413 (default: 8388608, 8 MiB)")  # fmt: skip
    e.add_argument("--batching", choices=("continuous", "static", "one-adapter"), default="continuous",
                   help="continuous (default); static and one-adapter are baselines for benchmarks")  # fmt: skip
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64", "auto", "half", "float"),
                   default="float32", help="auto: the checkpoint's; half: float16 (default: float32)")  # fmt: skip
    e.add_argument("--device", default="cpu", help="(default: cpu)")
    e.add_argument("--adapter-dtype", "--lora-dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="LoRA's per-row tables in this dtype (half the bytes a decoding step reads in bfloat16); "
                        "auto: the model's (default)")  # fmt: skip
    e.add_argument("--strategy", default="auto", help="per-row adapter strategy of flora.AdapterModel (default: auto)")
    e.add_argument("--autotune-cache", default="auto", metavar="PATH",
                   help="keep the autotuner's measured choices in this JSON file across restarts; auto: "
                        "$FLORA_CACHE/autotune/<this machine>.json; none: measure afresh in every process "
                        "(default: auto)")  # fmt: skip
    r = p.add_argument_group("replicas on Ray Serve (flora[ray]; docs/serving.md)")
    r.add_argument("--replicas", type=int, default=1,
                   help="flora engines behind one API, as a Ray Serve application; 1: this process alone, without "
                        "Ray (default: 1)")  # fmt: skip
    r.add_argument("--ray-address", metavar="ADDRESS",
                   help="join this Ray cluster (HOST:PORT of its head, or auto) instead of starting a local "
                        "instance")  # fmt: skip
    r.add_argument("--routing", choices=("multiplexed", "random"), default="multiplexed",
                   help="multiplexed: a request goes to a replica that holds its adapter (Ray Serve's model "
                        "multiplexing); random: Ray Serve's choice regardless of the adapter "
                        "(default: multiplexed)")  # fmt: skip
    r.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                   help="CPUs Ray reserves for each replica, and its torch threads (default: 1)")  # fmt: skip
    r.add_argument("--max-ongoing-requests", type=int,
                   help="requests a replica takes at once; Ray Serve queues the rest "
                        "(default: --max-num-seqs)")  # fmt: skip
    r.add_argument("--autoscaling-config", metavar="JSON",
                   help="Ray Serve's autoscaling config for the replicas instead of --replicas, e.g. "
                        "'{\"min_replicas\": 1, \"max_replicas\": 4}'")  # fmt: skip
    s = p.add_argument_group("access and monitoring")
    s.add_argument("--api-key", help="every route but /health, /version and /metrics needs 'Authorization: Bearer KEY' "
                                     "(default: FLORA_API_KEY, then VLLM_API_KEY; none: open)")  # fmt: skip
    s.add_argument("--metrics-prefix", default="flora",
                   help="the prefix of /metrics names: flora (default) or vllm, for vLLM's dashboards")  # fmt: skip
    p.set_defaults(func=run)


def parse_lora_modules(values: list[str], base_names: set[str]) -> list[str]:
    """vLLM's ``--lora-modules`` values as ``NAME=PATH`` strings: ``name=path`` as it is, the JSON form
    ``{"name", "path", "base_model_name"}`` checked (``base_model_name``, when given, must be one of
    ``base_names``: this server's base model)."""
    pairs = []
    for value in values:
        if not value.lstrip().startswith("{"):
            pairs.append(value)
            continue
        try:
            module = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"--lora-modules {value!r}: not valid JSON ({err})") from None
        unknown = set(module) - {"name", "path", "base_model_name"} if isinstance(module, dict) else set()
        if not isinstance(module, dict) or unknown or not all(isinstance(module.get(k), str) for k in ("name", "path")):
            raise ValueError(f"--lora-modules {value!r}: expected NAME=PATH or a JSON object with the strings "
                             f"'name', 'path' and optionally 'base_model_name'")  # fmt: skip
        base = module.get("base_model_name")
        if base is not None and base not in base_names:
            raise ValueError(f"--lora-modules {value!r}: base_model_name {base!r} is not this server's base model "
                             f"({' or '.join(repr(n) for n in sorted(base_names))})")  # fmt: skip
        pairs.append(f"{module['name']}={module['path']}")
    return pairs


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ):
    """`flora.serve.ServeSettings` of ``flora serve``'s arguments and the environment (``FLORA_API_KEY``,
    ``VLLM_API_KEY``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``)."""
    from flora.serve.server import ServeSettings

    base_names = {args.model, args.served_model_name or args.model}
    adapters = parse_adapters(args.adapter)
    for name, path in parse_adapters(parse_lora_modules(args.lora_modules, base_names), "--lora-modules").items():
        if name in adapters:
            raise ValueError(f"--lora-modules: the name {name!r} is given twice (also by --adapter)")
        adapters[name] = path
    api_key = args.api_key if args.api_key is not None else environ.get("FLORA_API_KEY", environ.get("VLLM_API_KEY"))
    runtime = environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in TRUE
    return ServeSettings(
        model=args.model, served_model_name=args.served_model_name, adapters=adapters, adapter_dir=args.adapter_dir,
        host=args.host, port=args.port, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        max_queue=args.max_queue, max_request_bytes=args.max_request_bytes,
        max_loaded_adapters=args.max_loaded_adapters,
        adapter_memory_mb=args.adapter_memory_mb, batching=args.batching, dtype=args.dtype, device=args.device,
        adapter_dtype=None if args.adapter_dtype in (None, "auto") else args.adapter_dtype,
        strategy=args.strategy, autotune_cache=None if args.autotune_cache == "none" else args.autotune_cache,
        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, api_key=api_key,
        enable_runtime_lora_updating=args.enable_runtime_lora_updating or runtime,
        allowed_adapter_paths=args.allowed_adapter_paths, metrics_prefix=args.metrics_prefix,
    )  # fmt: skip


def replica_settings_from_args(args: argparse.Namespace):
    """`flora.serve.replicas.ReplicaSettings` of ``flora serve``'s arguments."""
    from flora.serve.replicas import ReplicaSettings

    autoscaling = None
    if args.autoscaling_config is not None:
        try:
            autoscaling = json.loads(args.autoscaling_config)
        except json.JSONDecodeError as err:
            raise ValueError(f"--autoscaling-config {args.autoscaling_config!r}: not valid JSON ({err})") from None
        if not isinstance(autoscaling, dict):
            raise ValueError(f"--autoscaling-config {args.autoscaling_config!r}: expected a JSON object")
    return ReplicaSettings(
        replicas=args.replicas, ray_address=args.ray_address, routing=args.routing,
        num_cpus_per_replica=args.num_cpus_per_replica, max_ongoing_requests=args.max_ongoing_requests,
        autoscaling_config=autoscaling,
    )  # fmt: skip


def run(args) -> int:
    from flora.serve import serve

    settings = settings_from_args(args)
    settings.check()
    replicas = replica_settings_from_args(args)
    replicas.check()
    serve(settings, replicas)
    return 0
