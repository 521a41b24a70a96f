"""The `flora` command line as a whole: ``--version``, a ``--help`` that imports no torch, one option name
per idea (old spellings kept as aliases), every default shown, and a missing optional extra named."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

import pytest

from flora.cli import COMMANDS, build_parser, main


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def parsers(parser: argparse.ArgumentParser, path: str = "flora"):
    """``(path, parser)`` for ``parser`` and every sub-command parser below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}")


def command_parsers():
    for command in COMMANDS:
        yield from parsers(build_parser(command)._subparsers._group_actions[0].choices[command], f"flora {command}")


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"flora {importlib.metadata.version('flora')}\n"


def test_help_lists_every_command_and_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom flora.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('IMPORTED', 'torch' in sys.modules, 'transformers' in sys.modules)")  # fmt: skip
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "IMPORTED False False"
    listed = done.stdout.split("positional arguments:")[1]
    assert all(f"    {command}  " in listed for command in COMMANDS)


def test_a_reader_that_leaves_the_pipe_stops_the_command_quietly():
    """``flora study list | head -1``: the pipe's reader is gone before the command writes, which then
    ends with the shell's SIGPIPE status and no traceback."""
    process = subprocess.Popen([sys.executable, "-m", "flora", "study", "list"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    process.stdout.close()  # long before the interpreter has started and imported flora
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 141 and stderr == ""


def test_a_command_imports_only_its_own_module():
    code = ("import sys\nfrom flora.cli import build_parser\nbuild_parser('demo')\n"
            "print(sorted(m for m in sys.modules if m.startswith('flora.cli.')))")  # fmt: skip
    assert run_python(code).stdout.strip() == "['flora.cli.demo', 'flora.cli.options']"


def test_every_option_with_a_default_shows_it_in_help():
    for path, parser in command_parsers():
        for action in parser._actions:
            default = action.default
            if not action.option_strings or action.help == argparse.SUPPRESS or default in (None, argparse.SUPPRESS):
                continue
            if isinstance(default, bool) or default == []:
                continue
            assert action.help and "default" in action.help, f"{path} {action.option_strings[0]}: default {default!r}"


def test_one_name_per_idea_with_the_old_spellings_as_aliases():
    for path, parser in command_parsers():
        names = parser._option_string_actions
        assert "--out" not in names or names["--out"].option_strings[0] == "--output-dir", path
        if "--model" in names:
            assert "--allow-download" in names, path
    study = build_parser("study").parse_args(["study", "run", "smoke.toml", "--out", "old"])
    assert study.out == build_parser("study").parse_args(["study", "run", "x", "--output-dir", "old"]).out == "old"
    tasks = build_parser("tasks")
    assert tasks.parse_args(["tasks", "show", "x", "--seed", "3"]).seed == 3
    assert tasks.parse_args(["tasks", "show", "x", "--suite-seed", "3"]).seed == 3


def test_defaults_are_shown_once_and_stated_defaults_kept():
    eval_help = build_parser("eval")._subparsers._group_actions[0].choices["eval"].format_help()
    assert "per-row adapter strategy of flora.AdapterModel (default: auto)" in " ".join(eval_help.split())
    assert "fixed budget (default: per task, longest reference + margin)" in " ".join(eval_help.split())
    assert "(default: None)" not in eval_help


@pytest.mark.parametrize(
    ("module", "argv", "extra"),
    [("fastapi", ["serve", "--model", "smollm2-135m"], "serve"),
     ("rouge_score", ["eval", "--model", "smollm2-135m", "--tasks", "reverse_words", "--max-instances", "1"], "eval")],
)  # fmt: skip
def test_a_missing_extra_is_named_with_the_install_command(module, argv, extra):
    code = f"import sys\nsys.modules[{module!r}] = None\nfrom flora.cli import main\nsys.exit(main({argv!r}))"
    done = run_python(code)
    assert done.returncode == 2, done.stderr
    command = argv[0]
    assert done.stderr.startswith(
        f"flora: error: `flora {command}` needs the optional dependencies of flora[{extra}] (import of {module} "
        f"halted; None in sys.modules): pip install 'flora[{extra}]'"
    )
