"""Ensemble under a hostile review (eleventh round): the memory layout of its output, and
pruning the stacked tensors."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import lightning_meta as lm


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def _conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())


@pytest.mark.parametrize(
    ("factory", "shape", "execution"),
    [
        (_mlp, (4, 8), "fused"),
        (_mlp, (4, 8), "auto"),
        (_mlp, (4, 8), "vmap"),
        (_conv, (2, 3, 6, 6), "vmap"),
        (_conv, (2, 3, 6, 6), "grouped"),
    ],
)
def test_the_output_is_laid_out_as_the_loops_and_draws_on_it_match(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], execution: str
) -> None:
    # Before, the fused plan returned strides (8, 1, 4) where the loop's stack has
    # (8, 2, 1), and vmap over a Conv2d put the member dimension inside: a
    # randn_like or dropout on the output drew other numbers (3.8 off), and
    # .view(-1, ...) raised.
    torch.manual_seed(0)
    members = [factory() for _ in range(3)]
    x = torch.randn(*shape)
    ref = torch.stack([m(x) for m in members])
    out = lm.Ensemble(copy.deepcopy(members), execution=execution)(x)
    assert out.stride() == ref.stride()
    torch.testing.assert_close(out, ref)

    def draws(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(1)
        return nn.functional.dropout(t, 0.5), t + torch.randn_like(t)

    for got, want in zip(draws(out), draws(ref), strict=True):
        torch.testing.assert_close(got, want)
    out.view(-1, out.shape[-1])  # the loop's output allows it


def test_a_channels_last_member_output_keeps_the_loops_layout() -> None:
    torch.manual_seed(0)
    members = [_conv().to(memory_format=torch.channels_last) for _ in range(2)]
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    ref = torch.stack([m(x) for m in members])
    out = lm.Ensemble(copy.deepcopy(members), execution="vmap")(x)
    assert out.stride() == ref.stride()


def _pruned(method: str) -> tuple[lm.Ensemble, nn.ModuleList]:
    torch.manual_seed(0)
    members = [_mlp() for _ in range(3)]
    with torch.no_grad():  # members of different scale, as after training
        for i, m in enumerate(members):
            m[0].weight.mul_(1 + i)
    ens = lm.Ensemble(copy.deepcopy(members), execution="loop")
    holder = ens.stacked.get_submodule("0")
    if method == "global":
        prune.global_unstructured(
            [(holder, "weight")], pruning_method=prune.L1Unstructured, amount=0.5
        )
        listed = nn.ModuleList(members)
        prune.global_unstructured(
            [(m[0], "weight") for m in listed], pruning_method=prune.L1Unstructured, amount=0.5
        )
        return ens, listed
    prune.l1_unstructured(holder, "weight", amount=0.5)
    return ens, nn.ModuleList(members)


def test_pruning_a_stacked_tensor_by_an_amount_takes_it_of_all_members_together() -> None:
    # Documented (guarantees.md, "What does not reach the members"): the amount is of
    # the stacked tensor, not of each member, so shares differ from a loop's.
    ens, listed = _pruned("l1")
    shares = [float((ens.tensors()["0.weight"][i] == 0).float().mean()) for i in range(3)]
    assert shares[0] > 0.5 > shares[2]
    for m in listed:
        prune.l1_unstructured(m[0], "weight", amount=0.5)
    assert [float((m[0].weight == 0).float().mean()) for m in listed] == [0.5] * 3


def test_global_pruning_of_the_stacked_tensors_is_the_members_own() -> None:
    ens, listed = _pruned("global")
    x = torch.randn(4, 8)
    assert torch.equal(ens(x), torch.stack([m(x) for m in listed]))
    for i, m in enumerate(listed):
        assert torch.equal(ens.tensors()["0.weight"][i], m[0].weight)
