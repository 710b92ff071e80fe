#!/usr/bin/env bash
# Create ./.venv (if needed) and install llmpulse with the given extra into it.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-all}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=".venv/.installed-$extra"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet -e ".[$extra]"
  touch "$stamp"
fi
