"""Normalise the options of :func:`lightning_meta.estimate`: precision, optimizer, input specs.

Every option is checked here, before anything runs, so that a typo fails in
milliseconds with a message that lists the accepted values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch

from lightning_meta._errors import MetaTensorError

__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "InputSpec",
    "OptimizerLike",
    "Precision",
    "make_optimizer_factory",
    "parse_dtype",
    "parse_input_spec",
    "resolve_precision",
]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
OptimizerLike = str | type[torch.optim.Optimizer] | OptimizerFactory | None


@dataclass(frozen=True)
class Precision:
    """How a Lightning precision setting changes the tensors of a training step.

    ``cast_to`` is the dtype floating parameters, buffers and inputs are
    converted to (``*-true`` settings, as Lightning's ``HalfPrecision`` and
    ``DoublePrecision`` plugins do); ``autocast`` is the dtype of
    :func:`torch.autocast` around forward and loss (``*-mixed`` settings).
    """

    name: str
    cast_to: torch.dtype | None
    autocast: torch.dtype | None


# Lightning's canonical names (``lightning.fabric.connector._PRECISION_INPUT_STR``).
PRECISIONS: dict[str, Precision] = {
    "32-true": Precision("32-true", None, None),
    "64-true": Precision("64-true", torch.float64, None),
    "16-true": Precision("16-true", torch.float16, None),
    "bf16-true": Precision("bf16-true", torch.bfloat16, None),
    "16-mixed": Precision("16-mixed", None, torch.float16),
    "bf16-mixed": Precision("bf16-mixed", None, torch.bfloat16),
}
# Lightning's legacy spellings, mapped the way ``_convert_precision_to_unified_args`` does.
_PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}

# name -> (torch class, keyword arguments); lr values do not change memory or FLOPs.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 1e-3}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
}

_DTYPE_ALIASES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "half": torch.float16,
    "float": torch.float32,
    "double": torch.float64,
    "long": torch.int64,
    "int": torch.int32,
}


def resolve_precision(precision: str | int) -> Precision:
    """Return the :class:`Precision` for a Lightning precision name such as ``"bf16-mixed"``.

    Raises:
        MetaTensorError: if ``precision`` is not one of Lightning's names.
    """
    key = str(precision)
    key = _PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise MetaTensorError(
            f"estimate: unknown precision {precision!r}. Fix: use one of Lightning's names: "
            f"{', '.join(PRECISIONS)} (legacy {', '.join(_PRECISION_ALIASES)} also accepted)."
        )
    return PRECISIONS[key]


def _describe(obj: object) -> str:
    return str(getattr(obj, "__qualname__", None) or type(obj).__qualname__)


def make_optimizer_factory(optimizer: OptimizerLike) -> tuple[str | None, OptimizerFactory | None]:
    """Return ``(name, factory)`` for an optimizer name, class or factory (``None``: no step).

    Raises:
        MetaTensorError: if ``optimizer`` is an unknown name or not callable.
    """
    if optimizer is None:
        return None, None
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in OPTIMIZERS:
            raise MetaTensorError(
                f"estimate: unknown optimizer {optimizer!r}. Fix: use one of "
                f"{', '.join(OPTIMIZERS)}, an torch.optim.Optimizer subclass, or a callable "
                "that takes the parameters and returns an optimizer."
            )
        cls, kwargs = OPTIMIZERS[key]
        return key, functools.partial(cls, **kwargs)
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer.__name__, cast(OptimizerFactory, optimizer)
    if callable(optimizer):
        return _describe(optimizer), cast(OptimizerFactory, optimizer)
    raise MetaTensorError(
        f"estimate: optimizer must be a name ({', '.join(OPTIMIZERS)}), an Optimizer class "
        f"or a callable, got {type(optimizer).__name__} {optimizer!r}."
    )


class InputSpec(NamedTuple):
    """The shape and dtype of one input tensor, standing in for the tensor itself.

    Example::

        >>> InputSpec((8, 16), torch.int64)
        InputSpec(shape=(8, 16), dtype=torch.int64)
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def to_meta(self) -> torch.Tensor:
        """Return a meta tensor of this shape and dtype."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def parse_dtype(name: str) -> torch.dtype:
    """Return the torch dtype called ``name`` (``float32``, ``bf16``, ``int64``, ...).

    Raises:
        MetaTensorError: if no torch dtype has that name.
    """
    key = name.strip().lower().removeprefix("torch.")
    if key in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key]
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype):
        raise MetaTensorError(
            f"unknown dtype {name!r}. Fix: use a torch dtype name such as float32, bfloat16, "
            "float16, int64 or bool."
        )
    return dtype


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``"SHAPE:DTYPE"`` (``"8,16:float32"``, ``"1,4096:int64"``) into an :class:`InputSpec`.

    The dtype may be left out (``"8,16"``), meaning ``float32``.

    Raises:
        MetaTensorError: if the shape is not comma-separated non-negative integers
            or the dtype is unknown.
    """
    shape_text, _, dtype_text = text.partition(":")
    try:
        parts = [p.strip() for p in shape_text.split(",") if p.strip()]
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = (-1,)
    if not shape_text.strip() or any(s < 0 for s in shape):
        raise MetaTensorError(
            f"input spec {text!r}: the shape must be comma-separated non-negative integers. "
            "Fix: write it like '8,16:float32' or '1,4096:int64'."
        )
    try:
        dtype = parse_dtype(dtype_text) if dtype_text else torch.float32
    except MetaTensorError as e:
        raise MetaTensorError(f"input spec {text!r}: {e}") from e
    return InputSpec(shape, dtype)


def spec_of(value: Any) -> InputSpec | None:
    """Return ``value`` as an :class:`InputSpec` if it is one or a ``"SHAPE:DTYPE"`` string."""
    if isinstance(value, InputSpec):
        return InputSpec(tuple(int(s) for s in value.shape), value.dtype)
    if isinstance(value, str) and ":" in value:
        return parse_input_spec(value)
    return None


def describe_tensor(t: torch.Tensor) -> str:
    """Return ``float32[8, 16]`` for a tensor, the way error messages show inputs."""
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def shape_list(shapes: Sequence[torch.Tensor]) -> str:
    """Return the shapes of ``shapes`` joined for a message."""
    return ", ".join(describe_tensor(t) for t in shapes)
