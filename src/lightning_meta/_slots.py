"""Where a module keeps its tensors: the one walk that materializing and loading share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_meta._deferred_record import HANDLES_ATTR

__all__ = ["Slot", "iter_slots"]

Kind = Literal["param", "buffer", "attr"]


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
        table: dict[str, Any] = {
            "param": self.owner._parameters,
            "buffer": self.owner._buffers,
            "attr": self.owner.__dict__,
        }
        value = table[self.kind].get(self.name)
        return value if isinstance(value, torch.Tensor) else None

    def put(self, value: torch.Tensor) -> None:
        """Store ``value`` in the slot, bypassing ``nn.Module.__setattr__``'s checks."""
        if self.kind == "param":
            self.owner._parameters[self.name] = value  # type: ignore[assignment]
        elif self.kind == "buffer":
            self.owner._buffers[self.name] = value
        else:
            self.owner.__dict__[self.name] = value


def iter_slots(module: nn.Module, *, remove_duplicate: bool = True) -> Iterator[Slot]:
    """Yield every parameter, buffer and deferred plain tensor attribute of ``module``.

    With ``remove_duplicate=False``, a submodule shared under several names is
    walked under each of them, as ``state_dict`` does.
    """
    for prefix, mod in module.named_modules(remove_duplicate=remove_duplicate):
        dot = f"{prefix}." if prefix else ""
        for name, p in mod._parameters.items():
            if p is not None:
                yield Slot(dot + name, mod, "param", name, p, True)
        for name, b in mod._buffers.items():
            if b is not None:
                persistent = name not in mod._non_persistent_buffers_set
                yield Slot(dot + name, mod, "buffer", name, b, persistent)
        for name in mod.__dict__.get(HANDLES_ATTR, {}):
            value = mod.__dict__.get(name)
            if isinstance(value, torch.Tensor):
                yield Slot(dot + name, mod, "attr", name, value, False)
