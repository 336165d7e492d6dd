"""The lifecycle under multi-process strategies: real processes, 2 ranks, gloo, CPU.

Each strategy runs `tests/run_strategy.py` in a fresh interpreter (Lightning's
`ddp` launcher re-executes the script it was started from, so it cannot run
inside pytest's own process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("run_strategy.py")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "model_parallel"])
def test_lifecycle_under_strategy(tmp_path: Path, strategy: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), strategy, str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "NotImplementedError" not in proc.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["fit_loss"] > 0 and result["validate"] > 0 and result["test"] > 0
    if strategy != "ddp_spawn":  # ddp_spawn returns no predictions to the main process
        assert result["predict_batches"] == 2  # 4 batches split over 2 ranks
    assert result["templates_meta_after_fit"] and result["templates_meta_after_resume"]
    assert result["resumed_epoch"] == 2 and result["resumed_global_step"] == 6
    assert result["loaded_templates_meta"]
    assert not any("template" in k for k in result["loaded_keys"])
    assert "ensemble.stacked.0.weight" in result["loaded_keys"]
    assert result["loaded_equals_trained"]
    assert result["ensemble_matches_members"]
