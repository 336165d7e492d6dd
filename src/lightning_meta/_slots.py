"""Where a module keeps its tensors: the one accessor by name, walk and tie grouping.

Every read or write of a module's parameter, buffer or deferred tensor
attribute by name goes through here (as torch's ``NamedMemberAccessor`` does
for ``torch.func``); the module's private tables come from
:mod:`lightning_meta._compat`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_meta import _compat
from lightning_meta._watched import tensor_class

__all__ = [
    "HANDLES_ATTR",
    "Slot",
    "buffer_names",
    "children",
    "iter_slots",
    "named_tensors",
    "own_slots",
    "parameter_names",
    "slot_at",
    "tensor_at",
    "tie_groups",
    "wrap_like",
]

Kind = Literal["param", "buffer", "attr"]

# The ``__dict__`` entry of a module that maps its deferred tensors' names to
# their handles (owned by ``_deferred._handles``). Plain tensor attributes are
# slots only when listed there.
HANDLES_ATTR = "_lightning_meta_deferred"


@dataclass(frozen=True)
class Slot:
    """One place holding a tensor: ``owner._parameters[name]``, ``_buffers[name]`` or ``__dict__[name]``.

    ``tensor`` is what the slot held when it was walked; ``persistent`` is
    whether ``state_dict`` includes it.
    """

    path: str
    owner: nn.Module
    kind: Kind
    name: str
    tensor: torch.Tensor
    persistent: bool

    def current(self) -> torch.Tensor | None:
        """The tensor the slot holds now (it may have been replaced since the walk)."""
        return _get(self.owner, self.kind, self.name)

    def put(self, value: torch.Tensor) -> None:
        """Store ``value`` in the slot, bypassing ``nn.Module.__setattr__``'s checks."""
        if self.kind == "param":
            _compat.parameters_of(self.owner)[self.name] = value  # type: ignore[assignment]
        elif self.kind == "buffer":
            _compat.buffers_of(self.owner)[self.name] = value
        else:
            self.owner.__dict__[self.name] = value


def _get(module: nn.Module, kind: Kind, name: str) -> torch.Tensor | None:
    if kind == "param":
        value: Any = _compat.parameters_of(module).get(name)
    elif kind == "buffer":
        value = _compat.buffers_of(module).get(name)
    else:
        value = module.__dict__.get(name)
    return value if isinstance(value, torch.Tensor) else None


def _kind(module: nn.Module, name: str) -> Kind:
    if name in _compat.parameters_of(module):
        return "param"
    if name in _compat.buffers_of(module):
        return "buffer"
    return "attr"


def slot_at(module: nn.Module, name: str, path: str | None = None) -> Slot | None:
    """Return the slot of ``module``'s own tensor ``name`` (parameter, buffer or attribute).

    ``path`` is the dotted name to report (default ``name``); ``None`` when
    ``module`` holds no tensor under ``name``.
    """
    kind = _kind(module, name)
    tensor = _get(module, kind, name)
    if tensor is None:
        return None
    persistent = kind == "param" or (
        kind == "buffer" and name not in _compat.non_persistent_of(module)
    )
    return Slot(path or name, module, kind, name, tensor, persistent)


def tensor_at(module: nn.Module, name: str) -> torch.Tensor | None:
    """Return ``module``'s own parameter, buffer or tensor attribute ``name``, or ``None``."""
    return _get(module, _kind(module, name), name)


def parameter_names(module: nn.Module) -> list[str]:
    """Return the names of ``module``'s own parameters (not its children's), ``None`` ones too."""
    return list(_compat.parameters_of(module).keys())


def buffer_names(module: nn.Module) -> list[str]:
    """Return the names of ``module``'s own buffers (not its children's), ``None`` ones too."""
    return list(_compat.buffers_of(module).keys())


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` and its submodules by dotted name, tied
    names included (each name of a tie maps to the one tensor)."""
    return {
        name: t
        for named in (module.named_parameters, module.named_buffers)
        for name, t in named(remove_duplicate=False)
    }


def children(module: nn.Module) -> list[nn.Module]:
    """Return the direct submodules of ``module`` in registration order (``None`` entries skipped)."""
    return [c for c in _compat.children_of(module).values() if c is not None]


def iter_slots(module: nn.Module, *, remove_duplicate: bool = True) -> Iterator[Slot]:
    """Yield every parameter, buffer and deferred plain tensor attribute of ``module``.

    With ``remove_duplicate=False``, a submodule shared under several names is
    walked under each of them, as ``state_dict`` does.
    """
    for prefix, mod in module.named_modules(remove_duplicate=remove_duplicate):
        yield from own_slots(mod, prefix)


def own_slots(module: nn.Module, prefix: str = "") -> Iterator[Slot]:
    """Yield ``module``'s own parameters, buffers and deferred plain tensor attributes.

    Paths start with ``prefix`` (the module's dotted name in the tree walked).
    """
    dot = f"{prefix}." if prefix else ""
    for name, p in _compat.parameters_of(module).items():
        if p is not None:
            yield Slot(dot + name, module, "param", name, p, True)
    non_persistent = _compat.non_persistent_of(module)
    for name, b in _compat.buffers_of(module).items():
        if b is not None:
            yield Slot(dot + name, module, "buffer", name, b, name not in non_persistent)
    for name in module.__dict__.get(HANDLES_ATTR, {}):
        value = module.__dict__.get(name)
        if isinstance(value, torch.Tensor):
            yield Slot(dot + name, module, "attr", name, value, False)


def tie_groups(module: nn.Module) -> list[list[Slot]]:
    """Group every slot of ``module`` by the tensor object it holds (the one tie computation).

    Walked as ``state_dict`` walks (shared submodules under every name); a
    group of more than one slot is a set of tied tensors. Groups come in walk
    order, slots within a group too.
    """
    groups: dict[int, list[Slot]] = {}
    for slot in iter_slots(module, remove_duplicate=False):
        groups.setdefault(id(slot.tensor), []).append(slot)
    return list(groups.values())


def wrap_like(old: torch.Tensor, data: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    """Return ``data`` dressed as ``old`` was: Parameter class, ``requires_grad``, ``attrs``.

    ``attrs`` are attributes model code set on the original tensor (for
    example ``_is_hf_initialized``); tensor-valued ones are not copied.
    """
    if isinstance(old, nn.Parameter):
        new: torch.Tensor = tensor_class(old)(data, requires_grad=old.requires_grad)
    else:
        new = data.requires_grad_(old.requires_grad) if old.requires_grad else data
    for key, value in attrs.items():
        if not isinstance(value, torch.Tensor):
            setattr(new, key, value)
    return new
