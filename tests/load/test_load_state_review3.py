"""`load_checkpoint` leaves the state eager loading leaves: FSDP2 shards.

- An FSDP2 model that ran a ``no_grad`` forward holds unsharded copies that
  the next reshard frees: the load reshards first (as FSDP2's own load
  pre-hooks do for ``load_state_dict``), so training after it equals "load,
  then shard" (2 gloo ranks, `tests/support/run_fsdp_load_after_forward.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.capabilities import FSDP2_ON_CPU, FSDP2_ON_CPU_REASON
from support.processes import run_module


@pytest.mark.slow
@pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_ON_CPU_REASON)
def test_fsdp2_model_after_a_no_grad_forward_trains_as_load_then_shard(tmp_path: Path) -> None:
    proc = run_module("run_fsdp_load_after_forward", "2", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = {p.stem[7:]: json.loads(p.read_text()) for p in tmp_path.glob("result-*.json")}
    assert sorted(results) == ["0", "1"]
    for rank, cases in results.items():
        assert sorted(cases) == ["output_default", "whole_default", "whole_no_reshard"]
        for name, r in cases.items():
            assert r["losses"] == r["ref"], (rank, name)
            assert r["unequal"] == [], (rank, name)
