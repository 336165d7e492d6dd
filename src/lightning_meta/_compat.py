"""The one door to private torch APIs.

Every use of a private torch name (``torch._*``, ``torch.*._*``, a private
attribute of a torch object) in this package goes through this module; a test
(``tests/architecture/test_private_api.py``) scans the package's source and
fails on any other. Each entry below says which torch versions it was checked
on and what breaks without it.

An API that is missing is not an ``ImportError`` at ``import lightning_meta``
nor an ``AttributeError`` deep inside a call: the placeholder raises
:class:`~lightning_meta.MetaTensorError` naming the torch version and the
feature that needs it, the first time that feature is used.

``nn.Module``'s own tables (``_parameters``, ``_buffers``, ``_modules``,
``_non_persistent_buffers_set``) are private too but are what torch's
``NamedMemberAccessor`` and ``torch.func`` themselves use; the package reads
and writes them through :mod:`lightning_meta._slots` only, which asks this
module for them.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import importlib
import inspect
import math
import re
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import nn

from lightning_meta._errors import MetaTensorError

if TYPE_CHECKING:
    from typing import TypeGuard

    from torch.distributed.tensor import DTensor

__all__ = [
    "default_device",
    "DataDependentOutputException",
    "DynamicOutputShapeException",
    "FakeTensor",
    "FakeTensorMode",
    "KeywordModuleTracker",
    "TorchDispatchMode",
    "UnsupportedFakeTensorException",
    "UnsupportedOperatorException",
    "active_fake_mode",
    "apply_to_tensors",
    "children_replaced",
    "is_dtensor",
    "is_subclass_refusal",
    "is_swap_refusal",
    "is_unallocated_read",
    "is_torch_meta_error",
    "is_weights_only_refusal",
    "is_share_memory_refusal",
    "lacks_fake_kernel",
    "quiet_fake_tensor_log",
    "state_bytes",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_map_only",
    "tree_unflatten",
    "buffers_of",
    "children_of",
    "structure_of",
    "dispatch_mode_active",
    "foreach_supported_devices",
    "functorch_disabled",
    "generator_overload",
    "non_persistent_of",
    "op_schema",
    "transformers_conversions",
    "transformers_runs_real_path",
    "outermost_transformers_models",
    "VECTORS_FLAG",
    "unwrapped",
    "is_weakref_swap_refusal",
    "call_writes",
    "parameters_of",
    "set_flop_module_tracker",
    "storage_id",
    "uncounted_attention_ops",
    "uncounted_rnn_ops",
    "version_of",
    "write_seed_bytes",
]

_FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (or a subclass).

    Imports nothing: where ``torch.distributed.tensor`` was never imported, no
    DTensor exists (the check runs on hot paths: every Ensemble call, every
    tensor a deferred model holds).
    """
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(t, cls)


def missing(api: str, feature: str) -> MetaTensorError:
    """Return the error raised when ``api`` does not exist in the running torch."""
    return MetaTensorError(
        f"{feature} needs {api}, which torch {torch.__version__} does not provide. "
        "Fix: install a torch version lightning-meta supports (see docs/guarantees.md)."
    )


def _placeholder(api: str, feature: str, base: type = object) -> Any:
    """A stand-in class for a missing ``api``: isinstance is False, construction raises."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        raise missing(api, feature)

    return type(api.rsplit(".", 1)[-1], (base,), {"__init__": __init__})


# -- fake tensors: deferred_init records under them, estimate runs under them.
# Checked on torch 2.6, 2.13, 2.14. Without them neither feature can work.
try:
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        FakeTensor,
        FakeTensorMode,
        UnsupportedFakeTensorException,
        UnsupportedOperatorException,
    )
except ImportError:  # pragma: no cover - only on a torch without fake tensors
    _WHERE = "torch._subclasses.fake_tensor"
    FakeTensor = _placeholder(f"{_WHERE}.FakeTensor", "deferred_init and estimate", torch.Tensor)  # type: ignore[misc]
    FakeTensorMode = _placeholder(f"{_WHERE}.FakeTensorMode", "deferred_init and estimate")  # type: ignore[misc]
    DataDependentOutputException = _placeholder(  # type: ignore[misc]
        f"{_WHERE}.DataDependentOutputException", "deferred_init", Exception
    )
    DynamicOutputShapeException = _placeholder(  # type: ignore[misc]
        f"{_WHERE}.DynamicOutputShapeException", "deferred_init", Exception
    )
    UnsupportedOperatorException = _placeholder(  # type: ignore[misc]
        f"{_WHERE}.UnsupportedOperatorException", "deferred_init", Exception
    )
    UnsupportedFakeTensorException = _placeholder(  # type: ignore[misc]
        f"{_WHERE}.UnsupportedFakeTensorException", "deferred_init", Exception
    )


class ClosedFakeMode(FakeTensorMode):
    """A fake mode whose work is done: every later op on one of its tensors raises.

    A finished mode is closed by giving it a subclass's ``__class__`` (its
    tensors keep pointing at it), which says why in :meth:`refusal`: a
    finished ``deferred_init`` block's mode, a finished estimate's. A fake
    tensor left outside them would otherwise make ``real + fake`` a fake tensor.
    """

    def refusal(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception:
        """The error for a call of ``func`` on one of this mode's tensors."""
        raise NotImplementedError

    def __torch_dispatch__(  # type: ignore[override]
        self,
        func: Any,
        types: Any,
        args: Any = (),
        kwargs: Any = None,
    ) -> Any:
        raise self.refusal(func, tuple(args), dict(kwargs or {}))


class OwnedFakeMode(FakeTensorMode):
    """A fake mode whose tensors are computed on in the thread that made it only.

    A dispatch mode is per thread: another thread's op on one of its tensors (model
    code initialising layers in a thread pool) reaches the mode through the tensor,
    past whatever the owner thread has stacked on top of it (``deferred_init``'s
    recorder), so it would go unrecorded. Such an op raises :meth:`refusal` instead.
    """

    owner: int = 0

    def refusal(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception:
        """The error for a call of ``func`` on one of this mode's tensors in another thread."""
        raise NotImplementedError

    def __torch_dispatch__(  # type: ignore[override]
        self,
        func: Any,
        types: Any,
        args: Any = (),
        kwargs: Any = None,
    ) -> Any:
        if threading.get_ident() != self.owner:
            raise self.refusal(func, tuple(args), dict(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


__all__ += ["ClosedFakeMode", "OwnedFakeMode"]

# -- dispatch modes: the recorder of deferred_init and estimate's memory tracker.
# Checked on torch 2.6, 2.13, 2.14.
try:
    from torch.utils._python_dispatch import TorchDispatchMode
except ImportError:  # pragma: no cover
    TorchDispatchMode = _placeholder(  # type: ignore[misc]
        "torch.utils._python_dispatch.TorchDispatchMode", "deferred_init and estimate"
    )


def dispatch_mode_active() -> bool:
    """Return whether any ``TorchDispatchMode`` (a FakeTensorMode, a recorder) is active.

    materialize and the load hooks refuse to run under one: the replay would
    produce fake tensors. Checked on torch 2.6, 2.13, 2.14.
    """
    length = getattr(torch._C, "_len_torch_dispatch_stack", None)
    if length is None:  # pragma: no cover
        raise missing("torch._C._len_torch_dispatch_stack", "materialize")
    return bool(length() > 0)


# torch's float32 precision per backend and op (``torch.backends.mkldnn.matmul.fp32_precision``
# and the like, torch 2.9+), parents before children: setting a parent sets its children.
# Checked on torch 2.13 and 2.15; torch 2.6 has none (its legacy getter says it all).
_FP32_GET = getattr(torch._C, "_get_fp32_precision_getter", None)
_FP32_SET = getattr(torch._C, "_set_fp32_precision_setter", None)


def _fp32_precision_pairs() -> tuple[tuple[str, str], ...]:
    if _FP32_GET is None or _FP32_SET is None:
        return ()
    pairs = []
    for backend, ops in (("generic", ("all",)), ("mkldnn", _FP32_OPS), ("cuda", _FP32_OPS)):
        for op in ops:
            try:
                _FP32_GET(backend, op)
            except (RuntimeError, ValueError, TypeError):  # a pair this torch does not know
                continue
            pairs.append((backend, op))
    return tuple(pairs)


_FP32_OPS = ("all", "matmul", "conv", "rnn")
_FP32_PAIRS = _fp32_precision_pairs()


def fp32_precisions() -> tuple[str, ...]:
    """torch's float32 precision of every backend and op (``"none"``, ``"bf16"``, ``"tf32"``) in
    a fixed order; ``()`` where torch has no such settings (before 2.9).

    They decide what a float32 matmul or convolution computes (oneDNN in bfloat16), and
    once one is set ``torch.get_float32_matmul_precision()`` raises ("mix of the legacy
    and new APIs"): deferred_init notes these instead, per recorded op.
    """
    get = _FP32_GET
    return tuple(get(backend, op) for backend, op in _FP32_PAIRS) if get is not None else ()


def set_fp32_precisions(values: tuple[str, ...]) -> None:
    """Make ``values`` (from :func:`fp32_precisions`) torch's float32 precisions."""
    get, put = _FP32_GET, _FP32_SET
    if get is None or put is None or len(values) != len(_FP32_PAIRS):
        return
    for (backend, op), value in zip(_FP32_PAIRS, values, strict=True):
        if get(backend, op) != value:
            put(backend, op, value)


__all__ += ["fp32_precisions", "set_fp32_precisions"]


def active_fake_mode() -> object | None:
    """Return the ``FakeTensorMode`` active in this thread, if any.

    deferred_init tells its own blocks' copies of real tensors from a user's
    fake mode by it. ``torch._C._get_dispatch_mode`` with the ``FAKE`` key;
    checked on torch 2.6, 2.13, 2.14.
    """
    get = getattr(torch._C, "_get_dispatch_mode", None)
    key = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "FAKE", None)
    if get is None or key is None:  # pragma: no cover
        raise missing("torch._C._get_dispatch_mode", "deferred_init")
    mode: object | None = get(key)
    return mode


@contextlib.contextmanager
def functorch_disabled() -> Iterator[None]:
    """Run the body outside any ``torch.func`` transform (vmap, grad).

    A template's factory may be first called inside ``vmap``; building its meta
    module there would wrap the tensors in batched tensors. Checked on torch
    2.6, 2.13, 2.14.
    """
    disable = getattr(torch._C, "_DisableFuncTorch", None)
    if disable is None:  # pragma: no cover
        raise missing("torch._C._DisableFuncTorch", "MetaTemplate factories")
    with disable():
        yield


def wrapper_subclass(t: torch.Tensor) -> bool:
    """Whether ``t`` is a traceable wrapper subclass (``DTensor``): a tensor without storage
    of its own, around others. Through ``torch.utils._python_dispatch`` (private; checked
    on torch 2.6, 2.13)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return bool(is_traceable_wrapper_subclass(t))


__all__ += ["wrapper_subclass"]


def storage_id(storage: torch.UntypedStorage) -> int:
    """Return the identity of a storage (its C pointer), shared by all its views.

    deferred_init tells aliasing tensors apart with it. Checked on torch 2.6,
    2.13, 2.14.
    """
    return int(storage._cdata)


def version_of(tensor: torch.Tensor) -> int:
    """Return the in-place version counter of ``tensor``.

    Deferred tensors modified after their block, and fallback initialisers that
    leave a tensor unwritten, are found with it. Checked on torch 2.6, 2.13, 2.14.
    """
    return int(tensor._version)


# ATen ops whose kernels write arguments their schema does not mark as written:
# the batch-norm kernels update the running statistics in place when
# ``training`` is true (``native_batch_norm(..., Tensor? running_mean, ...)``;
# its successors ``_native_batch_norm_legit`` and ``_batch_norm_with_update``
# say ``Tensor(a!)``). ``nn.BatchNorm*`` and ``InstanceNorm*(track_running_stats
# =True)`` reach ``native_batch_norm`` on the CPU on torch 2.6 to 2.15.
_RUNNING_STATS = ((3, "running_mean"), (4, "running_var"))
_UNDECLARED_WRITES: dict[str, tuple[tuple[int, str], tuple[tuple[int, str], ...]]] = {
    name: ((5, "training"), _RUNNING_STATS)
    for name in (
        "aten::native_batch_norm",
        "aten::_batch_norm_impl_index",
        "aten::cudnn_batch_norm",
        "aten::miopen_batch_norm",
    )
}


@functools.cache
def op_schema(func: Any) -> tuple[tuple[tuple[int, str], ...], bool]:
    """Return ``(written arguments as (index, name), returns a tensor)`` of an ATen overload.

    The recorder needs the mutated arguments of each op: those the schema
    marks (``Tensor(a!)``), and those a kernel writes without saying so
    (:func:`call_writes` says which a call writes). Checked on torch 2.6,
    2.13, 2.14, 2.15.
    """
    schema = func._schema
    writes = tuple(
        (i, a.name)
        for i, a in enumerate(schema.arguments)
        if a.alias_info is not None and a.alias_info.is_write
    )
    undeclared = _UNDECLARED_WRITES.get(schema.name)
    if undeclared is not None:
        writes += tuple(w for w in undeclared[1] if w not in writes)
    return writes, any("Tensor" in str(r.type) for r in schema.returns)


def call_writes(
    func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[tuple[int, str], ...]:
    """The arguments of :func:`op_schema`'s that this call of ``func`` writes: a batch
    norm's running statistics only when it runs with ``training=True``."""
    writes = op_schema(func)[0]
    undeclared = _UNDECLARED_WRITES.get(func._schema.name)
    if undeclared is None:
        return writes
    (index, name), conditional = undeclared
    flag = args[index] if index < len(args) else kwargs.get(name)
    return writes if flag else tuple(w for w in writes if w not in conditional)


@functools.cache
def generator_overload(func: Any) -> tuple[str, int | None] | None:
    """Where random ATen overload ``func`` takes a generator: ``(overload to run, index)``.

    ``index`` is its positional index, ``None`` when keyword-only; the result
    is ``None`` for an op taking none in any overload (``native_dropout``).
    ``randn.default`` and the like take none, but a sibling overload with
    the same arguments plus ``generator`` (``randn.generator``) does: the
    same kernel, drawing from the generator given. Replay hands each random
    op a generator of its own. Reads ``OpOverload._schema`` and
    ``_overloadpacket``; checked on torch 2.6, 2.13.
    """
    packet = func._overloadpacket
    namespace, base, overload = str(func).split(".")
    own = [a.name for a in func._schema.arguments]
    for candidate in (overload, *packet.overloads()):
        args = getattr(packet, candidate)._schema.arguments
        names = [a.name for a in args]
        if "generator" not in names:
            continue
        if candidate != overload and [n for n in names if n != "generator"] != own:
            continue
        index = names.index("generator")
        return f"{namespace}.{base}.{candidate}", None if args[index].kwarg_only else index
    return None


def write_seed_bytes(state: torch.Tensor, head: bytes) -> None:
    """Overwrite the first bytes of a CPU generator state tensor in place.

    Bytes 0-7 of a CPU state are its initial seed, which ``set_state`` keeps as
    is; the recorder stores a draw counter there once per draw from the global
    generator, so this stays a single ``memmove``. Relies on the CPU state
    layout, checked on torch 2.6, 2.13, 2.14.
    """
    ctypes.memmove(state.data_ptr(), head, len(head))


def foreach_supported_devices() -> list[str]:
    """Return the device types on which optimizers pick ``foreach`` kernels by default.

    estimate sets that choice explicitly (fake parameters would make torch
    fall back to single-tensor kernels). Checked on torch 2.6, 2.13, 2.14.
    """
    from torch.optim import optimizer as optim_module

    get = getattr(optim_module, "_get_foreach_kernels_supported_devices", None)
    if get is None:  # pragma: no cover
        raise missing("torch.optim.optimizer._get_foreach_kernels_supported_devices", "estimate")
    return list(get())


def apply_to_tensors(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Call ``Module._apply(fn)``: map every parameter and buffer, keeping Parameter objects.

    ``fully_shard`` modules re-register their sharded parameters in their own
    ``_apply``, which a plain walk would skip. Checked on torch 2.6, 2.13, 2.14.
    """
    module._apply(fn)  # type: ignore[no-untyped-call]


def parameters_of(module: nn.Module) -> dict[str, nn.Parameter | None]:
    """``module._parameters``: the module's own parameter table (used by ``_slots`` only)."""
    return module._parameters


def buffers_of(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """``module._buffers``: the module's own buffer table (``_slots``; Ensemble's loop reads
    it to see a buffer a forward replaced)."""
    return module._buffers


def non_persistent_of(module: nn.Module) -> set[str]:
    """``module._non_persistent_buffers_set``: buffers ``state_dict`` leaves out."""
    return module._non_persistent_buffers_set


def structure_of(
    modules: Sequence[nn.Module],
) -> tuple[list[type], list[nn.Module | None], list[torch.Tensor | None]]:
    """Every module's class, every child and every parameter of ``modules``, flat, in table
    order: what Ensemble compares on every call to see its template as built, read from
    ``_modules`` and ``_parameters`` directly (two function calls per module cost as much
    as the comparison)."""
    return (
        [type(m) for m in modules],
        [c for m in modules for c in m._modules.values()],
        [p for m in modules for p in m._parameters.values()],
    )


def children_of(module: nn.Module) -> dict[str, nn.Module | None]:
    """``module._modules``: the module's own child table, in registration order.

    Read on every call by the checks that follow a template's changes:
    ``children()`` is a Python generator per module.
    """
    return module._modules


@contextlib.contextmanager
def quiet_fake_tensor_log() -> Iterator[None]:
    """Silence FakeTensorMode's own traceback log while the caller re-raises the error named."""
    import logging

    logger = logging.getLogger(_FAKE_TENSOR_LOGGER)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- pytrees: flattening nested inputs and outputs. Checked on torch 2.6, 2.13, 2.14.
try:
    from torch.utils._pytree import (
        tree_flatten,
        tree_leaves,
        tree_map,
        tree_map_only,
        tree_unflatten,
    )
except ImportError:  # pragma: no cover

    def _no_pytree(*args: Any, **kwargs: Any) -> Any:
        raise missing("torch.utils._pytree", "Ensemble and estimate")

    tree_flatten = tree_leaves = tree_map = tree_map_only = tree_unflatten = _no_pytree


# -- FLOP counting: estimate attributes FLOPs to modules with a module tracker.
# Checked on torch 2.6, 2.13, 2.14.
try:
    from torch.autograd.graph import register_multi_grad_hook
    from torch.utils.module_tracker import ModuleTracker

    class KeywordModuleTracker(ModuleTracker):
        """A ``ModuleTracker`` that also sees tensors passed to a module by keyword.

        torch's tracker leaves a module's backward when the gradients of its
        *positional* tensor inputs are ready; a module called with keywords
        only (``self.self_attn(hidden_states=h, ...)`` in transformers) is then
        never left, and every later backward FLOP is counted to it as well.
        Here the exit hook is placed after the forward, on positional and
        keyword inputs alike; totals are unchanged, per-module backward FLOPs
        become each module's own. Uses the tracker's private ``_get_*`` helpers.
        """

        def _fw_pre_hook(self, mod: nn.Module, input: Any) -> None:
            self._get_append_fn(self._get_mod_name(mod), False)()

        def _fw_post_hook_kw(self, mod: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            name = self._get_mod_name(mod)
            self._get_pop_fn(name, False)()
            for tensors, fn in (
                (tree_leaves((args, kwargs)), self._get_pop_fn(name, True)),
                (tree_leaves(output), self._get_append_fn(name, True)),
            ):
                needs_grad = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
                if needs_grad:
                    self._hooks.append(register_multi_grad_hook(needs_grad, fn))

        def __init__(self, root: nn.Module | None = None) -> None:
            super().__init__()
            #: with a root, hooks go on its modules rather than on every module:
            #: global module hooks make ``torch.compile``'d modules warn
            self._root = root
            self._module_handles: list[Any] = []

        def __enter__(self) -> KeywordModuleTracker:
            if self._root is None:
                self._fw_pre_handle = nn.modules.module.register_module_forward_pre_hook(
                    self._fw_pre_hook
                )
                self._fw_post_handle = nn.modules.module.register_module_forward_hook(
                    self._fw_post_hook_kw, with_kwargs=True
                )
                return self
            # prepend: before the module's own hooks, where global hooks run
            for m in self._root.modules():
                self._module_handles.append(
                    m.register_forward_pre_hook(self._fw_pre_hook, prepend=True)
                )
                self._module_handles.append(
                    m.register_forward_hook(self._fw_post_hook_kw, with_kwargs=True, prepend=True)
                )
            return self

        def __exit__(self, *args: Any) -> None:
            if self._root is None:
                super().__exit__(*args)
                return
            for handle in (*self._module_handles, *self._hooks):
                handle.remove()
            self._module_handles.clear()
            self._hooks.clear()

except ImportError:  # pragma: no cover
    KeywordModuleTracker = _placeholder("torch.utils.module_tracker.ModuleTracker", "estimate")  # type: ignore[misc]


def set_flop_module_tracker(counter: Any, tracker: Any) -> None:
    """Make ``FlopCounterMode`` attribute FLOPs with ``tracker`` (its ``mod_tracker`` attribute).

    Checked on torch 2.6, 2.13, 2.14; without it per-module backward FLOPs of
    modules called by keyword are attributed to every enclosing module.
    """
    if not hasattr(counter, "mod_tracker"):  # pragma: no cover
        raise missing("FlopCounterMode.mod_tracker", "estimate")
    counter.mod_tracker = tracker


def uncounted_attention_ops() -> dict[Any, str]:
    """Return the ATen attention overloads ``FlopCounterMode`` counts as 0, by kind.

    ``"forward"`` or ``"backward"``; estimate counts them itself, in a field of
    their own. Overloads a torch version lacks, and those its counter has a
    formula for (torch 2.15 counts the CPU flash kernel), are left out, so
    no FLOP is counted twice (checked on torch 2.6, 2.13, 2.14, 2.15).
    """
    return _uncounted(
        {
            "_scaled_dot_product_flash_attention_for_cpu": "forward",
            "_scaled_dot_product_flash_attention_for_cpu_backward": "backward",
            "_scaled_dot_product_fused_attention_overrideable": "forward",
            "_scaled_dot_product_fused_attention_overrideable_backward": "backward",
        }
    )


def uncounted_rnn_ops() -> dict[Any, str]:
    """Return the ATen fused RNN kernels (LSTM/GRU/RNN layers) ``FlopCounterMode`` counts as
    0, by kind (``"forward"`` or ``"backward"``).

    ``nn.LSTM`` on the CPU runs ``mkldnn_rnn_layer`` (one call per layer and
    direction), on CUDA ``_cudnn_rnn`` (or ``miopen_rnn``): single kernels the
    counter has no formula for, while ``nn.GRU`` on the CPU decomposes into
    matmuls it counts. Overloads a torch version lacks or counts are left out
    (checked on torch 2.6, 2.13, 2.14).
    """
    return _uncounted(
        {
            "mkldnn_rnn_layer": "forward",
            "mkldnn_rnn_layer_backward": "backward",
            "_cudnn_rnn": "forward",
            "_cudnn_rnn_backward": "backward",
            "miopen_rnn": "forward",
            "miopen_rnn_backward": "backward",
        }
    )


def scratch_kernel_ops() -> dict[Any, str]:
    """Return the ATen overloads whose CPU kernels allocate scratch tensors inside themselves.

    A dispatch mode sees only an operator's outputs; these kernels also
    allocate, through torch's allocator and freed before they return, what
    no fake run sees: the slow (non-oneDNN) convolutions their im2col
    ``columns`` (``ConvolutionMM2d.cpp``, ``ConvolutionMM3d.cpp``,
    ``NaiveDilatedConvolution.cpp``, ``NaiveConvolutionTranspose2d.cpp``),
    oneDNN's convolutions their operands reordered into blocked layouts,
    the CPU flash attention its per-thread ``buf`` and contiguous copies of
    its inputs (``cpu/FlashAttentionKernel.cpp``). By kind: ``"conv"``,
    ``"conv_backward"``, ``"flash"``, ``"flash_backward"``; overloads a
    torch version lacks are left out (checked on torch 2.6 and 2.13).
    """
    names = {
        "convolution": "conv",
        "convolution_backward": "conv_backward",
        "_scaled_dot_product_flash_attention_for_cpu": "flash",
        "_scaled_dot_product_flash_attention_for_cpu_backward": "flash_backward",
    }
    out: dict[Any, str] = {}
    for name, kind in names.items():
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            out[packet.default] = kind
    return out


def cpu_conv_uses_onednn(dtype: torch.dtype, batch: int, pointwise: bool) -> bool:
    """Whether a CPU convolution of ``dtype`` runs in oneDNN (or else the slow im2col kernels).

    Mirrors ``use_mkldnn`` in ``aten/src/ATen/native/Convolution.cpp``
    conservatively: ``float32`` with a batch of more than 1 and a kernel
    that is not 1x1 with stride 1 (``pointwise``) or a batch of 16 or more, and
    ``bfloat16`` where the CPU supports oneDNN's bf16
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``); every other call is
    taken to run the slow kernels (a bound, never a miss). Checked with the
    profiler on torch 2.13: float32 batch 1 and float16 run
    ``_slow_conv2d_forward``, float32 batch 4 and bfloat16 ``mkldnn_convolution``.
    """
    mkldnn = torch.backends.mkldnn
    if not (mkldnn.is_available() and mkldnn.enabled):
        return False
    if dtype == torch.float32:
        return batch > 1 and (not pointwise or batch >= 16)
    if dtype == torch.bfloat16:
        supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(supported is not None and supported())
    return False


__all__ += ["cpu_conv_uses_onednn", "scratch_kernel_ops"]


def _uncounted(names: dict[str, str]) -> dict[Any, str]:
    """The default overloads of the ATen ops ``names`` (name -> kind) that this torch has
    and ``FlopCounterMode`` has no formula for (it looks them up by overload packet)."""
    from torch.utils import flop_counter

    counted = flop_counter.flop_registry
    out: dict[Any, str] = {}
    for name, kind in names.items():
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and packet not in counted and packet.default not in counted:
            out[packet.default] = kind
    return out


# -- errors torch reports only in their text. Each check below reads a message
# torch writes; checked on torch 2.6, 2.13, 2.14. If torch rewords one, the
# check answers False and the caller re-raises torch's own error unchanged.


def is_torch_meta_error(e: BaseException) -> bool:
    """Whether torch raised ``e`` because a meta tensor was used as data ("Cannot copy out of meta tensor")."""
    text = str(e).lower()
    return "meta tensor" in text or "meta device" in text


def lacks_fake_kernel(e: BaseException) -> bool:
    """Whether ``e`` says an op has no fake/meta kernel (not an error eager code raises too).

    The dispatcher's "Could not run 'aten::_empty_affine_quantized' with
    arguments from the 'QuantizedMeta' backend" is one too: a quantized
    tensor on meta, which eager (on the CPU) makes.
    """
    text = str(e).lower()
    if "could not run" in text and "meta' backend" in text:
        return True
    return "fake impl" in text or "meta kernel" in text or "fake tensor" in text


def is_swap_refusal(e: BaseException) -> bool:
    """Whether ``e`` is ``Module._apply`` refusing to swap tensors (``.to()`` of fake tensors)."""
    return "Couldn't swap" in str(e)


def is_weakref_swap_refusal(e: BaseException) -> bool:
    """Whether ``e`` is ``torch.utils.swap_tensors`` refusing a tensor something holds a weak
    reference to ("Cannot swap t1 because it has weakref associated with it")."""
    text = str(e)
    return text.startswith("Cannot swap t") and "weakref" in text


def is_unallocated_read(e: BaseException) -> bool:
    """Whether ``e`` is torch's C++ reading a fake tensor's data (``torch.tensor([fake, ...])``)."""
    return "data is not allocated yet" in str(e)


def is_subclass_refusal(e: BaseException) -> bool:
    """Whether ``e`` is torch refusing to make a tensor subclass of a fake tensor (``as_subclass``)."""
    text = str(e)
    return "Creating a new Tensor subclass" in text and "FakeTensor" in text


def is_share_memory_refusal(e: BaseException) -> bool:
    """Whether ``e`` is torch refusing to move a fake tensor's storage to shared memory
    (``Tensor.share_memory_()``, ``Module.share_memory()``: "_share_fd_: only available on
    CPU"; ``_share_filename_`` under the file-system sharing strategy)."""
    text = str(e)
    return ("_share_fd_" in text or "_share_filename_" in text) and "only available on" in text


def is_weights_only_refusal(e: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a global (not a corrupt file)."""
    return "Weights only load failed" in str(e)


def state_bytes(state: torch.Tensor) -> bytes:
    """Return the raw bytes of a (CPU, contiguous uint8) generator state tensor, without a copy to numpy."""
    return ctypes.string_at(state.data_ptr(), state.nbytes)


@contextlib.contextmanager
def children_replaced(module: nn.Module, table: dict[str, nn.Module | None]) -> Iterator[None]:
    """Give ``module`` the child table ``table`` for the body, then restore its own.

    estimate runs a stack of identical blocks cut to its first ``k`` blocks
    this way (``nn.ModuleList`` iterates its table); no module is copied.
    """
    saved = module._modules
    module._modules = table
    try:
        yield
    finally:
        module._modules = saved


# -- running a real kernel from inside a dispatch mode. estimate checks, on tiny
# real tensors, that the real kernel accepts the dtypes a fake kernel let
# through (meta kernels skip many dtype checks). Checked on torch 2.6, 2.13, 2.14.
try:
    from torch.utils._python_dispatch import _disable_current_modes as _no_modes
except ImportError:  # pragma: no cover
    _no_modes = None  # type: ignore[assignment]


def default_device() -> torch.device:
    """The device factory functions build on now: the innermost ``torch.device(...)``
    context, else ``torch.set_default_device``'s.

    Before torch 2.8, ``torch.get_default_device()`` sees only the latter (a
    ``with torch.device("meta")`` block, as ``fabric.init_module(empty_init=True)``
    enters, answers ``cpu``); the context is a ``DeviceContext`` mode on the
    function-mode stack (checked on torch 2.6, 2.13, 2.14).
    """
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._device import DeviceContext

    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, DeviceContext):
            return torch.device(mode.device)
    return torch.get_default_device()


@contextlib.contextmanager
def no_dispatch_modes() -> Iterator[None]:
    """Run the body with every ``TorchDispatchMode`` (fake, FLOP counter, trackers) switched off.

    The modes are restored afterwards; tensors made in the body are real.
    """
    if _no_modes is None:  # pragma: no cover
        raise missing("torch.utils._python_dispatch._disable_current_modes", "estimate")
    with _no_modes():
        yield


def is_dtype_refusal(e: BaseException, *, cpu_only_gaps: bool) -> bool:
    """Whether a real kernel raised ``e`` because of the dtype of an input.

    ``cpu_only_gaps=False`` leaves out "not implemented for 'Half'" and the
    like: reduced-precision dtypes some CPU kernels lack and accelerator
    kernels have. An operator missing for the whole backend ("Could not run
    'aten::...'") is not a dtype refusal.
    """
    import re

    text = str(e)
    if "Could not run '" in text:
        return False
    gap = re.search(r"not implemented for '([^']+)'", text)
    if gap is not None:
        reduced = ("Half", "BFloat16", "ComplexHalf", "Float8")
        return cpu_only_gaps or not gap.group(1).startswith(reduced)
    pattern = r"dtype|scalar ?type|datatype|data type|type \(|indices must be|must be long"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


__all__ += ["is_dtype_refusal", "no_dispatch_modes"]


# -- loading: checks made before a checkpoint's tensors replace a module's.
# Checked on torch 2.13; without them a bad target is refused only when torch
# itself raises, half way through putting tensors in place.


def can_set_data(old: torch.Tensor, new: torch.Tensor) -> bool:
    """Whether ``old.data = new`` is allowed (``torch._has_compatible_shallow_copy_type``)."""
    check = getattr(torch, "_has_compatible_shallow_copy_type", None)
    if check is None:  # pragma: no cover
        return old.layout == new.layout and type(old) in (torch.Tensor, nn.Parameter)
    return bool(check(old, new))


def has_internal_overlap(tensor: torch.Tensor) -> bool:
    """Whether elements of ``tensor`` share memory (an expanded view), so ``copy_`` into it fails.

    ``torch._debug_has_internal_overlap`` answers 0 (no), 1 (yes) or 2 (too
    hard to tell, which ``copy_`` accepts).
    """
    check = getattr(torch, "_debug_has_internal_overlap", None)
    if check is None:  # pragma: no cover
        return any(s == 0 and n > 1 for s, n in zip(tensor.stride(), tensor.shape, strict=True))
    return int(check(tensor)) == 1


__all__ += ["can_set_data", "has_internal_overlap"]


# -- sharding: slicing a full tensor every rank holds into this rank's shard.


def local_shard(full: torch.Tensor, mesh: Any, placements: Any) -> torch.Tensor:
    """Return this rank's local piece of ``full`` under ``placements`` on ``mesh``.

    Each rank slices the full tensor it holds, with no communication, as
    eager ``fully_shard`` keeps each rank's own chunk of its own tensor (with
    a seed per rank, rank 0's would be another number): torch >= 2.7 by
    ``distribute_tensor(..., src_data_rank=None)``. torch 2.6 has no
    ``src_data_rank`` (its ``distribute_tensor`` scatters rank 0's copy):
    there the full tensor is declared replicated and redistributed, which
    slices locally, the same pieces (checked against ``src_data_rank=None``
    on torch 2.13 and against ``torch.chunk`` on torch 2.6, uneven and
    empty pieces included). Checked on torch 2.6, 2.13, 2.14. ``_StridedShard``
    placements (FSDP2 over tensor parallel) are chunked here instead (see
    :func:`_fsdp_over_tp_piece`).
    """
    import inspect

    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    strided = [i for i, p in enumerate(placements) if type(p).__name__ == "_StridedShard"]
    if strided and _fully_shard_layout(mesh, placements, strided, Shard):
        return _fsdp_over_tp_piece(full, mesh, placements, strided, Shard)
    if "src_data_rank" in inspect.signature(distribute_tensor).parameters:
        return distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()
    replicated = DTensor.from_local(  # pragma: no cover (torch 2.6)
        full, mesh, [Replicate()] * mesh.ndim, run_check=False
    )
    return replicated.redistribute(mesh, placements).to_local()  # pragma: no cover (torch 2.6)


def _fully_shard_layout(mesh: Any, placements: Any, strided: list[int], shard: type) -> bool:
    """Whether the ``_StridedShard`` placements are the ones ``fully_shard`` makes over tensor
    parallel: each one's ``split_factor`` is the product of the sizes of the later mesh
    dimensions that ``Shard`` the same tensor dimension (FSDP2's rule). Other layouts
    (a custom ``ParallelStyle``, ``distribute_tensor`` by hand) keep torch's own slicing."""
    for i in strided:
        dim = placements[i].dim
        later = [
            mesh.size(j)
            for j in range(i + 1, mesh.ndim)
            if j not in strided and isinstance(placements[j], shard) and placements[j].dim == dim
        ]
        if getattr(placements[i], "split_factor", None) != math.prod(later):
            return False
    return True


def _fsdp_over_tp_piece(
    full: torch.Tensor, mesh: Any, placements: Any, strided: list[int], shard: type
) -> torch.Tensor:
    """This rank's piece under ``_StridedShard`` placements (``fully_shard`` over a tensor
    parallel mesh): chunked as eager builds it, the tensor parallel mesh dimensions first,
    then FSDP's (``torch.chunk``, empty past the last chunk, as ``Shard`` splits).
    torch 2.8's ``distribute_tensor`` gave other pieces for an uneven split (6 rows over 2x2
    ranks), so the shards differed from eager's without an error."""
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # pragma: no cover (a rank outside the mesh holds nothing)
        return full.new_empty((0,))
    piece = full
    for i in [i for i in range(mesh.ndim) if i not in strided] + strided:
        placement = placements[i]
        # _StridedShard subclasses Shard on torch 2.8, not on 2.11 and later.
        if not (isinstance(placement, shard) or i in strided):
            if placement.is_replicate():
                continue
            raise MetaTensorError(
                f"a parameter placed as {list(placements)} cannot be filled from its full "
                f"tensor: a {placement} placement holds no piece of it. Fix: shard or "
                "replicate parameters (fully_shard, parallelize_module) before materialize "
                "or load_checkpoint."
            )
        dim = placement.dim
        chunks = torch.chunk(piece, mesh.size(i), dim)
        rank = coordinate[i]
        piece = chunks[rank] if rank < len(chunks) else piece.narrow(dim, 0, 0)
    return piece


def fsdp_value_meshes() -> dict[tuple[int, str], Any]:
    """Where each parameter ``fully_shard`` manages got its values, eagerly.

    Maps (``id`` of a module holding it, its name there) to ``None`` for a
    parameter that was a plain tensor when ``fully_shard`` took it (eager
    keeps each rank's own chunk of its own tensor: no communication), or to
    the device mesh of the ``DTensor`` it was (tensor parallel, FSDP2's SPMD
    meshes), whose values ``distribute_tensor`` took as its ``src_data_rank``
    said. A parameter missing here was never ``fully_shard``-ed.

    Reads ``torch.distributed._composable_state._module_state_mapping`` (every
    module's composable state; an ancestor's ``fully_shard`` manages the
    parameters of submodules too) and each FSDP state's ``_fsdp_param_groups``,
    ``FSDPParam._module_info`` and ``_unsharded_dtensor_spec`` (``_tp_spec``
    before torch 2.9), ``_fsdp_param_group`` (one group) before ``_fsdp_param_groups``.
    Checked on torch 2.11, 2.13 and 2.15.
    """
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # pragma: no cover
        raise missing(
            "torch.distributed._composable_state._module_state_mapping",
            "materializing sharded parameters",
        ) from None
    found: dict[tuple[int, str], Any] = {}
    for ref in list(_module_state_mapping.values()):
        state: Any = ref()
        if hasattr(state, "_fsdp_param_groups"):  # torch 2.13, 2.15: a list
            groups = list(state._fsdp_param_groups)
        elif hasattr(state, "_fsdp_param_group"):  # torch 2.6, 2.11: one group or None
            groups = [state._fsdp_param_group] if state._fsdp_param_group is not None else []
        elif type(state).__name__ == "FSDPState":  # pragma: no cover
            raise missing("FSDPState._fsdp_param_groups", "materializing sharded parameters")
        else:
            continue  # another composable API's state (checkpoint, replicate)
        for group in groups:
            for param in group.fsdp_params:
                info = param._module_info
                spec = None
                if getattr(param, "is_dtensor", False):
                    spec = getattr(param, "_unsharded_dtensor_spec", None)
                    spec = getattr(param, "_tp_spec", None) if spec is None else spec
                    if spec is None:  # pragma: no cover
                        raise missing("FSDPParam._unsharded_dtensor_spec", "materializing")
                mesh = None if spec is None else spec.mesh
                found[(id(info.module), info.param_name)] = mesh
                for module, name in zip(info.shared_modules, info.shared_param_names, strict=True):
                    found[(id(module), name)] = mesh
    return found


def all_reduce_max_over_mesh(tensor: torch.Tensor, mesh: Any) -> None:
    """Set ``tensor``, in place, to its element-wise maximum over every rank of ``mesh``.

    One all-reduce per mesh dimension: the maximum along the first, then of
    those along the next, is the maximum over the whole mesh.
    """
    import torch.distributed as dist

    for dim in range(mesh.ndim):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))


__all__ += ["all_reduce_max_over_mesh", "fsdp_value_meshes", "local_shard"]


@functools.cache
def fsdp2_reduce_holds_last_grad() -> bool:
    """Whether FSDP2's ``foreach_reduce`` keeps the last unsharded gradient alive through its
    reduce-scatter, after it freed the others.

    Its loop reordering the gradients of non-dim-0 shards leaves the last one bound to the
    loop variable ``unsharded_grad`` until the function returns (torch 2.6 to 2.13, seen
    in the allocator's events: a 1024x64 head's gradient at the root's reduce-scatter);
    torch 2.15 moved the loop into a function of its own. Read from ``foreach_reduce``'s
    local variable names, under its ``torch.no_grad()`` wrapper
    (``torch.distributed.fsdp._fully_shard._fsdp_collectives``).
    """
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives
    except ImportError:  # pragma: no cover
        raise missing("torch.distributed.fsdp._fully_shard._fsdp_collectives", "estimate") from None
    fn = getattr(_fsdp_collectives, "foreach_reduce", None)
    code = getattr(inspect.unwrap(fn), "__code__", None) if fn is not None else None
    if code is None:  # pragma: no cover
        raise missing("_fsdp_collectives.foreach_reduce", "estimate with strategy='fsdp'")
    return "unsharded_grad" in code.co_varnames


__all__ += ["fsdp2_reduce_holds_last_grad"]


# -- ensembles: gradient buffers reused across steps, and the hooks that keep a
# module off the batched paths. Checked on torch 2.13.


def storage_users(tensor: torch.Tensor) -> int:
    """Return how many tensors share ``tensor``'s storage (``tensor`` itself included).

    Ensemble reuses a gradient buffer only when nothing but its own cache
    holds it (the ``.grad`` it became was set to None and dropped). Uses
    ``torch._C._storage_Use_Count``; without it every buffer counts as shared,
    so buffers are never reused (correct, only slower).
    """
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:  # pragma: no cover
        return 2
    storage = tensor.untyped_storage()
    # The Python storage object above holds one reference of its own.
    return int(count(storage._cdata)) - 1


# Which saved-tensor hooks are on top (torch 2.8+; None before).
_TOP_SAVED_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def saved_tensor_hooks_on() -> bool | None:
    """Whether saved-tensor hooks (``torch.utils.checkpoint`` without reentrant,
    ``save_on_cpu``) are on now; ``None`` where torch cannot say (before 2.8, which lacks
    ``torch._C._autograd._top_saved_tensors_default_hooks``)."""
    return None if _TOP_SAVED_HOOKS is None else _TOP_SAVED_HOOKS(False) is not None


@contextlib.contextmanager
def autograd_context_watch() -> Iterator[Callable[[], tuple[Any, ...]]]:
    """Yield a function returning what decides how the ops run now would be differentiated
    and cast: grad mode, inference mode, autocast (CPU and CUDA, with their dtypes), and
    the saved-tensor hooks (``torch.utils.checkpoint`` without reentrant, ``save_on_cpu``).

    A graph traced with ``torch.fx`` keeps none of these: the grouped plan of an
    ``Ensemble`` compares the value at each traced op with the value at the start.
    ``torch._C._autograd._top_saved_tensors_default_hooks`` (torch 2.8+) says which
    hooks are on top; before it, the pushes and pops of the body are counted (patched for
    the body only).
    """

    def context(hooks: Callable[[], Any]) -> Callable[[], tuple[Any, ...]]:
        return lambda: (
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            tuple(
                (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")
            ),
            hooks(),
        )

    top = _TOP_SAVED_HOOKS
    if top is not None:
        # The hooks themselves, compared by equality: torch returns a new tuple of
        # the same two functions on every call, whose id may differ.
        yield context(lambda: top(False))
        return
    # torch 2.6 / 2.7 (the floor's run covers this)
    depth = [0]
    autograd: Any = torch._C._autograd
    push, pop = (
        autograd._push_saved_tensors_default_hooks,
        autograd._pop_saved_tensors_default_hooks,
    )

    def pushing(*args: Any) -> Any:
        depth[0] += 1
        return push(*args)

    def popping() -> Any:
        depth[0] -= 1
        return pop()

    autograd._push_saved_tensors_default_hooks = pushing
    autograd._pop_saved_tensors_default_hooks = popping
    try:
        yield context(lambda: depth[0])
    finally:
        autograd._push_saved_tensors_default_hooks = push
        autograd._pop_saved_tensors_default_hooks = pop


def has_module_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward, forward-pre or backward hooks of its own, or a
    ``forward`` set on the instance (accelerate's ``add_hook_to_module`` wraps it so).

    Ensemble's batched paths compute a layer without calling it, so they
    refuse such layers (their hooks, or that forward, would not run).
    """
    return "forward" in vars(module) or any(_hook_tables(module))


def has_backward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule has backward or backward-pre hooks of its own.

    ``torch.vmap`` does not run them (the module's backward hooks see no
    tensor requiring grad inside the transform), so Ensemble's vmap plan
    cannot take such a template.
    """
    return any(_backward_hooked(m) for m in module.modules())


def hook_registrations() -> int:
    """A count that grows whenever a hook of any kind is registered anywhere.

    Every ``register_*hook`` of modules and tensors returns a
    ``torch.utils.hooks.RemovableHandle``, whose ids come from one counter:
    a cached answer about hooks stays valid while it has not moved, so
    Ensemble checks its template's hooks on every call without walking it.
    """
    return int(torch.utils.hooks.RemovableHandle.next_id)


def global_module_hooks() -> tuple[bool, bool]:
    """Whether hooks for every module are registered: (forward or forward-pre, backward or backward-pre).

    ``torch.nn.modules.module.register_module_forward_hook`` and its kin.
    Ensemble's fused and grouped plans compute layers without calling them,
    and ``torch.vmap`` runs no backward hooks, so they cannot honour them.
    The hooks of ``torch.utils.module_tracker.ModuleTracker`` are not counted.
    """
    from torch.nn.modules import module as m
    from torch.utils.module_tracker import ModuleTracker

    def others(*tables: Mapping[int, Any]) -> bool:
        # torch's ModuleTracker (FlopCounterMode, so Lightning's ModelSummary)
        # only notes which module runs: bookkeeping, which changes no result.
        return any(
            not isinstance(getattr(hook, "__self__", None), ModuleTracker)
            for table in tables
            for hook in table.values()
        )

    forward = others(m._global_forward_hooks, m._global_forward_pre_hooks)
    backward = others(m._global_backward_hooks, m._global_backward_pre_hooks)
    return forward, backward


def has_tensor_hooks(t: torch.Tensor) -> bool:
    """Whether ``t`` has gradient hooks (``register_hook``, ``register_post_accumulate_grad_hook``)."""
    return bool(t._backward_hooks or getattr(t, "_post_accumulate_grad_hooks", None))


def tensor_tables(
    module: nn.Module,
) -> tuple[Mapping[str, torch.Tensor | None], Mapping[str, torch.Tensor | None]]:
    """``module``'s own parameter and buffer tables (``_parameters``, ``_buffers``).

    Ensemble reads its stacked tensors from them on every call:
    ``nn.Module.__getattr__`` costs more than the read.
    """
    return module._parameters, module._buffers


def module_hooks(module: nn.Module) -> dict[str, dict[int, Any]]:
    """``module``'s own forward and backward hook tables, by kind (handle id -> hook).

    Ensemble compares every member's with member 0's, whose hooks the
    template runs.
    """
    return dict(zip(_HOOK_KINDS, _hook_tables(module), strict=True))


_HOOK_KINDS = ("forward hooks", "forward pre-hooks", "backward hooks", "backward pre-hooks")


def forward_hook_flags(module: nn.Module) -> tuple[set[int], set[int], set[int]]:
    """Handle ids of ``module``'s forward hooks taking kwargs, forward pre-hooks taking
    kwargs, and forward hooks always called (each empty on a torch without the table)."""
    return (
        set(getattr(module, "_forward_hooks_with_kwargs", {})),
        set(getattr(module, "_forward_pre_hooks_with_kwargs", {})),
        set(getattr(module, "_forward_hooks_always_called", {})),
    )


def backward_hooked(module: nn.Module) -> list[str]:
    """Dotted paths of the submodules of ``module`` (``""``: itself) with backward hooks."""
    return [path for path, m in module.named_modules() if _backward_hooked(m)]


def _backward_hooked(module: nn.Module) -> bool:
    return bool(module._backward_hooks or module._backward_pre_hooks)


def hook_reparametrised(module: nn.Module) -> list[str]:
    """Dotted names of the tensors the hooks of ``torch.nn.utils.spectral_norm``,
    ``weight_norm`` or ``prune`` recompute under ``module`` (sorted).

    Each is a tensor attribute with autograd history, rebuilt by a forward
    pre-hook from other parameters, which ``copy.deepcopy`` refuses; the
    hook objects name it (``name``, prune's ``_tensor_name``).
    """
    return sorted(
        f"{path}.{name}" if path else name
        for path, mod in module.named_modules()
        for _, name in recomputing_hooks(mod)
    )


def recomputing_hooks(module: nn.Module) -> list[tuple[Any, str]]:
    """``module``'s own forward pre-hooks of ``spectral_norm``, ``weight_norm`` or
    ``prune``, each with the name of the tensor attribute it recomputes.

    MetaTemplate re-runs them (as a forward would) and copies their stale
    result to meta; prune names it only in the private ``_tensor_name``.
    """
    if not module._forward_pre_hooks:  # most modules: called per tensor by state_from
        return []
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found: list[tuple[Any, str]] = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (SpectralNorm, WeightNorm)):
            found.append((hook, hook.name))
        elif isinstance(hook, BasePruningMethod):
            found.append((hook, hook._tensor_name))
    return found


def _hook_tables(module: nn.Module) -> tuple[dict[int, Any], ...]:
    # A plain tuple: Ensemble's loop plan reads these for every module on every call.
    return (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
    )


def modes_and_hooks(modules: Sequence[nn.Module]) -> list[tuple[bool, Any]]:
    """Every module's train/eval mode and which hooks it has, in one pass.

    Ensemble's loop plan checks this on every call, to rebuild its member
    copies when a mode or a hook of the template changed. A hook is known by
    its handle's id, which is never reused: a hook removed and another
    registered in its place is a change.
    """
    state = []
    for m in modules:
        tables = _hook_tables(m)
        state.append((m.training, tuple(tuple(t) for t in tables) if any(tables) else None))
    return state


def deepcopy_module(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(module, memo)``, with its hooks that close over ``module`` pointed at
    the copy (:func:`rebind_hook_closures`), and each parametrized module of the copy given a
    class of its own (:func:`own_parametrized_classes`)."""
    memo = {} if memo is None else memo
    copied = copy.deepcopy(module, memo)
    rebind_hook_closures(module, copied, memo)
    own_parametrized_classes(copied)
    return copied


def own_parametrized_classes(module: nn.Module) -> None:
    """Give each parametrized module of ``module`` a class of its own whose properties
    close over it, as ``register_parametrization`` made for the original.

    ``copy.deepcopy`` of a parametrized module keeps the original's class (torch makes one
    per module), whose properties close over the original: under
    ``torch.nn.utils.parametrize.cached()`` every copy then read the cache entry of the
    original, ``(id(original), name)``, and an ensemble's member copies all ran with one
    member's weight (before 2026-12-07, seventh session). Uses torch's private
    ``parametrize._inject_property`` (checked on torch 2.6, 2.13 and 2.15), the code that
    made the original's.
    """
    from torch.nn.utils import parametrize

    inject = getattr(parametrize, "_inject_property", None)
    if inject is None:
        raise missing(
            "torch.nn.utils.parametrize._inject_property", "copying a parametrized module"
        )
    for sub in module.modules():
        if not parametrize.is_parametrized(sub):
            continue
        cls = type(sub)
        table: nn.ModuleDict = sub.parametrizations  # type: ignore[assignment]
        names = list(table.keys())
        body = {k: v for k, v in vars(cls).items() if k not in names and k != "__weakref__"}
        sub.__class__ = type(cls.__name__, cls.__bases__, body)
        cache = parametrize_cache()
        for name in names:
            inject(sub, name)
            if cache is not None:
                # a copy made inside a cached() region may have the id of one freed there
                # (member(i) after member(i - 1)'s copy was dropped): its entry is stale
                cache.pop((id(sub), name), None)


@contextlib.contextmanager
def fresh_parametrizations(module: nn.Module) -> Iterator[None]:
    """Inside ``torch.nn.utils.parametrize.cached()``, drop the cache entries of ``module``'s
    parametrized modules before and after the body: a template called with one state after
    another (``template(template.state_from(b), x)`` after ``a``'s) would otherwise read the
    weight cached from the first state, 0.88 off on an orthogonal layer, without an error
    (before 2026-12-07, seventh session). Uses torch's private ``parametrize._cache_enabled``
    and ``_cache`` (checked on torch 2.6, 2.13 and 2.15)."""
    from torch.nn.utils import parametrize

    cache = parametrize_cache()
    if cache is None:  # outside a cached() region
        yield
        return
    keys = [
        (id(m), name)
        for m in module.modules()
        if parametrize.is_parametrized(m)
        for name in m.parametrizations  # type: ignore[union-attr]
    ]
    for key in keys:
        cache.pop(key, None)
    try:
        yield
    finally:
        for key in keys:
            cache.pop(key, None)


def parametrize_cache() -> dict[Any, Any] | None:
    """``torch.nn.utils.parametrize``'s cache of the current ``cached()`` region (torch's
    private ``_cache``, checked on torch 2.6, 2.13 and 2.15): an ensemble's timed runs put
    back what they add, so that the call itself computes as a member's call does. ``None``
    outside a region, or where torch keeps no such table (nothing is cached then)."""
    from torch.nn.utils import parametrize

    cache = getattr(parametrize, "_cache", None)
    if not getattr(parametrize, "_cache_enabled", 0) or not isinstance(cache, dict):
        return None
    return cache


def rebind_hook_closures(original: nn.Module, copied: nn.Module, memo: dict[int, Any]) -> None:
    """Point hooks of ``copied`` that are functions closing over modules of ``original`` at
    the matching modules of ``copied``.

    ``copied`` is ``copy.deepcopy(original, memo)`` and ``memo`` that call's
    memo, which pairs every copied module with its original. ``deepcopy``
    copies a bound method with its object, but a function as is: a
    ``lambda m, i, o: o * self.gate`` registered in ``__init__`` would read
    the original model from every copy. Only the variables that hold a
    module of ``original`` themselves get a new cell (one per old cell, so
    hooks that shared it still do); every other variable keeps its cell,
    shared with whatever else closes over it.
    """
    pairs = {}
    for module in original.modules():
        twin = memo.get(id(module))
        if isinstance(twin, nn.Module) and twin is not module:
            pairs[id(module)] = twin
    if not pairs:
        return
    cells: dict[int, Any] = {}
    for module in copied.modules():
        for table in _hook_tables(module):
            for key, hook in list(table.items()):
                rebound = _rebound(hook, pairs, cells)
                if rebound is not None:
                    table[key] = rebound


def _rebound(hook: Any, pairs: dict[int, nn.Module], cells: dict[int, Any]) -> Any:
    """``hook`` with its closure cells that hold a module of ``pairs`` replaced, or None."""
    closure = getattr(hook, "__closure__", None)
    if not isinstance(hook, types.FunctionType) or not closure:
        return None
    new, changed = [], False
    for cell in closure:
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell (a variable assigned after the function)
            new.append(cell)
            continue
        if id(value) in pairs:
            if id(cell) not in cells:
                cells[id(cell)] = types.CellType(pairs[id(value)])
            new.append(cells[id(cell)])
            changed = True
        else:
            new.append(cell)
    if not changed:
        return None
    rebound = types.FunctionType(
        hook.__code__, hook.__globals__, hook.__name__, hook.__defaults__, tuple(new)
    )
    rebound.__kwdefaults__ = hook.__kwdefaults__
    rebound.__qualname__ = hook.__qualname__
    rebound.__doc__ = hook.__doc__
    rebound.__dict__.update(hook.__dict__)
    return rebound


def dynamo_wrapper(mod: nn.Module) -> bool:
    """Whether ``mod`` is ``torch.compile``'s wrapper (``OptimizedModule``, holding the module
    as ``_orig_mod``), whose attributes are the compiler's bookkeeping (ids, the original
    callable, a config getter). By module name: the class is private to ``torch._dynamo``."""
    return type(mod).__module__.startswith("torch._dynamo")


def without_dynamo_wrappers(mod: nn.Module) -> nn.Module:
    """``mod`` with ``torch.compile``'s wrappers taken off: the module they hold (``_orig_mod``)."""
    while dynamo_wrapper(mod):
        mod = cast(nn.Module, mod._orig_mod)
    return mod


def functorch_transform_active() -> bool:
    """Whether the caller runs inside a ``torch.func`` transform (``vmap``, ``grad``, ...).

    Ensemble does not time its plans there (a backward inside a transform is
    not what the transform computes). Uses
    ``torch._C._functorch.peek_interpreter_stack``.
    """
    functorch = getattr(torch._C, "_functorch", None)
    peek = getattr(functorch, "peek_interpreter_stack", None)
    if peek is None:  # pragma: no cover
        return False
    return peek() is not None


def custom_functions_unsupported() -> bool:
    """Whether an ``autograd.Function`` of this package (its reused gradient buffers) must
    not run now: inside a ``torch.func`` transform (vmap, grad, jvp: they need a
    ``setup_context`` and a vmap rule the Functions do not have) or under forward-mode AD
    (``torch.autograd.forward_ad.dual_level``: no ``jvp``). The plain ops then run instead.
    Reads ``torch.autograd.forward_ad._current_level``.
    """
    if functorch_transform_active():
        return True
    return int(getattr(torch.autograd.forward_ad, "_current_level", -1)) >= 0


def plain_backward_needed() -> bool:
    """Whether a backward of this package's autograd Functions must run plain ops now:
    :func:`custom_functions_unsupported`, or torch's older vmap, which batches a backward
    (``torch.autograd.grad(..., is_grads_batched=True)``,
    ``torch.autograd.functional.jacobian(vectorize=True)``) and has no batching rule for
    ``out=``. That vmap is seen only in the dispatcher's thread-local include set
    (``VmapMode``, which ``torch._C.DispatchKey`` does not name), read through
    ``torch._C._dispatch_tls_local_include_set``.
    """
    if custom_functions_unsupported():
        return True
    include = getattr(torch._C, "_dispatch_tls_local_include_set", None)
    return include is not None and "VmapMode" in repr(include())


def transform_level() -> int | None:
    """The innermost ``torch.func`` transform's level where the caller runs, else ``None``.

    Uses ``torch._C._functorch.maybe_current_level``.
    """
    return torch._C._functorch.maybe_current_level()  # type: ignore[no-any-return]


# The ATen ops that torch's values-only linear algebra (svdvals, eigvalsh and the norms
# made of them) calls, and the position and name of their "vectors too" flag: on a tensor
# subclass it is set (see lightning_meta._deferred._functions). Same schemas on torch 2.6,
# 2.13 and 2.15.
VECTORS_FLAG: dict[Any, tuple[int, str]] = {
    torch.ops.aten._linalg_svd.default: (2, "compute_uv"),
    torch.ops.aten._linalg_eigh.default: (2, "compute_v"),
}


# The fake modes whose tensors transformers takes for real ones (see
# transformers_runs_real_path), each with its test of which tensors; the patch is
# installed while the list is not empty
_REAL_PATH_MODES: list[tuple[object, Callable[[object], bool]]] = []
_REAL_PATH_LOCK = threading.Lock()
_REAL_PATH_SAVED: list[Callable[[object], bool]] = []


@contextlib.contextmanager
def transformers_runs_real_path(mode: object, real: Callable[[object], bool]) -> Iterator[None]:
    """Within the block, transformers' ``is_tracing(tensor)`` is false for a fake tensor of
    ``mode`` for which ``real(tensor)`` holds, as it is for the real tensor that fake
    stands for.

    transformers (5.x) takes any ``FakeTensor`` for a sign of ``torch.export`` and then runs
    its export path: a full 4-D attention mask where a real run passes ``is_causal`` (an
    all-ones ``attention_mask``: 19 % over on Llama and BERT), Mamba's associative scan where
    a real CPU run loops (48 % over). ``estimate`` simulates the real run, so its fakes take
    the real run's branches where it can follow them (``real``: see the caller). Replaces
    ``transformers.utils.import_utils.is_fake_tensor`` (what ``is_tracing`` calls) while any
    such block is open, in any thread, with a function that answers as before for every
    other tensor, fakes of other modes included; restored when the last block exits. A
    no-op where transformers is not imported or has no such function (4.57 checks no fake
    tensor). Checked on transformers 4.57, 5.3 and 5.24.
    """
    utils: Any = sys.modules.get("transformers.utils.import_utils")
    if utils is None or not callable(getattr(utils, "is_fake_tensor", None)):
        yield
        return
    entry = (mode, real)
    with _REAL_PATH_LOCK:
        if not _REAL_PATH_MODES:
            original = utils.is_fake_tensor

            def is_fake_tensor(x: object) -> bool:
                mode_of = getattr(x, "fake_mode", None)
                for m, takes in _REAL_PATH_MODES:
                    if mode_of is m:
                        return not takes(x)
                return bool(original(x))

            _REAL_PATH_SAVED[:] = [original, is_fake_tensor]
            utils.is_fake_tensor = is_fake_tensor
        _REAL_PATH_MODES.append(entry)
    try:
        yield
    finally:
        with _REAL_PATH_LOCK:
            _REAL_PATH_MODES.remove(entry)
            if not _REAL_PATH_MODES:
                original, installed = _REAL_PATH_SAVED
                if utils.is_fake_tensor is installed:  # nobody patched it over ours
                    utils.is_fake_tensor = original
                _REAL_PATH_SAVED.clear()


def is_transformers_object(value: object) -> bool:
    """Whether ``value`` is an object of a transformers class (a model, a block, a ``Cache``);
    by its class's module, without importing transformers."""
    return value is not None and type(value).__module__.startswith("transformers.")


def transformers_conversions(module: nn.Module, keys: Iterable[str]) -> list[str]:
    """The weight conversions transformers applies when it loads a checkpoint into
    ``module`` (a transformers model) whose source patterns match one of ``keys``, each
    as ``"'source' + 'source' -> 'target'"``; ``[]`` for any other module, or where
    transformers has no such mapping (before 5.0).

    transformers 5 keeps some layers fused (a mixture of experts' ``gate_up_proj``) while
    its ``save_pretrained`` writes the hub's per-expert layout, which its loader converts.
    Uses ``transformers.conversion_mapping.get_model_conversion_mapping`` and each
    entry's ``source_patterns`` / ``target_patterns``; checked on transformers 5.3.
    """
    if not is_transformers_object(module):
        return []
    try:  # not a dependency: imported where the module is one of its models
        mapping = importlib.import_module("transformers.conversion_mapping")
        get_model_conversion_mapping = mapping.get_model_conversion_mapping
    except (ImportError, AttributeError):
        return []
    try:
        conversions = get_model_conversion_mapping(module)
    except Exception:  # a model the mapping cannot describe: nothing to add
        return []
    keys = list(keys)
    found = []
    for conversion in conversions:
        sources = list(getattr(conversion, "source_patterns", ()))
        targets = list(getattr(conversion, "target_patterns", ()))
        # globs (Mixtral's "experts.*.w1") and regular expressions (RT-DETRv2's
        # "layers.(\d+).fc1", which the glob reading never matched)
        patterns = [re.compile(re.escape(p).replace(r"\*", r"[^.]+")) for p in sources]
        for p in sources:
            with contextlib.suppress(re.error):
                patterns.append(re.compile(p))
        if any(p.search(k) for p in patterns for k in keys):
            found.append(" + ".join(map(repr, sources)) + " -> " + " + ".join(map(repr, targets)))
    return found


def transformers_unsaved(module: nn.Module) -> set[str]:
    """The names of ``module.state_dict()`` that transformers' ``save_pretrained`` leaves out
    of its files on purpose: each transformers model's ``_keys_to_ignore_on_save`` (exact
    keys, as ``save_pretrained`` deletes them: Marian's sinusoidal positions), under the
    model's path in ``module``; ``set()`` where ``module`` holds no transformers model.
    Checked on transformers 4.57 and 5.3.
    """
    found: set[str] = set()
    for path, sub in module.named_modules():
        if not is_transformers_object(sub):
            continue
        keys = getattr(sub, "_keys_to_ignore_on_save", None)
        if isinstance(keys, (list, tuple, set)):
            prefix = f"{path}." if path else ""
            found.update(prefix + k for k in keys if isinstance(k, str))
    return found


def outermost_transformers_models(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, submodule)`` of each transformers object in ``module`` that no other one
    holds: the model whose class attributes (``from_pretrained``'s rules) apply below it."""
    models: list[tuple[str, nn.Module]] = []
    for path, sub in module.named_modules():
        if is_transformers_object(sub) and not any(
            not p or path.startswith(f"{p}.") for p, _ in models
        ):
            models.append((path, sub))
    return models


def transformers_ignored_unexpected(module: nn.Module, keys: Iterable[str]) -> set[str]:
    """The ``keys`` (names in ``module``) that transformers' ``from_pretrained`` drops from
    its unexpected keys: the patterns of the outermost transformers models'
    ``_keys_to_ignore_on_load_unexpected`` (regular expressions searched in the names
    under the model's path: GPT-2's ``attn.bias`` masks of the hub's first files), and
    ``rotary_emb\\.inv_freq`` where the model has such a buffer (older Llama files held
    one per layer). ``set()`` where ``module`` holds no transformers model. Checked on
    transformers 4.57 and 5.3.
    """
    found: set[str] = set()
    for path, sub in outermost_transformers_models(module):
        given = getattr(sub, "_keys_to_ignore_on_load_unexpected", None)
        patterns = (
            [p for p in given if isinstance(p, str)]
            if isinstance(given, (list, tuple, set))
            else []
        )
        if any(n.endswith("rotary_emb.inv_freq") for n, _ in sub.named_buffers()):
            patterns.append(r"rotary_emb\.inv_freq")
        if not patterns:
            continue
        ignored = re.compile("|".join(f"({p})" for p in patterns))
        prefix = f"{path}." if path else ""
        found.update(
            k for k in keys if k.startswith(prefix) and ignored.search(k[len(prefix) :]) is not None
        )
    return found


def transformers_float32_kept(
    module: nn.Module, dtype: torch.dtype
) -> dict[str, tuple[str, list[str]]]:
    """What transformers' ``from_pretrained(..., dtype=dtype)`` keeps in float32 that
    ``module.to(dtype)`` casts: by the path of each outermost transformers model in
    ``module``, the regular expression of its dtype plan and the floating point tensors
    (``state_dict`` names under the model) it matches.

    The plan: ``_keep_in_fp32_modules`` for float16, ``_keep_in_fp32_modules_strict``
    for float16 and bfloat16 (transformers 5's ``_get_dtype_plan``, and 4.57's rule),
    each entry searched in the tensor names under the model (``*`` any characters).
    ``{}`` for other dtypes, or where ``module`` holds no such model.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return {}
    found: dict[str, tuple[str, list[str]]] = {}
    for path, sub in outermost_transformers_models(module):
        plan = getattr(sub, "_get_dtype_plan", None)
        if callable(plan):
            names = [n for n in plan(dtype) if isinstance(n, str)]
        else:  # transformers 4.x: the same rule, on the class attributes
            names = list(getattr(sub, "_keep_in_fp32_modules_strict", None) or [])
            if dtype == torch.float16:
                names += list(getattr(sub, "_keep_in_fp32_modules", None) or [])
        if not names:
            continue
        pattern = "|".join(f"({n.replace('*', '.*')})" for n in sorted(names))
        kept = re.compile(pattern)
        tensors = [
            n
            for n, t in sub.state_dict(keep_vars=True).items()
            if t.is_floating_point() and kept.search(n) is not None
        ]
        if tensors:
            found[path] = (pattern, tensors)
    return found


def unwrapped(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor under every ``torch.func`` transform's wrapper of ``tensor`` (a vmapped
    stacked parameter: the stacked parameter itself).

    Uses ``torch._C._functorch.is_functorch_wrapped_tensor`` and ``get_unwrapped``;
    checked on torch 2.6, 2.13, 2.15.
    """
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        tensor = functorch.get_unwrapped(tensor)
    return tensor


def made_at_level(tensor: torch.Tensor, level: int) -> bool:
    """Whether ``tensor`` is a ``torch.func`` transform's wrapper of ``level`` or an inner one:
    a value that exists only inside that transform's call.

    Uses ``torch._C._functorch.maybe_get_level`` (-1 for a plain tensor).
    """
    return bool(torch._C._functorch.maybe_get_level(tensor) >= level)


def module_apply(
    module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
) -> Any:
    """Call ``nn.Module._apply`` itself on ``module``.

    For a module that overrides ``_apply`` to drop caches of its tensors
    before ``.to()`` / ``.half()`` / ``.cuda()`` replace them (Ensemble).
    """
    return nn.Module._apply(module, fn, recurse)  # type: ignore[no-untyped-call]


def to_memory_format(fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.memory_format | None:
    """The ``memory_format=`` of the ``nn.Module.to`` call whose conversion ``fn`` is, if any.

    ``nn.Module.to`` hands ``_apply`` a closure (``convert``) that lays out
    every 4-D and 5-D tensor in that format; a module whose tensors stack
    its members' along a dim of their own (Ensemble) must lay them out per
    member instead. Read from the closure's ``convert_to_format`` cell:
    ``None`` for any other function. Checked on torch 2.6, 2.13.
    """
    code = getattr(fn, "__code__", None)
    closure = getattr(fn, "__closure__", None)
    if (
        code is None
        or closure is None
        or getattr(fn, "__qualname__", "") != "Module.to.<locals>.convert"
        or "convert_to_format" not in code.co_freevars
    ):
        return None
    value = closure[code.co_freevars.index("convert_to_format")].cell_contents
    return value if isinstance(value, torch.memory_format) else None


__all__ += [
    "to_memory_format",
    "deepcopy_module",
    "fresh_parametrizations",
    "own_parametrized_classes",
    "parametrize_cache",
    "recomputing_hooks",
    "dynamo_wrapper",
    "without_dynamo_wrappers",
    "custom_functions_unsupported",
    "plain_backward_needed",
    "functorch_transform_active",
    "global_module_hooks",
    "has_backward_hooks",
    "hook_registrations",
    "has_tensor_hooks",
    "has_module_hooks",
    "modes_and_hooks",
    "rebind_hook_closures",
    "made_at_level",
    "module_apply",
    "storage_users",
    "autograd_context_watch",
    "saved_tensor_hooks_on",
    "transform_level",
    "tensor_tables",
    "disabled_torch_function",
    "parameter_being_made",
]

# ``__torch_function__`` of a tensor subclass whose ops give plain tensors, as
# ``nn.Parameter``'s do (deferred tensors' watch class, see ``_watched``).
# Checked on torch 2.6 and 2.13.
disabled_torch_function = torch._C._disabled_torch_function_impl

_PARAMETER_NEW = nn.Parameter.__new__.__code__
_MODULE_APPLY = nn.Module._apply.__code__


def module_applying() -> nn.Module | None:
    """The module whose ``_apply`` runs outermost in the caller's stack, if any.

    ``module.to()``, ``.cpu()``, ``.cuda()`` and ``.share_memory()`` all call
    each tensor through ``Module._apply``, which recurses into the children:
    the outermost frame's ``self`` is the module the user called, from which
    a refusal can name the tensor's dotted path. Read only to word an error.
    """
    found = module_apply_call()
    return None if found is None else found[0]


def module_apply_call() -> tuple[nn.Module, bool] | None:
    """:func:`module_applying`'s module and the ``recurse`` it was called with
    (``to_empty(recurse=False)`` visits the module's own tensors only)."""
    found: tuple[nn.Module, bool] | None = None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _MODULE_APPLY:
            module = frame.f_locals.get("self")
            if isinstance(module, nn.Module):
                found = (module, frame.f_locals.get("recurse", True) is not False)
        frame = frame.f_back  # type: ignore[assignment]
    return found


def apply_order(module: nn.Module, recurse: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters and buffers ``module._apply(fn, recurse)`` calls ``fn`` on, in its
    order (each child first, then the module's own parameters, then its buffers), with
    their dotted names; a tensor held twice comes twice, as ``_apply`` visits it."""
    if recurse:
        for name, child in module.named_children():
            for path, t in apply_order(child, True):
                yield f"{name}.{path}", t
    yield from module.named_parameters(recurse=False, remove_duplicate=False)
    yield from module.named_buffers(recurse=False, remove_duplicate=False)


def target_device(*args: Any, **kwargs: Any) -> Any:
    """The device ``Tensor.to(*args, **kwargs)`` would move to, where it can tell.

    ``None`` where the call keeps the tensor's device or cannot be read here:
    ``_parse_to`` takes no ``copy`` (given by keyword it is left out; given
    by position, after ``non_blocking``, the call is not read), and
    ``torch.fx`` tracing passes proxies, for which it returns what is not a
    ``torch.device`` (the caller lets ``Tensor.to`` answer those).
    """
    kwargs = {k: v for k, v in kwargs.items() if k != "copy"}
    try:
        return torch._C._nn._parse_to(*args, **kwargs)[0]
    except (TypeError, RuntimeError):
        return None


def parameter_being_made(depth: int) -> type | None:
    """The class ``nn.Parameter.__new__`` builds, when it is the caller ``depth`` frames up.

    ``nn.Parameter(t)`` of a tensor whose type is neither ``Tensor`` nor
    ``Parameter`` takes torch's path for tensor subclasses: ``t.detach()``
    must return ``type(t)``, then ``_is_param = True`` is set on the result.
    A deferred tensor's watch class (see ``_watched``) uses this to give what
    the path for plain tensors gives. Same code on torch 2.6, 2.13 and 2.15.
    """
    frame = sys._getframe(depth + 1)
    if frame.f_code is not _PARAMETER_NEW:
        return None
    cls = frame.f_locals.get("cls")
    return cls if isinstance(cls, type) else None


# -- deferred_init: running real kernels while recording, Parameter subclasses,
# and Module._apply inside a block. Checked on torch 2.6 and 2.13.


def no_subclass_torch_function() -> Any:
    """A context in which tensor subclasses' ``__torch_function__`` is not called.

    ``torch._C.DisableTorchFunctionSubclass`` (torch 2.6 to 2.15): what
    ``materialize`` runs its own bookkeeping under, on deferred tensors whose
    watch class would answer each call in Python.
    """
    return torch._C.DisableTorchFunctionSubclass()


def no_torch_function() -> Any:
    """A context in which no ``__torch_function__`` runs: no tensor subclass's, no
    ``TorchFunctionMode`` of the caller's.

    ``torch._C.DisableTorchFunction`` (torch 2.6 to 2.15): what Ensemble's
    record of a member's random draws runs under (a caller's mode reading
    every result, a NaN check, would fail on its meta tensors).
    """
    return torch._C.DisableTorchFunction()


class no_python_dispatch:  # used like a function: `with no_python_dispatch():`
    """Run the body with Python dispatch and ``__torch_function__`` off: real kernels only.

    deferred_init draws random numbers for real (on scratch memory) and
    computes values a model reads while it is recorded, from inside its
    dispatch mode, where the fake mode below would otherwise take over. Uses
    ``torch._C._DisableTorchDispatch`` and ``torch._C.DisableTorchFunction``
    (a class, not a generator: it runs once per random draw while recording).
    """

    __slots__ = ("_guards",)
    _dispatch = getattr(torch._C, "_DisableTorchDispatch", None)
    _function = getattr(torch._C, "DisableTorchFunction", None)

    def __enter__(self) -> None:
        if self._dispatch is None or self._function is None:  # pragma: no cover
            raise missing("torch._C._DisableTorchDispatch", "deferred_init")
        self._guards = (self._dispatch(), self._function())
        for guard in self._guards:
            guard.__enter__()

    def __exit__(self, *exc: object) -> None:
        for guard in reversed(self._guards):
            guard.__exit__(*exc)


class RecordingDispatchMode(TorchDispatchMode):  # type: ignore[misc,valid-type]
    """A ``TorchDispatchMode`` whose ``__torch_dispatch__`` torch does not wrap for dynamo.

    torch 2.13 wraps every subclass's ``__torch_dispatch__`` in
    ``torch._disable_dynamo`` (a few microseconds per op) unless
    ``_should_skip_dynamo()`` is false; deferred_init's recorder never runs
    under ``torch.compile``. torch 2.6 has no such wrapper (the method is
    simply unused there).
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


def make_subclass(cls: type, data: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """Return ``data`` as an instance of the tensor subclass ``cls`` without calling ``cls``.

    What ``nn.Parameter.__new__`` does for plain tensors
    (``torch.Tensor._make_subclass``): a ``Parameter`` subclass whose
    constructor takes other arguments is rebuilt around new data this way.
    """
    made: torch.Tensor = torch.Tensor._make_subclass(cls, data, requires_grad)
    return made


_PARAMETER_HOOKS: list[Callable[[type, Any, tuple[Any, ...], dict[str, Any]], Any]] = []
_PARAMETER_SAVED: list[Any] = []


@functools.cache
def _parameter_lock() -> Any:
    import threading

    return threading.Lock()


@contextlib.contextmanager
def parameter_calls(
    hook: Callable[[type, Any, tuple[Any, ...], dict[str, Any]], Any],
) -> Iterator[None]:
    """Call ``hook(cls, made, args, kwargs)`` after every ``cls(*args, **kwargs)`` of a Parameter class.

    Under a fake mode, ``MyParameter(fake)`` returns the fake tensor itself
    (``Parameter.__new__`` cannot wrap a tensor subclass), so the class, and
    whatever ``MyParameter.__init__`` would set, are lost; deferred_init
    notes them here. Installed on ``type(nn.Parameter)`` (torch's private
    ``_ParameterMeta``) for the body only, shared by concurrent blocks; the
    hook's return value replaces what the call returns.
    """
    meta = type(nn.Parameter)
    with _parameter_lock():
        if not _PARAMETER_HOOKS:
            own = meta.__dict__.get("__call__")
            _PARAMETER_SAVED[:] = [own]

            def __call__(cls: type, *args: Any, **kwargs: Any) -> Any:
                if own is not None:
                    made = own(cls, *args, **kwargs)
                else:
                    made = super(meta, cls).__call__(*args, **kwargs)  # type: ignore[misc]
                for each in list(_PARAMETER_HOOKS):
                    made = each(cls, made, args, kwargs)
                return made

            meta.__call__ = __call__  # type: ignore[method-assign,assignment]
        _PARAMETER_HOOKS.append(hook)
    try:
        yield
    finally:
        with _parameter_lock():
            _PARAMETER_HOOKS.remove(hook)
            if not _PARAMETER_HOOKS:
                own = _PARAMETER_SAVED[0]
                if own is None:
                    del meta.__call__
                else:
                    meta.__call__ = own  # type: ignore[method-assign]


def is_module_apply(code: Any) -> bool:
    """Whether ``code`` is the code object of ``nn.Module._apply`` (``.to()``, ``.half()``, ...).

    deferred_init refuses tensor conversions of a whole module inside a block
    the same way on every torch version: torch 2.13 cannot swap fake
    parameters, torch 2.6 assigns ``.data`` (and would record it).
    """
    return code is nn.Module._apply.__code__


__all__ += [
    "RecordingDispatchMode",
    "is_module_apply",
    "make_subclass",
    "no_python_dispatch",
    "no_subclass_torch_function",
    "parameter_calls",
]


# -- estimate: reading a tensor's value. ``.item()``, ``bool(t)``, ``t.tolist()``
# and ``x in t`` all reach ``aten._local_scalar_dense``; estimate answers it
# for tensors whose values it follows (inputs, and what is computed from them
# and constants alone). Checked on torch 2.6 and 2.13.


@functools.cache
def value_read_ops() -> frozenset[Any]:
    """Return the ATen overloads that read tensors' values into a Python scalar: the one
    ``.item()``, ``bool()`` and ``tolist()`` reach, and ``torch.equal`` and
    ``torch.allclose``, which have kernels of their own."""
    aten = torch.ops.aten
    return frozenset({aten._local_scalar_dense.default, aten.equal.default, aten.allclose.default})


__all__ += ["value_read_ops"]


# -- estimate per rank: rebuilding a module's inputs after FSDP2's hooks wrap
# them. Checked on torch 2.6 and 2.13.
try:
    from torch.utils._pytree import tree_flatten, tree_unflatten
except ImportError:  # pragma: no cover

    def tree_flatten(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        raise missing("torch.utils._pytree", "estimate with a strategy")

    tree_unflatten = tree_flatten  # type: ignore[assignment]


__all__ += ["tree_flatten", "tree_unflatten"]


@contextlib.contextmanager
def reparametrized(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Give ``module`` the parameters and buffers ``tensors`` (by name, tied names too) for the body.

    What ``torch.func.functional_call`` does around one call, kept for a whole
    training step: activation checkpointing recomputes a block's forward in
    backward, which must see the same tensors. Uses
    ``torch.nn.utils.stateless._reparametrize_module``; checked on torch 2.6
    and 2.13.
    """
    from torch.nn.utils import stateless

    swap = getattr(stateless, "_reparametrize_module", None)
    if swap is None:  # pragma: no cover
        raise missing("torch.nn.utils.stateless._reparametrize_module", "estimate with a strategy")
    # One name per slot: a module registered under two names (self.alias =
    # self.l, nn.ModuleList([block] * 12)) has one slot that both name, and
    # torch swaps it once per name, restoring the stand-in the second time
    # and writing the original into the given dict (its write-back of
    # changed tensors). Given a copy, the caller's dict stays as it was.
    # Every slot is given its stand-in (tied slots the same one), so torch need not
    # tie names itself: its tie_weights=True reads every name of a tied tensor from
    # the dict, and raised KeyError for the alias's name left out here (a module
    # under two names whose weight is tied to a third: transformers 4's T5).
    slots: dict[tuple[int, str], str] = {}
    for name in tensors:
        path, _, leaf = name.rpartition(".")
        slots.setdefault((id(module.get_submodule(path)), leaf), name)
    with swap(module, {name: tensors[name] for name in slots.values()}, tie_weights=False):
        yield


__all__ += ["reparametrized"]


# -- estimate with activation checkpointing: the module tracker must not keep
# recomputed forwards alive. Checked on torch 2.6 and 2.13.
if isinstance(KeywordModuleTracker, type) and issubclass(KeywordModuleTracker, ModuleTracker):

    class StepModuleTracker(KeywordModuleTracker):
        """A :class:`KeywordModuleTracker` that ignores the backward of forwards run in backward.

        Activation checkpointing recomputes a block's forward during backward;
        that graph is never run backward, and the hooks ``ModuleTracker`` puts
        on its tensors (through ``register_multi_grad_hook``, which holds their
        autograd nodes) would keep every recomputed activation alive until the
        step ends. FLOPs of the recomputation are still attributed to the
        modules that run it. Uses ``ModuleTracker.is_bw`` and its private
        ``_get_*`` helpers.
        """

        def _fw_post_hook_kw(self, mod: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if self.is_bw:
                self._get_pop_fn(self._get_mod_name(mod), False)()
                return
            super()._fw_post_hook_kw(mod, args, kwargs, output)

else:  # pragma: no cover
    StepModuleTracker = KeywordModuleTracker  # type: ignore[misc,assignment]


__all__ += ["StepModuleTracker"]


# -- sharded loading: which box of the global tensor this rank's shard is.


def local_box(dtensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Return ``(offsets, sizes)`` of this rank's local shard of ``dtensor`` in the global tensor.

    Uses ``DTensor.__create_chunk_list__`` (what ``torch.distributed.checkpoint``
    plans its reads with); works on meta DTensors. ``None`` when the local
    shard is not one box of the global tensor (several chunks). Checked on
    torch 2.13.
    """
    chunks = dtensor.__create_chunk_list__()  # type: ignore[attr-defined]
    if len(chunks) != 1:
        return None
    return tuple(int(o) for o in chunks[0].offsets), tuple(int(s) for s in chunks[0].sizes)


__all__ += ["local_box"]


def fsdp_reshard_hooks(module: nn.Module) -> list[Callable[[], None]]:
    """FSDP2's load pre-hooks on ``module``: each reshards the parameter group it belongs to.

    ``fully_shard`` registers one (``FSDPParamGroup._to_sharded``, in a
    ``to_sharded_hook`` closure that ignores its arguments) on every module
    holding parameters of the group, so that ``load_state_dict`` never
    writes into the unsharded copies a forward leaves registered (the root's
    after a ``no_grad`` forward, all of them with ``reshard_after_forward=False``),
    which the next reshard frees. Checked on torch 2.13.
    """
    pre, _ = load_hook_tables(module)
    found = []
    for hook in pre.values():
        fn = hook_function(hook)
        if (
            getattr(fn, "__module__", "") == "torch.distributed.fsdp._fully_shard._fsdp_param_group"
            and getattr(fn, "__name__", "") == "to_sharded_hook"
        ):
            found.append(fn)
    return found


__all__ += ["fsdp_reshard_hooks"]


def load_hook_tables(module: nn.Module) -> tuple[dict[int, Any], dict[int, Any]]:
    """``module``'s load_state_dict pre-hook and post-hook tables (``_load_state_dict_pre_hooks``,
    ``_load_state_dict_post_hooks``; torch 2.6 to 2.15), the tables themselves."""
    return module._load_state_dict_pre_hooks, module._load_state_dict_post_hooks


def hook_function(hook: Any) -> Any:
    """The function a load pre-hook table entry calls: torch wraps it in ``_WrappedHook``
    (its ``hook`` attribute, torch 2.6 to 2.15); post-hooks are stored as given."""
    return getattr(hook, "hook", hook)


def method_owner(module: nn.Module, name: str) -> type:
    """The class whose method ``name`` ``module`` runs (``nn.Module`` when none overrides it)."""
    for cls in type(module).__mro__:
        if name in vars(cls):
            return cls
    return nn.Module  # pragma: no cover - nn.Module defines it


def load_code_owner(module: nn.Module) -> type:
    """The class whose ``_load_from_state_dict`` ``module`` runs (``nn.Module`` when none overrides it)."""
    return method_owner(module, "_load_from_state_dict")


@contextlib.contextmanager
def load_prefixes_seen(modules: Iterable[nn.Module], at: list[str]) -> Iterator[None]:
    """Keep ``at[-1]`` the prefix of the module whose ``_load_from_state_dict`` runs.

    ``Module.load_state_dict`` calls ``module._load_from_state_dict(state_dict,
    prefix, ...)`` (torch 2.6 to 2.15) for every module, looked up on the
    instance; each of ``modules`` (throwaway copies, never the caller's model)
    gets an instance attribute that pushes ``prefix`` onto ``at`` for the
    call, removed when the block exits.
    """
    installed: list[nn.Module] = []

    def seen(bound: Callable[..., Any]) -> Callable[..., Any]:
        def call(state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> Any:
            at.append(prefix)
            try:
                return bound(state_dict, prefix, *args, **kwargs)
            finally:
                at.pop()

        return call

    try:
        for mod in modules:
            if "_load_from_state_dict" in vars(mod):
                continue  # an instance attribute of its own: left as it is
            object.__setattr__(mod, "_load_from_state_dict", seen(mod._load_from_state_dict))
            installed.append(mod)
        yield
    finally:
        for mod in installed:
            vars(mod).pop("_load_from_state_dict", None)


def counts_batches(module: nn.Module) -> bool:
    """Whether ``module`` is a norm layer whose ``_load_from_state_dict`` fills a missing
    ``num_batches_tracked`` in a state dict of an older version
    (``torch.nn.modules.batchnorm._NormBase`` with ``track_running_stats``; torch 2.6 to 2.15)."""
    from torch.nn.modules.batchnorm import _NormBase

    return (
        isinstance(module, _NormBase)
        and bool(module.track_running_stats)
        and isinstance(getattr(module, "num_batches_tracked", None), torch.Tensor)
    )


def incompatible_keys(missing: list[str], unexpected: list[str]) -> Any:
    """What ``load_state_dict`` hands its post-hooks and returns:
    ``torch.nn.modules.module._IncompatibleKeys`` (a named tuple, torch 2.6 to 2.15)."""
    from torch.nn.modules.module import _IncompatibleKeys

    return _IncompatibleKeys(missing, unexpected)


def grad_hook_tables(t: torch.Tensor) -> tuple[Any, Any]:
    """``t``'s gradient hook tables (``Tensor._backward_hooks``,
    ``Tensor._post_accumulate_grad_hooks``; torch 2.6 to 2.15), ``None`` where empty."""
    return t._backward_hooks, t._post_accumulate_grad_hooks


def install_grad_hooks(t: torch.Tensor, tables: tuple[Any, Any]) -> None:
    """Make leaf ``t`` run the hooks of ``tables`` (from :func:`grad_hook_tables`).

    ``torch.utils.swap_tensors`` leaves the Python tables with the object but
    moves the C++ hooks that run them with the tensor's data; assigning a
    table installs it (the properties' setters do), so the handles
    ``register_hook`` returned keep removing from it.
    """
    backward, post = tables
    if backward:
        t._backward_hooks = backward
    if post:
        t._post_accumulate_grad_hooks = post


__all__ += ["grad_hook_tables", "install_grad_hooks"]


def register_pytree_node(
    cls: type,
    flatten: Callable[[Any], tuple[list[Any], Any]],
    unflatten: Callable[[Any, Any], Any],
    name: str,
) -> None:
    """Make ``cls`` a node of torch's pytrees (``torch.utils._pytree.register_pytree_node``,
    torch 2.6 to 2.15), so ``torch.func`` transforms and ``tree_map`` look inside it."""
    import torch.utils._pytree as pytree

    pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=name)


__all__ += ["register_pytree_node"]


def is_checkpoint_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is a ``CheckpointWrapper`` of
    ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper`` (torch 2.6 to 2.15), which
    recomputes its forward in backward (found by name: ``torch.distributed`` may be absent)."""
    return any(
        cls.__name__ == "CheckpointWrapper"
        and cls.__module__ == "torch.distributed.algorithms._checkpoint.checkpoint_wrapper"
        for cls in type(module).__mro__
    )


__all__ += ["is_checkpoint_wrapper"]
__all__ += ["apply_order", "module_apply_call"]


@contextlib.contextmanager
def rnn_weak_refs_dropped(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Drop the weak references each ``nn.RNNBase`` among ``modules`` keeps to its
    parameters (``_flat_weight_refs``, torch 2.6 to 2.15) for the block, and make them
    again at its end, also when it raises, as the RNN's ``__init__`` and ``_apply`` do.

    ``torch.utils.swap_tensors`` refuses a tensor something refers to weakly;
    ``module.to()``, ``functional_call`` and every forward make these.
    """
    rnns = {
        id(m): m
        for m in modules
        if isinstance(m, nn.RNNBase) and getattr(m, "_flat_weight_refs", None)
    }
    for rnn in rnns.values():
        rnn._flat_weight_refs = []
    try:
        yield
    finally:
        for rnn in rnns.values():
            rnn._init_flat_weights()


__all__ += ["rnn_weak_refs_dropped"]


def functional_call_restoring_in_reverse(
    module: nn.Module,
    tensors: dict[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    tie_weights: bool,
) -> Any:
    """``torch.func.functional_call(module, tensors, args, kwargs)`` whose tensors are put
    back in the reverse order they were swapped in (``stack_weights``).

    For a module that holds one submodule under two names (T5's ``shared``
    and ``encoder.embed_tokens``): torch swaps name by name, and restoring in
    the same order leaves the caller's tensor in the module and hands the
    module's own back to the caller. Names are the caller's; torch's checks
    of them are left to the caller (``strict=False``).
    """
    from torch.nn.utils import stateless

    with stateless._reparametrize_module(
        module, tensors, tie_weights=tie_weights, strict=False, stack_weights=True
    ):
        return module(*args, **kwargs)


def masked_index_ops() -> frozenset[Any]:
    """The ATen indexing overloads that take boolean masks among their indices, the private
    ``aten._index_put_impl_`` (what autograd's backward of ``t[mask]`` calls) among them.

    estimate turns masks of known values into integer indices for them. Checked on torch
    2.6 and 2.13.
    """
    aten = torch.ops.aten
    ops = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
    impl = getattr(aten, "_index_put_impl_", None)
    if impl is not None:
        ops.add(impl.default)
    return frozenset(ops)


__all__ += ["masked_index_ops"]


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def compiler_disabled(fn: _Fn, reason: str | None = None) -> _Fn:
    """``fn`` wrapped in ``torch.compiler.disable`` (dynamo runs it eagerly), typed as ``fn``.

    ``reason``: under ``torch.compile(fullgraph=True)`` dynamo refuses to call a
    disabled function and shows only its ``reason`` (torch 2.8 and later; checked
    on 2.8, 2.11, 2.13, 2.15): without it the user reads "reason: None" and never
    the refusal ``fn`` raises. Torch 2.6 and 2.7 take no ``reason``: there the
    user sees the function's name only.
    """
    if reason is not None:
        try:
            return cast(_Fn, torch.compiler.disable(fn, reason=reason))  # type: ignore[call-arg]
        except TypeError:  # torch 2.6, 2.7: no reason keyword
            pass
    return cast(_Fn, torch.compiler.disable(fn))


__all__ += ["compiler_disabled"]


# A module's own hook tables and the tables of flags beside them (handle id ->
# hook, or -> True), which every hook registration writes with one handle id.
_HOOK_TABLE_NAMES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)

# Table name -> handle id -> hook (or flag), as noted.
HookTables = dict[str, dict[int, Any]]


def hook_tables(module: nn.Module) -> HookTables:
    """A copy of ``module``'s own hook tables (forward, forward-pre, backward,
    backward-pre, and the flags beside them), those present and not empty.

    What a forward that registers hooks on its modules (transformers 5 installs
    its output-capturing hooks on the first call asking for hidden states)
    changed is put back from this (:func:`restore_hook_tables`).
    """
    found: HookTables = {}
    for name in _HOOK_TABLE_NAMES:
        table = getattr(module, name, None)
        if table:
            found[name] = dict(table)
    return found


def hooks_since(module: nn.Module, count: int) -> HookTables:
    """The entries of ``module``'s own hook tables registered since :func:`hook_registrations`
    was ``count`` (handle ids only grow), by table."""
    return _hook_entries(module, lambda key: key >= count)


def _hook_entries(module: nn.Module, keep: Callable[[int], bool]) -> HookTables:
    found: HookTables = {}
    for name in _HOOK_TABLE_NAMES:
        table = getattr(module, name, None)
        if table:
            new = {key: value for key, value in table.items() if keep(key)}
            if new:
                found[name] = new
    return found


def hook_ids(modules: Iterable[nn.Module]) -> frozenset[int]:
    """The handle ids of every hook in ``modules``' own tables."""
    return frozenset(
        key for mod in modules for name in _HOOK_TABLE_NAMES for key in getattr(mod, name, ())
    )


def hooks_except(module: nn.Module, ids: frozenset[int]) -> HookTables:
    """The entries of ``module``'s own hook tables whose handle ids are not in ``ids``."""
    return _hook_entries(module, lambda key: key not in ids)


def restore_hook_tables(module: nn.Module, noted: HookTables | None, count: int) -> bool:
    """Drop the entries of ``module``'s hook tables registered since
    :func:`hook_registrations` was ``count`` and, given ``noted`` (from :func:`hook_tables`
    then), give them back the entries removed since; whether anything changed."""
    changed = False
    for name in _HOOK_TABLE_NAMES:
        table = getattr(module, name, None)
        if table is None or (not table and not (noted and noted.get(name))):
            continue
        for key in [key for key in table if key >= count]:
            del table[key]
            changed = True
        before = None if noted is None else noted.get(name, {})
        if before is not None and table.keys() != before.keys():  # one removed: put back
            table.clear()
            table.update(before)
            changed = True
    return changed


def hook_order(module: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """The handle ids of ``module``'s hook tables ``names``, in the order the hooks run."""
    return {name: tuple(getattr(module, name, ())) for name in names}


def add_hooks(
    module: nn.Module,
    entries: HookTables,
    bind: Callable[[Any], Any],
    order: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Put ``entries`` (from :func:`hooks_except`, of another copy of ``module``) in
    ``module``'s hook tables, each hook as ``bind(hook)`` gives it (pointed at ``module``'s
    modules where it referred to the other copy's).

    ``order`` (from :func:`hook_order` on the other copy) places each entry where it ran
    there: just after the hook it followed that ``module`` has too, or first (a hook
    registered with ``prepend=True``); the hooks run in table order, so a template hook
    added after the entries were registered runs after them, as on the other copy.
    Without it (an ensemble pickled before the order was kept) they run last.
    """
    for name, new in entries.items():
        table = getattr(module, name, None)
        if table is None:  # pragma: no cover - a torch without the flag table
            raise missing(f"nn.Module.{name}", "carrying the hooks a forward registered")
        flags = name.endswith(("_with_kwargs", "_always_called"))
        for key, value in new.items():
            table[key] = value if flags else bind(value)
        before = None if order is None or flags else order.get(name)
        if before:
            _place(table, new.keys(), before)


def _place(table: dict[int, Any], carried: Iterable[int], before: Sequence[int]) -> None:
    """Reorder ``table`` so that each key of ``carried`` follows the key it followed in
    ``before`` that ``table`` holds (or comes first), the other keys keeping their order."""
    moved = set(carried)
    keys = [key for key in table if key not in moved]
    last: int | None = None
    for key in before:
        if key in moved:
            keys.insert(0 if last is None else keys.index(last) + 1, key)
            last = key
        elif key in table:
            last = key
    placed = {key: table[key] for key in keys}
    table.clear()
    table.update(placed)


def rebound_hook(hook: Any, pairs: dict[int, nn.Module], cells: dict[int, Any]) -> Any:
    """``hook`` pointed at the modules ``pairs`` maps the ones it refers to (a bound method
    of one, or a function closing over one) to; ``hook`` itself where it refers to none."""
    owner = getattr(hook, "__self__", None)
    if isinstance(hook, types.MethodType) and id(owner) in pairs:
        return types.MethodType(hook.__func__, pairs[id(owner)])
    rebound = _rebound(hook, pairs, cells)
    return hook if rebound is None else rebound


__all__ += [
    "HookTables",
    "add_hooks",
    "hook_ids",
    "hook_order",
    "hook_tables",
    "hooks_except",
    "hooks_since",
    "rebound_hook",
    "restore_hook_tables",
]


# --------------------------------------------------------------- Lightning Fabric


def fabric_wrapped(module: nn.Module) -> nn.Module | None:
    """The module a Fabric ``setup`` wrapper (Lightning's private ``_FabricModule``) wraps:
    the one its ``state_dict`` shows and its ``load_state_dict`` fills (its ``forward``
    runs the strategy's wrapper, ``DistributedDataParallel`` under DDP); ``None`` for any
    other module."""
    # By name, not isinstance: the torch-only core does not import Lightning
    # (lightning.fabric.wrappers or the standalone lightning_fabric package).
    kind = type(module)
    if kind.__name__ != "_FabricModule" or not kind.__module__.startswith(
        ("lightning.fabric.", "lightning_fabric.")
    ):
        return None
    wrapped = getattr(module, "_original_module", None)
    return wrapped if isinstance(wrapped, nn.Module) else None


__all__ += ["fabric_wrapped"]


def converts_own(module: nn.Module) -> bool:
    """Whether ``module``'s class has a ``_apply`` of its own, defined outside torch (torch's
    own, an RNN's flattening, change no values): what ``module.to()`` runs on it does more
    than converting its parameters and buffers (torchmetrics' ``Metric``)."""
    own = type(module)._apply
    return own is not nn.Module._apply and not own.__module__.startswith("torch.")


def apply_own(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``module._apply(fn)``: what ``module.to(...)`` runs on every submodule, overrides
    included (torchmetrics' ``Metric._apply`` casts and moves its states with ``fn``)."""
    module._apply(fn)


def lightning_placement(
    module: nn.Module, device: torch.device | None, dtype: torch.dtype | None
) -> None:
    """Note ``device`` and ``dtype`` on every Lightning ``_DeviceDtypeModuleMixin`` under
    ``module`` (a LightningModule's ``.device`` and ``.dtype``), as that mixin's ``to()``
    does; tensors are not touched. Found by class name, as :func:`fabric_wrapped`."""
    for sub in module.modules():
        if not any(
            c.__name__ == "_DeviceDtypeModuleMixin"
            and c.__module__.startswith(("lightning.fabric.", "lightning_fabric."))
            for c in type(sub).__mro__
        ):
            continue
        if device is not None:
            sub._device = device  # type: ignore[assignment]
        if dtype is not None:
            sub._dtype = dtype  # type: ignore[assignment]


__all__ += ["apply_own", "converts_own", "lightning_placement"]
