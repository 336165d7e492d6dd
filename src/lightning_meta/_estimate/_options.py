"""Normalise the options of :func:`lightning_meta.estimate`: device, precision, optimizer, loop.

Every option is checked here, before anything runs, so that a typo fails in
milliseconds with a message that lists the accepted values. A bad option is
an :class:`~lightning_meta._errors.ArgumentTypeError` (wrong kind of value)
or :class:`~lightning_meta._errors.ArgumentValueError` (unknown name, value
out of range), both :class:`~lightning_meta.MetaTensorError`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch

from lightning_meta._arguments import describe, real_device, spelled
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError
from lightning_meta._estimate._parallel import Parallel

__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "LossFn",
    "OptimizerFactory",
    "OptimizerLike",
    "Options",
    "Precision",
    "make_optimizer_factory",
    "resolve_options",
    "resolve_precision",
    "target_device",
]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
OptimizerLike = str | type[torch.optim.Optimizer] | OptimizerFactory | None
LossFn = Callable[[Any], torch.Tensor]


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
# How a fix names an optimizer: in Python, and on the command line, which takes no function.
_OPTIMIZER_FIX = "optimizer='adamw', optimizer=torch.optim.AdamW or a function of the parameters"
_OPTIMIZER_FIX_CLI = "--optimizer adamw or --optimizer torch.optim:AdamW"

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 1e-3}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
}

_PRECISION_NAMES = f"{', '.join(PRECISIONS)} (legacy {', '.join(_PRECISION_ALIASES)} also accepted)"


def resolve_precision(precision: str | int) -> Precision:
    """Return the :class:`Precision` for a Lightning precision name such as ``"bf16-mixed"``.

    Args:
        precision: a Lightning precision name, or a legacy one such as ``16``.

    Returns:
        The :class:`Precision`.

    Raises:
        ArgumentTypeError: if ``precision`` is neither a string nor an integer.
        ArgumentValueError: if ``precision`` is not one of Lightning's names.
    """
    if isinstance(precision, bool) or not isinstance(precision, (str, int)):
        raise ArgumentTypeError(
            f"estimate: precision={precision!r} is a {type(precision).__name__}, not a "
            f"Lightning precision name. Fix: pass one of {_PRECISION_NAMES}."
        )
    key = str(precision)
    key = _PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise ArgumentValueError(
            f"estimate: unknown precision {precision!r}. Fix: use one of Lightning's names: "
            f"{_PRECISION_NAMES}."
        )
    return PRECISIONS[key]


def make_optimizer_factory(optimizer: OptimizerLike) -> tuple[str | None, OptimizerFactory | None]:
    """Return ``(name, factory)`` for an optimizer name, class or factory (``None``: no step).

    Args:
        optimizer: a name in :data:`OPTIMIZERS`, an ``Optimizer`` subclass, a
            callable taking the parameters, or ``None``.

    Returns:
        The name the estimate reports and the factory (both ``None`` for no
        optimizer).

    Raises:
        ArgumentValueError: if ``optimizer`` is an unknown name.
        ArgumentTypeError: if ``optimizer`` is neither a name nor callable (an
            optimizer instance, say: its class is what is wanted), or is a
            class that is not an ``Optimizer`` subclass (``nn.Linear``).
    """
    if optimizer is None:
        return None, None
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in OPTIMIZERS:
            raise ArgumentValueError(
                f"estimate: unknown optimizer {optimizer!r}. Fix: use one of "
                f"{', '.join(OPTIMIZERS)}, "
                + spelled(
                    "a torch.optim.Optimizer subclass, or a callable that takes the "
                    "parameters and returns an optimizer.",
                    "or an Optimizer class as MODULE:CLASS (torch.optim:AdamW).",
                )
            )
        cls, kwargs = OPTIMIZERS[key]
        return key, functools.partial(cls, **kwargs)
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer.__name__, cast(OptimizerFactory, optimizer)
    if isinstance(optimizer, type):
        raise ArgumentTypeError(
            f"estimate: optimizer {optimizer.__module__}.{optimizer.__qualname__} is a class "
            "that is not a torch.optim.Optimizer subclass. Fix: pass "
            + spelled(_OPTIMIZER_FIX, _OPTIMIZER_FIX_CLI)
            + "."
        )
    if callable(optimizer):
        return describe(optimizer), optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        # its repr spans lines and its parameters are another model's
        got = f"an {type(optimizer).__name__} instance, which holds other parameters"
    else:
        got = f"{type(optimizer).__name__} {optimizer!r}"
    raise ArgumentTypeError(
        f"estimate: optimizer must be a name ({', '.join(OPTIMIZERS)}), an Optimizer class "
        f"or a callable, got {got}. Fix: pass " + spelled(_OPTIMIZER_FIX, _OPTIMIZER_FIX_CLI) + "."
    )


def target_device(device: Any) -> torch.device:
    """Return the device to simulate the step on, refusing one this machine does not have.

    Args:
        device: the device the model would train on, as ``estimate`` got it.

    Returns:
        The ``torch.device``, with an index for an accelerator.

    Raises:
        ArgumentTypeError: if ``device`` is not a device, string or index.
        ArgumentValueError: if ``device`` is ``meta``, unknown to torch, or
            missing here (``cuda`` on a CPU-only torch): the fake step still
            asks the device's backend for its properties, which aborts some
            builds instead of raising.
    """
    if isinstance(device, (str, torch.device)):
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError, ValueError):
            kind = None  # real_device below words the refusal
        if kind == "meta":
            # estimate has its own reason to refuse meta, worth saying
            raise ArgumentValueError(
                "estimate: device='meta' picks kernels no real device runs (attention, for "
                "one). Fix: pass the device the model would train on, such as 'cpu' or 'cuda'."
            )
    checked = real_device(device, "estimate", default="cpu")
    return checked if checked is not None else torch.device("cpu")


@dataclass(frozen=True)
class Options:
    """The checked options of one :func:`~lightning_meta.estimate` call.

    ``loss_fn`` is ``None`` for the default loss; ``optimizer_name`` and
    ``optimizer_factory`` are ``None`` for a step without an optimizer;
    ``parallel`` is ``None`` for one process.
    """

    device: torch.device
    precision: Precision
    optimizer_name: str | None
    optimizer_factory: OptimizerFactory | None
    loss_fn: LossFn | None
    zero_grad_before_forward: bool
    depth: int
    extrapolate: bool
    parallel: Parallel | None = None


def resolve_options(
    *,
    loss_fn: Any,
    optimizer: Any,
    precision: Any,
    device: Any,
    depth: Any,
    loop: Any,
    extrapolate: Any,
) -> Options:
    """Check the keyword options of ``estimate`` and return them normalised.

    Args:
        loss_fn: ``None`` or a callable taking the model's output.
        optimizer: see :func:`make_optimizer_factory`.
        precision: see :func:`resolve_precision`.
        device: see :func:`target_device`.
        depth: a non-negative ``int``.
        loop: ``"lightning"`` or ``"plain"``.
        extrapolate: whether deep stacks of identical blocks may be extrapolated.

    Returns:
        The :class:`Options`.

    Raises:
        ArgumentTypeError: if an option has the wrong type.
        ArgumentValueError: if an option has a value that cannot work.

    Example::

        >>> resolve_options(loss_fn=None, optimizer="sgd", precision="bf16-mixed",
        ...                 device="cpu", depth=2, loop="plain", extrapolate=True).precision
        Precision(name='bf16-mixed', cast_to=None, autocast=torch.bfloat16)
    """
    prec = resolve_precision(precision)
    opt_name, opt_factory = make_optimizer_factory(optimizer)
    if loss_fn is not None and not callable(loss_fn):
        raise ArgumentTypeError(
            f"estimate: loss_fn must be callable, got {type(loss_fn).__name__}. Fix: pass a "
            "function taking the model's output and returning a one-element tensor, or None."
        )
    if not isinstance(loop, str) or loop not in ("lightning", "plain"):
        raise ArgumentValueError(
            f"estimate: loop must be 'lightning' or 'plain', got {loop!r}. Fix: pass "
            "loop='lightning' (zero gradients after the forward) or loop='plain'."
        )
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ArgumentTypeError(
            f"estimate: depth must be an int, got {type(depth).__name__}. Fix: pass depth=2."
        )
    if not isinstance(extrapolate, bool):
        raise ArgumentTypeError(
            f"estimate: extrapolate must be True or False, got {extrapolate!r}. Fix: pass "
            "extrapolate=False to run every block, or True."
        )
    if depth < 0:
        raise ArgumentValueError(
            f"estimate: depth must be >= 0, got {depth}. Fix: pass 0 for the root only."
        )
    return Options(
        device=target_device(device),
        precision=prec,
        optimizer_name=opt_name,
        optimizer_factory=opt_factory,
        loss_fn=loss_fn,
        zero_grad_before_forward=loop == "plain",
        depth=depth,
        extrapolate=extrapolate,
    )
