"""What a forward keeps in its modules' plain attributes, noted before a call and put back.

Shared by :class:`~lightning_meta.Ensemble` (below) and
:class:`~lightning_meta.MetaTemplate`, whose strict calls each start from
the template as built (what a forward stored is put back after the call).

Every member keeps what its own forward stores outside its parameters and
buffers (a cache of a derived tensor, such as LeViT's attention biases in
eval mode; a step count; the previous step's state), each in its own
module. The loop plan runs each member in its own copy of the template,
which keeps it the same way. ``torch.vmap`` and the grouped plan's
``torch.fx`` trace run the one template for every member at once: a tensor
computed there and stored is a wrapper that exists only inside the call (a
batched tensor, a trace's proxy), one value where the members have N. So a
plan of that kind that stores such a tensor is refused (``execution="auto"``
then runs the loop), and the template is put back as it was. A tensor every
member would store alike (an input the forward keeps for its hooks) is let
be. The plan timing puts back whatever its runs stored, so that only the
calls whose results are used change any module.

What is noted: every attribute of a module's ``__dict__`` but torch's own
tables, the items of dicts, lists, sets and deques among them (their
subclasses too, two levels deep), the in-place version of every tensor
among those, the names of the module's children, and the names in its
parameter and buffer tables (a forward that registers a buffer on its first
call, a lazily built running statistic). Modules running
torch's own ``forward`` without hooks are not watched (their forwards store
nothing), which keeps a model of many small torch layers cheap to watch.
With ``keep`` (the plan timing, the grouped plan's trace), other objects
(a ``random.Random`` or numpy generator drawn from, a counter object) are
noted too, as their pickles (tensors and modules they refer to by identity),
and put back in place. Not seen: changes deeper in containers, inside
objects that do not pickle, and inside objects on calls not timed.

The loop's copies keep each member's state; what they hold is carried
(:func:`state_of`, :func:`apply_state`) into copies made again (a hook
added), into copies and pickles of the ensemble, and into ``member(i)``:
data only (objects that pickle without referring to a tensor or module
included), never a function or an object that may refer to an old copy.
"""

from __future__ import annotations

import collections
import copy as pycopy
import enum
import functools
import io
import numbers
import pickle
import random
import sys
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from lightning_meta._compat import (
    HookTables,
    add_hooks,
    children_of,
    has_module_hooks,
    hook_order,
    hook_registrations,
    hook_tables,
    hooks_except,
    hooks_since,
    non_persistent_of,
    rebound_hook,
    restore_hook_tables,
    tensor_tables,
    version_of,
)
from lightning_meta._errors import ArgumentValueError

__all__ = [
    "ACCELERATE_HOOK",
    "MODULE_INTERNALS",
    "AttributeState",
    "StateWrittenError",
    "CopyState",
    "among",
    "apply_state",
    "carry_state",
    "copy_state",
    "owned_by",
    "state_of",
    "state_written_error",
    "tensor_ids",
    "watched",
]

# nn.Module's own bookkeeping, and what torch.compile adds.
MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_compiled_call_impl"}
# The attribute accelerate's add_hook_to_module keeps its hook object in (the forward it
# sets on the instance reads it there).
ACCELERATE_HOOK = "_hf_hook"
# Values noted as they are (an object of another kind may change in place).
_IMMUTABLE_TYPES = (
    type(None),
    numbers.Number,
    str,
    bytes,
    enum.Enum,
    tuple,
    frozenset,
    range,
    slice,
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
)
# Containers whose items are noted too, this deep (a dict of dicts).
_DEPTH = 2
# Tensors up to this size are copied to undo a change in place (a count, a
# small cache); a larger one (a constant table) changed in place is refused.
_KEEP_NUMEL = 1 << 20
# _Noted.version of an inference tensor, which has no version counter.
_INFERENCE = -2

# Whether a stored tensor is one every member would store alike (or the module's own).
Shared = Callable[[torch.Tensor], bool]

_TORCH_FORWARD: dict[type, bool] = {}


def _torch_forward(cls: type) -> bool:
    """Whether the class's ``forward`` is torch's own (not a subclass's, or a class torch
    makes around the user's, such as a parametrized module's)."""
    known = _TORCH_FORWARD.get(cls)
    if known is None:
        forward = getattr(cls, "forward", None)
        where = getattr(forward, "__module__", None) or ""
        known = _TORCH_FORWARD[cls] = where.split(".", 1)[0] == "torch"
    return known


def watched(modules: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The modules whose forward (or hooks) may store something: all but those running
    torch's own ``forward`` (not one set on the instance) without hooks."""
    return [
        (p, m)
        for p, m in modules
        if not _torch_forward(type(m)) or "forward" in vars(m) or has_module_hooks(m)
    ]


# Kinds of values, by class: found once per class with issubclass, since
# isinstance asks the object for its __class__, which some objects answer
# slowly (transformers' configs override __getattribute__).
_OTHER, _TENSOR, _DICT, _SEQUENCE, _SET, _GENERATOR = range(6)
_KINDS: dict[type, int] = {}


def _kind(value: Any) -> int:
    cls = type(value)
    kind = _KINDS.get(cls)
    if kind is None:
        kind = _KINDS[cls] = (
            _TENSOR
            if issubclass(cls, torch.Tensor)
            else _GENERATOR
            if issubclass(cls, torch.Generator)
            else _DICT
            if issubclass(cls, dict)
            else _SEQUENCE
            if issubclass(cls, (list, collections.deque))
            else _SET
            if issubclass(cls, (set, frozenset))
            else _OTHER
        )
    return kind


def _items(value: Any) -> list[tuple[Any, Any]] | None:
    """A container's (key, item) pairs (a set's items are their own keys); ``None`` for
    anything else."""
    kind = _kind(value)
    if kind == _DICT:
        return list(value.items())
    if kind == _SEQUENCE:
        return list(enumerate(value))
    if kind == _SET:
        return [(v, v) for v in value]
    return None


def _pairs(value: Any) -> list[tuple[Any, Any]] | None:
    """:func:`_items`, tuples (named tuples, ``torch.Size``) included: for reading only."""
    return list(enumerate(value)) if isinstance(value, tuple) else _items(value)


_MISSING = object()


def _note(value: Any, depth: int, keep: bool, objects: dict[int, _Noted]) -> Any:
    """``value`` itself, or a :class:`_Noted` for a tensor or a container (most attributes
    are numbers and strings, noted as they are: a call is watched on every ``vmap``)."""
    kind = _kind(value)
    if kind in (_TENSOR, _GENERATOR) or (kind != _OTHER and depth <= _DEPTH):
        return _Noted(value, depth, keep, objects)
    if (
        keep
        and not isinstance(value, _IMMUTABLE_TYPES)
        and not callable(value)
        # A large constant array is not pickled on every timed run (as a large
        # tensor is not copied: see _KEEP_NUMEL).
        and not (_numpy(value) and value.size > _KEEP_NUMEL)
    ):
        # An object's own attributes (a random.Random, a counter, a numpy
        # generator): noted as its pickle, only when asked (the timed runs),
        # once however many modules hold it (a transformers config).
        noted = objects.get(id(value))
        if noted is None:
            noted = objects[id(value)] = _Noted(value, depth, keep, objects)
        return noted
    return value


class _Pickler(pickle.Pickler):
    """Pickles an object's own data (classes and functions by name, as pickle does);
    tensors, generators and modules it refers to by identity (their own changes are seen
    elsewhere)."""

    def __init__(self, file: io.BytesIO, refs: dict[int, Any]) -> None:
        super().__init__(file, protocol=4)
        self.refs = refs

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, (torch.Tensor, torch.Generator, nn.Module)):
            self.refs[id(obj)] = obj
            return id(obj)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, refs: dict[int, Any]) -> None:
        super().__init__(file)
        self.refs = refs

    def persistent_load(self, pid: Any) -> Any:
        return self.refs[pid]


def _pickled(value: Any) -> tuple[bytes, dict[int, Any]] | None:
    """``value``'s data as :class:`_Pickler` writes it, or ``None`` for an object that does
    not pickle."""
    refs: dict[int, Any] = {}
    buffer = io.BytesIO()
    try:
        _Pickler(buffer, refs).dump(value)
    except Exception:  # an object pickle cannot take (a lock, a file) is not noted
        return None
    return buffer.getvalue(), refs


def _put_back(value: Any, pickled: tuple[bytes, dict[int, Any]]) -> bool:
    """Give ``value`` the data of its pickle again, in place (other names may hold the same
    object); ``False`` where this cannot be done, or did not give the pickle back (an object
    whose data is in its constructor's arguments, such as ``itertools.count``)."""
    if not _put_back_state(value, pickled):
        return False
    again = _pickled(value)
    return again is not None and again[0] == pickled[0]


def _put_back_state(value: Any, pickled: tuple[bytes, dict[int, Any]]) -> bool:
    try:
        old = _Unpickler(io.BytesIO(pickled[0]), pickled[1]).load()
        if hasattr(value, "bit_generator"):  # a numpy Generator: its state is its bit generator's
            value.bit_generator.state = old.bit_generator.state
            return True
        reduced = old.__reduce_ex__(4)
        state = reduced[2] if isinstance(reduced, tuple) and len(reduced) > 2 else None
        if hasattr(type(value), "__setstate__"):  # random.Random, a numpy array, ...
            value.__setstate__(state)
            return True
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
            for key, item in (slots or {}).items():
                setattr(value, key, item)
        if isinstance(state, dict):
            vars(value).clear()
            vars(value).update(state)
        return isinstance(state, dict) or state is None
    except Exception:
        return False


def _refill(container: Any, pairs: list[tuple[Any, Any]]) -> None:
    """Make ``container`` (a dict, list, deque or set, as :func:`_items` reads them; not a
    frozenset) hold ``pairs`` (a set's and a sequence's keys are not used)."""
    container.clear()
    if _kind(container) == _DICT:
        container.update(pairs)
    elif _kind(container) == _SET:
        container.update(v for _, v in pairs)
    else:
        container.extend(v for _, v in pairs)


def _value(noted: Any) -> Any:
    return noted.value if type(noted) is _Noted else noted


class _Noted:
    """One value as it was: the object, its in-place version (tensors), a copy of its values
    (tensors, when asked), its state (a ``torch.Generator``, which every draw from it
    changes in place: each member draws from its own), and its items noted in turn
    (containers)."""

    __slots__ = ("changed", "drawn", "items", "pickled", "saved", "value", "version")

    def __init__(self, value: Any, depth: int, keep: bool, objects: dict[int, _Noted]) -> None:
        self.value = value
        self.version = -1
        self.saved: torch.Tensor | None = None
        self.drawn: torch.Tensor | None = None
        self.items: dict[Any, Any] | None = None
        self.pickled: tuple[bytes, dict[int, Any]] | None = None
        self.changed = False  # an object's, as :meth:`look` last found
        if isinstance(value, torch.Generator):
            self.drawn = value.get_state()
        elif _kind(value) == _OTHER:
            self.pickled = _pickled(value)
        elif isinstance(value, torch.Tensor):
            # An inference tensor (made under torch.inference_mode) has no version
            # counter: it is noted by a copy of its values, compared and put back.
            inference = value.is_inference()
            self.version = _INFERENCE if inference else version_of(value)
            if (keep or inference) and not value.is_meta and value.numel() <= _KEEP_NUMEL:
                self.saved = value.detach().clone()
        elif depth <= _DEPTH:
            pairs = _items(value)
            if pairs is not None:
                self.items = {k: _note(v, depth + 1, keep, objects) for k, v in pairs}

    def restore(self, where: str, lost: list[str]) -> None:
        """Put the value back; note ``where`` in ``lost`` for a tensor changed in place that
        was not copied."""
        value, items = self.value, self.items
        if self.moved():
            if self.drawn is not None:
                value.set_state(self.drawn)
            elif self.pickled is not None and _put_back(value, self.pickled):
                self.changed = False  # put back once, however many modules hold it
            else:
                lost.append(where)
        if self.written():
            if self.saved is None:
                lost.append(where)
            else:
                with torch.inference_mode() if value.is_inference() else torch.no_grad():
                    value.copy_(self.saved)
        if items is None:
            return
        if not isinstance(value, frozenset):
            _refill(value, [(k, _value(n)) for k, n in items.items()])
        for key, noted in items.items():
            if type(noted) is _Noted:
                noted.restore(f"{where}[{key!r}]", lost)

    def written(self) -> bool:
        """Whether the value is a tensor changed in place since: its version moved, or, for
        an inference tensor, its values differ from the copy (one too large to copy counts
        as changed: nothing shows it was not)."""
        if self.version >= 0:
            return version_of(self.value) != self.version
        if self.version == _INFERENCE:
            return self.saved is None or not torch.equal(self.value, self.saved)
        return False

    def moved(self) -> bool:
        """Whether the value is a generator drawn from since, or an object (noted by its
        pickle) whose data changed."""
        if self.drawn is not None:
            return not torch.equal(self.value.get_state(), self.drawn)
        return self.changed

    def look(self) -> None:
        """Pickle an object again and note whether its data changed (once per object, however
        many modules hold it: see :meth:`AttributeState._look`)."""
        now = _pickled(self.value)
        self.changed = now is None or self.pickled is None or now[0] != self.pickled[0]


# A module's own parameter or buffer table, as noted.
_Table = dict[str, "torch.Tensor | None"]


class AttributeState:
    """The plain attributes (not torch's tables) of some modules, as they were when noted.

    Args:
        modules: ``(path, module)`` pairs (see :func:`watched`).
        keep: also copy the values of the tensors among them, so that
            :meth:`restore` undoes in-place changes too.
    """

    def __init__(self, modules: Iterable[tuple[str, nn.Module]], *, keep: bool = False) -> None:
        pairs = list(modules)
        self.modules = [mod for _, mod in pairs]
        self._objects: dict[int, _Noted] = {}
        # The parameter and buffer tables, as they were: a forward that registers
        # a buffer on its first call (a lazily built running statistic) changes
        # torch's own tables, which the attributes below leave out.
        self._tables: list[tuple[str, nn.Module, _Table, _Table, set[str]]] = []
        # Under torch.compile (which cannot trace a copy of a module's set of
        # non-persistent names on torch 2.6) a registration is not watched,
        # nor a hook registered.
        self._roots = [] if torch.compiler.is_compiling() else pairs
        for path, mod in self._roots:
            params, buffers = tensor_tables(mod)
            dot = f"{path}." if path else ""
            self._tables.append(
                (dot, mod, dict(params), dict(buffers), set(non_persistent_of(mod)))
            )
        # The hook tables: a forward that registers hooks on its modules on its
        # first call (transformers' output capturing, marked by a plain flag put
        # back with the attributes) changes torch's own tables too. Hooks
        # registered since are found by their handle ids (which only grow) on
        # every module under the noted ones; those removed, among the modules
        # that had hooks (every one is noted: see ``watched``).
        self._hook_count = hook_registrations()
        self._hooked: list[tuple[str, nn.Module, HookTables]] = [
            (path, mod, hook_tables(mod)) for path, mod in self._roots if has_module_hooks(mod)
        ]
        self._noted = [
            (
                path,
                mod,
                vars(mod),
                list(children_of(mod)),
                {
                    key: _note(value, 0, keep, self._objects)
                    for key, value in vars(mod).items()
                    if key not in MODULE_INTERNALS
                },
            )
            for path, mod in pairs
        ]

    def written(self, shared: Shared) -> list[str]:
        """Dotted paths where a tensor is now held that was not before and is not ``shared``
        (a trace's proxy never is), parameters and buffers registered or removed included."""
        found = self._diff(lambda value: _holds_own(value, shared), in_place=False)
        return found + self.registered()

    def registered(self) -> list[str]:
        """Dotted paths of the parameters and buffers registered or removed since."""
        found: list[str] = []
        for dot, mod, params, buffers, _ in self._tables:
            for now, before in zip(tensor_tables(mod), (params, buffers), strict=True):
                if now.keys() != before.keys():
                    found += [dot + key for key in now.keys() ^ before.keys()]
        return found

    def changed(self, own: Shared) -> list[str]:
        """Dotted paths of every attribute, container item or child added, replaced, removed
        or changed in place since, but for those holding only ``own`` tensors (or weak
        references to them: an ``nn.LSTM``'s lists of its weights, which follow its
        parameter table)."""
        found = self._diff(lambda value: not _only(value, own), in_place=True)
        for path, mod, _, children, _ in self._noted:
            if list(children_of(mod)) != children:
                found.append(f"{path}.<children>" if path else "<children>")
        return found + self.registered() + self.hooks_changed()

    def _hook_changes(self) -> list[tuple[str, nn.Module, HookTables | None]]:
        """The modules whose hook tables changed since, with their tables as noted (``None``:
        none noted, so empty then)."""
        found: list[tuple[str, nn.Module, HookTables | None]] = []
        seen: set[int] = set()
        for path, mod, noted in self._hooked:
            seen.add(id(mod))
            if hook_tables(mod) != noted:
                found.append((path, mod, noted))
        if hook_registrations() != self._hook_count:
            for root, top in self._roots:
                for path, mod in top.named_modules(prefix=root):
                    if id(mod) not in seen:
                        seen.add(id(mod))
                        if hooks_since(mod, self._hook_count):
                            found.append((path, mod, None))
        return found

    def hooks_changed(self) -> list[str]:
        """Dotted paths (``<path>.<hooks>``) of the modules whose hooks were registered or
        removed since."""
        return [f"{path}.<hooks>" if path else "<hooks>" for path, _, _ in self._hook_changes()]

    def _look(self) -> None:
        for noted in self._objects.values():
            if noted.pickled is not None:
                noted.look()

    def _diff(self, counts: Callable[[Any], bool], in_place: bool) -> list[str]:
        self._look()
        found: list[str] = []
        for path, _, attributes, _, noted in self._noted:
            now = {k: v for k, v in attributes.items() if k not in MODULE_INTERNALS}
            _diff_items(now, noted, f"{path}." if path else "", False, counts, in_place, found)
        return found

    def restore(self) -> list[str]:
        """Put back every noted attribute, container item, tensor value (with ``keep``, up to
        a size) and child; drop attributes and children added since. Returns the dotted
        paths of tensors changed in place that could not be put back (not copied)."""
        self._look()
        lost: list[str] = []
        for path, mod, attributes, children, noted in self._noted:
            dot = f"{path}." if path else ""
            for key in [k for k in attributes if k not in MODULE_INTERNALS and k not in noted]:
                del attributes[key]
            for key, entry in noted.items():
                attributes[key] = _value(entry)
                if type(entry) is _Noted:
                    entry.restore(dot + key, lost)
            for name in [n for n in children_of(mod) if n not in children]:
                delattr(mod, name)
        for _, mod, params, buffers, non_persistent in self._tables:
            for now, before in zip(tensor_tables(mod), (params, buffers), strict=True):
                if now.keys() != before.keys():
                    table = dict(now)
                    for key in table.keys() - before.keys():
                        del now[key]  # type: ignore[attr-defined]
                    for key in before.keys() - table.keys():
                        now[key] = before[key]  # type: ignore[index]
            kept = non_persistent_of(mod)
            if kept != non_persistent:
                kept.clear()
                kept.update(non_persistent)
        for _, hooked, tables in self._hook_changes():
            restore_hook_tables(hooked, tables, self._hook_count)
        return lost


def _diff_items(
    now: dict[Any, Any],
    before: dict[Any, Any],
    where: str,
    items_of: bool,
    counts: Callable[[Any], bool],
    in_place: bool,
    found: list[str],
) -> None:
    """Note in ``found`` the keys of ``now`` (an object's attributes, or with ``items_of`` a
    container's items) that changed from ``before``."""

    def name(key: Any) -> str:
        return f"{where}[{key!r}]" if items_of else f"{where}{key}"

    for key, value in now.items():
        old = before.get(key, _MISSING)
        if old is _MISSING:
            changed = True
        elif _value(old) is not value:
            # A new object of the same value (self.shape = tuple(x.shape)) is no change.
            changed = not _same_value(_value(old), value)
        elif type(old) is _Noted:
            # A draw from a generator is a change in place, whatever ``in_place``
            # asks: the draw itself is state each member keeps for itself.
            changed = old.moved() or (in_place and old.written())
        else:
            changed = False
        if changed:
            if counts(value):
                found.append(name(key))
        elif type(old) is _Noted and old.items is not None:
            pairs = _items(value) or []
            _diff_items(dict(pairs), old.items, name(key), True, counts, in_place, found)
    if in_place:
        found.extend(name(key) for key in before if key not in now)


_IMMUTABLE = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype})


def _same_value(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are numbers, strings or tuples of those, equal."""
    kind = type(a)
    if kind is not type(b):
        return False
    if kind in _IMMUTABLE:
        return bool(a == b)
    if kind is tuple or kind is torch.Size:
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return False


def _holds_own(value: Any, shared: Shared, depth: int = 0) -> bool:
    """Whether ``value`` is or holds a tensor that is not ``shared`` (or a trace's proxy), or
    is a generator (only a changed one is asked about: one drawn from)."""
    if isinstance(value, (fx.Proxy, torch.Generator)):
        return True
    if isinstance(value, torch.Tensor):
        return not shared(value)
    if depth > _DEPTH:
        return False
    pairs = _pairs(value)
    return pairs is not None and any(_holds_own(v, shared, depth + 1) for _, v in pairs)


def _only(value: Any, own: Shared, depth: int = 0) -> bool:
    """Whether ``value`` is an ``own`` tensor (or a weak reference to one, or to nothing),
    or a non-empty container of nothing else."""
    if isinstance(value, torch.Tensor):
        return own(value)
    if isinstance(value, weakref.ref):
        target = value()
        return target is None or (isinstance(target, torch.Tensor) and own(target))
    if depth > _DEPTH:
        return False
    pairs = _pairs(value)
    return pairs is not None and bool(pairs) and all(_only(v, own, depth + 1) for _, v in pairs)


def tensor_ids(modules: Iterable[nn.Module]) -> set[int]:
    """The ids of the parameters and buffers in ``modules``' own tables."""
    return {
        id(t)
        for mod in modules
        for table in tensor_tables(mod)
        for t in table.values()
        if t is not None
    }


def among(ids: set[int]) -> Shared:
    """Whether a tensor is one of ``ids``."""
    return lambda tensor: id(tensor) in ids


def owned_by(module: nn.Module) -> Shared:
    """Whether a tensor is one of ``module``'s parameters or buffers (any submodule's).

    The ids are collected on the first question: most comparisons ask none
    (nothing was stored), and a template call makes one per call.
    """
    ids: set[int] | None = None

    def own(tensor: torch.Tensor) -> bool:
        nonlocal ids
        if ids is None:
            ids = tensor_ids(module.modules())
        return id(tensor) in ids

    return own


# What a copy holds in its plain attributes: module path -> (its class, its
# attributes carried, the hooks its forward registered there or None). An
# ensemble pickled before hooks were carried holds pairs.
CopyState = dict[str, tuple[Any, ...]]


class _BoundTo:
    """A hook that is a method of a module of the copy, by the module's path: carried into
    another copy (or a pickle), it is that copy's module's method."""

    __slots__ = ("function", "path")

    def __init__(self, path: str, function: Any) -> None:
        self.path, self.function = path, function

    def __reduce__(self) -> tuple[type[_BoundTo], tuple[str, Any]]:
        return (_BoundTo, (self.path, self.function))


class _Hooks:
    """The hooks a copy's forward registered on one of its modules, the order of the
    module's tables they are in, and the ids of the copy's modules with their paths (for
    hooks that are functions closing over them)."""

    __slots__ = ("order", "paths", "tables")

    def __init__(
        self,
        tables: HookTables,
        paths: dict[int, str],
        order: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        self.tables, self.paths, self.order = tables, paths, order

    def __reduce__(
        self,
    ) -> tuple[type[_Hooks], tuple[HookTables, dict[int, str], dict[str, tuple[int, ...]] | None]]:
        # The ids mean nothing in another process: a function closing over a
        # module of the copy does not pickle anyway (a local function).
        return (_Hooks, (self.tables, {}, self.order))


def state_of(
    module: nn.Module, *, copy: bool = False, template_hooks: frozenset[int] | None = None
) -> CopyState:
    """What ``module`` (a member's copy of the template) holds in its plain attributes,
    module by module: data only (numbers, strings, enums, numpy values, tensors, and
    containers of those), not what follows its parameter tables (an ``nn.LSTM``'s list of
    its weights), nor functions, methods and other objects (which may refer to the
    copy itself: a bound method kept as an attribute, ``torch.compile``'s wrapper), which a
    new copy has from the template. With ``copy``, copies of it (tensors detached; values
    that were one object stay one object).

    ``template_hooks``: the handle ids of the template's hooks when the copy was made; the
    copy's other hooks (registered by its forward: transformers installs its output-capturing
    hooks on the first call asking for hidden states, and marks the model with a plain flag)
    are carried too, with the attributes that go with them.
    """
    memo: dict[int, Any] = {}
    objects: dict[int, bool] = {}
    own = owned_by(module)
    named = list(module.named_modules())
    paths: dict[int, str] | None = None
    state: CopyState = {}
    for path, mod in named:
        hooks: _Hooks | None = None
        tables = hooks_except(mod, template_hooks) if template_hooks is not None else None
        if tables:
            if paths is None:
                paths = {id(m): p for p, m in named}
            hooks = _Hooks(
                {k: _named_hooks(v, paths) for k, v in tables.items()},
                paths,
                hook_order(mod, tables),
            )
        state[path] = (
            type(mod),
            {
                key: _detached_copy(value, memo) if copy else value
                for key, value in vars(mod).items()
                if key not in MODULE_INTERNALS and _data(value, objects) and not _only(value, own)
            },
            hooks,
        )
    return state


def _named_hooks(table: dict[int, Any], paths: dict[int, str]) -> dict[int, Any]:
    """``table`` with the hooks that are methods of the copy's modules named by path."""
    out: dict[int, Any] = {}
    for key, hook in table.items():
        owner = getattr(hook, "__self__", None)
        if isinstance(hook, types.MethodType) and id(owner) in paths:
            hook = _BoundTo(paths[id(owner)], hook.__func__)
        out[key] = hook
    return out


def copy_state(state: CopyState) -> CopyState:
    """A copy of ``state`` (tensors detached, one object staying one object; hooks as
    they are)."""
    memo: dict[int, Any] = {}
    return {
        path: (held[0], {k: _detached_copy(v, memo) for k, v in held[1].items()}, *held[2:])
        for path, held in state.items()
    }


def apply_state(module: nn.Module, state: CopyState) -> None:
    """Put ``state`` (from :func:`state_of`) into ``module``'s plain attributes and hook
    tables, module by module where the path holds a module of the same class (a submodule a
    forward adds on its first call is added again by that forward)."""
    named = list(module.named_modules())
    carried = [held[2] for held in state.values() if len(held) > 2 and held[2] is not None]
    # Every module's hooks share one map of the old copy's modules: by path, to this one's.
    mine = dict(named) if carried else {}
    pairs = {key: mine[p] for key, p in carried[0].paths.items() if p in mine} if carried else {}
    cells: dict[int, Any] = {}

    def bind(hook: Any) -> Any:
        if isinstance(hook, _BoundTo):
            return types.MethodType(hook.function, module.get_submodule(hook.path))
        return rebound_hook(hook, pairs, cells)

    for path, mod in named:
        held = state.get(path)
        if held is None or held[0] is not type(mod):
            continue
        vars(mod).update(held[1])
        if len(held) > 2 and held[2] is not None:
            add_hooks(mod, held[2].tables, bind, held[2].order)


def carry_state(
    old: nn.Module,
    new: nn.Module,
    *,
    copy: bool = False,
    template_hooks: frozenset[int] | None = None,
) -> None:
    """Give ``new`` (a fresh copy of the template) what ``old`` (the copy it replaces) holds
    in its plain attributes, and its hooks but ``template_hooks`` (see :func:`state_of`)."""
    apply_state(new, state_of(old, copy=copy, template_hooks=template_hooks))


_PLAIN = (
    type(None),
    bool,
    numbers.Number,
    str,
    bytes,
    enum.Enum,
    torch.dtype,
    torch.device,
)
# Containers of data are carried this deep.
_DATA_DEPTH = 6


def _numpy(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype")


def _data(value: Any, objects: dict[int, bool], depth: int = 0) -> bool:
    """Whether ``value`` is a number, a string, an enum, a numpy value, a tensor, a
    generator (its state), an object that pickles without referring to any tensor or
    module, or a container (tuples and named tuples included) of only those.

    ``objects``: the answers for objects found so far, by id (one config object is
    held by every module of a transformers model)."""
    if isinstance(value, _PLAIN) or _kind(value) in (_TENSOR, _GENERATOR) or _numpy(value):
        return True
    if _kind(value) == _OTHER and not isinstance(value, _IMMUTABLE_TYPES) and not callable(value):
        # An object holding data only (a random.Random, a counter): no tensor
        # or module of the copy it came from.
        known = objects.get(id(value))
        if known is None:
            pickled = _pickled(value)
            known = objects[id(value)] = pickled is not None and not pickled[1]
        return known
    if depth > _DATA_DEPTH:
        return False
    pairs = _pairs(value)
    return pairs is not None and all(
        _data(k, objects, depth + 1) and _data(v, objects, depth + 1) for k, v in pairs
    )


def _detached_copy(value: Any, memo: dict[int, Any]) -> Any:
    known = memo.get(id(value))
    if known is not None:
        return known
    if isinstance(value, torch.Tensor):
        out: Any = value.detach().clone()
    elif isinstance(value, torch.Generator):
        out = torch.Generator(value.device)
        out.set_state(value.get_state())
    elif not isinstance(value, frozenset) and (pairs := _items(value)) is not None:
        out = pycopy.copy(value)  # the same class (a defaultdict keeps its factory)
        memo[id(value)] = out
        _refill(out, [(k, _detached_copy(v, memo)) for k, v in pairs])
        return out
    elif isinstance(value, tuple) and type(value) is tuple:
        out = tuple(_detached_copy(v, memo) for v in value)
    else:  # numbers, strings, enums, named tuples of those, numpy values
        out = pycopy.deepcopy(value)
    memo[id(value)] = out
    return out


class StateWrittenError(ArgumentValueError):
    """A plan that runs one template for every member saw its forward keep state."""


def state_written_error(
    plan: str, runner: str, paths: list[str], forced: bool, registered: Iterable[str] = ()
) -> StateWrittenError:
    """The refusal of ``plan`` (which ran the template's forward as ``runner``) for a
    forward that stored state at ``paths``, among which it ``registered`` parameters or
    buffers (or removed them)."""
    fix = (
        "Fix: use execution='loop', or 'auto' (which runs the loop for such a forward)."
        if forced
        else "Fix: use execution='loop'."
    )
    registered = sorted(registered)
    if registered:
        return StateWrittenError(
            f"Ensemble(execution={plan!r}) ran the template's forward {runner}, and the "
            f"forward registered (or removed) {', '.join(repr(p) for p in registered)} in its "
            "parameter or buffer tables: each member registers its own, which the template, "
            "shared by the members, cannot hold (the template is left as it was). Fix: "
            "register the buffer in the module's __init__ (self.register_buffer(name, "
            "torch.zeros(...)); the forward then assigns it), or use execution='loop' (or "
            "'auto', which runs the loop for such a forward), which stacks a buffer the "
            "members' forwards register.",
            paths=registered,
        )
    return StateWrittenError(
        f"Ensemble(execution={plan!r}) ran the template's forward {runner}, and the forward "
        f"changed {', '.join(repr(p) for p in paths)}, outside the parameters and buffers. "
        "Each member keeps its own value there; the template, shared by the members, "
        "cannot (the template is left as it was). " + fix,
        paths=paths,
    )


def _numpy_random() -> Any:
    """``numpy.random`` when numpy is imported (a forward drawing from it has imported it)."""
    numpy = sys.modules.get("numpy")
    return None if numpy is None else getattr(numpy, "random", None)


class GlobalRandom:
    """The global random generators a forward may draw from in plain Python code, noted
    now: Python's ``random`` and, when numpy is imported, ``numpy.random``'s; with
    ``torch_too``, torch's CPU generator and those of the CUDA devices in use as well.

    ``torch.vmap`` runs the template's forward once for all members, so a draw
    from such a generator is one draw for all members where each member makes
    its own; a ``torch.fx`` trace runs it once, and the graph keeps the branch
    it took for good (a draw by a torch op that takes no traced tensor, such as
    ``torch.rand(())``, included). :meth:`moved` tells such a draw;
    :meth:`restore` puts the generators back.

    Costs about 10 microseconds for ``random`` and 20 to 40 for numpy
    (copies of their states), so it is taken only where a forward of the
    user's own runs under vmap, or traced.
    """

    __slots__ = ("_numpy", "_python", "_torch")

    def __init__(self, *, torch_too: bool = False) -> None:
        self._python = random.getstate()
        nprandom = _numpy_random()
        self._numpy = None if nprandom is None else nprandom.get_state()
        self._torch: list[tuple[Callable[[torch.Tensor], None], torch.Tensor]] = []
        if torch_too:
            self._torch.append((torch.set_rng_state, torch.get_rng_state()))
            if torch.cuda.is_initialized():
                for index in range(torch.cuda.device_count()):
                    state = torch.cuda.get_rng_state(index)
                    self._torch.append(
                        (functools.partial(torch.cuda.set_rng_state, device=index), state)
                    )

    def moved(self) -> list[str]:
        """The generators drawn from since (their names, for a message)."""
        out = []
        if random.getstate() != self._python:
            out.append("Python's random")
        nprandom = _numpy_random()
        if self._numpy is not None and nprandom is not None:
            now = nprandom.get_state()
            before = self._numpy
            if now[2:] != before[2:] or not (now[1] == before[1]).all():
                out.append("numpy.random")
        for i, (_, state) in enumerate(self._torch):
            now_state = torch.get_rng_state() if i == 0 else torch.cuda.get_rng_state(i - 1)
            if not torch.equal(now_state, state):
                out.append("torch's CPU generator" if i == 0 else f"torch's cuda:{i - 1} generator")
        return out

    def restore(self) -> None:
        """Put every generator back as it was when noted."""
        random.setstate(self._python)
        nprandom = _numpy_random()
        if self._numpy is not None and nprandom is not None:
            nprandom.set_state(self._numpy)
        for set_state, state in self._torch:
            set_state(state)


def global_draw_error(plan: str, drawn: list[str], forced: bool) -> StateWrittenError:
    """The refusal of ``plan`` for a forward that drew from the global generators ``drawn``
    (:class:`GlobalRandom`) under ``torch.vmap``; they have been put back."""
    fix = (
        "Fix: use execution='loop' (or 'auto', which runs the loop for such a forward), or "
        "draw with torch's random ops (torch.rand_like(x) < p: randomness='different' gives "
        "every member its own draws)."
        if forced
        else "Fix: use execution='loop', or draw with torch's random ops (torch.rand_like(x) "
        "< p: randomness='different' gives every member its own draws)."
    )
    return StateWrittenError(
        f"Ensemble(execution={plan!r}) ran the template's forward under torch.vmap, once for "
        f"all members, and the forward drew from {' and '.join(drawn)} (random.random(), "
        "numpy.random): one draw for all members, where each member draws its own, so the "
        "members would take the same random decisions (a LayerDrop's skipped layers). The "
        f"generator's state has been put back. {fix}"
    )
