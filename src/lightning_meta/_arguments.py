"""Normalise and check the arguments every public entry point shares.

One implementation per argument kind (a module, a device, a dtype), so that
``materialize``, ``load_checkpoint`` and ``estimate`` refuse the same bad
input with the same words, as :class:`~lightning_meta._errors.ArgumentTypeError`
or :class:`~lightning_meta._errors.ArgumentValueError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from lightning_meta._compat import functorch_disabled, is_torch_meta_error
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError, MetaTensorError

__all__ = [
    "build_on_meta",
    "check_flag",
    "check_module_argument",
    "command_line_spelling",
    "describe",
    "float_dtype",
    "real_device",
    "spelled",
]

DeviceLike = torch.device | str | int

#: how messages name the context factories run in
_META = "torch.device('meta')"


# Whether messages name options as the command line spells them (--no-strict)
# rather than as Python keywords (strict=False): set by the CLI around its call.
_COMMAND_LINE: ContextVar[bool] = ContextVar("lightning_meta_command_line", default=False)


@contextlib.contextmanager
def command_line_spelling() -> Iterator[None]:
    """Within the block, :func:`spelled` gives the command line's spelling of an option."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def spelled(python: str, command_line: str) -> str:
    """``python`` (``strict=False``), or ``command_line`` (``--no-strict``) inside
    :func:`command_line_spelling`: a message's fix names what its reader types."""
    return command_line if _COMMAND_LINE.get() else python


def describe(obj: object) -> str:
    """Name ``obj`` for a message: a class's or function's qualified name, else its type's."""
    return str(getattr(obj, "__qualname__", None) or type(obj).__qualname__)


def check_module_argument(module: Any, function: str, fix: str) -> None:
    """Raise unless ``module`` is an ``nn.Module``; ``fix`` completes the message."""
    if not isinstance(module, nn.Module):
        raise ArgumentTypeError(
            f"{function} expects an nn.Module, got {type(module).__name__}. Fix: {fix}."
        )


def check_flag(value: Any, name: str, function: str) -> None:
    """Raise unless ``value`` (the argument ``name`` of ``function``) is ``True`` or ``False``.

    A truthy string (``"no"``) would otherwise switch the option on.
    """
    if not isinstance(value, bool):
        raise ArgumentTypeError(
            f"{function} got {name}={value!r} ({type(value).__name__}); expected True or "
            f"False. Fix: pass {name}=True or {name}=False."
        )


def real_device(
    device: DeviceLike | None, function: str, *, default: str | None = None
) -> torch.device | None:
    """Return ``device`` as a ``torch.device`` with an index, after checking it can be used.

    ``None`` gives ``default`` (``None`` stays ``None``). Refuses ``meta`` and
    devices this torch build or machine does not have, before anything
    touches them (asking torch for a missing backend aborts some builds).
    """
    if device is None:
        if default is None:
            return None
        device = default
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise ArgumentTypeError(
            f"{function} got device={device!r} ({type(device).__name__}); expected a "
            "torch.device, a string such as 'cpu' or 'cuda:0', or a CUDA index."
        )
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ArgumentValueError(
            f"{function} got device={device!r}, which torch does not recognise ({e}). "
            "Fix: pass a device such as 'cpu' or 'cuda:0'."
        ) from e
    if d.type == "meta":
        raise ArgumentValueError(
            f"{function} got device='meta'. Fix: pass a real device such as 'cpu' or 'cuda'."
        )
    if d.type == "cpu":
        return d
    backend = getattr(torch, d.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise ArgumentValueError(
            f"{function} got device={str(d)!r} but torch {torch.__version__} has no usable "
            f"{d.type} device here. Fix: pass "
            + spelled("device='cpu'", "--device cpu")
            + f", or run where a {d.type} device is available."
        )
    if d.index is None:
        d = torch.device(d.type, torch.get_device_module(d.type).current_device())
    elif d.index >= torch.get_device_module(d.type).device_count():
        raise ArgumentValueError(
            f"{function} got device={str(d)!r} but only "
            f"{torch.get_device_module(d.type).device_count()} {d.type} device(s) exist. "
            f"Fix: pass an index below that."
        )
    return d


def float_dtype(dtype: Any, function: str) -> torch.dtype | None:
    """Return ``dtype`` if it is ``None`` or a floating point ``torch.dtype``, else raise."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise ArgumentTypeError(
            f"{function} got dtype={dtype!r} ({type(dtype).__name__}); expected a floating "
            "point torch.dtype such as torch.bfloat16, or None. Fix: pass the torch.dtype "
            "object (dtype=torch.bfloat16), not its name."
        )
    if not dtype.is_floating_point:
        raise ArgumentValueError(
            f"{function} got dtype={dtype!r}; expected a floating point torch.dtype or None. "
            "Fix: pass torch.float32, torch.bfloat16 or torch.float16."
        )
    return dtype


def build_on_meta(factory: Any, owner: str) -> nn.Module:
    """Call ``factory()`` under ``torch.device("meta")``, outside any ``torch.func`` transform.

    The one way a factory argument (of ``MetaTemplate``, ``Ensemble``'s
    template, ``estimate``) is built: parameters of model size never get
    storage, and a factory first called inside ``torch.vmap`` does not run its
    random initialisation batched. ``owner`` starts the messages ("MetaTemplate
    factory", "estimate: factory").

    A :class:`~lightning_meta.MetaTensorError` the factory raises (the
    package's own refusal of something built inside it) is raised again, of
    the same class and paths, saying that it ran under ``torch.device("meta")``
    and keeping its one "Fix:"; one that already says so (the command line's
    target errors) passes unchanged.
    """
    name = describe(factory)
    try:
        with functorch_disabled(), torch.device("meta"):
            module = factory()
    except MetaTensorError as e:
        text = str(e)
        if _META in text:
            raise
        # Written for code that runs eagerly: the reader must learn that the
        # factory ran on meta, or its advice (build the members normally)
        # reads as if they had done something else.
        text = text.strip()
        if "Fix:" not in text:
            text = (
                f"{text.rstrip('.')}. Fix: make the factory work under {_META}, or pass a "
                "module built outside it."
            )
        builder = owner.split()[0].rstrip(":")
        message = (
            f"{owner} {name!r} raised {type(e).__name__} under {_META}, where {builder} "
            f"builds it (shape only): {text}"
        )
        try:
            again = type(e)(message, paths=e.paths)
        except TypeError:  # a subclass of the user's with a constructor of its own
            again = MetaTensorError(message, paths=e.paths)
        raise again from e
    except Exception as e:
        fix = (
            "make the factory build the module without reading tensor values (no "
            ".item(), .tolist(), printing or data-dependent branches)"
            if is_torch_meta_error(e)
            else "correct the factory: it raised this itself (see the cause above)"
        )
        raise MetaTensorError(
            f"{owner} {name!r} failed under torch.device('meta'): {type(e).__name__}: {e}. "
            f"Fix: {fix}."
        ) from e
    if not isinstance(module, nn.Module):
        raise ArgumentTypeError(
            f"{owner} {name!r} returned {type(module).__name__}, expected an nn.Module. "
            "Fix: return the module."
        )
    return module
