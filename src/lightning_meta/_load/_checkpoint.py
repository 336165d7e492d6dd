"""Fill a meta, deferred or real module from a checkpoint at one copy of memory.

:func:`load_checkpoint` runs fixed phases, each a function of its own, so a
failure leaves the module as it was: check the arguments, open the source
(:mod:`~lightning_meta._load._formats`: structure only, every size checked,
no code run), plan (match every key and shape, refuse tensors of kinds a
module cannot hold, :mod:`~lightning_meta._load._match`), then the phases of
:mod:`~lightning_meta._load._phases` (or, for a module holding DTensors,
:mod:`~lightning_meta._load._shards`): convert every tensor
(read into memory of its own, cast, move, dressed as the tensor it replaces;
nothing in the module touched yet), replay what the checkpoint lacks (into a
scratch module), and only then swap the new tensors in, undoing the swap if
anything in it fails, and report (:mod:`~lightning_meta._load._report`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_meta._arguments import spelled
from lightning_meta._compat import fabric_wrapped, transformers_float32_kept
from lightning_meta._deferred._handles import forget
from lightning_meta._deferred._materialize import follow_own_conversions, materialize_beyond
from lightning_meta._errors import ArgumentValueError, MetaTensorError, MetaTensorWarning
from lightning_meta._load._formats import open_source
from lightning_meta._load._hooks import LoadFix, run_post_hooks
from lightning_meta._load._lightning_hooks import follow_on_load_checkpoint, resolve_strict
from lightning_meta._load._match import Plan, plan_load
from lightning_meta._load._phases import (
    add_shared,
    check_arguments,
    convert,
    convert_rest,
    make_report,
    replay_missing,
    share_loaded,
    swap_in,
)
from lightning_meta._load._report import LoadReport
from lightning_meta._load._shards import has_sharded, load_into_shards, reshard_fsdp
from lightning_meta._load._source import Source, TorchSource

__all__ = ["LoadReport", "load_checkpoint"]

logger = logging.getLogger(__name__)


def load_checkpoint(
    module: nn.Module,
    path: str | Path,
    *,
    device: torch.device | str | int | None = None,
    dtype: torch.dtype | None = None,
    strict: bool | None = None,
    prefix: str | None = None,
    safe_globals: Sequence[Any] = (),
    progress: bool = False,
    verify: bool = False,
    mmap: bool = False,
    allow_uninitialized: bool = False,
) -> LoadReport:
    """Fill ``module`` from the checkpoint at ``path``, in place, and report what happened.

    Every tensor is read into memory of its own (one copy of the weights; a
    later change to the file changes nothing); meta and deferred tensors are
    *assigned* those tensors, tied tensors are tied again, and deferred
    tensors the checkpoint lacks (non-persistent buffers such as rotary
    ``inv_freq``, a new head with ``strict=False``) are replayed exactly from
    their :func:`~lightning_meta.deferred_init` record. Real tensors are
    copied in place, so optimizers keep pointing at them. Each tensor keeps
    the module's dtype (cast one by one) unless ``dtype`` asks for another
    floating point dtype. The load is atomic: when it raises, every tensor of
    the module is as it was (same objects, same values, still meta or
    deferred).

    Reading a checkpoint never runs code: pickles (torch files, a
    distributed checkpoint's metadata) are read by an unpickler that hands
    out only tensors, plain containers and the classes of the format, plus
    ``safe_globals``.

    A module's own load code (a ``_load_from_state_dict`` override, load
    pre- and post-hooks, such as ``checkpoint_wrapper``'s or litgpt's) is
    followed as ``load_state_dict`` runs it: traced on a meta copy of the
    model, keys it renames load from the key it names; code that computes
    the values it loads is refused. Post-hooks then run on the loaded
    module; keys they take off the missing or unexpected lists do not
    count for ``strict`` or the report, as with ``load_state_dict``. Names
    reported are those ``module.state_dict()`` shows.

    A LightningModule's own ``on_load_checkpoint`` runs first, as
    ``load_from_checkpoint`` runs it: on the whole file, read with its
    tensors (optimizer states too), and the ``"state_dict"`` it leaves is
    loaded. A module without one is read one tensor at a time.

    Sharded modules (parameters that ``fully_shard`` or
    ``parallelize_module`` made ``DTensor`` s, meta or real) load on every
    rank: each rank reads only the box of each tensor its shard holds
    (safetensors, torch files and distributed checkpoints; a torch-file
    tensor saved as another view of its storage is read whole, then
    sliced), with no collective, and deferred shards the checkpoint
    lacks are replayed shard by shard. ``dtype`` cannot recast them, and
    ``device`` must be of the mesh's type.

    Args:
        module: the module to fill (meta, deferred, real, or a mix).
        path: a Lightning ``.ckpt``, torch ``.pt``/``.pth``/``.bin`` (zip or
            legacy), ``.safetensors``, a sharded Hugging Face ``*.index.json``
            or its directory, or a ``torch.distributed.checkpoint`` directory.
            The format is read from the content. A directory is read as
            transformers reads it: ``model.safetensors``, else its index,
            else ``pytorch_model.bin``, else its index (the report's
            ``format`` says which).
        device: where meta and deferred tensors end up (default CPU); real
            tensors move there too if given, loaded or not (like
            ``module.to(device)``).
        dtype: floating point tensors end up in this dtype, like
            ``module.to(dtype)``: loaded or not (non-persistent buffers, keys
            ``strict=False`` leaves alone), meta ones included (they stay
            meta); others keep their dtype.
        strict: raise on any missing, unexpected or mis-shaped key (the
            default, ``None``, means ``True``, or a LightningModule's
            ``strict_loading``, as ``load_from_checkpoint`` reads it). With
            ``False``, load what matches and list the rest in the report.
        prefix: checkpoint key prefix to strip (``"model."`` to load a
            LightningModule's checkpoint into its ``self.model``); detected
            when ``None``: keys that are the module's names as they are win
            (as ``load_state_dict`` reads them), else the prefix matching most
            keys, and a tie is refused. In a torch file holding a
            ``"state_dict"``, it is matched against the whole file first
            (``"state_dict_ema."`` reaches timm's EMA weights), else against
            that state dict.
        safe_globals: classes or functions a trusted checkpoint's pickle may
            construct beyond tensors and plain containers (the objects
            themselves, or ``(object, "module.Name")`` pairs as torch takes them).
        progress: show a progress bar over bytes on stderr.
        verify: also check the CRC-32 of every zip record read (torch zip
            files, the items of a distributed checkpoint), to catch flipped
            bits; safetensors and legacy torch files store no checksum (their
            structure and sizes are always checked).
        mmap: map the files instead of reading them (zero-copy, copy-on-write);
            see the warning below.
        allow_uninitialized: deferred tensors the checkpoint lacks that eager
            construction leaves uninitialised (``torch.empty`` never filled,
            such as a non-persistent cache buffer) get uninitialised memory,
            as in eager construction, instead of a ``MaterializationError``
            (as :func:`~lightning_meta.materialize`'s).

    References taken before the load (``w = model.lin.weight``, an optimizer
    built on ``model.parameters()``) are the loaded tensors, as after eager
    construction and ``load_state_dict``: a meta or deferred parameter (and
    a deferred buffer loaded in its own dtype on the CPU) takes over the
    loaded contents. A buffer that ``dtype=``/``device=`` casts or moves, a
    plain meta model's buffer (``module.to_empty()`` replaces them) and a
    tensor torch cannot swap get a new object instead, and the old one
    raises :class:`~lightning_meta.MetaTensorError`, naming its path, on its
    first use.

    Returns:
        A :class:`LoadReport` (loaded, cast, replayed, missing, unexpected,
        mismatched, tied, bytes read).

    Raises:
        ArgumentTypeError: ``module`` is not an ``nn.Module``, or ``path``,
            ``device``, ``dtype``, ``prefix``, ``safe_globals``, ``verify``,
            ``mmap`` or ``allow_uninitialized`` is of the wrong type (also a
            ``TypeError``).
        ArgumentValueError: ``device`` or ``dtype`` cannot be used, or
            ``prefix`` matches no checkpoint key (also a ``ValueError``).
        MetaTensorError: the file is missing, unreadable, of an unknown
            format, structurally invalid (truncated, bad header or index,
            sizes that disagree, a CRC that differs with ``verify``, a missing
            shard, a key in two shards), changed while it was read, needs
            unsafe unpickling, holds a tensor of a kind a module cannot hold
            (meta, sparse, quantized, nested, a subclass) under a key the
            module has, or does not fit the module (every key listed, sorted,
            with shapes and closest names), or a tensor of the module cannot
            take the new one (a Parameter subclass that cannot be rebuilt),
            or holds extra state (``set_extra_state``) or lazy parameters
            (``nn.Lazy*``), or has load code of its own that computes the
            values it loads, or a load post-hook over tensors that would stay
            on meta. ``paths`` holds the files or keys concerned. The module
            is unchanged when it raises, except when a module's own load
            post-hook raises after the tensors were loaded (the message
            says so).

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
        With ``mmap=True``, assigned tensors are mapped from the file
        (copy-on-write): they read its pages on demand for as long as they
        live. Overwriting the file in place then changes the weights, and
        truncating or shrinking it kills the process with ``SIGBUS`` the next
        time a weight is read. Use it only for files nothing will modify
        (read-only storage). The default reads every tensor into memory the
        process owns.
    """
    # The module fabric_setup (Fabric.setup) returns: its state_dict and
    # load_state_dict are the wrapped module's, whose names a checkpoint holds.
    wrapped = fabric_wrapped(module)
    if wrapped is not None:
        module = wrapped
    args = check_arguments(
        module,
        path,
        device,
        dtype,
        prefix,
        safe_globals,
        verify=verify,
        mmap=mmap,
        allow_uninitialized=allow_uninitialized,
        strict=True if strict is None else strict,  # None: the default, resolved below
    )
    strict, by_module = resolve_strict(module, strict, "load_checkpoint")
    if args.dtype is not None:
        _warn_float32_kept(module, args.dtype)
    # Eager code loads into a model built before, copying into its tensors,
    # which stay normal tensors under the caller's torch.inference_mode();
    # tensors made here under it would be inference tensors, which autograd
    # and optimizers refuse (a replay of a block run in inference mode still
    # makes its own inference tensors, as eagerly).
    with torch.inference_mode(False):
        where = str(path)
        source = open_source(path, safe_globals=args.safe_globals, prefix=prefix)
        # a LightningModule's own on_load_checkpoint, as load_from_checkpoint runs it
        followed = follow_on_load_checkpoint(
            module, source, prefix=prefix, verify=verify, mapped=mmap
        )
        source = followed.source
        reshard_fsdp(module)  # as load_state_dict's FSDP2 pre-hooks: never into the gathered copy
        try:
            plan = plan_load(module, source, where, prefix=prefix, strict=strict, own=followed.own)
        except (MetaTensorError, ArgumentValueError) as e:
            if followed.hook is not None:
                # lightning_meta changed nothing, but the hook may have changed the module
                note = (
                    f"{followed.hook} ran first, as Lightning runs it, and anything it changed "
                    "in the module itself stays changed."
                )
            elif followed.skipped is not None:
                note = (
                    f"{followed.skipped} did not run: the file holds no 'state_dict', as a "
                    "Lightning checkpoint does, and is read as a state dict. Where the hook "
                    "makes one, load through Lightning (load_from_checkpoint), or save the "
                    "state dict it leaves and load that."
                )
            else:
                raise
            raise type(e)(f"{e} ({note})", paths=e.paths) from e
        if by_module and not strict and plan.mismatched:
            # strict_loading=False loads with load_state_dict(strict=False), which still
            # raises on a shape that differs (a fifth look: load-check exited 0, loading
            # nothing, where load_from_checkpoint fails)
            shown = ", ".join(
                f"{n!r} ({tuple(a)} in the model, {tuple(b)} in the file)"
                for n, a, b in plan.mismatched[:5]
            )
            raise MetaTensorError(
                f"cannot load {where!r} into {type(module).__name__}: shape mismatch for "
                f"{shown}. {type(module).__name__}.strict_loading=False loads what the file "
                "holds and lists the rest, but a shape that differs fails "
                "load_state_dict(strict=False) too, as load_from_checkpoint fails. Fix: build "
                "the model the checkpoint was saved from (its arguments: "
                f"{spelled('the constructor', '--args')}).",
                paths=[n for n, _, _ in plan.mismatched],
            )
        if followed.hook is not None and plan.prefix:
            raise MetaTensorError(
                f"{followed.hook} ran on {where!r}, and its keys still sit under "
                f"{plan.prefix!r}: the file was saved from another module holding "
                f"{type(module).__name__} there, maybe, whose hook Lightning would run "
                "instead of this one. Fix: if so, pass "
                f"{spelled(f'prefix={plan.prefix!r}', f'--prefix {plan.prefix}')} (the hook "
                "of the module loaded then does not run); if the hook is meant to convert "
                "such a file, make it strip the prefix.",
                paths=[where],
            )
        if followed.skipped is not None:
            # not silently: the hook may convert what the file holds
            warnings.warn(
                MetaTensorWarning(
                    f"{spelled('load_checkpoint: ', '')}{followed.skipped} did not run: {where!r} holds no "
                    "'state_dict' and records no Lightning version, so it is read as a plain "
                    "state dict (Lightning's load_from_checkpoint fails on such a file). If "
                    "the hook converts what this file holds, apply it to the state dict "
                    "before loading, or load a checkpoint Lightning wrote "
                    "(trainer.save_checkpoint)."
                ),
                stacklevel=2,
            )
        _warn_untied_file(module, source, plan, verify=verify)
        if has_sharded(plan):  # DTensors: each rank reads only its own shards
            sharded = load_into_shards(
                module,
                source,
                plan,
                where,
                args,
                progress=progress,
                verify=verify,
                mapped=mmap,
                allow_uninitialized=allow_uninitialized,
            )
            if plan.code:
                sharded.missing, sharded.unexpected = run_post_hooks(
                    module, sharded.missing, sharded.unexpected, plan.fix or LoadFix(source)
                )
            return sharded
        conversion = convert(
            source,
            plan,
            device=args.device,
            dtype=args.dtype,
            progress=progress,
            label=Path(where).name,
            verify=verify,
            mapped=mmap,
        )
        shared = share_loaded(conversion, plan)
        replay = replay_missing(
            module,
            plan,
            device=args.device,
            dtype=args.dtype,
            loaded=conversion.tensors,
            allow_uninitialized=allow_uninitialized,
        )
        add_shared(replay, shared)
        rest = convert_rest(plan, device=args.device, dtype=args.dtype)
        filled = swap_in([*conversion.tensors, *rest], replay, plan.made)
        forget(module, [*filled, *replay.names])
        # Deferred modules kept outside the tree (self.teacher = [net]) are in no
        # state dict: replayed, after the load, so that one tied to a loaded
        # tensor gets it; references taken after the block get what was loaded.
        beyond = materialize_beyond(module, allow_uninitialized=allow_uninitialized)
        report = make_report(module, where, source, plan, conversion, [*replay.names, *beyond])
    if plan.code:  # as load_state_dict ends: the modules' own post-hooks, for real
        report.missing, report.unexpected = run_post_hooks(
            module, report.missing, report.unexpected, plan.fix or LoadFix(source)
        )
    if args.device is not None or args.dtype is not None:
        # Eager's load_state_dict then module.to(device, dtype): what modules add to it.
        follow_own_conversions(module, args.device, args.dtype)
    logger.debug("loaded %d tensors from %s", len(report.loaded), where)
    return report


def _warn_untied_file(module: nn.Module, source: Source, plan: Plan, *, verify: bool) -> None:
    """Warn where the file holds different values under names the module ties.

    ``load_state_dict`` copies each into the one tensor, so the last name's stays, and so
    does :func:`load_checkpoint`; transformers' ``from_pretrained`` unties them instead
    (a model built with ``tie_word_embeddings=True`` loading a file saved untied). Before
    2026-12-07 (seventh session) the first name's values were dropped without a word.
    """
    for names, keys in plan.twice:
        if isinstance(source, TorchSource):
            described = [source.described(k) for k in keys]
            if all(d is not None for d in described) and len({_place(d) for d in described}) == 1:
                continue  # one storage saved under each name (torch.save of a tied model)
        values = dict(source.read(keys, verify=verify))
        kept = values[keys[-1]]
        dropped = [k for k in keys[:-1] if not _same_values(values[k], kept)]
        if not dropped:
            continue  # the same values under each name
        warnings.warn(
            MetaTensorWarning(
                f"{spelled('load_checkpoint: ', '')}{type(module).__name__} ties {names} into one tensor, and "
                f"the file holds other values under {dropped} than under {keys[-1]!r} (it was "
                f"saved untied): as load_state_dict, {keys[-1]!r}'s are loaded into the tied "
                "tensor and the others dropped. transformers' from_pretrained unties them "
                "instead (with its own warning). Fix: build the model as the file was saved "
                "(tie_word_embeddings=False in its config) to keep both; or, if tying is "
                "what you want, this is the value it keeps."
            ),
            stacklevel=3,
        )


def _place(described: Any) -> tuple[Any, ...]:
    """Where a torch file's tensor lies: its storage, offset, shape and strides."""
    ref, region = described
    return (region.file, region.offset, ref.offset, ref.shape, ref.stride)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal``, with NaN equal to NaN (a tied weight holding a NaN is one tensor)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _warn_float32_kept(module: nn.Module, dtype: torch.dtype) -> None:
    """Warn where ``dtype=`` casts what transformers' ``from_pretrained`` keeps in float32
    (T5's ``wo`` layers in float16: 2.5 off in logits of 5 on a tiny T5): the load gives
    ``module.to(dtype)``'s dtypes, as documented, and says how to get ``from_pretrained``'s."""
    for path, (pattern, names) in transformers_float32_kept(module, dtype).items():
        model = module.get_submodule(path) if path else module
        at = f"module.{path}" if path else "module"
        warnings.warn(
            MetaTensorWarning(
                f"load_checkpoint: dtype={dtype} casts {len(names)} tensors of "
                f"{type(model).__name__} that transformers' from_pretrained keeps in float32 "
                f"for {dtype} (its _keep_in_fp32_modules: first {names[0]!r}), as "
                f"module.to({dtype}) does. Fix: to load as from_pretrained does, build the "
                "model in float32, leave dtype out, then cast the others:\n"
                "    lm.load_checkpoint(module, path)\n"
                f"    for name, t in {at}.state_dict(keep_vars=True).items():\n"
                f"        if t.is_floating_point() and not re.search(r{pattern!r}, name):\n"
                f"            t.data = t.data.to({dtype})"
            ),
            stacklevel=3,
        )
