"""Deferred initialisation: build on meta, record how, materialize exactly later.

The public entry points are :func:`deferred_init`, :func:`materialize` and
:func:`is_deferred`. Recording lives in ``_recorder`` (with ``_values``,
``_rng`` and ``_record_errors``), the op log in ``_record``, replay in
``_replay`` and ``_materialize``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar, overload

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from lightning_meta._compat import FakeTensor, FakeTensorMode, is_swap_refusal
from lightning_meta._deferred._handles import Handle, attach, handle_of
from lightning_meta._deferred._load_hooks import install_load_hooks
from lightning_meta._deferred._materialize import materialize
from lightning_meta._deferred._record import DEFAULT_STREAM, Record
from lightning_meta._deferred._recorder import Recorder
from lightning_meta._errors import ArgumentTypeError, MaterializationError
from lightning_meta._slots import Slot, buffer_names, children, iter_slots, parameter_names, slot_at

__all__ = ["deferred_init", "is_deferred", "materialize"]

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")


class _State(threading.local):
    recorder: Recorder | None = None


_ACTIVE = _State()
# The last block that advanced the generator only virtually: a block entered
# while the generator still sits where that one left it continues from its
# end, exactly as consecutive eager constructions would.
_LAST: list[weakref.ref[Record]] = []


@overload
def deferred_init() -> contextlib.AbstractContextManager[None]: ...


@overload
def deferred_init(fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T: ...


def deferred_init(fn: Callable[..., Any] | None = None, /, *args: Any, **kwargs: Any) -> Any:
    """Build modules on meta while recording how every parameter and buffer is made.

    Inside the block tensors are fake (they report device ``cpu`` but hold no
    data), so model code runs its own initialisation exactly as it would
    eagerly; every ATen call is recorded. When the block ends, every
    parameter and buffer registered inside it is replaced by a meta tensor
    (``p.is_meta``) that :func:`materialize` can turn into the exact values
    eager construction with the same seed gives. Called with a callable,
    builds ``fn(*args, **kwargs)`` that way and returns its result.

    Args:
        fn: optional callable (a module class or factory) to build.
        *args: positional arguments for ``fn``.
        **kwargs: keyword arguments for ``fn``.

    Returns:
        A context manager without ``fn``; ``fn``'s result with it.

    Raises:
        ArgumentTypeError: ``fn`` is not callable, or arguments came without
            ``fn`` (also a ``TypeError``).
        MaterializationError: the construction reads tensor values (``.item()``,
            data-dependent shapes), uses an op with no meta kernel, or writes
            into a real tensor captured from outside; the message names the
            op, the ``file:line`` that issued it and the tensor's path.

    Example::

        >>> import torch, lightning_meta as lm
        >>> with lm.deferred_init():
        ...     net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> lm.is_deferred(net), net[0].weight.is_meta
        (True, True)
        >>> lm.materialize(net)[1].weight.sum().item()
        4.0

    .. warning::
        Only tensors registered on modules (parameters, buffers, or tensor
        attributes of those modules) are converted; a tensor kept elsewhere
        (a closure, a plain list) stays a fake tensor and fails when used.
        Random draws from the global generator outside the block, between it
        and :func:`materialize`, see the generator as it was at entry. Inside
        the block the global CPU generator holds placeholder states (so that
        any reseed by the model, even to the seed already in use, is seen and
        replayed); ``torch.get_rng_state()`` read there is a placeholder, and
        restoring one read after a random draw (``torch.random.fork_rng``
        around a reseed) raises :class:`MaterializationError`.
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
    with _block():
        return fn(*args, **kwargs)


@contextlib.contextmanager
def _block() -> Iterator[None]:
    """Record the body, then swap the built modules' fake tensors for deferred meta tensors."""
    if _ACTIVE.recorder is not None:
        yield  # nested: the outer block records everything
        return
    prev = _chain_candidate()
    record = Record(prev)
    recorder = Recorder(record, chained=prev is not None)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    hooks = [
        register_module_parameter_registration_hook(recorder.track),
        register_module_buffer_registration_hook(recorder.track),
        register_module_module_registration_hook(recorder.track),
    ]
    _ACTIVE.recorder = recorder
    finished = False
    try:
        recorder.open()
        with warnings.catch_warnings():
            # torch's own Tensor.__deepcopy__ (nn.TransformerEncoder clones its
            # layer) probes data_ptr() of the fake tensors; harmless here.
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            with fake, recorder:
                try:
                    yield
                except RuntimeError as e:
                    if not is_swap_refusal(e):
                        raise
                    raise MaterializationError(
                        f"deferred_init cannot record Module.to()/.half()/.float() inside the "
                        f"block ({e}): torch cannot swap the fake tensors it builds on. Fix: "
                        "pass dtype= (and device=) to materialize, or convert after it."
                    ) from e
        finished = True
    finally:
        for hook in hooks:
            hook.remove()
        _ACTIVE.recorder = None
        try:
            if finished:
                owners = _convert(recorder, fake)
                # load_state_dict on these modules (or any ancestor) fills them; see _load_hooks.
                # Every module under the tracked ones that owns deferred tensors
                # (the only ones it hooks), so it need not walk the tree again.
                install_load_hooks(owners)
        finally:
            recorder.close(finished)
    if record.random_ops(DEFAULT_STREAM) or record.prev is not None:
        _LAST[:] = [weakref.ref(record)]
    logger.debug("deferred_init recorded %d ops", len(record.ops))


def _chain_candidate() -> Record | None:
    """Return the last block's record if the generator still sits where that block left it."""
    prev = _LAST[0]() if _LAST else None
    if prev is None or prev.pid != os.getpid() or prev.exit_state is None:
        return None
    if not torch.equal(torch.get_rng_state(), prev.exit_state):
        return None
    return prev


_FAKE_ATTRS: set[str] = set()
_META = torch.device("meta")


def _own_attrs(t: torch.Tensor) -> dict[str, Any]:
    """Return attributes model code set on ``t`` (e.g. ``_is_hf_initialized``)."""
    if not _FAKE_ATTRS:
        with FakeTensorMode():
            _FAKE_ATTRS.update(vars(torch.empty(0)))
        _FAKE_ATTRS.add("_is_param")
    return {
        k: v for k, v in vars(t).items() if k not in _FAKE_ATTRS and not isinstance(v, torch.Tensor)
    }


def _convert(recorder: Recorder, fake: FakeTensorMode) -> list[nn.Module]:
    """Swap every fake tensor on the recorded modules for a deferred meta tensor.

    Returns every module under the tracked ones that owns deferred tensors.
    """
    record = recorder.record
    memo: dict[int, tuple[torch.Tensor, Handle | None]] = {}

    def convert(slot: Slot) -> None:
        t = slot.tensor
        meta, handle = memo.get(id(t), (None, None))
        if meta is None:
            meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=_META)
            if isinstance(t, nn.Parameter):
                meta = nn.Parameter(meta, requires_grad=t.requires_grad)
            elif t.requires_grad:
                meta.requires_grad_(True)
        vid = recorder.vid_at_exit(t)
        handle = attach(record, slot.owner, slot.name, meta, vid, _own_attrs(t), handle)
        memo[id(t)] = (meta, handle)
        slot.put(meta)

    # Submodules can arrive without a registration hook (deepcopy in
    # nn.TransformerEncoder's _get_clones), so walk down from every tracked one.
    owners: list[nn.Module] = []
    for module in _walk(recorder.modules.values()).values():
        fakes = _fake_slots(module)
        for slot in fakes:
            convert(slot)
        if fakes:
            owners.append(module)
    return owners


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
        return any(handle_of(s.tensor) is not None for s in iter_slots(obj))
    raise ArgumentTypeError(
        f"is_deferred expects an nn.Module or a torch.Tensor, got {type(obj).__name__}. "
        "Fix: pass the module built under deferred_init, or one of its tensors."
    )
