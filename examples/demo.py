"""Train an ensemble and a hypernetwork with meta templates in a real Lightning Trainer.

    bash scripts/demo.sh            # set-up + this script
    python examples/demo.py --epochs 5 --members 8 --workdir demo_out

Both models keep a meta-device template of their network (for
``torch.func.functional_call`` / ``torch.vmap``) next to real parameters.
Without lightning-meta, registering that template as a submodule crashes the
Trainer with ``Cannot copy out of meta tensor; no data!``.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm


def waves(n: int, seed: int) -> TensorDataset:
    """Noisy samples of y = sin(3x) + 0.3x on [-2, 2]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 4 - 2
    y = torch.sin(3 * x) + 0.3 * x + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )


class DeepEnsemble(L.LightningModule):
    """N independent MLPs trained at once: stacked real weights + one meta template."""

    def __init__(self, members: int = 8, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.ensemble = lm.Ensemble.from_factory(mlp, members)

    def member_losses(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return (self.ensemble(x) - y).square().mean(dim=(1, 2))  # one loss per member

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.member_losses(batch).sum()  # members do not interact
        self.log("train_loss", loss / len(self.ensemble), prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.member_losses(batch).mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class HyperNetwork(L.LightningModule):
    """A hypernetwork: a small net emits every weight of a target MLP, run through its template."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        shapes = self.target.shapes()
        self.sizes = {name: math.prod(shape) for name, shape in shapes.items()}
        self.code = nn.Parameter(torch.randn(8))
        self.hyper = nn.Sequential(
            nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, sum(self.sizes.values()))
        )

    @lm.meta_template
    def target(self) -> nn.Module:  # built on demand on meta; never in the state dict
        return mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        template = self.target
        flat = self.hyper(self.code) * 0.2
        params = dict(zip(self.sizes, flat.split(list(self.sizes.values())), strict=True))
        shaped = {name: p.view(template.shapes()[name]) for name, p in params.items()}
        return template(shaped, x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class _NoTips(logging.Filter):
    """Drop Lightning's advertisements for its cloud products ("💡 Tip: ... litlogger")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Silence what this demo's reader could neither act on nor needs to see."""
    # Lightning 2.6 tests pytree leaves with a torch API that torch 2.13 deprecates.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())


def fit(model: L.LightningModule, workdir: Path, epochs: int) -> str:
    # A rerun of the demo replaces its own previous checkpoints (Lightning
    # would warn that the directory is not empty and number the new files -v1).
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    train = DataLoader(waves(512, seed=0), batch_size=64, shuffle=True)
    val = DataLoader(waves(256, seed=1), batch_size=256)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        default_root_dir=str(workdir),
        logger=False,
        enable_model_summary=True,
    )
    trainer.fit(model, train, val)
    assert trainer.checkpoint_callback is not None
    return trainer.checkpoint_callback.best_model_path  # type: ignore[attr-defined, no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("demo_out"))
    args = parser.parse_args()
    quiet_lightning()
    L.seed_everything(0, verbose=False)
    console = Console()

    ckpt = fit(DeepEnsemble(args.members), args.workdir / "ensemble", args.epochs)
    ensemble = DeepEnsemble.load_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        losses = ensemble.member_losses(next(iter(DataLoader(waves(256, seed=1), batch_size=256))))
    # soft_wrap: a checkpoint path split over two lines cannot be copied.
    console.print(f"deep ensemble reloaded from {ckpt}", soft_wrap=True)
    table = Table(title="Deep ensemble: each member on held-out data")
    table.add_column("member", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("validation MSE", justify="right")
    per_member = sum(p.numel() for p in ensemble.ensemble.member(0).parameters())
    for i, loss in enumerate(losses.tolist()):
        table.add_row(str(i), f"{per_member:,}", f"{loss:.4f}")
    console.print(table)
    console.print(
        f"members: {len(ensemble.ensemble)}, real parameters: "
        f"{sum(p.numel() for p in ensemble.parameters()):,}, template on meta: "
        f"{ensemble.ensemble.template.module.get_parameter('0.weight').is_meta}"
    )

    ckpt = fit(HyperNetwork(), args.workdir / "hypernetwork", args.epochs)
    hyper = HyperNetwork.load_from_checkpoint(ckpt).eval()
    x, y = waves(256, seed=1).tensors
    with torch.no_grad():
        loss = nn.functional.mse_loss(hyper(x), y).item()
    console.print(
        f"hypernetwork reloaded from {ckpt}: validation MSE {loss:.4f}, "
        f"real parameters {sum(p.numel() for p in hyper.parameters()):,}, "
        f"state_dict keys {sorted(hyper.state_dict())}",
        soft_wrap=True,
    )


if __name__ == "__main__":
    main()
