#!/usr/bin/env bash
# Set up, then run every check CI runs: ruff, mypy, the docs build, the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/mypy
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -d site
exec .venv/bin/python -m pytest "$@"
