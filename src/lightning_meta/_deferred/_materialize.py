"""Turn the deferred meta tensors of a module into real ones, exactly."""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

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
from lightning_meta._compat import is_dtensor
from lightning_meta._deferred._escaped import block_failure, escaped_site
from lightning_meta._deferred._fallback import overwritten, reset_parameters, without_reset
from lightning_meta._deferred._handles import (
    ON_META_ATTR,
    Handle,
    ItemSlot,
    apart_by_copy,
    deferred_slots,
    done,
    dress_like,
    drop,
    drop_stale,
    earlier_view,
    graph_view,
    handle_of,
    handles_of,
    item_slots,
    keep_ahead,
    lone_module,
    made_for,
    mark_done,
    on_meta_on_purpose,
    pending_base,
    refuse_apart,
    refuse_graded,
    released_without_result,
    replaced_by_to,
    settle,
    unhook,
    unregister,
    without_pending,
)
from lightning_meta._deferred._identity import (
    carry_grad_hooks,
    keeps_identity,
    mark_stale,
    take_over_memory,
)
from lightning_meta._deferred._reach import reach, settle_references
from lightning_meta._deferred._record import Record
from lightning_meta._deferred._replay import complete, replay, replay_inputs
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError, MaterializationError
from lightning_meta._slots import Slot, own_slots, tensor_at
from lightning_meta._watched import any_emptied, casts, emptied

__all__ = [
    "SHARDED_CAST_FIX",
    "ShardedSlot",
    "check_deferred",
    "converted_batchnorm",
    "converted_batchnorm_message",
    "materialize",
    "materialize_beyond",
    "materialize_paths",
    "refuse_recast",
    "refuse_replaced",
    "sharded_slots",
]

logger = logging.getLogger(__name__)

DrawOn = Literal["cpu", "device"]
Fallback = Literal["reset_parameters"]


def materialize(
    module: nn.Module,
    *,
    device: torch.device | str | int | None = None,
    dtype: torch.dtype | None = None,
    draw_on: DrawOn = "cpu",
    fallback: Fallback | None = None,
    allow_uninitialized: bool = False,
) -> nn.Module:
    """Replace the deferred meta tensors of ``module`` by real ones, in place.

    Every parameter and buffer recorded under :func:`deferred_init` gets the
    exact bits eager construction with the same seed gives (with ``dtype``: the
    bits of eager construction followed by ``.to(dtype)``), in the dtype eager
    construction gives it (the default dtype in force when it was built);
    tied tensors stay one object; parameter class (subclasses too), their
    attributes, ``requires_grad`` and buffer persistence are kept (a buffer
    that ``device`` or ``dtype`` moves or casts is what eager's
    ``module.to()`` makes of it: ``buf.to(...)``). Tensors
    held in list, tuple and dict attributes are materialized too (where eager
    construction leaves them: on the CPU unless ``draw_on="device"``, in their
    own dtype, as ``Module.to`` does not move them; an entry that is a
    parameter's object, like ``nn.LSTM``'s ``_flat_weights``, is that
    parameter, cast and moved with it). A submodule can be
    materialized alone, the rest later, in any order. No generator moves:
    they stand where eager construction left them since the block ended.
    Real tensors the module held already (a tensor passed into ``__init__``,
    a submodule built outside the block, a part materialized by an earlier
    call) are left as they are, or with ``device`` or ``dtype`` cast and moved
    as ``module.to(device, dtype)`` would (a meta tensor made on purpose is
    cast and stays on meta); so calling this again with the same arguments
    is a no-op.

    Each deferred tensor object is made real in place (its real contents put
    into it with ``torch.utils.swap_tensors``), as eager's ``module.to()``
    keeps each parameter's object: a reference taken after the block (a
    local, a closure, an optimizer built on ``module.parameters()`` before
    this call) is the real tensor.

    .. warning::
        Where eager's object is not the module's (a buffer or tensor
        attribute moved or cast by ``device=`` or ``dtype=``, which eager's
        ``module.to()`` replaces) or torch cannot swap it (a view of it taken
        after the block, an autograd graph or a weak reference holds it;
        ``nn.LSTM``'s own weak references excepted), the module gets a new
        tensor and the old object becomes stale: any use of it other than
        reading its shape, dtype or device raises
        :class:`~lightning_meta.MetaTensorError` naming its path. So does a
        deferred tensor the module replaced after the block (a tie, an
        assignment). Read such tensors from the module after ``materialize``;
        ``.data``, ``.detach()`` and views taken after the block are not
        tracked: take them after ``materialize``.

    Sharded modules work too: a deferred parameter that ``fully_shard``
    (FSDP2) or ``parallelize_module`` (tensor parallel) replaced by a meta
    ``DTensor`` gets only its local shard allocated, filled with this rank's
    slice of the exact full tensor (each full tensor is replayed in turn, so
    peak memory is the shards plus one full tensor); each rank slices its
    own replay. ``fully_shard`` keeps each rank's own chunk eagerly (no
    communication on torch >= 2.7; a seed per rank gives eager's shards).
    For parameters ``parallelize_module`` made, whose eager shards come from
    the rank its ``src_data_rank`` names (not recorded on the DTensor), one
    small all-reduce per mesh checks that every rank's replay starts from
    the same generator states; a seed per rank is refused (seed every rank
    the same before the block, reseed after). Every rank must call it, as
    eager construction would.

    Args:
        module: the module whose meta tensors to materialize (the whole tree).
        device: where the tensors end up (default: CPU).
        dtype: floating point tensors are cast to it after drawing in the
            recorded dtype, exactly like ``module.to(dtype)``.
        draw_on: ``"cpu"`` (default) draws random numbers from the CPU
            generator and moves the results to ``device``, the values a model
            built on the CPU and then moved gets; ``"device"`` replays on
            ``device`` with that device's generator, the values of eager
            construction directly on it.
        fallback: ``"reset_parameters"`` lets meta tensors that were never
            deferred be initialised by their module's ``reset_parameters()``
            (recorded first, so a tensor it leaves wholly or partly unwritten,
            or a method that raises, changes nothing and raises). A new meta
            tensor put in a deferred one's place after the block (litgpt's
            ``model.max_seq_length = n``) is one; a module that also holds
            other tensors, which the method would draw again, is refused.
        allow_uninitialized: keep eager construction's behaviour for tensors
            it leaves uninitialised (``torch.empty`` never filled): replay
            them as uninitialised memory instead of raising.

    Returns:
        ``module`` itself.

    Raises:
        ArgumentTypeError: ``module`` is not an ``nn.Module``, or ``device`` or
            ``dtype`` has the wrong type (also a ``TypeError``).
        ArgumentValueError: ``device``, ``dtype``, ``draw_on`` or ``fallback``
            has a value that cannot work (also a ``ValueError``).
        MaterializationError: a meta tensor was not built under
            ``deferred_init`` (and no ``fallback``), a deferred tensor was
            modified after the block, holds uninitialised memory (and not
            ``allow_uninitialized``), or the record cannot be replayed
            exactly; for sharded parameters also: a ``DTensor`` whose global
            shape is not the deferred tensor's, a ``Partial`` placement, a
            ``device`` of another type than the mesh's, or a ``dtype`` cast.
            Nothing is changed when it raises before replaying.

    Example::

        >>> import torch, lightning_meta as lm
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> with lm.deferred_init():
        ...     net = torch.nn.Linear(4, 2)
        >>> net.weight.is_meta
        True
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> torch.equal(lm.materialize(net).weight, torch.nn.Linear(4, 2).weight)
        True

    """
    materialize_paths(
        module,
        None,
        device=device,
        dtype=dtype,
        draw_on=draw_on,
        fallback=fallback,
        allow_uninitialized=allow_uninitialized,
    )
    materialize_beyond(
        module, device=device, draw_on=draw_on, allow_uninitialized=allow_uninitialized
    )
    if device is not None or dtype is not None:
        where = real_device(device, "materialize")
        _convert_real(module, where, dtype)
        follow_own_conversions(module, where, dtype)
    return module


def follow_own_conversions(
    module: nn.Module, device: torch.device | None, dtype: torch.dtype | None
) -> None:
    """Run what modules add to eager's ``module.to(device, dtype)`` themselves, once the
    tensors are converted: a ``_apply`` of their own (torchmetrics' ``Metric`` casts and
    moves its states and their defaults), and a LightningModule's ``.device`` and
    ``.dtype``, which Lightning's ``to()`` notes.

    ``materialize(dtype=)`` and ``load_checkpoint(dtype=)`` converted the tensors without
    ``module.to()``: a metric kept float32 states (``compute()`` 2e-5 off eager's float16)
    and ``self.dtype`` stayed float32, so ``torch.full(..., dtype=self.dtype)`` computed
    in another dtype, without an error (before 2026-12-07, third session). The function
    given to ``_apply`` converts as ``module.to()`` does and returns a tensor already
    converted as it is, so the tensors converted before are left alone.
    """

    def convert(t: torch.Tensor) -> torch.Tensor:
        if is_dtensor(t) or handle_of(t) is not None:
            return t
        want = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else t.dtype
        where = device if device is not None and not t.is_meta else t.device
        return t if (t.device, t.dtype) == (where, want) else t.to(where, want)

    done: set[int] = set()
    for sub in module.modules():
        if id(sub) in done or not _compat.converts_own(sub):
            continue
        _compat.apply_own(sub, convert)
        done.update(id(m) for m in sub.modules())
    _compat.lightning_placement(module, device, dtype)


def _convert_real(
    module: nn.Module, device: torch.device | None, dtype: torch.dtype | None
) -> None:
    """Cast and move the real parameters and buffers ``module`` held before (a tensor passed
    into ``__init__``, a submodule built outside the block, a part materialized earlier)
    as eager's ``module.to(device, dtype)`` does: a parameter keeps its object (new
    ``.data``), a buffer gets a new one. The tensors this call made real are there already."""

    def wanted(t: torch.Tensor) -> tuple[torch.device, torch.dtype] | None:
        if is_dtensor(t) or handle_of(t) is not None:
            return None
        want = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else t.dtype
        # A meta tensor made on purpose stays there (eager's .to() cannot move one
        # off meta), cast as module.to(dtype) casts it.
        where = device if device is not None and not t.is_meta else t.device
        return None if (t.device, t.dtype) == (where, want) else (where, want)

    with torch.no_grad():
        for sub in module.modules():
            for p in _compat.parameters_of(sub).values():
                if p is not None and (to := wanted(p)) is not None:
                    p.data = p.data.to(*to)
                    if p.grad is not None and (grad_to := wanted(p.grad)) is not None:
                        p.grad = p.grad.to(*grad_to)
            buffers = _compat.buffers_of(sub)
            for name, b in list(buffers.items()):
                if b is not None and (to := wanted(b)) is not None:
                    buffers[name] = b.to(*to)


def materialize_beyond(
    module: nn.Module,
    *,
    device: torch.device | str | int | None = None,
    draw_on: DrawOn = "cpu",
    on_device: frozenset[int] = frozenset(),
    allow_uninitialized: bool = False,
) -> list[str]:
    """Materialize what ``module``'s tree holds outside it (see ``_reach``); return the paths.

    The deferred tensors of modules kept in plain containers (their other meta
    tensors, a template kept there on purpose, stay) go where eager
    construction leaves them, as for container items: ``Module.to`` does not
    reach them, so on the CPU in their own dtype unless drawn on the device
    (``draw_on="device"``, or ``on_device``: ids of deferred tensors built on
    ``device``, MetaGuard's ``configure_model``). Then every reference to a
    deferred tensor made real elsewhere gets that tensor.
    """
    paths: list[str] = []
    found = reach(module)
    for path, held in found.hidden:
        slots = deferred_slots(held)
        if not slots:
            continue
        names = [f"{path}.{s.path}" for s in slots]
        here = "device" if any(id(s.tensor) in on_device for s in slots) else draw_on
        try:
            materialize_paths(
                held,
                names,
                device=device if here == "device" else None,
                draw_on=here,
                allow_uninitialized=allow_uninitialized,
                at=path,
            )
        except NotImplementedError as e:
            # Built on the meta device on purpose inside the block (a template,
            # nn.LayerNorm(4, device="meta")): its replay gives meta tensors,
            # which eager construction leaves there too. Nothing was changed.
            if not _compat.is_torch_meta_error(e):
                raise
            continue
        paths += names
    settle_references(found.holders)
    return paths


def materialize_paths(
    module: nn.Module,
    names: Iterable[str] | None,
    *,
    device: torch.device | str | int | None = None,
    dtype: torch.dtype | None = None,
    draw_on: DrawOn = "cpu",
    fallback: Fallback | None = None,
    allow_uninitialized: bool = False,
    at: str = "",
    identity: bool = True,
    attrs_on: torch.device | None = None,
    who: str = "materialize",
) -> nn.Module:
    """Materialize the deferred tensors of ``module`` named in ``names`` (all if ``None``).

    Shared by :func:`materialize` and the checkpoint loader, which replays only
    what a checkpoint lacks. Nothing changes when it raises before replaying.

    Args:
        module: see :func:`materialize`.
        names: dotted paths of meta tensors of ``module`` to materialize, or
            ``None`` for all of them.
        device: see :func:`materialize`.
        dtype: see :func:`materialize`.
        draw_on: see :func:`materialize`.
        fallback: see :func:`materialize`.
        allow_uninitialized: see :func:`materialize`.
        at: ``module``'s dotted path in the model a ``load_state_dict`` is
            filling (``""``: the model itself); ``names`` and the paths
            errors name start with it.
        identity: give each deferred tensor object its real contents
            (see ``_identity``); ``False`` for a scratch module holding the
            deferred tensors of another (a loader's, a shard's replay),
            whose results the caller puts in place itself.
        attrs_on: the device for plain tensor attributes (``None``: ``device``);
            the checkpoint loader's are where eager construction put them, as
            its ``module.to()`` leaves them there.
        who: the public function a refusal of ``dtype=`` names (the loader's own).

    Returns:
        ``module`` itself.

    Raises:
        ArgumentTypeError: ``module``, ``names``, ``device`` or ``dtype`` has the wrong type.
        ArgumentValueError: ``names`` holds a path that is not a meta tensor of
            ``module``, or ``device``, ``dtype``, ``draw_on`` or ``fallback``
            has a value that cannot work.
        MaterializationError: see :func:`materialize`.
    """
    target, remap = _check_arguments(module, names, device, dtype, draw_on, fallback)
    check_flag(allow_uninitialized, "allow_uninitialized", "materialize")
    # The deferred tensors' watch class answers every tensor call in Python
    # (see _watched); this code makes a few hundred on a small model, all on
    # meta, so it runs without subclasses' __torch_function__ (the user's
    # reset_parameters below runs with it).
    with _compat.no_subclass_torch_function():
        # One walk of the tree for every step below: on a small model the walks
        # cost as much as replaying its ops.
        walk = [(_join(at, path), mod) for path, mod in module.named_modules()]
        _refuse_emptied(module, at)
        sharded = sharded_slots(module, walk)
        slots = _select(module, names, walk)
        wanted = {s.path for s in slots}
        sharded = [s for s in sharded if s.path in wanted]
        # By identity: a tied DTensor is listed once in ``sharded`` but at every path in ``slots``.
        on_shards = {id(s.dtensor) for s in sharded}
        slots = [s for s in slots if id(s.tensor) not in on_shards]
        if not slots and not sharded:
            if names is None:
                _refuse_escaped(walk)
            return module
        deferred, plain, made = _split(slots)
        recast = check_deferred(
            [*deferred, *((s.as_slot(), s.handle) for s in sharded)],
            allow_uninitialized,
            dtype,
            who,
        )
        _check_plain(plain, fallback, (m for _, m in walk))
        _check_sharded(sharded, target, dtype)
        if sharded:
            fill_shards(module, sharded, target, draw_on)
        ready, replayed, kept = _replay_records(deferred, target, dtype, remap, recast, attrs_on)
        graded = _graded_plan(deferred, ready)
        _swap_in(deferred, ready, kept, graded, remap if identity else None, identity=identity)
        for slot, tensor in made:
            slot.put(tensor)
        _complete_records(walk, replayed, remap)
    if plain:
        reset_parameters(plain, target, dtype)
    logger.debug(
        "materialized %d deferred (%d of them sharded) and %d plain meta tensors",
        len(deferred) + len(sharded),
        len(sharded),
        len(plain),
    )
    return module


def _check_arguments(
    module: nn.Module,
    names: Iterable[str] | None,
    device: torch.device | str | int | None,
    dtype: torch.dtype | None,
    draw_on: DrawOn,
    fallback: Fallback | None,
) -> tuple[torch.device, torch.device | None]:
    """Refuse bad arguments; return the target device and where CPU draws are redrawn."""
    check_module_argument(module, "materialize", "pass the module built under deferred_init")
    if _compat.dispatch_mode_active():
        raise MaterializationError(
            "materialize cannot run while a TorchDispatchMode is active (inside a "
            "deferred_init block or a FakeTensorMode): the replay would produce fake tensors. "
            "Fix: call materialize after the block ends."
        )
    if isinstance(names, (str, bytes)):
        raise ArgumentTypeError(
            f"materialize got names={names!r}, a single string; expected an iterable of "
            f"dotted paths. Fix: pass [{names!r}]."
        )
    target = real_device(device, "materialize") or torch.device("cpu")
    float_dtype(dtype, "materialize")
    check_draw_on(draw_on, "materialize")
    if fallback not in (None, "reset_parameters"):
        raise ArgumentValueError(
            f"materialize got fallback={fallback!r}; expected None or 'reset_parameters'. "
            "Fix: leave fallback=None, or pass fallback='reset_parameters' to initialise "
            "never-deferred meta tensors with their module's reset_parameters()."
        )
    remap = target if draw_on == "device" and target.type != "cpu" else None
    return target, remap


def _join(at: str, path: str) -> str:
    return f"{at}.{path}" if at and path else at or path


def _select(
    module: nn.Module, names: Iterable[str] | None, walk: list[tuple[str, nn.Module]]
) -> list[Slot]:
    """Return the meta slots of ``module`` named in ``names`` (all if ``None``).

    ``walk`` is ``list(module.named_modules())``. Container items come after
    the parameters, buffers and attributes, as in :func:`deferred_slots`.
    """
    slots: list[Slot] = []
    for prefix, mod in walk:
        slots += [s for s in own_slots(mod, prefix) if s.tensor.is_meta]
    for prefix, mod in walk:
        slots += item_slots(mod, prefix)
    if names is None:
        return slots
    wanted = set(names)
    unknown = sorted(wanted - {s.path for s in slots})
    if unknown:
        raise ArgumentValueError(
            f"materialize was asked for {unknown} but those are not meta tensors of "
            f"{type(module).__name__}. Fix: pass names from deferred_paths(module).",
            paths=unknown,
        )
    return [s for s in slots if s.path in wanted]


def _split(
    slots: list[Slot],
) -> tuple[list[tuple[Slot, Handle]], list[Slot], list[tuple[Slot, torch.Tensor]]]:
    """Return the deferred slots (with their handles), the plain, never-deferred ones, and
    those holding a deferred tensor made real at another place (with that real tensor)."""
    deferred: list[tuple[Slot, Handle]] = []
    plain: list[Slot] = []
    made: list[tuple[Slot, torch.Tensor]] = []
    for slot in slots:
        handle = handle_of(slot.tensor)
        if handle is not None:
            deferred.append((slot, handle))
            continue
        if on_meta_on_purpose(slot):
            continue  # eager construction leaves it on meta
        real = made_for(slot.tensor)
        if real is None:
            plain.append(slot)
        else:
            made.append((slot, real))
    return deferred, plain, made


# Where a real tensor goes: device and dtype (``None``: the recorded one).
_Place = tuple[torch.device, torch.dtype | None]


def _replay_records(
    deferred: list[tuple[Slot, Handle]],
    device: torch.device,
    dtype: torch.dtype | None,
    remap: torch.device | None,
    recast: dict[int, torch.dtype],
    attrs_on: torch.device | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, Record], tuple[set[int], set[int]]]:
    """Return the real tensor for each deferred slot (by ``id`` of the slot), the records
    replayed, the ``id``\\ s of those real tensors already in place elsewhere (a tie's
    other end made real before), which no deferred tensor may take over, and the
    ``id``\\ s of the slots that are views of a tensor made real before
    (:func:`~lightning_meta._deferred._handles.earlier_view`), which ``_swap_in``
    takes again once their bases are in place.

    ``recast``: the dtype of each deferred tensor (by ``id``) that
    ``module.to(dtype)`` cast after the block; its value is cast the same way.

    One replay per record and place (container items and plain tensor
    attributes stay where eager construction leaves them when parameters go
    to another device or dtype); a value already materialized elsewhere (a
    tie reaching outside the submodule) reuses that tensor.
    """
    # By the deferred tensor and its place: a tensor held both as a buffer and
    # as a plain attribute (transformers' original_inv_freq) gets one real
    # tensor per place, as module.to(dtype) casts only the buffer.
    by_place: dict[tuple[int, _Place], torch.Tensor] = {}
    targets: dict[tuple[int, _Place], tuple[Record, dict[int, str]]] = {}
    # Eager's module.to() casts and moves parameters and buffers only: a plain
    # tensor attribute keeps its dtype, and container items stay on the CPU
    # (or where draw_on="device" builds them). Where all end up alike, one
    # replay keeps a view in a list (self.rows = [self.weight[0]]) a view.
    item_device = remap or torch.device("cpu")
    # An attribute or container item holding the very object of a parameter
    # (self.no_decay = [self.norm.weight], nn.LSTM's _flat_weights) holds the
    # cast or moved parameter after eager's module.to(), which keeps the
    # parameter's object; so does one holding a buffer that module.to() leaves
    # alone (already where and in the dtype it is sent to). It goes with that
    # tensor: one replay, one object.
    kept_by_to: dict[int, _Place] = {}
    for slot, _ in deferred:
        if slot.kind == "param" or (
            slot.kind == "buffer"
            and device == item_device
            and _cast_keeps(slot.tensor.dtype, dtype)
        ):
            kept_by_to.setdefault(id(slot.tensor), (device, dtype))

    def place(slot: Slot) -> _Place:
        if slot.kind != "attr":
            return device, dtype
        if kept_by_to:
            kept = kept_by_to.get(id(slot.tensor))
            if kept is not None:
                return kept
        return (item_device if isinstance(slot, ItemSlot) else attrs_on or device), None

    in_call = {(id(h.record), h.vid) for _, h in deferred}
    held: set[int] = set()
    earlier: set[int] = set()
    apart: list[str] = []  # views whose weight this call leaves deferred
    for slot, handle in deferred:
        where = place(slot)
        key = (id(slot.tensor), where)
        if key in by_place:
            continue  # a tie
        existing = done(handle)
        if existing is not None:
            by_place[key] = existing
            if handle.record.ahead.get(handle.vid) is not existing:
                held.add(id(existing))
            continue
        # A view of a tensor made real before (its module materialized or loaded
        # on its own) is that view, as in eager construction: a plain attribute,
        # and a parameter or buffer of another module on that memory
        # (nn.Embedding(_weight=enc.weight.data), enc.weight.detach()[:2]) that
        # the load did not make real with it (materialize keeps those ahead).
        view = earlier_view(handle, slot.path)
        if view is not None:
            by_place[key] = dress_like(slot.tensor, view, handle.attrs)
            earlier.add(id(slot))
            continue
        if slot.kind == "attr":
            base = pending_base(handle)
            if base is not None and (id(base.record), base.vid) not in in_call:
                apart.append(slot.path)
        per_record = targets.setdefault((id(handle.record), where), (handle.record, {}))[1]
        per_record.setdefault(handle.vid, slot.path)
    if apart:
        refuse_apart(sorted(apart), "materialize")
    sharing = _sharing(deferred, place)
    for key, group in sharing.items():
        wanted = targets[key][1]
        for vid, (_, path) in group.items():
            wanted.setdefault(vid, f"(sharing memory with {path!r})")
    produced: dict[tuple[int, int, _Place], torch.Tensor] = {}
    for (_, (to, cast)), (record, wanted) in targets.items():
        for vid, t in replay(record, wanted, device=to, dtype=cast, remap=remap).items():
            produced[(id(record), vid, (to, cast))] = t
    _keep_ahead(sharing, targets, produced)
    # A deep copy's Parameters get memory of their own (see Record.deep_copied); the
    # other tensors keep the storage they share.
    copied = {id(record) for record, _ in targets.values() if record.deep_copied}
    uses = Counter(
        t.untyped_storage().data_ptr() for (rid, _, _), t in produced.items() if rid in copied
    )
    ready: dict[int, torch.Tensor] = {}
    for slot, handle in deferred:
        where = place(slot)
        key = (id(slot.tensor), where)
        if key not in by_place:
            value = produced[(id(handle.record), handle.vid, where)]
            if (
                id(handle.record) in copied
                and isinstance(slot.tensor, nn.Parameter)
                and uses[value.untyped_storage().data_ptr()] > 1
            ):
                value = value.clone(memory_format=torch.preserve_format)
            recast_to = recast.get(id(slot.tensor)) if slot.kind != "attr" else None
            if recast_to is not None:
                for cast in casts(slot.tensor):  # each rounds, as eager's casts
                    value = value.to(cast)
            if slot.kind != "attr" and handle.replaced():
                value = _laid_out_as(value, slot.tensor)
            if slot.kind == "buffer" and id(slot.tensor) not in kept_by_to:
                by_place[key] = replaced_by_to(slot.tensor, value)
            else:
                by_place[key] = dress_like(slot.tensor, value, handle.attrs)
        ready[id(slot)] = by_place[key]
    return ready, {id(record): record for record, _ in targets.values()}, (held, earlier)


def _laid_out_as(value: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``value`` in the strides of ``meta``, the deferred tensor a conversion after the block
    gave new data (``module.to(memory_format=torch.channels_last)``), as eager's conversion."""
    if value.shape != meta.shape or value.stride() == meta.stride():
        return value
    return torch.empty_like(meta, dtype=value.dtype, device=value.device).copy_(value)


def _refuse_escaped(walk: list[tuple[str, nn.Module]]) -> None:
    """Refuse parameters and buffers that are fake tensors of a finished block: a module built
    in a block that raised (nothing it built was made deferred), or given such a tensor.
    Left alone, materialize returned as if the module were real, and its first use raised."""
    found: dict[str, str] = {}
    failed = None
    for path, mod in walk:
        for name, t in (*_compat.parameters_of(mod).items(), *_compat.buffers_of(mod).items()):
            site = escaped_site(t)
            if site is not None:
                found[_join(path, name)] = site
                failed = failed or block_failure(t)
    if not found:
        return
    paths = sorted(found)
    site = found[paths[0]]
    if failed is not None:
        why = (
            f"the deferred_init block that built them (at {site}) raised ({failed}), so "
            "nothing built in it was made deferred"
        )
        fix = "fix what the block raised and build the model again"
    else:
        why = (
            f"they were made inside a deferred_init block (at {site}) and put in the module "
            "where the block did not see them (written into its _parameters or _buffers "
            "table), so they were not made deferred"
        )
        fix = (
            "register them in the block (self.w = nn.Parameter(...), "
            "self.register_buffer(...)), or create them after materialize"
        )
    raise MaterializationError(
        f"materialize cannot give values to {paths}: they are tensors of a finished "
        f"deferred_init block that hold no values: {why}. Fix: {fix}.",
        paths=paths,
    )


def _cast_keeps(recorded: torch.dtype, dtype: torch.dtype | None) -> bool:
    """Whether ``module.to(dtype)`` leaves a tensor recorded in ``recorded`` as it is."""
    return (
        dtype is None
        or dtype == recorded
        or not (recorded.is_floating_point or recorded.is_complex)
    )


def _sharing(
    deferred: list[tuple[Slot, Handle]], place: Callable[[Slot], _Place]
) -> dict[tuple[int, _Place], dict[int, tuple[Handle, str]]]:
    """Return the deferred parameters and buffers outside this call sharing memory with one in it.

    By record and place, value id -> (handle, path of the tensor in the call
    it shares with). In eager construction ``nn.Parameter(emb.weight[:2])``,
    ``Embedding(_weight=emb.weight.data)`` or ``p.data = q.data`` share one
    storage: an update of one (an optimizer step) is seen by the others.
    Materialized module by module, each would get its own memory; so the
    others are replayed with it, from the same storage, and kept until their
    own modules are materialized (:func:`_keep_ahead`).
    """
    in_call = {(id(h.record), h.vid) for _, h in deferred}
    found: dict[tuple[int, _Place], dict[int, tuple[Handle, str]]] = {}
    for slot, handle in deferred:
        record = handle.record
        if (
            slot.kind == "attr"
            or record.released
            or not record.values
            or handle.replaced()
            or apart_by_copy(record, slot.tensor)
        ):
            continue
        owned = record.owned.get(record.values[handle.vid].storage, ())
        others = {v for v in owned if (id(record), v) not in in_call}
        if not others:
            continue
        group = found.setdefault((id(record), place(slot)), {})
        for other in list(record.pending):
            if (
                other.vid in others
                and other.vid not in group
                and done(other) is None
                and not other.replaced()
                and not apart_by_copy(record, other.tensor)
            ):
                group[other.vid] = (other, slot.path)
    return {key: group for key, group in found.items() if group}


def _keep_ahead(
    sharing: dict[tuple[int, _Place], dict[int, tuple[Handle, str]]],
    targets: dict[tuple[int, _Place], tuple[Record, dict[int, str]]],
    produced: dict[tuple[int, int, _Place], torch.Tensor],
) -> None:
    """Keep the replayed tensors of :func:`_sharing` that share memory with this call's, for later.

    One cast or moved apart from the others (``dtype=``, ``device=``) shares
    nothing, as after eager's ``module.to()``: it is replayed in its own turn.
    """
    for key, group in sharing.items():
        record, wanted = targets[key]
        place = key[1]
        here = {
            produced[(id(record), vid, place)].untyped_storage().data_ptr()
            for vid in wanted
            if vid not in group
        }
        for vid, (handle, _) in group.items():
            value = produced[(id(record), vid, place)]
            if value.untyped_storage().data_ptr() in here:
                keep_ahead(handle, dress_like(handle.tensor, value, handle.attrs))


def _graded_plan(
    deferred: list[tuple[Slot, Handle]], ready: dict[int, torch.Tensor]
) -> list[tuple[Slot, Handle, Slot]]:
    """Find the views that carry autograd history in eager construction, and their bases.

    A replayed view (``self.row = self.weight[0]`` outside ``torch.no_grad()``)
    shares the weight's memory but not its graph; :func:`_graded_views` makes
    it a view of the parameter object it was taken from, so gradients flow
    through it into that parameter, as in eager construction. Returns each
    such slot with its handle and the slot of the parameter it views. Checked
    before anything changes: one that is no view of a parameter made here (a
    ``weight * 2``, or a view of a weight cast, moved or filled in another
    call) is refused.

    Raises:
        MaterializationError: such a tensor would be a separate one here.
    """
    graded = [
        (slot, handle, g)
        for slot, handle in deferred
        if (g := handle.record.graded.get(handle.vid)) is not None
        and ready[id(slot)].grad_fn is None
    ]
    if not graded:
        return []
    # The slot of every value made here, by record and value id.
    made = {(id(h.record), h.vid): s for s, h in deferred if s.kind != "attr"}
    refused: dict[str, str] = {}
    plan: list[tuple[Slot, Handle, Slot]] = []
    for slot, handle, g in graded:
        value = ready[id(slot)]
        base = made.get((id(handle.record), g.origin)) if g.origin is not None else None
        real = ready[id(base)] if base is not None else None
        if (
            base is None
            or real is None
            or real.dtype != value.dtype
            or real.untyped_storage().data_ptr() != value.untyped_storage().data_ptr()
        ):
            refused[slot.path] = g.made
            continue
        plan.append((slot, handle, base))
    if refused:
        hooked = {
            slot.path: type(hook).__module__
            for slot, _, _ in graded
            if slot.path in refused
            for hook, name in _compat.recomputing_hooks(slot.owner)
            if name == slot.name
        }
        refuse_graded(refused, "materialize", hooked)
    return plan


def _graded_views(plan: list[tuple[Slot, Handle, Slot]], ready: dict[int, torch.Tensor]) -> None:
    """Make the views of :func:`_graded_plan` views autograd records, of the parameters now in place."""
    views: dict[int, torch.Tensor] = {}  # one view for one tensor kept in several places
    for slot, handle, base in plan:
        value = ready[id(slot)]
        if id(value) in views:
            ready[id(slot)] = views[id(value)]
            continue
        size, stride = tuple(value.shape), tuple(value.stride())
        view = graph_view(handle, ready[id(base)], size, stride, int(value.storage_offset()))
        ready[id(slot)] = views[id(value)] = dress_like(slot.tensor, view, handle.attrs)


def _swap_in(
    deferred: list[tuple[Slot, Handle]],
    ready: dict[int, torch.Tensor],
    kept: tuple[set[int], set[int]],
    graded: list[tuple[Slot, Handle, Slot]],
    remap: torch.device | None,
    *,
    identity: bool,
) -> None:
    """Put each real tensor in its slot and settle its handle.

    With ``identity``, each deferred tensor object takes over the contents of
    its real tensor (``_identity.take_over``) where eager's object is the one
    the module holds: references taken before (a local, an optimizer) are the
    real tensors then. Parameters and buffers first, then the views of
    :func:`_graded_plan` (built on the parameters in place; a tensor that a
    view is taken of can no longer be swapped). Every deferred object left
    meta is made stale (its first use raises, naming its path).
    """
    # id of a real tensor -> it (kept alive, so the id stays its own) and the
    # deferred object that took its contents over.
    owner: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    held, earlier = kept
    # Views of a tensor made real before (replayed ahead of this call, the
    # base of one of its parameters) are taken again below: the view holds
    # its base's C++ tensor, which could not be swapped then.
    late = {id(slot) for slot, _ in deferred if id(slot) in earlier}
    why: dict[int, tuple[Handle, str, str]] = {}  # objects left meta: path, reason
    later = {id(slot) for slot, _, _ in graded} | late

    def take(slot: Slot, handle: Handle) -> None:
        new = ready[id(slot)]
        if id(new) in owner:
            ready[id(slot)] = owner[id(new)][1]
            return
        old = slot.tensor
        if not identity or old is not handle.tensor or not old.is_meta:
            return
        recorded = handle.record.values[handle.vid].dtype if handle.record.values else new.dtype
        built_on = new.device.type == "cpu" or remap is not None
        if id(new) in held:
            reason = "its real tensor is held at another place already"
        elif not keeps_identity(slot.kind, new, recorded, built_on):
            reason = (
                "eager's module.to() replaces a buffer it moves or casts (to "
                f"{new.device.type}, {new.dtype}), and the old object keeps the old values"
            )
        else:
            unhook(handle, new)
            if take_over_memory(old, new) is not None:
                owner[id(new)] = (new, old)
                ready[id(slot)] = old
                mark_done(handle, old)  # the base of a view taken below
                why.pop(id(old), None)
                return
            reason = "torch.utils.swap_tensors could not give it the real contents: " + (
                f"{len(weakref.getweakrefs(old))} weak reference(s) to it exist "
                "(torch.func.functional_call, a FakeTensorMode or torch.compile run on "
                "the deferred model, or code keeping weakref.ref to its parameters)"
                if weakref.getweakrefs(old)
                else "a view of it taken after the block or an autograd graph through it holds it"
            )
        if id(new) not in held:
            carry_grad_hooks(old, new)
        why.setdefault(id(old), (handle, slot.path, reason))

    for slot, _ in deferred:
        if id(slot) in late:
            del ready[id(slot)]  # drops the view: its base can be swapped
    # nn.LSTM/GRU/RNN keep weak references to their parameters (made by
    # module.to(), a forward, functional_call), which swap_tensors refuses;
    # made again after the swaps, as eager's module.to() does.
    with _compat.rnn_weak_refs_dropped(s.owner for s, _ in deferred if identity):
        for slot, handle in deferred:
            if id(slot) not in later:
                take(slot, handle)
        again: dict[int, torch.Tensor] = {}  # one view for one tensor kept in several places
        for slot, handle in deferred:
            if id(slot) in late:
                if id(slot.tensor) not in again:
                    view = earlier_view(handle, slot.path)
                    assert view is not None  # found before, its base only swapped since
                    again[id(slot.tensor)] = dress_like(slot.tensor, view, handle.attrs)
                ready[id(slot)] = again[id(slot.tensor)]
        _graded_views(graded, ready)
        for slot, handle in deferred:
            if id(slot) in later:
                take(slot, handle)
        for slot, handle in deferred:
            new = ready[id(slot)]
            slot.put(new)
            settle(slot, handle, new)
    for handle, path, reason in why.values():
        if handle.tensor.is_meta:  # not taken over at another of its places
            unregister(handle)
            mark_stale(handle.tensor, path, reason)


def _refuse_emptied(module: nn.Module, at: str) -> None:
    """Refuse a model whose ``to_empty()`` was refused after it had emptied some tensors:
    they hold uninitialised memory, which materialize would keep (a sharded parameter is
    no longer meta, so no longer deferred in its eyes)."""
    if not any_emptied():
        return
    gone = emptied(
        [
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        ]
    )
    if gone:
        paths = [_join(at, n) for n in gone]
        raise MaterializationError(
            f"materialize cannot fill this model: Module.to_empty() ran on it and was refused "
            f"at a deferred tensor, after it had emptied {paths[:5]}"
            + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
            + " (uninitialised memory now, which no record refills). Fix: build the model "
            "again under deferred_init, reloading any real module it held (or load the "
            "values of these tensors), and use lightning_meta.materialize, MetaGuard (in a "
            "Trainer) or lightning_meta.fabric_setup (under Fabric) instead of to_empty().",
            paths=paths,
        )


def _complete_records(
    walk: list[tuple[str, nn.Module]], replayed: dict[int, Record], remap: torch.device | None
) -> None:
    """Settle the generators of, and release, every record touched with nothing left pending.

    ``walk`` is the module tree's ``named_modules()``.
    """
    touched = dict(replayed)
    touched.update(drop_stale(walk))
    for record in without_pending(touched.values()):
        complete(record, remap)


def outer_meta_refusal(paths: list[str]) -> MaterializationError:
    """The error for tensors of a block entered inside a ``torch.device("meta")`` context."""
    paths = sorted(paths)
    return MaterializationError(
        f"materialize cannot reproduce {paths}: their deferred_init block was entered "
        "inside a torch.device('meta') context (such as fabric.init_module(empty_init=True) "
        "or trainer.init_module(empty_init=True) under ModelParallelStrategy or "
        "FSDPStrategy), so every tensor was built on meta, where eager construction gives "
        "no values at all. Fix: leave empty_init unset (deferred_init already keeps the "
        "model on meta), or enter deferred_init outside the meta device context.",
        paths=paths,
    )


#: the buffers a norm layer tracking running statistics updates in a train-mode forward
_RUNNING_STATS = frozenset({"running_mean", "running_var", "num_batches_tracked"})


def check_deferred(
    deferred: list[tuple[Slot, Handle]],
    allow_uninitialized: bool,
    dtype: torch.dtype | None,
    who: str = "materialize",
) -> dict[int, torch.dtype]:
    """Refuse deferred tensors whose record cannot give their value (exactly) any more.

    Returns the dtype of each tensor (by ``id``) that ``module.to(dtype)``
    cast after the block, to cast its value alike.
    """
    # One pass over the tensors (the checks are per record or cheap per tensor);
    # the errors are raised below in order of what to fix first.
    on_meta: list[str] = []
    modified: list[str] = []
    statistics: list[str] = []  # of those, a norm layer's running statistics
    released: list[str] = []
    garbage: dict[str, str] = {}
    unsaved: list[str] = []  # of ``garbage``: in no state dict, so no checkpoint fills them
    recast: dict[int, torch.dtype] = {}
    replaced: list[str] = []
    for s, h in deferred:
        record = h.record
        if h.replaced() and not record.released:
            # module.to(dtype) casts the same values; a conversion that changes
            # nothing swaps the storage too (torch 2.13's swap_tensors), and so
            # does `tensor.data = other` of the same shape and dtype, which
            # cannot be told apart from it (see _watched).
            value, t = record.values[h.vid], s.tensor
            if tuple(t.shape) != value.size:
                replaced.append(s.path)
            elif t.dtype != value.dtype or len(casts(t)) > 1:  # .half().float() rounds
                recast[id(t)] = t.dtype
        if record.outer_meta:
            on_meta.append(s.path)
        if h.changed():  # s.tensor is h.tensor: a deferred slot holds its handle's
            modified.append(s.path)
            if s.name in _RUNNING_STATS and getattr(s.owner, "track_running_stats", False):
                statistics.append(s.path)
        if released_without_result(h):
            released.append(s.path)
        if h.vid in record.garbage and done(h) is None:
            garbage[s.path] = record.garbage[h.vid]
            if not s.persistent:
                unsaved.append(s.path)
    if on_meta:
        raise outer_meta_refusal(on_meta)
    if replaced:
        replaced.sort()
        raise MaterializationError(
            f"materialize cannot reproduce {replaced}: these deferred tensors were given other "
            "data, of another shape, after the deferred_init block (`tensor.data = ...`), "
            "which was not recorded. "
            "Fix: do it inside the deferred_init block, or after materialize.",
            paths=replaced,
        )
    if recast and dtype is not None:
        paths = sorted(s.path for s, _ in deferred if id(s.tensor) in recast)
        raise MaterializationError(
            f"{who}(dtype={dtype}) was asked to cast {paths}, which module.to() already cast "
            f"to another dtype after the deferred_init block. Fix: cast once: either "
            f"module.to(dtype) before {who} (without dtype=), or {who}(dtype=...) without it.",
            paths=paths,
        )
    if modified:
        modified.sort()
        raise MaterializationError(
            f"materialize cannot reproduce {modified}: these deferred tensors were modified "
            "in place after the deferred_init block ended (an in-place op, nn.init, or a write "
            "through .data such as `weight.data.normal_()`), and that change was not recorded. "
            "Fix: move the initialisation into the deferred_init block, or run it after "
            "materialize (so too a parametrization, such as register_parametrization or "
            "weight_norm, or pruning, applied to the deferred model)."
            + (
                f" {statistics} are running statistics, which a forward in train mode "
                "updates: a forward with meta inputs (to count FLOPs or follow shapes) "
                "updated them on meta; run such a forward in eval mode (model.eval(), then "
                "model.train()), and forwards with real inputs after materialize."
                if statistics
                else ""
            ),
            paths=modified,
        )
    if released:
        released.sort()
        raise MaterializationError(
            f"materialize cannot reproduce {released}: the tensor they are tied to was "
            "materialized and has since been dropped, so the record is gone. Fix: materialize "
            "the whole module in one call.",
            paths=released,
        )
    if garbage and not allow_uninitialized:
        where = "; ".join(f"{p!r} ({site})" for p, site in sorted(garbage.items()))
        fill = (
            "load them from a checkpoint (load_checkpoint or load_state_dict fill them "
            "without replaying), "
            if not unsaved
            else f"{sorted(unsaved)} are in no state dict (non-persistent buffers or plain "
            "attributes), so no checkpoint fills them; "
        )
        raise MaterializationError(
            "cannot replay deferred tensors that eager construction leaves uninitialised "
            f"(torch.empty, or resize_ growing a tensor, never filled): {where}. Their values "
            "would be whatever memory holds (writes at computed places, such as scatter_, "
            "index_copy_ or t[mask] = ..., count as covering part of a tensor, even where they "
            f"cover all of it). Fix: {fill}initialise them in the model, or keep "
            "eager construction's uninitialised memory with "
            + spelled(
                "allow_uninitialized=True (lm.materialize, lm.load_checkpoint, lm.MetaGuard and "
                "lm.fabric_setup take it; before a plain load_state_dict, call "
                "lm.materialize(module, allow_uninitialized=True) first).",
                "--allow-uninitialized.",
            ),
            paths=garbage,
        )
    return recast


def refuse_replaced(slots: Iterable[Slot]) -> None:
    """Refuse the meta tensors among ``slots`` that took a deferred tensor's place after the
    block (what ``module.to(dtype)`` makes of a buffer, litgpt's ``max_seq_length``) or
    that a weight utility made from deferred ones there (``prune``, a parametrization),
    with the message :func:`materialize` gives: what made them and the fix."""
    slots = list(slots)
    replaced = [s for s in slots if s.kind != "attr" and s.name in handles_of(s.owner)]
    derived = {p for paths in _derived_by_utility(slots).values() for p in paths}
    if replaced or derived:
        _check_plain([*replaced, *(s for s in slots if s.path in derived)], None)


def check_draw_on(draw_on: Any, who: str) -> None:
    """Refuse a ``draw_on`` other than ``"cpu"`` or ``"device"``, naming ``who`` was given it."""
    if draw_on not in ("cpu", "device"):
        raise ArgumentValueError(
            f"{who} got draw_on={draw_on!r}; expected 'cpu' or 'device'. Fix: pass "
            "draw_on='cpu' for the values of a model built on the CPU and moved, or "
            "draw_on='device' for those of a model built on the target device."
        )


def refuse_recast(slots: Iterable[Slot], who: str, every: Iterable[Slot] = ()) -> None:
    """Refuse the plain meta tensors among ``slots`` that ``module.to(dtype)`` made of deferred
    buffers after the block (meta tensors of their shape in their place: in another dtype,
    or in theirs after a cast there and back), with :func:`materialize`'s message naming
    ``who`` (``"load_checkpoint"``, which leaves other never-deferred meta tensors, such as
    litgpt's longer ``cos`` after ``max_seq_length = n``, on meta). ``every``: all the
    model's slots, where ``slots`` are some (the ones a checkpoint does not fill): a
    ``Module.type(dtype)`` cast of an integer buffer among the others changes the fix."""
    recast = [s for s in slots if _recast(s)]
    if recast:
        whole = sorted(s.path for s in every if _recast(s) and not _deferred_float(s))
        raise _recast_error(sorted(recast, key=lambda s: s.path), who, whole)


def _recast(s: Slot) -> bool:
    """Whether ``s`` holds a plain meta tensor a cast put in place of its deferred one."""
    return (
        s.kind != "attr"
        and s.tensor.is_meta
        and handle_of(s.tensor) is None  # a plain meta tensor, not the deferred one
        and not is_dtensor(s.tensor)  # sharded: matched to its handle apart
        and s.name in handles_of(s.owner)
        and _in_deferred_shape(s)
    )


def _deferred_float(s: Slot) -> bool:
    return handles_of(s.owner)[s.name].tensor.is_floating_point()


def _check_plain(
    plain: list[Slot], fallback: Fallback | None, modules: Iterable[nn.Module] = ()
) -> None:
    """Refuse never-deferred meta tensors, unless ``fallback`` can initialise every one."""
    modules = list(modules)
    # A parameter or buffer whose name still has a handle took the place of a
    # deferred tensor after the block. One of the deferred shape in another
    # dtype is what module.to(dtype) makes of a buffer: its value is the cast
    # of the recorded one, which reset_parameters() would not give. Any other
    # is a new tensor (litgpt's `model.max_seq_length = n`, a head built on
    # meta and assigned), never deferred, which the fallback initialises.
    replaced = [s for s in plain if s.kind != "attr" and s.name in handles_of(s.owner)]
    recast = sorted((s for s in replaced if _cast_of_deferred(s)), key=lambda s: s.path)
    if recast:
        raise _recast_error(recast, "materialize")
    derived = _derived_by_utility(plain)
    if derived:
        what = "; ".join(f"{paths} by {utility}" for utility, paths in sorted(derived.items()))
        raise MaterializationError(
            f"materialize cannot fill these meta tensors, made from a meta module's tensors "
            f"after it was built: {what}. They are computed from the module's tensors, which "
            "hold no values on meta (a deferred_init block's get theirs only at materialize), "
            "so no record gives their values, and reset_parameters() would not give them "
            "either. Fix: apply it after lightning_meta.materialize (under MetaGuard, in "
            "on_fit_start, which runs after it; Lightning's ModelPruning prunes after it).",
            paths=sorted(p for paths in derived.values() for p in paths),
        )
    if replaced and fallback is None:
        named = sorted(_replaced_by(s) for s in replaced)
        resettable = not without_reset(plain) and not overwritten(plain)
        raise MaterializationError(
            f"materialize cannot fill {named}: these deferred tensors were replaced after the "
            "deferred_init block by new meta tensors, which were never deferred, so the "
            "record gives no values for them (an assignment such as litgpt's "
            "`model.max_seq_length = n`, module.to() there and back such as `.half().float()`, "
            "which gives floating-point buffers new tensors, a module built on meta and set "
            "in, such as "
            "set_output_embeddings(nn.Linear(..., device='meta')), or a wrapper that "
            "reshapes or flattens parameters). Fix: "
            + (
                "pass fallback='reset_parameters' to lightning_meta.materialize to initialise "
                "them with their modules' reset_parameters(), as eager construction of new "
                "modules does (MetaGuard passes none: in a Trainer, make the change inside "
                "the block or after materialize; no fallback "
                "gives a tensor computed from deferred ones, such as "
                "nn.Parameter(model.emb.weight * 2): make it after materialize), or "
                if resettable
                else ""
            )
            + "assign real tensors there (or make the change inside the deferred_init block, "
            "or after materialize); for sharding, use fully_shard (FSDP2) or "
            "parallelize_module (tensor parallel), which keep the global shape, or "
            "materialize before wrapping (FSDP1: let the strategy wrap and materialize).",
            paths=sorted(s.path for s in replaced),
        )
    sharded = sorted(s.path for s in plain if is_dtensor(s.tensor))
    if sharded and fallback is not None:
        raise MaterializationError(
            f"materialize(fallback='reset_parameters') cannot initialise the sharded meta "
            f"tensors {sharded}: they were not built under deferred_init, and "
            "reset_parameters() on a shard draws values that differ from eager construction. "
            "Fix: build the module under deferred_init before sharding it, or load these "
            "tensors from a checkpoint.",
            paths=sharded,
        )
    converted = converted_batchnorm(plain, modules)
    if converted and fallback is None:
        raise MaterializationError(
            converted_batchnorm_message("materialize", converted), paths=converted
        )
    if plain and fallback is None:
        paths = sorted(s.path for s in plain)
        # The fallback named only where it would run (a module without reset_parameters,
        # or one holding other tensors, is refused by it in turn).
        tail = (
            "load them from a checkpoint, or pass fallback='reset_parameters' to initialise "
            "them with reset_parameters()"
            if not without_reset(plain) and not overwritten(plain)
            else "or load them from a checkpoint"
        )
        # In a model built in a block, "build it inside deferred_init" is no fix: a meta
        # tensor made before the block and set in it, or after it, or made inside it where
        # the block sees no op (torch.tensor(5) under a torch.device("meta") there).
        if any(
            handles_of(m) or ON_META_ATTR in vars(m) for m in [*modules, *(s.owner for s in plain)]
        ):
            # A module's own _apply (torchmetrics' Metric) casts its plain tensor
            # attributes with .to() after the block: new meta tensors, no record's.
            cast = sorted({type(s.owner).__name__ for s in plain if _compat.converts_own(s.owner)})
            hint = (
                f" If the model was moved or cast after the block (.to(), .half()): "
                f"{', '.join(cast)} convert(s) the tensors they keep in plain attributes in "
                "their own _apply, which gives new meta tensors no block recorded; pass "
                "device= or dtype= to materialize (or load_checkpoint) instead, which "
                "converts them as .to() would."
                if cast
                else ""
            )
            raise MaterializationError(
                f"materialize found meta tensors that no deferred_init block recorded: "
                f"{paths}, in a model built in one: made on meta before the block and set in "
                "it, or after it, or inside it where the block sees no op (torch.tensor(...) "
                "under a torch.device('meta') context inside the block). Their values are "
                "unknown. Fix: make them inside the block without the meta device (the block "
                "keeps them on meta until materialize) or after materialize (a tensor computed "
                f"from the model's), {tail}." + hint,
                paths=paths,
            )
        raise MaterializationError(
            f"materialize found meta tensors that were not built under deferred_init: {paths}. "
            "Their values are unknown. Fix: build the module inside `with "
            f"lightning_meta.deferred_init():`, {tail}.",
            paths=paths,
        )
    drawn_again = overwritten(plain)
    if drawn_again:
        where = "; ".join(f"{m!r}: {others}" for m, others in sorted(drawn_again.items()))
        raise MaterializationError(
            f"materialize(fallback='reset_parameters') cannot run reset_parameters() of modules "
            f"that hold other tensors than the meta ones it fills ({where}): it would draw "
            "those again, which eager construction does not. Fix: assign real tensors in "
            f"place of {sorted(s.path for s in plain)}, or build them under deferred_init.",
            paths=sorted({p for others in drawn_again.values() for p in others}),
        )
    missing = without_reset(plain)
    if missing:
        raise MaterializationError(
            f"materialize(fallback='reset_parameters') cannot initialise {missing}: their "
            "modules have no reset_parameters(). Fix: build the module under deferred_init "
            "(load_checkpoint then loads its weights and replays the rest), or load these "
            "tensors from a checkpoint that holds them (none holds a non-persistent buffer, "
            "such as a rotary inv_freq: assign a real one).",
            paths=missing,
        )


def _derived_by_utility(plain: list[Slot]) -> dict[str, list[str]]:
    """The never-deferred meta tensors that torch's weight utilities computed on meta, by utility.

    A parametrization registered on a meta module (``parametrizations.weight_norm``
    after the block) makes its ``original0``/``original1`` from the module's
    meta weight; the hook-based ``prune``, ``weight_norm`` and ``spectral_norm``
    make ``<name>_mask``, ``<name>_g``/``<name>_v``, ``<name>_u`` and the
    recomputed ``<name>`` the same way. Neither a record nor ``reset_parameters``
    gives their values: only applying the utility to real tensors does.
    """
    found: dict[str, list[str]] = {}
    for s in plain:
        utility = None
        if isinstance(s.owner, nn.utils.parametrize.ParametrizationList):
            utility = "a parametrization (register_parametrization, parametrizations.weight_norm)"
        else:
            for hook, name in _compat.recomputing_hooks(s.owner):
                if s.name == name or s.name.startswith(name + "_"):
                    utility = type(hook).__module__  # torch.nn.utils.prune, .weight_norm, ...
        if utility is not None:
            found.setdefault(utility, []).append(s.path)
    return {utility: sorted(paths) for utility, paths in found.items()}


def converted_batchnorm(plain: Iterable[Slot], modules: Iterable[nn.Module]) -> list[str]:
    """The never-deferred meta tensors that ``convert_sync_batchnorm`` moved out of a block's BatchNorm.

    ``nn.SyncBatchNorm.convert_sync_batchnorm`` after the block moves each
    BatchNorm's tensor objects into a new module; what replays them (their
    handles) was the replaced BatchNorm's, and went with it. Named only
    when every such tensor of a handle-less ``SyncBatchNorm`` matches (shape,
    dtype) a parameter or buffer of a record of ``modules`` that no live
    handle holds any more, and nothing else in ``plain`` is left: a
    ``SyncBatchNorm`` built on meta directly gets the plain message.
    """
    plain = list(plain)
    orphans: set[tuple[tuple[int, ...], torch.dtype]] = set()
    records = {id(h.record): h.record for m in modules for h in handles_of(m).values()}
    for record in records.values():
        held = {h.vid for h in record.pending} | set(record.materialized)
        for vids in record.owned.values():
            for vid in vids:
                if vid not in held:
                    value = record.values[vid]
                    orphans.add((tuple(value.size), value.dtype))
    found = [
        s
        for s in plain
        if s.kind != "attr" and isinstance(s.owner, nn.SyncBatchNorm) and not handles_of(s.owner)
    ]
    if not found or len(found) != len(plain):
        return []
    if any((tuple(s.tensor.shape), s.tensor.dtype) not in orphans for s in found):
        return []
    return sorted(s.path for s in found)


def converted_batchnorm_message(who: str, paths: list[str]) -> str:
    """Why ``who`` cannot fill ``paths`` (see :func:`converted_batchnorm`), and what works."""
    return (
        f"{who} cannot fill {paths}: they are held by SyncBatchNorm modules that were not "
        "built under deferred_init. nn.SyncBatchNorm.convert_sync_batchnorm, called after "
        "the deferred_init block, moves each BatchNorm's meta tensors into a new module, "
        "and what replays them stayed with the BatchNorm it replaced. Fix: convert inside "
        "the block (`with lm.deferred_init(): model = "
        "nn.SyncBatchNorm.convert_sync_batchnorm(build())`), or materialize first "
        "(lm.materialize(model, device=fabric.device)), then convert, then fabric.setup."
    )


def _recast_error(
    recast: list[Slot], who: str, whole: list[str] | None = None
) -> MaterializationError:
    """The refusal of buffers ``module.to(dtype)`` replaced after the block, naming ``who``;
    ``whole``: the integer or bool ones ``Module.type(dtype)`` cast (``recast``'s where
    empty)."""
    owners = sorted({s.path.rpartition(".")[0] for s in recast})
    # Materializing the root would be the whole model: that fix only for submodules.
    real_first = (
        "make these buffers real before it (for p in "
        f"{owners}: lm.materialize(model.get_submodule(p)); then module.to(dtype), then "
        "shard), or "
        if all(owners)
        else ""
    )
    what = (
        f"{who} cannot fill {[_replaced_by(s) for s in recast]}: these deferred tensors were "
        "replaced after the deferred_init block by new meta tensors of their shape, what "
        "module.to(dtype) (or .half(), .bfloat16(), or a cast there and back) makes of "
        "floating-point buffers, whose values the record cannot give (it cannot tell one "
        "cast from several, which round more)."
    )
    # Module.type(dtype) casts integer and bool tensors too, which dtype= (as
    # module.to(dtype)) leaves alone: that fix would give other dtypes than eager's.
    if not whole:
        whole = sorted(s.path for s in recast if not _deferred_float(s))
    if whole:
        return MaterializationError(
            f"{what} {whole} were not floating point when deferred: module.type(dtype) casts "
            f"every tensor, which {spelled('dtype=', '--dtype')} leaves as module.to(dtype) "
            f"does. Fix: drop the cast before {who} and call module.type(dtype) after it, on the "
            "real model.",
            paths=[s.path for s in recast],
        )
    in_dtype = (
        "build the model in that dtype inside the block (torch.set_default_dtype, "
        "transformers' from_config(config, dtype=...))"
    )
    if who == "fabric_setup":
        fix = (
            "drop the cast and give Fabric the precision (L.Fabric(precision='bf16-true') or "
            "'16-true'): fabric_setup makes the buffers real before Fabric's precision casts "
            f"the model; or {in_dtype}."
        )
    else:
        fix = (
            f"pass {spelled('dtype=', '--dtype')} to {who} instead of module.to(dtype), or "
            "assign real tensors there; where the model is sharded after the cast (which "
            f"fixes the dtype of the shards), {real_first}{in_dtype}; in a Trainer "
            "(MetaGuard), drop the cast and pass precision='bf16-true' or '16-true'; under "
            "Fabric, whose bf16-true/16-true precision casts the model in fabric.setup before "
            "parallelize_fn, use lm.fabric_setup(fabric, model), which makes buffers real "
            "before that cast."
        )
    return MaterializationError(f"{what} Fix: {fix}", paths=[s.path for s in recast])


def _in_deferred_shape(slot: Slot) -> bool:
    """Whether ``slot``'s tensor has the shape of the deferred one it replaced."""
    return tuple(slot.tensor.shape) == tuple(handles_of(slot.owner)[slot.name].tensor.shape)


def _cast_of_deferred(slot: Slot) -> bool:
    """Whether ``slot``'s tensor has the shape of the deferred one it replaced, in another dtype."""
    deferred = handles_of(slot.owner)[slot.name].tensor
    return _in_deferred_shape(slot) and slot.tensor.dtype != deferred.dtype


def _replaced_by(slot: Slot) -> str:
    deferred = handles_of(slot.owner)[slot.name].tensor
    if tuple(slot.tensor.shape) == tuple(deferred.shape) and slot.tensor.dtype == deferred.dtype:
        return f"{slot.path} (a new {type(slot.tensor).__name__} of its shape and dtype)"
    if tuple(slot.tensor.shape) == tuple(deferred.shape):
        return (
            f"{slot.path} ({type(slot.tensor).__name__} in {slot.tensor.dtype}, deferred in "
            f"{deferred.dtype})"
        )
    return (
        f"{slot.path} ({type(slot.tensor).__name__} of shape {tuple(slot.tensor.shape)}, "
        f"deferred as {tuple(deferred.shape)})"
    )


# -- sharded parameters (FSDP2 fully_shard, tensor parallel parallelize_module)
#
# torchtitan's meta -> shard -> materialize sequence: the deferred parameter
# was swapped for a meta DTensor of the same global shape, while its handle
# stays on the owning module under the same name. Only the local shards are
# allocated; each full tensor is replayed in turn and this rank's slice copied.


@dataclass(frozen=True)
class ShardedSlot:
    """A deferred tensor that a meta ``DTensor`` of the same global shape now stands for."""

    path: str
    owner: nn.Module
    name: str
    handle: Handle
    dtensor: torch.Tensor

    def as_slot(self) -> Slot:
        """The slot as it was when deferred (for the checks on the handle's own tensor)."""
        if isinstance(self.dtensor, nn.Parameter):
            return Slot(self.path, self.owner, "param", self.name, self.handle.tensor, True)
        return Slot(self.path, self.owner, "buffer", self.name, self.handle.tensor, True)


def sharded_slots(
    module: nn.Module, walk: Iterable[tuple[str, nn.Module]] | None = None
) -> list[ShardedSlot]:
    """Return the deferred tensors of ``module`` that ``fully_shard`` / TP turned into meta DTensors.

    A DTensor shared by several modules (tied weights) is listed once, under
    its first path. ``walk``: ``module.named_modules()`` when the caller has
    it already (a shared submodule's later names add nothing: its DTensors
    are listed under their first path either way).
    """
    found: list[ShardedSlot] = []
    seen: set[int] = set()
    for prefix, mod in module.named_modules() if walk is None else walk:
        for name, handle in handles_of(mod).items():
            t = tensor_at(mod, name)
            if (
                t is not None
                and t is not handle.tensor
                and t.is_meta
                and is_dtensor(t)
                and tuple(t.shape) == tuple(handle.tensor.shape)
                and id(t) not in seen
            ):
                seen.add(id(t))
                path = f"{prefix}.{name}" if prefix else name
                found.append(ShardedSlot(path, mod, name, handle, t))
    return found


#: how to get a sharded model of another dtype than deferred_init built it in
SHARDED_CAST_FIX = (
    "build the model in that dtype inside the deferred_init block (torch.set_default_dtype, "
    "or transformers' from_config(config, dtype=...)); or cast before sharding: "
    "lm.materialize the modules holding floating-point buffers (rotary inv_freq), whose "
    "meta tensors module.to(dtype) replaces, then model.to(dtype), then fully_shard / "
    "parallelize_module; or keep the dtype and use FSDP2's MixedPrecisionPolicy"
)


def refuse_written_shards(sharded: Iterable[ShardedSlot], doing: str = "materialize") -> None:
    """Raise for sharded deferred tensors written in place since sharding: a replay loses it.

    ``fully_shard`` and ``parallelize_module`` make each DTensor new, at
    version 0, over a local shard at version 0 too; an in-place op on the
    DTensor (``nn.init.zeros_``, ``mul_`` under ``no_grad``) bumps the first,
    one on its local shard (``p.to_local().zero_()``) the second; on meta
    neither write holds values. A write through ``.data`` bumps neither (it
    has a counter of its own), nor does a ``torch._foreach_*_`` op on the
    DTensors (which run it on their local shards below autograd): both are
    documented gaps.
    """
    written = sorted(
        s.path
        for s in sharded
        if _compat.version_of(s.dtensor) != 0 or _compat.version_of(s.dtensor.to_local()) != 0  # type: ignore[attr-defined]
    )
    if written:
        raise MaterializationError(
            f"{doing} cannot reproduce {written}: these deferred tensors were modified in "
            "place after fully_shard / parallelize_module sharded them (nn.init, an "
            "in-place op under no_grad, on the parameter or its local shard "
            "p.to_local()), which was not recorded: on meta a write changes "
            "nothing, so eager's shards would differ from the replayed ones. Fix: move the "
            "initialisation into the deferred_init block, or run it once the shards hold "
            "values: after lm.materialize or lm.fabric_setup, or, under MetaGuard, in "
            "on_fit_start.",
            paths=written,
        )


def _check_sharded(
    sharded: list[ShardedSlot], target: torch.device, dtype: torch.dtype | None
) -> None:
    """Refuse, before anything is allocated, sharded tensors no exact shard can be made for."""
    if not sharded:
        return
    refuse_written_shards(sharded)
    from torch.distributed.tensor import Partial

    partial = sorted(s.path for s in sharded if any(isinstance(p, Partial) for p in _placements(s)))
    if partial:
        raise MaterializationError(
            f"materialize cannot fill {partial}: their DTensor placements include Partial "
            "(pending sums), which no slice of the full tensor gives. Fix: shard or replicate "
            "these parameters (Shard/Replicate placements), as fully_shard and the tensor "
            "parallel styles do.",
            paths=partial,
        )
    other = sorted(s.path for s in sharded if _mesh_device_type(s) != target.type)
    if other:
        kinds = sorted({_mesh_device_type(s) for s in sharded})
        raise MaterializationError(
            f"materialize was asked for device={str(target)!r}, but the sharded parameters "
            f"{other} live on a {'/'.join(kinds)} device mesh. Fix: pass this rank's device "
            f"of that type, e.g. device=fabric.device or trainer.strategy.root_device.",
            paths=other,
        )
    if dtype is not None:
        cast = sorted(s.path for s in sharded if s.dtensor.dtype != dtype)
        if cast:
            raise MaterializationError(
                f"materialize(dtype={dtype}) cannot cast the sharded parameters {cast}: "
                "fully_shard and parallelize_module fixed their dtype when they sharded them. "
                f"Fix: {SHARDED_CAST_FIX}.",
                paths=cast,
            )


def _placements(s: ShardedSlot) -> tuple[Any, ...]:
    return tuple(getattr(s.dtensor, "placements", ()))


def _mesh_device_type(s: ShardedSlot) -> str:
    return str(s.dtensor.device_mesh.device_type)  # type: ignore[attr-defined]


def fill_shards(
    module: nn.Module, sharded: list[ShardedSlot], device: torch.device, draw_on: DrawOn = "cpu"
) -> None:
    """Allocate the local shards of ``sharded`` on ``device`` and fill each exactly."""
    check_same_replays(sharded, device, draw_on)
    _allocate_shards(module, {id(s.dtensor) for s in sharded}, device)
    for s in sharded:
        _fill_shard(s, device, draw_on)


def check_same_replays(
    sharded: list[ShardedSlot],
    device: torch.device,
    draw_on: DrawOn,
    doing: str = "materialize",
) -> None:
    """Refuse tensor parallel parameters whose replays differ between the ranks of their mesh.

    Eager ``distribute_tensor`` (``parallelize_module``) slices the full
    tensor of the rank its ``src_data_rank`` names (0 by default; ``None``:
    each rank its own), which the DTensor does not record. Where every rank
    of the mesh replays the same full tensor, each rank's own slice is
    eager's whatever that setting was; otherwise no choice is exact for every
    setting. One small all-reduce per mesh compares a digest of what each
    replay starts from (:func:`replay_inputs`); ranks agree on whether to
    run it, as they hold the same parameters. ``fully_shard`` of a plain
    tensor keeps each rank's own chunk eagerly, so it needs no check.
    """
    sources = _compat.fsdp_value_meshes()
    remap = device if draw_on == "device" and device.type != "cpu" else None
    meshes: dict[tuple[Any, ...], tuple[Any, list[ShardedSlot]]] = {}
    for s in sharded:
        mesh = sources.get((id(s.owner), s.name), s.dtensor.device_mesh)  # type: ignore[attr-defined]
        if mesh is not None:
            key = (tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist()))
            meshes.setdefault(key, (mesh, []))[1].append(s)
    for mesh, slots in meshes.values():
        digests = [replay_inputs(s.handle.record, {s.handle.vid}, remap) for s in slots]
        # 62 bits of each digest: both signs fit int64, so one MAX gives max and min.
        mine = torch.tensor([int.from_bytes(d[:8], "big") >> 2 for d in digests], dtype=torch.int64)
        both = torch.cat([mine, -mine]).to(device)
        _compat.all_reduce_max_over_mesh(both, mesh)
        high, low = both[: len(slots)].cpu(), -both[len(slots) :].cpu()
        apart = sorted(s.path for s, hi, lo in zip(slots, high, low, strict=True) if hi != lo)
        if apart:
            raise MaterializationError(
                f"{doing} cannot give the tensor parallel parameters {apart} eager's "
                "shards: the ranks of their device mesh replay different values (a seed per "
                "rank, such as fabric.seed_everything(42 + rank), before the deferred_init "
                "block, a torch.Generator seeded per rank, or a number that depends on the "
                "rank in the construction code). Eager parallelize_module's shards then depend "
                "on its src_data_rank (rank 0's values by default, each rank's own with None), "
                "which the DTensor does not record. Fix: build the same model on every rank: "
                "seed every rank the same before the deferred_init block (L.seed_everything(42) "
                "or torch.manual_seed(42)), the same for generators passed to it, and reseed per "
                "rank after materialize or lm.fabric_setup if you want per-rank randomness for "
                "training.",
                paths=apart,
            )


def _allocate_shards(module: nn.Module, wanted: set[int], device: torch.device) -> None:
    # Module.to_empty() on the root would also replace every *real* tensor
    # with uninitialised memory (the damage Lightning's materializer does);
    # only the wanted meta DTensors (the local shards) are allocated here.
    # FSDPModule._apply re-registers its sharded parameters afterwards, as it
    # does for to_empty().
    def empty_if_wanted(t: torch.Tensor) -> torch.Tensor:
        if id(t) in wanted:
            return torch.empty_like(t, device=device)
        return t

    _compat.apply_to_tensors(module, empty_if_wanted)


def _fill_shard(s: ShardedSlot, device: torch.device, draw_on: DrawOn) -> None:
    """Copy this rank's piece of the eager full tensor into ``s``'s allocated local shard.

    Eager ``fully_shard`` chunks each rank's own tensor, and for a parameter
    ``parallelize_module`` made, every rank of its mesh replays the same full
    tensor (:func:`check_same_replays`): each rank slices its own replay.
    """
    from torch.distributed.tensor import DTensor

    full = _replay_one(s.name, s.handle, device, draw_on)
    target = tensor_at(s.owner, s.name)
    if not isinstance(target, DTensor) or target.is_meta:
        raise MaterializationError(
            f"materialize expected an allocated DTensor at {s.path!r} after allocating the "
            f"shards, found {type(target).__name__}. Fix: apply fully_shard / "
            "parallelize_module to the deferred model before materialize, and do not replace "
            "its parameters in between.",
            paths=[s.path],
        )
    local = _compat.local_shard(full, target.device_mesh, target.placements)
    own = target.to_local()
    if local.shape != own.shape:  # copy_ would broadcast a wrong piece without a word
        raise MaterializationError(
            f"materialize computed a piece of shape {tuple(local.shape)} for {s.path!r}, whose "
            f"local shard on this rank is {tuple(own.shape)} (placements "
            f"{list(target.placements)}). Fix: materialize before sharding (lm.materialize, "
            "then fully_shard / parallelize_module), and report the placements as a bug.",
            paths=[s.path],
        )
    with torch.no_grad():
        own.copy_(local)
    drop(s.owner, s.name, s.handle)


def _replay_one(name: str, handle: Handle, device: torch.device, draw_on: DrawOn) -> torch.Tensor:
    """Replay one deferred tensor, full size, through a scratch module holding only it."""
    scratch = lone_module(name, handle)
    # Not swapped into the deferred tensor: it stands for the full tensor,
    # which this rank keeps only a shard of (peak memory: one full tensor).
    materialize_paths(scratch, None, device=device, draw_on=draw_on, identity=False)
    out = tensor_at(scratch, name)
    if out is None or out.is_meta:  # materialize raises first; this guards the invariant
        raise MaterializationError(f"materialize left {name!r} on meta", paths=[name])
    return out.detach()
