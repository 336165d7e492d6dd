"""This rank's piece of a full tensor under ``_StridedShard`` placements, in real processes.

    python -m support.run_strided WORKDIR     (with tests/ on PYTHONPATH)

Starts 4 copies of itself (gloo, CPU). ``lm``'s piece (``_compat.local_shard``) must be
eager's: for ``fully_shard`` over tensor parallel (a 2x2 mesh), the piece eager
``parallelize_module`` then ``fully_shard`` keep, uneven splits included (torch 2.8's
``distribute_tensor`` gave another); for a ``_StridedShard`` laid out otherwise (a 1-D
mesh), the piece ``distribute_tensor`` gives. Writes WORKDIR/result-RANK.json: the cases
whose pieces differ.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lightning_meta import _compat
from support.processes import end_without_finalizing, launch_ranks, run_main

end_without_finalizing()


def main() -> None:
    if "RANK" not in os.environ:
        sys.exit(launch_ranks("support.run_strided", 4, sys.argv[1]))
    workdir = Path(sys.argv[2])
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from torch.distributed.tensor.placement_types import _StridedShard

    dist.init_process_group("gloo")
    apart = []
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    for rows in (6, 5, 3, 8):  # 6: 3 rows per TP rank, split 2 + 1 by FSDP
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, rows), nn.Linear(rows, 4))
        full = {k: v.detach().clone() for k, v in model.state_dict().items()}
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "1": RowwiseParallel()})
        fully_shard(model, mesh=mesh["dp"])
        for name, p in model.named_parameters():
            piece = _compat.local_shard(full[name], p.device_mesh, p.placements)
            if piece.shape != p.to_local().shape or not torch.equal(piece, p.to_local()):
                apart.append(f"fully_shard over TP, {rows} rows: {name} {list(p.placements)}")
    line = init_device_mesh("cpu", (4,))
    full = torch.arange(16.0).view(8, 2)
    placements = [_StridedShard(0, split_factor=2)]
    want = distribute_tensor(full, line, placements, src_data_rank=None).to_local()
    if not torch.equal(_compat.local_shard(full, line, placements), want):
        apart.append("1-D _StridedShard(0, split_factor=2)")
    (workdir / f"result-{dist.get_rank()}.json").write_text(json.dumps(apart))
    dist.barrier()


if __name__ == "__main__":
    run_main(main)
