#!/usr/bin/env bash
# Quick start: install into ./.venv and run the whole pipeline on the embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh all
exec .venv/bin/llmpulse up "$@"
