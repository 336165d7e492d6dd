"""Ensemble under a hostile review (eleventh round): the memory layout of its output, and
pruning by an amount of each stacked tensor."""

from __future__ import annotations

import copy
from collections.abc import Callable

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

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
    if method == "l1":
        prune.l1_unstructured(holder, "weight", amount=0.5)
    elif method == "twice":  # a PruningContainer: a global mask, then a local amount
        prune.custom_from_mask(holder, "weight", torch.ones_like(holder.weight))
        prune.random_unstructured(holder, "weight", amount=0.3)
    else:
        prune.ln_structured(holder, "weight", amount=0.5, n=2, dim=1)
    return ens, nn.ModuleList(members)


@pytest.mark.parametrize("method", ["l1", "twice", "structured"])
def test_pruning_a_stacked_tensor_by_an_amount_is_refused_at_the_next_call(method: str) -> None:
    # The amount is of all members together: a member scaled up lost 18 % of its
    # weights, one scaled down 85 %, where a loop over the members prunes each by 50 %.
    ens, _ = _pruned(method)
    with pytest.raises(lm.ArgumentValueError, match=r"\['0.weight'\].*global_unstructured"):
        ens(torch.randn(4, 8))


def test_global_pruning_of_the_stacked_tensors_is_the_members_own() -> None:
    ens, listed = _pruned("global")
    x = torch.randn(4, 8)
    assert torch.equal(ens(x), torch.stack([m(x) for m in listed]))
    for i, m in enumerate(listed):
        assert torch.equal(ens.tensors()["0.weight"][i], m[0].weight)


def test_model_pruning_per_tensor_stops_the_next_epoch_with_the_fix() -> None:
    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.ens = lm.Ensemble.from_factory(_mlp, 3)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.ens(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ModelPruning(
                "l1_unstructured",
                amount=0.5,
                parameter_names=["weight"],
                use_global_unstructured=False,
            )
        ],
    )
    data = DataLoader(TensorDataset(torch.randn(8, 8)), batch_size=4)
    with pytest.raises(lm.ArgumentValueError, match=r"use_global_unstructured=True"):
        trainer.fit(Module(), data)
