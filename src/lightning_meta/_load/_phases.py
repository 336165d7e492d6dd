"""The phases of :func:`~lightning_meta._load._checkpoint.load_checkpoint`, one function each.

Check the arguments, convert every tensor (read into memory of its own,
cast, move, dressed as the tensor it replaces; nothing in the module touched
yet), replay what the checkpoint lacks (into a scratch module), swap the new
tensors in (undoing the swap if anything in it fails) and report. The
sharded loader (:mod:`~lightning_meta._load._shards`) reuses them for the
tensors of a module that are not DTensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from lightning_meta import _compat
from lightning_meta._arguments import (
    check_flag,
    check_module_argument,
    float_dtype,
    real_device,
    spelled,
)
from lightning_meta._deferred._handles import (
    Handle,
    ItemSlot,
    attach,
    deferred_slots,
    dress_like,
    earlier_view,
    handle_of,
    mark_done,
    note_made,
    pending_base,
    refuse_apart,
    refuse_graded,
    replaced_by_to,
    unhook,
    unregister,
    view_of,
    warn_overwritten,
)
from lightning_meta._deferred._identity import (
    carry_grad_hooks,
    keeps_identity,
    mark_stale,
    take_over_memory,
)
from lightning_meta._deferred._materialize import check_deferred, materialize_paths, refuse_recast
from lightning_meta._deferred._record import span
from lightning_meta._errors import ArgumentTypeError, MaterializationError, MetaTensorError
from lightning_meta._guard._find import find_meta_tensors
from lightning_meta._load._match import Group, Plan
from lightning_meta._load._report import LoadReport, progress_bar
from lightning_meta._load._source import Source
from lightning_meta._slots import Slot, iter_slots, tensor_at, wrap_like

__all__ = [
    "Arguments",
    "Conversion",
    "Converted",
    "Replay",
    "check_arguments",
    "convert",
    "convert_rest",
    "make_report",
    "add_shared",
    "replay_missing",
    "share_loaded",
    "swap_in",
]

logger = logging.getLogger(__name__)


class Arguments(NamedTuple):
    """The arguments of :func:`load_checkpoint` that :func:`check_arguments` normalises."""

    device: torch.device | None
    dtype: torch.dtype | None
    safe_globals: list[Any]


def check_arguments(
    module: Any,
    path: Any,
    device: Any,
    dtype: Any,
    prefix: Any,
    safe_globals: Any,
    *,
    verify: Any = False,
    mmap: Any = False,
    allow_uninitialized: Any = False,
    strict: Any = True,
) -> Arguments:
    """Check every argument of :func:`load_checkpoint` before anything is opened.

    Args:
        module, path, device, dtype, prefix, safe_globals, verify, mmap,
            allow_uninitialized, strict: as given to :func:`load_checkpoint`.

    Returns:
        The target device (``None``: keep each tensor's, CPU for meta), the
        dtype, and ``safe_globals`` as a list.

    Raises:
        ArgumentTypeError: an argument has the wrong type.
        ArgumentValueError: ``device`` or ``dtype`` cannot be used.
    """
    check_module_argument(module, "load_checkpoint", "pass the model to fill as the first argument")
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise ArgumentTypeError(
            f"load_checkpoint got path={path!r} ({type(path).__name__}); expected a str or "
            "os.PathLike. Fix: pass the checkpoint file or directory, e.g. 'model.safetensors'."
        )
    target = real_device(device, "load_checkpoint")
    checked_dtype = float_dtype(dtype, "load_checkpoint")
    if prefix is not None and not isinstance(prefix, str):
        raise ArgumentTypeError(
            f"load_checkpoint got prefix={prefix!r} ({type(prefix).__name__}); expected a str "
            "such as 'model.', or None to detect it. Fix: pass the checkpoint key prefix as a str."
        )
    for name, value in (
        ("strict", strict),
        ("verify", verify),
        ("mmap", mmap),
        ("allow_uninitialized", allow_uninitialized),
    ):
        check_flag(value, name, "load_checkpoint")
    return Arguments(target, checked_dtype, _safe_globals(safe_globals))


def _safe_globals(value: Any) -> list[Any]:
    # A str is iterable, and its characters would reach the unpickler as "globals".
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ArgumentTypeError(
            f"load_checkpoint got safe_globals={value!r} ({type(value).__name__}); expected a "
            "sequence of classes or functions. Fix: pass e.g. safe_globals=[TheClass], or () "
            "for none."
        )
    items = list(value)
    for item in items:
        pair = isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str)
        if not callable(item[0] if pair else item):
            raise ArgumentTypeError(
                f"load_checkpoint got {item!r} ({type(item).__name__}) in safe_globals; expected "
                "a class or function (or a (class, 'module.Name') pair). Fix: pass the objects "
                "themselves, not their names, e.g. safe_globals=[fractions.Fraction]."
            )
    return items


@dataclass
class Converted:
    """One group's new tensor, ready to go in.

    ``in_place``: copy ``tensor`` into the group's (real) tensor; then, where
    ``then`` is given (a real buffer loaded under ``dtype=``/``device=``, or
    a real parameter whose memory another tensor shares), its buffer slots
    take ``then``, as ``module.to()`` gives a buffer a new object after
    ``load_state_dict`` copied into the old one, or the parameter takes it as
    its ``.data`` and ``grad`` as its gradient's (``then`` is the file's value
    converted once, bit for bit as any other parameter's). Otherwise a real parameter takes ``tensor`` as its ``.data`` (a new
    dtype or device) and its ``.grad`` takes ``grad`` as its ``.data`` where
    given, a real buffer's slots take ``tensor``, and a meta tensor's slots
    take ``tensor`` itself, already dressed as the old one (Parameter class,
    ``requires_grad``, attributes).
    """

    group: Group
    tensor: torch.Tensor
    in_place: bool
    grad: torch.Tensor | None = None
    then: torch.Tensor | None = None
    # A real tensor the checkpoint does not fill whose memory a loaded one shares
    # (a non-persistent buffer ``weight.detach().t()``): its old memory, which
    # ``tensor`` is converted from again once the loaded values are copied in, as
    # ``load_state_dict`` then ``module.to`` casts it.
    source: torch.Tensor | None = None


@dataclass
class Conversion:
    """Every converted tensor, the names cast on the way, and the bytes read."""

    tensors: list[Converted] = field(default_factory=list)
    cast: list[str] = field(default_factory=list)
    bytes_read: int = 0


def convert(
    source: Source,
    plan: Plan,
    *,
    device: torch.device | None,
    dtype: torch.dtype | None,
    progress: bool = False,
    label: str = "",
    verify: bool = False,
    mapped: bool = False,
) -> Conversion:
    """Read every tensor the plan loads and make it exactly what goes into the module.

    Read, cast, moved, and (for meta slots) rebuilt as the tensor it
    replaces; every check the swap would need is made here. Nothing in the
    module is touched: this is the phase that can fail (a short read, a
    changed file, no memory on the device, a Parameter subclass that cannot
    be rebuilt), and the module must stay as it was when it does.

    Args:
        source: the opened checkpoint.
        plan: what to load.
        device: where tensors end up (``None``: a real tensor's own device,
            CPU for meta ones).
        dtype: the dtype floating point tensors end up in (``None``: the
            module's).
        progress: show a progress bar over bytes on stderr.
        label: the progress bar's label.
        verify: check the CRC-32 of every zip record read.
        mapped: map the files instead of reading them.

    Returns:
        The :class:`Conversion`.

    Raises:
        MetaTensorError: the source cannot read the data, or a tensor cannot
            be converted or put in place (``paths``: its names).
    """
    by_key = {entry.key: (group, entry) for group, entry in plan.load}
    out = Conversion()
    # Two checkpoint keys on one storage (saved from a tied model) must not
    # silently tie untied tensors of this module.
    seen_storage: set[int] = set()
    wanted = {e.key: _placement(g.tensor, device, dtype) for g, e in plan.load}
    # A deferred buffer a plain attribute also holds: eager's load copies into
    # the one object, then module.to() gives the buffer a new one and leaves
    # the attribute's, so it is read as eager's tensor holds it and cast after.
    parts = {
        e.key: split
        for g, e in plan.load
        if handle_of(g.tensor) is not None and len(split := _parts_for_to(g, device, dtype)) > 1
    }
    read_as = {k: (torch.device("cpu"), by_key[k][0].tensor.dtype) for k in parts}
    # A real buffer to cast or move: eager copies into it, then module.to()
    # gives the buffer a new object (a reference to the old one keeps the
    # loaded values in the old dtype). So does a real parameter whose memory
    # something else holds (an alias p.detach(), a view): module.to() keeps
    # the parameter's object but gives it new memory, and the old memory holds
    # the loaded values. Read as the file holds it, then converted twice: into
    # the old memory, and once to the new tensor (not through the old dtype,
    # which could round a value the file holds).
    moved = {
        e.key
        for g, e in plan.load
        if wanted[e.key] != (g.tensor.device, g.tensor.dtype)
        and (_buffer_only(g) or _real_with_aliases(g))
    }
    read_as |= {k: (torch.device("cpu"), source.entries[k].dtype) for k in moved}
    # Casting while reading needs no full-size temporary of the checkpoint's dtype.
    cast = {
        k: want for k, (_, want) in (wanted | read_as).items() if want != source.entries[k].dtype
    }
    reading = source.read(list(by_key), verify=verify, mapped=mapped, cast=cast)
    with (
        closing(reading),
        progress_bar(sum(e.nbytes for _, e in plan.load), label, progress) as advance,
    ):
        for key, tensor in reading:
            group, entry = by_key[key]
            dev, want = wanted[key]
            if key in parts:
                for part, as_attr in parts[key]:
                    to, cast_to = read_as[key] if as_attr else (dev, want)
                    if entry.dtype != cast_to:
                        out.cast.extend(part.names)
                    out.tensors.append(_convert_one(part, tensor, to, cast_to, seen_storage))
            elif key in moved:
                if entry.dtype != want:
                    out.cast.extend(group.names)
                old = group.tensor
                then = _convert_one(group, tensor, dev, want, seen_storage)
                item = _convert_one(group, tensor, old.device, old.dtype, seen_storage)
                item.then, item.grad = then.tensor, then.grad
                out.tensors.append(item)
            else:
                if entry.dtype != want:
                    out.cast.extend(group.names)
                out.tensors.append(_convert_one(group, tensor, dev, want, seen_storage))
            out.bytes_read += entry.nbytes
            advance(entry.nbytes)
            del tensor  # a cast's source is a temporary: free it before the next read
    # In state_dict order, not the file's: where two of the module's tensors
    # share memory (b = nn.Parameter(a.data)), the copies leave the last
    # name's values, as load_state_dict does.
    order = {id(group): i for i, group in enumerate(plan.groups)}
    order |= {id(part): order[id(by_key[k][0])] for k, split in parts.items() for part, _ in split}
    out.tensors.sort(key=lambda item: order.get(id(item.group), len(order)))
    return out


def _buffer_only(group: Group) -> bool:
    """Whether ``group`` is a real tensor the module holds as a buffer, never as a parameter."""
    return not group.tensor.is_meta and not any(s.kind == "param" for s in group.slots)


def _real_with_aliases(group: Group) -> bool:
    """Whether ``group`` is a real tensor whose memory another tensor shares (a view, an
    alias ``p.detach()``, a graph's saved tensor): where nothing does, the old values are
    never seen, and copying into them would only cost time."""
    return not group.tensor.is_meta and _compat.storage_users(group.tensor) > 1


def _placement(
    old: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    # Like module.to(dtype): only floating point and complex tensors change dtype.
    want = (
        dtype if dtype is not None and (old.is_floating_point() or old.is_complex()) else old.dtype
    )
    return device or (old.device if not old.is_meta else torch.device("cpu")), want


def _refuse(group: Group, problem: str, fix: str) -> MetaTensorError:
    name = group.names[0]
    return MetaTensorError(
        f"cannot load {name!r}: {problem}. Nothing in the module was changed. Fix: {fix}.",
        paths=group.names,
    )


def _convert_one(
    group: Group,
    tensor: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    seen_storage: set[int],
) -> Converted:
    old = group.tensor
    in_place = not old.is_meta and old.device == device and old.dtype == dtype
    if in_place:
        if old.layout != torch.strided:
            raise _refuse(
                group, f"the module holds a {old.layout} tensor there", "load into a dense tensor"
            )
        if _compat.has_internal_overlap(old):
            raise _refuse(
                group,
                "the module's tensor is an expanded view whose elements share memory, so it "
                "cannot take distinct values",
                "give the module a tensor of its own there (e.g. .clone()) before loading",
            )
        return Converted(group, tensor, True)
    try:
        tensor = _laid_out_like(old, tensor, device, dtype)
    except (RuntimeError, ValueError, TypeError) as e:  # out of memory on the device, mostly
        raise _refuse(
            group, f"converting it to {dtype} on {device} failed ({type(e).__name__}: {e})",
            "free memory on the device, or load with " + spelled("device='cpu'", "--device cpu"),
        ) from e  # fmt: skip
    ptr = tensor.untyped_storage().data_ptr()
    # Empty tensors all report storage pointer 0 and share nothing.
    if ptr in seen_storage and ptr != 0:
        tensor = tensor.clone()
    seen_storage.add(ptr)
    if not old.is_meta:
        if not _compat.can_set_data(old, tensor):
            raise _refuse(
                group,
                f"the module's {type(old).__name__} on {old.device} cannot take a {dtype} tensor "
                f"on {device} as its data",
                "move or cast the module first, so the checkpoint is copied in place",
            )
        return Converted(group, tensor, False, _grad_like(group, device, dtype))
    handle = handle_of(old)
    if handle is not None and not _keeps(group, tensor, handle):
        return Converted(group, replaced_by_to(old, tensor), False)  # as module.to() after
    try:
        new = wrap_like(old, tensor, handle.attrs if handle is not None else vars(old))
    except Exception as e:  # a Parameter subclass's constructor, user code
        raise _refuse(
            group,
            f"rebuilding it as {type(old).__qualname__}(data, requires_grad=...) raised "
            f"{type(e).__name__}: {e}",
            f"give {type(old).__qualname__} a constructor that accepts (data, requires_grad=...), "
            "or load into a real module (its tensors are then copied in place)",
        ) from e
    return Converted(group, new, False)


def _laid_out_like(
    old: torch.Tensor, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``tensor`` on ``device`` in ``dtype``, in memory of its own laid out as eager leaves ``old``.

    Eager loading copies into the module's own tensor (``load_state_dict``
    after construction or ``to_empty``), whose strides ``module.to`` and
    ``to_empty`` keep where it is dense (a channels_last weight, a parameter
    stored transposed), and a dense tensor otherwise: what ``empty_like``
    gives. Made in one copy (cast and move included) where the read tensor
    is laid out otherwise, or is a view of a larger storage (parameters saved
    as views of one flat buffer, a fused qkv split), which would keep all of
    it alive, or expanded (elements sharing memory).
    """
    if old.layout == torch.strided and tensor.layout == torch.strided:
        stride = torch.empty_like(old, device="meta", dtype=dtype).stride()
        whole = (
            tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        )
        if whole and tensor.stride() == stride:
            return tensor.to(device=device, dtype=dtype)  # a dense tensor keeps its strides
        out = torch.empty_strided(tuple(old.shape), stride, dtype=dtype, device=device)
        _copy_into(out, tensor)
        return out
    tensor = tensor.to(device=device, dtype=dtype)
    if tensor.layout == torch.strided and not _compact(tensor):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def _grad_like(group: Group, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """The ``.grad`` of ``group``'s real parameter as ``module.to(device, dtype)`` converts it.

    ``Module._apply`` casts and moves a parameter's gradient with it (and
    leaves a buffer's alone), so an optimizer step after a load with
    ``dtype=``/``device=`` sees gradients of the parameter's dtype, as after
    eager ``module.to``. ``None``: none to convert.
    """
    old = group.tensor
    grad = old.grad
    if grad is None or not any(s.kind == "param" for s in group.slots):
        return None
    dev, want = _placement(grad, device, dtype)
    if (dev, want) == (grad.device, grad.dtype):
        return None
    try:
        new = grad.detach().to(device=dev, dtype=want)
    except (RuntimeError, ValueError, TypeError) as e:  # out of memory on the device, mostly
        raise _refuse(
            group, f"converting its .grad to {want} on {dev} failed ({type(e).__name__}: {e})",
            "free memory on the device, or set the gradients to None (optimizer.zero_grad()) "
            "before loading",
        ) from e  # fmt: skip
    if not _compat.can_set_data(grad, new):
        raise _refuse(
            group,
            f"its .grad ({grad.layout}, {type(grad).__name__}) cannot take a {want} tensor on "
            f"{dev} as its data",
            "set the gradients to None (optimizer.zero_grad()) before loading",
        )
    return new


def _compact(t: torch.Tensor) -> bool:
    """Whether ``t`` is contiguous and the whole of its storage."""
    return (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def convert_rest(
    plan: Plan, *, device: torch.device | None, dtype: torch.dtype | None
) -> list[Converted]:
    """Cast and move the module's tensors the checkpoint does not fill, as ``module.to`` would.

    ``dtype=`` and ``device=`` promise ``module.to(device, dtype)`` for the
    whole module: its non-persistent buffers and what ``strict=False`` leaves
    alone (a missing key, a shape that differs) too, not only the loaded
    tensors. Deferred tensors are left out (:func:`replay_missing` replays
    them so, those skipped for their shape too); meta ones only change dtype (they stay meta, for
    ``to_empty``). Nothing in the module is touched.

    Raises:
        MetaTensorError: a tensor cannot take its new dtype or device
            (``paths``: its names).
    """
    if device is None and dtype is None:
        return []
    loaded = {id(group) for group, _ in plan.load}
    out: list[Converted] = []
    seen_storage: set[int] = set()
    for group in plan.groups:
        old = group.tensor
        if id(group) in loaded or handle_of(old) is not None:
            continue
        dev, want = _placement(old, None if old.is_meta else device, dtype)
        if old.is_meta:
            if want != old.dtype:
                try:
                    new = wrap_like(old, old.detach().to(want), vars(old))
                except Exception as e:  # a Parameter subclass's constructor, user code
                    raise _refuse(
                        group,
                        f"rebuilding it as {type(old).__qualname__} in {want} raised "
                        f"{type(e).__name__}: {e}",
                        spelled(
                            "load without dtype= and cast the module afterwards",
                            "load without --dtype",
                        ),
                    ) from e
                out.append(Converted(group, new, False))
        elif (dev, want) != (old.device, old.dtype):
            item = _convert_one(group, old.detach(), dev, want, seen_storage)
            if _real_with_aliases(group):
                item.source = old.detach()
            out.append(item)
    return out


@dataclass
class Replay:
    """Deferred tensors the checkpoint lacks, replayed but not yet in the module.

    Attributes:
        names: the names replayed, sorted.
        tensors: each group replayed, with its new tensor.
        views: for a group of ``tensors`` that views a loaded tensor, its
            view taken again (of ``Converted.tensor``, which :func:`swap_in`
            points at the object that took the loaded contents).
    """

    names: list[str] = field(default_factory=list)
    tensors: list[tuple[Group, torch.Tensor]] = field(default_factory=list)
    # ids of groups in ``views`` the checkpoint filled (see share_loaded): reported loaded.
    loaded: set[int] = field(default_factory=set)
    # id of a group in ``tensors`` that is a view of a loaded tensor -> how to
    # take that view again: the view holds the loaded tensor's C++ tensor,
    # which torch.utils.swap_tensors then refuses (see swap_in).
    views: dict[int, Callable[[], torch.Tensor | None]] = field(default_factory=dict)


def replay_missing(
    module: nn.Module,
    plan: Plan,
    *,
    device: torch.device | None,
    dtype: torch.dtype | None,
    loaded: Sequence[Converted] = (),
    allow_uninitialized: bool = False,
) -> Replay:
    """Replay the deferred tensors the checkpoint does not fill, without touching ``module``.

    Tensors the plan loads are left alone, and those it skips for their shape
    too, unless ``dtype`` or ``device`` is given (see :func:`convert_rest`). The
    replay runs on a scratch module holding the same deferred tensors, so
    ``module`` keeps them until :func:`swap_in` puts the results in, together
    with the checkpoint's tensors. A tensor that views the memory of one of
    ``loaded`` in eager construction (``self.row = self.weight[0]``) becomes
    that view of the loaded tensor: eager loading copies into the weight,
    which the view sees. ``allow_uninitialized``: as
    :func:`~lightning_meta.materialize`'s, for the tensors replayed.

    Returns:
        The :class:`Replay`.

    Raises:
        MaterializationError: a tensor cannot be replayed exactly; nothing
            was changed.
    """
    # A tensor skipped for its shape stays deferred, unless dtype= or device=
    # asks for module.to() of the whole module: then it is replayed and cast,
    # as eager construction's tensor would be.
    skipped = plan.skipped_names if dtype is None and device is None else ()
    covered = {*plan.loaded_names, *skipped}
    # What module.to(dtype) after the block made of a deferred buffer the checkpoint does
    # not fill (a rotary inv_freq) is a new meta tensor no record gives: refused as
    # materialize refuses it (before, it was left on meta, and the forward raised).
    every = list(iter_slots(module))
    refuse_recast((s for s in every if s.path not in covered), "load_checkpoint", every)
    slots = deferred_slots(module)
    wanted = {s.path for s in slots if s.path not in covered}
    if not wanted:
        return Replay()
    # Eager construction copies into the tensors it built (on the CPU); where
    # a load (or module.to(dtype) after the block) changes their dtype or
    # device it gives them other memory instead, and views keep the values
    # they had, which replay gives.
    bases: dict[int, list[tuple[int, Converted]]] = {}
    # Loaded tensors dtype= or device= changes: eager's load copies into them
    # first, so a parameter or buffer viewing one holds the loaded values, and
    # module.to() then gives it a cast copy of them (of the file's values cast
    # once, as the loaded tensor itself is).
    recast: dict[int, list[tuple[int, Converted]]] = {}
    copies: set[tuple[int, int]] = set()  # made copies of a view of one of ``recast``
    for item in loaded:
        base = handle_of(item.group.tensor)
        if base is not None and not base.replaced():
            copied = _copied_in_eager(item.group.tensor, item.tensor)
            (bases if copied else recast).setdefault(id(base.record), []).append((base.vid, item))
    out = Replay(sorted(wanted))
    scratch = nn.Module()
    groups: list[tuple[str, Group]] = []
    for group in plan.groups:
        handle = handle_of(group.tensor)
        if handle is None or not wanted.intersection(group.names):
            continue
        mine = bases.get(id(handle.record), [])
        # module.to(dtype) after eager's load casts a floating view of a tensor it left
        # as it was (a float32 view of an int32 buffer's bytes): memory of its own then
        to = dtype if all(s.kind != "attr" for s in group.slots) else None
        again = _view_again(handle, group, mine, cast_to=to) if mine else None
        view = again() if again is not None else None
        if (
            view is None
            and recast.get(id(handle.record))
            and all(s.kind != "attr" for s in group.slots)
        ):
            again = _view_again(handle, group, recast[id(handle.record)], copy=True)
            view = again()
            if view is not None:
                copies.add((id(handle.record), handle.vid))
        if view is not None:
            assert again is not None
            out.views[id(group)] = again
        else:  # of a tensor made real before (its module loaded on its own)
            view = earlier_view(handle, group.names[0])
            if view is not None:
                view = dress_like(group.tensor, view, handle.attrs)
        if view is not None:
            out.tensors.append((group, view))
            continue
        for part, as_attr in _parts_for_to(group, device, dtype):
            owner, name = _scratch_place(scratch, part.names[0])
            # A Parameter registered as a buffer is cast or moved as a buffer (module.to()).
            if as_attr:
                setattr(owner, name, part.tensor)
            elif isinstance(part.tensor, nn.Parameter) and any(
                s.kind == "param" for s in part.slots
            ):
                owner.register_parameter(name, part.tensor)
            else:
                owner.register_buffer(name, part.tensor, persistent=part.persistent)
            attach(handle.record, owner, name, part.tensor, handle.vid, handle=handle)
            groups.append((part.names[0], part))
    graded: dict[str, str] = {}
    apart: list[str] = []
    items: list[tuple[Slot, Handle]] = []
    replayed = {(id(h.record), h.vid) for _, g in groups if (h := handle_of(g.tensor)) is not None}
    here = replayed | {
        (id(h.record), h.vid) for item in loaded if (h := handle_of(item.group.tensor)) is not None
    }
    # Loaded tensors dtype= or device= changes: eager's load copies into them
    # first, and module.to() then leaves a plain attribute viewing one with
    # those loaded values in the old dtype, on the CPU, which this load has not read.
    changed = {
        (id(h.record), h.vid)
        for item in loaded
        if (h := handle_of(item.group.tensor)) is not None
        and not _copied_in_eager(item.group.tensor, item.tensor)
    } | copies  # a copy of a view of one: in eager, a view of the same loaded memory
    uncopied: list[str] = []
    for slot in slots:
        handle = handle_of(slot.tensor)
        if slot.kind != "attr" or slot.path not in wanted or handle is None:
            continue
        # Made in forget() once the rest is in; refused here, before that.
        view = (
            view_of(
                handle,
                [(v, item.tensor) for v, item in bases[id(handle.record)]],
                slot.path,
                persistent=slot.persistent,
            )
            if id(handle.record) in bases
            else None
        )
        record = handle.record
        if view is not None or earlier_view(handle, slot.path) is not None:
            continue
        if isinstance(slot, ItemSlot) and (id(record), handle.vid) not in here:
            items.append((slot, handle))  # replayed by forget(): checked like the groups
        base = pending_base(handle)
        if base is not None and (id(record), base.vid) in changed:
            uncopied.append(slot.path)
        elif base is not None and (id(record), base.vid) not in here:
            apart.append(slot.path)  # its weight is neither loaded nor replayed here
        elif (g := record.graded.get(handle.vid)) is not None:
            # It carries autograd history from its weight in eager construction:
            # only a view of the weight can, which a replay gives when the
            # weight it was taken from is replayed here too, in its own dtype
            # on the CPU.
            with_base = (id(record), g.origin) in replayed
            if not with_base or dtype is not None or (device is not None and device.type != "cpu"):
                graded[slot.path] = g.made
    if uncopied:
        raise MaterializationError(
            f"load_checkpoint cannot reproduce {sorted(uncopied)} with "
            f"{spelled('dtype= or device=', '--dtype or --device')}: in eager construction "
            "each is a plain attribute viewing a tensor this checkpoint fills, so it holds the "
            "loaded values in the dtype and on the device it was built with, which module.to() "
            "leaves alone. Fix: "
            + spelled(
                "load without dtype= and device=, then call module.to(...).",
                "load without --dtype and --device.",
            ),
            paths=sorted(uncopied),
        )
    if apart:
        refuse_apart(sorted(apart), "load_checkpoint")
    if graded:
        refuse_graded(graded, "load_checkpoint")
    if items:
        # Replayed on the CPU in their recorded dtype, as eager construction leaves them.
        check_deferred(items, allow_uninitialized, None)
    if groups:
        # identity=False: the scratch holds the module's own deferred tensors,
        # which swap_in puts the results in place of (or leaves, if it fails).
        materialize_paths(
            scratch,
            None,
            device=device,
            dtype=dtype,
            allow_uninitialized=allow_uninitialized,
            identity=False,
            attrs_on=torch.device("cpu"),
            who="load_checkpoint",
        )
    for path, group in groups:
        parent, _, name = path.rpartition(".")
        new = tensor_at(scratch.get_submodule(parent), name)
        assert new is not None
        out.tensors.append((group, new))
    return out


# A loaded tensor taken as a view of another's memory: its group, its tensor as read,
# how to take the view (and copy its values in) once the other is in the module.
Shared = tuple[Group, torch.Tensor, Callable[[], torch.Tensor | None]]


def share_loaded(conversion: Conversion, plan: Plan) -> list[Shared]:
    """Make loaded deferred tensors that share memory in eager construction share it again.

    ``b = a[:2]`` kept as a buffer beside ``a``, or ``b = nn.Parameter(a.data)``:
    eager's ``load_state_dict`` copies each name's values into the one memory,
    in ``state_dict`` order (the last name's values win where they overlap), and
    an in-place update of one later reaches the other. Each of them was read
    into memory of its own; here every one that lies within another's memory
    becomes that view of the other's new tensor (taken by :func:`swap_in` once
    the other is in, like a replayed view of a loaded tensor, see
    :func:`add_shared`), its own values copied in after the other's where it
    comes later; it leaves ``conversion``. Only where the load keeps the dtype
    and device (eager's ``module.to`` then gives each its own memory). Call it
    before :func:`replay_missing`, whose views of loaded tensors then take the
    memory that stays.
    """
    order = {id(group): i for i, group in enumerate(plan.groups)}
    out: list[Shared] = []
    shared: dict[tuple[int, int], list[tuple[Handle, Converted]]] = {}
    for item in conversion.tensors:
        handle = handle_of(item.group.tensor)
        if (
            item.in_place
            or handle is None
            or handle.replaced()
            or handle.record.released
            or not _copied_in_eager(item.group.tensor, item.tensor)
        ):
            continue
        value = handle.record.values[handle.vid]
        shared.setdefault((id(handle.record), value.storage), []).append((handle, item))
    for members in shared.values():
        if len(members) < 2:
            continue

        def reach(member: tuple[Handle, Converted]) -> tuple[int, int]:
            value = member[0].record.values[member[0].vid]
            reached = span(value.size, value.stride) * value.dtype.itemsize  # bytes: dtypes differ
            return (-reached, order.get(id(member[1].group), 0))

        base_handle, base = min(members, key=reach)
        for handle, item in members:
            if item is base:
                continue
            again = _view_again(handle, item.group, [(base_handle.vid, base)])
            try:
                if again() is None:
                    continue  # another part of the storage: memory of its own is eager's too
            except MaterializationError:
                # Interleaved or overlapping (cos and sin of one view_as_real, s[::2] and
                # s[1::2]): neither lies within the other, each keeps memory of its own.
                continue
            conversion.tensors = [t for t in conversion.tensors if t is not item]
            later = order.get(id(item.group), 0) > order.get(id(base.group), 0)
            out.append(
                (item.group, item.tensor, _filled_view(again, item.tensor if later else None))
            )
    return out


def add_shared(replay: Replay, shared: list[Shared]) -> None:
    """Have :func:`swap_in` put ``shared`` (see :func:`share_loaded`) in as views, loaded."""
    for group, tensor, view in shared:
        replay.tensors.append((group, tensor))  # taken again: in ``views``
        replay.views[id(group)] = view
        replay.loaded.add(id(group))


def _filled_view(
    again: Callable[[], torch.Tensor | None], values: torch.Tensor | None
) -> Callable[[], torch.Tensor | None]:
    """``again()``, with ``values`` (a later name's, read from the checkpoint) copied into it."""

    def view() -> torch.Tensor | None:
        found = again()
        if found is not None and values is not None:
            with torch.no_grad():
                _copy_into(found, values.detach())
        return found

    return view


def _parts_for_to(
    group: Group, device: torch.device | None, dtype: torch.dtype | None
) -> list[tuple[Group, bool]]:
    """Split ``group`` by the object each slot holds after eager's ``module.to(device, dtype)``.

    Returns each part with whether it is the plain attributes' (replayed where
    eager construction leaves them: ``module.to()`` casts and moves parameters
    and buffers only). An attribute holding a parameter's object, or a
    buffer's that ``module.to()`` leaves alone, is that tensor, cast and moved
    with it; one holding a buffer that ``module.to()`` replaces keeps the old
    object, so it gets a part of its own, after the buffer's (the deferred
    object takes over its contents, as it stays eager's object there).
    """
    attrs = [s for s in group.slots if s.kind == "attr"]
    others = [s for s in group.slots if s.kind != "attr"]
    if not attrs:
        return [(group, False)]
    if not others:
        return [(group, True)]
    old = group.tensor
    if any(s.kind == "param" for s in others) or _placement(old, device, dtype) == (
        torch.device("cpu"),
        old.dtype,
    ):
        return [(group, False)]
    return [(Group(old, others), False), (Group(old, attrs), True)]


def _view_again(
    handle: Handle,
    group: Group,
    bases: list[tuple[int, Converted]],
    *,
    copy: bool = False,
    cast_to: torch.dtype | None = None,
) -> Callable[[], torch.Tensor | None]:
    """``handle``'s value as the view of a loaded tensor (``Converted.tensor``, read when called);
    ``copy``: a copy of that view (the loaded tensor was cast or moved, which gives a
    parameter or buffer viewing it memory of its own, as ``module.to()`` does); ``cast_to``:
    a floating view of another dtype than that is cast to it, as ``module.to(dtype)``
    casts it (memory of its own)."""
    meta = group.tensor  # the deferred tensor the view is dressed as, kept: swap_in may swap it

    def view() -> torch.Tensor | None:
        found = view_of(
            handle,
            [(v, item.tensor) for v, item in bases],
            group.names[0],
            cast=copy,
            persistent=any(s.persistent for s in group.slots),
        )
        if found is not None and copy:
            found = found.clone()
        if (
            found is not None
            and cast_to is not None
            and found.is_floating_point()
            and found.dtype != cast_to
        ):
            found = found.to(cast_to)
        return None if found is None else dress_like(meta, found, handle.attrs)

    return view


def _scratch_place(scratch: nn.Module, path: str) -> tuple[nn.Module, str]:
    """Return the module of ``scratch`` to hold the tensor of ``path`` (made as needed), and its name.

    The scratch tree mirrors the module's, so that a refusal of the replay
    names the module's own paths.
    """
    *parents, leaf = path.split(".")
    owner = scratch
    for name in parents:
        child = dict(owner.named_children()).get(name)
        if child is None:
            child = nn.Module()
            owner.add_module(name, child)
        owner = child
    return owner, leaf


def _copied_in_eager(old: torch.Tensor, new: torch.Tensor) -> bool:
    """Whether eager construction copies ``new`` into the tensor ``old`` stands for.

    Its tensors are real and on the CPU there: a load that keeps their dtype
    and device copies into them (views of them see the new values); one that
    changes either gives them other memory, and views keep the old values.
    """
    return (new.dtype, new.device.type) == (old.dtype, "cpu")


# Hooks for tests: every change the swap makes goes through these two.
def _put(slot: Slot, tensor: torch.Tensor) -> None:
    slot.put(tensor)


# Packed dtypes some torch versions can store and view but not copy (torch
# 2.8: "copy_kernel" not implemented for 'Float4_e2m1fn_x2'): their bytes are
# copied instead, which is the same copy.
_PACKED = frozenset(getattr(torch, n) for n in ("float4_e2m1fn_x2",) if hasattr(torch, n))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a ``uint8`` view of it for a packed dtype (see ``_PACKED``)."""
    return t.view(torch.uint8) if t.dtype in _PACKED else t


def _clone(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in _PACKED:
        return _bytes(t.detach()).clone().view(t.dtype)
    return t.detach().clone()  # a tensor subclass keeps its own clone


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; bytes for bytes where both hold the same packed dtype."""
    if dst.dtype == src.dtype:
        dst, src = _bytes(dst), _bytes(src)
    dst.copy_(src)


def _copy(old: torch.Tensor, new: torch.Tensor) -> None:
    if old.is_inference():
        with torch.inference_mode():
            _copy_into(old, new)
    else:
        _copy_into(old, new)


def _set_data(old: torch.Tensor, new: torch.Tensor) -> None:
    old.data = new


def swap_in(
    converted: list[Converted],
    replay: Replay | None = None,
    made: list[tuple[Slot, torch.Tensor]] | None = None,
) -> list[str]:
    """Put every converted and replayed tensor into all slots of its group, or none.

    ``made``: slots still holding a meta tensor that another place made
    real (``Plan.made``), put that real tensor first. Slots and ``.data`` are
    switched first, then real tensors are copied into in place, each after a
    backup of its values, then views of loaded tensors are taken; if anything
    fails, every step done is undone in reverse order, so the module is as it was.

    A meta tensor the module holds takes over its new tensor's contents
    (``_identity.take_over``) where eager's object is the one it holds
    (:func:`_keeps`), so a reference taken before the load (a local, an
    optimizer built on ``model.parameters()``) is the loaded tensor. Where
    eager's object is another, or torch cannot swap it, its slots get the new
    tensor and the old object is made stale once everything is in: its first
    use raises :class:`MetaTensorError` naming its path.

    Returns:
        The names of deferred or meta slots filled from the checkpoint (real
        tensors are updated in place and need no bookkeeping).

    Raises:
        MetaTensorError: a tensor could not be put in place (``paths``: its
            names); the module was restored.
    """
    undo: list[Callable[[], None]] = []
    filled: list[str] = []
    done: list[tuple[Any, torch.Tensor, bool]] = []
    changed: list[str] = []  # deferred tensors changed after their block, now filled
    plain: list[tuple[torch.Tensor, torch.Tensor]] = []  # (plain meta tensor, what it became)
    stale: list[tuple[torch.Tensor, Handle | None, str, str]] = []  # old object, path, why
    current: Group | None = None
    copies = [item for item in converted if item.in_place]
    views = replay.views if replay is not None else {}
    # Views of loaded tensors are taken again once those are in place: the
    # view holds its base's C++ tensor, which could not be swapped then.
    replayed = [
        (group, None if id(group) in views else new)
        for group, new in (replay.tensors if replay is not None else ())
    ]
    if replay is not None:
        replay.tensors = []
    view: torch.Tensor | None = None
    # nn.LSTM/GRU/RNN keep weak references to their parameters (made by
    # module.to(), a forward), which swap_tensors refuses; made again once
    # the tensors are in (or put back), as eager's module.to() does.
    groups = [item.group for item in converted] + [group for group, _ in replayed]
    owners = [s.owner for group in groups for s in group.slots]

    def put(group: Group, new: torch.Tensor, handle: Handle | None) -> torch.Tensor:
        """Put ``new`` (or ``group.tensor`` holding its contents) in ``group``'s slots; which."""
        real = _take_over(group, new, handle, undo, stale)
        for slot in group.slots:
            undo.append(_undo_put(slot, group.tensor))
            _put(slot, real)
        return real

    def set_param(old: torch.Tensor, new: torch.Tensor, grad: torch.Tensor | None) -> None:
        """A real parameter changing dtype or device: keep the object, so optimizers and
        ties that refer to it stay valid, as ``module.to()`` does."""
        undo.append(_undo_data(old, old.data))
        _set_data(old, new)
        if grad is not None and old.grad is not None:
            undo.append(_undo_data(old.grad, old.grad.data))
            _set_data(old.grad, grad)

    def put_buffer(group: Group, new: torch.Tensor) -> None:
        """Give ``group``'s buffer slots ``new`` (a new object, as ``module.to()``
        gives a buffer); its other slots (plain attributes) keep the old one."""
        for slot in group.slots:
            if slot.kind == "buffer":
                undo.append(_undo_put(slot, group.tensor))
                _put(slot, new)

    with _compat.rnn_weak_refs_dropped(owners):
        try:
            with torch.no_grad():
                for slot, real in made or ():
                    undo.append(_undo_put(slot, slot.tensor))
                    _put(slot, real)
                for item in converted:
                    if item.in_place:
                        continue
                    current = item.group
                    old = item.group.tensor
                    if _buffer_only(current):
                        # A real buffer changing dtype or device gets a new object, as
                        # module.to() gives it: an attribute holding the old one (a
                        # transformers original_inv_freq) keeps the old values.
                        put_buffer(current, item.tensor)
                        continue
                    if not old.is_meta:
                        set_param(old, item.tensor, item.grad)
                        continue
                    handle = handle_of(old)
                    if handle is not None and handle.changed():
                        changed += item.group.names
                    copied = _copied_in_eager(old, item.tensor)
                    item.tensor = put(item.group, item.tensor, handle)  # views are taken of it
                    if handle is not None:
                        done.append((handle, item.tensor, copied))
                    elif item.tensor is not old:
                        plain.append((old, item.tensor))
                    filled.extend(item.group.names)
                for group, new in replayed:
                    if new is None:
                        continue
                    current = group
                    handle = handle_of(group.tensor)
                    new = put(group, new, handle)
                    if handle is not None:
                        # The same tensor kept in a list too (self.rows = [self.row]) is this one.
                        done.append((handle, new, False))
                for item in copies:
                    current = item.group
                    old = item.group.tensor
                    # The backup takes the place of the new values once they are in
                    # the module, so memory stays at one extra tensor.
                    backup = _clone(old)
                    try:
                        _copy(old, item.tensor)
                    except BaseException:
                        # in case it wrote part of the values before failing
                        with contextlib.suppress(Exception):
                            _copy(old, backup)
                        raise
                    undo.append(_undo_copy(old, backup))
                    item.tensor = backup
                    if item.then is not None and _buffer_only(current):
                        put_buffer(current, item.then)
                    elif item.then is not None:
                        set_param(old, item.then, item.grad)
                for item in converted:
                    if item.source is not None:
                        current = item.group
                        item.tensor.copy_(item.source)  # the loaded values, where they landed
                for group, new in replayed:
                    if new is not None:
                        continue
                    current = group
                    handle = handle_of(group.tensor)
                    view = views[id(group)]()
                    assert view is not None  # found before, its bases only swapped since
                    view = put(group, view, handle)
                    if handle is not None:
                        done.append((handle, view, False))
                    if replay is not None and id(group) in replay.loaded:
                        filled.extend(group.names)
                    view = None
        except BaseException as e:
            view = None  # a view of a swapped tensor blocks swapping it back
            unrestored = 0
            for step in reversed(undo):
                try:
                    step()
                except Exception:  # keep undoing the rest; say so below
                    unrestored += 1
            if (
                isinstance(e, Exception)
                and not isinstance(e, MetaTensorError)
                and current is not None
            ):
                names = current.names
                restored = (
                    "every tensor of the module was put back as it was"
                    if not unrestored
                    else f"{unrestored} change(s) could not be undone"
                )
                raise MetaTensorError(
                    f"putting the new {names[0]!r} into the module failed "
                    f"({type(e).__name__}: {e}); {restored}. Fix: load into a module whose tensors "
                    "are plain tensors or Parameters (a tensor subclass that refuses copy_ cannot "
                    "take a checkpoint in place).",
                    paths=names,
                ) from e
            raise
    # A tie reaching outside this module picks these tensors up when its other
    # end is materialized.
    for handle, tensor, copied in done:
        mark_done(handle, tensor, copied=copied)
    for meta, tensor in plain:
        note_made(meta, tensor)
    for old, handle, path, why in stale:
        if old.is_meta:
            if handle is not None:
                unregister(handle)
            mark_stale(old, path, why, "load_checkpoint")
    warn_overwritten(changed, "load_checkpoint")
    return filled


def _keeps(group: Group, new: torch.Tensor, handle: Handle | None) -> bool:
    """Whether eager's object for ``group``'s meta tensor is the one the module holds.

    A deferred model's eager program is eager construction (on the CPU) then
    ``load_state_dict``, which copies in place, then ``module.to(...)`` for
    ``device=``/``dtype=``, which keeps parameters and replaces a buffer it
    moves or casts. A plain meta model's is ``module.to_empty(...)`` then
    ``load_state_dict``: ``to_empty`` keeps parameters and replaces buffers
    (``load_state_dict(assign=True)`` replaces both: a reference taken before
    it is a meta tensor that answers CPU ops with uninitialised memory, which
    the loaded parameter or a refusal beats).
    """
    old = group.tensor
    kind = "param" if all(s.kind == "param" for s in group.slots) else "buffer"
    return keeps_identity(kind, new, old.dtype, handle is not None and new.device.type == "cpu")


def _take_over(
    group: Group,
    new: torch.Tensor,
    handle: Handle | None,
    undo: list[Callable[[], None]],
    stale: list[tuple[torch.Tensor, Handle | None, str, str]],
) -> torch.Tensor:
    """Give ``group``'s meta tensor ``new``'s contents where eager keeps it; the tensor for its slots.

    Returns ``group.tensor`` when it took them over (``undo`` swaps back),
    else ``new`` (``stale`` gets the old object, to refuse once loaded).
    """
    old = group.tensor
    if not _keeps(group, new, handle):
        why = (
            "eager's module.to() or to_empty() replaces a buffer it moves or casts (to "
            f"{new.device.type}, {new.dtype}), and the old object keeps the old values"
        )
    else:
        if handle is not None:
            unhook(handle, new)
        partner = take_over_memory(old, new)
        if partner is not None:
            undo.append(_undo_take(old, partner))
            return old
        why = (
            "torch.utils.swap_tensors could not give it the loaded contents (a view of "
            "it, an autograd graph or a weak reference holds it)"
        )
    if not new.is_meta:  # a meta tensor only cast (dtype=) stays meta, as eagerly
        carry_grad_hooks(old, new)
        stale.append((old, handle, group.names[0], why))
    return new


def _undo_take(old: torch.Tensor, partner: torch.Tensor) -> Callable[[], None]:
    return lambda: torch.utils.swap_tensors(old, partner)


def _undo_put(slot: Slot, old: torch.Tensor) -> Callable[[], None]:
    return lambda: slot.put(old)


def _undo_data(old: torch.Tensor, data: torch.Tensor) -> Callable[[], None]:
    return lambda: _set_data(old, data)


def _undo_copy(old: torch.Tensor, backup: torch.Tensor) -> Callable[[], None]:
    def restore() -> None:
        with torch.no_grad():
            _copy(old, backup)

    return restore


def make_report(
    module: nn.Module,
    where: str,
    source: Source,
    plan: Plan,
    conversion: Conversion,
    replayed: list[str],
) -> LoadReport:
    """Return the :class:`LoadReport` of a finished load (after :func:`swap_in`).

    Args:
        module: the module loaded.
        where: the checkpoint as the caller named it.
        source: the opened checkpoint.
        plan: what was loaded and what did not fit.
        conversion: what was read and cast.
        replayed: the names replayed from the deferred record.
    """
    # Names as module.state_dict() shows them (a checkpoint_wrapper hides its
    # '_checkpoint_wrapped_module.'); plan.missing already is.
    shown = plan.display

    def names(items: Iterable[str]) -> list[str]:
        return sorted(shown.get(n, n) for n in items)

    return LoadReport(
        where,
        source.format,
        plan.prefix,
        loaded=names(plan.loaded_names),
        cast=names(conversion.cast),
        replayed=names(replayed),
        missing=plan.missing,
        unexpected=plan.unexpected,
        mismatched=sorted((shown.get(n, n), m, c) for n, m, c in plan.mismatched),
        ignored=plan.ignored,
        left_on_meta=names(
            {
                *(
                    s.path
                    for g in plan.groups
                    for s in g.slots
                    if (t := s.current()) is not None and t.is_meta
                ),
                # A plain meta model's tensor attributes (an alias p.detach(), the old
                # spectral_norm's weight) are in no state dict: nothing filled them.
                *(
                    f.path
                    for f in find_meta_tensors(module)
                    if f.kind == "attribute" and not f.hidden and not f.stale
                ),
            }
        ),
        tied=sorted(tuple(names(g.names)) for g, _ in plan.load if len(g.slots) > 1),
        bytes_read=conversion.bytes_read,
    )
