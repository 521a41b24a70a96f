"""``flora serve``: the OpenAI-compatible server, every request with its own adapter (`flora.serve`)."""

from __future__ import annotations

import argparse

from flora.cli.options import parse_adapters

_EPILOG = """examples:
  flora serve --model smollm2-135m --adapter-dir adapters/ --port 8000
  flora serve --model smollm2-135m --adapter reverse=runs/demo/reverse_words --max-loaded-adapters 32
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "reverse", "prompt": "Hello", "max_tokens": 16}'
"""


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
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="an adapter loaded at start and pinned in memory (repeatable)")  # fmt: skip
    p.add_argument("--adapter-dir", help="every PEFT adapter directory inside is servable by its name, loaded on use")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=32, help="requests in the running batch at most")
    e.add_argument(
        "--max-num-batched-tokens", type=int, help="tokens per step at most (default: max(max-model-len, 2048))"
    )
    e.add_argument("--max-model-len", type=int, help="prompt + completion tokens at most (default: the model's)")
    e.add_argument("--max-queue", type=int, default=1024, help="waiting requests at most; past it: 429")
    e.add_argument("--batching", choices=("continuous", "static", "one-adapter"), default="continuous",
                   help="continuous (default); static and one-adapter are baselines for benchmarks")  # fmt: skip
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default="float32")
    e.add_argument("--device", default="cpu")
    e.add_argument("--strategy", default="auto", help="per-row adapter strategy of flora.AdapterModel")
    a = p.add_argument_group("adapters in memory")
    a.add_argument("--max-loaded-adapters", type=int, default=64, help="least recently used ones are evicted past it")
    a.add_argument("--adapter-memory-mb", type=float, help="megabytes of adapter weights in memory at most")
    p.set_defaults(func=run)


def run(args) -> int:
    from flora.serve import ServeSettings, serve

    settings = ServeSettings(
        model=args.model, served_model_name=args.served_model_name, adapters=parse_adapters(args.adapter),
        adapter_dir=args.adapter_dir, host=args.host, port=args.port, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        max_queue=args.max_queue, max_loaded_adapters=args.max_loaded_adapters,
        adapter_memory_mb=args.adapter_memory_mb, batching=args.batching, dtype=args.dtype, device=args.device,
        strategy=args.strategy,
    )  # fmt: skip
    serve(settings)
    return 0
