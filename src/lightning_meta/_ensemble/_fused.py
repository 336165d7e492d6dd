"""A batched-matmul path for ensembles of ``Linear`` + activation stacks.

On the CPU, ``torch.vmap`` over small MLPs costs more than a Python loop over
the members; one batched matmul per layer costs less than both. The path
applies only where it computes exactly what each member would: an
``nn.Sequential`` whose children are ``nn.Linear`` or stateless element-wise
modules (applied to the whole stack at once, which is the same function).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["FusedPlan", "NotFusableError", "plan_fused"]

# Stateless and element-wise: applying them to (N, M, F) equals applying them
# to each member's (M, F).
_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Identity,
)
# From this many multiply-adds per member on, a layer computes its weight
# gradient member by member (see _StackedLinear).
_PER_MEMBER_GRAD_MACS = 1 << 21
_DROPOUT: tuple[type[nn.Module], ...] = (nn.Dropout, nn.AlphaDropout)


@dataclass(frozen=True)
class FusedPlan:
    """The layers of a fusable template: ``("linear", prefix)`` or ``("apply", index)``."""

    steps: tuple[tuple[str, str], ...]
    in_features: int

    def __call__(
        self,
        template: nn.Module,
        tensors: dict[str, torch.Tensor],
        x: torch.Tensor,
        per_member: bool,
    ) -> torch.Tensor:
        """Run every member on ``x`` at once; returns ``(N, *lead, out)``."""
        n = next(iter(tensors.values())).shape[0]
        if x.ndim < (2 if per_member else 1) or x.shape[-1] != self.in_features:
            # Let the generic path raise torch's own, member-level error.
            raise NotFusableError
        lead = x.shape[1:-1] if per_member else x.shape[:-1]
        # Activations are kept feature-major, (N, F, M): every weight gradient
        # then comes out of its matmul contiguous, and accumulating it into
        # ``.grad`` stays a plain streaming add (a transposed gradient made
        # that add several times slower than the matmuls themselves).
        h = x.reshape(n, -1, x.shape[-1]).transpose(1, 2) if per_member else x.reshape(-1, x.shape[-1])
        shared = not per_member
        for kind, ref in self.steps:
            if kind == "apply":
                h = template.get_submodule(ref)(h)
                continue
            weight = tensors[f"{ref}.weight"]
            bias = tensors.get(f"{ref}.bias")
            out_f = weight.shape[1]
            if shared:
                # One GEMM against all members' weights stacked row-wise.
                flat = weight.reshape(n * out_f, -1)
                if bias is None:
                    h = torch.mm(flat, h.t())
                else:
                    h = torch.addmm(bias.reshape(n * out_f, 1), flat, h.t())
                h = h.view(n, out_f, -1)
                shared = False
            elif (
                weight.shape[1] * weight.shape[2] * h.shape[2] >= _PER_MEMBER_GRAD_MACS
                and not torch.is_autocast_enabled(h.device.type)
            ):
                h = _StackedLinear.apply(h, weight, bias)
            elif bias is None:
                h = torch.bmm(weight, h)
            else:
                h = torch.baddbmm(bias.unsqueeze(2), weight, h)
        if shared:  # no Linear at all: plan_fused never plans that
            raise NotFusableError
        return h.transpose(1, 2).reshape(n, *lead, h.shape[1])


class _StackedLinear(torch.autograd.Function):
    """``weight @ h + bias`` for every member, one ``torch.mm`` per member.

    For large layers on the CPU, ``torch.bmm`` runs these products up to 2.4x
    slower than one ``torch.mm`` per member (its weight gradient ``grad @ h^T``
    has the short batch as inner dimension); measured with 32 members of
    1024x1024, batch 64, 1 thread. Each product is written straight into the
    stacked output or gradient, so no slice is stacked or copied afterwards.
    """

    @staticmethod
    def forward(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = h.new_empty(weight.shape[0], weight.shape[1], h.shape[2])
        for i in range(weight.shape[0]):
            if bias is None:
                torch.mm(weight[i], h[i], out=out[i])
            else:
                torch.addmm(bias[i].unsqueeze(1), weight[i], h[i], out=out[i])
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        h, weight, bias = inputs
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight = ctx.saved_tensors
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.empty_like(h, memory_format=torch.contiguous_format)
            for i in range(weight.shape[0]):
                torch.mm(weight[i].t(), grad[i], out=grad_h[i])
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
            for i in range(weight.shape[0]):
                torch.mm(grad[i], h[i].t(), out=grad_w[i])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(2)
        return grad_h, grad_w, grad_b


class NotFusableError(Exception):
    """Raised inside the fused path when the inputs do not fit it."""


def plan_fused(template: nn.Module, randomness: str) -> FusedPlan | None:
    """Return a plan when ``template`` can run on the batched-matmul path, else ``None``."""
    if type(template) is not nn.Sequential or len(template) == 0:
        return None
    if template._forward_hooks or template._forward_pre_hooks:
        return None
    steps: list[tuple[str, str]] = []
    in_features: int | None = None
    for name, child in template.named_children():
        if child._forward_hooks or child._forward_pre_hooks:
            return None
        if type(child) is nn.Linear:
            in_features = in_features or child.in_features
            steps.append(("linear", name))
        elif type(child) in _ELEMENTWISE:
            steps.append(("apply", name))
        elif type(child) in _DROPOUT and randomness == "different":
            # Dropout on the whole stack draws an independent mask per member,
            # which is what randomness="different" promises.
            steps.append(("apply", name))
        else:
            return None
    if in_features is None or steps[0][0] != "linear":
        return None
    return FusedPlan(tuple(steps), in_features)
