"""The `flora` command line: one sub-command per capability, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

# Each capability module registers its sub-commands here: name -> function(subparsers).
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(register: Callable[[argparse._SubParsersAction], None]):
    """Decorator: `register(subparsers)` adds one or more sub-commands to `flora`."""
    _COMMANDS.append(register)
    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flora", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    from flora import commands  # noqa: F401  (registers every sub-command)

    for register in _COMMANDS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"flora: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
