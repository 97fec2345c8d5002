#!/usr/bin/env bash
# Sets up the environment and runs the test suite. Default: everything except tests marked `slow`;
# with CI=true (as .ci/run is run) the slow tests run too. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
if [ "${CI:-}" = "true" ]; then
  marker=()
else
  marker=(-m "not slow")
fi
exec .venv/bin/python -m pytest "${marker[@]}" "$@"
