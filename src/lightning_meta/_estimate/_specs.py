"""Input specs: the shape and dtype of an input tensor, standing in for the tensor.

``estimate`` accepts, wherever an input tensor goes, an :class:`InputSpec`
or a ``"SHAPE:DTYPE"`` string (``"8,16:float32"``), which the command line's
``--input`` also takes.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch

from lightning_meta._errors import ArgumentTypeError, ArgumentValueError

__all__ = ["InputSpec", "describe_tensor", "parse_dtype", "parse_input_spec", "spec_of"]

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

    Args:
        name: a torch dtype name, with or without ``torch.``, or an alias
            such as ``bf16`` or ``half``.

    Returns:
        The ``torch.dtype``.

    Raises:
        ArgumentValueError: if no torch dtype has that name.
    """
    key = name.strip().lower().removeprefix("torch.")
    if key in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key]
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype):
        raise ArgumentValueError(
            f"unknown dtype {name!r}. Fix: use a torch dtype name such as float32, bfloat16, "
            "float16, int64 or bool."
        )
    return dtype


def _sizes(text: str) -> tuple[int, ...] | None:
    """Return the sizes of a comma-separated shape, or ``None`` if it is not one."""
    if not text.strip():
        return None
    try:
        shape = tuple(int(p) for p in (part.strip() for part in text.split(",")) if p)
    except ValueError:
        return None
    return shape if all(s >= 0 for s in shape) else None


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``"SHAPE:DTYPE"`` (``"8,16:float32"``, ``"1,4096:int64"``) into an :class:`InputSpec`.

    The dtype may be left out (``"8,16"``), meaning ``float32``.

    Args:
        text: the spec.

    Returns:
        The :class:`InputSpec`.

    Raises:
        ArgumentValueError: if the shape is not comma-separated non-negative
            integers or the dtype is unknown.
    """
    shape_text, _, dtype_text = text.partition(":")
    shape = _sizes(shape_text)
    if shape is None:
        raise ArgumentValueError(
            f"input spec {text!r}: the shape must be comma-separated non-negative integers. "
            "Fix: write it like '8,16:float32' or '1,4096:int64'."
        )
    try:
        dtype = parse_dtype(dtype_text) if dtype_text else torch.float32
    except ArgumentValueError as e:
        raise ArgumentValueError(f"input spec {text!r}: {e}") from e
    return InputSpec(shape, dtype)


def _checked_spec(spec: InputSpec) -> InputSpec:
    """Return ``spec`` with plain ``int`` sizes, after checking its shape and dtype."""
    fix = "Fix: write it like InputSpec((8, 16), torch.int64)."
    if not isinstance(spec.dtype, torch.dtype):
        raise ArgumentTypeError(
            f"{spec!r}: the dtype must be a torch.dtype, got {type(spec.dtype).__name__}. {fix}"
        )
    try:
        shape = tuple(operator.index(s) for s in spec.shape)
    except TypeError as e:
        raise ArgumentTypeError(f"{spec!r}: the shape must be a sequence of integers. {fix}") from e
    if any(s < 0 for s in shape):
        raise ArgumentValueError(f"{spec!r}: the sizes must be non-negative. {fix}")
    return InputSpec(shape, spec.dtype)


def spec_of(value: Any) -> InputSpec | None:
    """Return ``value`` as an :class:`InputSpec` if it is one or a ``"SHAPE:DTYPE"`` string.

    Args:
        value: one leaf of ``example_inputs``.

    Returns:
        The spec, or ``None`` if ``value`` is neither.

    Raises:
        ArgumentTypeError: if an :class:`InputSpec` has a shape of non-integers
            or a dtype that is not a ``torch.dtype``.
        ArgumentValueError: if a spec has a negative size or an unknown dtype.
    """
    if isinstance(value, InputSpec):
        return _checked_spec(value)
    if isinstance(value, str) and ":" in value:
        return parse_input_spec(value)
    return None


def describe_tensor(t: torch.Tensor) -> str:
    """Return ``float32[8, 16]`` for a tensor, the way error messages show inputs."""
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
