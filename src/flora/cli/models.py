"""``flora models``: list the known base models, or convert one now (GGUF to cached safetensors)."""

from __future__ import annotations

from flora.base import KNOWN_MODELS, resolve_model_dir


def add_parser(subparsers) -> None:
    models = subparsers.add_parser("models", help="list the known base models, or convert one now")
    models.add_argument("name", nargs="?", help="convert and cache this model (e.g. smollm2-135m)")
    models.set_defaults(func=run)


def run(args) -> int:
    if args.name:
        print(resolve_model_dir(args.name))
        return 0
    for name, spec in KNOWN_MODELS.items():
        print(f"{name}\t{spec.description}")
    return 0
