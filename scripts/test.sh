#!/usr/bin/env bash
# Set up, then run every check CI runs: ruff (lint and format), mypy, the docs
# build, the test suite on the main torch / Lightning pair, and the suite again
# on the declared floor of the support window (torch 2.6 / Lightning 2.5 /
# transformers 4.57, in its own venv under .venv-compat/);
# LIGHTNING_META_SKIP_FLOOR=1 skips the floor run locally. Each suite runs in two
# worker processes (pytest-xdist), one per core of the CI machine: 13 minutes for
# the main pair where one process took 19. Pass -n 0 to run in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/ruff format --check src tests benchmarks examples
.venv/bin/mypy
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -d site
.venv/bin/python -m pytest -n 2 "$@"
if [ -z "${LIGHTNING_META_SKIP_FLOOR:-}" ]; then
    bash scripts/compat.sh 2.6.0 2.5.0 4.57.6 -- -n 2 "$@"
fi
