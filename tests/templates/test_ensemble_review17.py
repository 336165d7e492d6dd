"""The review of 2026-12-07 (third session): ensembles.

- A dropout's ``p`` set on the template as a numpy scalar (``np.float32(0.0)`` from a
  schedule) was no setting for the loop's copies, which kept 0.5: 1.05 off the members'
  loop, without an error. numpy's scalars are settings now, told apart by type and repr.

The loop's cases failed on the tree before these fixes (7b349e6); "auto" picks the fused
plan here, which reads the template, and is a control.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import lightning_meta as lm


@pytest.mark.parametrize("plan", ["loop", "auto"])
@pytest.mark.parametrize("value", [np.float32(0.0), np.float64(0.0), np.float32(0.25)])
def test_a_numpy_setting_on_the_template_reaches_every_member(plan: str, value: Any) -> None:
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)) for _ in range(3)]
    reference = copy.deepcopy(members)
    ensemble = lm.Ensemble(members, execution=plan)
    x = torch.randn(5, 4)
    ensemble(x)
    ensemble.template.module[1].p = value
    for member in reference:
        member[1].p = value
    torch.manual_seed(3)
    got = ensemble(x)
    torch.manual_seed(3)
    expected = torch.stack([m(x) for m in reference])
    if plan == "loop":
        assert torch.equal(got, expected)
    else:  # "auto" may pick a plan that sums in another order (the last bits)
        torch.testing.assert_close(got, expected)


class _Recorder:
    def __init__(self) -> None:
        self.features: list[torch.Tensor] = []

    def hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.features.append(output)


@pytest.mark.parametrize("plan", ["loop", "vmap", "auto"])
def test_an_ensembles_hook_objects_stay_copies(plan: str) -> None:
    # Control for MetaTemplate sharing its module's hook objects since this review: an
    # Ensemble's plans run the members' hooks on copies (as documented), so the user's
    # object never receives torch.vmap's batched tensors.
    recorder = _Recorder()
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)) for _ in range(3)]
    for member in members:
        member[0].register_forward_hook(recorder.hook)
    ensemble = lm.Ensemble(members, execution=plan)
    ensemble(torch.randn(5, 4))
    assert recorder.features == []
