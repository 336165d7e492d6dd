"""Walk the Lightning lifecycle of `AllTemplates` under one strategy, in real processes.

    python -m support.run_strategy STRATEGY WORKDIR   (with tests/ on PYTHONPATH)

STRATEGY is `ddp`, `ddp_spawn` or `model_parallel` (FSDP2 with `fully_shard` in
`configure_model`), always 2 CPU processes with gloo. Rank 0 writes
WORKDIR/result.json, which the test reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_meta as lm
from support.lightning_models import AllTemplates, ShardedTemplates, loader, templates_are_meta
from support.processes import end_without_finalizing, run_main

end_without_finalizing()


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in model.state_dict().items():
        out[k] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
    return out


def trainer(strategy_name: str, workdir: Path, epochs: int) -> L.Trainer:
    strategy: Any = strategy_name
    if strategy_name == "model_parallel":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=epochs,
        default_root_dir=str(workdir),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0 if strategy_name != "model_parallel" else None,
        callbacks=[ModelCheckpoint(dirpath=str(workdir / "ckpt"), save_last=True)],
    )


def main() -> None:
    strategy, workdir = sys.argv[1], Path(sys.argv[2])
    L.seed_everything(0, verbose=False)
    cls = ShardedTemplates if strategy == "model_parallel" else AllTemplates
    model = cls()
    t = trainer(strategy, workdir, epochs=2)
    t.fit(model, loader(), loader())
    result: dict[str, Any] = {"fit_loss": float(t.callback_metrics["train_loss"])}
    result["validate"] = t.validate(model, loader(), verbose=False)[0]["val_loss"]
    result["test"] = t.test(model, loader(), verbose=False)[0]["test_loss"]
    predictions = t.predict(model, loader())
    result["predict_batches"] = len(predictions) if predictions is not None else None
    result["templates_meta_after_fit"] = templates_are_meta(model)

    # Resume from the last checkpoint for one more epoch.
    last = str(workdir / "ckpt" / "last.ckpt")
    resumed = cls()
    t2 = trainer(strategy, workdir, epochs=3)
    t2.fit(resumed, loader(), loader(), ckpt_path=last)
    # Read from the checkpoint: under ddp_spawn the main process' trainer is not updated.
    saved = torch.load(workdir / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    result["resumed_epoch"] = saved["epoch"]
    result["resumed_global_step"] = saved["global_step"]
    result["templates_meta_after_resume"] = templates_are_meta(resumed)
    state = full_state(resumed)
    if strategy == "model_parallel":
        # FSDP2 made the stacked tensors DTensors: member() gathers them (every
        # rank calls it) into a plain module that runs; apply() is refused.
        from torch.distributed.tensor import DTensor

        ens = resumed.ensemble
        member = ens.member(1)
        full = {k: v.full_tensor() for k, v in ens.tensors().items() if isinstance(v, DTensor)}
        plain = not any(isinstance(t, DTensor) for t in member.parameters())
        same = all(torch.equal(t, full[k][1]) for k, t in member.named_parameters())
        x = torch.randn(3, 6)
        runs = member(x).shape[0] == 3
        result["fsdp2_member_plain_equal_and_runs"] = plain and same and runs
        try:
            ens.apply(lambda m: None)
            result["fsdp2_apply"] = "ran"
        except lm.MetaTensorError as e:
            result["fsdp2_apply"] = type(e).__name__

    if t2.global_rank == 0:
        final = str(workdir / "ckpt" / "last.ckpt")
        # The plain class: load_from_checkpoint calls configure_model, and a
        # sharded module cannot take the full tensors of a consolidated file.
        loaded = AllTemplates.load_from_checkpoint(final)
        result["loaded_templates_meta"] = templates_are_meta(loaded)
        result["loaded_keys"] = sorted(loaded.state_dict())
        result["loaded_equals_trained"] = (
            all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
            and state.keys() == loaded.state_dict().keys()
        )
        x = torch.randn(5, 6)
        ens = loaded.ensemble.eval()
        ref = torch.stack([ens.member(i)(x) for i in range(len(ens))])
        result["ensemble_matches_members"] = bool(torch.allclose(ens(x), ref, atol=1e-6))
        (workdir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
