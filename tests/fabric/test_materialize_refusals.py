"""Public `materialize` on models whose deferred tensors a wrapper replaced: refused, named.

The multi-rank cases (meta DTensors from `fully_shard` that were never
deferred, a `dtype` cast of sharded parameters, `fallback` on shards, a meta
device context inside `deferred_init`) run in real processes in
`test_fabric_meshes.py`; these need no process group.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_meta as lm


def test_a_deferred_parameter_replaced_by_another_meta_tensor_is_named() -> None:
    torch.manual_seed(0)
    with lm.deferred_init():
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    # What a wrapper that flattens or reshapes parameters on meta does.
    net[1].weight = nn.Parameter(torch.empty(8, device="meta"))
    with pytest.raises(
        lm.MaterializationError,
        match=r"1\.weight \(Parameter of shape \(8,\), deferred as \(2, 4\)\)",
    ) as info:
        lm.materialize(net)
    assert "Fix:" in str(info.value)
    assert all(p.is_meta for p in net.parameters())  # refused before anything was replayed


def test_a_meta_device_context_inside_deferred_init_is_refused() -> None:
    # What fabric.init_module(empty_init=True) is under ModelParallelStrategy.
    with torch.device("meta"), lm.deferred_init():
        net = nn.Linear(4, 2)
    with pytest.raises(
        lm.MaterializationError, match=r"entered inside a torch.device\('meta'\) context"
    ):
        lm.materialize(net)
    assert net.weight.is_meta
