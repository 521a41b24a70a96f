"""``flora models``: the known base models and the models in the local Hugging Face cache; or get one
ready now (convert a known one from GGUF to cached safetensors, find or fetch a Hugging Face id) and
print its directory."""

from __future__ import annotations

from flora.cli.options import add_download_option


def add_parser(subparsers) -> None:
    models = subparsers.add_parser("models", description=__doc__)
    models.add_argument("name", nargs="?", help="get this model ready and print its directory: a known name "
                                                "(e.g. smollm2-135m) or a Hugging Face id (ORG/NAME)")  # fmt: skip
    add_download_option(models)
    models.set_defaults(func=run)


def run(args) -> int:
    from flora.base import KNOWN_MODELS, resolve_model_dir
    from flora.hub import cached_models, hub_cache

    if args.name:
        print(resolve_model_dir(args.name))
        return 0
    for name, spec in KNOWN_MODELS.items():
        print(f"{name}\t{spec.description}")
    cached = cached_models()
    print(f"in the Hugging Face cache ({hub_cache()}): {', '.join(cached) if cached else 'none'}")
    return 0
