"""`lm.load_checkpoint` into an FSDP2 model that ran a forward, in real processes (gloo, CPU).

    python -m support.run_fsdp_load_after_forward WORLD WORKDIR   (with tests/ on PYTHONPATH)

Started without ``RANK`` in its environment, it starts WORLD copies of itself
and waits for them. Each rank shards `Llama` (FSDP2 per block and at the
root, ``reshard_after_forward`` default and ``False``), runs a ``no_grad``
forward (a validation pass: the root's parameters, or all of them, stay
unsharded), loads a torch file with ``lm.load_checkpoint`` (the whole model,
or only ``output``, whose parameter the root's group holds), then trains
three AdamW steps. The reference loads the same file with
``load_state_dict`` before sharding and trains the same steps. Every rank
writes WORKDIR/result-RANK.json: per case, both runs' losses and the names
whose ``full_tensor()`` differs after training.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import lightning_meta as lm
from support.mesh_models import Llama, batches, full, loss_of, unequal
from support.processes import end_without_finalizing, launch_ranks, run_main

end_without_finalizing()


def sharded(model: nn.Module, reshard_after_forward: bool | None) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if reshard_after_forward is not None:
        kwargs["reshard_after_forward"] = reshard_after_forward
    for layer in model.layers:  # type: ignore[union-attr]
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def train(model: nn.Module) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    losses = []
    for tokens, targets in batches():
        optimizer.zero_grad()
        loss = loss_of(model, tokens, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def case(path: Path, part: str, reshard_after_forward: bool | None) -> dict[str, Any]:
    state = torch.load(path, weights_only=True)
    torch.manual_seed(5)
    ref = Llama()
    (ref.get_submodule(part) if part else ref).load_state_dict(state)
    ref = sharded(ref, reshard_after_forward)
    ref_losses = train(ref)

    torch.manual_seed(5)
    model = sharded(Llama(), reshard_after_forward)
    with torch.no_grad():  # a validation pass before the load
        model(batches()[0][0])
    lm.load_checkpoint(model.get_submodule(part) if part else model, path)
    losses = train(model)
    return {"losses": losses, "ref": ref_losses, "unequal": unequal(full(model), full(ref))}


def worker(workdir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    whole, output = workdir / "whole.pt", workdir / "output.pt"
    if rank == 0:
        torch.manual_seed(0)
        source = Llama()
        torch.save(source.state_dict(), whole)
        torch.save(source.output.state_dict(), output)
    dist.barrier()
    result = {
        "whole_default": case(whole, "", None),
        "whole_no_reshard": case(whole, "", False),
        "output_default": case(output, "output", None),
    }
    (workdir / f"result-{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()


def main() -> None:
    world, workdir = int(sys.argv[1]), Path(sys.argv[2])
    if "RANK" not in os.environ:
        sys.exit(launch_ranks("support.run_fsdp_load_after_forward", world, str(workdir)))
    worker(workdir)


if __name__ == "__main__":
    run_main(main)
