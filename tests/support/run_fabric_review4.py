"""Sharded deferred models with a seed per rank, in real processes (gloo, CPU).

    python -m support.run_fabric_review4 WORKDIR     (with tests/ on PYTHONPATH)
    python -m support.run_fabric_review4 4 WORKDIR

The first runs 2 ranks under Fabric, which launches the second by re-running
this module; the second starts 4 copies of itself, a 2x2 (data x tensor
parallel) mesh of plain torch.distributed. Every rank seeds
its generator with ``42 + rank`` (``fabric.seed_everything(42 + rank)``,
for data-augmentation diversity) before building the model, deferred and
eagerly, and compares the shards:

- tensor parallel (``parallelize_module``: colwise, rowwise with a
  ``Replicate`` bias) through ``fabric_setup``: refused, since eager's
  shards then depend on ``src_data_rank``, which the DTensor does not
  record; with one seed for construction (the fix the refusal names), and
  by hand with ``src_data_rank`` 0, ``None`` and 1, every shard is eager's;
- FSDP2 (``fully_shard`` on both ranks) through ``lm.materialize``: eager
  keeps each rank's own chunk of its own values;
- 2x2: tensor parallel, then ``fully_shard`` on the data parallel dimension
  (one layer plain FSDP2), seeded ``42 + data parallel rank`` (one seed per
  tensor parallel group): eager chunks each rank's own tensor parallel piece;
- ``precision="bf16-true"`` under FSDP2 with a float32 buffer built
  explicitly (a rotary ``inv_freq``), inside ``fabric.init_module()`` and
  outside: every parameter and buffer, dtype and values, equals eager's.

Every rank writes WORKDIR/result-RANK.json: per case, the parameter names
whose local shard differs from eager's, whether the outputs are equal, and
the ``Replicate`` parameters whose local values differ between the ranks.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.strategies import ModelParallelStrategy
from torch import nn

import lightning_meta as lm
from support.processes import end_without_finalizing, launch_ranks, run_main

end_without_finalizing()


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4), nn.Linear(4, 3))


def tensor_parallel(module: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {"0": ColwiseParallel(), "2": RowwiseParallel(), "3": ColwiseParallel()}
    return parallelize_module(module, mesh["tensor_parallel"], plan)


def data_parallel(module: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(module[0], mesh=mesh["data_parallel"])
    fully_shard(module, mesh=mesh["data_parallel"])
    return module


def local(module: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    module = getattr(module, "_original_module", None) or module
    return {
        k: (v.to_local() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in module.named_parameters()
    }


def replicated_apart(module: nn.Module) -> list[str]:
    """The ``Replicate`` parameters whose values differ between the ranks (an invalid DTensor)."""
    from torch.distributed.tensor import DTensor, Replicate

    module = getattr(module, "_original_module", None) or module
    apart = []
    for name, p in module.named_parameters():
        if isinstance(p, DTensor) and all(isinstance(q, Replicate) for q in p.placements):
            mine = p.to_local().detach().contiguous()
            theirs = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(theirs, mine)
            if not all(torch.equal(mine, t) for t in theirs):
                apart.append(name)
    return apart


def compare(fabric: L.Fabric, setup: Any, seed: int | None = None) -> dict[str, Any]:
    """``setup`` on a deferred and an eager model, both built with ``seed`` (default: this rank's)."""
    seed = 42 + fabric.global_rank if seed is None else seed
    fabric.seed_everything(seed, verbose=False)
    with lm.deferred_init():
        model = build()
    model = setup(model, deferred=True)
    fabric.seed_everything(seed, verbose=False)
    reference = setup(build(), deferred=False)
    got, expected = local(model), local(reference)
    x = torch.ones(2, 4)
    return {
        "shards_vs_eager": sorted(k for k in expected if not torch.equal(got[k], expected[k])),
        "output_equal": bool(torch.equal(model(x), reference(x))),
        "replicate_apart": replicated_apart(model),
        "eager_replicate_apart": replicated_apart(reference),
    }


class Rotary(nn.Module):
    """A model with a float32 buffer built explicitly (transformers' rotary ``inv_freq``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        steps = torch.arange(0, 4, 2, dtype=torch.int64).float() / 4
        self.register_buffer("inv_freq", 1.0 / (10000.0**steps), persistent=False)
        self.register_buffer("noise", torch.randn(4))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.inv_freq.repeat(2) + self.noise


def true_precision() -> dict[str, Any]:
    """``bf16-true`` under FSDP2: Fabric casts the model before ``parallelize_fn``."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def parallelize(module: nn.Module, mesh: Any) -> nn.Module:
        fully_shard(module, mesh=mesh["data_parallel"])
        return module

    strategy = ModelParallelStrategy(parallelize, data_parallel_size=2, tensor_parallel_size=1)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy, precision="bf16-true")
    fabric.launch()

    def state(module: nn.Module) -> dict[str, torch.Tensor]:
        named = [*module.named_parameters(), *module.named_buffers()]
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in named}

    out: dict[str, Any] = {}
    for where in ("init_module", "outside"):
        torch.manual_seed(0)
        with fabric.init_module() if where == "init_module" else nullcontext():
            with lm.deferred_init():
                model = Rotary()
            try:
                model = lm.fabric_setup(fabric, model)
            except lm.MetaTensorError as e:  # both ranks, before any collective
                out[where] = {"error": str(e)}
                continue
            torch.manual_seed(0)
            reference = fabric.setup(Rotary())
        got, expected = state(model), state(reference)
        x = torch.ones(2, 4, dtype=torch.bfloat16)
        out[where] = {
            "unequal": sorted(
                k
                for k in expected
                if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])
            ),
            "inv_freq": str(got["_forward_module.inv_freq"].dtype),
            "output_equal": bool(torch.equal(model(x), reference(x))),
        }
    return out


def load_replaying(fabric: L.Fabric, tp_mesh: Any, workdir: Path) -> dict[str, Any]:
    """``load_checkpoint`` into a tensor parallel deferred model, replaying what the file lacks.

    The file holds layers 0 and 3; layer 2 is replayed. With a seed per rank
    that replay is refused as ``materialize`` refuses it; with one seed its
    shards are eager's.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    from torch.distributed.tensor.parallel import parallelize_module as tp

    plan = {"0": ColwiseParallel(), "2": RowwiseParallel(), "3": ColwiseParallel()}
    path = workdir / f"partial-{fabric.global_rank}.pt"
    torch.manual_seed(0)
    torch.save({k: v for k, v in build().state_dict().items() if not k.startswith("2.")}, path)
    out: dict[str, Any] = {}
    for case, seed in (("seed per rank", 42 + fabric.global_rank), ("one seed", 42)):
        torch.manual_seed(seed)
        with lm.deferred_init():
            model = build()
        model = tp(model, tp_mesh, plan)
        try:
            lm.load_checkpoint(model, path, strict=False)
        except lm.MetaTensorError as e:
            out[case] = {"refused": list(e.paths), "message": str(e)}
            continue
        torch.manual_seed(seed)
        reference = tp(build(), tp_mesh, plan)
        got, expected = local(model), local(reference)
        out[case] = {
            "refused": None,
            "replayed_vs_eager": sorted(
                k for k in ("2.weight", "2.bias") if not torch.equal(got[k], expected[k])
            ),
        }
    return out


def mesh_2d(workdir: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    names = ("data_parallel", "tensor_parallel")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=names)
    seed = 42 + mesh["data_parallel"].get_local_rank()
    torch.manual_seed(seed)
    with lm.deferred_init():
        model = build()
    model = lm.materialize(data_parallel(tensor_parallel(model, mesh), mesh))
    torch.manual_seed(seed)
    reference = data_parallel(tensor_parallel(build(), mesh), mesh)
    got, expected = local(model), local(reference)
    x = torch.ones(2, 4)
    result = {
        "mesh_2d": {
            "shards_vs_eager": sorted(k for k in expected if not torch.equal(got[k], expected[k])),
            "output_equal": bool(torch.equal(model(x), reference(x))),
        }
    }
    (workdir / f"result-{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()


def main() -> None:
    if sys.argv[1].isdigit():
        workdir = Path(sys.argv[2])
        if "RANK" not in os.environ:
            sys.exit(launch_ranks("support.run_fabric_review4", int(sys.argv[1]), str(workdir)))
        mesh_2d(workdir)
        return
    workdir = Path(sys.argv[1])
    result: dict[str, Any] = {}

    strategy = ModelParallelStrategy(tensor_parallel, data_parallel_size=1, tensor_parallel_size=2)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()

    def through_fabric(model: nn.Module, deferred: bool) -> Any:
        return lm.fabric_setup(fabric, model) if deferred else fabric.setup(model)

    try:
        compare(fabric, through_fabric)
        result["refused"] = None
    except lm.MetaTensorError as e:
        result["refused"] = {"paths": list(e.paths), "message": str(e)}
    result["tensor_parallel"] = compare(fabric, through_fabric, seed=42)

    # One seed; rank 0 alone runs an op no parameter depends on (a log line).
    def rank_zero_logs() -> nn.Module:
        model = build()
        if fabric.global_rank == 0:
            torch.arange(3).sum()
        with torch.no_grad():
            model[3].bias.zero_()  # type: ignore[union-attr]  # recorded after it
        return model

    fabric.seed_everything(7, verbose=False)
    with lm.deferred_init():
        model = rank_zero_logs()
    model = lm.fabric_setup(fabric, model)
    fabric.seed_everything(7, verbose=False)
    reference = fabric.setup(rank_zero_logs())
    got, expected = local(model), local(reference)
    result["rank_zero_op"] = sorted(k for k in expected if not torch.equal(got[k], expected[k]))
    # One global seed, but a number or a generator that depends on the rank.
    rank = fabric.global_rank
    for case in ("rank_scalar", "rank_generator"):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(100 + rank)
        with lm.deferred_init():
            model = build()
            with torch.no_grad():
                if case == "rank_scalar":
                    model[2].weight.mul_(1.0 + rank)  # type: ignore[operator]
                else:
                    nn.init.normal_(model[3].weight, generator=gen)  # type: ignore[arg-type]
        try:
            lm.fabric_setup(fabric, model)
            result[case] = None
        except lm.MetaTensorError as e:
            result[case] = {"paths": list(e.paths), "message": str(e)}
    tp_mesh = fabric.strategy.device_mesh["tensor_parallel"]
    for src in (0, None, 1):

        def by_src(model: nn.Module, deferred: bool, src: int | None = src) -> nn.Module:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
            from torch.distributed.tensor.parallel import parallelize_module as tp

            plan = {"0": ColwiseParallel(), "2": RowwiseParallel(), "3": ColwiseParallel()}
            model = tp(model, tp_mesh, plan, src_data_rank=src)
            return lm.materialize(model, device=fabric.device) if deferred else model

        result[f"src_data_rank={src}"] = compare(fabric, by_src, seed=7)
    result["load"] = load_replaying(fabric, tp_mesh, workdir)

    strategy = ModelParallelStrategy(data_parallel, data_parallel_size=2, tensor_parallel_size=1)
    fsdp = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fsdp.launch()
    mesh = fsdp.strategy.device_mesh

    def by_hand(model: nn.Module, deferred: bool) -> nn.Module:
        model = data_parallel(model, mesh)
        return lm.materialize(model, device=fsdp.device) if deferred else model

    result["fsdp2"] = compare(fsdp, by_hand)
    result["bf16_true"] = true_precision()
    (workdir / f"result-{fabric.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
