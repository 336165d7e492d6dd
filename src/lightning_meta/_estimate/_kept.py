"""Keep the module given to ``estimate`` exactly as it was across a simulated step.

The step swaps fake tensors in for the registered parameters and buffers and
swaps them back, but a forward also writes to its module itself: a cache
built on first use (transformers' rotary embeddings keep ``_cos_cached`` and
the sequence length it was made for), a buffer it sets or registers, the
last hidden state kept as an attribute, a step counter. Under the step these
are fake tensors and simulated counts; left on a real module, its next real
forward computes with them. Every submodule's attributes and tables are
therefore put back as they were, also when the step raises.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

from torch import nn

from lightning_meta._compat import FakeTensor
from lightning_meta._errors import MetaTensorError

__all__ = ["built_by_estimate", "module_kept"]

# modules a factory built for estimate itself: no one else holds them, so what a
# step leaves in them (fakes in nested containers) is no one's concern
_BUILT: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def built_by_estimate(module: nn.Module) -> nn.Module:
    """Mark ``module`` as built by estimate from a factory, and return it."""
    _BUILT.add(module)
    return module


# containers whose contents are put back in place: the module's own tables
# (``_parameters``, ``_buffers``, ``_modules``, the non-persistent buffer set)
# and lists, dicts and sets a forward appends to
_CONTAINERS = (dict, list, set)


def _copy(value: Any) -> Any:
    return (
        dict(value)
        if isinstance(value, dict)
        else list(value)
        if isinstance(value, list)
        else set(value)
    )


def _changed(value: Any, saved: Any) -> bool:
    if isinstance(value, dict):
        return len(value) != len(saved) or any(
            k1 != k2 or v1 is not v2
            for (k1, v1), (k2, v2) in zip(value.items(), saved.items(), strict=True)
        )
    if isinstance(value, list):
        return len(value) != len(saved) or any(
            a is not b for a, b in zip(value, saved, strict=True)
        )
    return bool(value != saved)


def _put_back(value: Any, saved: Any) -> None:
    if isinstance(value, dict):
        value.clear()
        value.update(saved)
    elif isinstance(value, list):
        value[:] = saved
    else:
        value.clear()
        value.update(saved)


def _fakes_in(value: Any, seen: set[int]) -> bool:
    """Whether a fake tensor is in ``value`` or in the lists, tuples, dicts and sets it holds."""
    if isinstance(value, FakeTensor):
        return True
    if id(value) in seen or not isinstance(value, (*_CONTAINERS, tuple)):
        return False
    seen.add(id(value))
    items = value.values() if isinstance(value, dict) else value
    return any(_fakes_in(v, seen) for v in items)


def _fake_paths(module: nn.Module, saved: list[Any]) -> list[str]:
    """The dotted attributes of ``module`` that hold a fake tensor, at any depth of containers."""
    names = {id(m): n for n, m in module.named_modules()}
    return [
        f"{names[id(m)]}.{k}" if names.get(id(m)) else k
        for m, attrs, _ in saved
        for k, v in attrs.items()
        if _fakes_in(v, set())
    ]


@contextlib.contextmanager
def module_kept(module: nn.Module) -> Iterator[None]:
    """Put every attribute of every submodule of ``module`` back as it was after the block.

    Attributes are put back by identity (a new cache, a counter), the
    contents of the lists, dicts and sets they held in place (the module's
    parameter, buffer and child tables among them). A fake tensor left deeper,
    in a container inside a container, cannot be put back this way.

    Raises:
        MetaTensorError: if, after a block that did not raise, a fake tensor
            is still held by a submodule's attribute (unless estimate built the
            module itself: :func:`built_by_estimate`).
    """
    saved = []
    for m in module.modules():
        attrs = dict(m.__dict__)
        contents = {k: _copy(v) for k, v in attrs.items() if isinstance(v, _CONTAINERS)}
        saved.append((m, attrs, contents))
    before = _fake_paths(module, saved) if module not in _BUILT else []
    try:
        yield
    finally:
        for m, attrs, contents in saved:
            now = m.__dict__
            for k in [k for k in now if k not in attrs]:
                del now[k]
            for k, v in attrs.items():
                if now.get(k, attrs) is not v:
                    now[k] = v
            for k, copied in contents.items():
                if _changed(attrs[k], copied):
                    _put_back(attrs[k], copied)
    if module in _BUILT:
        return
    left = [p for p in _fake_paths(module, saved) if p not in before]
    if left:
        raise MetaTensorError(
            f"estimate: the forward of {type(module).__name__} left fake tensors of the "
            f"simulated step in {', '.join(repr(p) for p in left[:3])}"
            f"{', ...' if len(left) > 3 else ''}, nested where they cannot be put back; the "
            "module's next real forward would compute with them. Fix: estimate a module "
            "built by a factory (estimate(lambda: Model(...), ...)), or keep what the "
            "forward caches in a plain attribute, list or dict of the module.",
            paths=left[:3],
        )
