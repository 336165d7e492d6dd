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

import functools
import types
import weakref
from typing import Any

import torch
from torch import nn

from lightning_meta._ensemble._loop import differs, plain_value
from lightning_meta._slots import tie_groups

__all__ = ["SharedTensors", "compare", "held_outside", "hook_reparametrised", "settings"]

# nn.Module's own bookkeeping, and what torch.compile and this package add.
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_compiled_call_impl"}
_OWN_PREFIX = "_lightning_meta"
# Lightning's modules keep run state in private attributes (the trainer,
# hyperparameters, the current hook's name): not settings of the function.
_LIGHTNING_ROOTS = ("lightning", "pytorch_lightning", "lightning_fabric")


def _signature(module: nn.Module) -> dict[str, tuple[str, tuple[int, ...], torch.dtype, bool]]:
    sig: dict[str, tuple[str, tuple[int, ...], torch.dtype, bool]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        kind = "parameter" if type(p) is nn.Parameter else f"parameter ({type(p).__qualname__})"
        sig[name] = (kind, tuple(p.shape), p.dtype, p.requires_grad)
    for name, b in module.named_buffers(remove_duplicate=False):
        sig[name] = ("buffer", tuple(b.shape), b.dtype, False)
    return sig


def _ties(module: nn.Module) -> list[tuple[str, ...]]:
    groups = [tuple(s.path for s in g) for g in tie_groups(module)]
    return sorted(g for g in groups if len(g) > 1)


def compare(reference: nn.Module, other: nn.Module, index: int) -> list[tuple[str, str]]:
    """Every way ``other`` (member ``index``) differs from member 0: (a line for an error,
    the dotted paths it concerns, comma-separated, ``""`` for the member as a whole)."""
    if type(other) is not type(reference):
        return [
            (
                f"member {index} is {type(other).__qualname__}, member 0 is "
                f"{type(reference).__qualname__}",
                "",
            )
        ]
    ref, sig = _signature(reference), _signature(other)
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
    ties, ref_ties = _ties(other), _ties(reference)
    if ties != ref_ties:
        tied = ", ".join(sorted({n for g in {*ties} ^ {*ref_ties} for n in g}))
        problems.append((f"member {index} ties {ties}, member 0 ties {ref_ties}", tied))
    if not problems:
        # Same tensors, other settings (a dropout rate, an activation's slope):
        # the template is member 0, so the difference would be lost silently.
        for mine, theirs in zip(
            repr(reference).splitlines(), repr(other).splitlines(), strict=False
        ):
            if mine != theirs:
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
        ref_settings, other_settings = settings(reference), settings(other)
        for key in sorted(ref_settings.keys() | other_settings.keys()):
            mine, theirs = ref_settings.get(key, _ABSENT), other_settings.get(key, _ABSENT)
            if _differs(mine, theirs):
                line = f"member {index} has {key} = {theirs!r}, member 0 has {mine!r}"
                if key.endswith("training"):
                    line += " (call .train() or .eval() alike on every member)"
                problems.append((line, key))
        problems += _compare_hooks(reference, other, index)
    return problems


def _compare_hooks(reference: nn.Module, other: nn.Module, index: int) -> list[tuple[str, str]]:
    """The submodules whose module hooks differ from member 0's (the template runs those)."""
    problems = []
    mods = dict(other.named_modules(remove_duplicate=False))
    for path, mod in reference.named_modules(remove_duplicate=False):
        theirs = mods.get(path)
        if theirs is None:
            continue
        mine_tables, their_tables = _hook_tables(mod), _hook_tables(theirs)
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
    hooks = {
        "forward hooks": mod._forward_hooks,
        "forward pre-hooks": mod._forward_pre_hooks,
        "backward hooks": mod._backward_hooks,
        "backward pre-hooks": mod._backward_pre_hooks,
    }[table]
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


def settings(module: nn.Module) -> dict[str, Any]:
    """Every setting of every submodule, by dotted name, in a form compared with ``==``.

    The attributes ``forward`` reads (a scale, an epsilon, a flag, a numpy
    value, a tensor kept as a plain attribute, a function, and containers of
    them), its ``training`` mode and its non-persistent buffers (module hooks
    are compared apart, in :func:`compare`). Objects other than those (a
    config, an ``argparse.Namespace``) are not compared: they hold per-run fields
    ``forward`` never reads (a seed, a path); nor is torch's and Lightning's
    own bookkeeping. The member's own parameters and buffers, held again in
    a list (``nn.LSTM._flat_weights``), are compared by name.
    """
    own = {id(t): n for n, t in module.named_parameters(remove_duplicate=False)}
    own.update({id(t): n for n, t in module.named_buffers(remove_duplicate=False)})
    out: dict[str, Any] = {}
    for path, mod in module.named_modules(remove_duplicate=False):
        dot = f"{path}." if path else ""
        lightning = _is_lightning(mod)
        for key, value in vars(mod).items():
            private = key.startswith("_") and key != "_non_persistent_buffers_set"
            if private and (key in _MODULE_INTERNALS or key.startswith(_OWN_PREFIX) or lightning):
                continue
            setting = _setting(value, own)
            if setting is not _UNCOMPARED:
                out[dot + key] = setting
    return out


def _is_lightning(mod: nn.Module) -> bool:
    return any(c.__module__.split(".")[0] in _LIGHTNING_ROOTS for c in type(mod).__mro__)


_UNCOMPARED = object()


def _setting(value: Any, own: dict[int, str], depth: int = 0) -> Any:
    """``value`` in a form ``==`` compares as the template would use it, or ``_UNCOMPARED``."""
    if plain_value(value):
        return value
    if isinstance(value, torch.Tensor):
        name = own.get(id(value))
        return _Own(name) if name is not None else TensorSetting(value)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return _Numpy(value)
    if isinstance(value, (list, tuple)) and depth < 4:
        items = [_setting(v, own, depth + 1) for v in value]
        kept = [_Object(v) if s is _UNCOMPARED else s for v, s in zip(value, items, strict=True)]
        return (type(value).__name__, kept)
    if isinstance(value, dict) and depth < 4 and all(plain_value(k) for k in value):
        return {
            k: _Object(v) if (s := _setting(v, own, depth + 1)) is _UNCOMPARED else s
            for k, v in value.items()
        }
    if callable(value) and not isinstance(value, nn.Module):
        return _Callable(value)
    return _UNCOMPARED


def callable_key(fn: Any, depth: int = 0) -> Any:
    """What decides what ``fn`` computes, compared with ``==``.

    A Python function by its code, defaults and the plain values it closes
    over (two lambdas written once but made per member are the same; one
    closing over another scale is not); a bound method by its function (the
    instance is the member itself); a ``functools.partial`` by its function
    and arguments; a class by identity; any other callable object by its type.
    """
    if depth > 3:
        return ("callable", type(fn))
    if isinstance(fn, types.MethodType):
        return ("method", callable_key(fn.__func__, depth + 1))
    if isinstance(fn, types.FunctionType):
        cells = tuple(_cell(c) for c in fn.__closure__ or ())
        defaults = tuple(_loose(v) for v in fn.__defaults__ or ())
        kwdefaults = tuple(sorted((k, _loose(v)) for k, v in (fn.__kwdefaults__ or {}).items()))
        return ("function", fn.__code__, defaults, kwdefaults, cells)
    if isinstance(fn, functools.partial):
        return (
            "partial",
            callable_key(fn.func, depth + 1),
            tuple(_loose(a) for a in fn.args),
            tuple(sorted((k, _loose(v)) for k, v in fn.keywords.items())),
        )
    if isinstance(fn, (type, types.BuiltinFunctionType, types.BuiltinMethodType)):
        return ("object", id(fn), getattr(fn, "__qualname__", repr(fn)))
    return ("callable", type(fn))


def _cell(cell: Any) -> Any:
    try:
        return _loose(cell.cell_contents)
    except ValueError:  # an empty cell (a name assigned after the closure was made)
        return ("empty",)


def _loose(value: Any) -> Any:
    """A value a function closes over or defaults to: plain ones by value, others by kind."""
    if plain_value(value):
        return value
    if isinstance(value, torch.Tensor):
        return (
            TensorSetting(value)
            if not value.requires_grad and value.numel() <= 64
            else ("tensor", tuple(value.shape))
        )
    if isinstance(value, (types.FunctionType, functools.partial, types.MethodType)):
        return ("function", getattr(value, "__qualname__", type(value).__qualname__))
    return ("object", type(value))


def _hook_tables(mod: nn.Module) -> dict[str, Any]:
    """The module's own forward and backward hooks, in order, each as its :func:`callable_key`."""
    with_kwargs = set(getattr(mod, "_forward_hooks_with_kwargs", {}))
    pre_kwargs = set(getattr(mod, "_forward_pre_hooks_with_kwargs", {}))
    always = set(getattr(mod, "_forward_hooks_always_called", {}))
    tables: dict[str, Any] = {
        "forward hooks": [
            (callable_key(h), i in with_kwargs, i in always) for i, h in mod._forward_hooks.items()
        ],
        "forward pre-hooks": [
            (callable_key(h), i in pre_kwargs) for i, h in mod._forward_pre_hooks.items()
        ],
        "backward hooks": [callable_key(h) for h in mod._backward_hooks.values()],
        "backward pre-hooks": [callable_key(h) for h in mod._backward_pre_hooks.values()],
    }
    return tables


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

    def __init__(self, fn: Any) -> None:
        self.key = callable_key(fn)
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


class _Object:
    """An object inside a container setting: compared by type only (see :func:`settings`)."""

    def __init__(self, value: Any) -> None:
        self.type = type(value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Object) and other.type is self.type

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<a {self.type.__qualname__}>"


def hook_reparametrised(member: nn.Module) -> list[str]:
    """Paths of tensors ``torch.nn.utils.spectral_norm``, ``weight_norm`` or ``prune`` made.

    Each is a tensor attribute a forward pre-hook recomputes from other
    parameters and buffers, with autograd history, which a copy of the
    template cannot take (``copy.deepcopy`` refuses it).
    """
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found = []
    for path, mod in member.named_modules():
        for hook in mod._forward_pre_hooks.values():
            if isinstance(hook, (SpectralNorm, WeightNorm)):
                name = hook.name
            elif isinstance(hook, BasePruningMethod):
                name = hook._tensor_name
            else:
                continue
            found.append(f"{path}.{name}" if path else name)
    return sorted(found)


def held_outside(member: nn.Module) -> list[str]:
    """Dotted places of tensors that require grad in ``member``'s plain attributes (sorted).

    Containers (lists, tuples, dicts) are searched, and modules held in them
    (their parameters are not the member's). The member's own parameters
    held again (``nn.LSTM._flat_weights``) are not listed.
    """
    own = {id(t) for t in member.parameters(recurse=True)}
    found: list[str] = []

    def visit(value: Any, where: str, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            if value.requires_grad and id(value) not in own:
                found.append(where)
        elif isinstance(value, nn.Module):
            for name, p in value.named_parameters():
                if p.requires_grad and id(p) not in own:
                    found.append(f"{where}.{name}")
        elif depth < 4 and isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(v, f"{where}[{i}]", depth + 1)
        elif depth < 4 and isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{where}[{k!r}]", depth + 1)

    for path, mod in member.named_modules():
        dot = f"{path}." if path else ""
        for key, value in vars(mod).items():
            if key in _MODULE_INTERNALS:
                continue
            visit(value, dot + key, 0)
    return sorted(found)


class SharedTensors:
    """Parameters, and modules holding buffers, seen in earlier members, to refuse sharing.

    A parameter two members hold is trained once by a loop over them, but
    the ensemble stacks a copy per member; a shared module's buffers
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
        self._seen: dict[int, tuple[weakref.ref[Any], int]] = {}

    def add(self, index: int, member: nn.Module) -> list[tuple[str, int]]:
        """Note member ``index``'s parameters and buffer-holding modules; return
        ``(name, earlier member)`` of the shared ones."""
        shared: list[tuple[str, int]] = []
        named: list[tuple[str, Any]] = list(member.named_parameters(remove_duplicate=False))
        named += [
            (path, mod)
            for path, mod in member.named_modules(remove_duplicate=False)
            if any(b is not None for b in mod._buffers.values())
        ]
        for name, obj in named:
            entry = self._seen.get(id(obj))
            if entry is not None and entry[0]() is obj and entry[1] != index:
                shared.append((name or "(the member itself)", entry[1]))
            elif entry is None or entry[0]() is not obj:
                self._seen[id(obj)] = (weakref.ref(obj), index)
        return shared
