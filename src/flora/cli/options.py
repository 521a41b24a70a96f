"""Option values several sub-commands parse the same way: ``NAME=VALUE`` pairs, comma lists and
``--adapter NAME=PATH`` adapter directories (or Hugging Face ids)."""

from __future__ import annotations

import argparse
from pathlib import Path

# What --model takes (`flora.base.resolve_model_dir`).
MODEL_HELP = "smollm2-135m, a local transformers directory, or a Hugging Face id (ORG/NAME) in the local cache"


def split_names(text: str | None) -> list[str] | None:
    """``"a, b,,c" -> ["a", "b", "c"]``; ``None`` for no text."""
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def parse_pairs(values: list[str] | None, what: str, sep: str = "=") -> dict[str, str]:
    """``["k=v", ...] -> {"k": "v"}``; a clear error naming ``what`` for a value without ``sep``."""
    pairs: dict[str, str] = {}
    for value in values or []:
        key, found, rest = value.partition(sep)
        if not found or not key.strip() or not rest.strip():
            raise ValueError(f"{what} {value!r}: expected NAME{sep}VALUE")
        pairs[key.strip()] = rest.strip()
    return pairs


def parse_adapters(values: list[str], option: str = "--adapter") -> dict[str, str]:
    """``["name=path", "path", ...] -> {name: directory}`` (a bare path is named after its last part);
    every path must be a directory, or a Hugging Face id (``ORG/NAME``) found in the local Hugging Face
    cache (`flora.hub.resolve_adapter_dir`), which becomes its snapshot directory."""
    from flora.hub import resolve_adapter_dir

    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).name, value
        if not name or not path:
            raise ValueError(f"{option} {value!r}: expected NAME=PATH or PATH")
        if name in adapters:
            raise ValueError(f"{option}: the name {name!r} is given twice")
        try:
            directory = resolve_adapter_dir(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{option} {value!r}: {err}") from None
        if not directory.is_dir():
            raise FileNotFoundError(
                f"{option} {value!r}: {path!r} is not a directory (expected a PEFT adapter directory or a "
                f"Hugging Face id)"
            )
        adapters[name] = path if directory == Path(path) else str(directory)  # a local directory as given
    return adapters


def add_download_option(parser: argparse.ArgumentParser) -> None:
    """``--allow-download``: models and adapters given as Hugging Face ids that are not in the local
    cache are fetched (`flora.hub`); without it they are refused."""
    parser.add_argument("--allow-download", action="store_true",
                        help="fetch a model or adapter given as a Hugging Face id (ORG/NAME) from the Hugging "
                             "Face Hub when it is not in the local cache (default: refuse; also "
                             "FLORA_ALLOW_DOWNLOAD=1)")  # fmt: skip


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Add ``(default: X)`` to the help of each option of ``parser`` that has a default its help does
    not already state (what ``argparse.ArgumentDefaultsHelpFormatter`` does, without printing
    ``None``, ``[]`` or a switch's ``True``/``False``, and for options without help text too)."""
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default is None or default is argparse.SUPPRESS:
            continue
        if isinstance(default, bool) or (isinstance(default, list | tuple | dict) and not default):
            continue
        if action.help == argparse.SUPPRESS or "default" in (action.help or ""):
            continue
        shown = str(default).replace("%", "%%")
        action.help = f"{action.help} (default: {shown})" if action.help else f"default: {shown}"
