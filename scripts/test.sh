#!/usr/bin/env bash
# Install into ./.venv with the dev tools, then lint, type-check and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
sh scripts/install-browser.sh
.venv/bin/ruff check llmpulse tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
