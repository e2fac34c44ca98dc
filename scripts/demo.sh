#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs capkit-prune; with no arguments it prunes
# the embedded default (the pre-trained MiniLM on BBC News). Arguments go to capkit-prune.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${CAPKIT_VENV:-.venv}/bin/python" -m capkit.prune "$@"
