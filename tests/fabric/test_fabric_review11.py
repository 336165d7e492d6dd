"""fabric_setup under a hostile review (eleventh round): ``fabric.load`` of a model and its
optimizer together, before ``fabric_setup``, named a fix that drops the optimizer state."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Linear(16, 1))


def _saved(fabric: L.Fabric, path: Path) -> None:
    model = _net()
    opt = torch.optim.AdamW(model.parameters())
    model, opt = fabric.setup(model, opt)
    fabric.backward(model(torch.randn(4, 6)).sum())
    opt.step()
    fabric.save(path, {"model": model, "optimizer": opt})


def test_loading_model_and_optimizer_before_setup_names_the_order_that_resumes_both(
    tmp_path: Path,
) -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1)
    path = tmp_path / "ck.ckpt"
    _saved(fabric, path)
    with lm.deferred_init():
        model = _net()
    opt = torch.optim.AdamW(model.parameters())
    fabric.load(path, {"model": model, "optimizer": opt})
    # Before: "Fix: create the optimizer after load_state_dict", which drops the
    # optimizer state this load put in, without an error.
    with pytest.raises(lm.MaterializationError, match=r"a new optimizer would drop it") as info:
        lm.fabric_setup(fabric, model, opt)
    assert "call lm.fabric_setup(fabric, model, optimizer), then fabric.load" in str(info.value)

    # The order it names resumes both exactly.
    with lm.deferred_init():
        model = _net()
    opt = torch.optim.AdamW(model.parameters())
    model, opt = lm.fabric_setup(fabric, model, opt)
    fabric.load(path, {"model": model, "optimizer": opt})
    saved = torch.load(path, weights_only=True)
    state = model.module.state_dict()  # under Fabric's wrapper
    assert state.keys() == saved["model"].keys()
    assert all(torch.equal(state[k], v) for k, v in saved["model"].items())
    loaded = opt.state_dict()["state"]
    for i, kept in saved["optimizer"]["state"].items():
        assert torch.equal(loaded[i]["exp_avg"], kept["exp_avg"])
        assert torch.equal(loaded[i]["exp_avg_sq"], kept["exp_avg_sq"])
