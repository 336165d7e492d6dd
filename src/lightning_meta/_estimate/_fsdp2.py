"""FSDP2's buffers on one rank, allocated and freed where torch's ``FSDPParamGroup`` does.

Used by :class:`~lightning_meta._estimate._ranks.RankStep` under
``strategy="fsdp"``: each unit (a block given to ``fully_shard``, then the
root) holds its padded dim-0 shards; what it gathers and reduces is made
here, on fake tensors under the step's modes, so that the step's tracker
counts it:

* forward (``pre_forward``): the all-gather output (kept until the next
  unit's copy-out, the root frees the last one) and the unsharded
  parameters (freed after the unit's forward with ``reshard_after_forward``;
  the root keeps them); with a ``MixedPrecisionPolicy`` the cast shards the
  all-gather reads, and floating inputs cast to ``param_dtype``;
* backward (``pre_backward``, on the first gradient of the unit's outputs):
  the unit's all-gather, unless prefetched, and the prefetch of the unit
  before it in forward order;
* after the unit's backward (``post_backward``, once its inputs' gradients
  exist; the rest at the end of backward): reshard, the reduce-scatter input
  (kept until the next unit's reduce-scatter), the unsharded gradients
  freed (the last one once the reduce-scatter returned, on the torch versions
  whose ``foreach_reduce`` holds it: :func:`~lightning_meta._compat.fsdp2_reduce_holds_last_grad`),
  the new sharded gradients.

Checked against torch 2.13's ``_fsdp_param_group.py`` and
``_fsdp_collectives.py`` (torch 2.6 orders these the same way).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_meta._compat import (
    fsdp2_reduce_holds_last_grad,
    tree_flatten,
    tree_leaves,
    tree_unflatten,
)
from lightning_meta._estimate._layout import Unit
from lightning_meta._estimate._track import LiveBytes

__all__ = ["FSDP2", "UnitState", "unit_hooks"]


class _PostBackward(torch.autograd.Function):
    """Call ``callback`` once the gradients of a unit's inputs are computed (FSDP2's hook)."""

    @staticmethod
    def forward(ctx: Any, callback: Callable[[], None], *inputs: torch.Tensor) -> Any:
        ctx.callback = callback
        return inputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        ctx.callback()
        return (None, *grads)


@dataclass
class UnitState:
    unit: Unit
    compute: list[nn.Parameter]
    shards: list[nn.Parameter]
    #: padded shard elements of all parameters, and of the trainable ones
    numel: int
    grad_numel: int
    unsharded: torch.Tensor | None = None
    prefetched: torch.Tensor | None = None
    state: str = "idle"
    post_forward_indices: list[int] = field(default_factory=list)


class FSDP2:
    """FSDP2's buffers for one rank, allocated and freed where ``FSDPParamGroup`` does."""

    def __init__(
        self,
        units: list[UnitState],
        ranks: int,
        param_dtype: torch.dtype,
        cast: bool,
        reduce_dtype: torch.dtype | None,
        device: torch.device,
        tracker: LiveBytes,
        reshard_after_forward: bool,
        gloo: bool = False,
    ) -> None:
        self.gloo = gloo
        self.units = units
        self.ranks = ranks
        self.param_dtype = param_dtype
        self.cast = cast
        self.reduce_dtype = reduce_dtype
        self.device = device
        self.tracker = tracker
        self.reshard_after_forward = reshard_after_forward
        self.all_gather_state: torch.Tensor | None = None
        self.reduce_scatter_state: torch.Tensor | None = None
        self.order: list[UnitState] = []

    def _empty(self, numel: int, dtype: torch.dtype, category: str) -> torch.Tensor:
        t = torch.empty((numel,), dtype=dtype, device=self.device)
        self.tracker.retag(t, category)
        return t

    # -- all-gather
    def _all_gather(self, u: UnitState) -> torch.Tensor | None:
        """Allocate the flat all-gather output (and the cast copy-in it is filled from)."""
        if self.ranks == 1:
            return None
        # the cast shards the all-gather reads are freed when it returns
        copy_in = self._empty(u.numel, self.param_dtype, "communication") if self.cast else None
        out = self._empty(u.numel * self.ranks, self.param_dtype, "communication")
        self._collective(out)
        del copy_in
        return out

    def _collective(self, like: torch.Tensor) -> None:
        """What the backend allocates while a collective runs: gloo stages a copy of it, NCCL
        nothing; on one rank there is no collective (FSDP2 copies the input to the output)."""
        if self.gloo and self.ranks > 1:
            staged = self._empty(like.numel(), like.dtype, "communication")
            del staged

    def _copy_out(self, u: UnitState) -> None:
        if self.ranks == 1 and self.cast:  # the cast all-gather input, per parameter
            cast = self._empty(u.numel, self.param_dtype, "communication")
            u.unsharded = self._empty(u.numel, self.param_dtype, "parameters")
            del cast
            return
        u.unsharded = self._empty(u.numel * self.ranks, self.param_dtype, "parameters")

    def pre_forward(self, u: UnitState) -> None:
        if u.unsharded is not None:
            return
        out = self._all_gather(u)
        self.all_gather_state = None  # the previous unit's, freed after this all-gather
        self._copy_out(u)
        self.all_gather_state = out  # kept until the next unit's copy-out

    def post_forward(self, u: UnitState, root: bool) -> None:
        if not root and self.reshard_after_forward:
            u.unsharded = None
        self.order.append(u)
        u.post_forward_indices.append(len(self.order) - 1)
        if root:
            self.all_gather_state = None

    def pre_backward(self, u: UnitState) -> None:
        if u.state == "pre_backward":
            return
        u.state = "pre_backward"
        if u.unsharded is None:
            out = u.prefetched if u.prefetched is not None else self._all_gather(u)
            u.prefetched = None
            self._copy_out(u)
            del out
        if u.post_forward_indices:
            index = u.post_forward_indices.pop()
            if index > 0:
                target = self.order[index - 1]
                if target.unsharded is None and target.prefetched is None:
                    target.prefetched = self._all_gather(target)

    def post_backward(self, u: UnitState) -> None:
        if u.state == "post_backward":
            return
        u.state = "post_backward"
        grads = [p.grad for p in u.compute if p.grad is not None]
        for p in u.compute:
            p.grad = None
        u.unsharded = None
        if not grads:
            return
        self.reduce_scatter_state = None
        reduce_dtype = self.reduce_dtype or grads[0].dtype
        rs_input = self._empty(u.grad_numel * self.ranks, reduce_dtype, "communication")
        # copied in: the unsharded gradients are freed, but for the last one where
        # torch's loop variable holds it until the reduce returns
        held = grads[-1] if self.ranks > 1 and fsdp2_reduce_holds_last_grad() else None
        grads.clear()
        output = self._empty(u.grad_numel, reduce_dtype, "gradients")
        self._collective(rs_input)
        orig = u.shards[0].dtype if u.shards else reduce_dtype
        if orig != reduce_dtype:
            output = self._empty(u.grad_numel, orig, "gradients")
        del held
        offset = 0
        for p in u.shards:
            if p.requires_grad:
                p.grad = output.narrow(0, offset, p.numel()).view(p.shape)
                offset += p.numel()
        self.reduce_scatter_state = rs_input

    def finish_backward(self) -> None:
        """The root's final callback: reduce-scatter what autograd did not, then free the last input."""
        for u in reversed(self.units):
            self.post_backward(u)
        self.reduce_scatter_state = None
        for u in self.units:
            u.state = "idle"
            u.post_forward_indices.clear()
        self.order.clear()


def _cast_inputs(dtype: torch.dtype, args: Any, kwargs: Any) -> tuple[Any, Any]:
    """FSDP2's ``cast_forward_inputs``: floating inputs of a unit in ``param_dtype``."""
    leaves, spec = tree_flatten((args, kwargs))
    cast = [
        t.to(dtype)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype
        else t
        for t in leaves
    ]
    out: tuple[Any, Any] = tree_unflatten(cast, spec)
    return out


@contextlib.contextmanager
def unit_hooks(fsdp: FSDP2, u: UnitState, root: bool) -> Iterator[None]:
    """FSDP2's forward hooks on one unit: unshard, register the backward hooks, reshard."""

    def pre(mod: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any]:
        if fsdp.cast and fsdp.param_dtype is not None:
            args, kwargs = _cast_inputs(fsdp.param_dtype, args, kwargs)
        fsdp.pre_forward(u)
        leaves, spec = tree_flatten((args, kwargs))
        index = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
        if index and torch.is_grad_enabled():
            wrapped = _PostBackward.apply(
                functools.partial(fsdp.post_backward, u), *(leaves[i] for i in index)
            )
            for i, t in zip(index, wrapped, strict=True):
                leaves[i] = t
        new: tuple[Any, Any] = tree_unflatten(leaves, spec)
        return new

    def post(mod: nn.Module, args: Any, output: Any) -> None:
        fsdp.post_forward(u, root)
        if torch.is_grad_enabled():
            for t in tree_leaves(output):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(functools.partial(_pre_backward, fsdp, u))

    module = u.unit.module
    handles = [
        module.register_forward_pre_hook(pre, with_kwargs=True),
        module.register_forward_hook(post),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _pre_backward(fsdp: FSDP2, u: UnitState, grad: torch.Tensor) -> torch.Tensor:
    fsdp.pre_backward(u)
    return grad
