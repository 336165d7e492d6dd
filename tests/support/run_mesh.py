"""Deferred `mesh_models.Llama` on every mesh of one world size, in real processes (gloo, CPU).

    python -m support.run_mesh WORLD WORKDIR [--nodes]   (with tests/ on PYTHONPATH)

WORLD is 1, 2 or 4 processes; Fabric launches them by re-running this module.
With `--nodes`, every Fabric and Trainer spans `num_nodes=2`: the caller
starts this module twice, with NODE_RANK 0 and 1 and MASTER_ADDR/MASTER_PORT
set, as a cluster would. Every mesh of the world size is checked in the same
processes (one launch per world size):

- 1, 2, 4: FSDP2 (`fully_shard` per block and at the root, data parallel);
- 1, 2, 4: `mesh_models.Tied` (tied weights, uneven and empty shards) under
  FSDP2, through `fabric_setup` and public `materialize`;
- 1: what public `materialize` and `fabric_setup` refuse on sharded models
  (a `Partial` placement; the standalone `lightning_fabric` package too);
- 2: FSDP2 sharding 2-D weights on dim 1; tensor parallel size 2 (the Llama
  plan) under Fabric and under the Trainer with MetaGuard; DDP with the
  optimizer built before `fabric_setup`;
- 4: a 2x2 mesh (data x tensor parallel) under Fabric and the Trainer.

For each, the model built under `lm.deferred_init()` must have `full_tensor()`
of every parameter and buffer equal to single-process eager construction with
the same seed right after setup, and three SGD steps must give the same
losses and weights as the eager-built model under the same strategy. Every
rank writes WORKDIR/result-RANK.json: for each mesh, the names that differ
(empty lists pass) and the losses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.strategies import ModelParallelStrategy
from torch import nn

import lightning_meta as lm
from support.mesh_models import (
    Llama,
    Tied,
    batches,
    data_parallel,
    deferred,
    eager,
    full,
    parallelize,
    shard_tied,
    tensor_parallel,
    train,
    trainer_module,
    unequal,
)
from support.processes import end_without_finalizing, run_main

end_without_finalizing()

MESHES = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 4: [(4, 1), (2, 2)]}


def compare(fabric: L.Fabric, expected: dict[str, torch.Tensor], setup: Any) -> dict[str, Any]:
    """`setup(model)` on a deferred and an eager model; what differs, before and after training."""
    model = setup(deferred())
    out: dict[str, Any] = {
        "meta_left": [n for n, t in full(model).items() if t.is_meta],
        "setup_vs_eager": unequal(full(model), expected),
        "deferred_losses": train(fabric, model),
    }
    reference = setup(eager(), plain=True)
    out["eager_losses"] = train(fabric, reference)
    out["trained_vs_eager_trained"] = unequal(full(model), full(reference))
    return out


# With --nodes, every Fabric and Trainer of the run spans this many node
# processes (started by the test with NODE_RANK set, as a cluster would).
NODES = 2 if "--nodes" in sys.argv else 1


def model_parallel(
    dp: int, tp: int, nodes: int = NODES, parallelize_fn: Any = parallelize
) -> tuple[L.Fabric, Any]:
    strategy = ModelParallelStrategy(parallelize_fn, data_parallel_size=dp, tensor_parallel_size=tp)
    fabric = L.Fabric(
        accelerator="cpu", devices=dp * tp // nodes, num_nodes=nodes, strategy=strategy
    )
    fabric.launch()

    def setup(model: nn.Module, plain: bool = False) -> Any:
        return fabric.setup_module(model) if plain else lm.fabric_setup(fabric, model)

    return fabric, setup


def with_trainer(dp: int, tp: int, expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The Trainer and MetaGuard, `configure_model` building and parallelizing (tensor parallel)."""
    from lightning.pytorch.strategies import ModelParallelStrategy as TrainerModelParallel

    runs = {}
    for deferred_ in (True, False):
        module = trainer_module(deferred_)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=dp * tp // NODES,
            num_nodes=NODES,
            strategy=TrainerModelParallel(data_parallel_size=dp, tensor_parallel_size=tp),
            max_steps=3,
            callbacks=[lm.MetaGuard()] if deferred_ else [],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, torch.utils.data.DataLoader(batches(), batch_size=None))
        runs[deferred_] = module
    deferred_run, eager_run = runs[True], runs[False]
    return {
        "setup_vs_eager": unequal(deferred_run.at_start, expected),
        "deferred_losses": deferred_run.losses,
        "eager_losses": eager_run.losses,
        "trained_vs_eager_trained": unequal(full(deferred_run.model), full(eager_run.model)),
    }


def tied(world: int) -> dict[str, Any]:
    """`Tied` (a shared DTensor, uneven and empty shards) under FSDP2: fabric_setup and materialize."""
    expected = full(eager(Tied))
    fabric, _ = model_parallel(world, 1, parallelize_fn=shard_tied)
    model = lm.fabric_setup(fabric, deferred(Tied))
    model = getattr(model, "_original_module", None) or model
    # The tie kept is one entry: a broken one would list head.weight on its own.
    broken = [] if model.head.weight is model.emb.weight else ["fabric_setup: tie broken"]
    direct = shard_tied(deferred(Tied), fabric.strategy.device_mesh)
    lm.materialize(direct, device=fabric.device)
    broken += [] if direct.head.weight is direct.emb.weight else ["materialize: tie broken"]
    # FSDP2 splits dim 0 as torch.chunk does: uneven above 1 rank, empty past the last chunk.
    chunks = [torch.arange(7).chunk(world), torch.arange(1).chunk(world)]
    want = [len(c[fabric.global_rank]) if fabric.global_rank < len(c) else 0 for c in chunks]
    got = [p.to_local().shape[0] for p in (direct.emb.weight, direct.scale)]
    broken += [] if got == want else [f"local rows {got}, expected {want}"]
    return {
        "setup_vs_eager": unequal(full(model), expected)
        + [f"materialize: {n}" for n in unequal(full(direct), expected)]
        + broken
    }


def refusals() -> dict[str, Any]:
    """What public `materialize` and `fabric_setup` refuse on sharded models, and that nothing changed."""
    fabric, _ = model_parallel(1, 1)
    mesh = fabric.strategy.device_mesh["data_parallel"]
    out: dict[str, Any] = {}

    def attempt(name: str, model: nn.Module, call: Any) -> None:
        try:
            call()
        except lm.MetaTensorError as e:
            still_meta = all(t.is_meta for t in [*model.parameters(), *model.buffers()])
            out[name] = {
                "error": type(e).__name__,
                "message": str(e),
                "unchanged": still_meta,
                "parameters_meta": all(p.is_meta for p in model.parameters()),
            }
        else:
            out[name] = {"error": None}

    model = deferred()
    data_parallel(model, mesh)
    attempt("dtype", model, lambda: lm.materialize(model, dtype=torch.float64))
    with torch.device("meta"):
        torch.manual_seed(0)
        stray = Llama()
    data_parallel(stray, mesh)
    attempt("stray", stray, lambda: lm.materialize(stray))
    attempt("stray_fallback", stray, lambda: lm.materialize(stray, fallback="reset_parameters"))
    # fabric.init_module(empty_init=True) under ModelParallelStrategy is a meta device context.
    torch.manual_seed(0)
    with fabric.init_module(empty_init=True), lm.deferred_init():
        on_meta = Llama()
    attempt("meta_context", on_meta, lambda: lm.fabric_setup(fabric, on_meta))
    model = deferred()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attempt("optimizer_first", model, lambda: lm.fabric_setup(fabric, model, opt))
    # A Partial placement (pending sums): no slice of the full tensor gives it.
    from torch.distributed.tensor import DTensor, Partial

    partial = deferred(Tied)
    local = torch.empty(1, device="meta")
    partial.scale = nn.Parameter(DTensor.from_local(local, mesh, [Partial()], run_check=False))
    attempt("partial", partial, lambda: lm.materialize(partial))
    # The standalone lightning_fabric package's strategies are recognised too.
    import lightning_fabric

    strategy = lightning_fabric.strategies.ModelParallelStrategy(parallelize, 1, 1)
    standalone = lightning_fabric.Fabric(accelerator="cpu", devices=1, strategy=strategy)
    standalone.launch()
    model = deferred()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attempt("standalone_package", model, lambda: lm.fabric_setup(standalone, model, opt))
    # An initialisation after sharding writes the meta DTensors, which a
    # replay would lose (it was lost without an error): FSDP2 and materialize,
    model = deferred()
    data_parallel(model, mesh)
    with torch.no_grad():
        model.layers[0].attention.wq.weight.mul_(0.5)  # type: ignore[index, union-attr]
    attempt("written_after_fully_shard", model, lambda: lm.materialize(model))
    # Through the local shard, by an op or a foreach op: lost without an error before the
    # hostile review of 2026-12-05.
    model = deferred()
    data_parallel(model, mesh)
    with torch.no_grad():
        model.layers[0].attention.wq.weight.to_local().zero_()  # type: ignore[index, union-attr]
    attempt("written_to_local", model, lambda: lm.materialize(model))
    model = deferred()
    data_parallel(model, mesh)
    with torch.no_grad():
        torch._foreach_mul_([model.output.weight.to_local()], 0.0)  # type: ignore[union-attr]
    attempt("written_by_foreach", model, lambda: lm.materialize(model))

    # and tensor parallel in a parallelize_fn, then fabric_setup.
    def parallelize_then_init(module: nn.Module, mesh: Any) -> nn.Module:
        tensor_parallel(module, mesh["tensor_parallel"])
        with torch.no_grad():
            nn.init.zeros_(module.output.weight)  # type: ignore[arg-type, union-attr]
        return module

    tp_fabric, _ = model_parallel(1, 1, parallelize_fn=parallelize_then_init)
    model = deferred()
    attempt("written_in_parallelize_fn", model, lambda: lm.fabric_setup(tp_fabric, model))
    # Plain fabric.setup, no fabric_setup: Lightning fills the sharded model with
    # to_empty() and reset_parameters() (uninitialised memory, other draws than eager's),
    # which trained without an error before the eighth session's review; refused at the
    # first deferred tensor it empties (the root's buffer, here).
    plain_fabric, _ = model_parallel(1, 1)
    model = deferred()
    attempt("plain_setup", model, lambda: plain_fabric.setup(model))
    # what to_empty() emptied before the refusal (every sharded parameter) is refused
    # too: materialize kept it, uninitialised, as no longer deferred
    attempt("after_plain_setup", model, lambda: lm.materialize(model))
    return out


def main() -> None:
    world, workdir = int(sys.argv[1]), Path(sys.argv[2])
    expected = full(eager())
    result: dict[str, Any] = {"tied": tied(world)}
    for dp, tp in MESHES[world]:
        fabric, setup = model_parallel(dp, tp)
        result[f"dp{dp}_tp{tp}"] = compare(fabric, expected, setup)
    if world == 1:
        result["refusals"] = refusals()
        # Inside fabric.init_module() (no empty_init): the precision's dtype, no meta context.
        fabric, _ = model_parallel(1, 1)
        torch.manual_seed(0)
        with fabric.init_module(), lm.deferred_init():
            model = Llama()
        model = lm.fabric_setup(fabric, model)
        result["init_module"] = {"setup_vs_eager": unequal(full(model), expected)}

        # The documented alternative: materialize as the last step of parallelize_fn.
        def parallelize_and_materialize(module: nn.Module, mesh: Any) -> nn.Module:
            lm.materialize(parallelize(module, mesh), device=torch.device("cpu"))
            return module

        strategy = ModelParallelStrategy(parallelize_and_materialize, 1, 1)
        own = L.Fabric(accelerator="cpu", devices=1, strategy=strategy)
        own.launch()
        model = own.setup_module(deferred())
        result["own_parallelize_fn"] = {"setup_vs_eager": unequal(full(model), expected)}
    if world in (2, 4):
        result[f"trainer_dp{world // 2}_tp2"] = with_trainer(world // 2, 2, expected)
    if world == 2:
        # FSDP2 sharding 2-D weights on dim 1 (materialize only: no training).
        fabric, _ = model_parallel(2, 1)
        model = deferred()
        data_parallel(model, fabric.strategy.device_mesh["data_parallel"], shard_dim=1)
        lm.materialize(model, device=fabric.device)
        result["dp2_shard1"] = {"setup_vs_eager": unequal(full(model), expected)}
        # DDP, optimizer built on the deferred parameters (the natural Fabric code).
        ddp = L.Fabric(accelerator="cpu", devices=2 // NODES, num_nodes=NODES, strategy="ddp")
        ddp.launch()
        model = deferred()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model, opt = lm.fabric_setup(ddp, model, opt)
        ddp_result = {"setup_vs_eager": unequal(full(model), expected)}
        ddp_result["deferred_losses"] = train(ddp, model, opt)
        ref = eager()
        ref, ref_opt = ddp.setup(ref, torch.optim.SGD(ref.parameters(), lr=0.5))
        ddp_result["eager_losses"] = train(ddp, ref, ref_opt)
        ddp_result["trained_vs_eager_trained"] = unequal(full(model), full(ref))
        result["ddp"] = ddp_result
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    (workdir / f"result-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
