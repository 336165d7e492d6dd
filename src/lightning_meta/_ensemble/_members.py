"""What every ensemble member must share with member 0, and what no member may hold.

The ensemble's template is member 0 (its structure, its settings, its
hooks) and its tensors are copies stacked member by member. Whatever a
member holds that the template or the stacked copies cannot carry would be
lost without an error, so it is refused here, listing every difference:

- the tensors (names, shapes, dtypes, ``requires_grad``, classes, ties),
  what ``repr`` shows, and every plain setting of every submodule: the
  attributes ``forward`` reads (numbers, strings, numpy values, tensors kept
  as plain attributes, functions, in containers too), its train/eval mode,
  its buffers' persistence, private attributes included (not torch's or
  Lightning's own bookkeeping);
- the module hooks of every submodule (the template runs member 0's);
- a tensor shared by two members (trained once in a loop over them, but
  stacked once per member here);
- a tensor that requires grad held outside the member's parameters (in a
  plain attribute, a list or a dict): the template keeps a copy of member
  0's, which no gradient reaches.
"""

from __future__ import annotations

import contextlib
import functools
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lightning_meta._compat import (
    buffers_of,
    dynamo_wrapper,
    forward_hook_flags,
    module_hooks,
    tensor_tables,
)
from lightning_meta._forward_state import ACCELERATE_HOOK, MODULE_INTERNALS
from lightning_meta._settings import as_now, differs, plain_value
from lightning_meta._slots import tie_groups
from lightning_meta._watched import tensor_class

__all__ = [
    "Profile",
    "SharedTensors",
    "changed_since",
    "compare",
    "held_outside",
    "settings",
    "slice_strides",
]

# What this package adds to a module.
_OWN_PREFIX = "_lightning_meta"
# Lightning's modules keep run state in private attributes (the trainer,
# hyperparameters, the current hook's name): not settings of the function.
_LIGHTNING_ROOTS = ("lightning", "pytorch_lightning", "lightning_fabric")


def _signature(module: nn.Module) -> dict[str, tuple[str, tuple[int, ...], torch.dtype, bool]]:
    sig: dict[str, tuple[str, tuple[int, ...], torch.dtype, bool]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        cls = tensor_class(p)  # a deferred member's watch class is its base's
        kind = "parameter" if cls is nn.Parameter else f"parameter ({cls.__qualname__})"
        sig[name] = (kind, tuple(p.shape), p.dtype, p.requires_grad)
    for name, b in module.named_buffers(remove_duplicate=False):
        sig[name] = ("buffer", tuple(b.shape), b.dtype, False)
    return sig


def slice_strides(t: torch.Tensor) -> tuple[int, ...] | None:
    """The strides a member's slice of a stacked tensor takes for the member's ``t``: those
    ``torch.empty_like`` gives it (a dense tensor's own, size-1 dims included, which torch's
    choice of a convolution's output format reads; contiguous otherwise), or ``None`` for
    a tensor that is not strided (contiguous then too)."""
    if t.layout != torch.strided:
        return None
    # A contiguous tensor is dense: empty_like would keep its strides (most tensors).
    return tuple((t if t.is_contiguous() else torch.empty_like(t, device="meta")).stride())


def _layouts(module: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor's layout in memory as the ensemble's stacked slice takes it
    (:func:`slice_strides`), with a name for it."""
    out = {}
    tensors = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for name, t in tensors:
        strides = slice_strides(t)
        if strides is not None:
            out[name] = (_layout_name(t.shape, strides), strides)
    return out


def _layout_name(shape: torch.Size, strides: tuple[int, ...]) -> str:
    formats = [("contiguous", torch.contiguous_format)]
    if len(shape) == 4:
        formats.append(("channels_last", torch.channels_last))
    elif len(shape) == 5:
        formats.append(("channels_last_3d", torch.channels_last_3d))
    for word, memory_format in formats:
        if torch.empty(shape, device="meta", memory_format=memory_format).stride() == strides:
            return word
    return f"with strides {strides}"


def _ties(module: nn.Module) -> list[tuple[str, ...]]:
    groups = [tuple(s.path for s in g) for g in tie_groups(module)]
    return sorted(g for g in groups if len(g) > 1)


class Profile:
    """What :func:`compare` reads of one member, each computed once (member 0's is compared
    with every other member)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @functools.cached_property
    def signature(self) -> dict[str, tuple[str, tuple[int, ...], torch.dtype, bool]]:
        return _signature(self.module)

    @functools.cached_property
    def layouts(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return _layouts(self.module)

    @functools.cached_property
    def ties(self) -> list[tuple[str, ...]]:
        return _ties(self.module)

    @functools.cached_property
    def modules(self) -> dict[str, nn.Module]:
        return dict(self.module.named_modules(remove_duplicate=False))

    @functools.cached_property
    def reprs(self) -> dict[str, str]:
        return {path: _extra_repr(mod) for path, mod in self.modules.items()}

    @functools.cached_property
    def repr_lines(self) -> list[str]:
        return repr(self.module).splitlines()

    @functools.cached_property
    def member(self) -> _Member:
        return _Member(self.module)

    @functools.cached_property
    def settings(self) -> dict[str, Any]:
        return settings(self.module, member=self.member)

    @functools.cached_property
    def hooks(self) -> dict[str, dict[str, Any]]:
        return {
            path: _hook_tables(mod, self.member)
            for path, mod in self.modules.items()
            if not dynamo_wrapper(mod)
        }

    def stand_in(self, copy: nn.Module) -> None:
        """Read all :func:`compare` needs of the module, then hold ``copy`` (a meta copy of it,
        the ensemble's template: the same classes, paths and hooks) in its place, so that
        the module and its tensors can be freed while later members are compared with it."""
        _ = self.signature, self.ties, self.reprs, self.repr_lines, self.settings, self.hooks
        self.module = copy
        self.__dict__["modules"] = dict(copy.named_modules(remove_duplicate=False))
        self.__dict__.pop("member", None)


def compare(reference: Profile, other: nn.Module, index: int) -> list[tuple[str, str]]:
    """Every way ``other`` (member ``index``) differs from member 0 (``reference``): (a line
    for an error, the dotted paths it concerns, comma-separated, ``""`` for the member as a
    whole)."""
    if not same_class(type(other), type(reference.module)):
        theirs, mine = _class_names(type(other), type(reference.module))
        return [(f"member {index} is {theirs}, member 0 is {mine}", "")]
    them = Profile(other)
    ref, sig = reference.signature, them.signature
    problems = [(f"member {index} lacks {n!r} {ref[n][1]}", n) for n in ref if n not in sig]
    problems += [(f"member {index} has extra {n!r} {sig[n][1]}", n) for n in sig if n not in ref]
    for name in sorted(ref.keys() & sig.keys()):
        (kind_a, shape_a, dtype_a, grad_a), (kind_b, shape_b, dtype_b, grad_b) = (
            ref[name],
            sig[name],
        )
        if (kind_a, shape_a, dtype_a) != (kind_b, shape_b, dtype_b):
            problems.append(
                (
                    f"member {index}: {kind_b} {name!r} is {shape_b} {dtype_b}, member 0 has "
                    f"{'' if kind_a == kind_b else kind_a + ' '}{shape_a} {dtype_a}",
                    name,
                )
            )
        elif grad_a != grad_b:
            problems.append(
                (
                    f"member {index}: {name!r} has requires_grad={grad_b}, member 0 has {grad_a}",
                    name,
                )
            )
        elif name in reference.layouts and (
            reference.layouts[name][1] != them.layouts.get(name, reference.layouts[name])[1]
        ):
            # The stacked tensor lays every slice out as member 0's: member index
            # would compute in another layout than its own (a convolution's output
            # layout, and so the elements a dropout after it drops).
            how = (
                ".to(memory_format=torch.channels_last) on every member, or on none"
                if len(sig[name][1]) in (4, 5)
                else "the same strides, e.g. .contiguous() data in every member"
            )
            problems.append(
                (
                    f"member {index}: {name!r} is laid out {them.layouts[name][0]}, member 0's "
                    f"{reference.layouts[name][0]} (lay every member out alike: {how})",
                    name,
                )
            )
    ties, ref_ties = them.ties, reference.ties
    if ties != ref_ties:
        tied = ", ".join(sorted({n for g in {*ties} ^ {*ref_ties} for n in g}))
        problems.append((f"member {index} ties {ties}, member 0 ties {ref_ties}", tied))
    if not problems:
        # Same tensors, other classes or settings (a dropout rate, an
        # activation's slope): the template is member 0, so the difference
        # would be lost silently.
        problems += _compare_modules(reference, them, index)
    if not problems:
        for mine, theirs in zip(reference.repr_lines, them.repr_lines, strict=False):
            if mine != theirs:
                if _same_reprs_but_values(reference.module, them.module, deep=True):
                    break  # only tensors' values differ, which a repr may print
                problems.append(
                    (
                        f"member {index} has {theirs.strip()!r} where member 0 has "
                        f"{mine.strip()!r}",
                        "",
                    )
                )
                break
    if not problems:
        # Settings repr does not show (a plain attribute forward reads, a
        # submodule left in eval mode, a buffer's persistence, hooks).
        ref_settings, other_settings = reference.settings, them.settings
        for key in sorted(ref_settings.keys() | other_settings.keys()):
            mine, theirs = ref_settings.get(key, _ABSENT), other_settings.get(key, _ABSENT)
            if _differs(mine, theirs):
                line = f"member {index} has {key} = {theirs!r}, member 0 has {mine!r}"
                if key.endswith("training"):
                    line += " (call .train() or .eval() alike on every member)"
                problems.append((line, key))
        problems += _compare_hooks(reference, them, index)
    return problems


def changed_since(before: Profile) -> list[str]:
    """What changed in ``before.module`` since ``before`` read it (its signature, settings and
    hooks read before the change): the names of tensors added, removed, or of another kind,
    shape or dtype, submodules added or removed, settings and hooks changed. Values,
    ``requires_grad`` and train/eval modes are not listed."""
    after = Profile(before.module)
    changed = []
    sig_before, sig_after = before.signature, after.signature
    for name in sorted(sig_before.keys() | sig_after.keys()):
        mine, theirs = sig_before.get(name), sig_after.get(name)
        if mine is None or theirs is None or mine[:3] != theirs[:3]:
            changed.append(name)
    changed += sorted(before.modules.keys() ^ after.modules.keys())
    for key in sorted(before.settings.keys() | after.settings.keys()):
        if key == "training" or key.endswith(".training"):
            continue
        if _differs(before.settings.get(key, _ABSENT), after.settings.get(key, _ABSENT)):
            changed.append(key)
    for path in sorted(before.hooks.keys() & after.hooks.keys()):
        if not _same_key(before.hooks[path], after.hooks[path]):
            changed.append(f"{path}.<hooks>" if path else "<hooks>")
    return changed


def _compare_modules(reference: Profile, other: Profile, index: int) -> list[tuple[str, str]]:
    """Submodules of another class (by definition, see :func:`same_class`) or ``extra_repr``,
    and submodules without tensors one member has and the other lacks (timm adds a
    ``DropPath`` only where ``drop_path_rate > 0``)."""
    problems = [
        (f"member {index} lacks the submodule {path!r} ({type(mod).__name__})", path)
        for path, mod in reference.modules.items()
        if path not in other.modules
    ]
    problems += [
        (f"member {index} has an extra submodule {path!r} ({type(mod).__name__})", path)
        for path, mod in other.modules.items()
        if path not in reference.modules
    ]
    for path, mod in reference.modules.items():
        theirs = other.modules.get(path)
        if theirs is None:
            continue  # the tensors' names differ, reported above
        where = repr(path) if path else "the member itself"
        if not same_class(type(theirs), type(mod)):
            their_name, my_name = _class_names(type(theirs), type(mod))
            problems.append(
                (f"member {index} has a {their_name} at {where}, member 0 a {my_name}", path)
            )
            continue
        mine, their_repr = reference.reprs[path], other.reprs[path]
        if mine != their_repr:
            if _same_reprs_but_values(mod, theirs, deep=False):
                continue  # only their tensors' values differ (an observer's scale)
            problems.append(
                (
                    f"member {index} has {type(mod).__name__}({their_repr}) at {where}, "
                    f"member 0 has {type(mod).__name__}({mine})",
                    path,
                )
            )
    return problems


@contextlib.contextmanager
def _tensors_of(module: nn.Module, source: nn.Module, *, deep: bool) -> Iterator[None]:
    """Give ``module`` (with its submodules if ``deep``) the parameters and buffers of
    ``source`` at the same paths (where the names are the same), for a repr that prints
    tensor values.

    torch.ao's ``FakeQuantize`` prints its ``scale`` and ``zero_point``: members calibrated
    on their data differ there, and were refused as "not the same architecture", with a fix
    that could not help, before 2026-12-07 (seventh session). Members' values differ by
    design.
    """
    sources = dict(source.named_modules(remove_duplicate=False))
    saved: list[tuple[Any, dict[str, Any]]] = []
    try:
        for path, mod in module.named_modules(remove_duplicate=False) if deep else [("", module)]:
            if path not in sources:
                continue
            for table, theirs in zip(tensor_tables(mod), tensor_tables(sources[path]), strict=True):
                if table and table.keys() == theirs.keys():
                    saved.append((table, dict(table)))
                    table.update(theirs)  # type: ignore[attr-defined]
        yield
    finally:
        for table, old in reversed(saved):
            table.clear()
            table.update(old)


def _same_reprs_but_values(mine: nn.Module, theirs: nn.Module, *, deep: bool) -> bool:
    """Whether ``mine`` and ``theirs`` show the same repr (``deep``) or ``extra_repr`` once
    ``theirs`` holds ``mine``'s tensors: only their values differed. Where ``mine`` is a
    template on meta (``from_factory``), the other way round. A repr that raises shows
    nothing to compare: not the same."""
    show = _repr if deep else _extra_repr
    on_meta = any(t.is_meta for t in [*mine.parameters(), *mine.buffers()])
    if on_meta:
        # the template of from_factory: it takes the member's tensors instead (zeros in
        # both hid a setting printed through a value, found by the fourth look)
        b = show(theirs)
        with _tensors_of(mine, theirs, deep=deep):
            a = show(mine)
    else:
        a = show(mine)
        with _tensors_of(theirs, mine, deep=deep):
            b = show(theirs)
    return a == b and "<repr raised" not in a and "<extra_repr raised" not in a


def _repr(mod: nn.Module) -> str:
    try:
        return repr(mod)
    except Exception as e:  # user code
        return f"<repr raised {type(e).__name__}>"


def _extra_repr(mod: nn.Module) -> str:
    try:
        return mod.extra_repr()
    except Exception as e:  # user code; the whole repr is compared below as well
        return f"<extra_repr raised {type(e).__name__}>"


def _class_names(a: type, b: type) -> tuple[str, str]:
    """How to name two classes apart: their names, or, for one name, what differs."""
    if a.__qualname__ != b.__qualname__:
        return a.__qualname__, b.__qualname__
    if a.__module__ != b.__module__:
        return f"{a.__module__}.{a.__qualname__}", f"{b.__module__}.{b.__qualname__}"
    return (
        f"{a.__qualname__} (defined anew, with other code or values)",
        f"{b.__qualname__} (another definition)",
    )


def same_class(a: type, b: type, depth: int = 0) -> bool:
    """Whether classes ``a`` and ``b`` compute the same: one class, or one definition.

    torch's parametrizations and factories define a class per instance
    (``ParametrizedLinear``, a ``Block`` made inside a function); two such
    classes are the same when their names, methods (code, and the plain
    values the methods close over) and bases are.
    """
    if a is b:
        return True
    if depth > 4 or (a.__module__, a.__qualname__) != (b.__module__, b.__qualname__):
        return False
    if len(a.__bases__) != len(b.__bases__):
        return False
    if not all(same_class(x, y, depth + 1) for x, y in zip(a.__bases__, b.__bases__, strict=True)):
        return False
    return _same_key(_class_body(a), _class_body(b))


def _in_class(cls: type) -> _Member:
    """What a method of ``cls`` may refer to as "the member": an instance of ``cls`` or of
    one of its module bases (``nn.Module`` itself excepted)."""
    own = tuple(
        c
        for c in cls.__mro__
        if isinstance(c, type) and issubclass(c, nn.Module) and c is not nn.Module
    )
    return _Member(None, every_module=True, own_types=own)


def _class_body(cls: type) -> list[tuple[str, Any]]:
    member = _in_class(cls)
    body = []
    for name, value in sorted(vars(cls).items()):
        if name in ("__dict__", "__weakref__", "__doc__", "__module__", "__qualname__"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            value = (value.fget, value.fset)
        if isinstance(value, tuple):
            body.append((name, tuple(callable_key(v, member) if callable(v) else v for v in value)))
        elif callable(value):
            body.append((name, _class_callable_key(value, cls, member)))
        elif plain_value(value) and not (name.startswith("__") and name.endswith("__")):
            # (copyreg caches __slotnames__ on a class once an instance is copied)
            body.append((name, value))
    return body


def _class_callable_key(value: Any, cls: type, member: _Member) -> Any:
    """:func:`callable_key` of a class attribute; a callable object's references to the class
    itself compare alike: torch.fx gives each GraphModule a class of its own, whose
    ``_wrapped_call`` holds that class (two copies of one traced module were refused as
    "defined anew, with other code or values" before the eighth session)."""
    if isinstance(value, types.FunctionType):
        # torch.fx gives each GraphModule's forward a globals table of its own, binding
        # the names its code calls (a wrapped function per graph): same code, other
        # functions (a second look found x * 2 and x * 3 accepted, 1.36 off a loop)
        return (callable_key(value, member), _globals_key(value, member))
    if (
        isinstance(value, (types.MethodType, functools.partial, type))
        or not hasattr(value, "__dict__")
        or not any(v is cls for v in vars(value).values())
    ):
        return callable_key(value, member)
    state = {k: (("the class itself",) if v is cls else v) for k, v in vars(value).items()}
    return ("callable", type(value), _setting(state, member, 1))


def _globals_key(fn: types.FunctionType, member: _Member) -> tuple[Any, ...]:
    """The globals ``fn``'s code names and calls: modules, classes and builtins by
    identity, any other callable by :func:`callable_key` (a closure made per graph by what
    it closes over, a bound method by its instance, a callable object by its state: a
    third look found the latter two accepted, 0.91 off a loop). Values that are not
    callable are left out: a module's mutable state (parametrize's ``_cache``, a new dict
    at each ``cached()`` region's end) is no part of a definition."""
    table = fn.__globals__
    key: list[tuple[Any, ...]] = []
    for name in fn.__code__.co_names:
        value = table.get(name, _EMPTY)
        if isinstance(value, (type, types.ModuleType, types.BuiltinFunctionType)):
            key.append((name, id(value)))
        elif isinstance(value, types.MethodType):
            # by its instance's state, not its type alone (as callable_key compares a
            # hook's configuration object)
            state = _setting(_object_state(value.__self__), member, 1)
            key.append((name, callable_key(value.__func__, member, 1), state))
        elif isinstance(value, (types.FunctionType, functools.partial, nn.Module)):
            key.append((name, callable_key(value, member, 1)))
        elif value is not _EMPTY and callable(value):
            # an object's state, its slots' too (a fourth look: one with __slots__ read
            # as stateless, 0.89 off a loop)
            state = _setting(_object_state(value), member, 1)
            key.append((name, type(value), state))
    return tuple(key)


def _object_state(obj: Any) -> dict[str, Any]:
    """``obj``'s attributes: its ``__dict__`` and the slots its classes declare."""
    state = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
    for klass in type(obj).__mro__:
        slots = vars(klass).get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                state.setdefault(slot, getattr(obj, slot))
    return state


def _compare_hooks(reference: Profile, other: Profile, index: int) -> list[tuple[str, str]]:
    """The submodules whose module hooks differ from member 0's (the template runs those)."""
    problems = []
    for path, mine_tables in reference.hooks.items():
        their_tables = other.hooks.get(path)
        theirs = other.modules.get(path)
        if their_tables is None or theirs is None:
            continue
        mod = reference.modules[path]
        for table, mine in mine_tables.items():
            if not _same_key(mine, their_tables[table]):
                where = f"on {path!r}" if path else "on the member itself"
                names, ref_names = _hook_names(theirs, table), _hook_names(mod, table)
                how = " (the same functions, closing over or defaulting to other values)"
                problems.append(
                    (
                        f"member {index} has {table} {names} {where}, member 0 has {ref_names}"
                        f"{how if names == ref_names else ''}: the ensemble runs member 0's for "
                        "every member",
                        path,
                    )
                )
    return problems


def _hook_names(mod: nn.Module, table: str) -> list[str]:
    if table in _OWN_HOOKS:
        own = vars(mod).get(_OWN_HOOKS[table][0])
        return [] if own is None else [_callable_name(own)]
    hooks = module_hooks(mod)[table]
    return [_callable_name(h) for h in hooks.values()]


def _differs(a: Any, b: Any) -> bool:
    """Whether settings ``a`` and ``b`` differ: by ``==``, NaN equal to NaN in plain values."""
    if plain_value(a) and plain_value(b):
        return differs(a, b)
    return not _same_key(a, b)


class _Absent:
    def __repr__(self) -> str:
        return "(nothing)"


_ABSENT = _Absent()


class _Member:
    """What a setting is compared against: the member's own tensors and modules, by path.

    A setting that refers back to the member (an LSTM's ``_flat_weights``, a
    hook closing over ``self``) is compared by where it points, not by value.
    """

    def __init__(
        self,
        member: nn.Module | None,
        *,
        every_module: bool = False,
        own_types: tuple[type, ...] = (),
    ) -> None:
        # every_module: a class's own methods refer to the instance they were
        # made for (torch's parametrized classes): any module is "the member";
        # with own_types, only a module of those classes (the class compared and
        # its module bases): another one a method closes over (an activation a
        # factory's class or a traced graph's function holds) is compared by its
        # settings, as a fourth look found Softplus(beta=1) and (beta=5) accepted.
        self.every_module = every_module
        self.own_types = own_types
        self.tensors: dict[int, str] = {}
        self.modules: dict[int, str] = {}
        if member is not None:
            named: list[tuple[str, torch.Tensor]] = [
                *member.named_parameters(remove_duplicate=False),
                *member.named_buffers(remove_duplicate=False),
            ]
            for n, t in named:
                self.tensors.setdefault(id(t), n)
            for n, m in member.named_modules(remove_duplicate=False):
                self.modules.setdefault(id(m), n)


_NOWHERE = _Member(None)
_IN_A_CLASS = _Member(None, every_module=True)
_DEPTH = 4


def settings(module: nn.Module, depth: int = 0, *, member: _Member | None = None) -> dict[str, Any]:
    """Every setting of every submodule, by dotted name, in a form compared with ``==``.

    The attributes ``forward`` reads (a scale, an epsilon, a flag, a numpy
    value, a slice, a tensor kept as a plain attribute, a function, a module
    kept in a list, and containers of them), its ``training`` mode and its
    non-persistent buffers (module hooks are compared apart, in
    :func:`compare`). Objects other than those (a config, an
    ``argparse.Namespace``) are not compared: they hold per-run fields
    ``forward`` never reads (a seed, a path); nor is torch's and Lightning's
    own bookkeeping (``torch.compile``'s wrapper included: the module it
    wraps is compared). The member's own parameters, buffers and modules,
    held again elsewhere (``nn.LSTM._flat_weights``), are compared by name.
    """
    member = member or _Member(module)
    out: dict[str, Any] = {}
    for path, mod in module.named_modules(remove_duplicate=False):
        if dynamo_wrapper(mod):
            continue
        dot = f"{path}." if path else ""
        lightning = _is_lightning(mod)
        for key, value in vars(mod).items():
            private = key.startswith("_") and key != "_non_persistent_buffers_set"
            if private and (key in MODULE_INTERNALS or key.startswith(_OWN_PREFIX) or lightning):
                continue
            setting = _setting(value, member, depth)
            if setting is not _UNCOMPARED:
                out[dot + key] = setting
    return out


def _is_lightning(mod: nn.Module) -> bool:
    return any(c.__module__.split(".")[0] in _LIGHTNING_ROOTS for c in type(mod).__mro__)


_UNCOMPARED = object()


def _setting(value: Any, member: _Member, depth: int = 0) -> Any:
    """``value`` in a form ``==`` compares as the template would use it, or ``_UNCOMPARED``."""
    if plain_value(value):
        return as_now(value)
    if isinstance(value, (slice, range)):
        return (type(value).__name__, value.start, value.stop, value.step)
    if isinstance(value, torch.Tensor):
        name = member.tensors.get(id(value))
        return _Own(name) if name is not None else TensorSetting(value)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return _Numpy(value)
    if isinstance(value, torch.Generator):
        return GeneratorSetting(value)
    if depth >= _DEPTH:
        return _Object(value)
    if isinstance(value, (list, tuple)):
        items = [_setting(v, member, depth + 1) for v in value]
        kept = [_Object(v) if s is _UNCOMPARED else s for v, s in zip(value, items, strict=True)]
        return (type(value).__name__, kept)
    if isinstance(value, dict):
        pairs = []
        for k, v in value.items():
            key, item = _setting(k, member, depth + 1), _setting(v, member, depth + 1)
            pairs.append(
                (
                    _Object(k) if key is _UNCOMPARED else key,
                    _Object(v) if item is _UNCOMPARED else item,
                )
            )
        return ("dict", pairs)
    if isinstance(value, nn.Module):
        path = member.modules.get(id(value))
        return _Own(path) if path is not None else _ModuleSetting(value, depth + 1)
    if callable(value):
        return _Callable(value, member, depth)
    return _UNCOMPARED


def callable_key(fn: Any, member: _Member = _NOWHERE, depth: int = 0) -> Any:
    """What decides what ``fn`` computes, compared with ``==``.

    A Python function by its code, defaults and the values it closes over
    (two lambdas written once but made per member are the same; one closing
    over another scale, tensor or module is not); a bound method by its
    function and its instance (the member's own modules by path); a
    ``functools.partial`` by its function and arguments; a class or a
    builtin by identity; any other callable object by its type and state.
    """
    if depth > _DEPTH:
        return ("callable", type(fn))
    if isinstance(fn, types.MethodType):
        return (
            "method",
            callable_key(fn.__func__, member, depth + 1),
            _loose(fn.__self__, member, depth + 1),
        )
    if isinstance(fn, types.FunctionType):
        # A method's __class__ cell (zero-argument super()) is its own class.
        cells = tuple(
            ("__class__",) if name == "__class__" else _cell(c, member, depth)
            for name, c in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False)
        )
        defaults = tuple(_loose(v, member, depth + 1) for v in fn.__defaults__ or ())
        kwdefaults = tuple(
            sorted((k, _loose(v, member, depth + 1)) for k, v in (fn.__kwdefaults__ or {}).items())
        )
        return ("function", fn.__code__, defaults, kwdefaults, cells)
    if isinstance(fn, functools.partial):
        return (
            "partial",
            callable_key(fn.func, member, depth + 1),
            tuple(_loose(a, member, depth + 1) for a in fn.args),
            tuple(sorted((k, _loose(v, member, depth + 1)) for k, v in fn.keywords.items())),
        )
    if isinstance(fn, (type, types.BuiltinFunctionType, types.BuiltinMethodType)):
        return ("object", id(fn), getattr(fn, "__qualname__", repr(fn)))
    state = vars(fn) if hasattr(fn, "__dict__") else {}
    return ("callable", type(fn), _setting(dict(state), member, depth + 1))


_EMPTY = object()


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (a name assigned after the closure was made)
        return _EMPTY


def _cell(cell: Any, member: _Member, depth: int) -> Any:
    contents = _cell_contents(cell)
    return ("empty",) if contents is _EMPTY else _loose(contents, member, depth + 1)


def _loose(value: Any, member: _Member, depth: int) -> Any:
    """A value a function closes over or defaults to, or a method's instance.

    As :func:`_setting`, except that objects of other kinds (a config) are
    compared by type only.
    """
    own = member.every_module and (not member.own_types or isinstance(value, member.own_types))
    if isinstance(value, nn.Module) and (own or id(value) in member.modules):
        return _Own(member.modules.get(id(value), type(value).__qualname__))
    if callable(value) and not isinstance(value, nn.Module):
        return callable_key(value, member, depth)
    setting = _setting(value, member, depth)
    return ("object", type(value)) if setting is _UNCOMPARED else setting


def _hook_tables(mod: nn.Module, member: _Member = _NOWHERE) -> dict[str, Any]:
    """The module's own forward and backward hooks, in order, each as its :func:`callable_key`."""
    with_kwargs, pre_kwargs, always = forward_hook_flags(mod)
    hooks = module_hooks(mod)
    tables: dict[str, Any] = {
        "forward hooks": [
            (callable_key(h, member), i in with_kwargs, i in always)
            for i, h in hooks["forward hooks"].items()
        ],
        "forward pre-hooks": [
            (callable_key(h, member), i in pre_kwargs)
            for i, h in hooks["forward pre-hooks"].items()
        ],
        "backward hooks": [callable_key(h, member) for h in hooks["backward hooks"].values()],
        "backward pre-hooks": [
            callable_key(h, member) for h in hooks["backward pre-hooks"].values()
        ],
    }
    # A forward set on the instance and accelerate's hook object, which that forward
    # (add_hook_to_module's) reads: the template runs member 0's for every member.
    own = vars(mod)
    for table, (attr, key) in _OWN_HOOKS.items():
        value = own.get(attr)
        tables[table] = [] if value is None else [key(value, member)]
    return tables


# What accelerate's hooks keep per module that is not what they compute: AlignDevicesHook
# keys tied weights by their data_ptr(), which every member has its own of.
_ACCELERATE_BOOKKEEPING = frozenset({"tied_params_map", "tied_pointers_to_remove"})


def _accelerate_key(hook: Any, member: _Member, depth: int = 0) -> Any:
    """:func:`callable_key` of an accelerate hook object (a ``SequentialHook``'s hooks one
    by one), leaving out its per-module bookkeeping (``_ACCELERATE_BOOKKEEPING``)."""
    inner = getattr(hook, "hooks", None)
    if isinstance(inner, (list, tuple)) and depth < _DEPTH:
        return ("hooks", type(hook), tuple(_accelerate_key(h, member, depth + 1) for h in inner))
    state = vars(hook) if hasattr(hook, "__dict__") else {}
    kept = {k: v for k, v in state.items() if k not in _ACCELERATE_BOOKKEEPING}
    return ("callable", type(hook), _setting(kept, member, depth + 1))


# Hooks kept in a module's own attributes, by the name a message gives them: the attribute
# and how it is compared.
_OWN_HOOKS: dict[str, tuple[str, Callable[[Any, _Member], Any]]] = {
    "a forward set on the instance": ("forward", callable_key),
    "an accelerate hook": (ACCELERATE_HOOK, _accelerate_key),
}


class TensorSetting:
    """A tensor attribute compared by value (shape, dtype and every element, NaN equal to NaN)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorSetting):
            return NotImplemented
        a, b = self.tensor, other.tensor
        if (a.shape, a.dtype, a.is_meta) != (b.shape, b.dtype, b.is_meta):
            return False
        return a.is_meta or bool(torch.equal(a, b) or (a.isnan() & b.isnan() | (a == b)).all())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self.tensor)


class GeneratorSetting:
    """A ``torch.Generator`` a module draws from, compared by device and state (its seed and
    how far it has drawn): the template runs every member with member 0's."""

    def __init__(self, generator: torch.Generator) -> None:
        self.device = generator.device
        self.seed = generator.initial_seed()
        self.state = generator.get_state()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeneratorSetting):
            return NotImplemented
        return self.device == other.device and bool(torch.equal(self.state, other.state))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"torch.Generator(device={str(self.device)!r}, initial_seed={self.seed})"


class _Own:
    """One of the member's own parameters or buffers, held again elsewhere: compared by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Own) and other.name == self.name

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<its {self.name!r}>"


class _Numpy:
    """A numpy scalar or array, compared by dtype, shape and values."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.key = (str(getattr(value, "dtype", "")), getattr(value, "shape", ()), value.tolist())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Numpy) and not differs(self.key, other.key)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self.value)


class _Callable:
    """A function (or other callable) setting, compared by :func:`callable_key`."""

    def __init__(self, fn: Any, member: _Member = _NOWHERE, depth: int = 0) -> None:
        self.key = callable_key(fn, member, depth)
        self.name = _callable_name(fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Callable) and _same_key(self.key, other.key)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return self.name


def _callable_name(fn: Any) -> str:
    """``torch.tanh``, ``module.Class.method``, ``f.<locals>.<lambda>``: what a message shows."""
    if isinstance(fn, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        module = getattr(fn, "__module__", None)
        return f"{module}.{fn.__name__}" if module else fn.__name__
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def _same_key(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a tensor comparison of another shape, or one that raises
        return False


class _ModuleSetting:
    """A module held outside the member's tree (in a list, a closure): compared by class,
    settings and the values of its parameters and buffers."""

    def __init__(self, mod: nn.Module, depth: int) -> None:
        self.type = type(mod)
        self.state = [
            (n, TensorSetting(t)) for n, t in [*mod.named_parameters(), *mod.named_buffers()]
        ]
        self.settings = settings(mod, depth) if depth < _DEPTH else {}

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _ModuleSetting)
            and same_class(self.type, other.type)
            and _same_key(self.state, other.state)
            and _same_key(self.settings, other.settings)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<a {self.type.__qualname__} with its own values>"


class _Object:
    """An object inside a container setting: compared by type only (see :func:`settings`)."""

    def __init__(self, value: Any) -> None:
        self.type = type(value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Object) and other.type is self.type

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<a {self.type.__qualname__}>"


def held_outside(member: nn.Module) -> list[str]:
    """Dotted places of tensors that require grad held outside ``member``'s parameters (sorted).

    Plain attributes and containers (lists, tuples, dicts) are searched, and
    what functions there and the module hooks reach: the values they close
    over or default to, a ``functools.partial``'s arguments, a bound
    method's instance, a callable object's attributes, and modules held in
    any of those (their parameters are not the member's). The member's own
    parameters held again (``nn.LSTM._flat_weights``) are not listed.
    """
    own = {id(t) for t in member.parameters(recurse=True)}
    inside = {id(m) for m in member.modules()}
    found: list[str] = []
    seen: set[int] = set()

    def visit(value: Any, where: str, depth: int) -> None:
        if depth > _DEPTH or id(value) in seen or plain_value(value):
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if value.requires_grad and id(value) not in own:
                found.append(where)
        elif isinstance(value, nn.Module):
            if id(value) in inside:
                return
            for name, p in value.named_parameters():
                if p.requires_grad and id(p) not in own:
                    found.append(f"{where}.{name}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(v, f"{where}[{i}]", depth + 1)
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{where}[{k!r}]", depth + 1)
        elif isinstance(value, types.FunctionType):
            for name, cell in zip(
                value.__code__.co_freevars, value.__closure__ or (), strict=False
            ):
                contents = _cell_contents(cell)
                if contents is not _EMPTY:
                    visit(contents, f"{where} (closing over {name!r})", depth + 1)
            for i, v in enumerate(value.__defaults__ or ()):
                visit(v, f"{where} (default {i})", depth + 1)
        elif isinstance(value, functools.partial):
            visit(value.func, where, depth + 1)
            for i, v in enumerate((*value.args, *value.keywords.values())):
                visit(v, f"{where} (argument {i})", depth + 1)
        elif isinstance(value, types.MethodType):
            visit(value.__func__, where, depth + 1)
            visit(value.__self__, f"{where} (its instance)", depth + 1)
        elif callable(value) and hasattr(value, "__dict__") and not isinstance(value, type):
            for k, v in vars(value).items():
                visit(v, f"{where}.{k}", depth + 1)

    for path, mod in member.named_modules():
        dot = f"{path}." if path else ""
        for key, value in vars(mod).items():
            if key in MODULE_INTERNALS:
                continue
            visit(value, dot + key, 0)
        for table, hooks in module_hooks(mod).items():
            for hook in hooks.values():
                visit(hook, f"{dot}<{table} {_callable_name(hook)}>", 0)
    return sorted(found)


class SharedTensors:
    """Parameters, and modules holding buffers, seen in earlier members, to refuse sharing.

    A parameter two members hold is trained once by a loop over them, but
    the ensemble stacks a copy per member (a frozen one is fine); a shared module's buffers
    (BatchNorm's running statistics) are updated by every member in turn in
    a loop, and per member here. A buffer tensor registered in two members'
    own modules is copied per member like any buffer (a constant mask taken
    from one cache is common). Stateless modules (one activation object in
    every member) are fine.

    Weak references: a member built by a factory and dropped after it was
    stored frees its tensors, and a new object at the same ``id`` is not the
    same object.
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Callable[[], Any], int]] = {}
        # Frozen parameters and buffers one tensor object in several members
        # (allowed: see above): their names, for Ensemble.apply.
        self._tensors: dict[int, tuple[Callable[[], Any], int]] = {}
        self.aliased: set[str] = set()

    def add(self, index: int, member: nn.Module) -> list[tuple[str, int]]:
        """Note member ``index``'s parameters and buffer-holding modules; return
        ``(name, earlier member)`` of the shared ones."""
        shared: list[tuple[str, int]] = []
        # A frozen parameter is not trained: a copy per member computes the same.
        named: list[tuple[str, Any]] = [
            (n, p) for n, p in member.named_parameters(remove_duplicate=False) if p.requires_grad
        ]
        named += [
            (path, mod)
            for path, mod in member.named_modules(remove_duplicate=False)
            if any(b is not None for b in buffers_of(mod).values())
        ]
        named += _generators(member)
        self._note_aliased(index, member)
        for name, obj in named:
            entry = self._seen.get(id(obj))
            if entry is not None and entry[0]() is obj and entry[1] != index:
                shared.append((name or "(the member itself)", entry[1]))
            elif entry is None or entry[0]() is not obj:
                self._seen[id(obj)] = (_reference(obj), index)
        return shared

    def _note_aliased(self, index: int, member: nn.Module) -> None:
        kept = [
            *(
                (n, p)
                for n, p in member.named_parameters(remove_duplicate=False)
                if not p.requires_grad
            ),
            *member.named_buffers(remove_duplicate=False),
        ]
        for name, tensor in kept:
            entry = self._tensors.get(id(tensor))
            if entry is not None and entry[0]() is tensor and entry[1] != index:
                self.aliased.add(name)
            elif entry is None or entry[0]() is not tensor:
                self._tensors[id(tensor)] = (_reference(tensor), index)


def _reference(obj: Any) -> Callable[[], Any]:
    """A weak reference to ``obj``; a strong one where torch allows no weak one (a
    ``torch.Generator`` before torch 2.7), held only while the members are compared."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _generators(member: nn.Module) -> list[tuple[str, Any]]:
    """The ``torch.Generator`` objects ``member``'s modules hold in plain attributes, or as
    items of a list, tuple or dict there, with their dotted paths."""
    found: list[tuple[str, Any]] = []
    for path, mod in member.named_modules(remove_duplicate=False):
        dot = f"{path}." if path else ""
        for key, value in vars(mod).items():
            if key in MODULE_INTERNALS:
                continue
            if isinstance(value, torch.Generator):
                found.append((dot + key, value))
            elif isinstance(value, (list, tuple, dict)):
                pairs = value.items() if isinstance(value, dict) else enumerate(value)
                found += [
                    (f"{dot}{key}[{k!r}]", v) for k, v in pairs if isinstance(v, torch.Generator)
                ]
    return found
