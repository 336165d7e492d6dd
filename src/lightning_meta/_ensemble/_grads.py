"""Gradient memory for the ensemble's own backward functions, reused from step to step.

A stacked gradient of a large layer is one large allocation: 32 members of
1024x1024 float32 weights is 128 MiB. glibc serves every allocation above
32 MiB with a fresh ``mmap`` and returns it with ``munmap`` when the gradient
is dropped (``optimizer.zero_grad()`` sets ``.grad`` to None), so every
training step page-faults that memory anew; a loop over separate members
never crosses the threshold. The backward functions of the fused and loop
paths therefore write such gradients into buffers kept here, and hand out an
alias that autograd's ``AccumulateGrad`` adopts as ``.grad`` without a copy.

A buffer is reused only when no tensor but the cache refers to its memory:
a ``.grad`` still alive (gradient accumulation, a reference the user kept)
keeps it, and a new buffer is allocated instead. The memory held between
steps is what the gradients occupy during the step, so peak memory does not
grow. Only CPU tensors of at least ``REUSE_BYTES`` take part: accelerator
allocators cache blocks themselves, and small blocks stay on glibc's heap.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_meta._compat import (
    custom_functions_unsupported,
    plain_backward_needed,
    storage_users,
)

__all__ = ["REUSE_BYTES", "GradBuffers", "unstack"]

# From this size on (bytes), a stacked gradient goes through the cache.
REUSE_BYTES = 1 << 22


class GradBuffers:
    """Keyed gradient buffers; neither pickled nor copied (a copy starts empty)."""

    def __init__(self) -> None:
        self._memory: dict[str, torch.Tensor] = {}

    def __reduce__(self) -> tuple[type[GradBuffers], tuple[()]]:
        return (GradBuffers, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> GradBuffers:
        return GradBuffers()

    def __len__(self) -> int:
        return len(self._memory)

    def clear(self) -> None:
        """Drop every buffer (their memory returns to the allocator)."""
        self._memory.clear()

    def empty_like(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """Return contiguous uninitialised memory shaped like ``like`` to write a gradient into.

        The result is a fresh alias of the cached buffer (never the cached
        tensor itself), so ``AccumulateGrad`` may adopt it as ``.grad``.
        """
        return self.empty(key, like.shape, like.dtype, like.device)

    def empty(
        self, key: str, shape: torch.Size, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """:meth:`empty_like` from a shape, dtype and device."""
        if device.type != "cpu" or shape.numel() * dtype.itemsize < REUSE_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        buffer = self._memory.get(key)
        if (
            buffer is None
            or buffer.shape != shape
            or buffer.dtype != dtype
            or storage_users(buffer) > 1
        ):
            buffer = torch.empty(shape, dtype=dtype, device=device)
            self._memory[key] = buffer
        return buffer.detach()


class _Unstack(torch.autograd.Function):
    """``stacked.unbind(0)`` whose backward stacks the member gradients into a reused buffer."""

    @staticmethod
    def forward(stacked: torch.Tensor, buffers: GradBuffers, key: str) -> tuple[torch.Tensor, ...]:
        return tuple(stacked.unbind(0))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        stacked, ctx.buffers, ctx.key = inputs
        ctx.meta = (stacked.shape, stacked.dtype, stacked.device)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if torch.is_grad_enabled() or plain_backward_needed():
            # create_graph=True (a gradient penalty differentiates this): a fresh
            # stack autograd can differentiate again (the reused buffer is not);
            # a batched backward (is_grads_batched=True) runs under vmap, which
            # has no batching rule for stack's out=.
            return torch.stack(grads), None, None
        out = ctx.buffers.empty(ctx.key, *ctx.meta)
        torch.stack(grads, out=out)
        return out, None, None


def unstack(stacked: torch.Tensor, buffers: GradBuffers, key: str) -> tuple[torch.Tensor, ...]:
    """Return the member views ``stacked[0], stacked[1], ...`` (one autograd node for all).

    Large CPU tensors that need a gradient get it through ``buffers``;
    everything else is a plain ``unbind``.
    """
    if (
        not stacked.requires_grad
        or not torch.is_grad_enabled()
        or stacked.device.type != "cpu"
        or stacked.numel() * stacked.element_size() < REUSE_BYTES
        or custom_functions_unsupported()
    ):
        return stacked.unbind(0)
    return _Unstack.apply(stacked, buffers, key)  # type: ignore[no-any-return]
