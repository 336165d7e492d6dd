"""The grouped plan: every member at once, with the members' channels side by side.

A member's activation ``(B, C, ...)`` becomes part of one tensor ``(B, N*C,
...)``, member-major along dim 1. In that layout a convolution of every
member is one grouped convolution (``groups=N``; a shared input needs no
groups at all: one convolution with ``N*out`` filters), BatchNorm of every
member is one BatchNorm over ``N*C`` channels (its running statistics are
views of the stacked buffers, updated in place), pooling, element-wise
activations, dropout and residual additions apply unchanged, ``flatten(1)``
keeps every member's features contiguous, and a ``Linear`` is one batched
matmul. On the CPU this beats both a loop over the members and ``torch.vmap``
for small and mid-sized convolutional networks. torch's transformer encoder
layers run with the members folded into the batch instead (see
:func:`_encoder_layer`), which beats both in training.

Dropout takes the masks a loop over the members draws, on the CPU: one
member's draws are recorded, every member's drawn in the loop's order before
the run, and each random site takes its own (see :mod:`._draws`).

The template's ``forward`` is traced once with ``torch.fx`` (per train/eval
state, since tracing fixes ``self.training``) and the graph is run op by op.
Only layers and ops whose member-by-member meaning is known are accepted
(:data:`_MODULES`, :data:`_FUNCTIONS`, :data:`_METHODS`); anything else — a
parameter read directly in ``forward``, an op that mixes channels, a shape
read other than the batch size, a hook — keeps the template off this plan
(:class:`~lightning_meta._ensemble._fused.Refusal` names the node), and an
input this plan cannot lay out raises :class:`NotGroupableError` when run.
"""

from __future__ import annotations

import inspect
import math
import operator
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

from lightning_meta._compat import (
    autograd_context_watch,
    has_module_hooks,
    saved_tensor_hooks_on,
    tree_map,
)
from lightning_meta._ensemble._draws import Draw, Draws, Schedules, dropped, exact_possible
from lightning_meta._ensemble._fused import (
    ELEMENTWISE_ACTIVATIONS,
    Refusal,
    draws,
    draws_in_forward,
)
from lightning_meta._forward_state import AttributeState, GlobalRandom, owned_by, watched
from lightning_meta._settings import SettingsWatch

__all__ = ["GroupedPlan", "LayoutLog", "NotGroupableError"]

# How many kinds of call (input shapes, ...) the plan remembers having laid out.
_LAID_OUT_MAX = 4096


class NotGroupableError(Exception):
    """Raised while running the grouped plan on inputs it cannot lay out."""


class LayoutLog:
    """One call of the grouped plan (all its chunks): the kind of call, and the stacked
    buffers its BatchNorms changed in place with their values before, to put back when
    the call turns out not to lay out (the loop then runs it from the start).

    Whether a call lays out depends only on its kind (the graph, the inputs' types,
    shapes, dtypes and devices, gradient mode, chunking), so the values are saved
    only for a kind of call not yet laid out: ``saved`` is ``None`` once it has been.
    """

    __slots__ = ("graph", "key", "rng", "saved")

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key
        self.graph: int | None = None
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        # The CPU generator's state before the call's first draw (see _draws).
        self.rng: torch.Tensor | None = None

    def keep_rng(self) -> None:
        """Note the CPU generator's state before the call draws (its first chunk's draws)."""
        if self.rng is None:
            self.rng = torch.get_rng_state()

    def save(self, *tensors: torch.Tensor | None) -> None:
        if self.saved is not None:
            self.saved.extend((t, t.clone()) for t in tensors if t is not None)

    def restore(self) -> None:
        """Put back what the call changed: the CPU generator's state where it drew, and the
        running statistics (nothing once this kind of call has laid out)."""
        if self.rng is not None:
            torch.set_rng_state(self.rng)
            self.rng = None
        if self.saved:
            with torch.no_grad():
                for t, before in reversed(self.saved):
                    t.copy_(before)
            self.saved.clear()


class _Fold:
    """A tensor holding every member: ``(B, N*C, ...)``, member-major along dim 1."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class _FoldShape:
    """``x.shape`` of a folded ``x``: every dim but the channel dim (1) means the same per member."""

    __slots__ = ("shape",)

    def __init__(self, shape: torch.Size) -> None:
        self.shape = shape

    def __getitem__(self, index: Any) -> int:
        ndim = len(self.shape)
        if isinstance(index, int) and -ndim <= index < ndim and index % ndim != 1:
            return int(self.shape[index])
        raise NotGroupableError(f"shape[{index!r}] of a member activation")

    def __len__(self) -> int:
        return len(self.shape)


class _Context:
    """What the ops of one run need: the template, the stacked tensors, N, randomness."""

    def __init__(
        self,
        template: nn.Module,
        tensors: Mapping[str, torch.Tensor],
        aliases: Mapping[str, str],
        n: int,
        log: LayoutLog,
    ) -> None:
        self.template = template
        self.tensors = tensors
        self.aliases = aliases
        self.n = n
        self.log = log
        # The members' dropout masks in the loop's order (see _draws), or None: each
        # random site then draws on the folded layout, onto other elements than the loop.
        self.draws: Draws | None = None

    def get(self, module_path: str, leaf: str) -> torch.Tensor | None:
        name = f"{module_path}.{leaf}" if module_path else leaf
        return self.tensors.get(self.aliases.get(name, name))

    def fold(self, x: Any) -> _Fold:
        """A shared tensor as every member's copy of it (``(B, C, ...)`` -> ``(B, N*C, ...)``)."""
        if isinstance(x, _Fold):
            return x
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise NotGroupableError("a shared value with no channel dim")
        return _Fold(x.repeat(1, self.n, *([1] * (x.ndim - 2))))


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    """``(N, C, ...)`` stacked tensor -> ``(N*C, ...)`` view (in-place updates reach the stack)."""
    if t is None:
        return None
    try:
        return t.view(t.shape[0] * t.shape[1], *t.shape[2:])
    except RuntimeError as e:  # a non-contiguous stack cannot be flattened in place
        raise NotGroupableError("a stacked tensor that is not contiguous") from e


# ------------------------------------------------------------------ modules
def _conv(ctx: _Context, mod: nn.Module, path: str, x: Any) -> _Fold:
    assert isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(mod)]
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    data = x.t if isinstance(x, _Fold) else x
    if not isinstance(data, torch.Tensor) or data.ndim != dims + 2:
        raise NotGroupableError(f"{type(mod).__name__} on an input without a batch dim")
    weight, bias = _flat(ctx.get(path, "weight")), _flat(ctx.get(path, "bias"))
    assert weight is not None
    padding: Any = mod.padding
    if isinstance(x, _Fold):
        groups = ctx.n * mod.groups
    elif mod.groups == 1:
        groups = 1  # a shared input: one convolution with every member's filters
    else:
        x, groups = ctx.fold(x), ctx.n * mod.groups
        data = x.t
    out = conv(data, weight, bias, mod.stride, padding, mod.dilation, groups)
    return _Fold(out)


def _batch_norm(ctx: _Context, mod: nn.Module, path: str, x: Any) -> _Fold:
    assert isinstance(mod, _BATCH_NORMS)
    x = ctx.fold(x)
    if (
        x.t.ndim
        not in {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}[type(mod)]
    ):
        raise NotGroupableError(f"{type(mod).__name__} on an input of {x.t.ndim} dims")
    running_mean, running_var = ctx.get(path, "running_mean"), ctx.get(path, "running_var")
    tracked = ctx.get(path, "num_batches_tracked")
    # BatchNorm's own forward, with every member's statistics side by side.
    momentum = mod.momentum
    if mod.training:
        ctx.log.save(running_mean, running_var, tracked)
    if mod.training and mod.track_running_stats and tracked is not None:
        tracked.add_(1)
    bn_training = mod.training or (running_mean is None and running_var is None)
    keep = not mod.training or mod.track_running_stats
    out = F.batch_norm(
        x.t,
        _flat(running_mean) if keep else None,
        _flat(running_var) if keep else None,
        _flat(ctx.get(path, "weight")),
        _flat(ctx.get(path, "bias")),
        bn_training,
        0.0 if momentum is None else momentum,
        mod.eps,
    )
    return _Fold(out)


def _linear(ctx: _Context, mod: nn.Module, path: str, x: Any) -> _Fold:
    weight, bias = ctx.get(path, "weight"), ctx.get(path, "bias")
    assert weight is not None
    n, out_f, in_f = weight.shape
    if isinstance(x, _Fold):
        if x.t.ndim != 2:
            raise NotGroupableError("Linear on a member activation with more than 2 dims")
        h = x.t.view(x.t.shape[0], n, in_f).transpose(0, 1)  # (N, B, in)
        out = _batched_linear(h, weight, bias)
        return _Fold(out.transpose(0, 1).reshape(h.shape[1], n * out_f))
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise NotGroupableError("Linear on a shared input with other than 2 dims")
    flat = weight.reshape(n * out_f, in_f)
    if bias is None:
        return _Fold(torch.mm(x, flat.t()))
    return _Fold(torch.addmm(bias.reshape(n * out_f), x, flat.t()))


def _per_channel(ctx: _Context, mod: nn.Module, path: str, x: Any) -> Any:
    """Layers that act on each channel (or element) alone: run on the folded tensor."""
    if isinstance(x, _Fold):
        return _Fold(mod(x.t))
    _refuse_in_place(x, getattr(mod, "inplace", False))
    return mod(x)


def _refuse_in_place(x: Any, in_place: bool) -> None:
    """Refuse an in-place op on a shared value: every member changes it, one after the other,
    in a loop over the members (``x.div_(255)`` divides the caller's input N times)."""
    if in_place and isinstance(x, torch.Tensor):
        raise NotGroupableError("an in-place op on a shared input")


def _pool(ctx: _Context, mod: nn.Module, path: str, x: Any) -> Any:
    dims = int(type(mod).__name__[-2])
    data = x.t if isinstance(x, _Fold) else x
    if not isinstance(data, torch.Tensor) or data.ndim != dims + 2:
        raise NotGroupableError(f"{type(mod).__name__} on an input without a batch dim")
    return _per_channel(ctx, mod, path, x)


def _random(ctx: _Context, mod: nn.Module, path: str, x: Any) -> _Fold:
    # Every member draws its own mask: fold a shared input first.
    if not isinstance(x, _Fold):
        _refuse_in_place(x, getattr(mod, "inplace", False))
    folded = ctx.fold(x).t
    _check_batched(type(mod), folded)
    if ctx.draws is not None:
        assert isinstance(mod, DROPOUTS)
        feature = type(mod) not in (nn.Dropout, nn.AlphaDropout)
        alpha = type(mod) in (nn.AlphaDropout, nn.FeatureAlphaDropout)
        return _Fold(
            _dropped_fold(
                ctx, folded, mod.p, mod.training, mod.inplace, feature=feature, alpha=alpha
            )
        )
    return _Fold(mod(folded))


def _dropped_fold(
    ctx: _Context,
    folded: torch.Tensor,
    p: float,
    training: bool,
    inplace: bool,
    *,
    feature: bool,
    alpha: bool = False,
) -> torch.Tensor:
    """Dropout of a folded ``(B, N*C, ...)`` activation with the loop's masks: member ``i``'s
    noise (``(B, C, ...)``, or ``(B, C, 1, ...)`` for a channel dropout) is channels
    ``i*C:(i+1)*C``."""
    rest = (1,) * (folded.ndim - 2) if feature else tuple(folded.shape[2:])
    size = (folded.shape[0], folded.shape[1] // ctx.n, *rest)
    assert ctx.draws is not None
    return dropped(
        ctx.draws,
        folded,
        p,
        training,
        inplace,
        size,
        lambda masks: masks.transpose(0, 1).reshape(folded.shape[0], -1, *rest),
        NotGroupableError,
        alpha=alpha,
    )


# Channel dropouts that take an input without a batch dim for one with a
# channel dim first: on the folded layout (batch, members x channels, ...)
# that would drop whole batch rows, one mask for every member.
_BATCHED_NDIM: dict[Any, int] = {nn.Dropout1d: 3, nn.Dropout3d: 5, F.dropout1d: 3, F.dropout3d: 5}


def _check_batched(kind: Any, x: torch.Tensor) -> None:
    want = _BATCHED_NDIM.get(kind)
    if want is not None and x.ndim != want:
        name = getattr(kind, "__name__", str(kind))
        raise NotGroupableError(f"{name} on an input without a batch dim ({x.ndim}-D)")


def _flatten(ctx: _Context, mod: nn.Module, path: str, x: Any) -> Any:
    assert isinstance(mod, nn.Flatten)
    return _flatten_from(x, mod.start_dim, mod.end_dim)


def _flatten_from(x: Any, start: int, end: int) -> Any:
    if not isinstance(x, _Fold):
        return torch.flatten(x, start, end)
    if start != 1 or end not in (-1, x.t.ndim - 1):
        raise NotGroupableError(f"flatten({start}, {end}) of a member activation")
    return _Fold(x.t.flatten(1))


def _identity(ctx: _Context, mod: nn.Module, path: str, x: Any) -> Any:
    return x


# ------------------------------------------------------------- transformers
# A transformer layer runs with the members folded into its batch: a member's
# activation (D0, D1, E) (batch first or sequence first, as its attention
# takes it) is row i of (N, D0*D1, E), each Linear one batched matmul of every
# member, the attention one call over (N*B, H, L, d), LayerNorm without its
# affine part then every member's weight and bias. Dropout takes the loop's masks
# (see _draws): in training mode this runs as the loop does, with its numbers.
def _tokens(ctx: _Context, x: Any) -> tuple[torch.Tensor, int, int]:
    """A layer's input as ``(N, D0*D1, E)`` and ``D0, D1``: a folded ``(D0, N*D1, E)`` one's
    member ``i`` is row ``i``; a shared ``(D0, D1, E)`` one is every row."""
    data = x.t if isinstance(x, _Fold) else x
    if not isinstance(data, torch.Tensor) or data.ndim != 3:
        raise NotGroupableError("a transformer layer on an input without a batch dim")
    n = ctx.n
    if isinstance(x, _Fold):
        d0, d1, e = data.shape[0], data.shape[1] // n, data.shape[2]
        return data.view(d0, n, d1, e).transpose(0, 1).reshape(n, d0 * d1, e), d0, d1
    d0, d1, e = data.shape
    return data.reshape(1, d0 * d1, e).expand(n, d0 * d1, e), d0, d1


def _untokens(h: torch.Tensor, d0: int, d1: int) -> _Fold:
    n, _, e = h.shape
    return _Fold(h.view(n, d0, d1, e).transpose(0, 1).reshape(d0, n * d1, e))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _stacked(ctx: _Context, mod: nn.Module, path: str, leaf: str) -> torch.Tensor | None:
    """The stacked tensor of ``mod.<leaf>`` (``None`` where ``mod`` has none)."""
    t = ctx.get(path, leaf)
    if t is None and getattr(mod, leaf, None) is not None:
        raise NotGroupableError(f"{_join(path, leaf)} is not a stacked parameter or buffer")
    return t


def _linear_tensors(
    ctx: _Context, mod: nn.Module, path: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The stacked weight and bias of the Linear ``mod``."""
    return _stacked(ctx, mod, path, "weight"), _stacked(ctx, mod, path, "bias")


def _batched_linear(
    h: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """Every member's ``F.linear`` of ``(N, T, in)``: ``weight`` ``(N, out, in)``."""
    if weight is None:
        raise NotGroupableError("a Linear without its weight")
    if bias is None:
        return torch.bmm(h, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


def _layer_norm(ctx: _Context, mod: nn.Module, path: str, h: torch.Tensor) -> torch.Tensor:
    assert isinstance(mod, nn.LayerNorm)
    weight, bias = _stacked(ctx, mod, path, "weight"), _stacked(ctx, mod, path, "bias")
    out = F.layer_norm(h, mod.normalized_shape, None, None, mod.eps)
    if weight is not None:
        out = out * weight.unsqueeze(1)
    if bias is not None:
        out = out + bias.unsqueeze(1)
    return out


def _drop_tokens(ctx: _Context, mod: nn.Module, h: torch.Tensor, d0: int, d1: int) -> torch.Tensor:
    """``nn.Dropout`` ``mod`` on ``(N, D0*D1, C)``: member ``i``'s noise ``(D0, D1, C)`` is row ``i``."""
    assert isinstance(mod, nn.Dropout)
    if ctx.draws is None:
        out: torch.Tensor = mod(h)
        return out
    n, _, c = h.shape
    return dropped(
        ctx.draws,
        h,
        mod.p,
        mod.training,
        mod.inplace,
        (d0, d1, c),
        lambda masks: masks.view(n, d0 * d1, c),
        NotGroupableError,
    )


def _self_attention(
    ctx: _Context, mod: nn.MultiheadAttention, path: str, h: torch.Tensor, d0: int, d1: int
) -> torch.Tensor:
    """``mod(x, x, x, need_weights=False)[0]`` of every member, ``h`` ``(N, D0*D1, E)``."""
    n, _, e = h.shape
    heads = mod.num_heads
    d = e // heads
    b, length = (d0, d1) if mod.batch_first else (d1, d0)
    qkv = _batched_linear(
        h,
        _stacked(ctx, mod, path, "in_proj_weight"),
        _stacked(ctx, mod, path, "in_proj_bias"),
    )
    # (N, D0, D1, H, d) -> (N*B, H, L, d), as the members' attention lays out its heads.
    order = (0, 1, 3, 2, 4) if mod.batch_first else (0, 2, 3, 1, 4)
    q, k, v = (
        t.reshape(n, d0, d1, heads, d).permute(order).reshape(n * b, heads, length, d)
        for t in qkv.split(e, dim=-1)
    )
    p = mod.dropout if mod.training else 0.0
    if p == 0 or ctx.draws is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    else:
        out = _attention_dropped(ctx, q, k, v, p, b)
    back = (0, 1, 3, 2, 4) if mod.batch_first else (0, 3, 1, 2, 4)
    out = out.view(n, b, heads, length, d).permute(back).reshape(n, d0 * d1, e)
    return _batched_linear(out, *_linear_tensors(ctx, mod.out_proj, _join(path, "out_proj")))


def _attention_dropped(
    ctx: _Context, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, b: int
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, dropout_p=p)`` with the loop's masks.

    With dropout the members' attention on the CPU is torch's math kernel: ``q``
    and ``k`` each scaled by ``sqrt(1 / sqrt(d))``, softmax, the dropout noise,
    then ``v``.
    """
    assert ctx.draws is not None
    nb, heads, length, d = q.shape
    size = (b, heads, length, k.shape[2])
    masks = ctx.draws.take(size, 1 - p, NotGroupableError)
    if masks.dtype != q.dtype:  # 16-bit floats run the loop (see _encoder_layer)
        raise NotGroupableError("attention dropout masks of another dtype than the attention")
    scale = math.sqrt(1.0 / math.sqrt(d))
    attn = torch.matmul(q * scale, (k * scale).transpose(-2, -1)).softmax(-1)
    noise = masks.view(nb, *size[1:]).div_(1 - p)
    return torch.matmul(attn * noise, v)


def _encoder_layer(
    ctx: _Context,
    mod: nn.Module,
    path: str,
    x: Any,
    src_mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: bool = False,
) -> _Fold:
    """``nn.TransformerEncoderLayer`` (its standard path) for every member at once."""
    assert isinstance(mod, nn.TransformerEncoderLayer)
    if src_mask is not None or src_key_padding_mask is not None or is_causal:
        raise NotGroupableError("a transformer layer given a mask")
    if any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")):
        raise NotGroupableError("a transformer layer under autocast")
    h, d0, d1 = _tokens(ctx, x)
    if h.dtype in (torch.float16, torch.bfloat16):
        # The members' bits are promised in 16-bit floats: torch's fused eval path
        # rounds otherwise (a third of the outputs by a bfloat16 step), and so,
        # rarely, do the batched matmuls in training (an element in a thousand).
        raise NotGroupableError("a transformer layer in 16-bit floats")

    def sa(y: torch.Tensor) -> torch.Tensor:
        out = _self_attention(ctx, mod.self_attn, _join(path, "self_attn"), y, d0, d1)
        return _drop_tokens(ctx, mod.dropout1, out, d0, d1)

    def ff(y: torch.Tensor) -> torch.Tensor:
        y = _batched_linear(y, *_linear_tensors(ctx, mod.linear1, _join(path, "linear1")))
        y = _drop_tokens(ctx, mod.dropout, mod.activation(y), d0, d1)
        y = _batched_linear(y, *_linear_tensors(ctx, mod.linear2, _join(path, "linear2")))
        return _drop_tokens(ctx, mod.dropout2, y, d0, d1)

    def norm(name: str, y: torch.Tensor) -> torch.Tensor:
        return _layer_norm(ctx, getattr(mod, name), _join(path, name), y)

    if mod.norm_first:
        h = h + sa(norm("norm1", h))
        h = h + ff(norm("norm2", h))
    else:
        h = norm("norm1", h + sa(h))
        h = norm("norm2", h + ff(h))
    return _untokens(h, d0, d1)


def _encoder(
    ctx: _Context,
    mod: nn.Module,
    path: str,
    src: Any,
    mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: bool | None = None,
) -> Any:
    """``nn.TransformerEncoder`` without masks: its layers, then its norm."""
    assert isinstance(mod, nn.TransformerEncoder)
    if mask is not None or src_key_padding_mask is not None or is_causal:
        raise NotGroupableError("a transformer encoder given a mask")
    out: Any = src
    for i, layer in enumerate(mod.layers):
        out = _encoder_layer(ctx, layer, _join(path, f"layers.{i}"), out)
    if mod.norm is not None:
        h, d0, d1 = _tokens(ctx, out)
        out = _untokens(_layer_norm(ctx, mod.norm, _join(path, "norm"), h), d0, d1)
    return out


# What a transformer layer's activation may be: element-wise, so it applies to
# every member's rows at once.
_ACTIVATION_FUNCTIONS = (F.relu, F.gelu, torch.relu, F.silu, torch.tanh, torch.sigmoid)


def _check_encoder_layer(mod: nn.TransformerEncoderLayer) -> str | None:
    """Why the transformer layer ``mod`` has no grouped form, or None."""
    attn = mod.self_attn
    parts: list[tuple[str, Any, type[nn.Module]]] = [
        ("self_attn", attn, nn.MultiheadAttention),
        ("linear1", mod.linear1, nn.Linear),
        ("linear2", mod.linear2, nn.Linear),
        ("norm1", mod.norm1, nn.LayerNorm),
        ("norm2", mod.norm2, nn.LayerNorm),
        ("dropout", mod.dropout, nn.Dropout),
        ("dropout1", mod.dropout1, nn.Dropout),
        ("dropout2", mod.dropout2, nn.Dropout),
    ]
    # Exact classes: a subclass (a LoRA Linear, a custom dropout) may compute otherwise.
    for name, part, kind in parts:
        if type(part) is not kind:
            return f"its {name} is a {type(part).__name__}, not torch's {kind.__name__}"
    if type(attn.out_proj) not in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return f"its self_attn.out_proj is a {type(attn.out_proj).__name__}, not torch's Linear"
    if (
        attn.kdim != attn.embed_dim
        or attn.vdim != attn.embed_dim
        or attn.bias_k is not None
        or attn.add_zero_attn
        or attn.in_proj_weight is None
    ):
        return "its attention has other key or value sizes, bias_k/bias_v or add_zero_attn"
    e = attn.embed_dim
    if any(tuple(n.normalized_shape) != (e,) for n in (mod.norm1, mod.norm2)):
        return "its LayerNorms normalize other than the embedding dim"
    act = mod.activation
    if not (any(act is f for f in _ACTIVATION_FUNCTIONS) or type(act) in ELEMENTWISE_ACTIVATIONS):
        return f"its activation {act!r} is not one this plan knows to act element by element"
    if any(m.training != mod.training for m in mod.modules()):
        return "its sub-layers are not all in its train/eval mode"
    return None


_ModuleRule = Callable[[_Context, nn.Module, str, Any], Any]
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE = ELEMENTWISE_ACTIVATIONS
_POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
# Not annotated as a tuple of module types: isinstance then narrows to these classes
# (their p and inplace).
DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_TRANSFORMERS = (nn.TransformerEncoderLayer, nn.TransformerEncoder)
_MODULES: dict[type[nn.Module], _ModuleRule] = {
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
    nn.Linear: _linear,
    nn.Flatten: _flatten,
    nn.Identity: _identity,
    nn.TransformerEncoderLayer: _encoder_layer,
    nn.TransformerEncoder: _encoder,
    **dict.fromkeys(_ELEMENTWISE, _per_channel),
    **dict.fromkeys(_POOLS, _pool),
    **dict.fromkeys(DROPOUTS, _random),
}


# The tensors the module rules read from the stacked tensors.
_READS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _check_module(mod: nn.Module, path: str, randomness: str) -> str | None:
    """Why ``mod`` cannot take its rule, or None."""
    own = {n for n, _ in mod.named_parameters(recurse=False, remove_duplicate=False)}
    own |= {n for n, _ in mod.named_buffers(recurse=False, remove_duplicate=False)}
    for leaf in _READS:
        if isinstance(getattr(mod, leaf, None), torch.Tensor) and leaf not in own:
            # Not stacked: the rule would find no tensor there and leave it out.
            return f"it holds {leaf!r} as a plain attribute, not a parameter or buffer"
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode != "zeros":
        return f"padding_mode={mod.padding_mode!r} is not supported"
    if isinstance(mod, _BATCH_NORMS) and mod.momentum is None:
        # A cumulative average uses each member's own batch count.
        return "momentum=None (a cumulative average) is not supported"
    if isinstance(mod, _POOLS) and getattr(mod, "return_indices", False):
        return "return_indices=True is not supported"
    if isinstance(mod, DROPOUTS) and randomness != "different":
        return f"it draws random numbers, which this plan draws per member only (randomness='different'), not with randomness={randomness!r}"
    layers: list[nn.Module] = [mod] if isinstance(mod, nn.TransformerEncoderLayer) else []
    if isinstance(mod, nn.TransformerEncoder):
        if mod.norm is not None and (
            not isinstance(mod.norm, nn.LayerNorm) or len(mod.norm.normalized_shape) != 1
        ):
            return "its norm is not a LayerNorm of the embedding dim"
        layers = list(mod.layers)
        for i, layer in enumerate(layers):
            if type(layer) is not nn.TransformerEncoderLayer:
                return f"its layer {i} is a {type(layer).__name__}, not torch's TransformerEncoderLayer"
    for i, layer in enumerate(layers):
        assert isinstance(layer, nn.TransformerEncoderLayer)
        reason = _check_encoder_layer(layer)
        if reason is not None:
            return reason if layer is mod else f"its layer {i}: {reason}"
        if randomness != "different" and (
            layer.self_attn.dropout > 0
            or any(m.p > 0 for m in layer.modules() if isinstance(m, nn.Dropout))
        ):
            return f"it draws random numbers, which this plan draws per member only (randomness='different'), not with randomness={randomness!r}"
    return None


# ---------------------------------------------------------------- functions
def _elementwise(fn: Callable[..., Any]) -> Callable[..., Any]:
    """An op of tensors and numbers that acts element by element (with broadcasting)."""

    in_place = fn.__name__.endswith("_")  # Tensor.add_ and its kin change their first argument

    def rule(ctx: _Context, *args: Any, **kwargs: Any) -> Any:
        if in_place and args and not isinstance(args[0], _Fold):
            _refuse_in_place(args[0], True)
        if "out" in kwargs:
            raise NotGroupableError("an op writing into out=")
        folds = [a for a in (*args, *kwargs.values()) if isinstance(a, _Fold)]
        if not folds:
            return fn(*args, **kwargs)
        ndim = folds[0].t.ndim

        def lay_out(a: Any) -> Any:
            if isinstance(a, _Fold):
                if a.t.ndim != ndim:
                    raise NotGroupableError("member activations of different ranks broadcast")
                return a.t
            if isinstance(a, torch.Tensor) and a.ndim > 0:
                if a.ndim != ndim:
                    raise NotGroupableError("a shared tensor broadcast against member activations")
                return ctx.fold(a).t
            return a

        return _Fold(fn(*[lay_out(a) for a in args], **{k: lay_out(v) for k, v in kwargs.items()}))

    return rule


def _unary(fn: Callable[..., Any], *, random: bool = False) -> Callable[..., Any]:
    # Where ``inplace`` goes when passed by position (F.relu(x, True)), after ``x``.
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: no inplace argument
        names = []
    at = names.index("inplace") - 1 if "inplace" in names else None
    method = fn.__name__.endswith("_")
    # x.type_as(h), x.to(h): torch reads only the dtype and device of ``h``,
    # which its folded layout has too.
    reads_like = fn.__name__ in ("to", "type_as")

    def rule(ctx: _Context, x: Any, *args: Any, **kwargs: Any) -> Any:
        if any(isinstance(a, _Fold) for a in (*args, *kwargs.values())):
            if not reads_like:
                raise NotGroupableError(f"{fn.__name__} given member activations as an argument")
            args = tuple(a.t if isinstance(a, _Fold) else a for a in args)
            kwargs = {k: v.t if isinstance(v, _Fold) else v for k, v in kwargs.items()}
        if not isinstance(x, _Fold):
            in_place = method or bool(
                kwargs.get("inplace") if at is None or len(args) <= at else args[at]
            )
            _refuse_in_place(x, in_place)
        if random:
            folded = x.t if isinstance(x, _Fold) else ctx.fold(x).t
            _check_batched(fn, folded)
            if ctx.draws is not None:
                # F.dropout(input, p=0.5, training=True, inplace=False) and its kin.
                given = dict(zip(("p", "training", "inplace"), args, strict=False))
                given.update(kwargs)
                p = given.get("p", 0.5)
                if isinstance(p, (int, float)) and 0 <= p <= 1:  # else torch's own error
                    return _Fold(
                        _dropped_fold(
                            ctx,
                            folded,
                            float(p),
                            bool(given.get("training", True)),
                            bool(given.get("inplace", False)),
                            feature=fn is not F.dropout,
                        )
                    )
            return _Fold(fn(folded, *args, **kwargs))
        if isinstance(x, _Fold):
            return _Fold(fn(x.t, *args, **kwargs))
        return fn(x, *args, **kwargs)

    return rule


def _pool_function(fn: Callable[..., Any], dims: int) -> Callable[..., Any]:
    """A functional pooling: per channel, on batched inputs only (else it would pool over members)."""

    def rule(ctx: _Context, x: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(x, _Fold):
            if x.t.ndim != dims + 2:
                raise NotGroupableError(f"{fn.__name__} on an input without a batch dim")
            return _Fold(fn(x.t, *args, **kwargs))
        return fn(x, *args, **kwargs)

    return rule


def _flatten_rule(ctx: _Context, x: Any, start_dim: int = 0, end_dim: int = -1) -> Any:
    return _flatten_from(x, start_dim, end_dim)


def _view(ctx: _Context, x: Any, *shape: Any) -> Any:
    if not isinstance(x, _Fold):
        return x.reshape(*shape)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if len(shape) == 2 and shape[1] == -1 and shape[0] == x.t.shape[0]:
        return _Fold(x.t.flatten(1))
    raise NotGroupableError(f"view{tuple(shape)} of a member activation")


def _size(ctx: _Context, x: Any, dim: int | None = None) -> Any:
    if not isinstance(x, _Fold):
        return x.size() if dim is None else x.size(dim)
    if dim is None:
        return _FoldShape(x.t.shape)
    return _FoldShape(x.t.shape)[dim]


def _reduce(fn: Callable[..., Any]) -> Callable[..., Any]:
    """mean / sum / amax / amin over dims that are neither the batch nor the channel dim."""

    def rule(ctx: _Context, x: Any, dim: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(x, _Fold):
            return fn(x, *args, **kwargs) if dim is None else fn(x, dim, *args, **kwargs)
        dims = [dim] if isinstance(dim, int) else list(dim) if dim is not None else []
        if not dims or any(d % x.t.ndim < 2 for d in dims):
            raise NotGroupableError(f"{fn.__name__} over dim {dim!r} of a member activation")
        return _Fold(fn(x.t, dim, *args, **kwargs))

    return rule


def _cat(ctx: _Context, tensors: Sequence[Any], dim: int = 0) -> Any:
    if not any(isinstance(t, _Fold) for t in tensors):
        return torch.cat(list(tensors), dim)
    folds = [ctx.fold(t) for t in tensors]
    ndim = folds[0].t.ndim
    if any(f.t.ndim != ndim for f in folds):
        raise NotGroupableError("cat of member activations of different ranks")
    dim %= ndim
    if dim != 1:
        return _Fold(torch.cat([f.t for f in folds], dim))
    # Channels of each member stay together: (B, N, C_i, ...) concatenated on C.
    parts = [f.t.view(f.t.shape[0], ctx.n, f.t.shape[1] // ctx.n, *f.t.shape[2:]) for f in folds]
    out = torch.cat(parts, 2)
    return _Fold(out.view(out.shape[0], -1, *out.shape[3:]))


def _getattr(ctx: _Context, x: Any, name: str) -> Any:
    if isinstance(x, _Fold):
        if name == "shape":
            return _FoldShape(x.t.shape)
        if name in ("dtype", "device", "ndim", "is_cuda", "requires_grad"):
            return getattr(x.t, name)
        raise NotGroupableError(f"attribute {name!r} of a member activation")
    return getattr(x, name)


def _getitem(ctx: _Context, x: Any, index: Any) -> Any:
    if isinstance(x, _Fold):
        raise NotGroupableError("indexing a member activation")
    return x[index]


_BINARY = (
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
    torch.where,
)
_UNARY = (
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.abs,
    torch.neg,
    torch.sqrt,
    torch.square,
    operator.neg,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.mish,
    F.elu,
    F.selu,
    F.leaky_relu,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.softplus,
    F.interpolate,
)
_POOL_FUNCTIONS: dict[Any, int] = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    **{fn: _elementwise(fn) for fn in _BINARY},
    **{fn: _unary(fn) for fn in _UNARY},
    **{fn: _pool_function(fn, dims) for fn, dims in _POOL_FUNCTIONS.items()},
    F.dropout: _unary(F.dropout, random=True),
    F.dropout1d: _unary(F.dropout1d, random=True),
    F.dropout2d: _unary(F.dropout2d, random=True),
    F.dropout3d: _unary(F.dropout3d, random=True),
    torch.flatten: _flatten_rule,
    torch.cat: _cat,
    torch.mean: _reduce(torch.mean),
    torch.sum: _reduce(torch.sum),
    torch.amax: _reduce(torch.amax),
    torch.amin: _reduce(torch.amin),
    getattr: _getattr,
    operator.getitem: _getitem,
}
_RANDOM_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)


def _method(name: str) -> Callable[..., Any]:
    def call(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return getattr(x, name)(*args, **kwargs)

    call.__name__ = name
    return call


_BINARY_METHODS = ("add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "maximum", "minimum")
_UNARY_METHODS = (
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "exp",
    "abs",
    "neg",
    "sqrt",
    "square",
    "contiguous",
    "float",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "clone",
)
_METHODS: dict[str, Callable[..., Any]] = {
    **{m: _elementwise(_method(m)) for m in _BINARY_METHODS},
    **{m: _unary(_method(m)) for m in _UNARY_METHODS},
    "flatten": _flatten_rule,
    "view": _view,
    "reshape": _view,
    "size": _size,
    "mean": _reduce(_method("mean")),
    "sum": _reduce(_method("sum")),
    "amax": _reduce(_method("amax")),
    "amin": _reduce(_method("amin")),
}


# --------------------------------------------------------------------- plan
class GroupedPlan:
    """The traced template and how to run it grouped; retraced per train/eval state and hooks.

    Not pickled or copied (graphs are rebuilt on use).
    """

    def __init__(self, randomness: str) -> None:
        self.randomness = randomness
        self._graphs: dict[tuple[Any, ...], fx.Graph | Refusal] = {}
        # The kinds of call (graph, LayoutLog.key) that ran to the end.
        self._laid_out: set[tuple[int, tuple[Any, ...]]] = set()
        # One member's draws per kind of call (graph, LayoutLog.key).
        self._schedules = Schedules()
        # Per graph: the modules that may draw, and whether a dropout function draws.
        self._sites: dict[int, tuple[list[nn.Module], bool]] = {}
        # Tracing reads the template's plain settings its forwards read (a forward's
        # own self.scale becomes a constant of the graph): a change retraces.
        self._settings = SettingsWatch()

    def __reduce__(self) -> tuple[type[GroupedPlan], tuple[str]]:
        return (GroupedPlan, (self.randomness,))

    def __deepcopy__(self, memo: dict[int, Any]) -> GroupedPlan:
        return GroupedPlan(self.randomness)

    def graph(self, template: nn.Module) -> fx.Graph | Refusal:
        """The checked graph of ``template`` in its current train/eval state and the call's
        autograd context, or why there is none."""
        # Tracing fixes self.training; hooks added since keep the template off. It
        # also fixes the context: a torch.no_grad() or autocast(enabled=False)
        # section of the forward is a no-op when the call's context is already that
        # (nothing to see), and in any other context it is not, so each context is
        # traced (and checked) on its own.
        if self._settings.changed(template):
            self._graphs.clear()
            self._laid_out.clear()
            self._sites.clear()
            self._schedules = Schedules()
        key = (
            _call_context(),
            tuple((m.training, has_module_hooks(m)) for m in template.modules()),
        )
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = _trace(template, self.randomness)
        return graph

    def draws(self, template: nn.Module) -> bool:
        """Whether a call in the template's current modes draws random numbers: a dropout
        layer in training mode with ``p > 0`` (a transformer layer's too, and its
        attention's dropout), or a dropout function not given ``training=False`` or
        ``p=0`` in the traced graph."""
        graph = self.graph(template)
        return not isinstance(graph, Refusal) and self._draws(template, graph)

    def _draws(self, template: nn.Module, graph: fx.Graph) -> bool:
        modules, functions = self._random_sites(template, graph)
        return functions or any(draws(m, DROPOUTS) or draws_in_forward(m) for m in modules)

    def _random_sites(self, template: nn.Module, graph: fx.Graph) -> tuple[list[nn.Module], bool]:
        """The modules of ``graph``'s layers that may draw (dropouts, and a transformer
        layer's dropouts and attention), and whether one of its dropout functions draws
        (their ``p`` and ``training`` are fixed in the graph); found once per graph."""
        sites = self._sites.get(id(graph))
        if sites is not None:
            return sites
        modules: list[nn.Module] = []
        functions = False
        for node in graph.nodes:
            if node.op == "call_module":
                mod = template.get_submodule(str(node.target))
                if isinstance(mod, DROPOUTS):
                    modules.append(mod)
                elif isinstance(mod, _TRANSFORMERS):
                    kinds = (*DROPOUTS, nn.MultiheadAttention)
                    modules += [m for m in mod.modules() if isinstance(m, kinds)]
            elif node.op == "call_function" and node.target in _RANDOM_FUNCTIONS:
                p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
                training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
                functions = functions or not (training is False or p == 0)
        self._sites[id(graph)] = (modules, functions)
        return modules, functions

    def draws_elsewhere(
        self,
        template: nn.Module,
        tensors: Mapping[str, torch.Tensor],
        inputs: tuple[Any, ...],
        per_member: bool,
        key: tuple[Any, ...],
    ) -> bool:
        """Whether a call on ``inputs`` draws random numbers and cannot draw the loop's
        masks for them (see :meth:`_exact`)."""
        graph = self.graph(template)
        return (
            not isinstance(graph, Refusal)
            and self._draws(template, graph)
            and self._exact(template, graph, tensors, inputs, per_member, key) is None
        )

    def _exact(
        self,
        template: nn.Module,
        graph: fx.Graph,
        tensors: Mapping[str, torch.Tensor],
        inputs: tuple[Any, ...],
        per_member: bool,
        key: tuple[Any, ...],
    ) -> list[Draw] | None:
        """One member's draws in a call on ``inputs`` (see :mod:`._draws`), or ``None`` where
        the plan cannot draw the loop's masks (see :func:`._draws.exact_possible`)."""
        if not exact_possible(tensors.values(), inputs):
            return None
        return self._schedule(template, graph, tensors, inputs, per_member, key)

    def _schedule(
        self,
        template: nn.Module,
        graph: fx.Graph,
        tensors: Mapping[str, torch.Tensor],
        inputs: tuple[Any, ...],
        per_member: bool,
        key: tuple[Any, ...],
    ) -> list[Draw] | None:
        """One member's draws in a call on ``inputs`` (:class:`._draws.Schedules`)."""
        member = tuple(x[0] if per_member and isinstance(x, torch.Tensor) else x for x in inputs)
        return self._schedules.get((id(graph), key), template, tensors, member)

    def placeholders(self, template: nn.Module) -> int:
        graph = self.graph(template)
        if isinstance(graph, Refusal):
            return -1
        return sum(node.op == "placeholder" for node in graph.nodes)

    @staticmethod
    def log(inputs: tuple[Any, ...], chunk_size: int | None) -> LayoutLog:
        """A :class:`LayoutLog` for a call on ``inputs`` (one per call, for all its chunks)."""
        kinds = tuple(
            (x.shape, x.dtype, x.device, x.requires_grad)
            if isinstance(x, torch.Tensor)
            else type(x)
            for x in inputs
        )
        return LayoutLog((kinds, chunk_size, torch.is_grad_enabled()))

    def laid_out(self, log: LayoutLog) -> None:
        """Note that the call of ``log`` ran to the end: its kind of call lays out."""
        if log.saved is not None and log.graph is not None:
            if len(self._laid_out) >= _LAID_OUT_MAX:
                self._laid_out.clear()
            self._laid_out.add((log.graph, log.key))
        log.saved = None

    def __call__(
        self,
        template: nn.Module,
        tensors: Mapping[str, torch.Tensor],
        aliases: Mapping[str, str],
        inputs: tuple[Any, ...],
        per_member: bool,
        log: LayoutLog,
        *,
        exact_draws: bool = False,
    ) -> Any:
        """Run every member on ``inputs``; outputs stacked on a new dim 0.

        ``exact_draws``: a call that draws random numbers runs only where it draws the
        loop's masks (``execution="auto"``, whose choice of this plan, timed on another
        call of the kind, may not hold for this one: an input of other strides).

        Raises:
            NotGroupableError: the inputs cannot be laid out, or with ``exact_draws`` the
                call would draw other masks than the loop; what the call changed is put
                back by ``log.restore()``, once for all chunks.
        """
        graph = self.graph(template)
        if isinstance(graph, Refusal):
            raise NotGroupableError(graph.reason)
        if sum(node.op == "placeholder" for node in graph.nodes) != len(inputs):
            raise NotGroupableError("inputs that are not the forward's positional arguments")
        if log.graph is None:  # the call's first chunk
            log.graph = id(graph)
            log.saved = None if (id(graph), log.key) in self._laid_out else []
        first = next(iter(tensors.values()))
        n = first.shape[0]
        ctx = _Context(template, tensors, aliases, n, log)
        if self._draws(template, graph):
            schedule = self._exact(template, graph, tensors, inputs, per_member, log.key)
            if schedule is None and exact_draws:
                raise NotGroupableError("a call that draws other masks than the loop here")
            if schedule is not None:
                log.keep_rng()
                ctx.draws = Draws(schedule, n, first.device)
                if log.saved is None:
                    # A call whose draws turn out not to match runs the loop: what its
                    # BatchNorms changed is put back then, even for a kind laid out before.
                    log.saved = []
        if log.saved is None:
            return self._run(graph, ctx, inputs, per_member)
        try:
            return self._run(graph, ctx, inputs, per_member)
        except (RuntimeError, TypeError) as e:
            # A kind of call not laid out before: torch refused an op on the
            # folded layout (operands whose channels broadcast per member but
            # not side by side, a view of an empty batch, an argument of a form
            # no rule lays out: a TypeError), or the members would refuse it
            # too. The loop runs it, member by member, and
            # raises the member's own error if there is one.
            raise NotGroupableError(f"torch refused the folded layout: {e}") from e

    def _run(
        self, graph: fx.Graph, ctx: _Context, inputs: tuple[Any, ...], per_member: bool
    ) -> Any:
        template, n = ctx.template, ctx.n
        env: dict[fx.Node, Any] = {}
        placeholders = iter(inputs)

        def value(a: fx.Node) -> Any:
            return env[a]

        for node in graph.nodes:
            args: Any = fx.node.map_arg(node.args, value)
            kwargs: Any = fx.node.map_arg(node.kwargs, value)
            if node.op == "placeholder":
                x = next(placeholders, None)
                if not isinstance(x, torch.Tensor):
                    raise NotGroupableError("an input that is not a tensor")
                env[node] = _fold_input(x, n) if per_member else x
            elif node.op == "call_module":
                mod = template.get_submodule(node.target)
                env[node] = _MODULES[type(mod)](ctx, mod, str(node.target), *args, **kwargs)
            elif node.op == "call_function":
                env[node] = _FUNCTIONS[node.target](ctx, *args, **kwargs)
            elif node.op == "call_method":
                env[node] = _METHODS[str(node.target)](ctx, *args, **kwargs)
            elif node.op == "output":
                if ctx.draws is not None:
                    ctx.draws.finish(NotGroupableError)
                out = tree_map(lambda v: _unfold(v, n), args[0], is_leaf=_is_value)
                return _mutable(out)
        raise AssertionError("a graph without output")  # pragma: no cover


def _mutable(x: Any) -> Any:
    """``x`` with torch.fx's immutable lists and dicts (what a traced graph's output
    holds) made the plain ones a member's forward returned, as the other plans give."""
    if isinstance(x, immutable_list):
        return [_mutable(v) for v in x]
    if isinstance(x, immutable_dict):
        return {k: _mutable(v) for k, v in x.items()}
    if type(x) is tuple:
        return tuple(_mutable(v) for v in x)
    return x


def _is_value(x: Any) -> bool:
    return isinstance(x, (_Fold, _FoldShape))


def _fold_input(x: torch.Tensor, n: int) -> _Fold:
    """Per-member inputs ``(N, B, C, ...)`` -> ``(B, N*C, ...)``."""
    if x.ndim < 3 or x.shape[0] != n:
        raise NotGroupableError("per-member inputs without batch and channel dims")
    return _Fold(x.transpose(0, 1).reshape(x.shape[1], n * x.shape[2], *x.shape[3:]))


def _unfold(v: Any, n: int) -> Any:
    if isinstance(v, _Fold):
        t = v.t
        # Sizes given, not -1: an empty batch has no size to infer.
        return t.view(t.shape[0], n, t.shape[1] // n, *t.shape[2:]).transpose(0, 1).contiguous()
    if isinstance(v, torch.Tensor):  # the same for every member
        return v.unsqueeze(0).expand(n, *v.shape).contiguous()
    raise NotGroupableError(f"an output of type {type(v).__name__}")


# torch.fx's Proxy has no in-place operators, so ``h += y`` traces as
# ``h = h + y``: another name still bound to the old ``h`` (``skip = h``) then
# misses the update eager PyTorch makes. The tracer below records them, and
# _trace keeps them only where no other name can see the difference.
_AUGMENTED = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def _call_context() -> tuple[Any, ...]:
    """What of the call's context a traced graph fixes: grad and inference mode, autocast
    on every device type with its dtype, and whether saved-tensor hooks are on."""
    autocast = tuple(
        (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")
    )
    untraced = _untraced_context_compiled if torch.compiler.is_compiling() else _untraced_context
    return (torch.is_grad_enabled(), *untraced(), autocast)


def _untraced_context() -> tuple[bool, bool | None]:
    """Inference mode and whether saved-tensor hooks are on (see :func:`_call_context`)."""
    return torch.is_inference_mode_enabled(), saved_tensor_hooks_on()


# dynamo cannot trace torch's queries of these (it warned of one and broke the graph at
# each): under torch.compile they run outside the graph, one break, no warning.
_untraced_context_compiled = torch.compiler.disable(_untraced_context)


class _AugmentedProxy(fx.Proxy):
    """A Proxy whose ``x += y`` (and ``-=``, ``*=``, ``/=``) is an in-place node."""


def _augmented(target: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    return method


for _target in _AUGMENTED:
    setattr(_AugmentedProxy, f"__{_target.__name__}__", _augmented(_target))


class _Tracer(fx.Tracer):
    """Notes the first op traced under another grad mode, autocast or saved-tensor hooks
    than the trace started with (``torch.no_grad()``, ``torch.autocast``, a custom
    autograd Function, ``torch.utils.checkpoint`` in the forward): the graph keeps none
    of them, so it would compute, differentiate or save what the members do not."""

    def __init__(self, context: Callable[[], tuple[Any, ...]]) -> None:
        super().__init__()
        self._context = context
        self._start = context()
        self.changed: tuple[str, tuple[Any, ...]] | None = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AugmentedProxy(node, self)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        if self.changed is None and node.op not in ("placeholder", "output"):
            now = self._context()
            if now != self._start:
                self.changed = (node.name, now)
        return node

    def why_changed(self) -> str | None:
        """What changed at the first op traced in another context, or ``None``."""
        if self.changed is None:
            return None
        name, now = self.changed
        grad, inference, autocast, hooks = now
        start_grad, start_inference, start_autocast, start_hooks = self._start
        what = []
        if (grad, inference) != (start_grad, start_inference):
            what.append(
                "with gradients switched off or on (torch.no_grad(), torch.enable_grad(), "
                "inference_mode, a custom autograd Function, or a reentrant "
                "torch.utils.checkpoint)"
            )
        if autocast != start_autocast:
            what.append("under another torch.autocast setting")
        if hooks != start_hooks:
            what.append(
                "under saved-tensor hooks (torch.utils.checkpoint without reentrant, "
                "torch.autograd.graph.save_on_cpu)"
            )
        return f"the forward computes {name!r} {' and '.join(what)}"


# Layers whose output is always a new tensor (never their input or a view of it).
_FRESH_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


def _called_in(node: fx.Node) -> str:
    """The dotted path of the module whose forward made ``node``'s call ("" for the root's).

    torch.fx notes the modules it traced through in ``node.meta["nn_module_stack"]``
    (innermost last; its values are ``(path, class)``).
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    innermost = list(stack.values())[-1]
    return str(innermost[0]) if isinstance(innermost, tuple) else str(list(stack)[-1])


def _forward_of(path: str, template: nn.Module) -> str:
    """``"its forward (Gate's)"`` for a layer the refusal names, ``"the forward"`` for the root."""
    if not path:
        return "the forward"
    return f"its forward ({type(template.get_submodule(path)).__name__}'s)"


def _fresh(node: fx.Node, template: nn.Module) -> bool:
    """Whether ``node``'s value is a new tensor no other name can see (no view, no input)."""
    if node.op == "call_module":
        return isinstance(template.get_submodule(str(node.target)), _FRESH_LAYERS)
    return node.op == "call_function" and node.target in _AUGMENTED.values()


def _value_of(node: fx.Node) -> str:
    """What ``node`` computes, in the user's terms (not torch.fx's node name)."""
    if node.op == "call_module":
        return f"the output of {str(node.target)!r}"
    if node.op == "call_function" and node.target is operator.getitem:
        return (
            f"an item of {_value_of(node.args[0])}"
            if isinstance(node.args[0], fx.Node)
            else "an item"
        )
    if node.op == "call_function":
        return f"the result of {_name(node.target)}"
    if node.op == "call_method":
        return f"the result of Tensor.{node.target}"
    if node.op == "placeholder":
        return f"the input {str(node.target)!r}"
    return repr(node.name)


def _out_of_place(graph: fx.Graph, template: nn.Module) -> Refusal | None:
    """Turn each ``x += y`` node into ``x + y`` where eager could not show the difference.

    That is where the old ``x`` is a new tensor (a convolution's, a linear
    layer's, BatchNorm's or arithmetic's output) read by nothing else: no
    alias, view or input of the forward shares its memory (a residual
    ``out += identity``). Anything else is refused for this plan.
    """
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _AUGMENTED:
            continue
        old = node.args[0]
        if isinstance(old, fx.Node) and (set(old.users) != {node} or not _fresh(old, template)):
            return Refusal(
                "",
                f"the forward updates {_value_of(old)} in place ({node.target.__name__}) "
                "where another name or a view may see it, which this plan cannot keep",
            )
        node.target = _AUGMENTED[node.target]
    return None


def _trace(template: nn.Module, randomness: str) -> fx.Graph | Refusal:
    """Trace ``template`` and check every node against the rules."""
    for path, mod in template.named_modules():
        if has_module_hooks(mod):
            return Refusal(
                path,
                f"{_describe(path, mod)} has hooks or a forward set on the instance, which "
                "this plan would not run",
            )
        # torch.fx traces forward: a __call__ of the module's own would not run (a
        # subclass of nn.Sequential doubling its output ran grouped 0.87 off the members).
        called = [
            n
            for n in ("__call__", "_call_impl")
            if getattr(type(mod), n) is not getattr(nn.Module, n)
        ]
        if called:
            return Refusal(
                path,
                f"{_describe(path, mod)} defines {' and '.join(called)} of its own, which "
                "this plan (traced through forward) would not run",
            )
    if type(template) in _TRANSFORMERS:
        # The root is traced through its forward, but a transformer layer (or
        # encoder) has a rule of its own: one node calling it on the input.
        graph = fx.Graph()
        graph.output(graph.call_module("", (graph.placeholder("src"),)))
        reason = _check_module(template, "", randomness)
        return graph if reason is None else Refusal("", f"{_describe('', template)}: {reason}")
    state = AttributeState(watched(template.named_modules()), keep=True)
    # A draw the trace makes (torch.rand(()) takes no traced tensor; Python's
    # random, numpy) is made once, and the graph keeps the branch it took for
    # every later call and member: the stochastic depth of `if self.training and
    # torch.rand(()) < p`. It is put back too (the trace is not a call).
    generators = GlobalRandom(torch_too=True)
    try:
        with warnings.catch_warnings(), autograd_context_watch() as context:
            warnings.simplefilter("ignore")
            tracer = _Tracer(context)
            graph = tracer.trace(template)
    except Exception as e:  # any failure to trace keeps the template off the plan
        return Refusal(
            "", f"torch.fx cannot trace the template's forward ({type(e).__name__}: {e})"
        )
    finally:
        # torch.fx keeps a tensor the forward makes from constants (torch.ones(...))
        # as an attribute of the root it sets itself: not the forward's state.
        written = [
            p for p in state.changed(owned_by(template)) if not p.startswith("_tensor_constant")
        ]
        registered = state.registered()
        state.restore()  # a proxy the forward stored must not stay in the template
        drawn = generators.moved()
        if drawn:
            generators.restore()
    changed = tracer.why_changed()
    if changed is not None:
        return Refusal(
            "",
            f"{changed}, which the traced graph would not keep: it would compute, "
            "differentiate or save that part as the rest",
        )
    if drawn:
        return Refusal(
            "",
            f"the forward draws random numbers outside the traced ops (from {', '.join(drawn)}: "
            "torch.rand(()) or another random op given no input tensor, random.random(), "
            "numpy.random), which the traced graph would draw once and keep the branch of, "
            "for every call and member",
        )
    if registered:
        return Refusal(
            "",
            f"the forward registers (or removes) {', '.join(repr(p) for p in registered)} in "
            "its parameter or buffer tables, which each member does for itself (register "
            "the buffer in __init__)",
        )
    if written:
        return Refusal(
            "",
            f"the forward changes {', '.join(repr(p) for p in written)} (outside the "
            "parameters and buffers), state each member keeps for itself, which the traced "
            "graph would keep as it was at the trace",
        )
    refused = _out_of_place(graph, template)
    if refused is not None:
        return refused
    for node in graph.nodes:
        where = str(node.target)
        if node.op == "call_module":
            mod = template.get_submodule(where)
            if type(mod) not in _MODULES:
                return Refusal(where, f"{_describe(where, mod)} has no grouped form")
            reason = _check_module(mod, where, randomness)
            if reason is not None:
                return Refusal(where, f"{_describe(where, mod)}: {reason}")
        elif node.op == "call_function":
            if node.target not in _FUNCTIONS:
                path = _called_in(node)
                return Refusal(
                    path,
                    f"{_forward_of(path, template)} calls {_name(node.target)}, which has no "
                    "grouped form",
                )
            if node.target in _RANDOM_FUNCTIONS and randomness != "different":
                path = _called_in(node)
                return Refusal(
                    path,
                    f"{_forward_of(path, template)} calls {_name(node.target)} with "
                    f"randomness={randomness!r}",
                )
        elif node.op == "call_method":
            if node.target not in _METHODS:
                path = _called_in(node)
                return Refusal(
                    path,
                    f"{_forward_of(path, template)} calls Tensor.{node.target}, which has no "
                    "grouped form",
                )
        elif node.op == "get_attr":
            if where.startswith("_tensor_constant"):
                return Refusal(
                    "",
                    "the forward makes a tensor from constants (torch.ones, torch.tensor, "
                    "...), which has no grouped form",
                )
            return Refusal(where, f"the forward reads {where!r} directly, not through a layer")
    return graph


def _describe(path: str, mod: nn.Module) -> str:
    return (
        f"layer {path!r} ({type(mod).__name__})" if path else f"the template ({type(mod).__name__})"
    )


def _name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or "torch"
    return f"{module}.{getattr(fn, '__name__', repr(fn))}"
