"""Ensemble under a hostile review (twelfth round): an in-place layer after the fused
plan's large shared-input layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_meta as lm


def _wide(inplace: nn.Module) -> nn.Module:
    # 4 members x 512 x 512 float32: 4 MiB, the size from which the first layer
    # writes its weight gradient into a reused buffer (_fused._SharedLinear).
    return nn.Sequential(nn.Linear(512, 512), inplace, nn.Linear(512, 4))


@pytest.mark.parametrize("inplace", [nn.ReLU(inplace=True), nn.Hardtanh(inplace=True)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_an_in_place_activation_after_a_large_shared_input_layer_runs_fused(
    inplace: nn.Module, deterministic: bool
) -> None:
    # Before, the layer returned a view made inside its autograd.Function, and the
    # in-place activation raised torch's "Output 0 of _SharedLinear is a view and
    # is being modified inplace": with execution="fused", and with "auto" where it
    # does not time (deterministic algorithms, so Trainer(deterministic=True)).
    torch.manual_seed(0)
    members = [_wide(copy.deepcopy(inplace)) for _ in range(4)]
    x = torch.randn(8, 512)
    ref_members = copy.deepcopy(members)
    ref = torch.stack([m(x) for m in ref_members])
    ref.square().sum().backward()
    execution = "auto" if deterministic else "fused"
    ensemble = lm.Ensemble(members, execution=execution)
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = ensemble(x)
        out.square().sum().backward()
        out2 = ensemble(x)  # the reused gradient buffer, second step
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out2, out)
    for name, p in ensemble.named_parameters():
        leaf = name.removeprefix("stacked.")
        grads = [m.get_parameter(leaf).grad for m in ref_members]
        want = torch.stack([g for g in grads if g is not None])
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, want)
