"""Core `flora` sub-commands: `flora models` (list / convert base models) and `flora demo`."""

from __future__ import annotations

from flora.base import KNOWN_MODELS, resolve_model_dir
from flora.cli import command


@command
def register(subparsers) -> None:
    models = subparsers.add_parser("models", help="list the known base models, or convert one now")
    models.add_argument("name", nargs="?", help="convert and cache this model (e.g. smollm2-135m)")
    models.set_defaults(func=_models)
    demo = subparsers.add_parser("demo", help="train two adapters at once and generate for a batch mixing them")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--steps", type=int, default=60)
    demo.set_defaults(func=_demo)


def _models(args) -> int:
    if args.name:
        print(resolve_model_dir(args.name))
        return 0
    for name, spec in KNOWN_MODELS.items():
        print(f"{name}\t{spec.description}")
    return 0


def _demo(args) -> int:
    from flora.demo import run_demo

    run_demo(args.output_dir, args.model, args.steps)
    return 0
