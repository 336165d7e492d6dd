"""The grouped plan's dropout masks, drawn as a loop over the members draws them.

A loop over the members runs member 0's forward, then member 1's: every mask
of member 0 is drawn before any of member 1, each from the generator's state
the previous draws left. The grouped plan runs a layer for every member at
once, so drawing there puts the stream onto other elements. Instead, one
member's draws in a call are recorded once per kind of call (the template's
own forward run on meta tensors of one member's shapes, under a dispatch mode
that notes every op tagged ``nondeterministic_seeded``), drawn for every member
in the loop's order before the grouped run, each with the sizes, strides and
dtype of the record (eager's for contiguous inputs: see
``GroupedPlan._exact`` for where the record is not used), and handed to the
plan's random sites in turn. A site checks that the draw it gets is the one it
stands for (sizes, probability, dtype), and
that every draw was taken is checked at the end, so a template whose draws the
sites do not reproduce raises :class:`~lightning_meta._ensemble._grouped.NotGroupableError`
and runs the loop (the generator put back first).

Only CPU tensors draw this way: on an accelerator torch's dropout is one fused
kernel (``native_dropout``), whose offsets into the generator's stream these
draws would not reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_meta._compat import TorchDispatchMode, no_dispatch_modes, tree_map_only
from lightning_meta._forward_state import AttributeState, GlobalRandom, watched

__all__ = ["Draw", "Draws", "record"]


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


def record(template: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Draw] | None:
    """The draws one member's forward makes on ``inputs`` (one member's, any device), or
    ``None`` where it draws other than ``bernoulli_`` or cannot run on meta tensors.

    The template holds meta tensors; its forward runs on meta copies of the
    inputs (nothing is computed, no generator moves) in the call's grad mode,
    and what it writes to its modules' attributes is put back.
    """
    state = AttributeState(watched(template.named_modules()), keep=True)
    generators = GlobalRandom(torch_too=True)
    recorder = _Recorder()
    try:
        # A FLOP counter or tracker of the caller's does not see this run.
        with no_dispatch_modes(), recorder:
            template(*tree_map_only(torch.Tensor, _meta, inputs))
    except Exception:  # a forward that cannot run on meta tensors: no record
        return None
    finally:
        state.restore()
        if generators.moved():
            generators.restore()
    return recorder.draws


class Draws:
    """Every member's draws of one call (or chunk), made in the loop's order on creation and
    handed to the grouped plan's random sites in turn (:meth:`take`)."""

    def __init__(self, schedule: list[Draw], n: int, device: torch.device) -> None:
        self._schedule = schedule
        # Per draw, every member's mask: drawn member after member, as the loop does.
        self._masks: list[list[torch.Tensor]] = [[] for _ in schedule]
        for _ in range(n):
            for d, masks in zip(schedule, self._masks, strict=True):
                empty = torch.empty_strided(d.size, d.stride, dtype=d.dtype, device=device)
                masks.append(empty.bernoulli_(d.keep))
        self._next = 0

    def take(
        self, size: tuple[int, ...], keep: float, error: type[Exception]
    ) -> list[torch.Tensor]:
        """Every member's mask of the next draw (0 or 1, in the draw's dtype), which must be
        a draw of ``size`` with probability ``keep``; else ``error`` is raised. The masks
        are handed over: the caller's layout of them is the only copy kept."""
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
        masks, self._masks[j] = self._masks[j], []
        return masks

    def finish(self, error: type[Exception]) -> None:
        """Raise ``error`` unless every draw of the members' forward was taken."""
        if self._next != len(self._schedule):
            raise error("the members' forward draws at sites this plan does not reach")
