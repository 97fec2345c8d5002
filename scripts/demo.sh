#!/usr/bin/env bash
# Sets up the environment and runs the embedded default end to end on this machine, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pipeline.demo "$@"
