#!/usr/bin/env bash
# Set up, then run every check CI runs: ruff (lint and format), mypy, the docs
# build and the test suite on the main torch / Lightning pair. With
# LIGHTNING_META_FLOOR=1 the suite runs again on the declared floor of the
# support window (torch 2.6 / Lightning 2.5, in its own venv under
# .venv-compat/); that run does not pass yet (see the support-window issue).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/ruff format --check src tests benchmarks examples
.venv/bin/mypy
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -d site
.venv/bin/python -m pytest "$@"
if [ -n "${LIGHTNING_META_FLOOR:-}" ]; then
    bash scripts/compat.sh 2.6.0 2.5.0 4.57.6 -- "$@"
fi
