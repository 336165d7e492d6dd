"""Templates under a hostile review (thirteenth round): a template built from a deferred
module before ``materialize``."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm


class _Frozen(L.LightningModule):
    """A hypernetwork sized from a cached template that reuses the model's (frozen) encoder."""

    def __init__(self, deferred: bool) -> None:
        super().__init__()
        if deferred:
            with lm.deferred_init():
                self.enc = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5))
        else:
            self.enc = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5))
        sizes = self.full.shapes(buffers=False).values()
        self.hyper = nn.Linear(2, sum(torch.Size(s).numel() for s in sizes))
        self.losses: list[float] = []

    @lm.meta_template(cache=True)
    def full(self) -> nn.Module:
        return nn.Sequential(self.enc, nn.Linear(8, 1))

    def on_train_epoch_start(self) -> None:
        self.enc.eval()  # a frozen feature extractor: dropout off
        self.enc.requires_grad_(False)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        flat, params, at = self.hyper(torch.ones(2)), {}, 0
        for name, shape in self.full.shapes(buffers=False).items():
            n = torch.Size(shape).numel()
            params[name] = flat[at : at + n].view(shape)
            at += n
        out = self.full(params, x) + self.enc(x).sum(1, keepdim=True)
        loss = ((out - y) ** 2).mean()
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.hyper.parameters(), lr=0.01)


def _fit(deferred: bool) -> _Frozen:
    L.seed_everything(0, verbose=False)
    model = _Frozen(deferred)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g))
    L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[lm.MetaGuard()] if deferred else [],
    ).fit(model, DataLoader(data, batch_size=8))
    return model


def test_a_cached_builder_reusing_a_deferred_submodule_copies_it_to_meta() -> None:
    # Before, the template kept the model's deferred encoder itself (its tensors were
    # meta), MetaGuard made it real in place, and every read of the template set the
    # real encoder back to train mode: dropout on in a frozen encoder, losses
    # [56.9, 38.6, 4.0, 10.2] against eager's [59.5, 45.5, 4.6, 1.4].
    deferred, eager = _fit(True), _fit(False)
    assert deferred.full.module[0] is not deferred.enc
    assert all(t.is_meta for t in deferred.full.module.parameters())
    assert not deferred.enc.training
    assert deferred.losses == eager.losses


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 1)
        self.scale = torch.full((1,), 0.5)  # a plain constant attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * self.scale


def test_a_template_of_a_deferred_module_with_a_tensor_attribute_is_refused_until_materialize() -> (
    None
):
    # Before, the copy of `scale` stayed a deferred meta tensor nothing fills, and every
    # call raised an error whose fixes were already followed.
    with lm.deferred_init():
        net = _Scaled()
    with pytest.raises(lm.ArgumentValueError, match="'scale' is a tensor attribute built under"):
        lm.MetaTemplate(net)
    with lm.deferred_init():
        inside = _Scaled()
        template = lm.MetaTemplate(inside)
    lm.materialize(net)
    x = torch.randn(3, 6)
    after = lm.MetaTemplate(net)
    assert torch.equal(after(dict(net.named_parameters()), x), net(x))
    lm.materialize(inside)
    assert torch.equal(template(dict(inside.named_parameters()), x), inside(x))
