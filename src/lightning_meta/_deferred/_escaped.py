"""Fake tensors that escaped a ``deferred_init`` block: refused on first use, findable.

When a block ends, every tensor it made that modules built in it hold
(parameters, buffers, attributes, items of list, tuple and dict attributes)
becomes a deferred meta tensor. A fake tensor kept anywhere else (a closure,
a global list, a module built outside the block) cannot be materialized:
left alone, ``real + fake`` would quietly compute a fake tensor. So the
block's fake mode is *closed*: any op on one of its tensors raises
:class:`~lightning_meta.MetaTensorError` naming where the tensor was created,
and :func:`escaped_site` lets ``find_meta_tensors`` report such tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lightning_meta._compat import ClosedFakeMode, FakeTensor, FakeTensorMode
from lightning_meta._errors import MetaTensorError

__all__ = ["block_failure", "close_fake_mode", "escaped_alias", "escaped_site"]


def _refusal(call: str, site: str, failed: str | None, path: str | None = None) -> MetaTensorError:
    if failed is not None:
        return MetaTensorError(
            f"{call} was called on a tensor created inside a deferred_init block at {site}, "
            f"after the block ended: the block raised ({failed}), so nothing built in it was "
            "made deferred and materialize cannot give it values: it holds none. Fix: fix "
            "what the block raised and build the model again."
        )
    if path is not None:
        return MetaTensorError(
            f"{call} was called on a tensor created inside a deferred_init block at {site}, "
            f"after the block ended: it is {path!r} as the block made it, held by reference "
            "from outside the modules (a functools.partial, a closure, a lambda's default, "
            "an object such as a torch.distributions one) since inside the block. When the "
            f"block ended, the module's {path!r} became a deferred tensor, which materialize "
            "makes real; this reference still holds the block's placeholder, which has no "
            "values. Fix: read the tensor through the module when it is used (self.head.weight "
            "inside the call, not a reference taken in __init__), or build the object that "
            "holds it after materialize."
        )
    return MetaTensorError(
        f"{call} was called on a tensor created inside a deferred_init block at {site}, "
        "after the block ended. It is not a parameter, buffer or attribute (or an item of "
        "a list, tuple or dict attribute) of a module built in the block, so materialize "
        "cannot give it values: it holds none. Fix: register it on the module "
        "(self.register_buffer(name, t, persistent=False), or a plain attribute), or "
        "create it after materialize. An object holding tensors computed from the module's "
        "(a torch.distributions object keeps broadcast views of its arguments, a "
        "functools.partial or a closure keeps what it was given) cannot be followed: build "
        "it after materialize."
    )


class _ClosedFakeMode(ClosedFakeMode):
    """The fake mode of a finished block: every op on its tensors raises."""

    escaped: WeakIdKeyDictionary
    # The path of the module's tensor each escaped one is, where it was one (a reference
    # to ``self.head.weight`` taken inside the block).
    aliases: WeakIdKeyDictionary
    # What the block raised (``"ValueError: boom"``), or None: it ended normally.
    failed: str | None

    def refusal(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception:
        site, path = "<unknown>", None
        for x in (*args, *kwargs.values()):
            if isinstance(x, FakeTensor):
                site, path = self.escaped.get(x, site), escaped_alias(x)
                break
        return _refusal(str(func), site, self.failed, path)


# Tensor methods that return the tensor itself, or read its memory, without an
# ATen call the closed mode would see: ``t.to("cpu")`` on a tensor already
# there, ``t.float()`` on a float tensor, ``.numpy()``, pickling.
_SILENT = (
    "to",
    "cpu",
    "cuda",
    "type",
    "type_as",
    "float",
    "double",
    "half",
    "bfloat16",
    "int",
    "long",
    "short",
    "char",
    "byte",
    "bool",
    "contiguous",
    "numpy",
    "tolist",
    "data_ptr",
    "untyped_storage",
    "storage",
    "__array__",
    "__dlpack__",
    "__reduce_ex__",
    "__deepcopy__",
)


def _refused(name: str) -> Any:
    def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        mode = getattr(self, "fake_mode", None)
        escaped = getattr(mode, "escaped", None)
        site = escaped.get(self, "<unknown>") if escaped is not None else "<unknown>"
        raise _refusal(f"Tensor.{name}", site, getattr(mode, "failed", None), escaped_alias(self))

    method.__name__ = name
    return method


class _EscapedTensor(FakeTensor):
    """The class of a finished block's fake tensors: their first use of any kind raises."""


for _name in _SILENT:
    setattr(_EscapedTensor, _name, _refused(_name))


def close_fake_mode(
    mode: FakeTensorMode,
    leftovers: Iterable[tuple[torch.Tensor, str, str | None]],
    failed: str | None = None,
) -> None:
    """Make every later op on a fake tensor of ``mode`` raise; remember where ``leftovers`` were
    made (and the path of the module's tensor each was, if one), and what the block raised
    (``failed``: ``"ValueError: boom"``; ``None`` if nothing)."""
    escaped, aliases = WeakIdKeyDictionary(), WeakIdKeyDictionary()
    for t, site, path in leftovers:
        escaped[t] = site
        if path is not None:
            aliases[t] = path
        if type(t) is FakeTensor:
            t.__class__ = _EscapedTensor
    mode.__class__ = _ClosedFakeMode
    mode.escaped = escaped  # type: ignore[attr-defined]
    mode.aliases = aliases  # type: ignore[attr-defined]
    mode.failed = failed  # type: ignore[attr-defined]


def block_failure(t: object) -> str | None:
    """What the ``deferred_init`` block that made ``t`` raised (``"ValueError: boom"``), if
    ``t`` is a fake tensor of a block that ended so; ``None`` otherwise."""
    mode = getattr(t, "fake_mode", None) if isinstance(t, FakeTensor) else None
    return getattr(mode, "failed", None) if isinstance(mode, _ClosedFakeMode) else None


def escaped_site(t: object) -> str | None:
    """Return where ``t`` was created if it is a fake tensor of a finished ``deferred_init`` block.

    For ``find_meta_tensors`` and MetaGuard: such a tensor holds no data and
    cannot be materialized; any op on it raises ``MetaTensorError``.
    """
    if not isinstance(t, FakeTensor):
        return None
    mode = getattr(t, "fake_mode", None)
    if not isinstance(mode, _ClosedFakeMode):
        return None
    site: str = mode.escaped.get(t, "<unknown>")
    return site


def escaped_alias(t: object) -> str | None:
    """Return the path of the module's tensor that ``t`` was when its block ended, if ``t``
    is a fake tensor of a finished block referenced from outside the modules since inside
    it (``functools.partial(F.linear, weight=self.head.weight)`` in ``__init__``)."""
    mode = getattr(t, "fake_mode", None) if isinstance(t, FakeTensor) else None
    if not isinstance(mode, _ClosedFakeMode):
        return None
    path: str | None = mode.aliases.get(t)
    return path
