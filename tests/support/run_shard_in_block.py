"""Shard inside a ``deferred_init`` block in a real one-rank process group (gloo, CPU).

    python -m support.run_shard_in_block WORKDIR   (tests/ on PYTHONPATH)

Each way of sharding first runs eagerly (it works), then inside a block; the
refusal's message is written to WORKDIR/result.json, by case.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import lightning_meta as lm
from support.processes import run_main


def main() -> None:
    workdir = Path(sys.argv[1])
    dist.init_process_group("gloo", init_method=f"file://{workdir / 'store'}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    cases = {
        "fully_shard": lambda: fully_shard(nn.Linear(4, 4), mesh=mesh),
        "parallelize_module": lambda: parallelize_module(nn.Linear(4, 4), mesh, ColwiseParallel()),
        "distribute_tensor": lambda: distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]),
        "broadcast": lambda: dist.broadcast(torch.zeros(3), 0),
    }
    messages = {}
    for name, shard in cases.items():
        shard()
        try:
            with lm.deferred_init():
                shard()
            messages[name] = None
        except lm.MaterializationError as e:
            messages[name] = str(e)
    (workdir / "result.json").write_text(json.dumps(messages))
    dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
