"""What materialize and loading reach beyond the module tree.

Eager construction gives a module kept in a plain container (``self.teacher =
[net]``, out of Lightning's sight on purpose) real tensors, and a reference
taken after the block (``self.shared = [self.proj.weight]``) is the very
tensor the tree holds. Walking ``named_modules()`` alone left both on meta,
where a CPU matmul with a meta weight returns uninitialised memory without an
error. :func:`outside_tree` finds such modules; :func:`settle_references`
gives each reference the real tensor its deferred tensor became.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_meta._deferred._handles import made_for

__all__ = ["held_modules", "outside_tree", "settle_beyond", "settle_references"]

# As deep as deferred_init converts containers (see _block._MAX_DEPTH).
_MAX_DEPTH = 4
# nn.Module's own tables (parameters, buffers, hooks), walked elsewhere or holding no tensor.
_MODULE_TABLES = frozenset(vars(nn.Module()))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _attributes(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """``module``'s plain attributes, without its tables and this package's own."""
    for name, value in vars(module).items():
        if name not in _MODULE_TABLES and not name.startswith("_lightning_meta"):
            yield name, value


def _items(value: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(value, dict):
        yield from value.items()
    elif isinstance(value, (list, tuple)):
        yield from enumerate(value)


def held_modules(value: Any, path: str, depth: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """The modules ``value`` is or holds in lists, tuples and dicts a few levels down, with paths."""
    if isinstance(value, nn.Module):
        yield path, value
    elif depth < _MAX_DEPTH:
        for key, item in _items(value):
            yield from held_modules(item, _join(path, str(key)), depth + 1)


def outside_tree(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return the modules held in plain attributes or containers (lists, tuples, dicts a few
    levels down) of ``module``'s tree, and of those, that are not in the tree, with their paths.

    Each module is listed once, under its first path; its own submodules are
    not listed (materializing it covers them).
    """
    seen = {id(m) for m in module.modules()}
    found: list[tuple[str, nn.Module]] = []
    todo = list(module.named_modules())
    while todo:
        prefix, mod = todo.pop()
        for name, value in _attributes(mod):
            for path, held in held_modules(value, _join(prefix, name)):
                if id(held) in seen:
                    continue
                seen.update(id(m) for m in held.modules())
                found.append((path, held))
                todo += [(_join(path, p), m) for p, m in held.named_modules()]
    return found


def settle_references(modules: list[nn.Module]) -> None:
    """Give every meta tensor held in a plain attribute or container of ``modules`` (each
    module alone, not its children) the real tensor it became at another place.

    ``model.shared = [model.proj.weight]`` taken after the block holds the
    deferred parameter, which materialize or a load then replaced in
    ``proj``; eager construction's list holds that very parameter.
    """
    for mod in modules:
        for name, value in list(_attributes(mod)):
            new = _settled(value, 0)
            if new is not value:
                mod.__dict__[name] = new


def _settled(value: Any, depth: int) -> Any:
    """``value`` with its meta tensors made real where they were (lists and dicts in place)."""
    if isinstance(value, torch.Tensor):
        real = made_for(value) if value.is_meta else None
        return value if real is None else real
    if depth >= _MAX_DEPTH or not isinstance(value, (list, tuple, dict)):
        return value
    changes = {}
    for key, item in _items(value):
        new = _settled(item, depth + 1)
        if new is not item:
            changes[key] = new
    if not changes:
        return value
    if isinstance(value, tuple):
        items = [changes.get(i, item) for i, item in enumerate(value)]
        make = getattr(type(value), "_make", None)
        return make(items) if make is not None else type(value)(items)
    for key, new in changes.items():
        value[key] = new
    return value


def settle_beyond(module: nn.Module) -> None:
    """:func:`settle_references` for every module of ``module``'s tree and outside it."""
    hidden = [m for _, held in outside_tree(module) for m in held.modules()]
    settle_references([*module.modules(), *hidden])
