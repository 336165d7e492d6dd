"""`lm.load_checkpoint` into a sharded deferred model, in real processes (gloo, CPU).

    python -m support.run_sharded_load WORLD WORKDIR   (with tests/ on PYTHONPATH)

Started without ``RANK`` in its environment, it starts WORLD copies of itself
(plain ``torch.distributed``, ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/
``WORLD_SIZE``) and waits for them. Each rank builds `Wide` under
``lm.deferred_init()``, shards it with FSDP2 (dim 0, or 2-D weights on dim 1),
and loads it from:

- a sharded safetensors directory (Hugging Face's ``save_torch_state_dict``
  with a small ``max_shard_size``: an index and several shards);
- a ``torch.distributed.checkpoint`` written by one process (one chunk per
  tensor), and one written by all WORLD ranks from the eager model sharded on
  dim 0 (one chunk per rank; loading it sharded on dim 1 crosses every chunk);
- a single float64 safetensors file lacking ``head.weight`` (``strict=False``:
  the values are cast, the missing shard replayed);
- a torch file (``torch.save`` of the state dict), sharded on dim 0 and dim 1.

For each load it records the names whose ``full_tensor()`` differs from
single-process eager construction with the same seed, the bytes the process
read during the call (``rchar`` of ``/proc/self/io``: every ``read``/``pread``
of the process), the bytes its shards need, and the bound it must stay under:
need + the structure of the files (index, headers, DCP metadata, a torch
file's bytes other than its storages' data, a fixed allowance per zip opened)
+ a fixed slack. It also records the refusals
of ``dtype=`` on sharded parameters and of a replay over a write made after sharding. Every rank writes WORKDIR/result-RANK.json.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import lightning_meta as lm
from support.mesh_models import full, unequal
from support.processes import end_without_finalizing, launch_ranks, run_main

end_without_finalizing()

DIM, HIDDEN, VOCAB, LAYERS = 128, 512, 512, 2
#: Bytes a rank may read per DCP item it opens beyond its box: the zip directory,
#: data.pkl and the 8 KiB read-ahead of the buffered reader that parses them.
PER_ITEM = 16 * 1024
#: Bytes a load may read whatever the checkpoint: format detection, /proc reads.
SLACK = 16 * 1024


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)


class Wide(nn.Module):
    """About 1.3 MB of float32 weights, every dimension divisible by 4."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.register_buffer("scale", torch.rand(DIM))  # persistent, left unsharded by FSDP2
        self.register_buffer("jitter", torch.randn(DIM), persistent=False)
        for block in self.blocks:
            nn.init.trunc_normal_(block.down.weight, std=0.02)


#: ``dim`` of :func:`shard` for tensor parallel (2 ranks) or a 2x2 data x tensor mesh (4 ranks).
TP = -1


def tensor_parallel(model: nn.Module) -> nn.Module:
    """The blocks' `up` column-wise, `down` row-wise and the head column-wise; then FSDP2 over dp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    for block in model.blocks:  # type: ignore[union-attr]
        parallelize_module(block, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    parallelize_module(model, mesh["tp"], {"head": ColwiseParallel()})
    if world > 2:
        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def shard(model: nn.Module, dim: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    if dim == TP:
        return tensor_parallel(model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def place(p: nn.Parameter) -> Shard:
        return Shard(dim if p.ndim > dim else 0)

    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh, shard_placement_fn=place)
    fully_shard(model, mesh=mesh, shard_placement_fn=place)
    return model


def eager() -> Wide:
    torch.manual_seed(0)
    return Wide()


def deferred(dim: int) -> nn.Module:
    torch.manual_seed(0)
    with lm.deferred_init():
        model = Wide()
    return shard(model, dim)


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def need(model: nn.Module, skip: set[str], itemsize: int = 4) -> int:
    """Bytes of the checkpoint this rank's tensors need: local shards, whole plain tensors."""
    from torch.distributed.tensor import DTensor

    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in skip or name == "jitter":
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * itemsize
    return total


def safetensors_structure(directory: Path) -> int:
    """The index, and the 8-byte length and JSON header of every shard (what every rank parses)."""
    total = 0
    for f in directory.iterdir():
        if f.name.endswith(".json"):
            total += 2 * f.stat().st_size
        elif f.suffix == ".safetensors":
            with f.open("rb") as fh:
                total += 8 + int.from_bytes(fh.read(8), "little") + 16
    return total


def dcp_structure(directory: Path, items: int) -> int:
    return (directory / ".metadata").stat().st_size + items * PER_ITEM


def torch_structure(path: Path) -> int:
    """Every byte of a torch zip file that is not a storage's data, and one item's read-ahead."""
    with zipfile.ZipFile(path) as z:
        data = sum(i.file_size for i in z.infolist() if "/data/" in i.filename)
    return path.stat().st_size - data + PER_ITEM


def write_checkpoints(workdir: Path, world: int) -> dict[str, Path]:
    import torch.distributed.checkpoint as dcp
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    rank = dist.get_rank()
    paths = {
        "safetensors": workdir / "hf",
        "dcp_one": workdir / "dcp-one",
        "dcp_ranks": workdir / "dcp-ranks",
        "float64_no_head": workdir / "f64.safetensors",
        "torch": workdir / "model.pt",
    }
    reference = eager()
    if rank == 0:
        state = reference.state_dict()
        paths["safetensors"].mkdir(exist_ok=True)
        save_torch_state_dict(state, paths["safetensors"], max_shard_size=400_000)
        dcp.save(state, checkpoint_id=paths["dcp_one"], no_dist=True)
        save_file(
            {k: v.double() for k, v in state.items() if k != "head.weight"},
            paths["float64_no_head"],
        )
        torch.save(state, paths["torch"])
    sharded_eager = shard(eager(), 0)
    dcp.save(sharded_eager.state_dict(), checkpoint_id=paths["dcp_ranks"])
    dist.barrier()
    return paths


def load_case(
    path: Path, dim: int, expected: dict[str, torch.Tensor], structure: int, **kwargs: Any
) -> dict[str, Any]:
    model = deferred(dim)
    skip = set() if kwargs.get("strict", True) else {"head.weight"}
    itemsize = 8 if path.suffix == ".safetensors" else 4
    before = rchar()
    report = lm.load_checkpoint(model, path, **kwargs)
    read = rchar() - before
    needed = need(model, skip, itemsize)
    return {
        "unequal": unequal(full(model), expected),
        "meta_left": [n for n, t in full(model).items() if t.is_meta],
        "rchar": read,
        "need": needed,
        "bound": needed + structure + SLACK,
        "report_bytes": report.bytes_read,
        "replayed": report.replayed,
        "cast": len(report.cast),
        "loaded": len(report.loaded),
    }


def wrapped_case(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    with lm.deferred_init():
        model = Wide()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)
    lm.load_checkpoint(shard(model, 0), path)
    loaded = {k.replace("_checkpoint_wrapped_module.", ""): t for k, t in full(model).items()}
    return {
        "unequal": unequal(loaded, expected),
        "meta_left": [n for n, t in loaded.items() if t.is_meta],
    }


def refusal(path: Path, write: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """``dtype=float64`` on the shards, or, with ``write``, a load after that parameter was
    written in place after sharding (``kwargs``: the load's)."""
    model = deferred(0)
    if write is not None:
        with torch.no_grad():
            model.get_parameter(write).mul_(0.5)
    try:
        lm.load_checkpoint(
            model, path, **(kwargs if write is not None else {"dtype": torch.float64})
        )
    except lm.MetaTensorError as e:
        unchanged = all(t.is_meta for t in [*model.parameters(), *model.buffers()])
        return {"error": type(e).__name__, "message": str(e), "unchanged": unchanged}
    return {"error": None}


def cast_before_sharding(path: Path) -> dict[str, Any]:
    """The deferred model cast to float64 before sharding, as the dtype= refusal says: the
    replaced ``jitter`` (in no checkpoint) is refused, not left on meta."""
    torch.manual_seed(0)
    with lm.deferred_init():
        model = Wide()
    model.to(torch.float64)
    shard(model, 0)
    try:
        lm.load_checkpoint(model, path)
    except lm.MetaTensorError as e:
        unchanged = all(t.is_meta for t in [*model.parameters(), *model.buffers()])
        return {"error": type(e).__name__, "message": str(e), "unchanged": unchanged}
    return {"error": None, "meta_left": [n for n, b in model.named_buffers() if b.is_meta]}


def undo_after_failure(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A failure after the shards went in (putting the replayed buffer, through the loader's
    test hook) puts every shard back on meta; loading again then gives the exact values."""
    from lightning_meta._load import _phases

    model = deferred(0)
    put = _phases._put

    def fail(slot: Any, tensor: torch.Tensor) -> None:
        raise RuntimeError("injected failure")

    _phases._put = fail
    try:
        lm.load_checkpoint(model, path)
        raised = False
    except lm.MetaTensorError:
        raised = True
    finally:
        _phases._put = put
    meta = all(p.is_meta for p in [*model.parameters(), *model.buffers()])
    lm.load_checkpoint(model, path)
    return {"raised": raised, "all_meta": meta, "unequal": unequal(full(model), expected)}


class Viewed(nn.Module):
    """Views of a loaded buffer, kept as a non-persistent buffer and as a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("table", torch.randn(3, 8))  # persistent: in the file
        self.register_buffer("first", self.table[0], persistent=False)
        self.row = self.table[1]


def views_of_loaded(workdir: Path) -> dict[str, Any]:
    """On a sharded model, views of a loaded plain buffer see the file's values, as unsharded.

    (The shard path replayed them from their record: the initial values, and
    a plain-attribute view was refused as a view of a tensor left deferred.)
    """
    from torch.distributed.fsdp import fully_shard

    path = workdir / "viewed.pt"
    if dist.get_rank() == 0:
        torch.manual_seed(5)
        torch.save({k: torch.randn_like(v) for k, v in Viewed().state_dict().items()}, path)
    dist.barrier()
    state = torch.load(path)
    torch.manual_seed(0)
    with lm.deferred_init():
        model = Viewed()
    fully_shard(model)
    try:
        report = lm.load_checkpoint(model, path)
    except lm.MetaTensorError as e:
        return {"error": str(e)}
    table = state["table"]
    return {
        "sharded": type(model.lin.weight).__name__,
        "table": torch.equal(model.table, table),
        "first": torch.equal(model.first, table[0]),
        "row": torch.equal(model.row, table[1]),
        "row_is_view": model.row.untyped_storage().data_ptr()
        == model.table.untyped_storage().data_ptr(),
        "replayed": report.replayed,
    }


def worker(world: int, workdir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    paths = write_checkpoints(workdir, world)
    expected = full(eager())
    st = safetensors_structure(paths["safetensors"])
    result: dict[str, Any] = {}
    # Not measured: the first load imports what a load imports.
    load_case(paths["safetensors"], 0, expected, st)
    result["safetensors_dim0"] = load_case(paths["safetensors"], 0, expected, st)
    result["safetensors_dim1"] = load_case(paths["safetensors"], 1, expected, st)
    tensors = len(expected) - 1  # jitter is not in checkpoints
    result["dcp_one_dim1"] = load_case(
        paths["dcp_one"], 1, expected, dcp_structure(paths["dcp_one"], tensors)
    )
    result["dcp_ranks_dim0"] = load_case(
        paths["dcp_ranks"], 0, expected, dcp_structure(paths["dcp_ranks"], tensors)
    )
    # Every rank's dim-1 box meets every rank's dim-0 chunk of a 2-D weight.
    result["dcp_ranks_dim1"] = load_case(
        paths["dcp_ranks"], 1, expected, dcp_structure(paths["dcp_ranks"], tensors * world)
    )
    # Tensor parallel (2 ranks: the embedding and norms stay plain, read whole) or
    # a 2x2 mesh (4 ranks: FSDP2 over TP shards, strided placements).
    result["safetensors_tp"] = load_case(paths["safetensors"], TP, expected, st)
    result["dcp_ranks_tp"] = load_case(
        paths["dcp_ranks"], TP, expected, dcp_structure(paths["dcp_ranks"], tensors * world)
    )
    f64 = paths["float64_no_head"]
    result["float64_no_head"] = load_case(
        f64, 0, expected, 8 + int.from_bytes(f64.read_bytes()[:8], "little") + 16, strict=False
    )
    result["refused_dtype"] = refusal(paths["safetensors"])
    # A write after sharding to a tensor the file lacks would be lost by its replay.
    result["refused_written"] = refusal(f64, write="head.weight", strict=False)
    result["undo"] = undo_after_failure(paths["safetensors"], expected)
    result["cast_before_sharding"] = cast_before_sharding(paths["safetensors"])
    # Torch files: the box's bytes of each tensor (row-major in its own storage).
    ts = torch_structure(paths["torch"])
    result["torch_dim0"] = load_case(paths["torch"], 0, expected, ts)
    result["torch_dim1"] = load_case(paths["torch"], 1, expected, ts)
    # Activation checkpointing under FSDP2 (torchtitan's layout): checkpoint_wrapper's load
    # pre-hook made the loader deep-copy the model, which FSDP2 refuses.
    result["dcp_ranks_wrapped"] = wrapped_case(paths["dcp_ranks"], expected)
    # Real (already materialized) shards are copied into in place.
    torch.manual_seed(1)
    real = shard(Wide(), 0)
    lm.load_checkpoint(real, paths["safetensors"])
    # (its non-persistent jitter is its own: seed 1, not in any checkpoint)
    differ = [n for n in unequal(full(real), expected) if n != "jitter"]
    result["real_shards"] = {"unequal": differ, "meta_left": []}
    # The baseline: the same files into the unsharded deferred model (every rank reads all).
    for name in ("safetensors", "dcp_one", "dcp_ranks", "torch"):
        torch.manual_seed(0)
        with lm.deferred_init():
            whole = Wide()
        before = rchar()
        lm.load_checkpoint(whole, paths[name])
        result[f"unsharded_{name}"] = {"rchar": rchar() - before}
    result["views_of_loaded"] = views_of_loaded(workdir)
    result["total_bytes"] = sum(t.numel() * 4 for k, t in expected.items() if k != "jitter")
    (workdir / f"result-{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()


def main() -> None:
    world, workdir = int(sys.argv[1]), Path(sys.argv[2])
    if "RANK" not in os.environ:
        sys.exit(launch_ranks("support.run_sharded_load", world, str(workdir)))
    worker(world, workdir)


if __name__ == "__main__":
    run_main(main)
