"""What a forward keeps in its modules' plain attributes, noted before a call and put back.

Every member keeps what its own forward stores outside its parameters and
buffers (a cache of a derived tensor, such as LeViT's attention biases in
eval mode; the previous step's state), each in its own module. The loop plan
runs each member in its own copy of the template, which keeps it the same
way. ``torch.vmap`` and the grouped plan's ``torch.fx`` trace run the one
template for every member at once: a tensor computed there and stored is a wrapper that
exists only inside the call (a batched tensor, a trace's proxy), one value
where the members have N. So a plan of that kind that stores such a tensor
is refused (``execution="auto"`` then runs the loop), and the template is
put back as it was. A tensor every member would store alike (an input the
forward keeps for its hooks) is let be. The plan timing puts back whatever its runs stored, so
that only the calls whose results are used change any module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from lightning_meta._errors import ArgumentValueError

__all__ = ["MODULE_INTERNALS", "AttributeState", "state_written_error"]

# nn.Module's own bookkeeping, and what torch.compile adds.
MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_compiled_call_impl"}
# Containers whose items are noted too, this deep (a dict of dicts).
_DEPTH = 2


def _copy(value: Any, depth: int) -> Any:
    """What ``value`` holds, to compare and put back; ``None`` for an object not opened."""
    if depth > _DEPTH:
        return None
    if type(value) is dict:
        return [(k, v, _copy(v, depth + 1)) for k, v in value.items()]
    if type(value) is list:
        return [(i, v, _copy(v, depth + 1)) for i, v in enumerate(value)]
    return None


# Whether a stored tensor is one every member would store alike.
Shared = Callable[[torch.Tensor], bool]


def _holds_own(value: Any, shared: Shared, depth: int = 0) -> bool:
    """Whether ``value`` is or holds a tensor that is not ``shared`` (or a trace's proxy)."""
    if isinstance(value, fx.Proxy):
        return True
    if isinstance(value, torch.Tensor):
        return not shared(value)
    if depth > _DEPTH:
        return False
    if isinstance(value, dict):
        return any(_holds_own(v, shared, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_own(v, shared, depth + 1) for v in value)
    return False


def _never(tensor: torch.Tensor) -> bool:
    return False


class AttributeState:
    """The plain attributes (not torch's tables) of some modules, as they were when noted.

    Dicts and lists among them are noted item by item (two levels deep), so
    that an item put into a cache dict is seen, and taken out again by
    :meth:`restore`.
    """

    def __init__(self, modules: Iterable[tuple[str, nn.Module]]) -> None:
        modules = list(modules)
        self.modules = [mod for _, mod in modules]
        self._noted = [
            (
                path,
                attributes,
                {
                    key: (value, _copy(value, 0))
                    for key, value in attributes.items()
                    if key not in MODULE_INTERNALS
                },
            )
            for path, mod in modules
            for attributes in (vars(mod),)
        ]

    def written(self, shared: Shared = _never) -> list[str]:
        """Dotted paths where a tensor is now held that was not before and is not ``shared``
        (a trace's proxy never is)."""
        return self._diff(lambda value: _holds_own(value, shared), removed=False)

    def changed(self, own: Shared = _never) -> list[str]:
        """Dotted paths of every attribute or container item added, replaced or removed since,
        but for those now holding only ``own`` tensors (an ``nn.LSTM``'s list of its weights,
        which follows its parameter table)."""
        return self._diff(lambda value: not _only(value, own), removed=True)

    def _diff(self, counts: Callable[[Any], bool], removed: bool) -> list[str]:
        found: list[str] = []
        for path, attributes, noted in self._noted:
            _diff_items(
                {k: v for k, v in attributes.items() if k not in MODULE_INTERNALS},
                noted,
                f"{path}." if path else "",
                False,
                counts,
                removed,
                found,
            )
        return found

    def restore(self) -> None:
        """Put back every noted attribute and container item; drop attributes added since."""
        for _, attributes, noted in self._noted:
            for key in [k for k in attributes if k not in MODULE_INTERNALS and k not in noted]:
                del attributes[key]
            for key, (value, items) in noted.items():
                attributes[key] = value
                if items is not None:
                    _restore_items(value, items)


def _diff_items(
    now: dict[Any, Any],
    before: dict[Any, tuple[Any, Any]],
    where: str,
    items_of: bool,
    counts: Callable[[Any], bool],
    removed: bool,
    found: list[str],
) -> None:
    """Note in ``found`` the keys of ``now`` (an object's attributes, or with ``items_of`` a
    container's items) that changed from ``before`` (key -> (value, its items or ``None``))."""

    def name(key: Any) -> str:
        return f"{where}[{key!r}]" if items_of else f"{where}{key}"

    for key, value in now.items():
        old = before.get(key)
        if old is None or old[0] is not value:
            if counts(value):
                found.append(name(key))
        elif old[1] is not None:
            items = dict(value.items()) if isinstance(value, dict) else dict(enumerate(value))
            _diff_items(
                items,
                {k: (v, inner) for k, v, inner in old[1]},
                name(key),
                True,
                counts,
                removed,
                found,
            )
    if removed:
        found.extend(name(key) for key in before if key not in now)


def _only(value: Any, own: Shared, depth: int = 0) -> bool:
    """Whether ``value`` is an ``own`` tensor, or a non-empty container of nothing else."""
    if isinstance(value, torch.Tensor):
        return own(value)
    if depth > _DEPTH or not isinstance(value, (list, tuple, dict)) or not value:
        return False
    items = value.values() if isinstance(value, dict) else value
    return all(_only(v, own, depth + 1) for v in items)


def _restore_items(container: Any, items: list[tuple[Any, Any, Any]]) -> None:
    if isinstance(container, dict):
        container.clear()
        container.update((k, v) for k, v, _ in items)
    else:
        container[:] = [v for _, v, _ in items]
    for _, value, inner in items:
        if inner is not None:
            _restore_items(value, inner)


def state_written_error(
    plan: str, runner: str, paths: list[str], forced: bool
) -> ArgumentValueError:
    """The refusal of ``plan`` (which ran the template's forward as ``runner``) for a
    forward that stored tensors at ``paths``."""
    fix = (
        "Fix: use execution='loop', or 'auto' (which runs the loop for such a forward)."
        if forced
        else "Fix: use execution='loop'."
    )
    return ArgumentValueError(
        f"Ensemble(execution={plan!r}) ran the template's forward {runner}, and the forward "
        f"stored a tensor in {', '.join(repr(p) for p in paths)}, outside the parameters and "
        "buffers. Each member keeps its own value there; the template, shared by the members, "
        "cannot (the template is left as it was). " + fix,
        paths=paths,
    )
