"""Deferred initialisation: build on meta, record how, materialize exactly later.

The public entry points are :func:`deferred_init`, :func:`materialize` and
:func:`is_deferred`. Recording lives in ``_session`` and ``_recorder`` (with
``_values``, ``_lineage``, ``_rng``, ``_functions`` and ``_record_errors``),
the op log in ``_record``, replay in ``_replay`` and ``_materialize``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar, overload

import torch
from torch import nn

from lightning_meta import _compat
from lightning_meta._compat import FakeTensor, FakeTensorMode
from lightning_meta._deferred._handles import (
    Handle,
    attach,
    attach_item,
    deferred_slots,
    handle_of,
    mark_on_meta,
    rebuilt,
)
from lightning_meta._deferred._load_hooks import install_load_hooks
from lightning_meta._deferred._materialize import materialize
from lightning_meta._deferred._reach import MAX_DEPTH, MODULE_TABLES
from lightning_meta._deferred._record import Graded, Record
from lightning_meta._deferred._record_errors import caught_refusal, refusals_noted
from lightning_meta._deferred._recorder import Recorder
from lightning_meta._deferred._session import (
    PARAMETER_CLASS,
    close,
    fake_parameter_class,
    recording,
)
from lightning_meta._errors import ArgumentTypeError, MaterializationError
from lightning_meta._slots import Slot, buffer_names, children, parameter_names, slot_at

__all__ = ["deferred_init", "is_deferred", "materialize"]

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")


class _State(threading.local):
    recorder: Recorder | None = None


_ACTIVE = _State()


@overload
def deferred_init() -> contextlib.AbstractContextManager[None]: ...


@overload
def deferred_init(fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T: ...


def deferred_init(fn: Callable[..., Any] | None = None, /, *args: Any, **kwargs: Any) -> Any:
    """Build modules on meta while recording how every parameter and buffer is made.

    Inside the block tensors are fake (they report device ``cpu`` but hold no
    data), so model code runs its own initialisation exactly as it would
    eagerly; every ATen call is recorded, and random numbers are drawn for
    real (on scratch memory, one tensor at a time) so that every generator
    stands, inside the block and after it, where eager construction leaves
    it. When the block ends, every parameter, buffer and tensor attribute
    (also inside list, tuple and dict attributes) of the modules built in it
    is replaced by a meta tensor (``p.is_meta``) that :func:`materialize` can
    turn into the exact values eager construction with the same seed gives.
    Called with a callable, builds ``fn(*args, **kwargs)`` that way and
    returns its result.

    Args:
        fn: optional callable (a module class or factory) to build.
        *args: positional arguments for ``fn``.
        **kwargs: keyword arguments for ``fn``.

    Returns:
        A context manager without ``fn``; ``fn``'s result with it.

    Raises:
        ArgumentTypeError: ``fn`` is not callable, or arguments came without
            ``fn`` (also a ``TypeError``).
        MaterializationError: the construction reads the values of weights
            (``.item()`` on a random tensor outside a ``torch.nn.init``
            initialiser) or of uninitialised memory, uses an op with no fake
            kernel, converts a whole module (``.to()``; on recent torch even
            one that changes nothing: torch cannot swap fake parameters), writes into a
            real tensor captured from outside, or runs under
            ``torch.inference_mode()`` (also raised on entering the block
            under it); the message names the op, the ``file:line`` that
            issued it and the tensor's path.

    Example::

        >>> import torch, lightning_meta as lm
        >>> with lm.deferred_init():
        ...     net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> lm.is_deferred(net), net[0].weight.is_meta
        (True, True)
        >>> lm.materialize(net)[1].weight.sum().item()
        4.0

    .. warning::
        A tensor made in the block but kept elsewhere (a closure, a global
        list, a module built outside the block) has no values: any use of it
        after the block raises :class:`~lightning_meta.MetaTensorError`
        naming where it was made. Construction costs the time of eager
        construction's random draws (not its memory).
    """
    if fn is None:
        if args or kwargs:
            raise ArgumentTypeError(
                "deferred_init() got arguments but no callable. Fix: pass the module class "
                "or factory first, deferred_init(MyModel, ...), or use `with deferred_init():`."
            )
        return _block()
    if not callable(fn):
        raise ArgumentTypeError(
            f"deferred_init expects a callable (a module class or factory), got "
            f"{type(fn).__name__}. Fix: deferred_init(MyModel, *args) or `with deferred_init():`."
        )
    built: list[Any] = []
    with _block(built):
        built.append(fn(*args, **kwargs))
    return built[0]


@contextlib.contextmanager
def _block(built: list[Any] | None = None) -> Iterator[None]:
    """Record the body, then swap the built modules' fake tensors for deferred meta tensors."""
    if _ACTIVE.recorder is not None:
        yield  # nested: the outer block records everything
        return
    if torch.is_inference_mode_enabled():
        raise MaterializationError(
            "deferred_init cannot record under torch.inference_mode(): the tensors made there "
            "keep no version counter, which deferred tensors need to see a write after the "
            "block. Fix: enter the block outside torch.inference_mode() (materialize, then "
            "enter it), or wrap the block in torch.inference_mode(False)."
        )
    record = Record()
    # Entered inside torch.device("meta") (fabric.init_module(empty_init=True)):
    # every tensor is on meta, which materialize refuses (see check_deferred).
    record.outer_meta = _compat.default_device().type == "meta"
    # id of each fake tensor swapped for a deferred meta tensor -> its path (where a
    # reference to the fake kept elsewhere is named)
    converted: dict[int, Callable[[], str]] = {}
    recorder: Recorder | None = None
    failed: str | None = None
    try:
        with recording(record) as recorder, refusals_noted(recorder.refusals):
            _ACTIVE.recorder = recorder
            try:
                yield
            except RuntimeError as e:
                if "Uninitialized" in str(e) and "FakeTensor" in str(e):
                    # torch's own words name neither the module nor the fix.
                    raise MaterializationError(
                        "deferred_init cannot build lazy modules (nn.LazyLinear, "
                        "nn.LazyConv2d, ...): their UninitializedParameter has no shape until "
                        f"the first forward, so there is nothing to defer ({e}). Fix: give the "
                        "shapes (nn.Linear(in_features, ...)), or build the lazy module outside "
                        "deferred_init and run one forward first."
                    ) from e
                raise
            finally:
                _ACTIVE.recorder = None
            if recorder.refusals:
                raise caught_refusal(recorder.refusals[0]) from recorder.refusals[0]
        roots = list(recorder.modules.values())
        roots += [m for m in built or () if isinstance(m, nn.Module)]
        # the outermost modules built: no other built module holds them
        below = {id(m) for root in roots for m in root.modules() if m is not root}
        tops = [m for m in roots if id(m) not in below]
        owners = _convert(recorder, roots, tops, converted)
        # load_state_dict on these modules (or any ancestor) fills them; see _load_hooks.
        install_load_hooks(owners, tops=tops)
    except BaseException as e:
        try:
            said = str(e).strip().splitlines()
        except Exception:  # an exception whose __str__ raises stays the one raised
            said = []
        failed = type(e).__name__ + (f": {said[0][:200]}" if said else "")
        raise
    finally:
        if recorder is not None:
            close(recorder, converted, failed)
    logger.debug("deferred_init recorded %d ops", len(record.ops))


_FAKE_ATTRS: set[str] = set()
_META = torch.device("meta")


def _fake_attrs() -> set[str]:
    """The attributes a fake tensor (parameter) has of its own, not set by model code."""
    if not _FAKE_ATTRS:
        with FakeTensorMode():
            _FAKE_ATTRS.update(vars(torch.empty(0)))
        _FAKE_ATTRS.update({"_is_param", PARAMETER_CLASS})
    return _FAKE_ATTRS


def _own_attrs(t: torch.Tensor) -> dict[str, Any]:
    """Return attributes model code set on ``t`` (e.g. ``_is_hf_initialized``)."""
    own = _fake_attrs()
    return {k: v for k, v in vars(t).items() if k not in own and not isinstance(v, torch.Tensor)}


def _convert(
    recorder: Recorder,
    roots: list[nn.Module],
    tops: list[nn.Module],
    converted: dict[int, Callable[[], str]],
) -> list[nn.Module]:
    """Swap every fake tensor the built modules hold for a deferred meta tensor.

    ``tops`` are the outermost of ``roots``, by which a tensor a reference kept
    elsewhere was is named (``converted``: its id -> how to name it).

    Parameters, buffers, tensor attributes, and tensors inside list, tuple
    and dict attributes. Returns every module that owns deferred tensors.
    """
    record = recorder.record
    memo: dict[int, tuple[torch.Tensor, Handle | None]] = {}
    # Tensors kept with autograd history (value id, fake tensor); the fake
    # parameters, buffers and tensor attributes the modules hold, by id, to
    # their value ids.
    with_history: list[tuple[int, torch.Tensor]] = []
    held: dict[int, int] = {}
    # Tensors set on the block's tensors (``.grad``, tensor attributes), by path: refused.
    kept: list[str] = []

    # Module paths under the outermost modules built, walked once, when first asked
    # (a reference to a module's tensor kept elsewhere is named by its path at close).
    module_paths: dict[int, str] = {}

    def alias(owner: nn.Module, name: str) -> str:
        if not module_paths:
            for root in tops:
                for prefix, m in root.named_modules(remove_duplicate=False):
                    module_paths.setdefault(id(m), prefix)
        where = module_paths.get(id(owner))
        if where is None or (not where and len(tops) > 1):
            # one of several modules built apart (one dropped or replaced, maybe)
            where = type(owner).__name__
        return f"{where}.{name}" if where else name

    def kept_on(t: torch.Tensor, path: Callable[[], str]) -> None:
        if id(t) not in memo:
            kept.extend(_tensor_state(t, path))

    def meta_of(t: torch.Tensor) -> tuple[torch.Tensor, Handle | None, int]:
        meta, handle = memo.get(id(t), (None, None))
        vid = recorder.vid_at_exit(t)
        if meta is None:
            meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=_META)
            if isinstance(t, nn.Parameter):
                meta = _compat.make_subclass(fake_parameter_class(t), meta, t.requires_grad)
            elif t.requires_grad:
                meta.requires_grad_(True)
            for key, value in _own_attrs(t).items():
                setattr(meta, key, value)  # as on the tensor eager construction makes
            if meta.requires_grad and meta.grad_fn is None:
                # Gradient hooks registered in the block (``register_hook``) stay with
                # the parameter, as eagerly; materialize carries them on.
                _compat.install_grad_hooks(meta, _compat.grad_hook_tables(t))
            site = recorder.garbage_site(vid)
            if site is not None:
                record.garbage[vid] = site
            if t.grad_fn is not None:
                with_history.append((vid, t))
        return meta, handle, vid

    def convert(slot: Slot) -> bool:
        t = slot.tensor
        owner, name = slot.owner, slot.name

        def path() -> str:
            return _path_in(roots, owner, name)

        kept_on(t, path)
        meta, handle, vid = meta_of(t)
        converted.setdefault(id(t), functools.partial(alias, owner, name))
        if t.device.type == "meta" and not record.outer_meta:
            # Made on meta on purpose (device="meta", a torch.device("meta")
            # block inside, a MetaTemplate's factory): eager leaves it there.
            mark_on_meta(slot.owner, slot.name, meta)
            memo[id(t)] = (meta, None)
            slot.put(meta)
            return False
        handle = attach(record, slot.owner, slot.name, meta, vid, handle)
        # A plain tensor attribute counts too: ``self.log_t = torch.zeros(3,
        # requires_grad=True)`` is a leaf eager's ``self.log_t.exp()`` reaches.
        held[id(t)] = vid
        if slot.kind != "attr":
            owned = record.owned.setdefault(record.values[vid].storage, [])
            if vid not in owned:
                owned.append(vid)
        memo[id(t)] = (meta, handle)
        slot.put(meta)
        return True

    def convert_item(module: nn.Module, attr: str, keys: tuple[Any, ...], t: torch.Tensor) -> Any:
        def path() -> str:
            return _path_in(roots, module, attr) + "".join(f"[{k!r}]" for k in keys)

        kept_on(t, path)
        meta, handle, vid = meta_of(t)
        converted.setdefault(
            id(t), functools.partial(alias, module, attr + "".join(f"[{k!r}]" for k in keys))
        )
        if t.device.type == "meta" and not record.outer_meta:
            memo[id(t)] = (meta, None)
            return meta  # on meta on purpose, as above: no handle, stays meta
        handle = attach_item(record, module, attr, keys, meta, vid, handle)
        memo[id(t)] = (meta, handle)
        items[0] += 1
        return meta

    # Submodules can arrive without a registration hook (deepcopy in
    # nn.TransformerEncoder's _get_clones), so walk down from every tracked one.
    owners: list[nn.Module] = []
    items = [0]  # container items made deferred, counted by convert_item
    for module in _walk(roots).values():
        if isinstance(module, torch.jit.ScriptModule):
            _refuse_scripted(module, roots)
            continue  # a real one assigned in the block: eager keeps it as is
        before = items[0]
        deferred = [convert(slot) for slot in _fake_slots(module)]
        for attr, value in list(vars(module).items()):
            if (
                isinstance(value, _SEQUENCES)
                and attr not in MODULE_TABLES
                and not attr.startswith("_lightning_meta")
                and _holds_fake(value)
            ):
                module.__dict__[attr] = _convert_container(value, (), attr, module, convert_item)
        # A module holding meta tensors only (a shape-only helper, a
        # template's module) gets no load hooks: nothing of it is deferred.
        if any(deferred) or items[0] > before:
            owners.append(module)
    if kept:
        raise MaterializationError(
            f"deferred_init cannot keep tensors set on tensors of the block: {', '.join(kept)} "
            "(a .grad or a tensor-valued attribute set in the block); the materialized "
            f"tensors would come out without them. Fix: set them after materialize "
            f"(model.{kept[0]} = ...), or keep such tensors as buffers of the module.",
            paths=tuple(kept),
        )
    for vid, t in with_history:
        reached = {held[i] for i in _leaves(t) if i in held}
        if reached:
            # Its gradient reaches the modules' parameters in eager construction.
            views = [v for v in reached if record.values[v].storage == record.values[vid].storage]
            origin = views[0] if len(reached) == 1 and views else None
            record.graded[vid] = Graded(recorder.made_by(vid), origin)
    return owners


def _tensor_state(t: torch.Tensor, path: Callable[[], str]) -> list[str]:
    """The paths of a ``.grad`` and the tensor-valued attributes set in the block on ``t``.

    Eager construction keeps them (``p.grad = torch.zeros_like(p)`` preallocated,
    ``p.mask = ...`` read by a training loop); the deferred tensors carry
    neither, and an optimizer skipping a parameter without ``.grad`` or code
    reading ``getattr(p, "mask", None)`` would give other numbers.
    """
    own = _fake_attrs()
    names = [k for k, v in vars(t).items() if k not in own and isinstance(v, torch.Tensor)]
    if _grad_of(t) is not None:
        names.insert(0, "grad")
    if not names:
        return []
    where = path()
    return [f"{where}.{k}" for k in names]


def _grad_of(t: torch.Tensor) -> torch.Tensor | None:
    """``t.grad`` without torch's warning for a non-leaf (``self.w_t = self.lin.weight.t()``),
    which eager construction does not give, and which ``-W error`` makes an exception."""
    if t.is_leaf:
        return t.grad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return t.grad


def _refuse_scripted(module: torch.jit.ScriptModule, roots: Iterable[nn.Module]) -> None:
    """Refuse a TorchScript module scripted in the block (``torch.jit.script(nn.Linear(...))``)."""
    if any(isinstance(t, FakeTensor) for t in [*module.parameters(), *module.buffers()]):
        where = _path_in(roots, module, "").rstrip(".") or type(module).__name__
        raise MaterializationError(
            f"deferred_init cannot defer a TorchScript module: {where} was scripted in the "
            "block (torch.jit.script / torch.jit.trace), and its tensors live in TorchScript, "
            "where the block cannot make them real later. Fix: script it after materialize "
            f"(model.{where} = torch.jit.script(model.{where})), or build it outside the block "
            "and assign it there.",
            paths=(where,),
        )


def _path_in(roots: Iterable[nn.Module], owner: nn.Module, name: str) -> str:
    """The dotted path of ``owner``'s ``name`` under the outermost of ``roots`` holding ``owner``."""
    below = {id(m) for root in roots for m in root.modules() if m is not root}
    for root in [m for m in roots if id(m) not in below]:
        for prefix, module in root.named_modules(remove_duplicate=False):
            if module is owner:
                return f"{prefix}.{name}" if prefix else name
    return f"{type(owner).__name__}.{name}"


def _leaves(t: torch.Tensor, limit: int = 10_000) -> set[int]:
    """The ids of the leaf tensors ``t``'s autograd graph accumulates gradients into."""
    found: set[int] = set()
    todo: list[Any] = [t.grad_fn]
    # By id, with the node objects held: torch 2.6 makes a new Python object
    # for a node on each next_functions, and one freed lends its id to the
    # next (AccumulateGrad was skipped as seen).
    seen: dict[int, Any] = {}
    while todo and len(seen) < limit:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        variable = getattr(node, "variable", None)  # AccumulateGrad
        if isinstance(variable, torch.Tensor):
            found.add(id(variable))
        todo.extend(fn for fn, _ in node.next_functions)
    return found


_SEQUENCES = (list, tuple, dict)


def _holds_fake(value: Any, depth: int = 0, seen: set[int] | None = None) -> bool:
    """Whether the list, tuple or dict ``value`` holds a fake tensor (a few levels down).

    Each container is looked into once (``seen``): containers that refer to
    one another would otherwise cost their width to the power of the depth.
    """
    seen = set() if seen is None else seen
    if id(value) in seen:
        return False
    seen.add(id(value))
    items = value.values() if isinstance(value, dict) else value
    for item in items:
        kind = type(item)
        if kind is FakeTensor:
            return True
        if (
            depth < MAX_DEPTH
            and isinstance(item, _SEQUENCES)
            and _holds_fake(item, depth + 1, seen)
        ):
            return True
    return False


def _convert_container(
    value: Any,
    keys: tuple[Any, ...],
    attr: str,
    module: nn.Module,
    convert: Callable[[nn.Module, str, tuple[Any, ...], torch.Tensor], Any],
) -> Any:
    """Return ``value`` with its fake tensors (at any depth up to a few) made deferred."""
    if type(value) is FakeTensor:
        return convert(module, attr, keys, value)
    if len(keys) > MAX_DEPTH or not isinstance(value, _SEQUENCES) or not _holds_fake(value):
        return value
    entries = value.items() if isinstance(value, dict) else enumerate(value)
    changes = {
        key: _convert_container(item, (*keys, key), attr, module, convert) for key, item in entries
    }
    if isinstance(value, tuple):
        return rebuilt(value, [changes[i] for i in range(len(value))])
    for key, new in changes.items():
        if new is not value[key]:
            value[key] = new
    return value


def _fake_slots(module: nn.Module) -> list[Slot]:
    """Return ``module``'s own parameters, buffers and attributes that hold fake tensors."""
    names = [*parameter_names(module), *buffer_names(module)]
    names += [k for k, v in vars(module).items() if isinstance(v, FakeTensor)]
    slots = [slot_at(module, name) for name in names]
    return [s for s in slots if s is not None and isinstance(s.tensor, FakeTensor)]


def _walk(roots: Iterable[nn.Module]) -> dict[int, nn.Module]:
    """Return every module under ``roots``, by id, in the order of ``root.modules()`` walks.

    Same first-visit order as walking ``modules()`` of each root in turn, but a
    module already visited is not descended into again: its whole subtree was
    visited with it (tracked modules are nested, so plain walks are quadratic).
    """
    seen: dict[int, nn.Module] = {}
    for root in roots:
        stack = [root]
        while stack:
            module = stack.pop()
            if id(module) in seen:
                continue
            seen[id(module)] = module
            stack.extend(reversed(children(module)))
    return seen


def is_deferred(obj: nn.Module | torch.Tensor) -> bool:
    """Return whether ``obj`` still holds a deferred tensor.

    Args:
        obj: a module (checked with all its submodules) or a tensor.

    Returns:
        ``True`` while any tensor built under :func:`deferred_init` is still on
        meta and can be materialized; ``False`` once all are real, and for
        meta tensors that were never deferred.

    Raises:
        ArgumentTypeError: ``obj`` is neither a module nor a tensor (also a ``TypeError``).

    Example::

        >>> import torch, lightning_meta as lm
        >>> net = lm.deferred_init(torch.nn.Linear, 2, 2)
        >>> lm.is_deferred(net), lm.is_deferred(lm.materialize(net))
        (True, False)
    """
    if isinstance(obj, torch.Tensor):
        return handle_of(obj) is not None
    if isinstance(obj, nn.Module):
        return bool(deferred_slots(obj))
    raise ArgumentTypeError(
        f"is_deferred expects an nn.Module or a torch.Tensor, got {type(obj).__name__}. "
        "Fix: pass the module built under deferred_init, or one of its tensors."
    )
