"""A batched-matmul path for ensembles of ``Linear`` + activation stacks.

On the CPU, ``torch.vmap`` over small MLPs costs more than a Python loop over
the members; one batched matmul per layer costs less than both. The path
applies only where it computes exactly what each member would: an
``nn.Sequential`` whose children are ``nn.Linear`` or stateless element-wise
modules (applied to the whole stack at once, which is the same function).
Dropout takes the masks a loop over the members draws, where it can (see
:mod:`._draws`); elsewhere it draws on the stacked activations, other masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_meta._compat import (
    custom_functions_unsupported,
    has_module_hooks,
    plain_backward_needed,
)
from lightning_meta._ensemble._draws import Draw, Draws, Schedules, dropped, exact_possible
from lightning_meta._ensemble._grads import GradBuffers

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "FusedPlan",
    "NotFusableError",
    "Refusal",
    "Step",
    "draws",
    "draws_in_forward",
    "plan_fused",
]

# Stateless, element-wise activations: applying them to (N, M, F) equals
# applying them to each member's (M, F), and to member-stacked channels
# (the grouped plan uses them too).
ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
)
_ELEMENTWISE: tuple[type[nn.Module], ...] = (*ELEMENTWISE_ACTIVATIONS, nn.Identity)
# From this many multiply-adds per member on, a layer computes its weight
# gradient member by member (see _StackedLinear).
_PER_MEMBER_GRAD_MACS = 1 << 21
_DROPOUT: tuple[type[nn.Module], ...] = (nn.Dropout, nn.AlphaDropout)


def draws(mod: nn.Module, kinds: tuple[type[nn.Module], ...]) -> bool:
    """Whether ``mod`` is one of ``kinds`` (dropout layers) drawing random numbers in
    this call: in training mode, with ``p > 0`` (a kind without ``p`` always draws)."""
    return isinstance(mod, kinds) and mod.training and getattr(mod, "p", 1.0) > 0


def draws_in_forward(mod: nn.Module) -> bool:
    """Whether ``mod`` is one of torch's modules that draw random numbers in their own
    forward, not through a dropout layer, and draws in this call: ``nn.MultiheadAttention``
    and a multi-layer RNN with ``dropout > 0`` in training mode, a fractional max pool
    without fixed samples (in either mode)."""
    if isinstance(mod, nn.MultiheadAttention):
        return mod.training and mod.dropout > 0
    if isinstance(mod, nn.RNNBase):
        return mod.training and mod.dropout > 0 and mod.num_layers > 1
    if isinstance(mod, (nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)):
        return mod._random_samples is None
    return False


# From this weight size on (bytes), the first (shared-input) layer computes its
# weight gradient into a reused buffer too (see _grads).
_REUSE_WEIGHT_BYTES = 1 << 22


@dataclass(frozen=True)
class Step:
    """One layer of a fused plan: ``kind`` ``"linear"`` (a Linear, whose ``weight`` and ``bias``
    are the names of the stacked tensors it reads: the first name of each tie group) or
    ``"apply"`` (a module applied to the whole stack); ``path``: the layer in the template."""

    kind: str
    path: str
    weight: str = ""
    bias: str | None = None


@dataclass(frozen=True)
class FusedPlan:
    """The layers of a fusable template, in order."""

    steps: tuple[Step, ...]
    in_features: int
    # One member's draws per kind of call (see _draws).
    _schedules: Schedules = field(default_factory=Schedules, compare=False, repr=False)

    def _dropouts(self, modules: Mapping[str, nn.Module]) -> list[nn.Module]:
        return [
            mod
            for step in self.steps
            if step.kind == "apply" and type(mod := modules[step.path]) in _DROPOUT
        ]

    def draws(self, modules: Mapping[str, nn.Module]) -> bool:
        """Whether a call in the template's current modes draws random numbers (a dropout in
        training mode with ``p > 0``). ``modules``: the template's modules by dotted path,
        as the ensemble was built with them (it refuses a call after any was replaced)."""
        return any(draws(mod, _DROPOUT) for mod in self._dropouts(modules))

    def exact(
        self,
        template: nn.Module,
        modules: Mapping[str, nn.Module],
        tensors: Mapping[str, torch.Tensor],
        inputs: tuple[Any, ...],
        per_member: bool,
    ) -> list[Draw] | None:
        """One member's draws in a call on ``inputs`` (:class:`._draws.Schedules`), or ``None``
        where this plan cannot draw the loop's masks (:func:`._draws.exact_possible`, hooks,
        a record that failed in this call's context); it then draws on the stacked
        activations."""
        if (
            len(inputs) != 1
            or not isinstance(x := inputs[0], torch.Tensor)
            or not self.fits(x, per_member)
            or not exact_possible(tensors.values(), inputs)
        ):
            return None
        modes = tuple((m.training, getattr(m, "p", None)) for m in self._dropouts(modules))
        key = (x.shape, x.dtype, per_member, torch.is_grad_enabled(), modes)
        return self._schedules.get(key, template, tensors, (x[0] if per_member else x,))

    def fits(self, x: torch.Tensor, per_member: bool) -> bool:
        """Whether ``x`` is an input this plan computes (else the member-level path reports it)."""
        return x.ndim >= (2 if per_member else 1) and x.shape[-1] == self.in_features

    def __call__(
        self,
        modules: Mapping[str, nn.Module],
        tensors: dict[str, torch.Tensor],
        x: torch.Tensor,
        per_member: bool,
        grads: GradBuffers,
        chunk: int = 0,
        schedule: list[Draw] | None = None,
    ) -> torch.Tensor:
        """Run every member on ``x`` at once; returns ``(N, *lead, out)``.

        ``modules``: the template's modules by dotted path (see :meth:`draws`).
        ``grads`` holds the reused memory of large weight gradients, keyed by
        layer and ``chunk`` (the first member of the chunk ``tensors`` hold).
        ``schedule`` (:meth:`exact`): one member's draws; every member's are
        drawn from it in the loop's order (the generator moves as the loop's
        would) and the dropouts take them; a mismatch raises
        :class:`NotFusableError` (the caller puts the generator back). Without
        it dropout draws on the stacked activations.
        """
        n = next(iter(tensors.values())).shape[0]
        if not self.fits(x, per_member) or any(has_module_hooks(m) for m in modules.values()):
            # The generic path raises torch's own, member-level error, and
            # runs hooks added to the template since the plan was made.
            raise NotFusableError
        lead = x.shape[1:-1] if per_member else x.shape[:-1]
        # Activations are kept feature-major, (N, F, M): every weight gradient
        # then comes out of its matmul contiguous, and accumulating it into
        # ``.grad`` stays a plain streaming add (a transposed gradient made
        # that add several times slower than the matmuls themselves).
        h = (
            x.reshape(n, -1, x.shape[-1]).transpose(1, 2)
            if per_member
            else x.reshape(-1, x.shape[-1])
        )
        shared = not per_member
        # The Functions that reuse gradient buffers, only where autograd can run them.
        # Their backwards multiply real matrices: a complex one needs the conjugates
        # (wrong gradients before the second session of 2026-12-07), which autograd's own
        # matmuls take.
        functions = not custom_functions_unsupported() and not x.is_complex()
        member_draws = None if schedule is None else Draws(schedule, n, x.device)
        for step in self.steps:
            if step.kind == "apply":
                mod = modules[step.path]
                if member_draws is not None and type(mod) in _DROPOUT:
                    h = _dropout(member_draws, mod, h, lead)
                else:
                    h = mod(h)
                continue
            weight = tensors[step.weight]
            bias = None if step.bias is None else tensors[step.bias]
            out_f = weight.shape[1]
            key = f"{chunk}:{step.path}.weight"
            macs = weight.shape[1] * weight.shape[2] * h.shape[-1]  # per member
            large = (
                functions
                and weight.device.type == "cpu"
                and weight.numel() * weight.element_size() >= _REUSE_WEIGHT_BYTES
            )
            if shared and large and not torch.is_autocast_enabled(h.device.type):
                h = _SharedLinear.apply(h, weight, bias, grads, key)
                shared = False
            elif shared:
                # One GEMM against all members' weights stacked row-wise.
                flat = weight.reshape(n * out_f, -1)
                if bias is None:
                    h = torch.mm(flat, h.t())
                else:
                    h = torch.addmm(bias.reshape(n * out_f, 1), flat, h.t())
                h = h.view(n, out_f, -1)
                shared = False
            elif (
                functions
                and macs >= _PER_MEMBER_GRAD_MACS
                and not torch.is_autocast_enabled(h.device.type)
            ):
                h = _StackedLinear.apply(h, weight, bias, grads, key)
            elif bias is None:
                h = torch.bmm(weight, h)
            else:
                h = torch.baddbmm(bias.unsqueeze(2), weight, h)
        if shared:  # no Linear at all: plan_fused never plans that
            raise NotFusableError
        if member_draws is not None:
            member_draws.finish(NotFusableError)
        return h.transpose(1, 2).reshape(n, *lead, h.shape[1])


def _dropout(
    member_draws: Draws, mod: nn.Module, h: torch.Tensor, lead: tuple[int, ...]
) -> torch.Tensor:
    """Dropout ``mod`` on the feature-major ``(N, F, M)`` stack with the loop's masks: member
    ``i``'s noise is its activation's, ``(*lead, F)``, transposed into ``h[i]``."""
    assert isinstance(mod, (nn.Dropout, nn.AlphaDropout))
    n, f, _ = h.shape
    return dropped(
        member_draws,
        h,
        mod.p,
        mod.training,
        mod.inplace,
        (*lead, f),
        lambda masks: masks.view(n, -1, f).transpose(1, 2),
        NotFusableError,
        alpha=type(mod) is nn.AlphaDropout,
    )


class _LinearFunction(torch.autograd.Function):
    """What both stacked-Linear functions save: ``(h, weight, bias, grads, key)`` inputs."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        h, weight, bias, ctx.grads, ctx.key = inputs
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None


class _StackedLinear(_LinearFunction):
    """``weight @ h + bias`` for every member, one ``torch.mm`` per member.

    For large layers on the CPU, ``torch.bmm`` runs these products up to 2.4x
    slower than one ``torch.mm`` per member (its weight gradient ``grad @ h^T``
    has the short batch as inner dimension); measured with 32 members of
    1024x1024, batch 64, 1 thread. Each product is written straight into the
    stacked output or gradient, so no slice is stacked or copied afterwards.
    """

    @staticmethod
    def forward(
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grads: GradBuffers,
        key: str,
    ) -> torch.Tensor:
        out = h.new_empty(weight.shape[0], weight.shape[1], h.shape[2])
        for i in range(weight.shape[0]):
            if bias is None:
                torch.mm(weight[i], h[i], out=out[i])
            else:
                torch.addmm(bias[i].unsqueeze(1), weight[i], h[i], out=out[i])
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight = ctx.saved_tensors
        # create_graph=True (a gradient penalty differentiates this), or a batched
        # backward (autograd.grad(is_grads_batched=True), a vectorized jacobian: vmap
        # has no batching rule for out=): plain ops into fresh tensors
        if torch.is_grad_enabled() or plain_backward_needed():
            return _differentiable_backward(ctx, grad, h, weight)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.empty_like(h, memory_format=torch.contiguous_format)
            for i in range(weight.shape[0]):
                torch.mm(weight[i].t(), grad[i], out=grad_h[i])
        if ctx.needs_input_grad[1]:
            grad_w = ctx.grads.empty_like(ctx.key, weight)
            for i in range(weight.shape[0]):
                torch.mm(grad[i], h[i].t(), out=grad_w[i])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(2)
        return grad_h, grad_w, grad_b, None, None


class _SharedLinear(_LinearFunction):
    """The first layer on a shared input: every member's ``weight @ x^T + bias`` as one GEMM.

    What ``torch.addmm`` on the row-stacked weights computes, with the weight
    gradient written into a buffer reused across steps (see ``_grads``).
    ``h`` is ``(M, F)``; the output is ``(N, out, M)``.
    """

    @staticmethod
    def forward(
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grads: GradBuffers,
        key: str,
    ) -> torch.Tensor:
        n, out_f, in_f = weight.shape
        flat = weight.reshape(n * out_f, in_f)
        # Written through a view into the (N, out, M) output, not returned as a
        # view of a 2-D one: autograd refuses in-place ops on a view that a
        # custom Function returns (a ReLU(inplace=True) after this layer).
        out = h.new_empty(n, out_f, h.shape[0])
        if bias is None:
            torch.mm(flat, h.t(), out=out.view(n * out_f, -1))
        else:
            torch.addmm(bias.reshape(n * out_f, 1), flat, h.t(), out=out.view(n * out_f, -1))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight = ctx.saved_tensors
        if torch.is_grad_enabled() or plain_backward_needed():  # see _StackedLinear
            per_member = h.unsqueeze(0).expand(weight.shape[0], *h.shape).transpose(1, 2)
            grads = _differentiable_backward(ctx, grad, per_member, weight)
            # The shared input's gradient is the sum over members.
            return (None if grads[0] is None else grads[0].sum(0).t(), *grads[1:])
        n, out_f, in_f = weight.shape
        flat_grad = grad.reshape(n * out_f, -1)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.mm(flat_grad.t(), weight.reshape(n * out_f, in_f))
        if ctx.needs_input_grad[1]:
            grad_w = ctx.grads.empty_like(ctx.key, weight)
            torch.mm(flat_grad, h, out=grad_w.view(n * out_f, in_f))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(2)
        return grad_h, grad_w, grad_b, None, None


def _differentiable_backward(
    ctx: Any, grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``weight @ h + bias`` per member (``h``: ``(N, in, M)``) in ops autograd
    can differentiate again, into fresh tensors (the reused gradient buffers are not)."""
    grad_h = torch.bmm(weight.transpose(1, 2), grad) if ctx.needs_input_grad[0] else None
    grad_w = torch.bmm(grad, h.transpose(1, 2)) if ctx.needs_input_grad[1] else None
    grad_b = grad.sum(2) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_h, grad_w, grad_b, None, None


class NotFusableError(Exception):
    """Raised inside the fused path when the inputs do not fit it."""


@dataclass(frozen=True)
class Refusal:
    """Why a template cannot take the fused path: the layer (dotted path, ``""`` for the template) and the reason."""

    path: str
    reason: str


def _layer(name: str, module: nn.Module) -> str:
    return f"layer {name!r} ({type(module).__name__})"


#: what a subclass of nn.Sequential may define and still run its layers as nn.Sequential does
_BUILDS_ONLY = frozenset({"__init__", "extra_repr"})
#: what every class body defines
_CLASS_DATA = frozenset(
    {
        "__module__",
        "__qualname__",
        "__doc__",
        "__dict__",
        "__weakref__",
        "__annotations__",
        "__orig_bases__",
        "__parameters__",
        "__firstlineno__",
        "__static_attributes__",
    }
)


def _own_methods(cls: type) -> list[str]:
    """What ``cls`` and its bases below ``nn.Sequential`` define that may change how it runs:
    methods, any descriptor (``functools.partialmethod``, a property), and any name of
    ``nn.Sequential``'s own; not ``__init__`` or plain class data."""
    own: list[str] = []
    for base in cls.__mro__:
        if base is nn.Sequential:
            break
        for name, value in vars(base).items():
            if name in _BUILDS_ONLY or name in _CLASS_DATA or name in own:
                continue
            if callable(value) or hasattr(value, "__get__") or hasattr(nn.Sequential, name):
                own.append(name)
    return own


def plan_fused(template: nn.Module, randomness: str) -> FusedPlan | Refusal:
    """Return a plan when ``template`` can run on the batched-matmul path, else why not."""
    cls = type(template)
    if not isinstance(template, nn.Sequential):
        return Refusal("", f"the template is a {cls.__name__}, not an nn.Sequential")
    # A subclass that only builds its layers (torchvision.ops.MLP) runs them as
    # nn.Sequential does; any method of its own (forward, __call__, __len__...) may not.
    own = _own_methods(cls)
    if own:
        return Refusal(
            "",
            f"the template is a {cls.__name__}, a subclass of nn.Sequential with methods of "
            f"its own ({', '.join(own)}), which the fused path would not run",
        )
    if len(template) == 0:
        return Refusal("", "the template is an empty nn.Sequential")
    if has_module_hooks(template):
        return Refusal(
            "", "the template has hooks or a forward of its own, which the fused path would not run"
        )
    children = list(template.named_children())  # each module once, under its first name
    if len(template) != len(children):  # Sequential's own __len__: _own_methods above
        repeated = next((n for n, c in children if sum(m is c for m in template) > 1), None)
        if repeated is None:  # an entry that is None (add_module(name, None))
            return Refusal("", "the nn.Sequential holds an entry that is not a module")
        name, child = repeated, template.get_submodule(repeated)
        return Refusal(
            name,
            f"{_layer(name, child)} is used more than once in the nn.Sequential, and the "
            "fused path runs each layer once",
        )
    # The stacked tensors are named by the first name of each tie group (a bias
    # tied between two layers is stacked once, under the first layer's name).
    first = {id(t): n for n, t in [*template.named_parameters(), *template.named_buffers()]}
    steps: list[Step] = []
    in_features: int | None = None
    for name, child in children:
        if has_module_hooks(child):
            return Refusal(
                name,
                f"{_layer(name, child)} has hooks or a forward set on the instance, which the fused path would not run",
            )
        if type(child) is nn.Linear:
            weight = first.get(id(child.weight))
            bias = None if child.bias is None else first.get(id(child.bias))
            if weight is None or (child.bias is not None and bias is None):
                return Refusal(
                    name,
                    f"{_layer(name, child)} holds its weight or bias as a plain attribute, "
                    "not a parameter or buffer, which the ensemble does not stack",
                )
            in_features = in_features or child.in_features
            steps.append(Step("linear", name, weight, bias))
        elif in_features is None:
            return Refusal(name, f"{_layer(name, child)} comes before the first nn.Linear")
        elif type(child) in _ELEMENTWISE:
            steps.append(Step("apply", name))
        elif type(child) in _DROPOUT:
            if randomness != "different":
                return Refusal(
                    name,
                    f"{_layer(name, child)} draws random numbers, which the fused path draws per "
                    f"member only (randomness='different'), not with randomness={randomness!r}",
                )
            # Dropout on the whole stack draws an independent mask per member,
            # which is what randomness="different" promises.
            steps.append(Step("apply", name))
        else:
            return Refusal(
                name,
                f"{_layer(name, child)} is neither an nn.Linear nor an element-wise "
                "activation or dropout",
            )
    assert in_features is not None  # the first child is a Linear, or we returned
    return FusedPlan(tuple(steps), in_features)
