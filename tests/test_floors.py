"""pyproject.toml's dependency lower bounds (the runtime dependencies and the runtime extras) and
tests/floors.txt (what `make test-floor` installs) agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# Extras whose bounds are not floors the tests were run at: the tools (dev, test) and Ray (its tests are not
# run at an old release).
UNPINNED_EXTRAS = ("dev", "test", "ray")


def _lower_bounds() -> dict[str, Version]:
    """``{name: X}`` for each ``name>=X`` in pyproject.toml's ``dependencies`` and its extras but
    `UNPINNED_EXTRAS` (the only bound used there; ``flora[...]`` refers to other extras)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"]]
    for extra, requirements in project["optional-dependencies"].items():
        if extra not in UNPINNED_EXTRAS:
            lines += [r for r in requirements if Requirement(r).name != "flora"]
    bounds = {}
    for line in lines:
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == ">=", f"{line!r}: expected a lower bound name>=X"
        bounds[canonicalize_name(requirement.name)] = Version(specifier.version)
    return bounds


def _floors() -> dict[str, Version]:
    """``{name: X}`` for each ``name==X`` line of tests/floors.txt."""
    floors = {}
    for line in (ROOT / "tests" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            floors[canonicalize_name(name)] = Version(version)
    return floors


def test_every_dependency_has_its_lower_bound_pinned_in_floors_txt():
    assert _floors() == _lower_bounds()
