"""The source tree is the import tree: packaging alone installs normfold, nothing else."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = _setuptools()
    folders = config["package-dir"]
    found = set()
    for package, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            # A mapped folder's subfolders are its own subpackages unless mapped separately.
            name = ".".join((package, *relative))
            if not any(init.parent == ROOT / other for other in folders.values() if other != folder):
                found.add(name)
    assert sorted(found) == sorted(config["packages"])


@pytest.mark.parametrize("name", ["normfold.benchmarks", "normfold.tests"])
def test_benchmarks_and_tests_are_not_part_of_the_package(name: str) -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)


def test_subpackages_import_from_any_working_directory(tmp_path: Path) -> None:
    code = (
        "import normfold, normfold.passes, normfold.models, normfold.cli, normfold.math.batchnorm; "
        "print(normfold.passes.__name__, normfold.models.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["normfold.passes", "normfold.models"]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_metadata_is_the_pep_639_form() -> None:
    project = _project()
    assert project["license"] == "MIT"
    assert all((ROOT / name).is_file() for name in project["license-files"])


def test_no_extra_pins_an_exact_torch() -> None:
    """A user with another torch must be able to install the extras; the install commands pin
    the CPU wheel themselves."""
    for extra, requirements in _project()["optional-dependencies"].items():
        for requirement in requirements:
            assert not (requirement.startswith("torch") and "==" in requirement), (extra, requirement)


def test_installed_dependencies_satisfy_the_declared_lower_bounds() -> None:
    from importlib.metadata import version

    from packaging.requirements import Requirement

    for line in _project()["dependencies"]:
        requirement = Requirement(line)
        assert requirement.specifier.contains(version(requirement.name), prereleases=True), line


def test_the_documented_bounds_are_the_metadata() -> None:
    """docs/contributing.md's "Dependency bounds" table names every dependency with the lower
    bound pyproject declares, and nothing else (the table records what was run)."""
    import re

    from packaging.requirements import Requirement

    text = (ROOT / "docs" / "contributing.md").read_text()
    section = text.split("## Dependency bounds", 1)[1].split("\n## ", 1)[0]
    documented = dict(re.findall(r"^\| `([\w-]+)` \| ([\d.]+) \|", section, flags=re.MULTILINE))
    declared = {}
    for line in _project()["dependencies"]:
        requirement = Requirement(line)
        (spec,) = requirement.specifier  # one lower bound each
        assert spec.operator == ">=", line
        declared[requirement.name] = spec.version
    assert documented == declared
