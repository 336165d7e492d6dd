#!/usr/bin/env bash
# Set up, then run every check CI runs: ruff, mypy, the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
