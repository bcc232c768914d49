#!/usr/bin/env bash
# Install what the tests need and run them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
# shellcheck disable=SC1091
. .venv/bin/activate

# The published megatron-core package is an independent reference for byte-level and index checks. It is
# unpacked beside the project (it is also named `megatron`); tests skip those checks when it is absent.
REFERENCE=.ci/reference/megatron_core
if [ ! -d "$REFERENCE/megatron/core" ]; then
  mkdir -p .ci/reference/wheel
  if python -m pip download -q --no-deps "megatron-core==0.16.1" -d .ci/reference/wheel; then
    python -m zipfile -e .ci/reference/wheel/megatron_core-*.whl "$REFERENCE"
  else
    echo "warning: could not fetch megatron-core; reference comparisons will be skipped" >&2
  fi
fi

status=0
python -m pytest -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
