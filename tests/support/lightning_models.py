"""Tiny LightningModules that hold every kind of template, shared by the tests and the
multi-process scripts (which import this file by path)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm

IN, HIDDEN, OUT = 6, 16, 1


def mlp(hidden: int = HIDDEN) -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN, hidden), nn.Tanh(), nn.Linear(hidden, OUT))


def bn_net(hidden: int = HIDDEN) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(IN, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, OUT)
    )


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh() + 0.05 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader[Any]:
    return DataLoader(dataset(n, seed), batch_size=batch_size)


class AllTemplates(L.LightningModule):
    """An ensemble, a MetaTemplate of a real net, and a hypernetwork over a meta_template."""

    def __init__(
        self, members: int = 4, hidden: int = HIDDEN, lr: float = 0.05, execution: str = "auto"
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.ensemble = lm.Ensemble.from_factory(lambda: mlp(hidden), members, execution=execution)
        self.bn_ensemble = lm.Ensemble.from_factory(lambda: bn_net(hidden), 2)
        self.net = bn_net(hidden)
        # Seed solution 1: a stateless copy of a real net, for functional_call.
        self.net_template = lm.MetaTemplate(self.net)
        n_target = sum(p.numel() for p in self.target.module.parameters())
        self.hyper = nn.Linear(2, n_target)
        self.example_input_array = torch.zeros(4, IN)

    # Seed solution 2: built on demand, never stored.
    @lm.meta_template
    def target(self) -> nn.Module:
        return nn.Linear(IN, OUT)

    def target_params(self) -> dict[str, torch.Tensor]:
        flat = self.hyper(
            torch.ones(2, device=self.hyper.weight.device, dtype=self.hyper.weight.dtype)
        )
        out, offset = {}, 0
        for name, shape in self.target.shapes().items():
            size = int(torch.Size(shape).numel())
            out[name] = flat[offset : offset + size].view(shape) * 0.1
            offset += size
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.net_template.train(self.training)
        direct = self.net_template(self.net_template.state_from(self.net), x)
        hyper = self.target(self.target_params(), x)
        return self.ensemble(x).mean(0) + self.bn_ensemble(x).mean(0) + direct + hyper

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = nn.functional.mse_loss(out, y.to(out.dtype))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.log("val_loss", nn.functional.mse_loss(out, y.to(out.dtype)))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.log("test_loss", nn.functional.mse_loss(out, y.to(out.dtype)))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class ShardedTemplates(AllTemplates):
    """The same model, sharded with FSDP2 in configure_model (ModelParallelStrategy)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self, FSDPModule):  # called again by validate/test/predict
            return
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        fully_shard(self.ensemble, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Momentum: Lightning 2.6's ModelParallelStrategy cannot resume from a
        # full checkpoint whose optimizer state is empty (IndexError in
        # _rekey_optimizer_state_if_needed), a bug of its own.
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def templates_are_meta(model: AllTemplates) -> bool:
    return all(
        t.is_meta
        for module in (
            model.net_template.module,
            model.ensemble.template.module,
            model.bn_ensemble.template.module,
            model.target.module,
        )
        for t in [*module.parameters(), *module.buffers()]
    )


def real_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
