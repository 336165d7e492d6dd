#!/usr/bin/env bash
# Set up, then run the main job: train an ensemble and a hypernetwork on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
