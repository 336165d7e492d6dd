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
pip_install() {
    # A pip configuration whose extra index is a local directory makes pip warn,
    # for every package that directory lacks, "Location '...' is ignored: it is
    # neither a file nor a directory": about the machine, not this set-up.
    "$VPY" -m pip install --quiet "$@" 2>&1 \
        | { grep -v "^WARNING: Location '[^']*' is ignored: it is neither a file nor a directory\.$" || true; }
}
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    pip_install "torch==2.13.0"
fi
# numpy arrives with the package's dependencies below; until then torch warns
# on import that it cannot find it, which says nothing about the set-up.
"$VPY" -W "ignore:Failed to initialize NumPy" -c "import torch; print('torch==' + torch.__version__)" \
    > .venv/torch-constraint.txt
pip_install -c .venv/torch-constraint.txt -e ".[dev]"
