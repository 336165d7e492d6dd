"""Fill a meta, deferred or real module from a checkpoint at one copy of memory.

The public entry point is :func:`load_checkpoint`. Formats live in
``_load_formats``, key matching in ``_load_match``, the report in
``_load_report`` and the ``load_state_dict`` hooks for deferred modules in
``_load_hooks``. The order is fixed so a failure leaves the module as it was:
open and validate the file, match every key and shape, read (DCP), convert
every tensor, replay what the checkpoint lacks, and only then swap the new
tensors in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_meta._arguments import check_module_argument, float_dtype, real_device
from lightning_meta._deferred._handles import deferred_paths, forget, handle_of, mark_done
from lightning_meta._deferred._materialize import materialize_paths
from lightning_meta._errors import MetaTensorError
from lightning_meta._load._formats import open_source
from lightning_meta._load._match import (
    Group,
    detect_prefix,
    make_plan,
    mismatch_message,
    module_groups,
)
from lightning_meta._load._report import LoadReport, progress_bar
from lightning_meta._slots import wrap_like

__all__ = ["LoadReport", "load_checkpoint"]

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
            construct beyond ``weights_only=True``'s defaults.
        progress: show a progress bar over bytes on stderr.

    Returns:
        A :class:`LoadReport` (loaded, cast, replayed, missing, unexpected,
        mismatched, tied, bytes read).

    Raises:
        MetaTensorError: the file is missing, of an unknown format,
            structurally invalid (truncated, bad header or index, sizes that
            disagree, a missing shard), needs unsafe unpickling, or does not
            fit the module (every key listed, sorted, with shapes and closest
            names). The module is unchanged when it raises.

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
    check_module_argument(module, "load_checkpoint", "pass the model to fill as the first argument")
    target = real_device(device, "load_checkpoint")
    float_dtype(dtype, "load_checkpoint")
    where = str(path)
    source = open_source(path, safe_globals=safe_globals)
    groups = module_groups(module)
    expected = {s.path for g in groups for s in g.slots if s.persistent}
    plan = make_plan(
        groups, source.entries, source.others, detect_prefix(source.entries, expected, prefix)
    )
    message = mismatch_message(module, where, plan, strict=strict)
    if message is not None:
        raise MetaTensorError(message)

    loaded = {n for g, _ in plan.load for n in g.names}
    skipped = {n for g in plan.skipped for n in g.names}
    replay = [n for n in deferred_paths(module) if n not in loaded and n not in skipped]
    report = LoadReport(
        where, source.format, plan.prefix, missing=plan.missing, unexpected=plan.unexpected,
        mismatched=plan.mismatched, ignored=plan.ignored,
    )  # fmt: skip
    total = sum(e.nbytes for _, e in plan.load)
    by_key = {entry.key: (group, entry) for group, entry in plan.load}
    prepared: list[tuple[Group, torch.Tensor, bool]] = []
    seen_storage: set[int] = set()
    source.prefetch()
    with progress_bar(total, Path(where).name, progress) as advance:
        # Convert everything first: this is what can fail (a short read, no
        # memory on the device), and until it is done the module is untouched.
        for key, tensor in source.read(list(by_key)):
            group, entry = by_key[key]
            old = group.tensor
            want = dtype if dtype is not None and old.is_floating_point() else old.dtype
            dev = target or (old.device if not old.is_meta else torch.device("cpu"))
            in_place = not old.is_meta and old.device == dev and old.dtype == want
            if tensor.dtype != want:
                report.cast.extend(group.names)
            if not in_place:
                tensor = tensor.to(device=dev, dtype=want)
                # Two checkpoint keys on one storage (saved from a tied model)
                # must not silently tie untied tensors of this module.
                ptr = tensor.untyped_storage().data_ptr()
                if ptr in seen_storage and ptr != 0:
                    tensor = tensor.clone()
                seen_storage.add(ptr)
            prepared.append((group, tensor, in_place))
            report.bytes_read += entry.nbytes
            advance(entry.nbytes)
        if replay:
            # materialize changes nothing when it raises before replaying.
            materialize_paths(module, replay, device=target, dtype=dtype)
            report.replayed = sorted(replay)
        filled = _swap_in(prepared)
    forget(module, filled)
    report.loaded = sorted(loaded)
    report.cast.sort()
    report.tied = sorted(tuple(sorted(g.names)) for g, _ in plan.load if len(g.slots) > 1)
    report.left_on_meta = sorted(
        s.path for g in groups for s in g.slots if (t := s.current()) is not None and t.is_meta
    )
    logger.debug("loaded %d tensors from %s", len(report.loaded), where)
    return report


def _swap_in(prepared: list[tuple[Group, torch.Tensor, bool]]) -> list[str]:
    """Put every converted tensor into all slots of its group; return the names filled."""
    filled: list[str] = []
    with torch.no_grad():
        for group, tensor, in_place in prepared:
            old = group.tensor
            if in_place:
                old.copy_(tensor)
                continue
            if not old.is_meta:
                # A real tensor changing dtype or device: keep the object so
                # optimizers and ties that refer to it stay valid.
                old.data = tensor
                continue
            handle = handle_of(old)
            new = wrap_like(old, tensor, handle.attrs if handle is not None else vars(old))
            for slot in group.slots:
                slot.put(new)
            if handle is not None:
                # A tie reaching outside this module picks this tensor up when
                # its other end is materialized.
                mark_done(handle, new)
            filled.extend(group.names)
    return filled

