"""fabric_setup, fifth review (a sweep of Fabric and Trainer workflows with Hugging Face and
litgpt models): optimizer state loaded while the parameters were meta, and the refusal of a
deferred model cast with ``module.to(dtype)`` after its block."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _fabric() -> L.Fabric:
    return L.Fabric(accelerator="cpu", devices=1)


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    fabric = _fabric()
    torch.manual_seed(0)
    net = _net()
    model, opt = fabric.setup(net, torch.optim.AdamW(net.parameters(), lr=1e-2))
    _step(model, opt)
    fabric.save(tmp_path / "state.ckpt", {"model": model, "optimizer": opt})
    return tmp_path / "state.ckpt"


def test_optimizer_state_loaded_while_the_parameters_were_meta_is_refused(saved: Path) -> None:
    # Optimizer.load_state_dict moves the state to each parameter's device: loaded
    # before the deferred model was filled, it stayed on meta, and fabric_setup
    # handed it on; the first step failed with torch's "Tensor on device cpu is not
    # on the expected device meta!".
    fabric = _fabric()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with lm.deferred_init():
            model = _net()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        fabric.load(saved, {"optimizer": opt}, strict=False)
        lm.load_checkpoint(model, saved)
        with pytest.raises(lm.MaterializationError, match=r"whose state is on meta for 4 param"):
            lm.fabric_setup(fabric, model, opt)
        # The fix it names: the optimizer's state after the model has data.
        with lm.deferred_init():
            model = _net()
        lm.load_checkpoint(model, saved)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        fabric.load(saved, {"optimizer": opt}, strict=False)
        model, opt = lm.fabric_setup(fabric, model, opt)
        _step(model, opt)
        eager = _net()
        eager_opt = torch.optim.AdamW(eager.parameters(), lr=1e-2)
        fabric.load(saved, {"model": eager, "optimizer": eager_opt})
        eager, eager_opt = fabric.setup(eager, eager_opt)
        _step(eager, eager_opt)
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        assert torch.equal(a, b)


class _Rotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("inv_freq", torch.arange(4.0) / 4, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.inv_freq


def test_a_buffer_cast_after_the_block_is_refused_naming_the_cast() -> None:
    # Before: "holds 1 meta tensors ... 'inv_freq' (buffer, not deferred) ... Fix: ...
    # build the module inside `with lightning_meta.deferred_init():`", which it was.
    with lm.deferred_init():
        model = _Rotary()
    model.to(torch.bfloat16)
    with pytest.raises(
        lm.MaterializationError,
        match=r"inv_freq.*replaced after the deferred_init block by new meta tensors of their shape",
    ):
        lm.fabric_setup(_fabric(), model)
