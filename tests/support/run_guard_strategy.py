"""Train `guard_models.Seeded` with MetaGuard under one multi-process strategy, eager vs deferred.

    python -m support.run_guard_strategy STRATEGY WORKDIR   (with tests/ on PYTHONPATH)

STRATEGY is `ddp`, `ddp_spawn` or `model_parallel` (FSDP2, `fully_shard` in
`configure_model`); always 2 CPU processes with gloo. Every rank writes
WORKDIR/result-RANK.json (the main process of `ddp_spawn` writes result-main.json),
which `test_guard_strategies.py` reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_meta import MetaGuard
from support.guard_models import Seeded, Sharded, loader, net, trainer
from support.processes import end_without_finalizing, run_main

end_without_finalizing()


def full(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too), as full CPU tensors."""
    from torch.distributed.tensor import DTensor

    named = [*module.named_parameters(), *module.named_buffers()]
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
        for k, v in named
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class AfterSetup(Callback):
    """Snapshot the model right after the strategy's setup (materialized, sharded)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, torch.Tensor] = {}
        self.at_train_start: dict[str, torch.Tensor] = {}
        self.meta_left = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.snapshot = full(pl_module)
        self.meta_left = any(t.is_meta for t in [*pl_module.parameters(), *pl_module.buffers()])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a ckpt_path restore, which ModelParallelStrategy does after setup.
        self.at_train_start = full(pl_module)


class SaveOnRank0(Callback):
    """Write rank 0's final persistent weights, to compare with what ddp_spawn returns."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            keep = set(pl_module.state_dict())
            torch.save(
                {k: v for k, v in full(pl_module).items() if k in keep}, self.workdir / "rank0.pt"
            )


def strategy_for(name: str) -> Any:
    if name == "model_parallel":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    return name


def run(
    name: str, mode: str, workdir: Path, ckpt_path: str | None = None, **options: Any
) -> tuple[Seeded, L.Trainer, AfterSetup]:
    L.seed_everything(0, verbose=False)
    model = (Sharded if name == "model_parallel" else Seeded)(mode)
    snap = AfterSetup()
    callbacks: list[Callback] = [MetaGuard(), snap, *options.pop("callbacks", [])]
    t = trainer(
        devices=2,
        strategy=strategy_for(name),
        callbacks=callbacks,
        default_root_dir=str(workdir),
        **options,
    )
    t.fit(model, loader(), ckpt_path=ckpt_path)
    return model, t, snap


def main() -> None:
    name, workdir = sys.argv[1], Path(sys.argv[2])
    result: dict[str, Any] = {}
    if name == "ddp":
        for mode, reference in (("init", "eager"), ("configure", "configure_eager")):
            eager, t, _ = run(name, reference, workdir)
            deferred, _, _ = run(name, mode, workdir)
            result[f"{mode}_losses_equal"] = deferred.losses == eager.losses
            result[f"{mode}_weights_equal"] = same(full(deferred), full(eager))
        result["steps"] = len(eager.losses)
        rank = str(t.global_rank)
    elif name == "ddp_spawn":
        deferred, t, _ = run(name, "init", workdir, callbacks=[SaveOnRank0(workdir)])
        # Only the main process gets here: the weights came back from rank 0
        # through load_state_dict(strict=False) on the (still deferred) model.
        on_rank0 = torch.load(workdir / "rank0.pt", weights_only=True)
        returned = {k: v for k, v in full(deferred).items() if "offset" not in k}
        result["meta_left"] = any(p.is_meta for p in deferred.parameters())
        result["returned_equal"] = same(returned, on_rank0)
        torch.manual_seed(0)
        initial = {f"model.{k}": v for k, v in full(net()).items() if "offset" not in k}
        result["trained"] = not same(returned, initial)
        rank = "main"
    else:
        torch.manual_seed(0)
        expected = {f"model.{k}": v for k, v in full(net()).items()}
        ckpt = ModelCheckpoint(dirpath=str(workdir / "ckpt"), save_last=True)
        for mode in ("init", "configure"):
            model, t, snap = run(
                name,
                mode,
                workdir,
                max_epochs=1,
                callbacks=[ckpt] if mode == "init" else [],
                enable_checkpointing=mode == "init",
            )
            result[f"{mode}_meta_left"] = snap.meta_left
            result[f"{mode}_setup_equals_eager"] = same(snap.snapshot, expected)
            result[f"{mode}_trained"] = bool(model.losses) and not same(full(model), expected)
            if mode == "init":
                trained = full(model)
        resumed, t, snap = run(
            name, "init", workdir, max_epochs=2, ckpt_path=str(workdir / "ckpt" / "last.ckpt")
        )
        # Non-persistent buffers are not in the checkpoint; they are replayed.
        result["resumed_equals_saved"] = same(snap.at_train_start, trained)
        result["resumed_steps"] = len(resumed.losses)
        result["resumed_epoch"] = t.current_epoch
        rank = str(t.global_rank)
    (workdir / f"result-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
