"""The Docker images (not built here: no engine, no network) install what the tests run, in a cache-friendly order."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "scripts/constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def _deps() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def test_constraints_satisfy_pyproject_and_are_what_the_tests_run_with():
    pins = _pins()
    for req in _deps():
        name = canonicalize_name(req.name)
        if name in ("torch", "triton"):
            assert name not in pins  # the CPU wheel here, the image's CUDA build there
            continue
        assert name in pins, f"{req.name} is a dependency but scripts/constraints.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} vs {req}"
        installed = importlib.metadata.version(req.name)
        assert installed == pins[name], f"tests run {req.name} {installed}, the images install {pins[name]}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_install_pinned_dependencies_before_the_code(path):
    lines = [
        x for x in path.read_text().replace("\\\n", " ").splitlines() if x.strip() and not x.startswith("#")
    ]
    dep_run = next(i for i, x in enumerate(lines) if x.startswith("RUN") and "-c constraints.txt" in x)
    code_copies = [
        i for i, x in enumerate(lines) if re.match(r"COPY (pipeline|teacher_cache|student_train)\b", x)
    ]
    assert len(code_copies) == 3 and min(code_copies) > dep_run, "code copied before the dependency layer"
    assert any("scripts/constraints.txt" in x for x in lines[:dep_run] if x.startswith("COPY"))
    assert not re.search(r"pip install[^\n]*\b[\w-]+==", path.read_text()), "versions live in constraints.txt"


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = {
        x.strip() for x in (REPO / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")
    }
    assert {".venv", "runs", ".git"} <= ignored
