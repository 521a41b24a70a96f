"""Core `flora` sub-commands: `flora models` (list / convert base models)."""

from __future__ import annotations

from flora.base import KNOWN_MODELS, resolve_model_dir
from flora.cli import command


@command
def register(subparsers) -> None:
    models = subparsers.add_parser("models", help="list the known base models, or convert one now")
    models.add_argument("name", nargs="?", help="convert and cache this model (e.g. smollm2-135m)")
    models.set_defaults(func=_models)


def _models(args) -> int:
    if args.name:
        print(resolve_model_dir(args.name))
        return 0
    for name, spec in KNOWN_MODELS.items():
        print(f"{name}\t{spec.description}")
    return 0
