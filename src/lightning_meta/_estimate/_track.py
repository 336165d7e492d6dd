"""Dispatch modes that watch a training step: live tensor bytes and FLOPs the counter misses.

Both modes work the same on real and on fake tensors, which is what makes the
estimate checkable: the simulation under ``FakeTensorMode`` and a measurement
of the real step see the same operators and the same storages.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from lightning_meta._compat import (
    DynamicOutputShapeException,
    TorchDispatchMode,
    cpu_conv_uses_onednn,
    saved_tensor_hooks_on,
    scratch_kernel_ops,
    tree_leaves,
    tree_map,
    uncounted_attention_ops,
    uncounted_rnn_ops,
)
from lightning_meta._estimate._kernels import RealKernels
from lightning_meta._estimate._values import Values

__all__ = ["CATEGORIES", "RANK_CATEGORIES", "KernelScratch", "LiveBytes", "UncountedFlops"]

#: What each live byte of a training step is held for, in the order tables show them.
CATEGORIES = (
    "parameters",
    "buffers",
    "inputs",
    "gradients",
    "optimizer_state",
    "activations",
    "temporaries",
)
#: under a strategy, also what collectives hold (all-gather and reduce-scatter
#: buffers, DDP's gradient buckets)
RANK_CATEGORIES = (*CATEGORIES, "communication")


class LiveBytes(TorchDispatchMode):
    """Count the bytes of every storage alive while the mode is on, and their peak.

    Every storage produced by an operator (or registered with :meth:`track`) is
    counted once, under the category current at its creation
    (:attr:`allocate_as`) until :meth:`retag` moves it, and stops counting when
    its last reference dies (a weak reference callback on the storage). Views
    and in-place results share their storage and so cost nothing extra, as on
    a real allocator.

    With ``kernels``, every operator of the forward (and loss) is first checked
    against the real kernel's dtype rules, which fake kernels skip
    (:class:`~lightning_meta._estimate._kernels.RealKernels`). With
    ``values``, the values of inputs and of what is computed from them alone
    are followed, and reads of them answered
    (:class:`~lightning_meta._estimate._values.Values`).

    ``torch.distributed._tools.mem_tracker.MemTracker`` offers the same idea,
    but it snapshots every module at every operator (quadratic in model size)
    and refuses a second call of the root module, so a 70B-parameter step
    would take minutes instead of seconds.
    """

    def __init__(
        self,
        uncounted: UncountedFlops | None = None,
        kernels: RealKernels | None = None,
        values: Values | None = None,
        categories: tuple[str, ...] = CATEGORIES,
    ) -> None:
        super().__init__()
        self._uncounted = uncounted
        #: checks the forward's operators against the real kernels' dtype rules
        self._kernels = kernels
        #: the values the step knows (inputs and what only they determine)
        self._values = values
        # id(storage) -> [weak reference, bytes, category]
        self._live: dict[int, list[Any]] = {}
        self.current: dict[str, int] = dict.fromkeys(categories, 0)
        self.total = 0
        self.peak = 0
        self.peak_breakdown: dict[str, int] = dict(self.current)
        self.phase = "setup"
        self.peak_phase = "setup"
        self.allocate_as = "activations"
        self.untracked = 0
        #: optional: names the part of the phase each allocation falls in; the
        #: peak of every ``"phase|part"`` window is then kept in ``window_peaks``
        #: (in order of first appearance) as ``(bytes, breakdown)``
        self.where: Callable[[], str] | None = None
        self.window_peaks: dict[str, tuple[int, dict[str, int]]] = {}
        #: optional: receives ``(operator, what it returned)`` for every operator, in order
        self.trace: list[Any] | None = None
        #: optional: bounds the scratch memory of kernels that allocate it internally
        self.scratch: KernelScratch | None = None
        #: a bound of the oneDNN LSTM workspace the fake kernel reported as empty, in bytes
        self.rnn_workspace = 0

    def _entry(self, t: torch.Tensor) -> tuple[int, torch.UntypedStorage] | None:
        if t.layout != torch.strided:
            # sparse and nested tensors have no single storage to weigh
            self.untracked += 1
            return None
        storage = t.untyped_storage()
        return id(storage), storage

    def track(self, t: torch.Tensor, category: str | None = None) -> None:
        """Start counting the storage of ``t`` (no-op if already counted)."""
        found = self._entry(t)
        if found is None:
            return
        key, storage = found
        if key in self._live:
            return
        nbytes = storage.nbytes()
        cat = category or self.allocate_as

        def _free(ref: weakref.ref[torch.UntypedStorage], key: int = key) -> None:
            entry = self._live.get(key)
            # the id may already belong to a newer storage; only drop our own entry
            if entry is not None and entry[0] is ref:
                del self._live[key]
                self.current[entry[2]] -= entry[1]
                self.total -= entry[1]

        self._live[key] = [weakref.ref(storage, _free), nbytes, cat]
        self.current[cat] += nbytes
        self.total += nbytes
        if self.total > self.peak:
            self.peak = self.total
            self.peak_breakdown = dict(self.current)
            self.peak_phase = self.phase
        if self.where is not None:
            window = f"{self.phase}|{self.where()}"
            best = self.window_peaks.get(window)
            if best is None or self.total > best[0]:
                self.window_peaks[window] = (self.total, dict(self.current))

    def momentary(self, nbytes: int, category: str | None = None) -> None:
        """Count ``nbytes`` that a kernel (or a collective) allocates and frees inside itself,
        on top of what is live, as ``category`` (default: :attr:`allocate_as`)."""
        if nbytes <= 0:
            return
        cat = category or self.allocate_as
        total = self.total + nbytes
        if total > self.peak:
            self.peak = total
            self.peak_breakdown = dict(self.current)
            self.peak_breakdown[cat] += nbytes
            self.peak_phase = self.phase
        if self.where is not None:
            window = f"{self.phase}|{self.where()}"
            best = self.window_peaks.get(window)
            if best is None or total > best[0]:
                breakdown = dict(self.current)
                breakdown[cat] += nbytes
                self.window_peaks[window] = (total, breakdown)

    def ignore(self, t: torch.Tensor) -> None:
        """Count the storage of ``t``, and of every view of it, as 0 bytes (held elsewhere)."""
        found = self._entry(t)
        if found is not None and found[0] not in self._live:
            key, storage = found

            def _free(ref: weakref.ref[torch.UntypedStorage], key: int = key) -> None:
                entry = self._live.get(key)
                if entry is not None and entry[0] is ref:
                    del self._live[key]

            self._live[key] = [weakref.ref(storage, _free), 0, "parameters"]

    def track_all(self, tensors: Iterable[Any], category: str) -> None:
        """Track every tensor in ``tensors`` (any pytree) under ``category``."""
        for t in tree_leaves(list(tensors)):
            if isinstance(t, torch.Tensor):
                self.track(t, category)

    def retag(self, t: torch.Tensor, category: str) -> None:
        """Move the storage of ``t`` to ``category`` (tracking it if it is new)."""
        found = self._entry(t)
        if found is None:
            return
        entry = self._live.get(found[0])
        if entry is None:
            self.track(t, category)
            return
        self.current[entry[2]] -= entry[1]
        self.current[category] += entry[1]
        entry[2] = category

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func is _DEVICE:
            # Most operators a step dispatches are device queries (autograd and
            # model code ask for it); answer fake ones without the modes below.
            fake_device = getattr(args[0], "fake_device", None)
            return fake_device if fake_device is not None else func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        values = self._values
        if values is not None:
            known, scalar = values.read(func, args, kwargs)
            if known:
                return scalar
        if self.phase == "forward":
            # first: a refused call is no FLOP and no allocation, as for real
            if self._kernels is not None:
                self._kernels.observe(func, args, kwargs)
            if values is not None:
                values.check_indices(func, args)
        if self._uncounted is not None:
            self._uncounted.observe(func, args, kwargs)
        try:
            out = func(*args, **kwargs)
        except DynamicOutputShapeException:
            # an output shape that depends on values (nonzero): known for known values
            real = values.shape_of(func, args, kwargs) if values is not None else None
            if real is not None:
                out = _fakes_like(real, args)
            else:
                indexed = values.masks_as_indices(func, args) if values is not None else None
                if indexed is None:
                    raise
                out = func(*indexed, **kwargs)
        except RuntimeError as e:
            # a fake kernel may be stricter than the real one (aten._grouped_mm
            # in float32): then say so rather than blame the inputs
            if self._kernels is not None and self.phase == "forward":
                self._kernels.second_opinion(func, args, kwargs, e)
            raise
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        if func in _MATMULS:
            self.momentary(_matmul_copies(args[-2:] if func is _MM else args[1:3]))
        if self.scratch is not None:
            self.scratch.observe(func, args, out, self.total)
        if func is _RNN_LAYER:
            self.rnn_workspace += _rnn_workspace(args, out)
        if values is not None:
            values.follow(func, args, kwargs, out)
        if self.trace is not None:
            # With what backward will do about it: blocks alike in their forward
            # but one under no_grad or activation checkpointing are not alike.
            context = (torch.is_grad_enabled(), saved_tensor_hooks_on())
            self.trace.append((func, _signature(out), context))
        return out


def _signature(out: Any) -> tuple[Any, ...]:
    """Return the shapes and dtypes of an operator's tensor results, and its other results."""
    return tuple(
        (_shape(t), t.dtype) if isinstance(t, torch.Tensor) else repr(t) for t in tree_leaves(out)
    )


def _fakes_like(real: Any, args: tuple[Any, ...]) -> Any:
    """Return fakes (made by the modes below) shaped like the real results ``real``."""
    device = next(
        (t.device for t in tree_leaves(args) if isinstance(t, torch.Tensor)),
        torch.device("cpu"),
    )
    return tree_map(
        lambda r: (
            torch.empty(r.shape, dtype=r.dtype, device=device) if isinstance(r, torch.Tensor) else r
        ),
        real,
    )


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _query_heads(
    query: tuple[int, ...], key: tuple[int, ...], value: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``key`` and ``value`` with the query's head count, as the kernel broadcasts them for
    grouped-query attention (``enable_gqa=True``, fewer key/value heads). torch's formulas
    count that broadcast from torch 2.13 on; before, they assert equal head counts, which
    failed the estimate of every GQA model (Llama, Qwen, Mistral) on torch 2.7-2.12, whose
    CPU flash kernel runs GQA (torch 2.6 takes the math path, counted as matmuls)."""
    if len(query) != 4 or len(key) != 4 or len(value) != 4:
        return key, value
    heads, kv_heads = query[1], key[1]
    if kv_heads == heads or kv_heads == 0 or heads % kv_heads or value[1] != kv_heads:
        return key, value  # not grouped: torch's formula judges the shapes
    return (key[0], heads, *key[2:]), (value[0], heads, *value[2:])


def _sdpa_forward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    query = _shape(args[0])
    key, value = _query_heads(query, _shape(args[1]), _shape(args[2]))
    return int(sdpa_flop_count(query, key, value))


def _sdpa_backward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    grad_out, query, key, value = args[:4]
    key_shape, value_shape = _query_heads(_shape(query), _shape(key), _shape(value))
    return int(sdpa_backward_flop_count(_shape(grad_out), _shape(query), key_shape, value_shape))


def _rnn_forward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The matmuls of a fused RNN kernel, as ``FlopCounterMode`` counts them where the layer
    decomposes (``nn.GRU`` on the CPU): ``2 * steps * batch`` multiply-adds per element of
    every weight matrix (input-hidden, hidden-hidden and projection; biases and the gates'
    element-wise math count 0, as the counter counts them)."""
    data = args[0]
    # Rows of the input: time x batch (a packed sequence is already flat).
    rows = data.numel() // max(int(data.shape[-1]), 1)
    weights = [
        t
        for t in tree_leaves(args[1:5] if len(args) > 4 else args[1:])
        if isinstance(t, torch.Tensor) and t.dim() == 2
    ]
    return int(2 * rows * sum(int(w.numel()) for w in weights))


def _rnn_backward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    # The gradients of the input (and hidden state) and of the weights: two
    # matmuls of the forward's size each, as for nn.Linear.
    return 2 * _rnn_forward(args, kwargs)


_DEVICE = torch.ops.prim.device.default
# Attention and fused RNN kernels FlopCounterMode has no formula for (it counts
# 0 for them), with torch's own formulas for the math attention does and the
# counter's matmul rule for the RNN's matmuls.
_UNCOUNTED: dict[Any, Callable[[tuple[Any, ...], dict[str, Any]], int]] = {
    **{
        op: _sdpa_forward if kind == "forward" else _sdpa_backward
        for op, kind in uncounted_attention_ops().items()
    },
    **{
        op: _rnn_forward if kind == "forward" else _rnn_backward
        for op, kind in uncounted_rnn_ops().items()
    },
}


class UncountedFlops:
    """Count the FLOPs of operators ``FlopCounterMode`` gives 0, per module.

    Not a dispatch mode of its own: :class:`LiveBytes` shows it every operator,
    which saves a mode layer on each of the ~10^5 operators of a large model.

    Args:
        modules: the ``ModuleTracker`` of the ``FlopCounterMode`` running
            alongside, so that both attribute FLOPs to the same module names.
    """

    def __init__(self, modules: Any) -> None:
        self._tracker = modules
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def observe(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Count ``func(*args, **kwargs)`` if the FLOP counter misses it."""
        formula = _UNCOUNTED.get(func)
        if formula is not None:
            flops = formula(args, kwargs)
            for parent in set(self._tracker.parents):
                self.counts[parent][str(func.overloadpacket)] += flops

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Return a copy of the FLOPs counted so far, per module name and operator."""
        return {name: dict(ops) for name, ops in self.counts.items()}


def _nbytes(t: Any) -> int:
    return int(t.numel()) * t.element_size() if isinstance(t, torch.Tensor) else 0


def _columns(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, groups: int) -> int:
    """An upper bound of the bytes of a slow convolution's im2col ``columns``: a row per
    channel and kernel element, a column per position, for the whole batch (the larger
    of the input's and the output's channels and positions, which covers transposed
    convolutions too)."""
    kernel = math.prod(int(d) for d in w.shape[2:])
    channels = max(int(x.shape[1]), int(out.shape[1]), int(w.shape[1]) * groups)
    spatial = max(math.prod(int(d) for d in x.shape[2:]), math.prod(int(d) for d in out.shape[2:]))
    return int(x.shape[0]) * channels * kernel * spatial * x.element_size()


_MM = torch.ops.aten.mm.default
_MATMULS = frozenset({_MM, torch.ops.aten.addmm.default})


def _matmul_copies(operands: Any) -> int:
    """The bytes of the contiguous copies a CPU ``mm`` / ``addmm`` makes of its operands.

    BLAS takes a matrix whose rows or columns are contiguous with a leading
    dimension at least as long as them; the CPU kernel clones any other
    operand (``addmm_impl_cpu_`` in ``aten/src/ATen/native/LinearAlgebra.cpp``)
    and frees the copy when it returns: an expanded batch (stride 0), the
    expanded gradient of ``output.sum()`` reaching a ``Linear``'s backward, a
    slice with a step. No dispatch mode sees the copy; it is exact, so it
    counts in the peak, on top of what is live with the output. Checked
    against torch.profiler's ``aten::clone`` inside ``aten::mm`` for every
    layout pair of float32 and bfloat16 operands on torch 2.6, 2.13 and 2.15.
    """
    total = 0
    for m in operands:
        if not isinstance(m, torch.Tensor) or m.device.type != "cpu" or m.dim() != 2:
            return 0
        rows, cols = int(m.shape[0]), int(m.shape[1])
        s0, s1 = int(m.stride(0)), int(m.stride(1))
        if not ((s1 == 1 and s0 >= max(1, cols)) or (s0 == 1 and s1 >= max(1, rows))):
            total += rows * cols * m.element_size()
    return total


def _pad16(n: int) -> int:
    """``n`` rounded up to a multiple of 16, as oneDNN's blocked layouts pad channels."""
    return -(-n // 16) * 16


def _blocked(t: Any, dims: tuple[int, ...]) -> int:
    """The bytes of ``t`` with its ``dims`` rounded up to 16, as oneDNN's blocked layouts pad them."""
    if not isinstance(t, torch.Tensor):
        return 0
    size = _nbytes(t)
    for d in dims:
        n = int(t.shape[d]) if t.dim() > d else 1
        size = size * _pad16(n) // max(n, 1)
    return size


def _blocked_groups(t: Any, dim: int, groups: int) -> int:
    """The bytes of ``t`` with each group's share of ``dim`` rounded up to 16."""
    if not isinstance(t, torch.Tensor) or t.dim() <= dim:
        return 0
    n = int(t.shape[dim])
    per = max(n // groups, 1)
    return _nbytes(t) * _pad16(per) * groups // max(n, 1)


def _onednn_conv_scratch(
    x: torch.Tensor, w: torch.Tensor, out: Any, grad_out: Any, transposed: bool, groups: int
) -> tuple[int, str]:
    """An upper bound of a oneDNN convolution's internal scratch (``mkldnn_convolution``).

    oneDNN computes in blocked layouts (channels padded to 8 or 16): it
    reorders the input, the weight and the output (in backward, the output's
    gradient and the weight's) into them, and the CPU kernel first copies a
    gradient it cannot take as it is (the expanded gradient of
    ``output.sum()``). Measured with torch.profiler's allocator events on
    torch 2.13 over Conv1d/2d/3d, transposed, grouped, strided, pointwise
    and ``channels_last`` calls in float32 and bfloat16: at most 0.98 of
    twice the padded input, output and weight (three times for transposed
    ones), plus the copy; bfloat16 also holds a scratchpad of up to about
    350 KB, allowed for with 512 KiB. A grouped convolution (depthwise
    ones too) may run oneDNN's gemm kernel, which holds the im2col columns
    of an image and group per thread, or of them all (a Conv2d(6, 10, 11,
    groups=2) measured 10.9x its peak_bytes, a ConvNext depthwise backward
    the columns of the whole batch): those columns, for the larger of the
    images times groups and the threads, twice in backward, as the slow
    kernels' (found by the hostile review of 2026-12-06).
    """
    if groups > 1 and x.dtype != torch.float32:
        # bfloat16 grouped ones pad each group's channels, and hold float32 copies: a
        # Conv2d(16, 32, 1, groups=16) measured 1.8x peak_bytes plus the bound without this
        per_group_in = max(int(w.shape[1]), 1)
        weight = _blocked_groups(w, 0, groups) * _pad16(per_group_in) // per_group_in
        activations = 2 * (_blocked_groups(x, 1, groups) + _blocked_groups(out, 1, groups) + weight)
    else:
        activations = _blocked(x, (1,)) + _blocked(out, (1,)) + _blocked(w, (0, 1))
    bound = (3 if transposed else 2) * activations
    if groups > 1 and isinstance(out, torch.Tensor):
        units = int(x.shape[0]) * groups
        # a row per input channel of the group and kernel element, a column per
        # position (the larger side's, for transposed convolutions)
        rows = max(int(w.shape[1]), int(x.shape[1]) // groups) * math.prod(w.shape[2:])
        positions = max(math.prod(x.shape[2:]), math.prod(out.shape[2:]))
        per_unit = rows * positions * x.element_size()
        backward = grad_out is not None
        bound += (2 if backward else 1) * per_unit * max(units, torch.get_num_threads())
    if isinstance(grad_out, torch.Tensor) and not (
        grad_out.is_contiguous() or grad_out.is_contiguous(memory_format=_channels_last(grad_out))
    ):
        bound += _nbytes(grad_out)
    if x.dtype != torch.float32:
        bound += 512 * 1024
    return bound, f"oneDNN convolution, {str(x.dtype).removeprefix('torch.')}"


def _channels_last(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if t.dim() == 5 else torch.channels_last


def _conv_scratch(args: tuple[Any, ...], out: Any, backward: bool) -> tuple[int, str] | None:
    """An upper bound of a CPU convolution's internal scratch (``out``: the call's outputs).

    The slow kernels hold the im2col ``columns`` (forward) and, in backward,
    the columns and their gradient; a contiguous copy of each input is
    allowed for as well. oneDNN's: :func:`_onednn_conv_scratch`.
    """
    produced = out
    if backward:
        grad_out, x, w = args[0], args[1], args[2]
        transposed, groups = bool(args[7]), int(args[9])
        out = grad_out
    else:
        x, w = args[0], args[1]
        transposed, groups = bool(args[6]), int(args[8])
        out = None
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dim() < 3:
        return None
    at = 4 if backward else 3  # where stride is; dilation two further
    stride, dilation = list(args[at]), list(args[at + 2])
    pointwise = all(int(d) == 1 for d in (*w.shape[2:], *stride, *dilation))
    if cpu_conv_uses_onednn(x.dtype, int(x.shape[0]), pointwise):
        if backward:
            return _onednn_conv_scratch(x, w, grad_out, grad_out, transposed, groups)
        return _onednn_conv_scratch(x, w, produced, None, transposed, groups)
    if out is None:  # the forward's output is the same size as its gradient
        out = x if transposed else _conv_out(x, w, args)
    columns = _columns(x, w, out, groups)
    copies = _nbytes(x) + _nbytes(w) + (_nbytes(grad_out) if backward else 0)
    bound = (2 * columns if backward else columns) + copies
    kernel = "slow_conv_transpose" if transposed else "slow_conv (thnn_conv / im2col)"
    return bound, f"{kernel}, {str(x.dtype).removeprefix('torch.')}"


def _conv_out(x: torch.Tensor, w: torch.Tensor, args: tuple[Any, ...]) -> Any:
    stride, padding, dilation = args[3], args[4], args[5]
    sizes = [int(x.shape[0]), int(w.shape[0])]
    for i, n in enumerate(x.shape[2:]):
        k = int(w.shape[2 + i])
        s, p, d = (int(v[i] if len(v) > i else v[0]) for v in (stride, padding, dilation))
        sizes.append(max((int(n) + 2 * p - d * (k - 1) - 1) // s + 1, 0))
    return torch.empty(sizes, device="meta")


def _flash_scratch(args: tuple[Any, ...], backward: bool) -> tuple[int, str] | None:
    """An upper bound of the CPU flash attention's internal scratch.

    Its per-thread ``buf`` (float32 blocks of at most 256 queries by 512 keys,
    with row statistics and an output block; twice that in backward) for each
    of ``torch.get_num_threads()`` threads, and contiguous copies of the
    query, key, value (and, in backward, output, its gradient and a float32
    gradient of the query).
    """
    tensors = [a for a in args[:6] if isinstance(a, torch.Tensor)]
    q, k, v = (args[1], args[2], args[3]) if backward else (args[0], args[1], args[2])
    if not isinstance(q, torch.Tensor) or q.device.type != "cpu":
        return None
    tq, tk, dv = int(q.shape[-2]), int(k.shape[-2]), int(v.shape[-1])
    qs, ks = min(256, tq), min(512, tk)
    per_thread = qs * ks + 3 * qs + qs * dv
    buf = torch.get_num_threads() * per_thread * 4 * (2 if backward else 1)
    if q.dtype != torch.float32:
        buf *= 2  # a copy in the reduced dtype
    copies = sum(_nbytes(t) for t in tensors) + (int(q.numel()) * 4 if backward else 0)
    return buf + copies, f"flash attention for CPU, {str(q.dtype).removeprefix('torch.')}"


_RNN_LAYER = getattr(getattr(torch.ops.aten, "mkldnn_rnn_layer", None), "default", None)


def _rnn_workspace(args: tuple[Any, ...], out: Any) -> int:
    """A bound of the workspace a training call of ``aten.mkldnn_rnn_layer`` (``nn.LSTM`` on
    the CPU, one call per layer and direction) holds until backward, where its fake kernel
    returned an empty one: 88 bytes per time step, batch row and hidden unit, plus 64 KiB
    (measured: 78-86 bytes and about 20 KiB on torch 2.6-2.9, 62-67 on 2.13-2.15)."""
    # mkldnn_rnn_layer(input, w0, w1, w2, w3, hx, cx, reverse, batch_sizes, mode,
    # hidden_size, num_layers, has_biases, bidirectional, batch_first, train)
    workspace = out[-1] if isinstance(out, (tuple, list)) and out else None
    if len(args) < 16 or not args[15] or not isinstance(workspace, torch.Tensor):
        return 0
    if workspace.numel() > 0:
        return 0  # the fake kernel knew it
    steps_and_rows = int(args[0].shape[0]) * int(args[0].shape[1])
    return 88 * steps_and_rows * int(args[10]) + 65536


class KernelScratch:
    """Bound the memory kernels allocate inside themselves, which no dispatch mode sees.

    For each call of a kernel of :func:`~lightning_meta._compat.scratch_kernel_ops`,
    the live bytes just after it (its outputs included) plus an upper bound
    of its scratch; :attr:`worst` is the largest. When it exceeds the step's
    peak, the peak may be too low by up to the difference, and
    :attr:`kernels` names the kernel and module of each such call
    (``estimate`` warns).

    Args:
        modules: the step's module tracker, to name the module of a call.
    """

    def __init__(self, modules: Any) -> None:
        self._tracker = modules
        self._ops = scratch_kernel_ops()
        self.worst = 0
        #: "kernel in module 'name'" -> the largest live bytes plus scratch bound
        self.kernels: dict[str, int] = {}

    def observe(self, func: Any, args: tuple[Any, ...], out: Any, total: int) -> None:
        """Note a call of ``func`` that returned ``out``, counted in ``total`` live bytes."""
        kind = self._ops.get(func)
        if kind is None:
            return
        # the arguments follow the operators' schemas; a failure here is a bug, not a miss
        found = (
            _conv_scratch(args, out, kind == "conv_backward")
            if kind.startswith("conv")
            else _flash_scratch(args, kind == "flash_backward")
        )
        if found is None:
            return
        bound, kernel = found
        names = [p for p in self._tracker.parents if p != "Global"]
        where = max(names, key=len).partition(".")[2] if names else ""
        key = f"{kernel} in module {where!r}" if where else f"{kernel} in the root module"
        self.kernels[key] = max(self.kernels.get(key, 0), total + bound)
        self.worst = max(self.worst, total + bound)
