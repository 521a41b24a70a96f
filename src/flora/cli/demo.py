"""``flora demo``: train two adapters at once and generate for a batch mixing them (`flora.demo`)."""

from __future__ import annotations

from flora.cli.options import MODEL_HELP


def add_parser(subparsers) -> None:
    demo = subparsers.add_parser("demo", description=__doc__)
    demo.add_argument("--output-dir", default="runs/demo", help="where the two adapters are saved")
    demo.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    demo.add_argument("--steps", type=int, default=60, help="training steps")
    demo.add_argument("--seed", type=int, default=0, help="the adapters' initialisation and the data order")
    demo.set_defaults(func=run)


def run(args) -> int:
    from flora.demo import run_demo

    run_demo(args.output_dir, args.model, args.steps, args.seed)
    return 0
