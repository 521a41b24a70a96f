"""What pyproject.toml declares against what the library imports: every third-party import is a runtime
dependency or belongs to an extra the command line names when it is missing; every runtime dependency
is used; each part of the library imports with only its own extras installed (a serving install pulls
no plotting)."""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from flora.cli import EXTRAS

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "flora"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Runtime dependencies flora needs without importing them itself.
USED_THROUGH_TRANSFORMERS = {"accelerate": "transformers.Trainer", "gguf": "reading the packaged model's GGUF file"}
# The extras each part of the library needs (the rest needs none).
PART_EXTRAS = {"flora.serve": {"serve"}, "flora.study": {"study", "eval"}, "flora.evaluate": {"eval"},
               "flora.metrics": {"eval"}}  # fmt: skip


def imported_modules() -> set[str]:
    """The top-level names of the third-party modules that any file of src/flora imports."""
    names: set[str] = set()
    for file in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names) - {"flora", "__future__"}


def requirement_names(requirements: list[str]) -> set[str]:
    """Distribution names of ``requirements``, ``flora[x,y]`` expanded to those extras' requirements."""
    names: set[str] = set()
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name == "flora":
            for extra in requirement.extras:
                names |= requirement_names(PROJECT["optional-dependencies"][extra])
        else:
            names.add(canonicalize_name(requirement.name))
    return names


def distribution(module: str) -> str:
    """The distribution that installs ``module``; a skip where it is not installed (the floor run has every
    extra but ray, whose floors conflict with the serve extra's: Makefile's test-floor)."""
    installed = importlib.metadata.packages_distributions()
    if module not in installed:
        pytest.skip(f"{module} is not installed: these checks need every extra (make test installs them)")
    (name,) = {canonicalize_name(d) for d in installed[module]}
    return name


def needs(name: str) -> set[str]:
    """What an installed distribution requires (without its own extras)."""
    return {canonicalize_name(Requirement(r).name) for r in importlib.metadata.requires(name) or [] if "extra" not in r}


def test_every_third_party_import_is_a_dependency_or_an_extra_the_cli_names():
    core = requirement_names(PROJECT["dependencies"])
    with_core = {n for d in core for n in needs(d)}  # installed whatever the extras
    for module in sorted(imported_modules()):
        name = distribution(module)
        if name in core:
            assert module not in EXTRAS, f"{module} ({name}) is a runtime dependency, not of an extra"
            continue
        declared = [
            e for e, r in PROJECT["optional-dependencies"].items() if e != "dev" and name in requirement_names(r)
        ]
        assert declared or module in EXTRAS, f"{module} ({name}): neither a dependency nor in an extra"
        assert module in EXTRAS or name in with_core, f"{module} ({name}): missing from flora.cli.EXTRAS"


def test_every_runtime_dependency_is_imported_or_said_why_not():
    imported = {distribution(module) for module in imported_modules()}
    for name in requirement_names(PROJECT["dependencies"]):
        assert name in imported or name in USED_THROUGH_TRANSFORMERS, f"{name}: a dependency flora does not import"


def test_the_extras_table_covers_each_extra_with_its_own_modules():
    for module, extra in EXTRAS.items():
        names = requirement_names(PROJECT["optional-dependencies"][extra])
        assert distribution(module) in names | {n for d in names for n in needs(d)}, f"{module} -> flora[{extra}]"


def library_modules() -> list[str]:
    return sorted(
        ".".join(file.relative_to(SOURCE.parent).with_suffix("").parts).removesuffix(".__init__")
        for file in SOURCE.rglob("*.py")
        if file.name != "__main__.py"
    )


@pytest.mark.parametrize("extras", [set(), {"serve"}, {"eval"}, {"study", "eval"}], ids=str)
def test_each_part_imports_with_only_its_own_extras(extras):
    def part_extras(module: str) -> set[str]:
        return next((e for p, e in PART_EXTRAS.items() if module == p or module.startswith(p + ".")), set())

    modules = [m for m in library_modules() if part_extras(m) <= extras]
    blocked = sorted(module for module, extra in EXTRAS.items() if extra not in extras)
    code = (f"import importlib, sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\nprint(len({modules!r}))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(len(modules))]
