"""Import boundaries of ARCHITECTURE.md, checked on the source and in fresh interpreters."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_job_module_of_teacher_cache_imports_ray():
    for path in (REPO / "teacher_cache").rglob("*.py"):
        if path.name != "job.py":
            assert "ray" not in _imports(path), path
        assert "student_train" not in _imports(path), f"{path} must not depend on the student side"


def test_student_train_never_imports_ray():
    for path in (REPO / "student_train").rglob("*.py"):
        assert "ray" not in _imports(path), path


@pytest.mark.parametrize(
    "module", ["pipeline.config", "pipeline.records", "pipeline.tokenize", "teacher_cache.reader"]
)
def test_modules_do_not_pull_ray_or_deepspeed_at_import(module):
    code = f"import sys, {module}; bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
