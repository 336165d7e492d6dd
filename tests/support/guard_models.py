"""Tiny LightningModules for the MetaGuard tests, shared with `run_guard_strategy.py`
(which imports this file by path) and used as `lightning-meta check` targets."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm
from lightning_meta import MetaGuard

IN, HIDDEN, OUT = 6, 16, 1


class Block(nn.Module):
    """A custom parameter, a non-persistent buffer and a parent-level re-init:
    what `to_empty()` + `reset_parameters()` gets wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.scale = nn.Parameter(torch.randn(HIDDEN) * 0.1 + 1)
        self.register_buffer("offset", torch.rand(HIDDEN) * 0.01, persistent=False)
        nn.init.orthogonal_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x)) * self.scale + self.offset


def net() -> nn.Sequential:
    return nn.Sequential(Block(), nn.Tanh(), nn.Dropout(0.2), nn.Linear(HIDDEN, OUT))


def loader(
    n: int = 64, batch_size: int = 8, seed: int = 0, shuffle: bool = True
) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh() + 0.05 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class Seeded(L.LightningModule):
    """`net()` built in `__init__` (`mode="eager"`, or `"init"`: under `deferred_init`) or in
    `configure_model` (`"configure_eager"`, or `"configure"`: under `deferred_init`)."""

    def __init__(self, mode: str = "eager", lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.losses: list[float] = []
        self.model: nn.Module | None = None
        if mode == "eager":
            self.model = net()
        elif mode == "init":
            with lm.deferred_init():
                self.model = net()

    def configure_model(self) -> None:
        if self.model is None and self.hparams.mode == "configure":
            with lm.deferred_init():
                self.model = net()
        elif self.model is None and self.hparams.mode == "configure_eager":
            self.model = net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class Sharded(Seeded):
    """`Seeded` with FSDP2 `fully_shard` in `configure_model` (ModelParallelStrategy)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        super().configure_model()
        if isinstance(self.model, FSDPModule):  # called again by validate / resume
            return
        assert self.model is not None
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        fully_shard(self.model[0], mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class Stray(L.LightningModule):
    """A teacher copied to meta and registered: the `copy.deepcopy(mlp).to("meta")` pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
        self.teacher = copy.deepcopy(self.mlp).to("meta")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.mlp(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.mlp.parameters(), lr=0.1)


class Clean(Stray):
    """The same teacher kept as a `MetaTemplate`: Lightning never sees it."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        self.mlp = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
        self.teacher = lm.MetaTemplate(self.mlp)


class BuiltInSetup(Stray):
    """The meta teacher registered in `setup()` (where Lightning's docs build layers whose
    sizes come from the data), not in `__init__`: the Trainer calls `setup` first."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)

    def setup(self, stage: str) -> None:
        if not hasattr(self, "mlp"):
            self.mlp = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
            self.teacher = copy.deepcopy(self.mlp).to("meta")


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
        for k, v in module.state_dict(keep_vars=True).items()
    }


def trainer(**kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "callbacks": [MetaGuard()],
    }
    options.update(kwargs)
    return L.Trainer(**options)


# The strategy methods MetaGuard wraps for a run (lightning_meta._guard._callback._PATCHED).
PATCHED = {"model_sharded_context", "setup", "teardown", "load_model_state_dict"}


def chain(e: BaseException | None) -> list[BaseException]:
    """``e`` and every exception it was raised from or during, outermost first."""
    out = []
    while e is not None:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out
