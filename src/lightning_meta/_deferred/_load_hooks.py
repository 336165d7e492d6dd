"""``load_state_dict`` hooks that let deferred modules be filled by plain torch and Lightning.

Loading a real tensor into a meta parameter with ``Module.load_state_dict``
is a silent no-op in torch (``meta.copy_(x)`` does nothing), which is why
``LightningModule.load_from_checkpoint`` and ``Trainer.fit(ckpt_path=...)``
cannot fill a deferred model by themselves. :func:`install_load_hooks`, called
by :func:`~lightning_meta.deferred_init` when its block ends, registers on
every module that owns deferred tensors:

- a pre-hook that gives each deferred tensor present in the state dict (with
  the right shape) real storage in the module's dtype, on the state dict
  tensor's device, just before torch copies the values into it; with
  ``assign=True`` it hands torch the wrapped state dict tensor itself so that
  tied weights stay one object;
- a post-hook that replays, exactly, every deferred tensor the state dict did
  not fill (non-persistent buffers, a new head, tensors held in list, tuple
  and dict attributes);
- on each module the block built at the top, a post-hook that replays the
  deferred modules it keeps outside its tree (``self.teacher = [net]``) and
  gives references taken after the block the real tensors.

The hooks are module-level functions, so modules stay picklable and
deep-copyable, and they do nothing once no deferred tensor is left.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, TypeGuard

import torch
from torch import nn

from lightning_meta._compat import dispatch_mode_active
from lightning_meta._deferred._handles import (
    Handle,
    deferred_slots,
    done,
    dress_like,
    earlier_view,
    forget,
    handle_of,
    handles_of,
    held_deferred,
    item_slots,
    items_of,
    made_for,
    mark_done,
    own_deferred,
    settle,
    settle_waiting,
    wait_for_base,
    warn_overwritten,
)
from lightning_meta._deferred._materialize import materialize_beyond, materialize_paths
from lightning_meta._deferred._reach import reach
from lightning_meta._deferred._record import Record
from lightning_meta._deferred._replay import complete, same_bits
from lightning_meta._errors import MaterializationError
from lightning_meta._slots import Slot, buffer_names, own_slots, parameter_names, tensor_at

__all__ = ["OWN_HOOKS", "install_load_hooks"]

_HOOKED_ATTR = "_lightning_meta_load_hooks"
_BEYOND_ATTR = "_lightning_meta_load_beyond"

# Each module's prefix in the load running now, from its pre-hook to its
# post-hook (which torch calls without it), so refusals name full paths.
_PREFIXES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
# id of a record -> the deferred tensors of it a load filled that were changed
# after the block; one warning for them all once the record is complete
# (torch calls the hooks module by module).
_CHANGED: dict[int, list[str]] = {}


def install_load_hooks(modules: Iterable[nn.Module], tops: Iterable[nn.Module] = ()) -> None:
    """Register the load hooks on every module under ``modules`` that owns deferred tensors,
    and the hook reaching outside the tree on each of ``tops`` (the block's top modules).

    Installing twice on one module is a no-op.

    Example::

        >>> import torch, lightning_meta as lm
        >>> net = lm.deferred_init(torch.nn.Linear, 2, 2)  # installs the hooks
        >>> _ = net.load_state_dict({"weight": torch.ones(2, 2), "bias": torch.zeros(2)})
        >>> net.weight.is_meta, net.weight.sum().item()
        (False, 4.0)
    """
    seen: set[int] = set()
    for top in modules:
        for mod in top.modules():
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            if not (handles_of(mod) or items_of(mod)) or mod.__dict__.get(_HOOKED_ATTR):
                continue
            mod.register_load_state_dict_pre_hook(_fill_before_copy)
            mod.register_load_state_dict_post_hook(_replay_rest)
            mod.__dict__[_HOOKED_ATTR] = True
    # After the module's own post-hook (registered above): references to its
    # non-persistent buffers need them replayed first.
    for top in tops:
        if _BEYOND_ATTR not in top.__dict__:
            top.register_load_state_dict_post_hook(_reach_beyond)
            top.__dict__[_BEYOND_ATTR] = True


def _refuse_dropped_tie_value(
    key: str, value: torch.Tensor, filled: torch.Tensor, first: str | None
) -> None:
    """Refuse ``assign=True`` of a value under ``key`` that differs from the one its tie got.

    A tie made in the block is kept (the tensor ``filled`` is put under every
    name); eager's ``assign=True`` breaks it and gives each name its own value,
    so a second, different value would be dropped without a word.
    """
    if value is filled or (
        not value.is_meta
        and value.device == filled.device
        and same_bits(value.detach(), filled.detach())  # NaN included, dtype alike
    ):
        return
    other = repr(first) if first is not None and first != key else "its other name"
    raise MaterializationError(
        f"load_state_dict(assign=True) got two values for one tied tensor: {key!r} and {other} "
        "are tied in the deferred_init block, and the state_dict holds different values for "
        "them. Eager assign=True would untie them; a deferred model keeps the tie, and one "
        "value would be lost. Fix: load without assign=True (each tied name then gets the last "
        "name's value, as eager's copy does), or untie them in the model (give the module its "
        "own parameter) before loading.",
        paths=(key,),
    )


def _fill_before_copy(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Give each deferred tensor in ``state_dict`` real storage just before torch copies into it."""
    if dispatch_mode_active():
        return  # inside FakeTensorMode or a deferred_init block: nothing real to fill
    _PREFIXES[module] = prefix
    assign = bool(local_metadata.get("assign_to_params_buffers", False))
    _take_filled_ties(module)
    filled: list[str] = []
    records: dict[int, Record] = {}
    # A tie made after the block is filled through either end, as eager's copy_ into its
    # one tensor; with assign=True torch puts the loaded tensor in each place instead,
    # which breaks such a tie in eager: the place is left to torch.
    owned = own_deferred(module) if assign else held_deferred(module)
    empty = [
        prefix + s.name
        for s, _ in owned
        if s.persistent
        and isinstance(value := state_dict.get(prefix + s.name), torch.Tensor)
        and value.is_meta
        and value.shape == s.tensor.shape
    ]
    if empty and not assign:
        # torch would copy meta into meta, which does nothing but count as a
        # change after the block: materialize then blamed an initialisation.
        raise MaterializationError(
            f"load_state_dict got meta tensors for deferred tensors, first for {sorted(empty)}: a "
            "state_dict of a deferred or meta model (ema.load_state_dict(model.state_dict()), "
            "a teacher copied into a student) holds no values to copy. Fix: materialize or "
            "load the source model first (lm.materialize(model)), then copy its state_dict.",
            paths=sorted(empty),
        )
    if torch.__future__.get_swap_module_params_on_conversion():
        _refuse_swap_left_weakly_held(module, prefix, state_dict, owned)
    for slot, handle in owned:
        old = slot.tensor
        key = prefix + slot.name
        value = state_dict.get(key)
        if not _loads_into(value, slot):
            continue  # not loaded here (torch reports another shape): it stays deferred
        if assign:
            # Made ahead for sharing memory with a tensor materialized before
            # (see _materialize._sharing): eager's assign=True puts the loaded
            # tensor in its place, and the other keeps the old memory.
            handle.record.ahead.pop(handle.vid, None)
        if handle.changed():
            _CHANGED.setdefault(id(handle.record), []).append(key)
        new = done(handle)
        if new is not None and assign:
            _refuse_dropped_tie_value(key, value, new, handle.record.loaded_as.get(handle.vid))
        if new is None:
            if assign:
                # torch assigns state_dict[key]; make it the wrapped tensor so a
                # tie's other end (below, via mark_done) gets the same object.
                new = dress_like(old, value.detach(), handle.attrs)
            else:
                # Only storage: torch's own copy_ fills it right after this hook,
                # with its shape checks and dtype conversion.
                # In the inference mode of the block, not the caller's: eager's
                # tensor was built then, and copy_ keeps it a normal tensor
                # under the caller's torch.inference_mode().
                with torch.inference_mode(handle.record.inference):
                    storage = torch.empty_like(old, device=value.device)
                new = dress_like(old, storage, handle.attrs)
            # Views of it (self.row = self.weight[0]) see the loaded values, as
            # in eager loading without assign=True, which keeps ties and views.
            mark_done(handle, new, copied=new.dtype == old.dtype)
            records[id(handle.record)] = handle.record
        if assign:
            state_dict[key] = new
            handle.record.loaded_as.setdefault(handle.vid, key)
        slot.put(new)
        filled.append(slot.name)
    if filled:
        forget(module, filled, at=prefix.rstrip("."), by="load_state_dict")
    _finish(records.values())


def _loads_into(value: Any, slot: Slot) -> TypeGuard[torch.Tensor]:
    """Whether torch's load copies ``value`` into the deferred tensor of ``slot``."""
    return (
        slot.persistent
        and isinstance(value, torch.Tensor)
        and not value.is_meta
        and value.shape == slot.tensor.shape
    )


def _refuse_swap_left_weakly_held(
    module: nn.Module, prefix: str, state_dict: dict[str, Any], owned: list[tuple[Slot, Handle]]
) -> None:
    """Refuse a load torch would swap into tensors this hook leaves weakly referenced.

    With torch's swap-on-conversion flag, torch swaps each loaded tensor into
    the one this hook puts in place, and ``torch.utils.swap_tensors`` refuses a
    tensor with weak references: their record keeps one to each (by value id,
    for ties) until every tensor of its block is real. A block this module's
    load completes (a lone ``nn.Linear``, one block per module) is released
    before torch swaps, and loads; one with tensors left elsewhere (in another
    module, a non-persistent buffer replayed after the load) is refused here,
    before anything is filled, rather than by torch's weakref error.
    """
    filling = [(s, h) for s, h in owned if _loads_into(state_dict.get(prefix + s.name), s)]
    ids = {id(h) for _, h in filling}
    records = {id(h.record): h.record for _, h in filling}
    if not any(id(p) not in ids for r in records.values() for p in list(r.pending)):
        return
    paths = sorted(prefix + s.name for s, _ in filling)
    raise MaterializationError(
        f"load_state_dict cannot fill the deferred tensors {paths} of {type(module).__name__} "
        "with torch.__future__.set_swap_module_params_on_conversion(True): torch swaps the "
        "loaded tensors into the ones this package makes for them, which hold weak references "
        "until every tensor of their deferred_init block is real, and their block has tensors "
        "this load does not fill first (in other modules, or non-persistent buffers). Fix: "
        "load with lightning_meta.load_checkpoint(model, path), or call "
        "lightning_meta.materialize(model) first, or turn the flag off for the load.",
        paths=paths,
    )


def _take_filled_ties(module: nn.Module) -> None:
    """Give ``module``'s places still holding a tie's old meta tensor the tensor the tie's
    other end became in this load (``head.weight = emb.weight`` made after the block, emb
    filled first): torch copies into it then, as into eager's one tensor.

    A function of its own: a real tensor made ahead (see ``_materialize._sharing``) is
    held only weakly once ``assign=True`` drops it, and no local here may keep it alive.
    """
    for slot in own_slots(module):
        if slot.tensor.is_meta and handle_of(slot.tensor) is None:
            made = made_for(slot.tensor)
            if made is not None:
                slot.put(made)


def _replay_rest(module: nn.Module, incompatible_keys: Any) -> None:
    """Replay, exactly, the module's deferred tensors the state dict did not fill."""
    if dispatch_mode_active():
        return
    at = _PREFIXES.pop(module, "").rstrip(".")
    slots: list[tuple[Slot, Handle | None]] = list(own_deferred(module))
    # Container items are in no state dict: replayed, or views of what was loaded.
    slots += [(slot, handle_of(slot.tensor)) for slot in item_slots(module)]
    rest: list[str] = []
    records = {id(h.record): h.record for _, h in slots if h is not None}
    for slot, handle in slots:
        made = done(handle) if handle is not None else None
        if made is not None and handle is not None:  # the same tensor kept twice
            slot.put(made)
            settle(slot, handle, made)
            continue
        view = earlier_view(handle, slot.path) if handle is not None else None
        if (
            view is None
            and handle is not None
            and slot.kind == "attr"
            and wait_for_base(slot, handle)
        ):
            continue  # its base is loaded or replayed further on
        if view is None or handle is None:
            rest.append(slot.path)
            continue
        new = dress_like(slot.tensor, view, handle.attrs)
        slot.put(new)
        settle(slot, handle, new)
    if rest:
        rest = [f"{at}.{path}" if at else path for path in rest]
        materialize_paths(module, rest, device=_device_of(module), at=at)
    _finish(records.values())


def _reach_beyond(module: nn.Module, incompatible_keys: Any) -> None:
    """On a block's top module: replay the deferred modules it keeps outside its tree (in no
    state dict), and give references taken after the block the tensors loaded (see ``_reach``)."""
    if dispatch_mode_active() or not module.__dict__.get(_BEYOND_ATTR):
        return
    materialize_beyond(module)
    found = reach(module)
    if not found.holders and not any(
        deferred_slots(m) for m in (module, *(held for _, held in found.hidden))
    ):
        # Everything it reaches is real: later loads need no walk (a walk of a
        # large vocabulary dict on every load_state_dict).
        module.__dict__[_BEYOND_ATTR] = False


def _device_of(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s own real parameters and buffers (``None``: it has none)."""
    owned = [tensor_at(module, n) for n in (*parameter_names(module), *buffer_names(module))]
    real = [t for t in owned if t is not None and not t.is_meta]
    return real[0].device if real else None


def _finish(records: Iterable[Record]) -> None:
    """Make the views waiting for a base now real, then release the records with nothing left.

    A record whose last tensors were settled here (views of loaded weights,
    the same tensor kept twice) has no replay to release it, and its op log
    holds every tensor the block captured.
    """
    records = list(records)
    _settle_waiting(records)
    changed: list[str] = []
    for record in records:
        if not record.pending:
            complete(record, None)
            changed += _CHANGED.pop(id(record), [])
    warn_overwritten(changed, "load_state_dict")


def _settle_waiting(records: Iterable[Record]) -> None:
    """Views kept on modules loaded before their base's (see ``wait_for_base``), once it is real."""
    by_owner: dict[int, tuple[nn.Module, list[str]]] = {}
    for slot in settle_waiting(records):
        by_owner.setdefault(id(slot.owner), (slot.owner, []))[1].append(slot.path)
    for owner, paths in by_owner.values():
        # One replay per module: views of one another stay views.
        materialize_paths(owner, paths, device=_device_of(owner))


# The hooks above: a module carrying only these has no load code of its own
# (see lightning_meta._load._hooks).
OWN_HOOKS = (_fill_before_copy, _replay_rest, _reach_beyond)
