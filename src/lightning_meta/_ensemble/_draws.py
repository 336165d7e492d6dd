"""The batched plans' dropout masks, drawn as a loop over the members draws them.

A loop over the members runs member 0's forward, then member 1's: every mask
of member 0 is drawn before any of member 1, each from the generator's state
the previous draws left. The grouped and fused plans run a layer for every
member at once, so drawing there puts the stream onto other elements. Instead, one
member's draws in a call are recorded once per kind of call (the template's
own forward run on meta tensors of one member's shapes, under a dispatch mode
that notes every op tagged ``nondeterministic_seeded``), drawn for every member
in the loop's order before the grouped run, each with the sizes, strides and
dtype of the record (eager's for contiguous inputs: see :func:`exact_possible`
for where the record is not used), and handed to the plan's random sites in
turn (:func:`dropped`). A site checks that the draw it gets is the one it
stands for (sizes, probability, dtype), and that every draw was taken is
checked at the end, so a template whose draws the sites do not reproduce
raises the plan's error and runs the loop (the generator put back first).

Only CPU tensors draw this way: on an accelerator torch's dropout is one fused
kernel (``native_dropout``), whose offsets into the generator's stream these
draws would not reproduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_meta._compat import (
    TorchDispatchMode,
    functorch_transform_active,
    global_module_hooks,
    has_module_hooks,
    is_dtensor,
    no_dispatch_modes,
    no_torch_function,
    tree_map_only,
)
from lightning_meta._forward_state import AttributeState, GlobalRandom, watched

__all__ = ["Draw", "Draws", "NotRecorded", "Schedules", "dropped", "exact_possible", "record"]


@dataclass(frozen=True)
class Draw:
    """One ``bernoulli_(keep)`` of one member's forward: the tensor it fills and ``keep``."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    keep: float


class _Recorder(TorchDispatchMode):
    """Notes every random op of a forward; ``draws`` is ``None`` once one is not ``bernoulli_``."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[Draw] | None = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags and self.draws is not None:
            self_ = args[0] if args else None
            keep = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            if (
                func is torch.ops.aten.bernoulli_.float
                and isinstance(self_, torch.Tensor)
                and isinstance(keep, float)
                and kwargs.get("generator") is None
            ):
                self.draws.append(
                    Draw(tuple(self_.shape), tuple(self_.stride()), self_.dtype, keep)
                )
            else:  # another draw (normal_, a generator given): the sites do not reproduce it
                self.draws = None
        return func(*args, **kwargs)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(
        t.shape, t.stride(), dtype=t.dtype, device="meta", requires_grad=t.requires_grad
    )


class NotRecorded(Exception):
    """The template's forward did not run on meta tensors in this call's context (a hook of
    the caller's that copies what autograd saves, a module hook that would see them, say):
    no record, and none to keep."""


def _drop(t: torch.Tensor) -> None:
    return None


def _never(packed: None) -> torch.Tensor:  # pragma: no cover - nothing runs backward
    raise RuntimeError("a record's meta forward has no backward")


def record(
    template: nn.Module, tensors: Mapping[str, torch.Tensor], inputs: tuple[torch.Tensor, ...]
) -> list[Draw] | None:
    """The draws one member's forward makes on ``inputs`` (one member's, any device), or
    ``None`` where it draws other than ``bernoulli_``.

    The template's forward runs on meta copies of member 0's slices of the
    stacked ``tensors`` (their dtypes, which ``Ensemble.to`` changes and the
    template's own meta tensors do not follow) and of the inputs: nothing is
    computed, no generator moves. It runs in the call's grad mode, what it
    writes to its modules' attributes is put back, and the caller's dispatch
    and ``__torch_function__`` modes and saved-tensor hooks do not see it (a
    non-reentrant checkpoint counted its saved tensors; ``save_on_cpu`` failed
    on them). Not where a module hook would run (the template's, or one for
    every module): a user's hook must not see meta tensors, and the plans that
    record run no hooks.

    Raises:
        NotRecorded: the forward raised on meta tensors (a forward reading values), or a
            module hook would run.
    """
    if any(global_module_hooks()) or any(has_module_hooks(m) for m in template.modules()):
        raise NotRecorded("a module hook would run on the record's meta tensors")
    state = AttributeState(watched(template.named_modules()), keep=True)
    generators = GlobalRandom(torch_too=True)
    recorder = _Recorder()
    try:
        # A FLOP counter or tracker of the caller's does not see this run.
        with (
            no_dispatch_modes(),
            no_torch_function(),
            torch.autograd.graph.saved_tensors_hooks(_drop, _never),
        ):
            member = {
                name: torch.empty(
                    t.shape[1:], dtype=t.dtype, device="meta", requires_grad=t.requires_grad
                )
                for name, t in tensors.items()
            }
            xs = tree_map_only(torch.Tensor, _meta, inputs)
            with recorder:
                torch.func.functional_call(template, member, xs)
    except Exception as e:  # a forward that cannot run on meta tensors
        raise NotRecorded(str(e)) from e
    finally:
        state.restore()
        if generators.moved():
            generators.restore()
    return recorder.draws


class Schedules:
    """One member's draws (:func:`record`) per kind of call, as a plan keys it, and per
    stacked dtypes (``Ensemble.to`` changes them between calls of a kind): recorded once,
    kept for at most ``MAX`` kinds (then forgotten all at once); a record that fails
    (:class:`NotRecorded`) is not kept, so a later call of the kind records again."""

    MAX = 4096

    def __init__(self) -> None:
        self._kept: dict[tuple[Any, ...], list[Draw] | None] = {}

    def get(
        self,
        key: tuple[Any, ...],
        template: nn.Module,
        tensors: Mapping[str, torch.Tensor],
        inputs: tuple[torch.Tensor, ...],
    ) -> list[Draw] | None:
        """The draws of a call of kind ``key`` on one member's ``inputs``, or ``None`` where
        there is no record (:func:`record`), or none in this call's context."""
        k = (key, tuple(t.dtype for t in tensors.values()))
        if k not in self._kept:
            try:
                found = record(template, tensors, inputs)
            except NotRecorded:
                return None
            if len(self._kept) >= self.MAX:
                self._kept.clear()
            self._kept[k] = found
        return self._kept[k]


class Draws:
    """Every member's draws of one call (or chunk), made in the loop's order on creation and
    handed to the batched plans' random sites in turn (:meth:`take`)."""

    def __init__(self, schedule: list[Draw], n: int, device: torch.device) -> None:
        self._schedule = schedule
        # Per draw, every member's mask stacked, (n, *size): member i's is drawn into
        # row i (a contiguous tensor of the draw's strides, filled as eager fills its
        # own), or on its own and stacked after for a draw of other strides.
        self._masks: list[torch.Tensor | None] = []
        rows: list[list[torch.Tensor]] = []
        # Inside the kernels of the members' dropout, as in eager: a caller's
        # TorchFunctionMode (a NaN check) does not see the masks' uninitialised memory.
        with no_torch_function():
            for d in schedule:
                stacked = torch.empty((n, *d.size), dtype=d.dtype, device=device)
                if stacked[0].stride() == d.stride:
                    self._masks.append(stacked)
                    rows.append(list(stacked.unbind(0)))
                else:
                    self._masks.append(None)
                    rows.append(
                        [
                            torch.empty_strided(d.size, d.stride, dtype=d.dtype, device=device)
                            for _ in range(n)
                        ]
                    )
            for i in range(n):  # member after member, as the loop draws
                for d, row in zip(schedule, rows, strict=True):
                    row[i].bernoulli_(d.keep)
        self._rows = rows
        self._next = 0

    def take(self, size: tuple[int, ...], keep: float, error: type[Exception]) -> torch.Tensor:
        """Every member's mask of the next draw (0 or 1, in the draw's dtype), stacked
        ``(n, *size)``, which must be a draw of ``size`` with probability ``keep``; else
        ``error`` is raised. The masks are handed over: no other reference is kept."""
        j = self._next
        if j >= len(self._schedule):
            raise error("a random site the members' forward does not draw at")
        d = self._schedule[j]
        if d.size != tuple(size) or d.keep != keep:
            raise error(
                f"a random site drawing {tuple(size)} with p={1 - keep:g} where the members' "
                f"forward draws {d.size} with p={1 - d.keep:g}"
            )
        self._next += 1
        masks, rows = self._masks[j], self._rows[j]
        self._masks[j], self._rows[j] = None, []
        return torch.stack(rows) if masks is None else masks

    def finish(self, error: type[Exception]) -> None:
        """Raise ``error`` unless every draw of the members' forward was taken."""
        if self._next != len(self._schedule):
            raise error("the members' forward draws at sites this plan does not reach")


def exact_possible(stacked: Iterable[torch.Tensor], inputs: Iterable[Any]) -> bool:
    """Whether a call on ``inputs`` with the members' ``stacked`` tensors can draw the loop's
    masks by a record: not on an accelerator (torch's dropout is one fused kernel there),
    under ``torch.compile``, a ``torch.func`` transform, inference mode or autocast (the
    record, on meta tensors, would not see what they change), for DTensors (each rank
    would draw every mask of the global shapes), or for inputs or stacked tensors that
    are not contiguous (the record's strides are those of torch's meta kernels, which are
    eager's for contiguous tensors; a mask drawn with other strides is filled in another
    order: a channels_last input gave other masks). Contiguous means torch's own strides,
    size-1 dimensions included: ``is_contiguous()`` skips those, and a channels_last 1x1
    convolution weight, or a one-channel input laid out channels_last, passes it while
    torch's convolution reads the strides and gives a channels_last output, whose masks
    the record's contiguous ones are not (5.7 off the loop before the second session of
    2026-12-07)."""
    tensors = list(stacked)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor)]
    return not (
        not tensors
        or tensors[0].device.type != "cpu"
        or torch.compiler.is_compiling()
        or functorch_transform_active()
        or torch.is_inference_mode_enabled()
        or any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
        or any(is_dtensor(t) or not _plainly_contiguous(t) for t in (*tensors, *leaves))
    )


def _plainly_contiguous(t: torch.Tensor) -> bool:
    """Whether ``t`` has the strides ``torch.empty(t.shape)`` has, size-1 dimensions
    included (see :func:`exact_possible`)."""
    expected = 1
    for size, stride in zip(reversed(t.shape), reversed(t.stride()), strict=True):
        if stride != expected:
            return False
        expected *= max(size, 1)  # as torch strides a tensor with an empty dimension
    return True


# The alpha of torch's alpha dropout (SELU's negative saturation, -scale * alpha).
_SELU_ALPHA = 1.7580993408473766


def dropped(
    draws: Draws,
    t: torch.Tensor,
    p: float,
    training: bool,
    inplace: bool,
    size: tuple[int, ...],
    lay_out: Callable[[torch.Tensor], torch.Tensor],
    error: type[Exception],
    *,
    alpha: bool = False,
) -> torch.Tensor:
    """``t`` (every member's activation) after dropout with the masks the loop draws.

    torch's dropout on the CPU, for each member at once: no draw in eval mode,
    for ``p == 0`` or an empty tensor; zeros for ``p == 1``; else
    ``noise.bernoulli_(1 - p).div_(1 - p)`` (``noise`` of the member's ``size``)
    and ``t * noise`` (an alpha dropout scales and shifts the noise as torch's
    does). ``lay_out`` puts the members' noises (stacked, ``(n, *size)``) in ``t``'s
    layout, as a new tensor or a view (the noise is changed in place); ``error`` is the
    plan's, raised where the draw is not the one the members make here.
    """
    if not training or p == 0 or t.numel() == 0:
        return t
    if p == 1:
        zero = torch.zeros((), dtype=t.dtype, device=t.device)
        return t.mul_(zero) if inplace else t * zero
    masks = draws.take(size, 1 - p, error)
    if masks.dtype != t.dtype:  # the record saw another dtype (autocast, say)
        raise error("dropout masks of another dtype than the activation")
    noise = lay_out(masks)
    if alpha:
        a = 1.0 / math.sqrt((_SELU_ALPHA * _SELU_ALPHA * p + 1) * (1 - p))
        shift = noise.add(-1).mul_(_SELU_ALPHA * a).add_(_SELU_ALPHA * a * p)
        noise.mul_(a)
        return (t.mul_(noise) if inplace else t * noise).add_(shift)
    noise.div_(1 - p)
    return t.mul_(noise) if inplace else t * noise
