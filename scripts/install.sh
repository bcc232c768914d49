#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it, compiling the C++ dataset helper.
# Usage: bash scripts/install.sh [extras]   e.g. "test"
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
# Pin torch first: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
