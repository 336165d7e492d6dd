"""Pieces of ``_StridedShard`` placements (FSDP2 over tensor parallel) against eager's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.capabilities import (
    FSDP2_ON_CPU,
    FSDP2_ON_CPU_REASON,
    UNEVEN_FSDP_OVER_TP,
    UNEVEN_FSDP_OVER_TP_REASON,
)
from support.processes import run_module

pytestmark = [
    pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_ON_CPU_REASON),
    pytest.mark.skipif(not UNEVEN_FSDP_OVER_TP, reason=UNEVEN_FSDP_OVER_TP_REASON),
]


def test_strided_pieces_are_eager_fully_shard_over_tp_and_torch_otherwise(tmp_path: Path) -> None:
    # torch 2.8's distribute_tensor gave other pieces than eager for an uneven
    # fully_shard-over-TP split, so materialize filled wrong shards silently;
    # a _StridedShard laid out otherwise must keep torch's own slicing.
    proc = run_module("run_strided", str(tmp_path), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("result-*.json")}
    assert sorted(results) == [f"result-{r}.json" for r in range(4)]
    assert all(apart == [] for apart in results.values()), results
