"""The lifecycle under multi-process strategies: real processes, 2 ranks, gloo, CPU.

Each strategy runs `tests/support/run_strategy.py` in a fresh interpreter (Lightning's
`ddp` launcher re-executes the script it was started from, so it cannot run
inside pytest's own process).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.capabilities import FSDP2_ON_CPU, FSDP2_ON_CPU_REASON
from support.processes import run_module


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [
        "ddp",
        "ddp_spawn",
        pytest.param(
            "model_parallel",
            marks=pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_ON_CPU_REASON),
        ),
    ],
)
def test_lifecycle_under_strategy(tmp_path: Path, strategy: str) -> None:
    proc = run_module("run_strategy", strategy, str(tmp_path), cwd=tmp_path)
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
    if strategy == "model_parallel":
        assert result["fsdp2_member_plain_equal_and_runs"]
        assert result["fsdp2_apply"] == "ArgumentValueError"
