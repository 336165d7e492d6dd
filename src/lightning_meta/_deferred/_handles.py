"""The owner of the deferred record's bookkeeping: handles, what is pending, what is done.

A :class:`Handle` links one deferred meta tensor to the :class:`Record` of its
block and its value id. Handles live in their module's ``__dict__`` (under
:data:`~lightning_meta._slots.HANDLES_ATTR`) so they follow ``deepcopy`` and
``pickle``; a registry finds the handle of a tensor. Tensors a module keeps
inside a list, tuple or dict attribute are deferred too: their handles live
in a second table (:data:`ITEMS_ATTR`) and their places are
item slots (:class:`ItemSlot`). Every change to a record's ``pending`` set and
``materialized`` table, and to a module's handle tables, is made by a
function of this module; the block, ``materialize``, the load hooks, the
checkpoint loader and MetaGuard call them.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from lightning_meta import _compat
from lightning_meta._deferred._identity import mark_stale
from lightning_meta._deferred._record import Record, Value, span
from lightning_meta._errors import MaterializationError, MetaTensorWarning
from lightning_meta._slots import HANDLES_ATTR, Slot, iter_slots, own_slots, slot_at, tensor_at
from lightning_meta._watched import casts, note_casts, tensor_class, unwatch, watch

__all__ = [
    "ITEMS_ATTR",
    "Handle",
    "ItemSlot",
    "apart_by_copy",
    "attach",
    "attach_item",
    "deferred_tensors",
    "earlier_view",
    "graph_view",
    "refuse_apart",
    "refuse_graded",
    "view_of",
    "wait_for_base",
    "dress_like",
    "item_slots",
    "mark_on_meta",
    "on_meta_on_purpose",
    "keep_ahead",
    "deferred_paths",
    "deferred_slots",
    "done",
    "drop",
    "drop_stale",
    "forget",
    "handle_of",
    "handles_of",
    "held_deferred",
    "lone_module",
    "made_for",
    "mark_done",
    "warn_overwritten",
    "note_made",
    "own_deferred",
    "pending_base",
    "rebuilt",
    "released_without_result",
    "replaced_by_to",
    "settle",
    "settle_waiting",
    "tensor_attrs",
    "unhook",
    "unregister",
    "without_pending",
]


class Handle:
    """Links one deferred meta tensor to its record and value id.

    Handles live in the owning module's ``__dict__`` so they follow
    :func:`copy.deepcopy` and :mod:`pickle`; unpickling re-registers the
    (copied) tensor so :func:`handle_of` finds it again.
    """

    __slots__ = ("__weakref__", "record", "storage", "tensor", "version", "vid")

    def __init__(self, tensor: torch.Tensor, record: Record, vid: int) -> None:
        self.tensor, self.record, self.vid = tensor, record, vid
        self.version = _compat.version_of(tensor)
        # What the tensor's .data is: `p.data = x` and `module.to(dtype)` after
        # the block give the same tensor object another storage. Held, not
        # its id: two conversions (`.to(memory_format=...).double()`) free the
        # storage between, and the last one's could get its address back.
        self.storage: torch.UntypedStorage | None = tensor.untyped_storage()
        _register(self)

    def changed(self) -> bool:
        """Whether the tensor was written in place (``nn.init``, through ``.data``) since the block."""
        return _compat.version_of(self.tensor) != self.version

    def replaced(self) -> bool:
        """Whether the tensor was given other data (``.data =``, ``module.to(dtype)``) since."""
        return self.storage is None or _compat.storage_id(
            self.tensor.untyped_storage()
        ) != _compat.storage_id(self.storage)

    @property
    def attrs(self) -> dict[str, Any]:
        """The attributes model code set on the deferred tensor, in the block or after it.

        Read when the real tensor is made, not when the block ends: eager
        construction's tensor has what was set since (``p._no_weight_decay =
        True`` for optimizer groups) and lacks what was deleted.
        """
        return tensor_attrs(self.tensor)

    def __getstate__(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in self.__slots__ if k != "__weakref__"}
        # Only the in-place writes since recording matter, and rebuilding the
        # tensor may bump its counter (torch.multiprocessing does, so every
        # module sent to a ddp_spawn worker would look modified): keep the
        # difference, not the absolute count.
        state["version"] = _compat.version_of(self.tensor) - self.version
        state["storage"] = self.replaced()  # storage ids mean nothing in another copy
        state["casts"] = casts(self.tensor)  # noted by the tensor's id, which copies lack
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        writes = state.pop("version")
        replaced = state.pop("storage")
        chain = state.pop("casts", [])
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "version", _compat.version_of(self.tensor) - writes)
        storage = None if replaced else self.tensor.untyped_storage()
        object.__setattr__(self, "storage", storage)
        _register(self)
        note_casts(self.tensor, chain)


# id of a deferred meta tensor -> a weak ref to its handle. Weak: the module
# owning the handle decides how long it lives. No weak ref to the tensor:
# ``materialize`` gives the deferred tensor object its real contents with
# ``torch.utils.swap_tensors`` (see ``_identity``), which refuses a tensor
# anything refers to weakly. The handle holds its tensor, so while the handle
# lives the id is that tensor's; a lookup checks ``handle.tensor`` is the
# tensor asked about. A plain dict by ``id``, not torch's
# ``WeakIdKeyDictionary``, whose every lookup builds a Python key object
# (materialize looks up every tensor).
_REGISTRY: dict[int, weakref.ref[Handle]] = {}


# id of a meta tensor (deferred or plain) made real by a load, or replayed
# ahead of its module -> weak refs to it and to the real tensor made for it.
# The same meta tensor held at another place (a tie made after construction,
# whose other end was loaded first) gets that real tensor, as the eager tie
# would (see :func:`made_for`). ``materialize`` drops an entry before it
# swaps the meta tensor's contents (:func:`unhook`).
_MADE: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor]]] = {}


def _unregister(
    key: int,
    dead: weakref.ref[Any],
    registry: dict[int, Any] = _REGISTRY,
) -> None:
    """Drop the entry of a handle or tensor that died (unless the id went to another since).

    ``registry`` is bound at definition: the callback may run while the
    interpreter shuts down, when module globals can already be gone.
    """
    entry = registry.get(key)
    if entry is not None and (entry is dead or (isinstance(entry, tuple) and entry[0] is dead)):
        registry.pop(key, None)


def _register(handle: Handle) -> None:
    """Let :func:`handle_of` find ``handle`` from its tensor (a live handle already there wins)."""
    tensor = handle.tensor
    watch(tensor)
    key = id(tensor)
    entry = _REGISTRY.get(key)
    if entry is not None:
        current = entry()
        if current is not None and current.tensor is tensor:
            return
    _REGISTRY[key] = weakref.ref(handle, functools.partial(_unregister, key))


def handle_of(tensor: torch.Tensor) -> Handle | None:
    """Return the handle of ``tensor`` if it is still a deferred meta tensor."""
    if not tensor.is_meta:
        return None
    entry = _REGISTRY.get(id(tensor))
    handle = entry() if entry is not None else None
    if handle is None or handle.tensor is not tensor:
        return None
    return handle


def deferred_tensors() -> list[torch.Tensor]:
    """Every deferred tensor still alive and still meta (what no materialize or load filled)."""
    out = []
    for ref in list(_REGISTRY.values()):
        handle = ref()
        if handle is not None and handle_of(handle.tensor) is handle:
            out.append(handle.tensor)
    return out


def unhook(handle: Handle, tensor: torch.Tensor) -> None:
    """Drop this package's weak refs to ``handle``'s deferred tensor and to ``tensor``.

    Before ``torch.utils.swap_tensors`` puts ``tensor``'s contents into the
    deferred tensor (it refuses tensors with weak refs): a value replayed
    ahead of its module (:func:`keep_ahead`) is noted as done with weak refs.
    :func:`mark_done` notes the result afterwards.
    """
    meta = handle.tensor
    entry = _MADE.get(id(meta))
    if entry is not None and entry[0]() is meta:
        del _MADE[id(meta)]
    ref = handle.record.materialized.get(handle.vid)
    if ref is not None and ref() is tensor:
        del handle.record.materialized[handle.vid]


def unregister(handle: Handle) -> None:
    """Make :func:`handle_of` find no handle for ``handle``'s tensor (left stale, see ``_identity``)."""
    entry = _REGISTRY.get(id(handle.tensor))
    if entry is not None and entry() is handle:
        del _REGISTRY[id(handle.tensor)]
        unwatch(handle.tensor)


def warn_overwritten(paths: list[str], by: str) -> None:
    """Warn that ``by`` filled deferred tensors that were changed after their block.

    The values are the checkpoint's, as eagerly; but a change after the
    block ran on meta, so random numbers eager's change draws
    (``nn.init.normal_``) were not drawn, and the global generator may not
    stand where eager's does.
    """
    if paths:
        warnings.warn(
            f"{by} filled {sorted(paths)}, which were changed in place after their "
            "deferred_init block (an initialisation such as nn.init.normal_ or "
            "weight.data.normal_): the values are the checkpoint's, as eagerly, but random "
            "numbers that change draws eagerly were not drawn on meta, so the global generator "
            "may not stand where eager's does (dropout and data shuffling afterwards differ). "
            "Fix: initialise inside the deferred_init block, or skip the initialisation when "
            "a checkpoint follows.",
            MetaTensorWarning,
            stacklevel=_outside(),
        )


def _outside() -> int:
    """The ``stacklevel`` of the first frame (from the caller of ``warnings.warn``) outside
    this package, torch and Lightning: the user's line that loaded (``trainer.fit`` on a
    ``ckpt_path=`` resume)."""
    own = tuple(
        str(Path(module.__file__).resolve().parent) + os.sep
        for name in ("lightning_meta", "torch", "lightning", "pytorch_lightning")
        if (module := sys.modules.get(name)) is not None and module.__file__
    )
    frame, level = sys._getframe(2), 2
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(own):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def made_for(tensor: torch.Tensor) -> torch.Tensor | None:
    """The real tensor the meta ``tensor`` became at another place, if alive.

    A tie made after construction (``model.head.weight = model.emb.weight``)
    holds one meta tensor at two places; materializing or loading one place
    first leaves the other holding the old meta tensor, which gets that real
    tensor.
    """
    entry = _MADE.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        return None
    return entry[1]()


def handles_of(module: nn.Module) -> dict[str, Handle]:
    """Return a copy of ``module``'s own table of deferred tensor names to handles."""
    return dict(module.__dict__.get(HANDLES_ATTR) or {})


def attach(
    record: Record,
    module: nn.Module,
    name: str,
    meta: torch.Tensor,
    vid: int,
    handle: Handle | None = None,
) -> Handle:
    """Make ``module.name`` (holding ``meta``) a deferred tensor of ``record``'s value ``vid``.

    ``handle`` reuses the handle of a tensor already attached elsewhere (a
    tie). Returns the handle.
    """
    if handle is None:
        handle = Handle(meta, record, vid)
        record.pending.add(handle)
    module.__dict__.setdefault(HANDLES_ATTR, {})[name] = handle
    return handle


# The ``__dict__`` entry of a module mapping the dotted place of each deferred
# tensor held in a container attribute (``"cache.0"``) to its item.
ITEMS_ATTR = "_lightning_meta_deferred_items"


class Item(NamedTuple):
    """A deferred tensor inside a container attribute: the attribute, the keys down, the handle."""

    attr: str
    keys: tuple[Any, ...]
    handle: Handle


@dataclass(frozen=True)
class ItemSlot(Slot):
    """A place inside a list, tuple or dict attribute of a module: ``owner.name[k0][k1]...``.

    Tuples on the way are rebuilt (they cannot change in place); lists and
    dicts are changed in place, so other references to them see the new
    tensor too.
    """

    keys: tuple[Any, ...] = ()

    def current(self) -> torch.Tensor | None:
        """The tensor the place holds now (``None`` if the container changed shape)."""
        node: Any = self.owner.__dict__.get(self.name)
        try:
            for key in self.keys:
                node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
        return node if isinstance(node, torch.Tensor) else None

    def put(self, value: torch.Tensor) -> None:
        """Store ``value`` at the place."""
        self.owner.__dict__[self.name] = _replace(self.owner.__dict__[self.name], self.keys, value)


def _replace(node: Any, keys: tuple[Any, ...], value: Any) -> Any:
    if not keys:
        return value
    child = _replace(node[keys[0]], keys[1:], value)
    if isinstance(node, tuple):
        items = list(node)
        items[keys[0]] = child
        return rebuilt(node, items)
    node[keys[0]] = child
    return node


def rebuilt(old: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    """A tuple of ``old``'s class (named tuples too) holding ``items``: tuples cannot change in place."""
    make = getattr(type(old), "_make", None)
    return make(items) if make is not None else type(old)(items)


def _item_path(attr: str, keys: tuple[Any, ...]) -> str:
    return ".".join([attr, *(str(k) for k in keys)])


def attach_item(
    record: Record,
    module: nn.Module,
    attr: str,
    keys: tuple[Any, ...],
    meta: torch.Tensor,
    vid: int,
    handle: Handle | None = None,
) -> Handle:
    """Make ``module.attr[keys...]`` (holding ``meta``) a deferred tensor of ``record``'s value ``vid``."""
    if handle is None:
        handle = Handle(meta, record, vid)
        record.pending.add(handle)
    table = module.__dict__.setdefault(ITEMS_ATTR, {})
    table[_item_path(attr, keys)] = Item(attr, keys, handle)
    return handle


def items_of(module: nn.Module) -> dict[str, Item]:
    """Return a copy of ``module``'s own table of deferred tensors held in containers."""
    return dict(module.__dict__.get(ITEMS_ATTR) or {})


def item_slots(module: nn.Module, prefix: str = "") -> list[ItemSlot]:
    """Return the places of ``module``'s own deferred container items still holding them."""
    dot = f"{prefix}." if prefix else ""
    out: list[ItemSlot] = []
    for rel, item in items_of(module).items():
        slot = ItemSlot(dot + rel, module, "attr", item.attr, item.handle.tensor, False, item.keys)
        # (a tensor made real in place at another of its places is done)
        if slot.current() is item.handle.tensor and item.handle.tensor.is_meta:
            out.append(slot)
    return out


def deferred_slots(module: nn.Module) -> list[Slot]:
    """Return the slots of ``module`` (whole tree) that still hold a deferred tensor.

    Container items (:class:`ItemSlot`) come after the parameters, buffers and
    attributes, under dotted paths such as ``"cache.0"``.
    """
    found = [s for s in iter_slots(module) if handle_of(s.tensor) is not None]
    for prefix, mod in module.named_modules():
        found += [s for s in item_slots(mod, prefix) if handle_of(s.tensor) is not None]
    return found


def deferred_paths(module: nn.Module) -> list[str]:
    """Return the dotted names of the deferred tensors in ``module``, sorted."""
    return sorted({s.path for s in deferred_slots(module)})


def own_deferred(module: nn.Module) -> list[tuple[Slot, Handle]]:
    """Return ``module``'s own slots (not its children's) still holding their deferred tensor."""
    out: list[tuple[Slot, Handle]] = []
    for name, handle in handles_of(module).items():
        slot = slot_at(module, name)
        if slot is not None and slot.tensor is handle.tensor and slot.tensor.is_meta:
            out.append((slot, handle))
    return out


def held_deferred(module: nn.Module) -> list[tuple[Slot, Handle]]:
    """:func:`own_deferred`, and ``module``'s parameters and buffers holding another module's
    deferred tensor: a tie made after the block (``head.weight = emb.weight``), which a load
    of ``module`` alone fills as eager's copies into the one tensor."""
    out = own_deferred(module)
    held = {id(slot.tensor) for slot, _ in out}
    for slot in own_slots(module):
        if slot.kind == "attr" or id(slot.tensor) in held or not slot.tensor.is_meta:
            continue
        handle = handle_of(slot.tensor)
        if handle is not None:
            out.append((slot, handle))
            held.add(id(slot.tensor))
    return out


# The ``__dict__`` entry of a module mapping the names of tensors a block made
# on meta on purpose to those meta tensors (held, so deepcopy and pickle keep
# the identity the check below relies on).
ON_META_ATTR = "_lightning_meta_on_meta"


def mark_on_meta(module: nn.Module, name: str, meta: torch.Tensor) -> None:
    """Note that ``module.name`` (``meta``) was made on the meta device inside a block on purpose.

    ``nn.Linear(3, 3, device="meta")`` or a ``with torch.device("meta")``
    inside the block: eager construction leaves it on meta, so
    ``materialize`` leaves it there too.
    """
    module.__dict__.setdefault(ON_META_ATTR, {})[name] = meta


def on_meta_on_purpose(slot: Slot) -> bool:
    """Whether ``slot`` still holds a tensor its block made on meta on purpose."""
    table: dict[str, torch.Tensor] = slot.owner.__dict__.get(ON_META_ATTR) or {}
    return table.get(slot.name) is slot.tensor


def done(handle: Handle) -> torch.Tensor | None:
    """Return the real tensor already made for ``handle``'s value (a tie's other end), if alive."""
    ahead = handle.record.ahead.get(handle.vid)
    if ahead is not None:
        return ahead
    ref = handle.record.materialized.get(handle.vid)
    return ref() if ref is not None else None


def keep_ahead(handle: Handle, tensor: torch.Tensor) -> None:
    """Hold ``tensor`` as the real value of ``handle``, made before its own module is materialized.

    It shares memory with a tensor materialized now, as eager's does: held
    strongly (nothing else refers to it yet) until ``handle`` is settled.
    """
    handle.record.ahead[handle.vid] = tensor
    mark_done(handle, tensor)


def mark_done(handle: Handle, tensor: torch.Tensor, *, copied: bool = False) -> None:
    """Note ``tensor`` as the real value of ``handle``'s value id (for ties reaching elsewhere).

    ``copied``: ``tensor`` holds loaded values that eager construction would
    copy into its tensor, which tensors viewing its storage see (:func:`earlier_view`).
    """
    handle.record.materialized[handle.vid] = weakref.ref(tensor)
    handle.record.made_in[handle.vid] = _compat.storage_id(tensor.untyped_storage())
    if handle.tensor is not tensor:  # not when materialize swapped its contents in
        note_made(handle.tensor, tensor)
    if copied and not handle.replaced():
        handle.record.copied.add(handle.vid)


def note_made(meta: torch.Tensor, tensor: torch.Tensor) -> None:
    """Note ``tensor`` as what the meta tensor ``meta`` became where it was put in
    (:func:`made_for`): deferred or plain meta, by ``materialize`` or a load."""
    key = id(meta)
    _MADE[key] = (
        weakref.ref(meta, functools.partial(_unregister, key, registry=_MADE)),
        weakref.ref(tensor),
    )


def apart_by_copy(record: Record, *tensors: torch.Tensor) -> bool:
    """Whether ``tensors`` share no memory in ``record``'s copy though the block's values
    do: after ``copy.deepcopy`` a Parameter's memory is its own (see
    :attr:`Record.deep_copied`)."""
    return record.deep_copied and any(isinstance(t, nn.Parameter) for t in tensors)


def earlier_view(handle: Handle, path: str) -> torch.Tensor | None:
    """The view eager construction has for ``handle``'s value, of a tensor its block made real before.

    In eager construction ``self.row = self.weight[0]`` (or a view kept in a
    list) shares the weight's storage: values written into the weight later
    (``load_state_dict`` copies, an optimizer step) are the view's values.
    A parameter or buffer made real before ``handle``'s turn (its module
    materialized or loaded on its own, a load's pre-hook) is such a base when it is what
    eager construction would hold: loaded values eager loading copies in
    (``assign=True`` too: the product keeps the views, as it keeps ties), or
    a tensor on the CPU in its recorded dtype. Returns that view (see
    :func:`view_of`); ``None`` when no such base holds its memory.
    """
    record = handle.record
    if not record.materialized or record.released or not record.values:
        return None
    bases = []
    for vid in record.owned.get(record.values[handle.vid].storage, ()):
        ref = record.materialized.get(vid)
        base = ref() if ref is not None else None
        if (
            base is None
            or vid == handle.vid
            or _compat.storage_id(base.untyped_storage()) != record.made_in.get(vid)
        ):
            continue  # given other data since (`.data = ...`): eager's views keep the old
        if apart_by_copy(record, base, handle.tensor):
            continue
        if vid in record.copied or (
            base.device.type == "cpu" and base.dtype == record.values[vid].dtype
        ):
            bases.append((vid, base))
    return view_of(handle, bases, path)


def wait_for_base(slot: Slot, handle: Handle) -> bool:
    """Put off ``slot`` when its value views a parameter or buffer still deferred; whether it was.

    ``load_state_dict`` runs a module's post-hook before it reaches the
    modules registered after it: a view kept on one of those
    (``self.holder.row = self.lin.weight[0]``, ``holder`` first) waits for
    the weight, and :func:`settle_waiting` makes it a view of the weight
    once it is real. A weight given other data since the block
    (``module.to(dtype)``) has other memory than eager's views: those are
    not put off.
    """
    if pending_base(handle) is None:
        return False
    handle.record.waiting.append((slot, handle))
    return True


def deferred_view_base(tensor: torch.Tensor) -> tuple[torch.Tensor, int, bool] | None:
    """For a deferred tensor that views a deferred parameter's or buffer's memory in eager
    construction (``self.w_t = self.lin.weight.t()`` built in a block): that tensor, the
    view's element offset from it, and whether the view carries autograd history from it.
    ``None`` otherwise (other dtypes included). For shape-only runs (``estimate``), which
    must see the aliasing the real model has.
    """
    handle = handle_of(tensor)
    base = pending_base(handle) if handle is not None else None
    if handle is None or base is None:
        return None
    value = handle.record.values[handle.vid]
    base_value = handle.record.values[base.vid]
    if value.dtype != base_value.dtype:
        return None
    graded = handle.record.graded.get(handle.vid)
    return base.tensor, value.offset - base_value.offset, graded is not None


def pending_base(handle: Handle) -> Handle | None:
    """The parameter or buffer ``handle``'s value views that is still deferred, with eager's memory.

    Its handle; ``None`` when there is none.
    """
    record = handle.record
    if record.released or not record.values:
        return None
    owned = record.owned.get(record.values[handle.vid].storage, ())
    graded = record.graded.get(handle.vid)
    if graded is not None and graded.origin is not None:
        owned = [graded.origin]  # the one it was taken from
    # A value not made real yet, whose tensor has eager's memory still.
    todo = {vid for vid in owned if vid != handle.vid and vid not in record.materialized}
    if not todo:
        return None
    return next(
        (
            other
            for other in list(record.pending)
            if other.vid in todo
            and not other.replaced()
            and not apart_by_copy(record, other.tensor, handle.tensor)
        ),
        None,
    )


def settle_waiting(records: Iterable[Record]) -> list[Slot]:
    """Make each waiting tensor of ``records`` (see :func:`wait_for_base`) whose base is real a view of it.

    Returns the waiting slots whose bases are all real but hold none of
    their memory (cast by a load): the caller replays them.
    """
    replay: list[Slot] = []
    for record in records:
        still = []
        for slot, handle in record.waiting:
            if slot.current() is not handle.tensor:
                continue  # replaced since (a materialize, an assignment)
            view = earlier_view(handle, slot.path)
            if view is not None:
                new = dress_like(slot.tensor, view, handle.attrs)
                slot.put(new)
                settle(slot, handle, new)
            elif pending_base(handle) is not None:
                still.append((slot, handle))
            else:
                replay.append(slot)
        record.waiting = still
    return replay


def view_of(
    handle: Handle,
    bases: Iterable[tuple[int, torch.Tensor]],
    path: str,
    *,
    cast: bool = False,
    persistent: bool = True,
) -> torch.Tensor | None:
    """``handle``'s value as a view of one of ``bases`` (value id, real tensor), as eager has it.

    ``cast``: the bases may be in another dtype than the block's values (cast
    element for element, laid out alike), for a view to be copied from.
    ``persistent``: whether ``path`` is in the model's state dict (a checkpoint
    can hold it), for the fixes an error names.

    ``bases`` are values of ``handle``'s record made real before it, whose
    memory eager construction shares with it. A value of the block that
    views the storage of one of them is that view, carrying autograd history
    from it where eager's does (:attr:`Record.graded`); ``None`` when it
    views none (it is replayed then), or when its tensor was given other
    data after the block.

    Raises:
        MaterializationError: the value shares storage with a base but not
            within it (a view across two parameters of one buffer).
    """
    record = handle.record
    if handle.replaced() or record.released or not record.values:
        return None  # replay refuses a released record, naming the fix
    value = record.values[handle.vid]
    lo, hi = _extent(value)
    graded = record.graded.get(handle.vid)
    for vid, base in bases:
        base_value = record.values[vid]
        if vid == handle.vid or base_value.storage != value.storage:
            continue
        if graded is not None and vid != graded.origin:
            continue  # its gradient goes to the tensor it was taken from, not to one sharing memory
        base_lo, base_hi = _extent(base_value)
        if hi <= base_lo or base_hi <= lo:
            continue  # another part of the storage
        # A view of another dtype (torch.view_as_real, .view(torch.int32)) reads the
        # base's bytes: a cast base (cast=True) holds other bytes than eager's.
        retyped = value.dtype != base_value.dtype
        if cast and retyped and base.dtype != base_value.dtype:
            raise MaterializationError(
                f"{path!r} cannot be reproduced with dtype=: in eager construction it views "
                f"the bytes of a tensor this call loads and casts ({base_value.dtype} to "
                f"{base.dtype}) as {value.dtype}, so it holds the loaded values' bytes in "
                f"{base_value.dtype}, which a cast copy no longer has. Fix: load without "
                "dtype=, then call module.to(dtype).",
                paths=[path],
            )
        if lo <= base_lo and base_hi <= hi and (lo, hi) != (base_lo, base_hi):
            # The tensor made real before (loaded) lies within this one: eager's load
            # copies its values into this one's memory, which a replay here cannot do.
            raise MaterializationError(
                f"{path!r} cannot be reproduced: in eager construction a tensor made real "
                f"before it (loaded from the checkpoint, or materialized on its own) views "
                f"part of the memory of {path!r}, which so holds those values there, and a "
                f"replay of {path!r} on its own would not. Fix: "
                + (f"put {path!r} in the checkpoint too, or " if persistent else "")
                + "materialize the model first and then load (load_state_dict copies into "
                "the shared memory as eager's does).",
                paths=[path],
            )
        if not (
            base_lo <= lo
            and hi <= base_hi
            and (cast or base.dtype == base_value.dtype)
            and tuple(base.shape) == base_value.size
            and base.stride() == base_value.stride
        ):
            raise MaterializationError(
                f"{path!r} cannot be reproduced: in eager construction it views memory of "
                "a tensor made real before it (loaded, or materialized on its own), but not "
                "within that tensor's layout here, so its values would differ. Fix: compute "
                f"{path!r} in forward instead of keeping it on the module, materialize or "
                "load the whole model in one call, or build the model eagerly.",
                paths=[path],
            )
        if retyped:
            return _bytes_view(base, base_value, value)
        offset = int(base.storage_offset()) + value.offset - base_value.offset
        return graph_view(handle, base, value.size, value.stride, offset)
    return None


def _bytes_view(base: torch.Tensor, base_value: Value, value: Value) -> torch.Tensor:
    """``value`` as a view of ``base``'s memory in another dtype (``torch.view_as_real``),
    at the bytes eager construction has it (no autograd history: none crosses dtypes)."""
    start = base.storage_offset() * base.element_size()
    start += value.offset * value.dtype.itemsize - base_value.offset * base_value.dtype.itemsize
    view = torch.empty((0,), dtype=value.dtype, device=base.device)
    return view.set_(
        base.untyped_storage(), start // value.dtype.itemsize, value.size, value.stride
    )


def graph_view(
    handle: Handle,
    base: torch.Tensor,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    offset: int,
) -> torch.Tensor:
    """A view of ``base``: one autograd records (gradients reach ``base``) where eager's did."""
    graded = handle.record.graded.get(handle.vid)
    # In the inference mode of the block, not the caller's (an eval helper
    # materializing under torch.inference_mode()): eager's view was made
    # then, and carries the history construction gave it.
    with torch.inference_mode(handle.record.inference):
        if graded is not None and graded.origin is not None and base.requires_grad:
            with torch.enable_grad():
                return base.as_strided(size, stride, offset)
        return base.detach().as_strided(size, stride, offset)


def refuse_apart(paths: list[str], what: str) -> None:
    """Raise for views of a parameter or buffer that ``what`` (``"materialize"``) leaves deferred.

    In eager construction they share its memory: loads and updates of it
    later reach them, which a copy made now could not.

    Raises:
        MaterializationError: always, naming the paths and the fix.
    """
    raise MaterializationError(
        f"{what} cannot reproduce {paths}: in eager construction each views a parameter or "
        "buffer of another module, which this call leaves deferred, so later loads and "
        "updates of that tensor would not reach a copy made now. Fix: materialize or load a "
        "module that holds both (the whole model), or the weight's module first.",
        paths=paths,
    )


def refuse_graded(made: dict[str, str], what: str, hooked: dict[str, str] | None = None) -> None:
    """Raise for tensors that carry autograd history in eager construction but would not here.

    ``made``: dotted path -> the op and ``file:line`` that made it. ``what``:
    the call refusing (``"materialize"``). ``hooked``: dotted path -> the
    module of the forward pre-hook that recomputes it (``torch.nn.utils.prune``).

    Raises:
        MaterializationError: always, naming the paths, the ops and the fix.
    """
    where = "; ".join(f"{p!r} ({m})" for p, m in sorted(made.items()))
    old_hooks = sorted(p for p, m in made.items() if _OLD_HOOK_OPS.intersection(m.split()))
    hint = (
        f"Fix for {old_hooks}: made by the hook of torch.nn.utils.weight_norm, which "
        "recomputes them in every forward; use torch.nn.utils.parametrizations.weight_norm "
        "instead, or apply weight_norm after materialize. "
        if old_hooks
        else ""
    )
    by_hook: dict[str, list[str]] = {}
    for path, utility in (hooked or {}).items():
        if path not in old_hooks:
            by_hook.setdefault(utility, []).append(path)
    for utility, paths in sorted(by_hook.items()):
        hint += (
            f"Fix for {sorted(paths)}: made by the forward pre-hook of {utility}, which "
            "recomputes them in every forward; apply it after materialize (under MetaGuard, "
            "in on_fit_start). "
        )
    hint = f"{hint}Otherwise: " if hint else "Fix: "
    raise MaterializationError(
        f"{what} cannot reproduce {where}: in eager construction each is computed from a "
        "parameter (or another tensor that requires grad) with autograd recording, so "
        "gradients flow through it into the parameter; here it would be a separate tensor (not a view of the parameter, or the "
        f"parameter is cast, moved, or filled in another call), which no gradient reaches. "
        f"{hint}compute it in forward, or make it under torch.no_grad() (or .detach() it) "
        "where no gradient should flow; or materialize or load the whole model in one call, "
        "in its own dtype, on the CPU.",
        paths=sorted(made),
    )


# What the old hook-based torch.nn.utils.weight_norm computes its weight with.
_OLD_HOOK_OPS = frozenset({"aten._weight_norm_interface.default", "aten._weight_norm.default"})


def _extent(value: Value) -> tuple[int, int]:
    """The byte range ``[lo, hi)`` of its storage that a recorded value spans (bytes: values
    sharing a storage may have other dtypes)."""
    size = value.dtype.itemsize
    return value.offset * size, (value.offset + span(value.size, value.stride)) * size


def settle(slot: Slot, handle: Handle, tensor: torch.Tensor) -> None:
    """Note that ``slot`` now holds ``tensor``, the real value of ``handle``."""
    mark_done(handle, tensor)
    handle.record.ahead.pop(handle.vid, None)
    handle.record.pending.discard(handle)
    if isinstance(slot, ItemSlot):
        _drop_item(slot.owner, _item_path(slot.name, slot.keys), handle)
    else:
        drop(slot.owner, slot.name, handle)


def _drop_item(owner: nn.Module, rel: str, handle: Handle | None = None) -> None:
    table: dict[str, Item] = owner.__dict__.get(ITEMS_ATTR) or {}
    current = table.get(rel)
    if current is not None and (handle is None or current.handle is handle):
        del table[rel]
        current.handle.record.pending.discard(current.handle)


def drop(owner: nn.Module, name: str, handle: Handle | None = None) -> None:
    """Remove ``owner.name`` from its handle table (only if it is ``handle``, when given)."""
    table: dict[str, Handle] = owner.__dict__.get(HANDLES_ATTR) or {}
    current = table.get(name)
    if current is not None and (handle is None or current is handle):
        del table[name]
        current.record.pending.discard(current)
        current.record.ahead.pop(current.vid, None)


def forget(module: nn.Module, names: Iterable[str], *, at: str = "", by: str = "the load") -> None:
    """Drop the handles of ``names`` (dotted) after the caller filled them itself.

    Once every deferred tensor of a record is materialized or forgotten, the
    record is released (:meth:`Record.release`, the record's own method).
    Container items (``"cache.0"``) named here that still hold their deferred
    tensor are not in any state dict, so no loader fills them: they are
    replayed instead (on the CPU, where eager construction leaves them), like
    non-persistent buffers. ``at``: ``module``'s dotted path in the model
    loaded, and ``by`` what filled them, for the message of a deferred tensor
    the module no longer holds (see :func:`_note_orphan`).
    """
    wanted = set(names)
    items: list[ItemSlot] = []
    for prefix, mod in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, handle in handles_of(mod).items():
            if dot + name in wanted:
                path = dot + name
                _note_orphan(handle, handle.tensor, tensor_at(mod, name), _at(at, path), by)
                drop(mod, name, handle)
                if not handle.record.pending:
                    handle.record.release()
        items += [s for s in item_slots(mod, prefix) if s.path in wanted]
    if items:
        _replay_items(items)


def _replay_items(items: list[ItemSlot]) -> None:
    """Replay deferred container items exactly, and put them in place."""
    from lightning_meta._deferred._replay import complete, replay

    found = [(slot, handle_of(slot.tensor)) for slot in items]
    pending = [(slot, h) for slot, h in found if h is not None]
    records: dict[int, Record] = {id(h.record): h.record for _, h in pending}
    for record in records.values():
        mine = [(slot, h) for slot, h in pending if h.record is record]
        # A view of a tensor a load copied into (self.rows = [self.weight[0]])
        # is that view, as in eager construction; the rest is replayed.
        todo = [(slot, h) for slot, h in mine if done(h) is None]
        views = {id(h): earlier_view(h, slot.path) for slot, h in todo}
        wanted = {h.vid: slot.path for slot, h in todo if views[id(h)] is None}
        apart = sorted(
            slot.path for slot, h in todo if views[id(h)] is None and pending_base(h) is not None
        )
        if apart:
            refuse_apart(apart, "loading")
        graded = {p: record.graded[v].made for v, p in wanted.items() if v in record.graded}
        if graded:
            refuse_graded(graded, "loading")
        values = replay(record, wanted, device=torch.device("cpu")) if wanted else {}
        for slot, h in mine:
            new = done(h)
            if new is None:
                view = views.get(id(h))
                new = dress_like(slot.tensor, values[h.vid] if view is None else view, h.attrs)
            slot.put(new)
            settle(slot, h, new)
        if not record.pending:
            complete(record, None)


def drop_stale(walk: Iterable[tuple[str, nn.Module]]) -> dict[int, Record]:
    """Forget handles whose slot holds another tensor now (``load_state_dict(assign=True)``,
    a tie or an assignment after the block), or whose tensor was made real in place
    at another of its places (a tie).

    ``walk``: every module of the tree with its dotted path
    (``module.named_modules()``). Returns the records touched, by id. A
    deferred tensor the module no longer holds is made stale once no module
    holds its handle (:func:`_note_orphan`).
    """
    touched: dict[int, Record] = {}
    for prefix, mod in walk:
        dot = f"{prefix}." if prefix else ""
        for name, handle in handles_of(mod).items():
            slot = slot_at(mod, name)
            # (or made real in place at another of its places: a tie, see _identity)
            if slot is None or slot.tensor is not handle.tensor or not handle.tensor.is_meta:
                now = slot.tensor if slot is not None else None
                _note_orphan(handle, handle.tensor, now, dot + name, "materialize")
                drop(mod, name, handle)
                touched[id(handle.record)] = handle.record
        for rel, item in items_of(mod).items():
            place = ItemSlot(rel, mod, "attr", item.attr, item.handle.tensor, False, item.keys)
            if place.current() is not item.handle.tensor or not item.handle.tensor.is_meta:
                now = place.current()
                _note_orphan(item.handle, item.handle.tensor, now, dot + rel, "materialize")
                _drop_item(mod, rel, item.handle)
                touched[id(item.handle.record)] = item.handle.record
    return touched


def _at(at: str, path: str) -> str:
    return f"{at}.{path}" if at and path else at or path


def _note_orphan(
    handle: Handle, old: torch.Tensor, now: torch.Tensor | None, path: str, by: str
) -> None:
    """Make ``old``, the deferred tensor of ``handle``, stale once no module holds ``handle``,
    if its place holds ``now`` instead and it is still meta then.

    A reference to it taken after the block (a local, an optimizer) would
    otherwise stay a plain meta tensor, which some CPU ops answer with
    uninitialised memory (``x @ w.T``). While a module still holds the
    handle (a tie's other place), that place may still make it real.
    """
    if old is handle.tensor and now is not old and old.is_meta:
        weakref.finalize(handle, _settle_orphan, old, path, by).atexit = False


def _settle_orphan(old: torch.Tensor, path: str, by: str) -> None:
    """Make ``old`` (see :func:`_note_orphan`) stale if it stayed meta: nothing can fill it now."""
    if not old.is_meta:
        return
    what = (
        "a tie or an assignment after the deferred_init block put another tensor at that "
        "place, and materialize makes real only what the module holds"
        if by == "materialize"
        else f"{by} put a new tensor object at that place (eager's copies into the old one "
        "unless assign=True)"
    )
    fix = (
        f"use the tensor the module holds at {path!r} now, or take the reference after "
        f"materialize; to keep what eager's old object holds, replace it after materialize"
        if by == "materialize"
        else f"read {path!r} from the module after {by}, or load with lm.load_checkpoint, "
        "which keeps the module's tensor objects"
    )
    mark_stale(old, path, what, by, fix=fix)


def without_pending(records: Iterable[Record]) -> list[Record]:
    """Return the records among ``records`` with no deferred tensor left to materialize."""
    return [r for r in records if not r.pending]


def released_without_result(handle: Handle) -> bool:
    """Whether ``handle``'s record was released and its value was not kept anywhere."""
    return handle.record.released and done(handle) is None


def tensor_attrs(t: torch.Tensor) -> dict[str, Any]:
    """Return the attributes code set on meta tensor ``t`` (tensor-valued ones left out)."""
    return {k: v for k, v in vars(t).items() if not isinstance(v, torch.Tensor)}


def dress_like(old: torch.Tensor, data: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    """Return ``data`` dressed as ``old`` was: its Parameter class, ``requires_grad``, ``attrs``.

    A ``Parameter`` subclass is rebuilt the way ``nn.Parameter.__new__`` builds
    one (without calling the class, whose constructor may take other
    arguments); ``attrs`` are attributes model code set on the original
    tensor (``_is_hf_initialized``, or what a subclass's ``__init__`` set).
    """
    if isinstance(old, nn.Parameter):
        new = _compat.make_subclass(tensor_class(old), data, old.requires_grad)
    else:
        new = data.requires_grad_(old.requires_grad) if old.requires_grad else data
    for key, value in attrs.items():
        if not isinstance(value, torch.Tensor):
            setattr(new, key, value)
    return new


def replaced_by_to(old: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Return what eager's ``module.to()`` stores for buffer ``old`` it moves or casts to ``data``.

    It stores ``old.to(...)``, a new tensor: no attribute set on ``old``,
    autograd history where ``old`` requires grad, and the class ``.to()``
    gives, a plain ``Tensor`` for an ``nn.Parameter`` registered as a buffer
    (transformers' FalconMamba ``b_c_rms``), whose torch function is disabled.
    """
    if tensor_class(old) is torch.Tensor and not old.requires_grad:
        return data  # what .to() gives already; no copy
    return dress_like(old, data, {}).to(data.dtype, copy=True)


def lone_module(name: str, handle: Handle) -> nn.Module:
    """Return a scratch module holding only ``handle``'s tensor as ``name``, still deferred."""
    scratch = nn.Module()
    if isinstance(handle.tensor, nn.Parameter):
        scratch.register_parameter(name, handle.tensor)
    else:
        scratch.register_buffer(name, handle.tensor)
    scratch.__dict__[HANDLES_ATTR] = {name: handle}
    return scratch
