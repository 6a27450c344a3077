#!/usr/bin/env bash
# Creates ./.venv (or $VENV) with the CPU torch wheel first, then this package.
# Usage: bash scripts/setup.sh [dev]     ("dev" adds the test/lint tools)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# this machine's pip config names local mirrors that may be absent: hide those warnings, keep real errors
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip_install --upgrade pip
# torch first and pinned, so nothing later resolves a CUDA build.
pip_install torch==2.13.0
if [ "${1:-}" = "dev" ]; then
  pip_install -e ".[dev]"
else
  pip_install -e .
fi
"$VENV/bin/python" -c "import torch, monai, monai_gamverify; print('torch', torch.__version__, '| monai', monai.__version__, '| monai-gamverify', monai_gamverify.__version__)"
