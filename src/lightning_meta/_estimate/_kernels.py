"""Refuse, during a simulated step, the inputs a real kernel would refuse for their dtype.

Fake and meta kernels compute output shapes and dtypes; many skip the dtype
checks the real CPU and CUDA kernels make (``addmm`` of an ``int64`` input and
``float32`` weights, ``native_layer_norm`` of ``float64`` activations and
``float32`` weights, ``index_select`` with a float index, ``gelu`` of integers).
A simulation that lets them through reports numbers for a model that cannot run.

:class:`RealKernels` asks the real kernel instead, once per distinct call: the
operator is run on tiny zero-filled tensors of the same dtypes on the CPU, and
the same call on meta tensors of the same shapes tells a dtype refusal apart
from one caused by the shrinking (a meta kernel checks shapes but not dtypes).
Shrinking keeps every other argument as it is, so an integer that states a
size (``mkldnn_rnn_layer``'s ``hidden_size``) would no longer match the tiny
tensors, and a real kernel that trusts it reads past them: only operators
whose meta kernel is torch's reference shape function (``torch.Tag.core``,
``torch.Tag.pointwise``), or calls that pass no integer, are shrunk; any
other call is asked at its true shapes or not at all.
A refusal is raised as a :class:`KernelRefusal` of the kind torch raises
(``RuntimeError``, ``NotImplementedError``, ``IndexError``...), so model code
that catches torch's error behaves as it would for real; ``estimate`` turns it
into a :class:`~lightning_meta.MetaTensorError` naming the operator, the
module and the fix.

Only ``aten`` operators of the forward pass (and loss) are checked; views,
operators without tensor inputs, operators that cannot run on tiny CPU
tensors (CUDA-only kernels, value-dependent checks) and calls that may not be
shrunk and are too large to run whole are let through.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_meta._compat import is_dtype_refusal, no_dispatch_modes, tree_leaves, tree_map

__all__ = ["FakeKernelStricter", "KernelRefusal", "RealKernels", "refusal_of"]

#: most elements the tiny tensors of one check may hold (inputs; outputs get 16 times as many)
CAP = 1 << 16
#: distinct calls remembered across steps and calls of ``estimate``
_MEMORY = 8192


class KernelRefusal(Exception):  # a mixin: the classes raised end in Error
    """A real kernel refuses the dtypes of a call a fake kernel let through.

    Raised as a subclass that is also the builtin exception torch raised
    (:func:`refusal_of`). Attributes: ``op`` (``"aten.addmm"``), ``inputs``
    (the call's tensors, ``"float32[4], int64[8, 16], float32[16, 4]"``),
    ``reason`` (torch's message, first line) and ``dtypes`` (the distinct
    dtypes of the call's tensors).
    """

    op: str = ""
    inputs: str = ""
    reason: str = ""
    dtypes: tuple[torch.dtype, ...] = ()


_KINDS: tuple[type[Exception], ...] = (
    IndexError,
    NotImplementedError,
    TypeError,
    ValueError,
    RuntimeError,
)
_REFUSALS: dict[type[Exception], type[KernelRefusal]] = {
    kind: type(f"Refused{kind.__name__}", (KernelRefusal, kind), {}) for kind in _KINDS
}


class FakeKernelStricter(RuntimeError):
    """torch's shape-only (meta/fake) kernel refuses a call the real kernel accepts.

    Raised in place of the fake kernel's ``RuntimeError`` (the kind it was),
    with the original as ``__cause__``. Attributes: ``op``
    (``"aten._grouped_mm"``), ``inputs`` (the call's tensors) and
    ``reason`` (the fake kernel's message, first line).
    """

    op: str = ""
    inputs: str = ""
    reason: str = ""


#: most elements the real kernel may get when a fake kernel's refusal is checked
#: at the call's true shapes (only on that error path, once per distinct call)
SECOND_OPINION_CAP = 1 << 22


def refusal_of(kind: type[BaseException]) -> type[KernelRefusal]:
    """Return the :class:`KernelRefusal` class that is also ``kind`` (or ``RuntimeError``)."""
    for base in _KINDS:
        if issubclass(kind, base):
            return _REFUSALS[base]
    return _REFUSALS[RuntimeError]


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


# A verdict: None (the real kernel accepts the call, or the check cannot tell),
# or the kind of exception and torch's message.
Verdict = tuple[type[BaseException], str] | None

_VERDICTS: dict[tuple[Any, ...], Verdict] = {}


def _key(func: Any, leaves: Sequence[Any]) -> tuple[Any, ...]:
    parts: list[Any] = [func]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((leaf.dtype, tuple(leaf.shape), leaf.layout))
        else:
            parts.append((type(leaf).__name__, repr(leaf)))
    return tuple(parts)


def _exact(shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]] | None:
    return shapes if sum(math.prod(s) for s in shapes) <= CAP else None


def _at_most_two(shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    # keeps broadcasting, equal sizes and size order: what most shape checks compare
    return [tuple(min(d, 2) for d in s) for s in shapes]


def _trailing(shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    # keeps the last dimensions whole (normalized_shape of a norm, a hidden size)
    out = []
    for s in shapes:
        kept: list[int] = []
        for d in reversed(s):
            kept.insert(0, d if math.prod(kept) * d <= CAP else min(d, 1))
        out.append(tuple(kept))
    return out


def _renamed(shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Rename every distinct size above 1 to 16, 32, 48... in size order.

    Sizes that are equal stay equal, smaller ones stay smaller, 0 and 1 stay
    as they are (broadcasting, empty tensors), and rows stay 16-element
    aligned, which some kernels check.
    """
    sizes = sorted({d for s in shapes for d in s if d > 1})
    new = {d: 16 * (i + 1) for i, d in enumerate(sizes)}
    return [tuple(new.get(d, d) for d in s) for s in shapes]


_SHRINKS: tuple[Callable[[list[tuple[int, ...]]], list[tuple[int, ...]] | None], ...] = (
    _exact,
    _at_most_two,
    _trailing,
)


def _call(
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    shapes: list[tuple[int, ...]],
    device: torch.device,
) -> Any:
    """Run ``func`` with every tensor replaced by zeros of the given shape on ``device``."""
    it = iter(shapes)

    def dummy(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return torch.zeros(next(it), dtype=leaf.dtype, device=device)
        if isinstance(leaf, torch.device):
            return device
        return leaf

    new_args, new_kwargs = tree_map(dummy, (args, kwargs))
    return func(*new_args, **new_kwargs)


#: operators whose meta kernel checks every shape relation the real kernel relies on:
#: the core ATen set (the shape functions ``torch.export`` relies on) and pointwise ops
_SHRINKABLE = (torch.Tag.core, torch.Tag.pointwise)


def _shrinkable(func: Any, leaves: Sequence[Any]) -> bool:
    """Whether ``func`` may run on shrunk tensors with its other arguments unchanged.

    An integer argument may state a size (a hidden size, a layer count, a
    batch size list) that a real kernel trusts without checking it against
    the tensors; on shrunk tensors it would read past them. Only a call
    without integers, or an operator whose meta kernel checks what the real
    one relies on, is shrunk.
    """
    if any(tag in _SHRINKABLE for tag in getattr(func, "tags", ())):
        return True
    return not any(isinstance(leaf, int) and not isinstance(leaf, bool) for leaf in leaves)


def _judge(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], tensors: list[torch.Tensor], cpu: bool
) -> Verdict:
    """Ask the real CPU kernel about the call, on the first shrinking the meta kernel accepts."""
    shapes = [tuple(int(d) for d in t.shape) for t in tensors]
    tried: list[list[tuple[int, ...]]] = []
    shrinks = _SHRINKS if _shrinkable(func, tree_leaves((args, kwargs))) else (_exact,)
    for shrink in shrinks:
        small = shrink(shapes)
        if small is None or small in tried:
            continue
        tried.append(small)
        try:
            out = _call(func, args, kwargs, small, torch.device("meta"))
        except Exception:  # the shrinking broke a shape relation: try the next one
            continue
        made = sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        if made > 16 * CAP:  # a size argument, not an input, makes the output large
            return None
        try:
            _call(func, args, kwargs, small, torch.device("cpu"))
        except Exception as e:
            if is_dtype_refusal(e, cpu_only_gaps=cpu):
                return type(e), (str(e).strip().splitlines() or [""])[0]
            return None  # a value- or backend-dependent refusal: not the dtypes
        return None
    return None


class RealKernels:
    """Check each ``aten`` call of a simulated step against the real kernel's dtype rules.

    Args:
        device: the simulated device. On a CPU the real kernels asked are the
            ones that would run; on an accelerator, gaps of CPU kernels for
            reduced-precision dtypes ("not implemented for 'Half'") are not
            held against the model.

    Example::

        >>> import torch
        >>> check = RealKernels(torch.device("cpu"))
        >>> x, w = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(4, 3)
        >>> check.observe(torch.ops.aten.mm.default, (x, w.t()), {})
        Traceback (most recent call last):
        ...
        lightning_meta._estimate._kernels.RefusedRuntimeError: aten.mm: expected m1 and m2 ...
    """

    def __init__(self, device: torch.device) -> None:
        self._cpu = device.type == "cpu"

    def second_opinion(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], error: BaseException
    ) -> None:
        """Raise :class:`FakeKernelStricter` if the real kernel accepts a call its fake one refused.

        Only on a CPU (the real kernels asked are the ones that would run),
        only for a plain ``RuntimeError`` (a shape or dtype check of a meta
        registration; data-dependent and missing-kernel errors are subclasses),
        and only where the real kernel can be asked without changing a shape
        relation: at the call's true shapes, or with every distinct size
        renamed to a small multiple of 16 (equal sizes stay equal, order and
        alignment are kept) for calls without integer arguments. Otherwise
        nothing is raised and the caller re-raises ``error``.
        """
        if not self._cpu or type(error) is not RuntimeError:
            return
        if getattr(func, "namespace", None) != "aten":
            return
        leaves = tree_leaves((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if not tensors or any(t.layout != torch.strided for t in tensors):
            return
        shapes = [tuple(int(d) for d in t.shape) for t in tensors]
        tries = []
        if sum(math.prod(s) for s in shapes) <= SECOND_OPINION_CAP:
            tries.append(shapes)
        if not any(isinstance(leaf, int) and not isinstance(leaf, bool) for leaf in leaves):
            tries.append(_renamed(shapes))
        for small in tries:
            try:
                with (
                    no_dispatch_modes(),
                    torch.random.fork_rng(devices=[]),
                    warnings.catch_warnings(),
                    torch.no_grad(),
                    torch.autocast("cpu", enabled=False),
                ):
                    warnings.simplefilter("ignore")
                    _call(func, args, kwargs, small, torch.device("cpu"))
            except Exception:  # the real kernel refuses too (or cannot tell): the fake is right
                return
            name = str(getattr(func, "overloadpacket", func))
            reason = (str(error).strip().splitlines() or [""])[0]
            stricter = FakeKernelStricter(f"{name}: {reason}")
            stricter.op = name
            stricter.inputs = ", ".join(_describe(t) for t in tensors)
            stricter.reason = reason
            raise stricter from error

    def observe(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise a :class:`KernelRefusal` if the real kernel refuses ``func(*args, **kwargs)``."""
        if getattr(func, "namespace", None) != "aten" or getattr(func, "is_view", False):
            return
        leaves = tree_leaves((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if not tensors or any(t.layout != torch.strided for t in tensors):
            return
        key = (self._cpu, *_key(func, leaves))
        if key in _VERDICTS:
            verdict = _VERDICTS[key]
        else:
            with no_dispatch_modes(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.no_grad(), torch.autocast("cpu", enabled=False):
                    verdict = _judge(func, args, kwargs, tensors, self._cpu)
            if len(_VERDICTS) >= _MEMORY:
                _VERDICTS.clear()
            _VERDICTS[key] = verdict
        if verdict is None:
            return
        kind, reason = verdict
        name = str(getattr(func, "overloadpacket", func))
        error = refusal_of(kind)(f"{name}: {reason}")
        error.op = name
        error.inputs = ", ".join(_describe(t) for t in tensors)
        error.reason = reason
        error.dtypes = tuple(dict.fromkeys(t.dtype for t in tensors))
        raise error
