"""``flora demo``: train two adapters at once and generate for a batch mixing them (`flora.demo`)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="train two adapters at once and generate for a batch mixing them")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--seed", type=int, default=0, help="the adapters' initialisation and the data order")
    demo.set_defaults(func=run)


def run(args) -> int:
    from flora.demo import run_demo

    run_demo(args.output_dir, args.model, args.steps, args.seed)
    return 0
