#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv.
# torch is installed first, pinned, from the CPU wheel; a constraint file then
# keeps every later install from replacing it with a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    "$VPY" -m pip install --quiet "torch==2.13.0"
fi
# numpy arrives with the package's dependencies below; until then torch warns
# on import that it cannot find it, which says nothing about the set-up.
"$VPY" -W "ignore:Failed to initialize NumPy" -c "import torch; print('torch==' + torch.__version__)" \
    > .venv/torch-constraint.txt
"$VPY" -m pip install --quiet -c .venv/torch-constraint.txt -e ".[dev]"
