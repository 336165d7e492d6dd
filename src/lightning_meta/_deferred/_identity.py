"""Keep the identity of a deferred tensor as it becomes real, or make the stale object refuse.

In eager construction ``w = model.lin.weight`` (a local, a closure, an
optimizer built before ``fabric.setup``) *is* the parameter: ``module.to()``
keeps a parameter's object (``param.data = ...``), so every reference sees
the values and the updates. ``materialize`` gives the deferred meta tensor
object the real contents (:func:`take_over`, ``torch.utils.swap_tensors``),
so such references are the real tensors, as eagerly.

Where that cannot be the eager object (a buffer or attribute moved or cast,
which eager's ``module.to()`` replaces, so a reference taken before holds the
old values there), or cannot be done (something holds the meta tensor's
C++ tensor: a view of it, an autograd graph, a weak reference), the module
gets a new tensor and the old meta object is made *stale* (:func:`mark_stale`):
its first use of any kind raises :class:`~lightning_meta.MetaTensorError`
naming the dotted path, where a meta tensor would otherwise answer CPU ops with
uninitialised memory (``torch.ones(1, 4) @ w.T``) or take optimizer steps
that train nothing. Reading its metadata (shape, dtype, device) still works.
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

import torch

from lightning_meta import _compat
from lightning_meta._errors import MetaTensorError
from lightning_meta._watched import tensor_class

__all__ = [
    "carry_grad_hooks",
    "keeps_identity",
    "mark_stale",
    "stale_reason",
    "take_over",
    "take_over_memory",
]


def take_over(old: torch.Tensor, new: torch.Tensor) -> bool:
    """Give ``old`` the contents, class and attributes of ``new``; whether it could.

    ``new`` (a tensor nothing else holds) gets ``old``'s. Nothing changes when
    it cannot: ``torch.utils.swap_tensors`` checks before it swaps.
    """
    if weakref.getweakrefs(old) or weakref.getweakrefs(new):
        return False  # swap_tensors refuses them; checked here to skip its exception
    hooks = _compat.grad_hook_tables(old)
    try:
        torch.utils.swap_tensors(old, new)
    except RuntimeError:
        return False  # another holder of the C++ tensor (a view, autograd)
    # Hooks registered on the deferred parameter (in the block or before
    # materialize) run on it in eager code; their C++ side left with the meta data.
    _compat.install_grad_hooks(old, hooks)
    return True


def carry_grad_hooks(old: torch.Tensor, new: torch.Tensor) -> None:
    """Give ``new``, which replaces ``old`` in the module, ``old``'s gradient hooks."""
    if new.requires_grad and new.grad_fn is None:
        _compat.install_grad_hooks(new, _compat.grad_hook_tables(old))


def take_over_memory(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor | None:
    """:func:`take_over` from ``new``, else from an alias of its memory; the tensor that got
    ``old``'s meta contents in exchange (``None`` when neither could swap).

    A plain tensor without autograd history that views of it hold (buffers
    viewing one another) cannot be swapped itself, a new object for its
    memory can.
    """
    if take_over(old, new):
        return new
    if type(new) is not torch.Tensor or new.grad_fn is not None or new.requires_grad:
        return None  # no alias: it would fail as ``new`` did
    alias = new.detach()
    vars(alias).update(vars(new))
    return alias if take_over(old, alias) else None


def keeps_identity(kind: str, new: torch.Tensor, recorded: torch.dtype, built_on: bool) -> bool:
    """Whether eager's object for a tensor of ``kind`` is the one the module holds as ``new``.

    ``module.to()`` keeps every parameter's object; it replaces a buffer
    it moves or casts (the old object keeps the old values), and leaves plain
    attributes alone. ``built_on``: ``new`` is on the device eager
    construction built it on.
    """
    return kind == "param" or (built_on and new.dtype == recorded)


# What a stale tensor still answers: metadata, never values.
_METADATA = frozenset(
    {
        torch.Tensor.__hash__,
        torch.Tensor.__repr__,
        torch.Tensor.__format__,
        torch.Tensor.dim,
        torch.Tensor.size,
        torch.Tensor.stride,
        torch.Tensor.numel,
        torch.Tensor.element_size,
        torch.Tensor.storage_offset,
        torch.Tensor.is_floating_point,
        *(
            getattr(torch.Tensor, name).__get__
            for name in (
                "is_meta",
                "is_cuda",
                "is_sparse",
                "is_leaf",
                "device",
                "dtype",
                "shape",
                "ndim",
                "layout",
                "requires_grad",
            )
        ),
    }
)

# ``__dict__`` key of a stale tensor: its dotted path, why it was not made real, and by what.
_STALE_ATTR = "_lightning_meta_stale"


class _Stale:
    """Mixed into the class of a stale tensor: every use but reading metadata raises."""

    _stale_base: ClassVar[type]

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _METADATA:
            return torch.Tensor.__torch_function__.__func__(  # type: ignore[attr-defined]
                cls, func, types, args, kwargs
            )
        stale = next((a for a in (*args, *(kwargs or {}).values()) if isinstance(a, _Stale)), None)
        path, why, by, *fix = (
            vars(stale).get(_STALE_ATTR, ("<unknown>", "", "materialize"))
            if stale is not None
            else ("", "", "materialize")
        )
        how = (
            fix[0]
            if fix
            else f"read {path!r} from the module after {by} (and build optimizers from "
            "model.parameters() after it)"
        )
        use = _use(func)
        raise MetaTensorError(
            f"{use[:1].upper()}{use[1:]} the meta tensor that stood for {path!r} before {by}, through a "
            "reference taken before it (a local, a closure, an optimizer built on the "
            f"deferred model): {why}, so this object holds no values. Fix: {how}.",
            paths=[path],
        )


_ACCESS = {"__get__": "reading", "__set__": "setting", "__delete__": "deleting"}


def _use(func: Any) -> str:
    """What using ``func`` does, in the words a user knows: ``reading .grad of``, ``calling torch.mm on``.

    ``__torch_function__`` gets descriptor slots for attributes and pybind11
    function records for ``torch.ops``, whose own names mean nothing to users.
    """
    name = getattr(func, "__name__", None)
    attr = getattr(getattr(func, "__self__", None), "__name__", None)
    if name in _ACCESS and isinstance(attr, str):
        return f"{_ACCESS[name]} .{attr} of"  # a getset descriptor: .grad, .data
    module = getattr(func, "__module__", None) or ""
    if module.startswith("torch._ops.") and isinstance(name, str):  # torch.ops.aten.mm(.default)
        return f"calling torch.ops.{module[len('torch._ops.') :]}.{name} on"
    qualname = getattr(func, "__qualname__", None) or name or str(func)
    if not isinstance(qualname, str):
        return f"calling {func!r} on"
    head, _, tail = qualname.rpartition(".")
    if head in ("TensorBase", "_TensorBase"):
        return f"calling Tensor.{tail} on"
    if head == "_VariableFunctionsClass":
        return f"calling torch.{tail} on"
    if module.startswith("torch") and "." not in qualname:
        return f"calling {module}.{qualname} on"
    return f"calling {qualname} on"


_STALE_CLASSES: dict[type, type] = {}


def mark_stale(
    old: torch.Tensor, path: str, why: str, by: str = "materialize", fix: str | None = None
) -> None:
    """Make every later use of the meta tensor ``old`` (but reading metadata) raise, naming ``path``.

    ``by``: what made ``path`` real without ``old`` (``"materialize"``, ``"load_checkpoint"``).
    ``fix``: what to do instead (default: read ``path`` from the module after ``by``).
    """
    cls = tensor_class(old)
    if issubclass(cls, _Stale):
        return
    stale = _STALE_CLASSES.get(cls)
    if stale is None:
        stale = type(
            cls.__name__, (_Stale, cls), {"_stale_base": cls, "__module__": cls.__module__}
        )
        _STALE_CLASSES[cls] = stale
    old.__class__ = stale
    vars(old)[_STALE_ATTR] = (path, why, by) if fix is None else (path, why, by, fix)


def stale_reason(tensor: torch.Tensor) -> tuple[str, str, str] | None:
    """``(path, why, by)`` of a tensor :func:`mark_stale` marked; ``None`` for any other."""
    if not isinstance(tensor, _Stale):
        return None
    path, why, by, *_ = vars(tensor).get(_STALE_ATTR, ("<unknown>", "", "materialize"))
    return path, why, by
