#!/usr/bin/env bash
# Creates the virtual environment (default .venv), installs the dependencies in the order that
# works (torch first, then triton, then the rest) and builds capkit with its native extension.
# Safe to run again: what is installed already is kept; the extension is rebuilt.
#
#   CAPKIT_VENV=path        where the environment lives (default: .venv in the repository)
#   CAPKIT_TORCH=spec       torch requirement (default: torch==2.13.0)
#   CAPKIT_TRITON=spec      triton requirement (default: triton==3.7.1; "none" to skip)
#   PYTHON=python3.11       interpreter used to create the environment
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${CAPKIT_VENV:-.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv with $($py --version 2>&1)"
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
pipi() { "$vpy" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$vpy" -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${CAPKIT_TORCH:-torch==2.13.0}"
  pipi "${CAPKIT_TORCH:-torch==2.13.0}"
fi
triton_spec="${CAPKIT_TRITON:-triton==3.7.1}"
if [ "$triton_spec" != "none" ] && ! "$vpy" -c "import triton" 2>/dev/null; then
  echo "[setup] installing $triton_spec"
  pipi "$triton_spec"
fi
echo "[setup] installing requirements.txt"
pipi -r requirements.txt
echo "[setup] building capkit and its extension (log: build/setup.log)"
mkdir -p build
if ! "$vpy" -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . > build/setup.log 2>&1; then
  tail -n 60 build/setup.log
  echo "[setup] FAILED to build capkit (full log: build/setup.log)" >&2
  exit 1
fi
grep "\[capkit build\]" build/setup.log || true
"$vpy" -m capkit.info
