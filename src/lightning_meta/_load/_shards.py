"""Load a checkpoint into sharded parameters (``DTensor``): each rank reads only its own shard.

A module whose parameters ``fully_shard`` (FSDP2) or ``parallelize_module``
(tensor parallel) turned into ``DTensor`` s holds, on each rank, one box of
every global tensor (offsets and sizes, as ``torch.distributed.checkpoint``
plans its reads). :func:`load_into_shards` runs the phases of
:func:`~lightning_meta._load._checkpoint.load_checkpoint` for those tensors:
check (placements, device, dtype) before anything is read; read each box
straight from the file (safetensors, and torch files whose tensor is laid
out row-major in its storage: the byte runs of the box; a distributed
checkpoint: the runs of the box inside every stored chunk it meets; other
views in torch files: the whole tensor, then the box); replay, shard by shard, the deferred
ones the checkpoint lacks; then allocate the local shards (through the
module's ``_apply``, so FSDP2 re-registers them) and copy each box in. The
other tensors of the module go through the plain phases unchanged.

Every rank reads the bytes of its own boxes and the structure of the files
it opens (headers, a distributed checkpoint's metadata and the zip structure
of the items it reads), nothing else; no collective runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_meta import _compat
from lightning_meta._compat import is_dtensor
from lightning_meta._deferred._handles import forget, lone_module
from lightning_meta._deferred._materialize import (
    SHARDED_CAST_FIX,
    ShardedSlot,
    check_same_replays,
    materialize,
    materialize_beyond,
    refuse_written_shards,
    sharded_slots,
)
from lightning_meta._errors import MaterializationError, MetaTensorError
from lightning_meta._load import _phases
from lightning_meta._load._files import Reader, Region, corrupt
from lightning_meta._load._match import Group, Plan
from lightning_meta._load._report import LoadReport
from lightning_meta._load._sharded import DcpSource
from lightning_meta._load._source import (
    CompositeSource,
    Entry,
    SafetensorsSource,
    Source,
    TorchSource,
)
from lightning_meta._load._torchfile import (
    TensorRef,
    check_storage_bounds,
    open_archive,
    tensor_from,
)
from lightning_meta._slots import Slot

__all__ = [
    "Box",
    "ShardTarget",
    "box_runs",
    "has_sharded",
    "is_sharded",
    "load_into_shards",
    "reshard_fsdp",
]

Box = tuple[tuple[int, ...], tuple[int, ...]]


def is_sharded(t: torch.Tensor | None) -> bool:
    """Whether ``t`` is a ``DTensor`` (without importing ``torch.distributed`` when none is)."""
    return t is not None and is_dtensor(t)


def reshard_fsdp(module: nn.Module) -> None:
    """Reshard every FSDP2 parameter group with parameters in ``module``'s tree, as ``load_state_dict`` does first.

    A forward leaves unsharded parameters registered in the module (the
    root's after a ``no_grad`` forward, every group's with
    ``reshard_after_forward=False``): plain tensors that FSDP2 frees at the
    next reshard, so values loaded into them would be lost. FSDP2's own load
    pre-hooks (which the plan leaves out, :mod:`~lightning_meta._load._hooks`)
    reshard first; run here before planning, the plan sees the sharded
    DTensors and each rank loads its shards. Like those hooks, this stays
    done if the load is then refused: the values are the same, only the
    all-gathered copies are freed (the next forward gathers them again).
    """
    for mod in module.modules():
        for reshard in _compat.fsdp_reshard_hooks(mod):
            reshard()


def has_sharded(plan: Plan) -> bool:
    """Whether any tensor of the planned module is a ``DTensor``."""
    return any(is_sharded(g.tensor) for g in plan.groups)


@dataclass
class ShardTarget:
    """One sharded tensor to fill: its group, its box, and where its values come from.

    ``entry`` is the checkpoint tensor read (``None``: replayed from ``deferred``).
    ``local`` is the box's values once read or replayed, in ``dtype``.
    """

    group: Group
    box: Box
    device: torch.device
    dtype: torch.dtype
    entry: Entry | None = None
    deferred: ShardedSlot | None = None
    local: torch.Tensor | None = None

    @property
    def dtensor(self) -> Any:
        """The ``DTensor`` the module holds now."""
        return self.group.tensor


def load_into_shards(
    module: nn.Module,
    source: Source,
    plan: Plan,
    where: str,
    args: _phases.Arguments,
    *,
    progress: bool,
    verify: bool,
    mapped: bool,
    allow_uninitialized: bool = False,
) -> LoadReport:
    """Finish :func:`~lightning_meta._load._checkpoint.load_checkpoint` for a module holding DTensors.

    Args:
        module: the module being filled.
        source: the opened checkpoint.
        plan: the full plan (sharded and plain tensors).
        where: the checkpoint as the caller named it.
        args: the checked arguments.
        progress: show a progress bar over the plain tensors' bytes.
        verify: check CRC-32s (a distributed checkpoint's items are then read whole).
        mapped: map the plain tensors' files; boxes are always read into
            memory the process owns (a box is rarely contiguous in the file).
        allow_uninitialized: see :func:`~lightning_meta.load_checkpoint`.

    Returns:
        The report; ``bytes_read`` counts the bytes of every box read.

    Raises:
        MetaTensorError: as :func:`~lightning_meta._load._checkpoint.load_checkpoint`,
            and for a sharded tensor that cannot be filled exactly (a
            ``Partial`` placement, a local shard that is not one box, a
            ``dtype`` or ``device`` the shard cannot take). The module is
            unchanged when it raises.
    """
    loaded = [(g, e) for g, e in plan.load if is_sharded(g.tensor)]
    rest = dataclasses.replace(
        plan, load=[(g, e) for g, e in plan.load if not is_sharded(g.tensor)]
    )
    covered = {*plan.loaded_names, *plan.skipped_names}
    groups = {id(g.tensor): g for g in plan.groups}
    missing = [
        s for s in sharded_slots(module) if s.path not in covered and id(s.dtensor) in groups
    ]
    # What the checkpoint fills overwrites a write after sharding, as eager's
    # load does; what it lacks is replayed, which would lose one.
    refuse_written_shards(missing, doing="load_checkpoint (replaying what the checkpoint lacks)")
    targets = [_target(g, args, entry=e) for g, e in loaded]
    targets += [_target(groups[id(s.dtensor)], args, deferred=s) for s in missing]
    bytes_read = _read_boxes(source, [t for t in targets if t.entry is not None], verify)
    conversion = _phases.convert(
        source,
        rest,
        device=args.device,
        dtype=args.dtype,
        progress=progress,
        label=where.rsplit("/", 1)[-1],
        verify=verify,
        mapped=mapped,
    )
    replaying = [t for t in targets if t.deferred is not None]
    if replaying:  # the same on every rank: the same model and checkpoint
        # Replays of tensor parallel parameters must agree across the mesh,
        # as materialize checks (eager slices the src_data_rank's tensor).
        check_same_replays(
            [t.deferred for t in replaying if t.deferred is not None],
            replaying[0].device,
            "cpu",
            doing="load_checkpoint (replaying what the checkpoint lacks)",
        )
    for t in replaying:
        t.local = _replay_box(t, allow_uninitialized)
    replay = _phases.replay_missing(
        module,
        rest,
        device=args.device,
        dtype=args.dtype,
        # Views of the plain tensors loaded here see their loaded values, as on
        # an unsharded model.
        loaded=conversion.tensors,
        allow_uninitialized=allow_uninitialized,
    )
    plain = dataclasses.replace(rest, groups=[g for g in rest.groups if not is_sharded(g.tensor)])
    others = _phases.convert_rest(plain, device=args.device, dtype=args.dtype)
    undo = _put_boxes(module, targets)
    try:
        filled = _phases.swap_in([*conversion.tensors, *others], replay, plan.made)
    except BaseException:
        undo()
        raise
    sharded_names = [n for t in targets for n in t.group.names]
    forget(module, [*filled, *replay.names, *sharded_names])
    beyond = materialize_beyond(module, allow_uninitialized=allow_uninitialized)
    conversion.bytes_read += bytes_read
    conversion.cast += [
        n for t in targets if t.entry and t.entry.dtype != t.dtype for n in t.group.names
    ]
    replayed = sorted(
        {*replay.names, *beyond, *(n for t in targets if t.deferred for n in t.group.names)}
    )
    return _phases.make_report(module, where, source, plan, conversion, replayed)


def _refuse(group: Group, problem: str, fix: str) -> MetaTensorError:
    return MetaTensorError(
        f"cannot load {group.names[0]!r}, a sharded DTensor: {problem}. Nothing in the module "
        f"was changed. Fix: {fix}.",
        paths=group.names,
    )


def _target(
    group: Group,
    args: _phases.Arguments,
    *,
    entry: Entry | None = None,
    deferred: ShardedSlot | None = None,
) -> ShardTarget:
    """Check that ``group``'s DTensor can take an exact shard, and return its target."""
    from torch.distributed.tensor import Partial

    dt: Any = group.tensor
    if any(isinstance(p, Partial) for p in dt.placements):
        raise _refuse(
            group,
            f"its placements {tuple(dt.placements)} include Partial (pending sums), which no "
            "slice of the checkpoint tensor gives",
            "shard or replicate it (Shard/Replicate placements) before loading",
        )
    mesh_type = str(dt.device_mesh.device_type)
    device = dt.device if not dt.is_meta else (args.device or torch.device("cpu"))
    if (args.device is not None and args.device.type != mesh_type) or device.type != mesh_type:
        raise _refuse(
            group,
            f"it lives on a {mesh_type} device mesh but the load targets "
            f"{str(args.device or device)!r}",
            "pass this rank's device of the mesh's type, e.g. device=fabric.device",
        )
    want = dt.dtype
    if args.dtype is not None and dt.is_floating_point() and args.dtype != dt.dtype:
        raise _refuse(
            group,
            f"load_checkpoint(dtype={args.dtype}) cannot cast it: its dtype {dt.dtype} was "
            "fixed when it was sharded",
            SHARDED_CAST_FIX,
        )
    box = _compat.local_box(dt)
    local_shape = tuple(dt.to_local().shape)
    if box is None or box[1] != local_shape:
        raise _refuse(
            group,
            f"its local shard {list(local_shape)} is not one box of the global tensor "
            f"{list(dt.shape)} (placements {tuple(dt.placements)})",
            "shard it with Shard/Replicate placements, as fully_shard and the tensor parallel "
            "styles do",
        )
    return ShardTarget(group, box, device, want, entry=entry, deferred=deferred)


# -- reading boxes ---------------------------------------------------------------


def box_runs(shape: tuple[int, ...], box: Box, itemsize: int) -> list[tuple[int, int]]:
    """Return the byte runs ``[start, stop)`` of the row-major tensor ``shape`` that ``box`` covers.

    In order, adjacent runs merged: the box's values are the runs' bytes
    concatenated. A box spanning whole trailing dimensions is one run per
    index of the dimensions before them.
    """
    offsets, sizes = box
    if any(s == 0 for s in sizes):
        return []
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    cut = max((d for d in range(len(shape)) if sizes[d] != shape[d]), default=-1)
    if cut < 0:
        return [(0, math.prod(shape) * itemsize)]
    run = sizes[cut] * strides[cut] * itemsize
    runs: list[tuple[int, int]] = []
    outer = [range(offsets[d], offsets[d] + sizes[d]) for d in range(cut)]
    for index in itertools.product(*outer):
        start = (
            sum(i * s for i, s in zip(index, strides, strict=False)) + offsets[cut] * strides[cut]
        ) * itemsize
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], start + run)
        else:
            runs.append((start, start + run))
    return runs


def _read_runs(
    reader: Reader, region: Region, base: int, runs: list[tuple[int, int]]
) -> torch.Tensor:
    """Read ``runs`` (bytes from ``base`` in ``region``) into one ``uint8`` tensor."""
    out = torch.empty(sum(b - a for a, b in runs), dtype=torch.uint8)
    if reader.verify and region.crc is not None:
        # The CRC covers the whole record: read it once (checked), then slice.
        whole = reader.read(region)
        at = 0
        for a, b in runs:
            out[at : at + b - a] = whole[base + a : base + b]
            at += b - a
        return out
    at = 0
    for a, b in runs:
        out[at : at + b - a] = reader.read(region, base + a, base + b)
        at += b - a
    return out


def _read_box_runs(
    reader: Reader,
    region: Region,
    base: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    box: Box,
) -> torch.Tensor:
    """Read ``box`` of the row-major ``shape`` tensor at byte ``base`` of ``region``, as ``dtype``."""
    data = _read_runs(reader, region, base, box_runs(shape, box, dtype.itemsize))
    return data.view(dtype).reshape(box[1])


def _read_boxes(source: Source, targets: list[ShardTarget], verify: bool) -> int:
    """Read every target's box from ``source`` into ``target.local``; return the bytes read."""
    total = 0
    with Reader(source.stamps, verify=verify) as reader:
        for t in targets:
            assert t.entry is not None
            t.local, n = _read_box(source, t, reader)
            total += n
    return total


def _read_box(source: Source, t: ShardTarget, reader: Reader) -> tuple[torch.Tensor, int]:
    assert t.entry is not None
    key, entry = t.entry.key, t.entry
    if isinstance(source, CompositeSource):
        return _read_box(source.part_of(key), t, reader)
    offsets, sizes = t.box
    if isinstance(source, SafetensorsSource):
        data = _read_box_runs(reader, source.region(key), 0, entry.shape, entry.dtype, t.box)
        return data.to(t.dtype), data.nbytes
    if isinstance(source, DcpSource):
        return _read_dcp_box(source, t, reader)
    described = source.described(key) if isinstance(source, TorchSource) else None
    if described is not None and _row_major(described[0]):
        # A torch file's tensor laid out row-major in its storage: the box's byte runs.
        ref, region = described
        data = _read_box_runs(reader, region, ref.byte_range()[0], ref.shape, ref.dtype, t.box)
        return data.to(t.dtype), data.nbytes
    # Any other view of its storage (a transpose, a conj/neg bit): read it whole, keep the box.
    full = dict(source.read_with([key], reader, {}))[key]
    view = full
    for d, (o, n) in enumerate(zip(offsets, sizes, strict=True)):
        view = view.narrow(d, o, n)
    return view.to(t.dtype, copy=True).contiguous(), entry.nbytes


def _read_dcp_box(source: DcpSource, t: ShardTarget, reader: Reader) -> tuple[torch.Tensor, int]:
    """Read ``t``'s box from every stored chunk of a distributed checkpoint that it meets."""
    assert t.entry is not None
    key, entry = t.entry.key, t.entry
    offsets, sizes = t.box
    out = torch.empty(sizes, dtype=t.dtype)
    total = 0
    for chunk in source.chunks(key):
        lo = [max(a, b) for a, b in zip(offsets, chunk.offsets, strict=True)]
        hi = [
            min(a + n, b + m)
            for a, n, b, m in zip(offsets, sizes, chunk.offsets, chunk.sizes, strict=True)
        ]
        inter = tuple(h - low for h, low in zip(hi, lo, strict=True))
        if any(n <= 0 for n in inter) or any(n == 0 for n in sizes):
            continue  # the chunk lies outside the box (or the box is empty)
        ref, storage = _dcp_item(source, key, entry, chunk)
        within = (tuple(a - b for a, b in zip(lo, chunk.offsets, strict=True)), inter)
        start, stop = ref.byte_range()
        if _row_major(ref) and stop - start == math.prod(ref.shape) * ref.dtype.itemsize:
            data = piece = _read_box_runs(reader, storage, start, ref.shape, ref.dtype, within)
        else:
            data = reader.read(storage, start, stop)
            whole = tensor_from(data, ref, start)
            piece = whole
            for d, (o, n) in enumerate(zip(*within, strict=True)):
                piece = piece.narrow(d, o, n)
        total += data.nbytes
        view = out
        for d, (o, n) in enumerate(zip(lo, inter, strict=True)):
            view = view.narrow(d, o - offsets[d], n)
        view.copy_(piece)
    return out, total


def _row_major(ref: TensorRef) -> bool:
    if ref.fix is not None:
        return False
    step = 1
    for n, s in zip(reversed(ref.shape), reversed(ref.stride), strict=True):
        if n != 1 and s != step:
            return False
        step *= n
    return True


def _dcp_item(source: DcpSource, key: str, entry: Entry, chunk: Any) -> tuple[TensorRef, Region]:
    """Open the item of ``chunk`` (a small torch zip file) and return its tensor and storage region."""
    region = chunk.region
    archive = open_archive(
        region.file,
        source.policy,
        start=region.offset,
        length=region.nbytes,
        where=f"{region.file}@{region.offset}",
    )
    ref = archive.obj
    if not isinstance(ref, TensorRef):
        raise corrupt(
            region.file, f"is damaged: the item of {key!r} at byte {region.offset} is not a tensor"
        )
    if ref.shape != chunk.sizes or ref.dtype != entry.dtype:
        raise corrupt(
            region.file,
            f"is damaged: the item of {key!r} at byte {region.offset} holds {list(ref.shape)} "
            f"{ref.dtype} but the metadata says {list(chunk.sizes)} {entry.dtype}",
        )
    check_storage_bounds([(key, ref)], str(region.file))
    return ref, archive.regions[ref.storage.key]


# -- replaying and putting in ----------------------------------------------------


def _replay_box(t: ShardTarget, allow_uninitialized: bool) -> torch.Tensor:
    """Replay the deferred full tensor of ``t`` and keep this rank's box (no communication)."""
    s = t.deferred
    assert s is not None
    scratch = lone_module(s.name, s.handle)
    try:
        materialize(scratch, device=t.device, allow_uninitialized=allow_uninitialized)
    except MaterializationError as e:
        raise MaterializationError(
            f"load_checkpoint cannot replay the sharded {s.path!r}, which the checkpoint lacks: "
            f"{e}",
            paths=[s.path],
        ) from e
    full = getattr(scratch, s.name).detach()
    dt = t.dtensor
    return _compat.local_shard(full, dt.device_mesh, dt.placements)


def _put_boxes(module: nn.Module, targets: list[ShardTarget]) -> Callable[[], None]:
    """Allocate the meta shards, copy every box in; return what undoes it.

    Meta DTensors are allocated through the module's ``_apply`` (FSDP2
    re-registers its sharded parameters there, as for ``to_empty``); real
    ones are copied into in place, after a backup.
    """
    if not targets:
        return lambda: None
    devices = {id(t.dtensor): t.device for t in targets if t.dtensor.is_meta}

    def allocate(x: torch.Tensor) -> torch.Tensor:
        device = devices.get(id(x))
        return torch.empty_like(x, device=device) if device is not None else x

    backups: list[tuple[torch.Tensor, torch.Tensor]] = []
    allocated: set[int] = set()

    def undo() -> None:
        with torch.no_grad():
            for local, backup in reversed(backups):
                local.copy_(backup)
        if allocated:
            _compat.apply_to_tensors(
                module, lambda x: torch.empty_like(x, device="meta") if id(x) in allocated else x
            )

    try:
        if devices:
            _compat.apply_to_tensors(module, allocate)
        with torch.no_grad():
            for t in targets:
                current = _current(t.group.slots)
                if id(t.dtensor) in devices:
                    allocated.add(id(current))
                if current.is_meta or not is_sharded(current):
                    raise _refuse(
                        t.group,
                        f"after allocating its shard the module holds a {type(current).__name__}"
                        f"{' on meta' if current.is_meta else ''} there",
                        "apply fully_shard / parallelize_module to the model before loading, and "
                        "do not replace its parameters in between",
                    )
                local = current.to_local()  # type: ignore[attr-defined]
                if id(t.dtensor) not in devices:
                    backups.append((local, local.detach().clone()))
                assert t.local is not None
                if t.local.shape != local.shape:  # copy_ would broadcast a wrong piece
                    placements = list(current.placements)  # type: ignore[attr-defined]
                    raise _refuse(
                        t.group,
                        f"its replayed piece has shape {tuple(t.local.shape)} and the local "
                        f"shard {tuple(local.shape)} (placements {placements})",
                        "materialize the model before sharding it, and report the placements "
                        "as a bug",
                    )
                local.copy_(t.local)
                t.local = None
    except BaseException:
        undo()
        raise
    return undo


def _current(slots: list[Slot]) -> torch.Tensor:
    """The tensor the group's first slot holds now; the other slots (ties) are made to hold it too."""
    first = slots[0].current()
    assert first is not None
    for slot in slots[1:]:
        if slot.current() is not first:
            slot.put(first)
    return first
