#!/usr/bin/env bash
# Build (or reuse) a virtual environment for one torch / Lightning pair and run
# the test suite in it: the support window is what this script passes on.
#
#   bash scripts/compat.sh TORCH LIGHTNING [TRANSFORMERS] [-- PYTEST ARGS...]
#   bash scripts/compat.sh 2.6.0 2.5.0 4.57.6          # the declared floor
#   bash scripts/compat.sh 2.15.0 2.6.6 -- -m "not slow"
#   PYTHON=python3.10 bash scripts/compat.sh 2.10.0 2.6.6 5.17.0   # another Python
#
# Each pair gets .venv-compat/[pyXY-]torch-T-lightning-L. A constraint file pins
# the pair, replacing the machine's own pip constraint for this venv only
# (PIP_CONSTRAINT), so that no later install can move torch or Lightning. PyPI's
# torch is a CUDA build: about 3 GB of wheels that make 5.5 GB installed (torch
# 2.6). The pair is installed one wheel at a time, so that the disk holds what is
# installed plus one wheel, not every wheel beside it (a CI machine ran out of
# disk that way).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
    sed -n '2,13p' "$0" >&2
    exit 2
fi
TORCH=$1
LIGHTNING=$2
shift 2
TRANSFORMERS=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    TRANSFORMERS=$1
    shift
fi
[ "${1:-}" = "--" ] && shift
PY=${PYTHON:-python3}
# Another interpreter (PYTHON=/path/to/python3.10) gets a venv of its own.
PREFIX=""
[ -n "${PYTHON:-}" ] && PREFIX=$("$PY" -c 'import sys; print("py%d%d-" % sys.version_info[:2])')
VENV=.venv-compat/${PREFIX}torch-$TORCH-lightning-$LIGHTNING
mkdir -p "$VENV"
CONSTRAINTS=$VENV/constraints.txt
{
    echo "torch==$TORCH"
    echo "lightning==$LIGHTNING"
    [ -n "$TRANSFORMERS" ] && echo "transformers==$TRANSFORMERS"
} > "$CONSTRAINTS"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
export PIP_CONSTRAINT=$CONSTRAINTS
pip_install() {
    # As in setup.sh: pip's "Location '...' is ignored" lines are about this
    # machine's pip configuration (an extra index that lacks the package).
    "$VENV/bin/python" -m pip install --quiet "$@" 2>&1 \
        | { grep -v "^WARNING: Location '[^']*' is ignored: it is neither a file nor a directory\.$" || true; }
}
# Reinstall when the venv cannot import the pair, pyproject.toml changed, the
# venv's package is another checkout's (a venv shared between clones), or the
# pins changed (another transformers for the same torch / Lightning).
if ! "$VENV/bin/python" -c "import torch, lightning" >/dev/null 2>&1 \
    || [ -n "$(find pyproject.toml -newer "$VENV/installed" 2>/dev/null || echo stale)" ] \
    || ! "$VENV/bin/python" -c "import lightning_meta, os, sys; \
sys.exit(not os.path.samefile(os.path.dirname(lightning_meta.__file__), 'src/lightning_meta'))" \
        >/dev/null 2>&1 \
    || ! cmp -s "$CONSTRAINTS" "$VENV/installed"; then
    # pip fetches every wheel of an install before it installs any: resolve the
    # pair first (the dry run fetches them too, but into a temporary directory it
    # empties before anything is installed), then install what it needs one by one.
    PLAN=$VENV/plan.json
    pip_install --dry-run --report "$PLAN" "torch==$TORCH" "lightning==$LIGHTNING"
    "$VENV/bin/python" -c "import json, sys
for item in json.load(open(sys.argv[1]))['install']:
    print(item['metadata']['name'] + '==' + item['metadata']['version'])" "$PLAN" \
        | while read -r pin; do pip_install --no-deps --no-cache-dir "$pin"; done
    rm -f "$PLAN"
    pip_install "torch==$TORCH" "lightning==$LIGHTNING"  # installs nothing: checks the set
    pip_install -e ".[test]"
    cp "$CONSTRAINTS" "$VENV/installed"
fi
"$VENV/bin/python" -c "import torch, lightning, transformers; print(f'torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}')"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
