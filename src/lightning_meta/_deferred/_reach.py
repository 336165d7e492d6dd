"""What materialize and loading reach beyond the module tree.

Eager construction gives a module kept in a plain container (``self.teacher =
[net]``, out of Lightning's sight on purpose) real tensors, and a reference
taken after the block (``self.shared = [self.proj.weight]``) is the very
tensor the tree holds. Walking ``named_modules()`` alone left both on meta,
where a CPU matmul with a meta weight returns uninitialised memory without an
error. :func:`reach` finds such modules and references; :func:`settle_references`
gives each reference the real tensor its deferred tensor became.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_meta._deferred._handles import made_for, rebuilt

__all__ = [
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MODULE_TABLES",
    "Reach",
    "held_modules",
    "reach",
    "settle_references",
]

# As deep as deferred_init converts containers (``_block`` uses it too).
MAX_DEPTH = 4
# Containers longer than this (a vocabulary, a table of data) are not walked:
# a module or a tensor reference is not kept among thousands of items, and the
# walk runs on every materialize and load.
MAX_ITEMS = 1_000
# nn.Module's own tables (parameters, buffers, hooks), walked elsewhere or holding no tensor.
MODULE_TABLES = frozenset(vars(nn.Module()))


_CONTAINERS = (list, tuple, dict)
# What an attribute must be to hold a module or a tensor (the rest is skipped
# at once: a walk of every module's attributes runs on every materialize).
_HOLDERS = (nn.Module, torch.Tensor, *_CONTAINERS)
_TENSORS_OR_CONTAINERS = (torch.Tensor, *_CONTAINERS)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _attributes(module: nn.Module) -> list[tuple[str, Any]]:
    """``module``'s plain attributes that are modules, tensors or containers (not its
    tables, not this package's own)."""
    # By class: isinstance asks an object without the class for __class__,
    # through its own __getattribute__ (transformers' configs: slow).
    return [
        (name, value)
        for name, value in vars(module).items()
        if name not in MODULE_TABLES
        and issubclass(type(value), _HOLDERS)
        and not name.startswith("_lightning_meta")
    ]


def _items(value: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(value, dict):
        yield from value.items()
    elif isinstance(value, (list, tuple)):
        yield from enumerate(value)


def _walkable(value: Any, depth: int, seen: set[int]) -> bool:
    """Whether to look inside ``value``: a list, tuple or dict not seen yet in this walk (they
    can refer to one another), a few levels down, of at most ``MAX_ITEMS`` items."""
    if depth >= MAX_DEPTH or not issubclass(type(value), _CONTAINERS) or id(value) in seen:
        return False
    seen.add(id(value))
    return len(value) <= MAX_ITEMS


def held_modules(value: Any, path: str) -> list[tuple[str, nn.Module]]:
    """The modules ``value`` is or holds in lists, tuples and dicts a few levels down, with paths."""
    found: list[tuple[str, nn.Module]] = []
    _walk(value, path, 0, found, set())
    return found


@dataclass
class Reach:
    """What ``module``'s tree holds outside it (see :func:`reach`).

    Attributes:
        hidden: the modules held in plain attributes or containers of the
            tree, and of those, that are not in the tree, with their paths;
            each listed once, under its first path, without its own
            submodules (materializing it covers them).
        holders: ``(module, attribute)`` of every plain attribute holding a
            meta tensor, itself or in a container, in the tree and in
            ``hidden``'s modules.
    """

    hidden: list[tuple[str, nn.Module]] = field(default_factory=list)
    holders: list[tuple[nn.Module, str]] = field(default_factory=list)


def reach(module: nn.Module) -> Reach:
    """Walk the plain attributes of every module of ``module``'s tree, and of the modules
    found there (lists, tuples and dicts a few levels down, each container once), once.

    A module found there whose tree holds ``module`` (a back-reference to a
    parent, ``self._owner = [model]``) is not outside: materializing a
    submodule alone does not reach its parent.
    """
    todo = list(module.named_modules())
    seen = {id(m) for _, m in todo}
    containers: set[int] = set()
    out = Reach()
    while todo:
        prefix, mod = todo.pop()
        for name, value in _attributes(mod):
            found: list[tuple[str, nn.Module]] = []
            if _walk(value, _join(prefix, name), 0, found, containers):
                out.holders.append((mod, name))
            for path, held in found:
                if id(held) in seen:
                    continue
                inside = list(held.named_modules())
                seen.update(id(m) for _, m in inside)
                if any(m is module for _, m in inside):
                    continue
                out.hidden.append((path, held))
                todo += [(_join(path, p), m) for p, m in inside]
    return out


def _walk(
    value: Any, path: str, depth: int, found: list[tuple[str, nn.Module]], seen: set[int]
) -> bool:
    """Note the modules ``value`` is or holds in ``found``; return whether it holds a meta tensor."""
    kind = type(value)
    if issubclass(kind, torch.Tensor):
        return bool(value.is_meta)
    if issubclass(kind, nn.Module):
        found.append((path, value))
        return False
    if not _walkable(value, depth, seen):
        return False
    meta = False
    for key, item in _items(value):
        if issubclass(type(item), _HOLDERS):
            meta = _walk(item, _join(path, str(key)), depth + 1, found, seen) or meta
    return meta


def settle_references(holders: list[tuple[nn.Module, str]]) -> None:
    """Give every meta tensor held in the attributes ``holders`` name (:attr:`Reach.holders`)
    the real tensor it became at another place.

    ``model.shared = [model.proj.weight]`` taken after the block holds the
    deferred parameter, which materialize or a load then replaced in
    ``proj``; eager construction's list holds that very parameter.
    """
    seen: set[int] = set()
    for mod, name in holders:
        value = mod.__dict__.get(name)
        new = _settled(value, 0, seen)
        if new is not value:
            mod.__dict__[name] = new


def _settled(value: Any, depth: int, seen: set[int]) -> Any:
    """``value`` with its meta tensors made real where they were (lists and dicts in place)."""
    if issubclass(type(value), torch.Tensor):
        real = made_for(value) if value.is_meta else None
        return value if real is None else real
    if not _walkable(value, depth, seen):
        return value
    changes = {}
    for key, item in _items(value):
        if not issubclass(type(item), _TENSORS_OR_CONTAINERS):
            continue
        new = _settled(item, depth + 1, seen)
        if new is not item:
            changes[key] = new
    if not changes:
        return value
    if isinstance(value, tuple):
        return rebuilt(value, [changes.get(i, item) for i, item in enumerate(value)])
    for key, new in changes.items():
        value[key] = new
    return value
