"""The `flora` command line: one module per sub-command, each a thin layer over the Python API.

Every module named in `COMMANDS` has ``add_parser(subparsers)``, which adds its sub-command and sets
``func`` (``args -> exit code``). Only the module of the sub-command being run is imported (the
others appear in ``flora --help`` by their summary), and modules import torch, transformers or the
server inside ``func`` where they can, so ``flora --help`` and ``flora --version`` answer at once.
Every option's default is shown in its ``--help`` (`show_defaults`); every sub-command that takes
``--model`` also takes ``--allow-download`` (`flora.hub`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

import flora
from flora import __version__
from flora.cli.options import add_download_option, show_defaults

# Sub-command -> its summary in ``flora --help`` (the module is flora.cli.<name>).
COMMANDS: dict[str, str] = {
    "models": "list the known base models and those in the Hugging Face cache, or get one ready now",
    "demo": "train two adapters at once and generate for a batch mixing them",
    "tasks": "the built-in task suite: list, show or export it",
    "train": "train adapters (one, or many at once in mixed batches) or the whole model",
    "eval": "evaluate a model (and adapters, routed per task) with ROUGE-L and exact match",
    "serve": "serve the base model and many adapters over an OpenAI-compatible HTTP API",
    "study": "run a study (a grid of trials) resumably; its status and report",
}
# A module of an optional extra (pyproject.toml's optional-dependencies) -> the extra that installs it.
EXTRAS: dict[str, str] = {
    "fastapi": "serve", "starlette": "serve", "pydantic": "serve", "uvicorn": "serve", "prometheus_client": "serve",
    "rouge_score": "eval", "matplotlib": "study", "ray": "ray", "peft": "peft",
}  # fmt: skip


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `flora` parser, with ``command``'s options (its module imported); the other sub-commands
    are listed by name and summary only."""
    parser = argparse.ArgumentParser(
        prog="flora", description=flora.__doc__.split("\n\n")[0], epilog="flora COMMAND --help: its options"
    )
    parser.add_argument("--version", action="version", version=f"flora {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if name != command:
            subparsers.add_parser(name, help=summary, add_help=False)
            continue
        importlib.import_module(f"flora.cli.{name}").add_parser(subparsers)
        loaded = subparsers.choices[name]
        for sub in _parsers(loaded):
            if "--model" in sub._option_string_actions and "--allow-download" not in sub._option_string_actions:
                add_download_option(sub)
            show_defaults(sub)
    return parser


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every sub-command parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    try:
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
        with _downloads(getattr(args, "allow_download", False)):
            code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that left is met here, not in the interpreter's flush at exit
        return code
    except (ValueError, FileNotFoundError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"flora: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`flora study status DIR | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a command its pipe's reader stopped
    except ModuleNotFoundError as err:
        extra = EXTRAS.get((err.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"flora: error: `flora {command}` needs the optional dependencies of flora[{extra}] ({err}): "
              f"pip install 'flora[{extra}]'", file=sys.stderr)  # fmt: skip
        return 2


@contextlib.contextmanager
def _downloads(allowed: bool) -> Iterator[None]:
    """``--allow-download``: `flora.hub` may download for the length of the command (and in the
    processes it starts: study trials, Ray workers), through ``$FLORA_ALLOW_DOWNLOAD``."""
    if not allowed:
        yield
        return
    from flora.hub import ALLOW_DOWNLOAD_ENV

    before = os.environ.get(ALLOW_DOWNLOAD_ENV)
    os.environ[ALLOW_DOWNLOAD_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ALLOW_DOWNLOAD_ENV]
        else:
            os.environ[ALLOW_DOWNLOAD_ENV] = before


if __name__ == "__main__":
    sys.exit(main())
