#!/usr/bin/env bash
# The CUDA checks in one short run, for a machine with a GPU (the device tool
# lends one to some tasks): every test marked `cuda` (CUDA RNG replay with
# draw_on="device", lm.fabric_setup under Fabric's FSDPStrategy (FSDP1) and
# ModelParallelStrategy, every Ensemble plan against a loop, ...),
# then a Markdown table of the results, then the ensemble zoo on the GPU
# (`benchmarks/ensemble.py --zoo --device cuda`, under 2 minutes on an H200;
# BENCH=0 skips it). Needs a Python with a CUDA torch and Lightning already
# installed (PYTHON=..., default python3); nothing is downloaded. The logs,
# the tables and zoo-cuda.json go to $OUT (default /tmp).
#
#   PYTHON=/path/to/python bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp}
if ! "$PY" -c "import torch, lightning, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: needs a Python with torch (CUDA available) and lightning" >&2
    exit 2
fi
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
PYTHONPATH=src:tests PYTHONUNBUFFERED=1 "$PY" -m pytest -p no:cacheprovider -m cuda -q \
    --junitxml="$OUT/gpu-check.xml" tests src 2>&1 | tee "$OUT/gpu-check.log"
status=${PIPESTATUS[0]}
"$PY" - "$OUT/gpu-check.xml" <<'PYEOF' | tee "$OUT/gpu-check.md"
import sys, xml.etree.ElementTree as ET
import torch
print(f"GPU check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
print("| test | result |\n|---|---|")
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    outcome = "passed"
    for tag in ("failure", "error", "skipped"):
        node = case.find(tag)
        if node is not None:
            outcome = f"{tag}: {(node.get('message') or '').splitlines()[0][:80]}"
    print(f"| {case.get('classname')}.{case.get('name')} | {outcome} |")
PYEOF
if [ "${BENCH:-1}" != 0 ]; then
    PYTHONPATH=src PYTHONUNBUFFERED=1 "$PY" benchmarks/ensemble.py --zoo --device cuda \
        --threads 1 --repeats 5 --seconds 0.4 --json "$OUT/zoo-cuda.json" 2>&1 \
        | tee "$OUT/zoo-cuda.log" | tail -25
fi
exit "$status"
