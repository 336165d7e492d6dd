"""Measure a real training step, to check :func:`lightning_meta.estimate` against.

This is deliberately a plain, separate loop on real tensors (not the
simulation with real tensors swapped in): a test that compares the two would
otherwise only compare the simulation with itself. Only the storage tracker
is shared, and it is checked on its own against known allocations.

That tracker sees the tensors operators return, at the dispatcher: scratch a
kernel allocates and frees inside itself (oneDNN's bfloat16 matmuls on the
CPU, the im2col columns of slow convolutions, CPU flash attention's blocks)
never reaches it, as it never reaches estimate. A claim about such scratch is
checked with torch.profiler's allocator events instead
(``test_estimate_memory.py``'s scratch tests). The one such allocation the
tracker counts, by rule, is the contiguous copy a CPU ``mm`` / ``addmm``
makes of an operand BLAS cannot take (``_track._matmul_copies``), checked
there against the profiler too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_meta._estimate._options import (
    OptimizerLike,
    make_optimizer_factory,
    resolve_precision,
)
from lightning_meta._estimate._run import default_loss
from lightning_meta._estimate._track import LiveBytes

__all__ = ["Measurement", "measure_training_step"]


@dataclass(frozen=True)
class Measurement:
    """What a real training step used: peak live tensor bytes and FLOPs."""

    peak_bytes: int
    forward_flops: int
    backward_flops: int


def _cast(value: Any, dtype: torch.dtype | None) -> Any:
    if dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def measure_training_step(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: OptimizerLike = "adamw",
    precision: str = "32-true",
    loop: str = "lightning",
) -> Measurement:
    """Run two real training steps of ``model`` and measure the second.

    The first step creates optimizer state and gradients, so the measured
    step is in the steady state :func:`~lightning_meta.estimate` models.
    ``model`` is trained in place (and cast for ``*-true`` precisions).

    Args:
        model: a real module.
        args: positional inputs (real tensors).
        kwargs: keyword inputs.
        loss_fn: as in :func:`~lightning_meta.estimate`.
        optimizer: as in :func:`~lightning_meta.estimate`.
        precision: as in :func:`~lightning_meta.estimate`.
        loop: as in :func:`~lightning_meta.estimate`.

    Returns:
        The peak of live tensor bytes during the second step (weights,
        gradients, optimizer state, inputs and everything the step creates),
        and the FLOPs ``FlopCounterMode`` counts in its forward and backward.

    Example::

        >>> m = measure_training_step(nn.Linear(16, 4), (torch.randn(8, 16),), optimizer="sgd")
        >>> m.forward_flops
        1024
    """
    kwargs = kwargs or {}
    prec = resolve_precision(precision)
    _, factory = make_optimizer_factory(optimizer)
    loss_fn = loss_fn or default_loss
    if prec.cast_to is not None:
        model.to(prec.cast_to)
    args, kwargs = _cast(args, prec.cast_to), _cast(kwargs, prec.cast_to)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = factory(params) if factory is not None else None
    device_type = next(iter(params)).device.type if params else "cpu"

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if prec.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=prec.autocast)

    def zero() -> None:
        for p in params:
            p.grad = None

    def step(tracker: LiveBytes | None, counter: FlopCounterMode | None) -> tuple[int, int]:
        if loop == "plain":
            zero()
        with contextlib.ExitStack() as stack:
            if counter is not None:
                stack.enter_context(counter)
            if tracker is not None:
                stack.enter_context(tracker)
            with autocast():
                out = model(*args, **kwargs)
                fwd = counter.get_total_flops() if counter is not None else 0
                loss = loss_fn(out)
            before_bwd = counter.get_total_flops() if counter is not None else 0
            zero()
            loss.backward()
            bwd = (counter.get_total_flops() if counter is not None else 0) - before_bwd
            del out, loss
            if opt is not None:
                opt.step()
        return fwd, bwd

    step(None, None)
    tracker = LiveBytes()
    tracker.track_all(list(model.parameters()) + list(model.buffers()), "parameters")
    tracker.track_all([args, kwargs], "inputs")
    tracker.track_all([p.grad for p in params if p.grad is not None], "gradients")
    if opt is not None:
        tracker.track_all([list(s.values()) for s in opt.state.values()], "optimizer_state")
    step(tracker, None)
    # FLOPs in a third step, so that the FLOP counter cannot disturb the memory measurement
    fwd, bwd = step(None, FlopCounterMode(display=False))
    return Measurement(peak_bytes=tracker.peak, forward_flops=fwd, backward_flops=bwd)


def allocator_peak(call: Callable[[], Any], *, warm_up: bool = False) -> tuple[int, Any]:
    """The peak of what ``call`` allocates, from torch.profiler's allocator events (which
    see inside kernels, where the storage tracker does not), and what it returns.

    ``warm_up``: run ``call`` once inside the profile first and measure the
    second run. The profiler sees no free of a block allocated before it
    started, so a call that frees such blocks (a training step freeing the
    previous step's gradients) would have them counted.
    """
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        if warm_up:
            call()
        with torch.profiler.record_function("measured"):
            out = call()
    events = list(prof.profiler.kineto_results.events())  # type: ignore[union-attr]
    start = min(e.start_ns() for e in events if e.name() == "measured")
    current = peak = 0
    for _, nbytes in sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.start_ns() >= start
    ):
        current += nbytes
        peak = max(peak, current)
    return peak, out
