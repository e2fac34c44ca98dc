#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the demo of the fused masked linear op.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${CAPKIT_VENV:-.venv}/bin/python" -m capkit.demo "$@"
