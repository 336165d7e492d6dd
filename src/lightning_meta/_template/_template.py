"""Meta-device templates that Lightning cannot see.

A :class:`MetaTemplate` keeps a meta-device module *outside* the module tree:
it is not an ``nn.Module``, so ``children()``, ``parameters()``,
``state_dict()``, ``.to()``, DDP and FSDP never reach it, and calling it runs
:func:`torch.func.functional_call` with tensors the caller owns.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import functools
import inspect
import pickle
import threading
import types
import typing
import weakref
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, Generic, SupportsIndex, TypeVar, overload

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_meta._arguments import build_on_meta, describe
from lightning_meta._compat import (
    children_of,
    compiler_disabled,
    deepcopy_module,
    fresh_parametrizations,
    functional_call_restoring_in_reverse,
    functorch_transform_active,
    hook_registrations,
    hook_tables,
    is_checkpoint_wrapper,
    no_dispatch_modes,
    rebind_hook_closures,
    recomputing_hooks,
    register_pytree_node,
    tensor_tables,
    tree_leaves,
    unwrapped,
    without_dynamo_wrappers,
)
from lightning_meta._deferred._functions import value_in_block
from lightning_meta._deferred._handles import handle_of
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError, MetaTensorError
from lightning_meta._forward_state import (
    ACCELERATE_HOOK,
    MODULE_INTERNALS,
    AttributeState,
    owned_by,
    watched,
)
from lightning_meta._settings import differs, plain_number
from lightning_meta._slots import named_tensors, tie_groups
from lightning_meta._watched import FROM_REAL_ONLY, holds_values

__all__ = [
    "CHECKPOINTING_OFF",
    "STACKS_MEMBERS",
    "CheckpointingRefused",
    "MetaTemplate",
    "TemplateState",
    "ensembles_in",
    "meta_template",
]

Factory = Callable[[], nn.Module]
_T = TypeVar("_T")


def copy_module(
    module: nn.Module,
    make: Callable[[str, torch.Tensor], torch.Tensor],
    *,
    memo: dict[int, Any] | None = None,
) -> nn.Module:
    """Deep-copy ``module``, replacing every parameter and buffer by ``make(name, t)``.

    The originals are handed to :func:`copy.deepcopy` through its memo, so no
    real tensor is ever duplicated and tensors shared between submodules (tied
    weights) stay shared in the copy. ``memo`` may hold more objects to
    replace (or keep, mapped to themselves).
    """
    memo = {} if memo is None else memo
    for kind, named in (("param", module.named_parameters), ("buffer", module.named_buffers)):
        for name, tensor in named(remove_duplicate=True):
            new = make(name, tensor)
            if kind == "param" and not isinstance(new, nn.Parameter):
                new = nn.Parameter(new, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = new
    _keep_outside_owners(module, memo)
    # Hooks that are functions closing over the module would still read the
    # original (deepcopy copies a function as is); bound methods of its own
    # submodules move with them.
    return deepcopy_module(module, memo)


def _keep_outside_owners(module: nn.Module, memo: dict[int, Any]) -> None:
    """Keep the modules outside ``module`` that it refers to as they are (not copied).

    ``copy.deepcopy`` copies whatever a module refers to: a hook
    ``self.gate_hook`` of the LightningModule on ``self.net`` (or a
    ``functools.partial`` of it, or a callable object holding it), a
    ``forward`` set on the instance, or a plain reference to another module
    would copy the whole LightningModule, real weights included, and the
    template would then read a frozen copy of them. Like a closure over the
    owner (``rebind_hook_closures``), each keeps reading the live module.
    """
    for owner in outside_modules(module).values():
        memo[id(owner)] = owner


# Whether templates made now share their module's hook objects (a user's MetaTemplate) or
# copy them (an Ensemble's, whose members' hooks run on per-member copies: see
# hook_objects_copied).
_SHARE_HOOK_OBJECTS = contextvars.ContextVar("lightning_meta_share_hook_objects", default=True)


@contextlib.contextmanager
def hook_objects_copied() -> Iterator[None]:
    """Make the templates made in the body copy their module's hook objects, as
    ``copy.deepcopy`` does: an ``Ensemble``'s template, whose plans run the members' hooks
    on copies of them (what such a hook collects is not in the original, as documented),
    and under ``torch.vmap`` would hand the user's object batched tensors."""
    token = _SHARE_HOOK_OBJECTS.set(False)
    try:
        yield
    finally:
        _SHARE_HOOK_OBJECTS.reset(token)


def _keep_hook_objects(module: nn.Module, memo: dict[int, Any]) -> None:
    """Keep the hooks of ``module``'s submodules that reach none of its modules and tensors
    as they are: a bound method of a feature recorder, a callable gate, a
    ``functools.partial`` over a dict.

    ``copy.deepcopy`` copied them with the template, so a template call's features went
    to a hidden copy of the recorder (which kept them and their graphs, call after call),
    and a gate switched off on the original after the template was made still ran:
    0.81 off, before 2026-12-07 (third session). Kept, they run as for ``net(x)``, as a
    function hook does (deepcopy keeps functions as they are). One that reaches the
    module is copied with it, so it refers to the template's modules. So is accelerate's
    hook object (``module._hf_hook``, which the ``forward`` ``add_hook_to_module`` sets
    reads): a setting changed on ``net``'s hook reaches the template's call.
    """
    inside = {id(m) for m in module.modules()} | {id(t) for t in _tensors(module)}
    for sub in module.modules():
        hooks = [h for n, t in hook_tables(sub).items() if not _hook_flags(n) for h in t.values()]
        hooks += [h for h in (vars(sub).get(ACCELERATE_HOOK),) if h is not None]
        for hook in hooks:
            if isinstance(hook, types.FunctionType) or id(hook) in memo:
                continue
            if _reaches_none_of(hook, inside):
                memo[id(hook)] = hook


def _hook_flags(table: str) -> bool:
    """Whether ``table`` (a hook table's attribute name) holds flags, not hooks."""
    return table.endswith(("_with_kwargs", "_always_called"))


_CONTAINERS_WALKED = (dict, list, tuple, set, frozenset, collections.deque)
_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class defined in Python


def _followable(cls: type) -> bool:
    """Whether every attribute of an instance of ``cls`` is in its ``__dict__`` or slots: a
    class defined in Python over ``object`` or Python's containers, not over a C type that
    keeps references of its own (a numpy array of objects, a ``weakref.ref``)."""
    return all(
        c is object or c in _CONTAINERS_WALKED or bool(c.__flags__ & _HEAP_TYPE)
        for c in cls.__mro__
    )


def _reaches_none_of(hook: Any, inside: set[int], budget: int = 2000) -> bool:
    """Whether everything ``hook`` refers to could be followed and none of it is in ``inside``
    (the ids of the net's modules and tensors): through containers, the attributes and
    slots of objects of Python classes, a method's instance, a partial's arguments, and
    a function's closure, defaults and the globals its code reads, as deep as they go.

    Anything that cannot be followed (a numpy array of objects, a weak reference, an
    object of a C type), or more than ``budget`` objects, answers ``False``: the hook is
    then copied with the template, as before 2026-12-07 (third session), which refers to
    the template's modules; shared, one reaching the net through such a way read the
    net's weights instead of the call's (7.1 off, found by the review of this change).
    """
    stack, seen = [hook], set()
    while stack:
        obj = stack.pop()
        if id(obj) in inside:
            return False
        if isinstance(obj, _SCALARS) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if len(seen) > budget:
            return False
        if isinstance(obj, (torch.Tensor, type, types.ModuleType, types.BuiltinFunctionType)):
            continue  # not the net's (above); a class or module is code, not state
        if plain_number(obj):
            continue
        if isinstance(obj, types.FunctionType):
            stack += [_contents(c) for c in obj.__closure__ or ()]
            stack += [*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()]
            named = obj.__globals__
            stack += [named[n] for n in obj.__code__.co_names if n in named]
        elif isinstance(obj, types.MethodType):
            stack += [obj.__func__, obj.__self__]
        elif isinstance(obj, functools.partial):
            stack += [obj.func, *obj.args, *obj.keywords.values()]
        elif not _followable(type(obj)):
            return False
        else:
            if isinstance(obj, dict):
                stack += [*obj.keys(), *obj.values()]
            elif isinstance(obj, _CONTAINERS_WALKED):
                stack += list(obj)
            stack += list(getattr(obj, "__dict__", {}).values())
            stack += [getattr(obj, k) for k in _slot_names(type(obj)) if hasattr(obj, k)]
    return True


_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def outside_modules(module: nn.Module) -> dict[str, nn.Module]:
    """The modules outside ``module`` that its submodules refer to, by where they are found.

    Searched: every submodule's plain attributes (a ``forward`` set on the
    instance, hooks included), containers, a bound method's instance, a
    ``functools.partial``'s function and arguments, and the attributes of
    other objects (a callable object holding the owner). Functions are not
    searched: ``copy.deepcopy`` keeps a function (and so its closure) as is.
    """
    inside = {id(m) for m in module.modules()}
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for path, where, value in _reachable(module, seen):
        if isinstance(value, nn.Module) and id(value) not in inside:
            found.setdefault(where if not path else f"{path}.{where}", value)
    return found


def _reachable(module: nn.Module, seen: set[int]) -> Iterator[tuple[str, str, Any]]:
    """``(submodule path, place, value)`` for the values reachable from ``module``'s
    submodules (see :func:`outside_modules`); a module or a tensor is not searched further."""
    inside = {id(m) for m in module.modules()}
    for path, sub in module.named_modules():
        seen.add(id(sub))
        for key, value in vars(sub).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(value, nn.Module) and id(value) in inside:
                continue
            for where, found in _visit(value, key, 0, seen):
                yield path, where, found


def _visit(value: Any, where: str, depth: int, seen: set[int]) -> Iterator[tuple[str, Any]]:
    if depth > 6 or isinstance(value, _SCALARS) or id(value) in seen:
        return
    seen.add(id(value))
    yield where, value
    if isinstance(value, (nn.Module, torch.Tensor, type, types.ModuleType)):
        return
    if isinstance(value, types.MethodType):
        yield from _visit(value.__self__, f"{where} (its instance)", depth + 1, seen)
    elif isinstance(value, functools.partial):
        yield from _visit(value.func, where, depth + 1, seen)
        for i, v in enumerate((*value.args, *value.keywords.values())):
            yield from _visit(v, f"{where} (argument {i})", depth + 1, seen)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _visit(v, f"{where}[{k!r}]", depth + 1, seen)
    elif isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        for i, v in enumerate(value):
            yield from _visit(v, f"{where}[{i}]", depth + 1, seen)
    elif not isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict):
            for k, v in attributes.items():
                yield from _visit(v, f"{where}.{k}", depth + 1, seen)
        # And its slots (``__slots__``, a ``dataclass(slots=True)``): a hook object keeping
        # the module there looked as if it reached nothing, and was shared, not copied.
        for k in _slot_names(type(value)):
            held = getattr(value, k, _MISSING)
            if held is not _MISSING:
                yield from _visit(held, f"{where}.{k}", depth + 1, seen)


def _slot_names(cls: type) -> tuple[str, ...]:
    """The slot names ``cls`` and its bases declare (``__dict__`` and ``__weakref__`` aside)."""
    names: list[str] = []
    for klass in cls.__mro__:
        slots = vars(klass).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and name not in names:
                names.append(name)
    return tuple(names)


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (a variable assigned after the function)
        return None


def _offloaded_ties(module: nn.Module) -> list[str]:
    """Paths of the tied weights accelerate's hooks offload in ``module`` where the other
    end of the tie is not offloaded (an ``AlignDevicesHook`` with ``offload`` and
    ``tied_params_names``, also inside a ``SequentialHook``, on a module sharing that
    weight with one kept on a device): a review of 2026-12-07 measured a template of a
    GPT-2 dispatched with its tied head on disk and its embedding on the CPU 0.5 to 1e32
    off ``net(x)``, without an error. Ties offloaded on both ends run exactly."""
    owners: dict[int, list[nn.Module]] = {}
    for sub in module.modules():
        own = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        for _, held in own:
            owners.setdefault(id(held), []).append(sub)
    found = []
    for path, sub in module.named_modules():
        for name in _offloaded_tied_names(sub):
            others = [m for m in owners.get(id(getattr(sub, name, None)), []) if m is not sub]
            if any(not _offloads(m) for m in others):
                found.append(f"{path}.{name}" if path else name)
    return found


def _accelerate_hooks(module: nn.Module) -> list[Any]:
    """accelerate's hook objects on ``module`` (a ``SequentialHook``'s one by one)."""
    found, pending = [], [vars(module).get(ACCELERATE_HOOK)]
    while pending:
        hook = pending.pop()
        if hook is None:
            continue
        inner = getattr(hook, "hooks", None)
        if isinstance(inner, (list, tuple)):
            pending.extend(inner)
        else:
            found.append(hook)
    return found


def _offloads(module: nn.Module) -> bool:
    return any(getattr(h, "offload", False) is True for h in _accelerate_hooks(module))


def _offloaded_tied_names(module: nn.Module) -> list[str]:
    return sorted(
        str(n)
        for h in _accelerate_hooks(module)
        if getattr(h, "offload", False) is True
        for n in getattr(h, "tied_params_names", None) or ()
    )


def _foreign_forwards(copied: nn.Module) -> list[str]:
    """Paths of submodules of ``copied`` (a fresh copy) whose ``forward``, set on the
    instance, may run modules other than the copy's: a method of an object outside it (the
    LightningModule), or a function (which ``copy.deepcopy`` keeps as is) whose closure
    holds modules of the original, or holds none (it can then reach one only through its
    globals). A copy that rebuilds its ``forward`` (``torch.compile``'s wrapper) is fine."""
    inside = {id(m) for m in copied.modules()}
    found = []
    for path, sub in copied.named_modules():
        forward = vars(sub).get("forward")
        if forward is None:
            continue
        # Through closures, as deep as they go (torch.compile's wrapper nests
        # several functions around the module's own __call__), and globals.
        modules = [v for v in _reached(forward, set()) if isinstance(v, nn.Module)]
        plain = isinstance(forward, types.FunctionType)
        if any(id(m) not in inside for m in modules) or (plain and not modules):
            found.append(f"{path}.forward" if path else "forward")
    return found


def _reached(start: Any, seen: set[int]) -> list[Any]:
    """What ``start`` (a function, method or partial) can reach: its closures, as deep as
    they go (wrappers nest functions), and the globals its code names."""
    reached = [v for _, v in _visit(start, "", 0, seen)]
    functions = [v for v in reached if isinstance(v, types.FunctionType)]
    while functions:
        function = functions.pop()
        held = [_contents(c) for c in function.__closure__ or ()]
        named = function.__globals__
        held += [named[n] for n in function.__code__.co_names if n in named]
        for value in [*held, vars(function).get("__wrapped__")]:
            new = [v for _, v in _visit(value, "", 1, seen)]
            reached += new
            functions += [v for v in new if isinstance(v, types.FunctionType)]
    return reached


def _foreign_hooks(original: nn.Module, copied: nn.Module) -> list[tuple[str, str]]:
    """``(path, hook table)`` of ``copied``'s submodules with a hook that reaches a module of
    ``original`` through a global or a container in its closure (a closure over the module
    itself is repointed at the copy, see ``rebind_hook_closures``): the template would run
    it with the original's tensors, not those it is called with."""
    originals = {id(m) for m in original.modules()}
    found = []
    for path, sub in copied.named_modules():
        for name, table in hook_tables(sub).items():
            if name.endswith(("_with_kwargs", "_always_called")):
                continue  # flags, not hooks
            seen: set[int] = set()
            if any(id(v) in originals for h in table.values() for v in _reached(h, seen)):
                found.append((path, name.strip("_")))
    return found


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    """A plain meta tensor laid out as ``torch.empty_like(tensor)`` lays it out.

    Made from ``tensor``'s sizes and strides only, with every dispatch mode off: a
    template copied inside a ``deferred_init`` block (an ``Ensemble`` of modules built
    there, whose tensors are the block's fake tensors) must hold plain meta tensors, not
    the block's, which refuse every use once it has ended.
    """
    with no_dispatch_modes():
        laid_out = torch.empty_strided(
            tuple(tensor.shape), tuple(tensor.stride()), dtype=tensor.dtype, device="meta"
        )
        return torch.empty_like(laid_out)


#: The name of a class attribute, true on ``lm.Ensemble``: no template holds such a module.
STACKS_MEMBERS = "_lightning_meta_stacks_members"


def _storage_address(t: torch.Tensor) -> int:
    """Where ``t``'s memory is; 0 for a tensor without any (meta, fake, empty) or without
    one storage (sparse, nested)."""
    if (
        t.is_meta
        or t.layout != torch.strided
        or t.is_nested
        or (type(t) is not torch.Tensor and not isinstance(t, nn.Parameter))
    ):
        return 0
    try:
        storage = t.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return 0
    return storage.data_ptr() if storage.nbytes() > 0 else 0


def ensembles_in(module: nn.Module) -> list[str]:
    """Paths of the ``lm.Ensemble`` s ``module`` is or holds (see :data:`STACKS_MEMBERS`)."""
    return [
        path for path, sub in module.named_modules() if getattr(type(sub), STACKS_MEMBERS, False)
    ]


def _refuse_ensembles(module: nn.Module) -> None:
    """Raise if ``module`` is or holds an ``lm.Ensemble``."""
    ensembles = ensembles_in(module)
    if ensembles:
        where = ", ".join(repr(p) if p else "the module itself" for p in ensembles)
        raise ArgumentTypeError(
            f"MetaTemplate({type(module).__name__}): {where} is an lm.Ensemble, which a "
            "template cannot hold: an Ensemble runs its members through stacked tensors and "
            "a template of its own, which a template's meta copy (or an outer Ensemble's "
            "stacked call) cannot reach. Fix: hold the inner modules as plain modules "
            "(nn.ModuleList) in the model, or make one Ensemble of the whole models.",
            paths=ensembles,
        )


def to_meta(module: nn.Module) -> nn.Module:
    """Return a meta-device copy of ``module`` without allocating real memory.

    Raises:
        ArgumentValueError: ``module`` holds what cannot be copied (an
            uninitialised lazy parameter, a tensor attribute computed from a
            parameter, a tensor that requires grad outside the parameters,
            a ``forward`` set on the instance to outside code, a lock),
            named by its dotted path.
    """
    lazy = [name for name, t in named_tensors(module).items() if torch.nn.parameter.is_lazy(t)]
    if lazy:
        raise ArgumentValueError(
            f"MetaTemplate({type(module).__name__}): {', '.join(map(repr, lazy))} not "
            "initialised yet (a lazy module such as nn.LazyLinear), so it has no shape to "
            "copy. Fix: run one forward on an example batch before building the template, or "
            "pass a factory that builds the module with explicit sizes.",
            paths=lazy,
        )

    _refuse_ensembles(module)

    def make(name: str, tensor: torch.Tensor) -> torch.Tensor:
        meta = _meta_like(tensor)
        if isinstance(tensor, nn.Parameter):
            return nn.Parameter(meta, requires_grad=tensor.requires_grad)
        return meta

    memo: dict[int, Any] = {}
    for sub in module.modules():
        # The hook recomputes this attribute from the parameters before every
        # forward, so its value (a non-leaf deepcopy refuses) is never read.
        for _, attr in recomputing_hooks(sub):
            value = vars(sub).get(attr)
            if isinstance(value, torch.Tensor):
                memo[id(value)] = _meta_like(value)
    own = {id(t) for t in _tensors(module)} | set(memo)
    # Storage of the module's own tensors, by name: a plain attribute sharing
    # it (self.readout = self.emb.weight.data) would become a copy frozen at
    # build time, which no call's tensors (and no training step) reach.
    # Only parameters that train: a frozen one or a buffer a copy can stand for.
    storages = {
        ptr: name
        for name, t in named_tensors(module).items()
        if isinstance(t, nn.Parameter) and t.requires_grad and (ptr := _storage_address(t))
    }
    derived: list[str] = []
    trained: list[str] = []
    pending: list[str] = []  # deferred plain attributes: no values yet
    shared: dict[str, str] = {}
    for path, where, value in _reachable(module, set()):
        if not isinstance(value, torch.Tensor) or id(value) in own:
            continue
        if value.requires_grad:
            (derived if value.grad_fn is not None else trained).append(
                f"{path}.{where}" if path else where
            )
            continue
        twin = storages.get(_storage_address(value))
        if twin is not None:
            shared[f"{path}.{where}" if path else where] = twin
            continue
        # A module built in an open deferred_init block (an Ensemble's members)
        # holds the block's fake tensors in its plain attributes (a constant
        # scale): the template keeps real values, as eagerly, which the block
        # knows for constants and refuses to give for random draws.
        at = f"{path}.{where}" if path else where
        if handle_of(value) is not None:
            pending.append(at)
            continue
        real = value_in_block(value, f"MetaTemplate({type(module).__name__}) copying {at!r}")
        if real is not None:
            with no_dispatch_modes():
                memo[id(value)] = real.clone(memory_format=torch.preserve_format)
    if pending:
        raise ArgumentValueError(
            f"MetaTemplate({type(module).__name__}): {', '.join(map(repr, pending))} is a "
            "tensor attribute built under deferred_init and not materialized yet: the "
            "template copies plain tensor attributes with their values, which it does not "
            "have before materialize (the copy would stay on meta). Fix: make the template "
            "inside the deferred_init block, or after materialize (MetaGuard materializes "
            "in setup: make it in on_fit_start or later).",
            paths=pending,
        )
    if derived:
        raise ArgumentValueError(
            f"MetaTemplate({type(module).__name__}): {', '.join(map(repr, derived))} is a "
            "tensor attribute computed from parameters (it has a grad_fn), which cannot be "
            "copied without its graph. Fix: compute it in forward, or register it as a buffer "
            "(`self.register_buffer(name, t.detach(), persistent=False)`).",
            paths=derived,
        )
    if shared:
        pairs = ", ".join(f"{a!r} (with {b!r})" for a, b in shared.items())
        raise ArgumentValueError(
            f"MetaTemplate({type(module).__name__}): {pairs} share memory with the module's "
            "trainable parameters outside its tables (`self.readout = self.emb.weight.data`): "
            "the template would keep a copy as it is now, which neither the tensors a call "
            "passes in nor a training step reach. Fix: use the tensor itself (a tie: "
            "`self.readout = self.emb.weight`), or register it as a buffer "
            "(`self.register_buffer(name, t, persistent=False)`), passed in the mapping.",
            paths=list(shared),
        )
    if trained:
        raise ArgumentValueError(
            f"MetaTemplate({type(module).__name__}) holds tensors that require grad outside "
            f"its parameters: {trained}. The template would keep a copy of them as they are "
            "now, which no gradient reaches (and a later change to them is not seen). Fix: "
            "register them as parameters (nn.Parameter, or a submodule), so that "
            "`state_from` and the mapping pass them in, or pass them in as inputs.",
            paths=trained,
        )
    if _SHARE_HOOK_OBJECTS.get():
        _keep_hook_objects(module, memo)
    try:
        copied = copy_module(module, make, memo=memo)
    except MetaTensorError:
        raise
    except Exception as e:
        paths = _uncopyable(module, memo)
        where = ", ".join(map(repr, paths)) if paths else "an attribute"
        raise ArgumentValueError(
            f"MetaTemplate({type(module).__name__}) cannot copy {where}: "
            f"{type(e).__name__}: {e}. Fix: keep such objects (locks, open files, "
            "handles) out of the module, e.g. on the LightningModule that holds it, or pass "
            "a factory (`lambda: MyNet(...)`) that builds the template from scratch.",
            paths=paths,
        ) from e
    hooked = _foreign_hooks(module, copied)
    if hooked:
        where = ", ".join(f"{path or 'the module'} ({table})" for path, table in hooked)
        raise ArgumentValueError(
            f"MetaTemplate({type(module).__name__}): a hook of {where} reaches "
            "the original model through a global or a container it closes over: the template "
            "would run it with the original's tensors, not the ones it is called with (no "
            "gradient reaches those). Fix: use the module the hook is given "
            "(hook(module, args, output)), or close over the module itself, which the "
            "template points at its copy.",
            paths=[path for path, _ in hooked],
        )
    offloaded = _offloaded_ties(module)
    if offloaded:
        raise ArgumentValueError(
            f"MetaTemplate({type(module).__name__}): accelerate offloads the tied weights "
            f"{', '.join(offloaded)} apart from the module they are tied to, which stays on "
            "a device (dispatch_model or a device_map offloading to 'cpu' or 'disk'): its "
            "hooks share such weights by memory address, which a template's copy cannot "
            "share, and its calls gave wrong values. Fix: put both ends of the tie on one "
            "device, or offload both (the head with the embedding it is tied to), or call "
            "the module itself.",
            paths=offloaded,
        )
    foreign = _foreign_forwards(copied)
    if foreign:
        raise ArgumentValueError(
            f"MetaTemplate({type(module).__name__}): {', '.join(map(repr, foreign))} is set on "
            "the instance to a function, or to a method of an object outside the module (the "
            "LightningModule): the template would run that code, which reaches the original "
            "modules, not the tensors the template is called with. Fix: override `forward` in "
            "a subclass, or build the template from a wrapper module whose `forward` does the "
            "extra work.",
            paths=foreign,
        )
    return copied


def _uncopyable(module: nn.Module, memo: dict[int, Any]) -> list[str]:
    """Dotted paths of the attributes of ``module``'s submodules that deepcopy refuses."""
    found = []
    for path, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if attr in ("_parameters", "_buffers", "_modules") or isinstance(value, nn.Module):
                continue
            try:
                copy.deepcopy(value, dict(memo))
            except Exception:
                found.append(f"{path}.{attr}" if path else attr)
    return found


# Eagerly, also inside torch.compile (a cache=False template is built on every call):
# dynamo cannot trace functorch's interpreter objects or a factory's module
# construction, and warned "does not know how to trace the builtin
# pybind11_object.__new__" for the user.
@compiler_disabled
def _build_on_meta(factory: Factory) -> nn.Module:
    # The template is meta on purpose: a deferred_init block (or any dispatch
    # mode) around it must neither record its construction nor make it fake.
    with no_dispatch_modes():
        module = build_on_meta(factory, "MetaTemplate factory")
    # A factory may capture modules or tensors built elsewhere; copy what is
    # not on meta so the template never aliases or holds real storage, and a
    # deferred module (meta until materialize makes it real in place, its
    # modes switched by every call's) so it never aliases the model's.
    if any(not t.is_meta or handle_of(t) is not None for t in _tensors(module)):
        return to_meta(module)  # which refuses an Ensemble inside
    _refuse_ensembles(module)
    return module


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _layout_key(modules: list[nn.Module]) -> tuple[Any, ...]:
    """What the names and ties a call is checked against depend on.

    ``modules`` is ``list(module.modules())`` as laid out last. Each one's
    parameter and buffer tables (names, tensor objects) and children: a tie
    made, a parametrization or a submodule registered, a tensor replaced
    since changes it (a new submodule changes its parent's children). Tuples
    of names and ids, built by torch's C code: a few microseconds per module.
    """
    key: list[Any] = []
    for sub in modules:
        params, buffers = tensor_tables(sub)
        key += (
            tuple(params),
            tuple(map(id, params.values())),
            tuple(buffers),
            tuple(map(id, buffers.values())),
            tuple(map(id, children_of(sub).values())),
        )
    return tuple(key)


# Tie groups' names, the shape of each name, integer buffers' dtypes.
_Names = tuple[list[list[str]], dict[str, torch.Size], dict[str, torch.dtype]]
_Watched = list[tuple[str, nn.Module]]
_Recomputed = list[tuple[str, nn.Module, str]]


class _Layout:
    """What a template's calls look up about its module, found once and again only when
    the module's tables change (a tie, a parametrization, a submodule registered or
    replaced since: :func:`_layout_key`): the names a strict call must give, whether
    a submodule is registered twice, which submodules checkpoint activations, and
    (found again too once a hook was registered anywhere) which submodules may store
    state in plain attributes and which attributes forward pre-hooks recompute.
    """

    def __init__(self, module: nn.Module) -> None:
        self.modules = list(module.modules())
        self.key = _layout_key(self.modules)
        self.twice = sum(1 for _ in module.named_modules(remove_duplicate=False)) > len(
            self.modules
        )
        # Whether they checkpoint depends on their mode and flag at call time.
        self.checkpointing = [
            (path, sub)
            for path, sub in module.named_modules()
            if is_checkpoint_wrapper(sub) or _checkpoint_flags(sub)
        ]
        # Slots registered empty (``register_buffer(name, None)``, a Linear without bias):
        # dotted name -> "parameter" / "buffer". No call must fill them, but net may
        # hold a tensor there (a lazily filled buffer, a bias added since).
        self.empty: dict[str, str] = {}
        for path, sub in module.named_modules():
            for kind, table in zip(("parameter", "buffer"), tensor_tables(sub), strict=True):
                self.empty.update(
                    (f"{path}.{k}" if path else k, kind) for k, v in table.items() if v is None
                )
        self._names: _Names | None = None
        self._named: list[tuple[str, nn.Module]] | None = None
        self._tensor_names: list[str] | None = None
        self._settings: dict[str, tuple[str, ...]] | None = None
        self._hooked: tuple[int, _Watched, _Recomputed] | None = None
        # Meta tensors in plain attributes that are not the module's own (a
        # factory's plain tensors, built on meta): no call's mapping replaces them.
        # And whether a real tensor is there (a module template keeps their values):
        # a shape probe's meta tensors can meet it. One walk for both.
        own = {id(t) for t in _tensors(module)}
        self.strays: dict[int, str] = {}
        self.real_plain = False
        for path, where, value in _reachable(module, set()):
            if not isinstance(value, torch.Tensor) or id(value) in own:
                continue
            if value.is_meta:
                self.strays[id(value)] = repr(f"{path}.{where}" if path else where)
            elif holds_values(value):
                self.real_plain = True

    def fits(self, module: nn.Module) -> bool:
        """Whether this is still ``module``'s layout."""
        return self.modules[0] is module and self.key == _layout_key(self.modules)

    # Found on first use, as names() is: a plain call (and torch.compile tracing one, where
    # walking attributes broke the graph) needs none of these.
    def named(self) -> list[tuple[str, nn.Module]]:
        """The module's ``named_modules()``."""
        if self._named is None:
            self._named = list(self.modules[0].named_modules())
        return self._named

    def setting_table(self) -> dict[str, tuple[str, ...]]:
        """Submodule path -> the names of the plain settings its forward may read (momentum,
        eps, p, track_running_stats), for the submodules that have any: a call standing for
        ``net(x)`` runs with ``net``'s (:func:`_settings_of`)."""
        if self._settings is None:
            found = {}
            for path, sub in self.named():  # a loop: dynamo cannot trace a walrus in one
                names = _setting_names(sub)
                if names:
                    found[path] = names
            self._settings = found
        return self._settings

    def tensor_names(self) -> list[str]:
        """Every parameter and buffer name, tied names included (:func:`named_tensors`)."""
        if self._tensor_names is None:
            self._tensor_names = list(named_tensors(self.modules[0]))
        return self._tensor_names

    def names(self) -> _Names:
        """Every name of each group of tied tensors (one of them satisfies the group), the
        shape expected for each name, and the dtype of integer buffers (a float where an
        integer buffer is expected, a generated step count, would run, but not as the module
        does)."""
        if self._names is None:
            slots = [[s for s in g if s.kind != "attr"] for g in tie_groups(self.modules[0])]
            self._names = (
                [[s.path for s in g] for g in slots if g],
                {s.path: s.tensor.shape for g in slots for s in g},
                {
                    s.path: s.tensor.dtype
                    for g in slots
                    for s in g
                    if s.kind == "buffer"
                    and not (s.tensor.is_floating_point() or s.tensor.is_complex())
                },
            )
        return self._names

    def _hooks(self) -> tuple[int, _Watched, _Recomputed]:
        stamp = hook_registrations()
        if self._hooked is None or self._hooked[0] != stamp:
            named = list(self.modules[0].named_modules())
            self._hooked = (
                stamp,
                watched(named),
                [(path, sub, attr) for path, sub in named for _, attr in recomputing_hooks(sub)],
            )
        return self._hooked

    def watched(self) -> _Watched:
        """The submodules whose forward may store something in plain attributes."""
        return self._hooks()[1]

    def recomputed(self) -> _Recomputed:
        """(path, submodule, attribute) for each attribute a forward pre-hook recomputes."""
        return self._hooks()[2]


class TemplateState(dict[str, torch.Tensor]):
    """What :meth:`MetaTemplate.state_from` returns: a ``dict`` of tensors by dotted name
    that also carries the source module's modes and settings.

    ``modes`` maps each submodule path of the template to the ``training``
    flag of the matching submodule of the source; calling the template with
    this mapping runs every submodule in that mode, as the source's own
    forward would. ``settings`` maps a submodule path to the plain settings
    (numbers, strings, ``None``, dtypes, tuples of them) of the source's
    submodule that differ from the template's (a BatchNorm's ``momentum`` set
    to ``None`` by ``StochasticWeightAveraging`` after the template was
    made): the call runs with those too. The state also refers (weakly) to the source module: a
    buffer the template's forward assigns a new tensor to (an EMA, dynamic
    RoPE's ``inv_freq``) is set on the source too, as ``net(x)`` would.

    A plain ``dict(...)`` or ``{**state}`` of it drops the modes and the
    source; :meth:`copy` keeps them, and so does merging with ``|``
    (``state | generated`` and ``generated | state`` are states: the
    right-hand side's tensors win, as for dicts), and passing ``modes=`` to
    :meth:`MetaTemplate.functional_call`. ``copy.deepcopy`` and ``pickle``
    keep the modes and settings and drop the source (the copied tensors are
    not its). It is a pytree node (``torch.func.grad``, ``torch.vmap`` and
    ``torch.utils._pytree.tree_map`` see its tensors); the states a transform
    builds keep the modes and settings, not the source (as a ``dict`` given to
    ``torch.func.functional_call`` inside a transform, whose new buffers stay
    in that dict).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import lightning_meta as lm
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).eval()
        >>> template = lm.MetaTemplate(net)
        >>> state = template.state_from(net)
        >>> sorted(state)[:2], state.modes["1"]
        (['0.bias', '0.weight'], False)
        >>> x = torch.ones(3, 2)
        >>> torch.equal(template(state, x), net(x))
        True
        >>> grads = torch.func.grad(lambda s: template(s, x).sum())(state)
        >>> type(grads).__name__, grads["0.weight"].shape
        ('TemplateState', torch.Size([2, 2]))
    """

    modes: dict[str, bool]
    settings: dict[str, dict[str, Any]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.modes = {}
        self.settings = {}
        self._source: weakref.ref[nn.Module] | None = None

    @property
    def source(self) -> nn.Module | None:
        """The module :meth:`MetaTemplate.state_from` read, while it exists; else ``None``."""
        return None if self._source is None else self._source()

    def copy(self) -> TemplateState:
        new = TemplateState(self)
        new.modes = dict(self.modes)
        new.settings = {p: dict(v) for p, v in self.settings.items()}
        new._source = self._source
        return new

    # ``state | generated`` (the hypernetwork's merge: net's buffers, generated
    # parameters) gave a plain dict, whose call ran in the template's own modes: a
    # BatchNorm trained in a validation step, 10.4 off (before 2026-12-07, third
    # session). Merged, the state keeps its modes, settings and source, as copy() does.
    def __or__(self, other: Any) -> TemplateState:  # type: ignore[override]
        if not isinstance(other, Mapping):
            return NotImplemented
        new = self.copy()
        new.update(other)
        if isinstance(other, TemplateState):
            new.modes.update(other.modes)
            for path, values in other.settings.items():
                new.settings.setdefault(path, {}).update(values)
        return new

    def __ror__(self, other: Any) -> TemplateState:  # type: ignore[override]
        if not isinstance(other, Mapping):
            return NotImplemented
        new = TemplateState(other)
        new.update(self)
        new.modes = dict(self.modes)
        new.settings = {p: dict(v) for p, v in self.settings.items()}
        new._source = self._source
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {"modes": self.modes, "settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.modes = dict(state.get("modes", {}))
        self.settings = {p: dict(v) for p, v in state.get("settings", {}).items()}
        self._source = None


def _flatten_state(state: TemplateState) -> tuple[list[torch.Tensor], Any]:
    keys = tuple(state)
    settings = tuple((p, tuple(v.items())) for p, v in state.settings.items())
    return [state[k] for k in keys], (keys, tuple(state.modes.items()), settings)


def _unflatten_state(values: Any, context: Any) -> TemplateState:
    keys, modes, settings = context
    new = TemplateState(zip(keys, values, strict=True))
    new.modes = dict(modes)
    new.settings = {p: dict(v) for p, v in settings}
    return new


register_pytree_node(
    TemplateState, _flatten_state, _unflatten_state, "lightning_meta.TemplateState"
)


class MetaTemplate:
    """Hold a meta-device module where Lightning cannot see it, and call it functionally.

    The template is a plain Python object, not an ``nn.Module``: it is not in
    ``children()``, ``parameters()`` or ``state_dict()`` of the module that
    holds it, is never moved by ``.to()`` or ``.cpu()``, never wrapped by DDP
    or FSDP, and survives :func:`copy.deepcopy` and :mod:`pickle`. Calling it
    runs :func:`torch.func.functional_call` on the meta module with tensors
    the caller supplies, which is what ``torch.vmap`` ensembles,
    hypernetworks and meta-learning need.

    Args:
        module_or_factory: an ``nn.Module`` on any device, copied to meta
            (never aliased: the original is untouched; its parameters and
            buffers get no storage, tensors kept in plain attributes are
            copied as they are, and modules outside it that it refers to,
            such as the LightningModule a hook is a method of, are kept
            live, not copied), or a
            zero-argument callable returning a module, called under
            ``torch.device("meta")`` (also inside a ``deferred_init`` block,
            which does not record it).
        cache: with a factory, build the module once (``True``) or on every
            access to :attr:`module` (``False``: nothing is kept between
            calls, the "build on demand" pattern; the factory must then be a
            module-level function for the template to pickle). Must be
            ``True`` for a module argument.

    Raises:
        MetaTensorError: the module holds what cannot be copied (a lazy
            parameter, a tensor attribute with a ``grad_fn`` or that
            requires grad, a ``forward`` set on the instance to code outside
            the module, a lock), named by its path; the factory fails or
            returns no module.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import lightning_meta as lm
        >>> template = lm.MetaTemplate(lambda: nn.Linear(3, 2))
        >>> template.module.weight.is_meta
        True
        >>> params = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
        >>> template(params, torch.ones(1, 3))
        tensor([[3., 3.]])

    .. warning::
        The template is not a child module, so ``model.eval()`` (which
        Lightning calls for validate, test and predict) does not reach it.
        Call it with ``template.state_from(net)`` (or ``modes=net``) to run
        every submodule in ``net``'s mode, frozen submodules included. With
        a plain mapping (a hypernetwork's output) it runs in its own modes:
        those of the module it was copied from, or as set by :meth:`train` /
        :meth:`eval`.
    """

    def __init__(self, module_or_factory: nn.Module | Factory, *, cache: bool = True) -> None:
        self._factory: Factory | None
        self._module: nn.Module | None
        # None: the modes the factory builds (an uncached template not set since).
        self._training: bool | None = None
        # functional_call swaps tensors into the one cached module: calls from
        # several threads take turns. Made on first use (_serialized): an uncached
        # @meta_template builds a template on every access, also inside a compiled
        # forward, where dynamo cannot trace RLock (torch 2.12 warned "Dynamo does
        # not know how to trace the builtin RLock.__new__").
        self._lock: threading.RLock | None = None
        # Tensors in plain attributes a forward changed in place: see _put_back.
        self._spoiled: list[str] = []
        # What _check compares every call with, while the module's tables stay as they were.
        self._layout: _Layout | None = None
        self._shares_hooks = _SHARE_HOOK_OBJECTS.get()
        if isinstance(module_or_factory, nn.Module):
            if not cache:
                raise ArgumentValueError(
                    f"MetaTemplate({type(module_or_factory).__name__}, cache=False): a module "
                    "argument is copied once, so there is nothing to build on demand. Fix: "
                    "pass a factory (e.g. `lambda: MyNet(...)`) to use cache=False."
                )
            self._factory = None
            self._module = to_meta(module_or_factory)
            self._training = module_or_factory.training
        elif callable(module_or_factory):
            self._factory = module_or_factory
            # Built eagerly when cached so a broken factory fails where it is named.
            self._module = _build_on_meta(module_or_factory) if cache else None
            if self._module is not None:
                self._training = self._module.training
        else:
            raise ArgumentTypeError(
                f"MetaTemplate expects an nn.Module or a zero-argument factory returning one, "
                f"got {type(module_or_factory).__name__}. Fix: pass the module or "
                "`lambda: MyNet(...)`."
            )
        self._cache = cache

    # ------------------------------------------------------------------ access
    @property
    def cache(self) -> bool:
        """Whether the meta module is built once and kept."""
        return self._cache

    @property
    def module(self) -> nn.Module:
        """The meta ``nn.Module`` (with ``cache=False``, a new one on every access)."""
        if self._module is not None or self._factory is None:  # a module was given: cached
            return typing.cast(nn.Module, self._module)
        module = _build_on_meta(self._factory)
        if self._training is not None:  # else the modes the factory gave, as a cached one
            module.train(self._training)
        return module

    @property
    def training(self) -> bool:
        """The mode the template's forward runs in (its root's, where a factory built the
        submodules in modes of their own)."""
        if self._training is None:
            return self.module.training
        return self._training

    def train(self, mode: bool = True) -> MetaTemplate:
        """Set the mode the template's forward runs in and return the template."""
        with self._serialized():
            self._training = mode
            if self._module is not None:
                self._module.train(mode)
        return self

    def _serialized(self) -> contextlib.AbstractContextManager[Any]:
        # A compiled graph takes the tensors as inputs and swaps nothing in;
        # dynamo could not trace the lock anyway.
        if self._module is None or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        if self._lock is None:
            with _MAKING_LOCKS:
                if self._lock is None:
                    self._lock = threading.RLock()
        return self._lock

    def eval(self) -> MetaTemplate:
        """Equivalent to ``train(False)``."""
        return self.train(False)

    def shapes(self, *, buffers: bool = True) -> dict[str, tuple[int, ...]]:
        """Return the shape of every parameter and buffer the template expects, by dotted name.

        Each group of tied tensors (a tied embedding and output head) is
        listed once, under its first name: a call gives one tensor for the
        group (the default ``tie_weights=True``) and the template uses it
        under every name of the group. A call with ``tie_weights=False``
        takes a tensor for every name:
        ``template.module.named_parameters(remove_duplicate=False)``.

        Args:
            buffers: include the buffers (``True``, the default). With
                ``False``, only the parameters: what a hypernetwork generates,
                while the buffers (BatchNorm's running statistics and its
                integer step count) come from the real module
                (``template.state_from(net)``) or are kept by the caller.

        Example::

            >>> from torch import nn
            >>> import lightning_meta as lm
            >>> template = lm.MetaTemplate(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
            >>> template.shapes(buffers=False)
            {'0.weight': (2, 3), '0.bias': (2,), '1.weight': (2,), '1.bias': (2,)}
            >>> sorted(set(template.shapes()) - set(template.shapes(buffers=False)))
            ['1.num_batches_tracked', '1.running_mean', '1.running_var']
        """
        module = self.module
        shapes = {n: _shape(t) for n, t in module.named_parameters()}
        if buffers:
            shapes.update((n, _shape(t)) for n, t in module.named_buffers())
        return shapes

    def state_from(self, module: nn.Module) -> TemplateState:
        """Collect the tensors of a real ``module`` that has this template's structure.

        Unlike ``dict(module.named_parameters())``, this follows
        reparametrisations as ``module``'s forward would: a weight pruned by
        ``torch.nn.utils.prune`` (as Lightning's ``ModelPruning`` does) or
        computed by the hook-based ``torch.nn.utils.weight_norm`` /
        ``spectral_norm`` is recomputed by its hook, so gradients reach
        ``weight_orig`` (``weight_g``, ``weight_v``), and parametrised tensors
        (``torch.nn.utils.parametrize``) are evaluated. Spectral norm's
        ``u`` / ``v`` are ``net``'s own buffers in the mapping: in training
        mode each template call advances them by one power iteration, as
        each call ``net(x)`` does, so ``template(template.state_from(net), x)``
        stands for one call ``net(x)``.

        The result also carries every submodule's ``training`` flag, so the
        template call runs each submodule in ``module``'s mode (``model.eval()``
        for validation reaches it; a frozen BatchNorm stays in eval).

        Args:
            module: the real module, e.g. the one the template was copied from.

        Returns:
            a :class:`TemplateState`: dotted name -> tensor, for every parameter
            and buffer of the template, and ``modes``, submodule path ->
            ``training``.

        Raises:
            ArgumentTypeError: ``module`` is not an ``nn.Module`` (a tensor).
            MetaTensorError: ``module`` lacks one of the template's tensors or
                submodules.

        Example::

            >>> import torch
            >>> from torch import nn
            >>> import lightning_meta as lm
            >>> net = nn.Linear(2, 2)
            >>> template = lm.MetaTemplate(net)
            >>> x = torch.ones(1, 2)
            >>> torch.equal(template(template.state_from(net), x), net(x))
            True
        """
        template = self.module
        if not isinstance(module, nn.Module):
            raise ArgumentTypeError(
                f"MetaTemplate({type(template).__name__}).state_from expects the real "
                f"nn.Module the tensors come from, got {type(module).__name__}. Fix: pass the "
                "module (`template.state_from(net)`); tensors you hold already go straight to "
                "the call as a mapping: `template({name: tensor, ...}, x)`."
            )
        out = TemplateState()
        out._source = weakref.ref(module)
        missing = []
        subs = _by_path(module)
        with self._serialized():  # the layout, and the template's own settings, not a call's
            layout = self._layout_of(template)
            names = layout.tensor_names()
            out.settings = _settings_of(module, layout, subs)
        emptied = []
        for name in names:
            prefix, _, leaf = name.rpartition(".")
            try:
                sub = _at(subs, module, prefix)
                # A tensor recomputed by a forward pre-hook holds the value of
                # the last forward: run the hook as the forward would, so the
                # tensor is current and its gradient reaches what it is made of.
                for hook, attr in list(recomputing_hooks(sub)):
                    if attr == leaf:
                        hook(sub, ())
                value = getattr(sub, leaf)
            except AttributeError:
                missing.append(name)
                continue
            if value is None:
                emptied.append(name)
            out[name] = value
        if emptied:
            raise MetaTensorError(
                f"MetaTemplate.state_from({type(module).__name__}): the module holds None at "
                f"{', '.join(map(repr, emptied))}, where the template has a tensor: the module "
                "was changed after the template was made (a bias removed). Fix: make the "
                "template again from the module as it is now (lm.MetaTemplate(net)).",
                paths=emptied,
            )
        # The template's empty slots: a tensor net holds there since (a buffer its forward
        # filled on a first call, a bias set on a Linear built without one) goes in, as
        # net(x) uses it; before 2026-12-07 (third session) it was left out, 1.0 off.
        for name in layout.empty:
            prefix, _, leaf = name.rpartition(".")
            try:
                value = getattr(_at(subs, module, prefix), leaf, None)
            except AttributeError:
                continue
            if isinstance(value, torch.Tensor):
                out[name] = value
        out.modes.update(_modes_of(module, layout.named(), subs))
        lacking = [p for p, _ in layout.named() if p not in out.modes]
        if missing or lacking:
            listed = [*missing, *(f"{p} (a submodule)" for p in lacking)]
            raise MetaTensorError(
                f"MetaTemplate.state_from({type(module).__name__}): the module lacks "
                f"{', '.join(repr(n) for n in listed)}. Fix: pass a module built like the template.",
                paths=[*missing, *lacking],
            )
        return out

    # ---------------------------------------------------------------- calling
    def __call__(
        self, params_and_buffers: Mapping[str, torch.Tensor], /, *args: Any, **kwargs: Any
    ) -> Any:
        """Run the template's forward with ``params_and_buffers`` (see :meth:`functional_call`)."""
        if "modes" in kwargs and isinstance(kwargs["modes"], (nn.Module, Mapping)):
            self._refuse_modes_keyword()
        return self.functional_call(params_and_buffers, args, kwargs)

    def _refuse_modes_keyword(self) -> None:
        """Raise unless the forward itself takes ``modes``: written as a keyword of the call,
        it goes to the forward (a transformers model's ``**kwargs`` drops it silently)."""
        module = self.module
        parameters = inspect.signature(module.forward).parameters
        if "modes" in parameters:
            return
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        how = (
            "whose signature does not name it: its **kwargs may drop it (a transformers "
            "model's does), running every submodule in the template's own mode"
            if takes_any
            else "which does not take it"
        )
        raise ArgumentValueError(
            f"MetaTemplate({type(module).__name__})(params, ..., modes=...) passes modes= to "
            f"the forward, {how}; the template does not apply it. Fix: "
            "template.functional_call(params, args, kwargs, modes=net), or call with "
            "template.state_from(net), which carries net's modes; for a forward that reads "
            "modes= from its **kwargs, template.functional_call(params, args, "
            "{'modes': ...}) passes it on."
        )

    def functional_call(
        self,
        params_and_buffers: Mapping[str, torch.Tensor],
        args: Any = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        strict: bool = True,
        tie_weights: bool = True,
        modes: Mapping[str, bool] | nn.Module | None = None,
    ) -> Any:
        """Run the template's forward with the given tensors in place of its own.

        Each submodule runs in the mode of the matching submodule of the
        source when modes are given (``modes``, or a mapping returned by
        :meth:`state_from`), and in the template's own mode otherwise; the
        template's modes are put back after the call.

        Each call starts from the template as built: what the forward stores
        in its modules' plain attributes (a cache, ``self.last = h``) is put
        back after the call (``strict=True``). A buffer the forward assigns a
        new tensor to (an EMA) is written back into ``params_and_buffers``, as
        :func:`torch.func.functional_call` does, and, for a
        :class:`TemplateState`, set on the module it was read from.

        Calls from several threads are safe in eager mode: on a cached
        template they take turns (the one meta module receives the tensors
        of one call at a time); with ``cache=False`` each call has a module
        of its own. Under ``torch.compile`` no lock is taken: a forward with
        a graph break is not safe across threads (give each its own
        ``copy.deepcopy`` of the template).

        Args:
            params_and_buffers: dotted name -> tensor, for every parameter and
                buffer of the template (one name per group of tied tensors is
                enough with ``tie_weights=True``). Buffers may be omitted only
                when the template has none.
            args: positional inputs to ``forward`` (a single tensor is wrapped).
            kwargs: keyword inputs to ``forward``.
            strict: raise on missing, unexpected or mis-shaped entries, and
                put back what the forward stores in plain attributes
                (default). With ``False``, the call is
                :func:`torch.func.functional_call`'s as is: torch's own
                checks apply, omitted entries stay meta, and what the
                forward stores stays on the template.
            tie_weights: as in :func:`torch.func.functional_call`.
            modes: the module whose submodules' modes to run in (e.g. the real
                net the tensors come from), or submodule path -> ``training``.
                Defaults to the modes :meth:`state_from` attached to
                ``params_and_buffers``, if any.

        Returns:
            Whatever the template's ``forward`` returns.

        Raises:
            ArgumentTypeError: ``params_and_buffers`` is not a mapping (a
                tensor, ``None``, a list), whatever ``strict``.
            MetaTensorError: ``strict`` and an entry is missing, unexpected,
                of the wrong shape (or a float for an integer buffer), or a
                tied name given a different tensor than its twin; every
                offending key is listed. ``modes`` lacks a submodule of the
                template. The template checkpoints activations (recomputed
                in backward, after the call). The forward changed a plain
                tensor attribute in place, or, called with a
                :class:`TemplateState`, stored anything in plain attributes.
        """
        module = self.module
        if not isinstance(params_and_buffers, Mapping):
            # Before dict() reads it: a 1-D tensor or None would raise Python's own error.
            raise ArgumentTypeError(
                f"MetaTemplate({type(module).__name__}) expects a mapping of dotted names to "
                f"tensors as its first argument, got {type(params_and_buffers).__name__}. Fix: "
                "pass `dict(module.named_parameters())` or the output of a hypernetwork keyed "
                "by name (`template.shapes(buffers=False)` lists the names and shapes; split a "
                "flat vector into them)."
            )
        if self._spoiled:
            raise MetaTensorError(
                f"MetaTemplate({type(module).__name__}): an earlier call's forward changed "
                f"{', '.join(map(repr, self._spoiled))} in place, a tensor the template keeps "
                "in a plain attribute, which cannot be put back: every later call would see "
                "that call's values. Fix: register it as a buffer (`self.register_buffer(...)`"
                ", passed in the mapping like the others) and build the template again.",
                paths=self._spoiled,
            )
        # Modes and settings: given as a module (modes=net) or carried by a state_from mapping.
        settings: Mapping[str, Mapping[str, Any]] | None = None
        if modes is None:
            modes = getattr(params_and_buffers, "modes", None)
            settings = getattr(params_and_buffers, "settings", None)
        modes_of = modes if isinstance(modes, nn.Module) else None
        mode_map = None if modes_of is not None else typing.cast("Mapping[str, bool] | None", modes)
        if not isinstance(args, tuple):
            args = (args,)
        source = (
            params_and_buffers.source if isinstance(params_and_buffers, TemplateState) else None
        )
        # torch.func.functional_call writes what each name holds after the call
        # into the dict it is given: the forward's new tensor for a reassigned
        # buffer, but also the template's own meta tensor for the second name of
        # a submodule registered twice (its swaps run name by name). So it gets a
        # copy, and _reassigned picks what the forward assigned.
        given = dict(params_and_buffers)
        # What each name held before the call, read once: a mapping may make a new
        # tensor on every lookup (a hypernetwork's view of a flat vector). A dict
        # (TemplateState is one) gives the same tensor every time: no copy.
        before = params_and_buffers if isinstance(params_and_buffers, dict) else dict(given)
        # The check inside the lock: the tables it compares are the module's,
        # which another thread's call fills with its tensors meanwhile.
        with self._serialized():
            layout = self._layout_of(module)
            if strict:
                # A buffer registered empty that the forward fills (a statistic set on
                # the first call) goes into the dict, as for any buffer it assigns,
                # not onto the template: kept there, every later call failed (a
                # template of fixed tensors), and net, for a state_from call, never
                # got it as net(x) gives it (before 2026-12-07, third session).
                for name, kind in layout.empty.items():
                    if kind == "buffer" and name not in given:
                        given[name] = None  # type: ignore[assignment]
            if modes_of is not None:
                subs = _by_path(modes_of)
                mode_map = _modes_of(modes_of, layout.named(), subs)
                settings = _settings_of(modes_of, layout, subs)
            with _computed_kept(layout):
                metas = self._check(layout, before, tie_weights=tie_weights) if strict else {}
                watch = _meta_watch(layout, metas, before, (args, kwargs)) if strict else None
                with (
                    _modes_set(module, mode_map or {}, settings or {})
                    if mode_map or settings
                    else contextlib.nullcontext()
                ):
                    if torch.is_grad_enabled():
                        _refuse_checkpointing(layout, (given, args, kwargs))
                    # strict=False is torch.func.functional_call as is (Ensemble
                    # watches and keeps what its forward stores itself).
                    state = (
                        AttributeState(layout.watched())
                        if strict and not torch.compiler.is_compiling()
                        else None
                    )
                    try:
                        with (
                            watch if watch is not None else contextlib.nullcontext(),
                            # a template's own call: each state computes its weights (an
                            # Ensemble's, strict=False, keeps the region's cache as a
                            # loop over its members keeps theirs)
                            fresh_parametrizations(module) if strict else contextlib.nullcontext(),
                        ):
                            if layout.twice and not torch.compiler.is_compiling():
                                out = functional_call_restoring_in_reverse(
                                    module, given, args, dict(kwargs or {}), tie_weights=tie_weights
                                )
                            else:
                                out = torch.func.functional_call(
                                    module, given, args, dict(kwargs or {}), tie_weights=tie_weights
                                )
                            if watch is not None and watch.mixed and _weights_with_values(before):
                                watch.refuse_meta_output(out)
                    except BaseException as e:
                        if state is not None:
                            lost = state.restore()
                            if lost:  # changed in place, then raised: later calls would see it
                                self._spoiled = lost
                        if isinstance(e, RuntimeError) and "device meta" in str(e):
                            # Meta tensors held outside the tables (a list or a
                            # hook's argument referring to the module's own
                            # tensor): the swap does not reach them.
                            stray = [path for path, _ in _meta_plain(module)]
                            if stray:
                                raise _meta_outside_error(module, stray, e) from e
                        raise
                    replaced = _reassigned(module, before, given)
                    if state is not None:
                        self._put_back(layout, state, source is not None, replaced)
        if replaced:
            _write_back(module, params_and_buffers, given, replaced, source)
        return out

    def _layout_of(self, module: nn.Module) -> _Layout:
        layout = self._layout
        if layout is None or not layout.fits(module):
            # A new module (cache=False builds one per call), or one whose
            # tables changed since (a tie, a parametrization, a submodule).
            layout = self._layout = _Layout(module)
        return layout

    def _put_back(
        self, layout: _Layout, state: AttributeState, refuse: bool, replaced: list[str]
    ) -> None:
        """Put back what the forward stored in the template's plain attributes; raise if it
        changed a tensor there in place, or changed anything where ``refuse`` (a call standing
        for ``net(x)``) or the forward also reassigned the buffers ``replaced`` (written back:
        the next call would see them without the attributes that went with them)."""
        # Nothing watched (torch's own layers without hooks store nothing): nothing to compare.
        module = layout.modules[0]
        compare = (refuse or bool(replaced)) and bool(state.modules)
        changed = state.changed(owned_by(module)) if compare else []
        if changed:
            # What a forward pre-hook recomputes from the parameters (a pruned or
            # weight-normed `weight`) is no state: net's hook recomputes it too.
            computed = {f"{path}.{attr}" if path else attr for path, _, attr in layout.recomputed()}
            changed = [c for c in changed if c not in computed]
        lost = state.restore()
        if lost:
            self._spoiled = lost
            raise MetaTensorError(
                f"MetaTemplate({type(module).__name__}): the forward changed "
                f"{', '.join(map(repr, lost))} in place, a tensor the template keeps in a plain "
                "attribute, so every later call would see this call's values (this template "
                "now refuses every call). Fix: register it as a buffer "
                "(`self.register_buffer(...)`, passed in the mapping like the others) and build "
                "the template again.",
                paths=lost,
            )
        # The call ran: what it changed in place in the tensors it was given
        # (BatchNorm's running statistics) stays changed; repeating it would
        # apply the batch twice.
        ran = (
            " This call ran: what it changed in place in the tensors passed in (running "
            "statistics) stays changed, so do not repeat it for the same batch."
        )
        if changed and refuse:
            raise MetaTensorError(
                f"MetaTemplate({type(module).__name__}) was called with state_from(net), but the "
                f"forward stored {', '.join(map(repr, changed))} in plain attributes: net(x) "
                "would keep that in net, and the template, which puts its attributes back after "
                f"each call, cannot (later outputs of net would differ).{ran} Fix: from now on "
                "call net(x) itself, or keep such state in buffers (which state_from passes in "
                "and the template sets on net when the forward assigns them); if each call may "
                "start afresh, call the template with a plain dict (`dict(state)`, modes=net).",
                paths=changed,
            )
        if changed:
            raise MetaTensorError(
                f"MetaTemplate({type(module).__name__})'s forward assigned new tensors to the "
                f"buffers {', '.join(map(repr, replaced))} (written back into the mapping "
                f"given) and stored {', '.join(map(repr, changed))} in plain attributes (which "
                "the template puts back after each call): the next call would see the one "
                f"without the other (dynamic RoPE's inv_freq and its cached length).{ran} Fix: "
                "call the real module, or keep all such state in buffers.",
                paths=[*replaced, *changed],
            )

    def _check(
        self, layout: _Layout, given: Mapping[str, torch.Tensor], *, tie_weights: bool
    ) -> dict[int, str]:
        """Raise on entries that do not match the template; return the plain meta tensors
        among them, by id, named (see :class:`_MetaWatch`)."""
        module = layout.modules[0]
        groups, expected, integral = layout.names()
        problems: dict[str, str] = {}  # path -> what is wrong with it
        metas: dict[int, str] = {}
        reshaped = []
        for names in groups:
            present = [n for n in names if n in given]
            if not present or (not tie_weights and len(present) < len(names)):
                for n in names if not present else [n for n in names if n not in given]:
                    problems[n] = f"missing {n!r} (expected shape {tuple(expected[n])})"
            elif tie_weights and len({id(given[n]) for n in present}) > 1:
                problems[present[0]] = (
                    f"{', '.join(map(repr, present))} are tied in the template but were given "
                    f"different tensors (pass {names[0]!r} only, as `template.shapes()` lists "
                    f"it, and omit {', '.join(map(repr, names[1:]))}; or untie them: "
                    "`template.functional_call(params, args, tie_weights=False)`)"
                )
        for name, value in given.items():
            if name in layout.empty and name not in expected:
                # An empty slot of the template (a bias net gained, a buffer its forward
                # filled): its tensor, or None, goes in as net holds it.
                if value is not None and not isinstance(value, torch.Tensor):
                    problems[name] = f"{name!r} is {type(value).__name__}, expected a tensor"
            elif name not in expected:
                close = _closest(name, expected)
                hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
                problems[name] = f"unexpected {name!r}{hint}"
            elif not isinstance(value, torch.Tensor):
                problems[name] = f"{name!r} is {type(value).__name__}, expected a tensor"
            elif value.shape != expected[name]:
                problems[name] = (
                    f"{name!r} has shape {_shape(value)}, expected {tuple(expected[name])}"
                )
                reshaped.append(name)
            elif name in integral and value.dtype != integral[name]:
                problems[name] = (
                    f"{name!r} has dtype {value.dtype}, expected {integral[name]} (a buffer: "
                    "pass the module's own, e.g. from template.state_from(net))"
                )
            elif value.is_meta and type(value) in (torch.Tensor, nn.Parameter):
                # A plain meta tensor (a deferred one has errors of its own): a
                # shape probe, or one left unloaded among real ones.
                metas[id(value)] = f"the mapping's {name!r}"
        if problems:
            lines = "\n  ".join(sorted(problems.values()))
            source = given.source if isinstance(given, TemplateState) else None
            if source is not None and len(reshaped) == len(problems):
                # strict=False would not help: net's tensors are all there, in other shapes.
                fix = (
                    f"the {type(source).__name__} these come from (state_from(net)) was "
                    "changed after the template was made (a tensor made again in another "
                    "shape, as litgpt's max_seq_length setter does with its rotary cache). "
                    "Fix: make the template again from the module as it is now "
                    "(lm.MetaTemplate(net))."
                )
            else:
                fix = (
                    "Fix: pass one tensor per name in `template.shapes()` (under torch.vmap, "
                    "the shape of one member), or call `template.functional_call(..., "
                    "strict=False)`."
                )
            raise MetaTensorError(
                f"MetaTemplate({type(module).__name__}) was called with parameters and buffers "
                f"that do not match it ({len(problems)} problem(s)):\n  {lines}\n{fix}",
                paths=problems,
            )
        return metas

    # -------------------------------------------------------- copy and pickle
    def __deepcopy__(self, memo: dict[int, Any]) -> MetaTemplate:
        if not memo and self._module is not None:
            # The template is copied alone (not with the LightningModule that
            # holds it): modules outside it that its module refers to (a hook's
            # owner) stay the live ones, as when it was built.
            _keep_outside_owners(self._module, memo)
            if self._shares_hooks:
                _keep_hook_objects(self._module, memo)
        new = MetaTemplate.__new__(MetaTemplate)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        if self._module is not None and new._module is not None:
            # Hooks closing over this template would still read it.
            rebind_hook_closures(self._module, new._module, memo)
        return new

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state.pop("_layout", None)  # ids of this process' tensors
        if state["_module"] is not None:
            # A cached module is all that is needed; the factory may be a
            # lambda or closure that cannot be pickled.
            state["_factory"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_spoiled", [])
        self.__dict__.setdefault("_shares_hooks", True)
        self._layout = None
        self._lock = None

    def __copy__(self) -> MetaTemplate:
        # A template sharing its module with another would share its modes and the
        # tensors each call swaps in, but not the lock or the mode it reports: eval()
        # on one switched the other's dropout off, and two threads (one copy each)
        # read each other's tensors. The module holds no data, so a copy is an
        # independent template, as copy.deepcopy gives.
        return copy.deepcopy(self)

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        factory = self.__dict__.get("_factory")
        if self.__dict__.get("_module") is None and factory is not None:
            # pickle names a function by its qualified name; a lambda or a
            # local function has none it can import, and the raw error would
            # not say that a template is the cause (ddp_spawn pickles the model).
            try:
                pickle.dumps(factory, int(protocol))
            except Exception as e:
                raise ArgumentValueError(
                    f"MetaTemplate(cache=False) with factory {describe(factory)!r} cannot be "
                    f"pickled ({type(e).__name__}: {e}), e.g. for strategy='ddp_spawn'. Fix: "
                    "make the factory a module-level function, or use cache=True (the built "
                    "module is pickled instead of the factory)."
                ) from e
        return super().__reduce_ex__(protocol)

    def __repr__(self) -> str:
        if self._module is not None:
            body = repr(self._module).replace("\n", "\n  ")
        else:
            body = f"factory={describe(self._factory)}"
        return f"MetaTemplate(cache={self._cache}, {body})"


@contextlib.contextmanager
def _computed_kept(layout: _Layout) -> Iterator[None]:
    """Put back the attributes forward pre-hooks recompute (a pruned ``weight``) after the body.

    The hook stores the value computed from the caller's tensors on the
    template: kept, it would hold real memory and a graph (which deepcopy
    refuses) until the next call.
    """
    saved = [
        (sub, attr, vars(sub)[attr]) for _, sub, attr in layout.recomputed() if attr in vars(sub)
    ]
    try:
        yield
    finally:
        for sub, attr, value in saved:
            setattr(sub, attr, value)


class _MetaWatch(TorchFunctionMode):
    """Refuses an op that makes a real tensor from a meta one, for the length of a call.

    torch's CPU matmuls (``mm``, ``addmm``, ``linear``...) take a meta operand beside a
    real one and return uninitialised memory without an error: a real input ``@`` a
    factory's plain tensor attribute (built on meta), or a meta tensor left in the
    mapping among real ones. Ops whose result stays meta (a shape probe, an embedding
    looked up with real ids) and ops whose result takes only a meta tensor's shape
    (``zeros_like``, ``view_as``) are answered as they are. Entered only for calls
    where such tensors exist, as :func:`_meta_watch` decides.
    """

    def __init__(self, module: nn.Module, names: dict[int, str]) -> None:
        super().__init__()
        self.module, self.names = module, names
        # The names of meta tensors that met tensors with values in an op whose
        # result stayed meta (einsum, an embedding): see refuse_meta_output.
        self.mixed: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FROM_REAL_ONLY or func in _SHAPE_ONLY:
            return out
        metas = _metas_among(args, kwargs)
        if not metas:
            return out
        named = sorted({self.names[id(t)] for t in metas if id(t) in self.names})
        results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not any(holds_values(t) for t in results):
            # What is made from a named one (readout.T) is named after it.
            if named:
                self.names.update((id(t), named[0]) for t in results if t.is_meta)
            if any(holds_values(t) for t in _input_tensors(args, kwargs)):
                self.mixed.update(named or ["a meta tensor"])
            return out
        what = ", ".join(named) if named else "a meta tensor"
        raise self._error(
            f"{_op_name(func)} made a real tensor from {what} (meta: no values), which torch "
            "computes from uninitialised memory",
            named,
        )

    def refuse_meta_output(self, out: Any) -> None:
        """Refuse a call given real tensors whose output is meta (no values) because an op
        met a meta tensor beside them (``torch.einsum`` with a factory's meta attribute):
        the output would fail later, in the loss, with torch's device error alone."""
        if self.mixed and any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_leaves(out)):
            named = sorted(self.mixed)
            what = ", ".join(named)
            raise self._error(
                f"the forward returned a meta tensor (no values), computed from {what} (meta) "
                "and tensors with values; the loss would fail on it with torch's device error",
                named,
            )

    def _error(self, what: str, named: list[str]) -> MetaTensorError:
        return MetaTensorError(
            f"MetaTemplate({type(self.module).__name__}): {what}. Fix: pass real tensors for "
            "every name of the mapping and every input (materialize or load them first), or "
            "meta ones only, for a shape probe. A plain tensor attribute of the template is "
            "neither: meta where a factory built it, real where MetaTemplate(module) kept its "
            "values (which a shape probe then meets); register it as a buffer "
            "(`self.register_buffer(name, t, persistent=False)`), so that the mapping gives "
            "it, or, for a factory's, pass a module instead.",
            paths=[n for n in named if n not in ("an input", "a meta tensor")],
        )


def _weights_with_values(mapping: Mapping[str, Any]) -> bool:
    """Whether a call's mapping holds floating-point tensors with values: not a shape
    probe, whose mapping may hold a real step count among meta weights."""
    return any(
        isinstance(t, torch.Tensor)
        and (t.is_floating_point() or t.is_complex())
        and holds_values(t)
        for t in mapping.values()
    )


def _metas_among(args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The meta tensors among an op's arguments. Runs on every op of a watched call: the
    arguments' own tensors and lists of them (``cat``) are looked at directly, anything
    deeper through a tree walk (which costs several microseconds per op)."""
    found: list[torch.Tensor] = []
    for arg in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(arg, torch.Tensor):
            if arg.is_meta:
                found.append(arg)
        elif isinstance(arg, (list, tuple)):
            for item in arg:
                if isinstance(item, torch.Tensor):
                    if item.is_meta:
                        found.append(item)
                elif isinstance(item, (list, tuple, dict)):
                    found += [
                        t for t in tree_leaves(item) if isinstance(t, torch.Tensor) and t.is_meta
                    ]
        elif isinstance(arg, dict):
            found += [t for t in tree_leaves(arg) if isinstance(t, torch.Tensor) and t.is_meta]
    return found


# Results that take only a tensor's shape, dtype and device from it.
_SHAPE_ONLY = frozenset(
    {
        torch.empty_like,
        torch.zeros_like,
        torch.ones_like,
        torch.full_like,
        torch.rand_like,
        torch.randn_like,
        torch.randint_like,
    }
)


def _op_name(func: Any) -> str:
    return str(getattr(func, "__name__", func))


def _meta_watch(
    layout: _Layout, metas: dict[int, str], given: Mapping[str, Any], inputs: Any
) -> _MetaWatch | None:
    """The watch for a call where meta tensors could meet real ones: plain meta tensors in
    the mapping (``metas``), in the template's plain attributes or among the inputs (a
    shape probe), and a real tensor in the mapping, the inputs or the template's plain
    attributes; ``None`` otherwise (most calls: no cost)."""
    leaves = _input_tensors(*inputs)
    names = {**layout.strays, **metas}
    names.update((id(t), "an input") for t in leaves if t.is_meta)
    if not names:
        return None
    if not layout.real_plain and not any(holds_values(t) for t in (*given.values(), *leaves)):
        return None
    return _MetaWatch(layout.modules[0], names)


def _input_tensors(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """The tensors among a call's inputs; runs on every strict call, so tensors given as
    they are (the common case) are taken without a tree walk."""
    found: list[torch.Tensor] = []
    for value in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            found += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
    return found


def _meta_plain(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every meta tensor reachable from ``module``'s plain attributes."""
    return [
        (f"{path}.{where}" if path else where, value)
        for path, where, value in _reachable(module, set())
        if isinstance(value, torch.Tensor) and value.is_meta
    ]


def _meta_outside_error(module: nn.Module, paths: list[str], e: Exception) -> MetaTensorError:
    return MetaTensorError(
        f"MetaTemplate({type(module).__name__}): the call met a meta tensor (torch: "
        f"{str(e).splitlines()[0]}), and the template holds {', '.join(map(repr, paths))} "
        "outside its parameters and buffers: meta tensors no call's mapping replaces (a "
        "list or a hook's argument referring to one of the module's own tensors is copied "
        "to meta with it). Fix: if the forward uses them, register them as buffers "
        "(`self.register_buffer(name, t, persistent=False)`), passed in the mapping like the "
        "others, or compute them in forward from the tensors passed in.",
        paths=paths,
    )


def _reassigned(
    module: nn.Module, caller: Mapping[str, torch.Tensor], given: dict[str, torch.Tensor]
) -> list[str]:
    """The names the forward assigned a new tensor to, from what ``torch.func.functional_call``
    wrote into ``given`` (a copy of ``caller``): not the template's own tensors, which it
    writes for the second name of a submodule registered twice."""
    changed = [k for k, v in given.items() if caller.get(k) is not v]
    if not changed:
        return []
    own = {id(t) for t in named_tensors(module).values()}
    return [k for k in changed if id(given[k]) not in own]


def _write_back(
    module: nn.Module,
    caller: Mapping[str, torch.Tensor],
    given: dict[str, torch.Tensor],
    replaced: list[str],
    source: nn.Module | None,
) -> None:
    """Hand the tensors the forward assigned to ``replaced`` names to the caller, as
    :func:`torch.func.functional_call` does: into the caller's mapping (under every name
    of the same tensor of the template: a submodule registered twice) and, for a
    :class:`TemplateState`, onto the module it was read from, as ``net(x)`` would."""
    if not isinstance(caller, MutableMapping):
        raise MetaTensorError(
            f"MetaTemplate({type(module).__name__})'s forward assigned new tensors to "
            f"{', '.join(map(repr, replaced))}, which cannot be written back into the "
            f"read-only {type(caller).__name__} it was called with (torch.func."
            "functional_call writes them into the dict it is given). Fix: pass a dict.",
            paths=replaced,
        )
    names = {s.path: [t.path for t in group] for group in tie_groups(module) for s in group}
    for name in replaced:
        for alias in names.get(name, [name]):
            if alias == name or alias in caller:
                caller[alias] = given[name]
    if source is None:
        return
    for name in replaced:
        prefix, _, leaf = name.rpartition(".")
        setattr(source.get_submodule(prefix), leaf, given[name])


class CheckpointingRefused(MetaTensorError):
    """A template call refused for activation checkpointing at ``paths`` (an ensemble
    says it in its own words)."""


def _refuse_checkpointing(layout: _Layout, call: Any) -> None:
    """Refuse a template whose forward recomputes activations in backward; ``call``: the
    call's tensors and inputs, whose gradients decide a DenseNet layer's checkpointing."""
    module = layout.modules[0]
    found = [path or "<root>" for path, sub in layout.checkpointing if _checkpoints(sub, call)]
    if found:
        raise CheckpointingRefused(
            f"MetaTemplate({type(module).__name__}) recomputes activations in backward "
            f"(activation checkpointing) at {', '.join(map(repr, found))}: the recomputation "
            "runs after the call, when the template holds its meta tensors again, and would "
            "fail with a device error. Fix: build the template from a module without "
            f"gradient checkpointing ({CHECKPOINTING_OFF}) and checkpoint outside the "
            "template call, e.g. `torch.utils.checkpoint.checkpoint(template, params, x, "
            "use_reentrant=False)`.",
            paths=found,
        )


#: how each switch _CHECKPOINT_FLAGS names is turned off
CHECKPOINTING_OFF = (
    "transformers' model.gradient_checkpointing_disable(), timm's "
    "model.set_grad_checkpointing(False), torchvision's DenseNet built with "
    "memory_efficient=False, or no checkpoint_wrapper"
)


def _checkpoints(sub: nn.Module, call: Any) -> bool:
    """Whether ``sub`` recomputes in backward what differs from a loop's, in a call with
    gradients, as its own switch says: transformers' in training; timm's in either mode
    where the call has gradients to compute; torchvision DenseNet's where its inputs
    require gradients, and under vmap (where they read ``requires_grad=False`` and it does
    not checkpoint) in training only: there the loop's recomputation advances BatchNorm's
    statistics a second time, in eval it changes nothing (a third look found eval-mode
    vmap refused, which ran as the loop before)."""
    if is_checkpoint_wrapper(sub):
        return True
    on = {f for f in _checkpoint_flags(sub) if vars(sub).get(f) is True}
    if "gradient_checkpointing" in on and sub.training:
        return True
    if not on.intersection(("grad_checkpointing", "memory_efficient")):
        return False
    # (under vmap a batched tensor reads requires_grad=False: the one it wraps says)
    graded = any(
        isinstance(t, torch.Tensor) and unwrapped(t).requires_grad for t in tree_leaves(call)
    )
    if "grad_checkpointing" in on and graded:
        return True
    # what the recomputation changes: a norm layer's statistics in training (a fourth
    # look: a DenseNet in eval with its BatchNorms in training, 0.14 off under vmap)
    tracking = any(m.training and getattr(m, "track_running_stats", False) for m in sub.modules())
    return graded and (tracking or not functorch_transform_active())


def _by_path(source: nn.Module) -> dict[str, nn.Module]:
    """``source``'s submodules by dotted path, found in one walk (``get_submodule`` per path
    cost most of ``state_from``): through ``torch.compile``'s wrapper, whose own paths
    start with ``_orig_mod.``; the root is ``source`` itself."""
    out = dict(without_dynamo_wrappers(source).named_modules())
    out[""] = source
    return out


def _at(subs: Mapping[str, nn.Module], source: nn.Module, path: str) -> nn.Module:
    """The submodule of ``source`` at ``path``: from ``subs`` (:func:`_by_path`), else found
    as ``get_submodule`` finds it (a second name of a module registered twice, a path
    through a compiled submodule); raises ``AttributeError`` where there is none."""
    found = subs.get(path)
    return found if found is not None else source.get_submodule(path)


def _modes_of(
    source: nn.Module, named: list[tuple[str, nn.Module]], subs: Mapping[str, nn.Module]
) -> dict[str, bool]:
    """The mode of each submodule of ``source`` at a path of the template's submodules
    ``named`` (``named_modules()``; ``subs``: ``source``'s, :func:`_by_path`).

    Found by path as :meth:`MetaTemplate.state_from` finds tensors, so a
    wrapper that reaches the same submodules by those paths (``torch.compile``'s
    ``OptimizedModule``, whose own names start with ``_orig_mod.``) gives them;
    a path it lacks is left out, for :func:`_modes_set` to name.

    Raises:
        MetaTensorError: a submodule of ``source`` runs other code than the template's
            (its class replaced after the template was made).
    """
    out: dict[str, bool] = {}
    replaced = []
    altered: list[tuple[str, str]] = []
    lacking = False
    for path, sub in named:
        try:
            theirs = _at(subs, source, path)
        except AttributeError:
            lacking = True
            continue
        out[path] = theirs.training
        # The root may be a wrapper that reaches the same submodules by the same paths
        # (Fabric's _FabricModule, torch.compile's OptimizedModule): not compared.
        if path and not _same_code(theirs, sub):
            replaced.append((path, theirs, sub))
        elif path or _same_code(theirs, sub):
            what = _altered(without_dynamo_wrappers(theirs), sub)
            if what is not None:
                altered.append((path, what))
    if altered and not replaced and not lacking:
        listed = ", ".join(f"{p!r} {w}" if p else f"the root {w}" for p, w in altered)
        raise MetaTensorError(
            f"MetaTemplate({type(named[0][1]).__name__}): the {type(source).__name__} given as "
            f"net (state_from(net), modes=net) differs from the module the template was "
            f"made from (changed since, or built otherwise): {listed}, so the call would not "
            "stand for net(x). Fix: make the template again from the module as it is now "
            "(lm.MetaTemplate(net)), or change the module before making the template.",
            paths=[p for p, _ in altered],
        )
    if replaced and not lacking:  # a module built otherwise: the caller names what it lacks
        listed = ", ".join(
            f"{p!r} is a {type(t).__name__} where the template has a {type(m).__name__}"
            + (
                " (another definition of that class, with another forward)"
                if type(t).__qualname__ == type(m).__qualname__
                else ""
            )
            for p, t, m in replaced
        )
        raise MetaTensorError(
            f"MetaTemplate({type(named[0][1]).__name__}): the {type(source).__name__} given as "
            f"net (state_from(net), modes=net) runs other code than the template: {listed} (a "
            "submodule replaced after the template was made, as "
            "SyncBatchNorm.convert_sync_batchnorm, so Trainer(sync_batchnorm=True), does), "
            "so the call would not stand for net(x). Fix: make the template again from the "
            "module as it is now (lm.MetaTemplate(net)), or pass a module built like the "
            "template.",
            paths=[p for p, _, _ in replaced],
        )
    return out


def _altered(theirs: nn.Module, sub: nn.Module) -> str | None:
    """How ``theirs`` differs from the template's ``sub`` beyond its code (``None``: it does
    not): a ``forward`` set on the instance or removed since (:func:`_moved_forward`), or
    a container whose forward, or its parent's, runs every member in turn
    (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) holding other members, one
    appended after the template was made, which the template does not run (before
    2026-12-07 the call went on without it: 0.04 off for a Tanh appended to a
    Sequential). Another module's submodules are not compared: one added beside a
    forward need not run (a parametrization's, a helper's). Nor are hooks: a call follows
    those that recompute a weight (pruning, weight norm), and others only watch
    (ModelSummary's counters)."""
    sub = without_dynamo_wrappers(sub)
    if "forward" in sub.__dict__ or "forward" in theirs.__dict__:
        moved = _moved_forward(_instance_forward(sub), _instance_forward(theirs))
        if moved is not None:
            return moved
    if not isinstance(sub, _CONTAINERS):
        return None
    mine = [name for name, _ in sub.named_children()]
    if [name for name, _ in theirs.named_children()] != mine:
        return "holds other modules than the template's"
    return None


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _moved_forward(mine: Any, given: Any) -> str | None:
    """How a ``forward`` set on ``net``'s instance (``given``, :func:`_instance_forward`)
    differs from the template's (``mine``): a hook library's (accelerate's
    ``add_hook_to_module``) set or removed since, or another partial or closure put in,
    which the template would not run."""
    if mine == given:
        return None
    if mine is None:
        return "has a forward set on the instance (as accelerate's add_hook_to_module sets)"
    if given is None:
        return "lost the forward the template's has set on the instance (a hook removed)"
    return "has another forward set on the instance than the template's"


def _instance_forward(module: nn.Module) -> Any:
    """What decides what a ``forward`` set on ``module`` itself runs, compared with ``==``
    (``None`` where none is set): the code of the function under partials and bound
    methods (accelerate's ``functools.partial(new_forward, module)``; a callable object's
    class) and the numbers and strings those hold (a partial's arguments, a closure's
    cells). Anything else they hold is compared by its type: the template's copy holds a
    copy of it, which a forward may change (a counter, a cache) or print otherwise."""
    forward = vars(module).get("forward")
    if forward is None:
        return None
    held: list[Any] = []
    while isinstance(forward, functools.partial):
        held += [*forward.args, *sorted(forward.keywords.items())]
        forward = forward.func
    if isinstance(forward, types.MethodType):
        held.append(forward.__self__)
        forward = forward.__func__
    for cell in getattr(forward, "__closure__", None) or ():
        try:
            held.append(cell.cell_contents)
        except ValueError:  # an empty cell
            held.append(None)
    code = forward.__code__ if isinstance(forward, types.FunctionType) else type(forward)
    return code, tuple(_held_key(v) for v in held)


_HELD_SCALARS = frozenset({int, float, complex, bool, str, bytes, type(None)})


def _held_key(value: Any) -> Any:
    """A value a forward holds, for :func:`_instance_forward`: a builtin number or string
    (exact types, whose ``repr`` is safe and tells ``-0.0`` and NaN apart), or a tuple of
    them, by type and ``repr``; anything else by its type alone."""
    kind = type(value)
    if kind in _HELD_SCALARS:
        return kind, repr(value)
    if kind is tuple and len(value) <= 64:
        return kind, tuple(_held_key(v) for v in value)
    return kind


def _same_code(theirs: nn.Module, sub: nn.Module) -> bool:
    """Whether ``theirs`` runs the code of the template's ``sub``: the same class, a subclass
    with the same ``forward`` (FSDP2's, a parametrization's), or the same class defined again
    with the same ``forward`` (a notebook cell run again). Another class (SyncBatchNorm for
    BatchNorm, GELU for ReLU) does not."""
    theirs = without_dynamo_wrappers(theirs)
    sub = without_dynamo_wrappers(sub)  # a submodule compiled before the template was made
    mine, given = type(sub), type(theirs)
    if given is mine or (isinstance(theirs, mine) and given.forward is mine.forward):
        return True
    if (given.__module__, given.__qualname__) != (mine.__module__, mine.__qualname__):
        return False
    code = getattr(given.forward, "__code__", None)
    if code is None or code != getattr(mine.forward, "__code__", None):
        return False
    # A class made by a function closes over its arguments (an activation given to it);
    # a forward calling super() closes over its own class (``__class__``).
    cells = [getattr(f, "__closure__", None) or () for f in (given.forward, mine.forward)]
    if len(cells[0]) != len(cells[1]):
        return False
    try:
        contents = [(a.cell_contents, b.cell_contents) for a, b in zip(*cells, strict=True)]
    except ValueError:  # an empty cell
        return False
    return all(a is b or (a is given and b is mine) for a, b in contents)


_MAKING_LOCKS = threading.Lock()  # one lock per template, made once (MetaTemplate._serialized)

_SETTING_TYPES = frozenset({bool, int, float, complex, str, type(None), torch.dtype})
# Followed from net by no call: activation checkpointing recomputes in backward, after the
# call, which a template refuses; it changes what is kept, not the values.
_NOT_FOLLOWED = frozenset({"gradient_checkpointing", "grad_checkpointing"})

#: a module's own switch for activation checkpointing (see _checkpoints for when each
#: applies): transformers' ``gradient_checkpointing``, timm's ``grad_checkpointing``
#: (``set_grad_checkpointing()``),
#: torchvision's DenseNet layers' ``memory_efficient`` (a name other libraries give to
#: other things: torchvision's only). Their forwards check it, and often whether the
#: activations require gradients too, which they do not under torch.vmap: a batched call
#: then skips the recomputation a loop runs (BatchNorm's running statistics advanced once
#: where the loop advances them twice), or runs it after vmap returned
_CHECKPOINT_FLAGS: tuple[str, ...] = ("gradient_checkpointing", "grad_checkpointing")


def _checkpoint_flags(module: nn.Module) -> frozenset[str]:
    """The names of ``module``'s own checkpointing switches it holds (see _CHECKPOINT_FLAGS)."""
    # tuples and a loop: torch 2.6's dynamo traces this and refuses set(frozenset)
    names = _CHECKPOINT_FLAGS
    if type(module).__module__.startswith("torchvision."):
        names = (*names, "memory_efficient")
    held = vars(module)
    return frozenset([n for n in names if n in held])


def _is_setting(value: Any) -> bool:
    """Whether ``value`` is a plain setting (a number, numpy's included, a string, ``None``,
    a dtype, or a tuple of them), which :func:`_settings_of` carries from the source module."""
    cls = type(value)
    if cls in _SETTING_TYPES or plain_number(value):
        return True
    return cls is tuple and all(type(v) in _SETTING_TYPES or plain_number(v) for v in value)


def _setting_name(key: str, value: Any) -> bool:
    """Whether a module's attribute ``key`` holding ``value`` is a public plain setting:
    private ones are left alone (torch's bookkeeping), and so are the names no call
    follows."""
    return (
        not key.startswith("_")
        and key not in MODULE_INTERNALS
        and key not in _NOT_FOLLOWED
        and _is_setting(value)
    )


def _setting_names(sub: nn.Module) -> tuple[str, ...]:
    """The names of the public plain settings in ``sub``'s own attributes.

    All of a module that keeps arrays in plain attributes are left alone: a cache,
    whose length or key its numbers may be (ESM's rotary ``seq_len_cached`` beside
    ``cos_cached``): the template keeps its own cache, and ``net``'s length without it
    made the template skip building one.
    """
    if _holds_tensors(sub):
        return ()
    return tuple(k for k, v in vars(sub).items() if _setting_name(k, v))


def _holds_tensors(sub: nn.Module) -> bool:
    """Whether ``sub`` keeps an array (a tensor, a numpy array: anything with
    ``__array__`` or ``__dlpack__``) in a plain attribute, or in a list, tuple or dict
    there, not as a parameter or buffer.

    The module's own parameters and buffers listed again are no cache: torch's RNNs
    keep theirs in ``_flat_weights``, which left none of an ``nn.LSTM``'s settings
    followed (its ``dropout`` changed on ``net``: 0.033 off, before 2026-12-07).
    """
    own: set[int] | None = None
    for k, v in vars(sub).items():
        if k in MODULE_INTERNALS:
            continue
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else (v,)
        for item in items:
            if not _is_array(item):
                continue
            if own is None:
                params, buffers = tensor_tables(sub)
                own = {id(t) for t in (*params.values(), *buffers.values()) if t is not None}
            if id(item) not in own:
                return True
    return False


def _is_array(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    cls = type(value)
    if cls in _SETTING_TYPES or isinstance(value, type):
        return False
    if not (hasattr(cls, "__array__") or hasattr(cls, "__dlpack__")):
        return False
    return not plain_number(value)  # numpy's scalars have __array__ too


def _settings_of(
    source: nn.Module, layout: _Layout, subs: Mapping[str, nn.Module]
) -> dict[str, dict[str, Any]]:
    """The plain settings of ``source``'s submodules that differ from the template's, by path.

    A callback changes them after the template was made (``StochasticWeightAveraging``
    sets BatchNorm's ``momentum`` to ``None``, ``BaseFinetuning.freeze`` its
    ``track_running_stats`` to ``False``): a call standing for ``source(x)`` runs with
    them, as it runs in ``source``'s modes (:func:`_modes_of`). A setting ``source``'s
    submodule gained since (a ``scale`` its forward reads with ``getattr(self, "scale",
    1.0)``) is carried too, and values are told apart as ``Ensemble`` tells them
    (:func:`differs`: by type and ``repr``, so ``0.0`` and ``-0.0`` differ).
    """
    out: dict[str, dict[str, Any]] = {}
    followed = layout.setting_table()
    for path, sub in layout.named():
        names = followed.get(path, ())
        try:
            theirs = _at(subs, source, path)
        except AttributeError:
            continue
        theirs = without_dynamo_wrappers(theirs)
        mine, given = vars(sub), vars(theirs)
        gained = given.keys() - mine.keys()
        if not names and not gained:
            continue
        if _holds_tensors(theirs):  # a cache net built since (see _setting_names)
            continue
        if not names and _holds_tensors(sub):
            continue
        for name in (*names, *sorted(gained)):
            value = given.get(name, _MISSING)
            if value is _MISSING or not _setting_name(name, value):
                continue
            held = mine.get(name, _MISSING)
            if held is _MISSING or (value is not held and differs(value, held)):
                out.setdefault(path, {})[name] = value
    return out


_MISSING = object()


@contextlib.contextmanager
def _modes_set(
    module: nn.Module, modes: Mapping[str, bool], settings: Mapping[str, Mapping[str, Any]]
) -> Iterator[None]:
    """Run the body with each submodule of ``module`` in ``modes[path]`` and with the
    plain ``settings[path]`` (:func:`_settings_of`), then put back its own."""
    subs = dict(module.named_modules())
    lacking = sorted(set(subs) - set(modes)) if modes else []
    if lacking:
        raise MetaTensorError(
            f"MetaTemplate({type(module).__name__}) was given modes that lack the submodule(s) "
            f"{', '.join(map(repr, lacking))}. Fix: pass modes=<the module the tensors come "
            "from>, built like the template, or the mapping template.state_from(module) returns.",
            paths=lacking,
        )
    # Set directly, as Lightning restores modes: train() recurses and may be overridden.
    # Only where it differs: nn.Module.__setattr__ costs a microsecond a module.
    saved = [(sub, sub.training) for sub in subs.values()]
    own: list[tuple[nn.Module, str, Any]] = []
    try:
        for path, sub in subs.items() if modes else ():
            if sub.training is not bool(modes[path]):
                sub.training = bool(modes[path])
        for path, values in settings.items():
            sub = subs.get(path)
            if sub is None:
                continue
            for name, value in values.items():
                # (a state of another template may name one this one lacks)
                own.append((sub, name, vars(sub).get(name, _MISSING)))
                setattr(sub, name, value)
        yield
    finally:
        for sub, name, value in reversed(own):
            if value is _MISSING:
                sub.__dict__.pop(name, None)
            else:
                setattr(sub, name, value)
        for sub, training in saved:
            if sub.training is not training:
                sub.training = training


def _closest(name: str, candidates: Mapping[str, object], n: int = 3) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)


class _MetaTemplateProperty(Generic[_T]):
    """Descriptor behind :func:`meta_template`."""

    def __init__(self, builder: Callable[[Any], nn.Module], cache: bool) -> None:
        self._builder = builder
        self._cache = cache
        self._name = builder.__name__
        functools.update_wrapper(self, builder)  # type: ignore[arg-type]

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _MetaTemplateProperty[_T]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> MetaTemplate: ...
    def __get__(
        self, instance: object | None, owner: type | None = None
    ) -> MetaTemplate | _MetaTemplateProperty[_T]:
        if instance is None:
            return self
        cached: dict[str, MetaTemplate] = instance.__dict__.setdefault("_meta_templates", {})
        template = cached.get(self._name) if self._cache else None
        if template is None:
            template = MetaTemplate(functools.partial(self._builder, instance))
            # The module is built; dropping the bound builder keeps the owner
            # out of the template, so pickling the template alone is cheap.
            template._factory = None
            if self._cache:
                cached[self._name] = template
        # Not a child module, so the owner's train()/eval() cannot reach the
        # template: follow the owner's mode on every access instead.
        return template.train(bool(getattr(instance, "training", True)))


@overload
def meta_template(builder: Callable[[Any], nn.Module], /) -> Any: ...
@overload
def meta_template(*, cache: bool = False) -> Callable[[Callable[[Any], nn.Module]], Any]: ...
def meta_template(
    builder: Callable[[Any], nn.Module] | None = None, /, *, cache: bool = False
) -> Any:
    """Turn a method that returns a fresh module into an attribute that yields a :class:`MetaTemplate`.

    Reading the attribute calls the method under ``torch.device("meta")`` and
    wraps the result in a :class:`MetaTemplate`, so the template is built on
    demand and never stored in the ``LightningModule``'s module tree,
    ``state_dict`` or checkpoint. Each access puts the whole template in the
    owner's mode (``owner.training``), so ``model.eval()`` reaches it when it
    is called with a plain mapping; called with ``template.state_from(net)``
    it runs each submodule in ``net``'s mode instead (a frozen BatchNorm of
    ``net`` stays in eval).

    .. warning::
        With ``cache=False`` every access builds a new module, so
        ``torch.compile`` recompiles on every call until its recompile limit.
        Under ``torch.compile`` use ``@lm.meta_template(cache=True)``.

    Args:
        builder: the method; it receives ``self`` and returns an ``nn.Module``.
        cache: build once per instance and keep it (``True``), or build on
            every access (``False``, the default: nothing is kept between
            accesses, so deep copies and pickles of the owner carry nothing).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import lightning_meta as lm
        >>> class HyperNet(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.hyper = nn.Linear(1, 3 * 2 + 2)
        ...
        ...     @lm.meta_template
        ...     def target(self):
        ...         return nn.Linear(3, 2)
        ...
        ...     def forward(self, z, x):
        ...         flat = self.hyper(z)
        ...         params = {"weight": flat[:6].view(2, 3), "bias": flat[6:]}
        ...         return self.target(params, x)
        >>> net = HyperNet()
        >>> net(torch.ones(1), torch.ones(4, 3)).shape
        torch.Size([4, 2])
        >>> [name for name, _ in net.named_parameters()]
        ['hyper.weight', 'hyper.bias']
    """

    def wrap(fn: Callable[[Any], nn.Module]) -> Any:
        if not callable(fn):
            raise ArgumentTypeError(
                f"@meta_template decorates a method returning an nn.Module, got "
                f"{type(fn).__name__}. Fix: put it on a `def name(self): return Module(...)`."
            )
        return _MetaTemplateProperty[Any](fn, cache)

    if builder is not None:
        return wrap(builder)
    return wrap
