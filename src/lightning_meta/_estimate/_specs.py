"""Input specs: the shape and dtype of an input tensor, standing in for the tensor.

``estimate`` accepts, wherever an input tensor goes, an :class:`InputSpec`
or a ``"SHAPE:DTYPE"`` string (``"8,16:float32"``), which the command line's
``--input`` also takes.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any, NamedTuple

import torch

from lightning_meta._errors import ArgumentTypeError, ArgumentValueError

__all__ = [
    "InputSpec",
    "check_shape",
    "describe_tensor",
    "parse_dtype",
    "parse_input_spec",
    "spec_of",
]

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

    Wherever :func:`~lightning_meta.estimate` or :func:`~lightning_meta.find_fit`
    take an input tensor, an ``InputSpec`` (or the string ``"8,16:int64"``)
    may stand in for it; the forward then gets a tensor of that shape and
    dtype that holds no data (values read from it read as zeros, see
    ``Estimate.inputs_read_as_zeros``).

    Args:
        shape: the sizes, non-negative integers.
        dtype: a ``torch.dtype`` (default ``torch.float32``).

    Example::

        >>> import torch, lightning_meta as lm
        >>> spec = lm.InputSpec((8, 16), torch.int64)
        >>> spec
        InputSpec(shape=(8, 16), dtype=torch.int64)
        >>> lm.estimate(lambda: torch.nn.Embedding(100, 4), spec, optimizer=None).parameters
        400
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
    dtype = getattr(torch, key, None) if key.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise ArgumentValueError(
            f"unknown dtype {_quoted(name)}. Fix: use a torch dtype name such as float32, bfloat16, "
            "float16, int64 or bool."
        )
    return dtype


#: the largest size, element count and byte count of a tensor (torch's int64 sizes)
_LIMIT = 2**63 - 1


def _sizes(text: str) -> tuple[int, ...] | None:
    """Return the sizes of a comma-separated shape, or ``None`` if it is not one."""
    parts = [part.strip() for part in text.split(",")]
    if not all(p.isascii() and p.isdigit() for p in parts):
        return None
    # int() refuses thousands of digits; such a size is too large anyway
    return tuple(int(p) if len(p) <= 100 else 10**100 for p in parts)


def _show(size: int) -> str:
    return str(size) if size.bit_length() <= 128 else f"about 2**{size.bit_length() - 1}"


def _quoted(text: str) -> str:
    """``repr`` of a spec for a message, cut to a readable length."""
    return repr(text) if len(text) <= 60 else repr(text[:57] + "...")


def check_shape(shape: tuple[int, ...], dtype: torch.dtype, label: str, fix: str) -> None:
    """Raise unless torch can make a tensor of ``shape`` and ``dtype`` (on meta, so for free).

    Args:
        shape: non-negative sizes.
        dtype: the tensor's dtype.
        label: starts the message (``"input spec '8,16:float32'"``).
        fix: ends it.

    Raises:
        ArgumentValueError: if a size, the element count or the byte count
            is beyond what torch's 64-bit sizes hold, or torch refuses the shape.
    """
    if str(dtype).startswith("torch.q"):  # qint8, quint8, qint32, quint4x2...
        raise ArgumentValueError(
            f"{label}: {dtype} is a quantized dtype, which estimate cannot simulate. "
            "Fix: pass a floating point or integer dtype."
        )
    too_big = [s for s in shape if s > _LIMIT]
    if too_big:
        raise ArgumentValueError(
            f"{label}: size {_show(too_big[0])} is larger than any tensor dimension can be "
            f"(2**63 - 1 = {_LIMIT}). {fix}"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > _LIMIT:
        raise ArgumentValueError(
            f"{label}: {_show(math.prod(shape))} elements of {str(dtype).removeprefix('torch.')} "
            f"would take {_show(nbytes)} bytes, more than a tensor can hold (2**63 - 1). {fix}"
        )
    try:
        torch.empty(shape, dtype=dtype, device="meta")
    except (RuntimeError, TypeError, ValueError, OverflowError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ArgumentValueError(
            f"{label}: torch cannot make a tensor of this shape and dtype "
            f"({type(e).__name__}: {first}). {fix}"
        ) from e


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``"SHAPE:DTYPE"`` (``"8,16:float32"``, ``"1,4096:int64"``) into an :class:`InputSpec`.

    The dtype may be left out (``"8,16"``), meaning ``float32``.

    Args:
        text: the spec.

    Returns:
        The :class:`InputSpec`.

    Raises:
        ArgumentValueError: if the shape is not comma-separated non-negative
            integers, is larger than a tensor can be, or the dtype is unknown.

    Example::

        >>> parse_input_spec("1,4096:int64")
        InputSpec(shape=(1, 4096), dtype=torch.int64)
    """
    if not isinstance(text, str):
        raise ArgumentTypeError(
            f"input spec: expected a string such as '8,16:float32', got {type(text).__name__}."
        )
    fix = "Fix: write it like '8,16:float32' or '1,4096:int64'."
    shape_text, _, dtype_text = text.partition(":")
    shape = _sizes(shape_text)
    if shape is None:
        raise ArgumentValueError(
            f"input spec {_quoted(text)}: the shape must be comma-separated non-negative integers. {fix}"
        )
    try:
        dtype = parse_dtype(dtype_text) if dtype_text else torch.float32
    except ArgumentValueError as e:
        raise ArgumentValueError(f"input spec {_quoted(text)}: {e}") from e
    check_shape(shape, dtype, f"input spec {_quoted(text)}", fix)
    return InputSpec(shape, dtype)


def _label(spec: InputSpec) -> str:
    try:
        text = repr(spec)
    except ValueError:  # a size of thousands of digits has no repr
        return "InputSpec(<too large to show>)"
    return text if len(text) <= 80 else text[:77] + "..."


def _checked_spec(spec: InputSpec) -> InputSpec:
    """Return ``spec`` with plain ``int`` sizes, after checking its shape and dtype."""
    fix = "Fix: write it like InputSpec((8, 16), torch.int64)."
    if not isinstance(spec.dtype, torch.dtype):
        raise ArgumentTypeError(
            f"{_label(spec)}: the dtype must be a torch.dtype, got {type(spec.dtype).__name__}. {fix}"
        )
    try:
        if any(isinstance(s, bool) for s in spec.shape):  # operator.index(True) is 1
            raise TypeError("a bool is not a size")
        shape = tuple(operator.index(s) for s in spec.shape)
    except TypeError as e:
        raise ArgumentTypeError(
            f"{_label(spec)}: the shape must be a sequence of integers. {fix}"
        ) from e
    if any(s < 0 for s in shape):
        raise ArgumentValueError(f"{_label(spec)}: the sizes must be non-negative. {fix}")
    check_shape(shape, spec.dtype, _label(spec), fix)
    return InputSpec(shape, spec.dtype)


#: what a mistyped shape is made of ("8x16", "2,,4", "2.5,4", "8 16", "-1,16", "(8, 32)")
_SHAPE_LIKE = re.compile(r"[0-9\s,xX*.+\-()\[\]]*[0-9][0-9\s,xX*.+\-()\[\]]*")
#: one size as typed between commas or semicolons: "16", "8_0", "1e3" (not a float: "0.5",
#: "1e-4", a list of which is text)
_SIZE_LIKE = re.compile(r"[ \t(\[]*[0-9]+(?:_[0-9]+)*(?:[eE][0-9]+)?[ \t)\]]*")


def _shape_like(text: str) -> bool:
    """Whether ``text`` reads as a mistyped shape, not as text a forward takes: digits and
    shape punctuation alone (``"8x16"``, ``"2.5,4"``, ``"-1,16"``), or sizes written
    otherwise between commas or semicolons (``"8;16"``, ``"1e3,16"``, ``"8_0,16"``).
    A lone ``"1e-4"``, ``"e4"``, ``"50%"`` or ``"v2"`` is text, and so are floats between
    semicolons (``"0.5;0.25"``)."""
    if _SHAPE_LIKE.fullmatch(text) is not None:
        return True
    parts = re.split(r"[,;]", text)
    return len(parts) > 1 and all(_SIZE_LIKE.fullmatch(p) is not None for p in parts)


def spec_of(value: Any) -> InputSpec | None:
    """Return ``value`` as an :class:`InputSpec` if it is one or a ``"SHAPE:DTYPE"`` string.

    A string of comma-separated integers alone (``"8,16"``) is a spec too,
    of ``float32``, as ``--input 8,16`` is on the command line. A string made
    of digits and shape punctuation that does not parse (``"8x16"``,
    ``"2.5,4"``, ``"-1,16"``), or of sizes written otherwise between commas or
    semicolons (``"8;16"``, ``"1e3,16"``), is refused as ``--input`` refuses it,
    rather than handed to the forward as text.

    Args:
        value: one leaf of ``example_inputs``.

    Returns:
        The spec, or ``None`` if ``value`` is neither.

    Raises:
        ArgumentTypeError: if an :class:`InputSpec` has a shape of non-integers
            or a dtype that is not a ``torch.dtype``.
        ArgumentValueError: if a spec has a negative size or an unknown dtype,
            or a string looks like a shape but is not one.

    Example::

        >>> from lightning_meta._estimate._specs import spec_of
        >>> spec_of("8,16"), spec_of("hello")
        (InputSpec(shape=(8, 16), dtype=torch.float32), None)
        >>> spec_of("8x16")
        Traceback (most recent call last):
        ...
        lightning_meta._errors.ArgumentValueError: input spec '8x16': the shape must be comma-separated...
    """
    if isinstance(value, InputSpec):
        return _checked_spec(value)
    if isinstance(value, str) and (":" in value or _shape_like(value)):
        return parse_input_spec(value)
    return None


def describe_tensor(t: torch.Tensor) -> str:
    """Return ``float32[8, 16]`` for a tensor, the way error messages show inputs."""
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
