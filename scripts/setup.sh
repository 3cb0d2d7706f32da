#!/usr/bin/env bash
# Create .venv (Python 3.11) and install polypflow with its pinned dependencies (requirements.lock).
# Safe to run again: an up-to-date environment is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.polypflow-installed
want=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, alone: pip then takes the local wheels instead of resolving a CUDA build from the index
  .venv/bin/python -m pip install -q -c requirements.lock torch torchvision
  .venv/bin/python -m pip install -q -c requirements.lock -e ".[test]"
  echo "$want" > "$stamp"
fi
.venv/bin/dvc config --local core.analytics false 2>/dev/null || true
