"""MetaGuard under multi-process strategies: real processes, 2 ranks, gloo, CPU.

Each strategy runs `tests/support/run_guard_strategy.py` in a fresh interpreter
(Lightning's `ddp` launcher re-executes the script it was started from, so it
cannot run inside pytest's own process).
"""

from __future__ import annotations

import io
import json
import pickle
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest

import lightning_meta as lm
from support.capabilities import FSDP2_ON_CPU, FSDP2_ON_CPU_REASON
from support.processes import run_module


def run(strategy: str, workdir: Path) -> dict[str, dict[str, Any]]:
    proc = run_module("run_guard_strategy", strategy, str(workdir), cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "NotImplementedError" not in proc.stderr
    return {p.stem[7:]: json.loads(p.read_text()) for p in workdir.glob("result-*.json")}


@pytest.mark.slow
def test_ddp_deferred_runs_are_bit_identical_to_eager(tmp_path: Path) -> None:
    results = run("ddp", tmp_path)
    assert sorted(results) == ["0", "1"]
    for r in results.values():
        assert r["steps"] == 8  # 64 samples / 2 ranks / batch 8, 2 epochs
        assert r["init_losses_equal"] and r["init_weights_equal"]
        assert r["configure_losses_equal"] and r["configure_weights_equal"]


@pytest.mark.slow
@pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_ON_CPU_REASON)
def test_model_parallel_shards_equal_eager_construction(tmp_path: Path) -> None:
    results = run("model_parallel", tmp_path)
    assert sorted(results) == ["0", "1"]
    for r in results.values():
        for mode in ("init", "configure"):
            assert not r[f"{mode}_meta_left"]
            assert r[f"{mode}_setup_equals_eager"]  # full_tensor() of every param and buffer
            assert r[f"{mode}_trained"]
        assert r["resumed_equals_saved"] and r["resumed_epoch"] == 2 and r["resumed_steps"] == 4


def test_deferred_module_survives_multiprocessing_pickle() -> None:
    """torch.multiprocessing's reductions (what ddp_spawn uses) bump tensor versions."""
    import torch.multiprocessing  # registers torch's reductions on ForkingPickler

    torch.manual_seed(0)
    with lm.deferred_init():
        probe = torch.nn.Linear(2, 2)
    buf = io.BytesIO()
    ForkingPickler(buf).dump(probe)
    clone = lm.materialize(pickle.loads(buf.getvalue()))
    torch.manual_seed(0)
    eager = torch.nn.Linear(2, 2)
    assert torch.equal(clone.weight, eager.weight) and torch.equal(clone.bias, eager.bias)


@pytest.mark.slow
def test_ddp_spawn_trains_and_returns_weights(tmp_path: Path) -> None:
    results = run("ddp_spawn", tmp_path)
    main = results["main"]
    assert not main["meta_left"] and main["trained"] and main["returned_equal"]
