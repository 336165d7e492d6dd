#!/usr/bin/env bash
# Run the deferred-init zoo's torchvision and timm models against real torchvision C ops.
#
#   bash scripts/compat-vision.sh                    # the torchvision / timm zoo entries
#   bash scripts/compat-vision.sh -- tests/deferred  # other pytest arguments instead
#
# PyPI's torchvision wheels are built against one torch release each and do not
# load next to the CPU torch of .venv (2.13.0+cpu); this builds (or reuses)
# .venv-compat/vision-torch-2.14.1 with torch 2.14.1 and torchvision 0.29.1, a
# pair that belongs together (both lie in this machine's pip index, so nothing
# is downloaded; pip's cache is shared), plus timm, Lightning 2.6.6 and this
# package with its test extras. A constraint file pins the pair, replacing the
# machine's own pip constraint for this venv only (PIP_CONSTRAINT). The script
# fails if torchvision's C ops do not load, so a skipped zoo entry cannot pass
# for a tested one.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.14.1
TORCHVISION=0.29.1
LIGHTNING=2.6.6
[ "${1:-}" = "--" ] && shift
if [ $# -eq 0 ]; then
    set -- tests/deferred/test_zoo.py -k "tv_ or timm_"
fi
PY=${PYTHON:-python3}
VENV=.venv-compat/vision-torch-$TORCH
mkdir -p "$VENV"
CONSTRAINTS=$VENV/constraints.txt
{
    echo "torch==$TORCH"
    echo "torchvision==$TORCHVISION"
    echo "lightning==$LIGHTNING"
} > "$CONSTRAINTS"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
export PIP_CONSTRAINT=$CONSTRAINTS
if ! "$VENV/bin/python" -c "import torch, torchvision, timm, lightning" >/dev/null 2>&1 \
    || [ -n "$(find pyproject.toml -newer "$VENV/installed" 2>/dev/null || echo stale)" ] \
    || ! "$VENV/bin/python" -c "import lightning_meta, os, sys; \
sys.exit(not os.path.samefile(os.path.dirname(lightning_meta.__file__), 'src/lightning_meta'))" \
        >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH" "torchvision==$TORCHVISION" \
        timm "lightning==$LIGHTNING"
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    touch "$VENV/installed"
fi
# torchvision's C ops (torchvision::nms) register only next to the torch they were built for.
"$VENV/bin/python" - <<'EOF'
import timm, torch, torchvision

torch.ops.torchvision.nms  # raises if torchvision's C extension did not load
print(f"torch {torch.__version__}, torchvision {torchvision.__version__} (C ops loaded), "
      f"timm {timm.__version__}")
EOF
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -rs "$@"
