"""Train TinyLM for three steps in real processes under DDP, FSDP2 or 2-D, and measure every rank.

    python -m support.run_estimate_ranks WORLD WORKDIR CONFIG [CONFIG ...]   (tests/ on PYTHONPATH)

Each CONFIG is a JSON object: ``{"strategy": "ddp" | "fsdp", "tp": 1, "ac": false,
"reshard": true, "mp": null | "bf16", "bucket_view": false, "broadcast": true, "batch": 4, "seq": 64,
"model": {TinyLM's keyword arguments}, "opt": "adamw" | "sgd"}``. WORLD ranks are
spawned (gloo, CPU); for every config each rank builds the model, wraps it
the way Lightning's ``DDPStrategy`` or a ``ModelParallelStrategy``'s
``configure_model`` does (``parallelize_module`` on the tensor-parallel mesh,
``fully_shard`` on every block and then the root, optionally
``checkpoint_wrapper`` first), runs five steps of Lightning's loop (forward,
loss, ``zero_grad``, backward, the optimizer's step), measures the third and the
fourth (the lower peak) with the allocator's own events
(:func:`support.measure_estimate_ranks.allocator_peak`) and the fifth with ``FlopCounterMode``. Rank R writes WORKDIR/result-R.json:
one entry per config with ``peak_bytes`` and ``forward_flops`` /
``backward_flops``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from support.measure_estimate_ranks import (
    PLAN,
    TinyLM,
    allocator_peak,
    first_loss,
    settled_collectives,
)
from support.processes import end_without_finalizing, run_main

end_without_finalizing()


def _wrap(model: TinyLM, config: dict[str, Any], world: int) -> nn.Module:
    if config.get("ac"):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block)
    if config["strategy"] == "ddp":
        return nn.parallel.DistributedDataParallel(
            model,
            gradient_as_bucket_view=config.get("bucket_view", False),
            broadcast_buffers=config.get("broadcast", True),
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    tp = config.get("tp", 1)
    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
    if tp > 1:
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        plan = {k: styles[v]() for k, v in PLAN.items()}
        plan = {k.removeprefix("blocks.*."): v for k, v in plan.items()}
        for block in model.blocks:
            inner = getattr(block, "_checkpoint_wrapped_module", block)
            parallelize_module(inner, mesh["tp"], plan)
    mp = config.get("mp")
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mp == "bf16"
        else MixedPrecisionPolicy()
    )
    reshard = config.get("reshard", True)
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"], mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh["dp"], mp_policy=policy)
    return model


def _steps(config: dict[str, Any], rank: int, world: int, window: Any) -> tuple[int, int]:
    """Build, wrap and train for five steps; the third and fourth inside ``window``, the fifth counted."""
    tp = config.get("tp", 1)
    batch, seq = config.get("batch", 4), config.get("seq", 64)
    torch.manual_seed(0)
    sizes = config.get("model", {})
    wrapped = _wrap(TinyLM(**sizes), config, world)
    optimizers = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    optimizer = optimizers[config.get("opt", "adamw")](wrapped.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank // tp)  # one batch per tensor-parallel group
    ids = torch.randint(0, sizes.get("vocab", 1024), (batch, seq), generator=generator)

    def step(counter: FlopCounterMode | None = None) -> tuple[int, int]:
        with counter if counter is not None else contextlib.nullcontext():
            out = wrapped(ids)
            loss = first_loss(out)
            forward = counter.get_total_flops() if counter is not None else 0
            optimizer.zero_grad(set_to_none=True)  # after the forward, as Lightning does
            loss.backward()
            total = counter.get_total_flops() if counter is not None else 0
            del out, loss
        optimizer.step()
        return forward, total - forward

    step()
    step()  # DDP rebuilds its buckets once, in the second forward: steady state after it
    for _ in range(2):  # the lower peak of two: see allocator_peak
        with window():
            step()
    return step(FlopCounterMode(display=False))


def _one(config: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    with allocator_peak() as window:
        forward, backward = _steps(config, rank, world, window)
        gc.collect()
    return {
        "config": config,
        "peak_bytes": window.result.peak_bytes,  # type: ignore[attr-defined]
        "start_bytes": window.result.start_bytes,  # type: ignore[attr-defined]
        "forward_flops": forward,
        "backward_flops": backward,
    }


def _worker(rank: int, world: int, workdir: str, configs: list[dict[str, Any]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world
    )
    with settled_collectives():
        results = [_one(config, rank, world) for config in configs]
    dist.barrier()
    Path(workdir, f"result-{rank}.json").write_text(json.dumps(results))


def main() -> None:
    world, workdir = int(sys.argv[1]), sys.argv[2]
    configs = [json.loads(c) for c in sys.argv[3:]]
    os.makedirs(workdir, exist_ok=True)
    torch.multiprocessing.spawn(_worker, args=(world, workdir, configs), nprocs=world, join=True)


if __name__ == "__main__":
    run_main(main)
