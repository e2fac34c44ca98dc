#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `-k masked_linear`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv="${CAPKIT_VENV:-.venv}"
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
exec "$venv/bin/python" -m pytest -q "$@"
