"""Fill a meta, deferred or real module from a checkpoint at one copy of memory.

:func:`load_checkpoint` runs fixed phases, each a function of its own, so a
failure leaves the module as it was: check the arguments, open the source
(:mod:`~lightning_meta._load._formats`), plan (match every key and shape,
:mod:`~lightning_meta._load._match`), convert every tensor (read, cast, move;
nothing in the module touched yet), replay what the checkpoint lacks, and
only then swap the new tensors in and report
(:mod:`~lightning_meta._load._report`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from lightning_meta._arguments import check_module_argument, float_dtype, real_device
from lightning_meta._deferred._handles import deferred_paths, forget, handle_of, mark_done
from lightning_meta._deferred._materialize import materialize_paths
from lightning_meta._errors import ArgumentTypeError
from lightning_meta._load._formats import open_source
from lightning_meta._load._match import Group, Plan, plan_load
from lightning_meta._load._report import LoadReport, progress_bar
from lightning_meta._load._source import Source
from lightning_meta._slots import wrap_like

__all__ = [
    "Arguments",
    "Conversion",
    "Converted",
    "LoadReport",
    "check_arguments",
    "convert",
    "load_checkpoint",
    "make_report",
    "replay_missing",
    "swap_in",
]

logger = logging.getLogger(__name__)


def load_checkpoint(
    module: nn.Module,
    path: str | Path,
    *,
    device: torch.device | str | int | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    prefix: str | None = None,
    safe_globals: Sequence[Any] = (),
    progress: bool = False,
) -> LoadReport:
    """Fill ``module`` from the checkpoint at ``path``, in place, and report what happened.

    Meta and deferred tensors are *assigned* tensors that stay memory-mapped
    from the file where the format allows it (torch zip, safetensors), so the
    weights exist once; tied tensors are tied again; deferred tensors the
    checkpoint lacks (non-persistent buffers such as rotary ``inv_freq``, a
    new head with ``strict=False``) are replayed exactly from their
    :func:`~lightning_meta.deferred_init` record. Real tensors are copied in
    place, so optimizers keep pointing at them. Each tensor keeps the module's
    dtype (cast one by one) unless ``dtype`` asks for another floating point
    dtype.

    Args:
        module: the module to fill (meta, deferred, real, or a mix).
        path: a Lightning ``.ckpt``, torch ``.pt``/``.pth``/``.bin`` (zip or
            legacy), ``.safetensors``, a sharded Hugging Face ``*.index.json``
            or its directory, or a ``torch.distributed.checkpoint`` directory.
            The format is read from the content.
        device: where meta and deferred tensors end up (default CPU); real
            tensors move there too if given.
        dtype: floating point tensors end up in this dtype (like
            ``module.to(dtype)``); others keep theirs.
        strict: raise on any missing, unexpected or mis-shaped key (default).
            With ``False``, load what matches and list the rest in the report.
        prefix: checkpoint key prefix to strip (``"model."`` to load a
            LightningModule's checkpoint into its ``self.model``); detected
            when ``None``.
        safe_globals: classes or functions a trusted torch checkpoint may
            construct beyond ``weights_only=True``'s defaults (the objects
            themselves, or ``(object, "module.Name")`` pairs as torch takes them).
        progress: show a progress bar over bytes on stderr.

    Returns:
        A :class:`LoadReport` (loaded, cast, replayed, missing, unexpected,
        mismatched, tied, bytes read).

    Raises:
        ArgumentTypeError: ``module`` is not an ``nn.Module``, or ``path``,
            ``device``, ``dtype``, ``prefix`` or ``safe_globals`` is of the
            wrong type (also a ``TypeError``).
        ArgumentValueError: ``device`` or ``dtype`` cannot be used, or
            ``prefix`` matches no checkpoint key (also a ``ValueError``).
        MetaTensorError: the file is missing, of an unknown format,
            structurally invalid (truncated, bad header or index, sizes that
            disagree, a missing shard), needs unsafe unpickling, or does not
            fit the module (every key listed, sorted, with shapes and closest
            names). ``paths`` holds the files or keys concerned. The module
            is unchanged when it raises.

    Example::

        >>> import os, tempfile, torch, lightning_meta as lm
        >>> path = os.path.join(tempfile.mkdtemp(), "net.pt")
        >>> torch.save(torch.nn.Linear(4, 2).state_dict(), path)
        >>> with torch.device("meta"):
        ...     net = torch.nn.Linear(4, 2)
        >>> report = lm.load_checkpoint(net, path)
        >>> report.loaded, net.weight.is_meta
        (['bias', 'weight'], False)

    .. warning::
        Assigned tensors share pages with the file (copy-on-write), so the
        file must not be modified while the module uses them.
    """
    args = check_arguments(module, path, device, dtype, prefix, safe_globals)
    where = str(path)
    source = open_source(path, safe_globals=args.safe_globals)
    plan = plan_load(module, source, where, prefix=prefix, strict=strict)
    conversion = convert(
        source,
        plan,
        device=args.device,
        dtype=args.dtype,
        progress=progress,
        label=Path(where).name,
    )
    replayed = replay_missing(module, plan, device=args.device, dtype=args.dtype)
    forget(module, swap_in(conversion.tensors))
    report = make_report(where, source, plan, conversion, replayed)
    logger.debug("loaded %d tensors from %s", len(report.loaded), where)
    return report


class Arguments(NamedTuple):
    """The arguments of :func:`load_checkpoint` that :func:`check_arguments` normalises."""

    device: torch.device | None
    dtype: torch.dtype | None
    safe_globals: list[Any]


def check_arguments(
    module: Any, path: Any, device: Any, dtype: Any, prefix: Any, safe_globals: Any
) -> Arguments:
    """Check every argument of :func:`load_checkpoint` before anything is opened.

    Args:
        module, path, device, dtype, prefix, safe_globals: as given to
            :func:`load_checkpoint`.

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
    return Arguments(target, checked_dtype, _safe_globals(safe_globals))


def _safe_globals(value: Any) -> list[Any]:
    # A str is iterable, and its characters would reach torch as "globals".
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
    """One group's new tensor, ready to go in; ``in_place``: copy into the old tensor."""

    group: Group
    tensor: torch.Tensor
    in_place: bool


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
) -> Conversion:
    """Read every tensor the plan loads and give it its final dtype and device.

    Nothing in the module is touched: this is the phase that can fail (a
    short read, no memory on the device), and the module must stay as it was
    when it does.

    Args:
        source: the opened checkpoint.
        plan: what to load.
        device: where tensors end up (``None``: a real tensor's own device,
            CPU for meta ones).
        dtype: the dtype floating point tensors end up in (``None``: the
            module's).
        progress: show a progress bar over bytes on stderr.
        label: the progress bar's label.

    Returns:
        The :class:`Conversion`.

    Raises:
        MetaTensorError: the source cannot read the data.
    """
    by_key = {entry.key: (group, entry) for group, entry in plan.load}
    out = Conversion()
    # Two checkpoint keys on one storage (saved from a tied model) must not
    # silently tie untied tensors of this module.
    seen_storage: set[int] = set()
    source.prefetch()
    with progress_bar(sum(e.nbytes for _, e in plan.load), label, progress) as advance:
        for key, tensor in source.read(list(by_key)):
            group, entry = by_key[key]
            dev, want = _placement(group.tensor, device, dtype)
            if tensor.dtype != want:
                out.cast.extend(group.names)
            out.tensors.append(_convert_one(group, tensor, dev, want, seen_storage))
            out.bytes_read += entry.nbytes
            advance(entry.nbytes)
    return out


def _placement(
    old: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    # Like module.to(dtype): only floating point tensors change dtype.
    want = dtype if dtype is not None and old.is_floating_point() else old.dtype
    return device or (old.device if not old.is_meta else torch.device("cpu")), want


def _convert_one(
    group: Group,
    tensor: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    seen_storage: set[int],
) -> Converted:
    old = group.tensor
    in_place = not old.is_meta and old.device == device and old.dtype == dtype
    if not in_place:
        tensor = tensor.to(device=device, dtype=dtype)
        ptr = tensor.untyped_storage().data_ptr()
        # Empty tensors all report storage pointer 0 and share nothing.
        if ptr in seen_storage and ptr != 0:
            tensor = tensor.clone()
        seen_storage.add(ptr)
    return Converted(group, tensor, in_place)


def replay_missing(
    module: nn.Module, plan: Plan, *, device: torch.device | None, dtype: torch.dtype | None
) -> list[str]:
    """Replay the deferred tensors the checkpoint does not fill from their record.

    Tensors the plan loads or skips for their shape are left alone.

    Returns:
        The names replayed, sorted.

    Raises:
        MaterializationError: a tensor cannot be replayed exactly; nothing
            was changed.
    """
    covered = {*plan.loaded_names, *plan.skipped_names}
    replay = [n for n in deferred_paths(module) if n not in covered]
    if replay:
        materialize_paths(module, replay, device=device, dtype=dtype)
    return sorted(replay)


def swap_in(converted: list[Converted]) -> list[str]:
    """Put every converted tensor into all slots of its group.

    Returns:
        The names of deferred or meta slots filled (real tensors are updated
        in place and need no bookkeeping).
    """
    filled: list[str] = []
    with torch.no_grad():
        for item in converted:
            old = item.group.tensor
            if item.in_place:
                old.copy_(item.tensor)
                continue
            if not old.is_meta:
                # A real tensor changing dtype or device: keep the object so
                # optimizers and ties that refer to it stay valid.
                old.data = item.tensor
                continue
            handle = handle_of(old)
            new = wrap_like(old, item.tensor, handle.attrs if handle is not None else vars(old))
            for slot in item.group.slots:
                slot.put(new)
            if handle is not None:
                # A tie reaching outside this module picks this tensor up when
                # its other end is materialized.
                mark_done(handle, new)
            filled.extend(item.group.names)
    return filled


def make_report(
    where: str, source: Source, plan: Plan, conversion: Conversion, replayed: list[str]
) -> LoadReport:
    """Return the :class:`LoadReport` of a finished load (after :func:`swap_in`).

    Args:
        where: the checkpoint as the caller named it.
        source: the opened checkpoint.
        plan: what was loaded and what did not fit.
        conversion: what was read and cast.
        replayed: the names replayed from the deferred record.
    """
    return LoadReport(
        where,
        source.format,
        plan.prefix,
        loaded=plan.loaded_names,
        cast=sorted(conversion.cast),
        replayed=replayed,
        missing=plan.missing,
        unexpected=plan.unexpected,
        mismatched=plan.mismatched,
        ignored=plan.ignored,
        left_on_meta=sorted(
            s.path
            for g in plan.groups
            for s in g.slots
            if (t := s.current()) is not None and t.is_meta
        ),
        tied=sorted(tuple(sorted(g.names)) for g, _ in plan.load if len(g.slots) > 1),
        bytes_read=conversion.bytes_read,
    )
