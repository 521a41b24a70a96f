"""Option values several sub-commands parse the same way: ``NAME=VALUE`` pairs, comma lists and
``--adapter NAME=PATH`` adapter directories."""

from __future__ import annotations

from pathlib import Path


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
    """``["name=path", "path", ...] -> {name: path}`` (a bare path is named after its directory);
    every path must be a directory."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).name, value
        if not name or not path:
            raise ValueError(f"{option} {value!r}: expected NAME=PATH or PATH")
        if name in adapters:
            raise ValueError(f"{option}: the name {name!r} is given twice")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{option} {value!r}: {path!r} is not a directory (expected a PEFT adapter)")
        adapters[name] = path
    return adapters
