"""The lowest-version CI run (scripts/test_lowest.sh) tests exactly the lower bounds that pyproject.toml declares."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version


tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PINNED = {"trl", "transformers", "peft", "datasets", "accelerate", "bitsandbytes", "triton"}


def test_lowest_constraints_pin_the_declared_lower_bounds():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = [*project["dependencies"], *extras["quantization"], *(r for r in extras["dev"] if r.startswith("triton"))]
    lower = {}
    for requirement in map(Requirement, declared):
        bounds = [s.version for s in requirement.specifier if s.operator == ">="]
        if requirement.name in PINNED:
            assert len(bounds) == 1, f"{requirement}: one `>=` lower bound expected"
            lower[requirement.name] = Version(bounds[0])
    pins = {}
    for line in (ROOT / "scripts" / "constraints-lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[requirement.name] = Version(spec.version)
    assert pins == lower
