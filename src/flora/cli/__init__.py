"""The `flora` command line: one module per sub-command, each a thin layer over the Python API.

Every module in `SUBCOMMANDS` has ``add_parser(subparsers)``, which adds its sub-command and sets
``func`` (``args -> exit code``). Modules import their heavy dependencies (torch, transformers,
the server) inside ``func``, so ``flora --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from flora.cli import demo, eval, models, serve, study, tasks, train

SUBCOMMANDS = (models, demo, tasks, train, eval, serve, study)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flora", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
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
