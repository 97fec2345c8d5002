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


PIPELINE_CORE = ("config", "records", "tokenize", "models", "tiny")  # the bottom layer
PIPELINE_DRIVERS = ("evaluate", "analysis", "plots", "demo", "plan")  # stage drivers on top of every package


def test_pipeline_core_is_the_bottom_layer():
    """pipeline's core modules depend on no other package and on no pipeline driver (docs/ARCHITECTURE.md)."""
    on_disk = {p.stem for p in (REPO / "pipeline").glob("*.py")} - {"__init__"}
    assert on_disk == set(PIPELINE_CORE) | set(PIPELINE_DRIVERS), "classify every pipeline module"
    for name in PIPELINE_CORE:
        path = REPO / "pipeline" / f"{name}.py"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                top, _, rest = node.module.partition(".")
                assert top not in ("teacher_cache", "student_train"), f"{path}: imports {node.module}"
                assert not (top == "pipeline" and rest in PIPELINE_DRIVERS), f"{path}: imports {node.module}"


def test_the_objective_config_imports_no_compute_code():
    """A sweep or --help reads the objective's presets without torch (student_train/losses/config.py)."""
    code = "import sys, student_train.losses.config; sys.exit('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr


def test_teacher_cache_layers():
    """format <- manifest <- writer/reader <- job: the column table and the manifest import no I/O layer."""
    allowed = {
        "format": set(),
        "manifest": {"format"},
        "storage": set(),
        "teacher": {"format"},  # the salience column's one definition (attention_salience)
        "writer": {"format", "manifest", "storage", "teacher"},
        "reader": {"format", "manifest", "storage"},
    }
    for name, ok in allowed.items():
        tree = ast.parse((REPO / "teacher_cache" / f"{name}.py").read_text())
        used = {
            node.module.split(".")[1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("teacher_cache.")
        }
        used |= {
            a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "teacher_cache"
            for a in node.names
        }
        assert used <= ok, f"teacher_cache/{name}.py imports {sorted(used - ok)}"
