"""Plain settings: what counts as one, when two differ, and which changed on a template.

:func:`plain_value` and :func:`differs` are shared by ``Ensemble`` and
``MetaTemplate`` (``state_from(net)`` carries ``net``'s settings), so that both
take the same values for settings and tell them apart the same way.

A setting such as a dropout's ``p`` or a module's own ``self.scale`` may be set on
``ensemble.template.module`` between calls. The ``vmap`` and ``fused`` plans read
the template on every call; the loop plan runs per-member copies of it, and the
``grouped`` plan a graph traced from it, which keep what they were made with.
Each of those keeps a :class:`SettingsWatch` and asks it, once per call, what
changed: one dictionary comparison per module when nothing did.
"""

from __future__ import annotations

import copy
import enum
import numbers
import operator
from typing import Any

import torch
from torch import nn

from lightning_meta._forward_state import MODULE_INTERNALS

__all__ = ["DELETED", "SettingsWatch", "as_now", "differs", "plain_number", "plain_value"]

_PLAIN = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, enum.Enum)


def plain_number(value: Any) -> bool:
    """Whether ``value`` is a number that is not a tensor: Python's, and numpy's scalars
    (``np.float32(0.1)`` from a schedule; ``np.bool_``), found without importing numpy.

    numpy's scalars were not taken for settings: a dropout's ``p`` set to
    ``np.float32(0.0)`` on an ensemble's template left the loop's copies at 0.5
    (1.05 off), and ``state_from(net)`` did not carry it (2026-12-07, third session).
    """
    cls = type(value)
    if cls in _BUILTIN_NUMBERS:
        return True
    if isinstance(value, numbers.Number):
        return not isinstance(value, torch.Tensor)
    known = _NUMPY_SCALAR.get(cls)
    if known is None:
        known = _NUMPY_SCALAR[cls] = any(
            c.__name__ == "generic" and c.__module__ == "numpy" for c in cls.__mro__
        )
    return known


_BUILTIN_NUMBERS = frozenset({int, float, bool, complex})
# Class -> whether it is one of numpy's scalar classes (np.bool_ is no numbers.Number).
_NUMPY_SCALAR: dict[type, bool] = {}


def plain_value(value: Any) -> bool:
    """Whether ``value`` holds no tensor or object: numbers, strings, and containers of them."""
    if isinstance(value, _PLAIN) or plain_number(value):
        return True
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(plain_value(v) for v in value)
    if isinstance(value, dict):
        return all(plain_value(k) and plain_value(v) for k, v in value.items())
    return False


def differs(a: Any, b: Any) -> bool:
    """Whether plain values ``a`` and ``b`` differ: in type or in ``repr`` (NaN equals NaN).

    Not by ``==``: values that compare equal may act otherwise, and a setting changed
    to one was not followed (``0.0`` to ``-0.0`` as a divisor, ``True`` to ``1`` as an index,
    which keeps the dimension, ``2`` to ``2.0`` as a kernel size, which torch refuses).
    """
    return type(a) is not type(b) or repr(a) != repr(b)


class SettingsWatch:
    """Remembers each module's ``__dict__`` under a root module; :meth:`changed` names the
    plain values (numbers, strings, containers of them) changed since the last look.

    The modules are those of the root when it was first seen, or last :meth:`reset`
    (a submodule added later is not watched; the paths stay those of that walk).
    """

    def __init__(self) -> None:
        self._root: nn.Module | None = None
        self._paths: list[str] = []
        self._watched: list[nn.Module] = []
        self._dicts: list[dict[str, Any]] = []
        self._scalars: list[tuple[tuple[str, ...], tuple[Any, ...]]] = []

    def __reduce__(self) -> tuple[type[SettingsWatch], tuple[()]]:
        return (SettingsWatch, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> SettingsWatch:
        return SettingsWatch()

    def reset(self, root: nn.Module) -> None:
        """Take ``root``'s modules and their settings as they are now."""
        pairs = list(root.named_modules())
        self._root = root
        self._paths = [path for path, _ in pairs]
        self._watched = [module for _, module in pairs]
        self._dicts = [_snapshot(module.__dict__) for module in self._watched]
        self._scalars = [_scalars(d) for d in self._dicts]

    def changed(self, root: nn.Module) -> list[tuple[str, str, Any]]:
        """``(module path, key, new value)`` for every plain setting of ``root``'s modules
        changed since the last look (a deleted one: the value ``_DELETED``); nothing for
        a root not seen before (taken as it is). ``training`` is left out: the plans
        follow modes on their own."""
        if root is not self._root:
            self.reset(root)
            return []
        out: list[tuple[str, str, Any]] = []
        for j, module in enumerate(self._watched):
            now, before = module.__dict__, self._dicts[j]
            try:
                # The common case: one comparison in C per module, and the numbers by
                # identity, which == does not tell apart from equal ones (0.0 and -0.0).
                keys, values = self._scalars[j]
                if now == before and all(map(operator.is_, map(now.get, keys), values)):
                    continue
            except Exception:  # a tensor put in an attribute: its == is elementwise
                pass
            for key in now.keys() | before.keys():
                if key == "training":
                    continue
                new, old = now.get(key, DELETED), before.get(key, DELETED)
                if not (_followed(new) and _followed(old)):
                    continue  # a tensor, a submodule table, a function: not a setting
                if new is DELETED or old is DELETED or differs(new, old):
                    out.append((self._paths[j], key, new))
            self._dicts[j] = _snapshot(now)
            self._scalars[j] = _scalars(self._dicts[j])
        return out


def _scalars(snapshot: dict[str, Any]) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """The keys and values of a snapshot's numbers (Python's and numpy's), compared by
    identity on every call."""
    pairs = [(k, v) for k, v in snapshot.items() if plain_number(v)]
    return tuple(k for k, _ in pairs), tuple(v for _, v in pairs)


def _snapshot(settings: dict[str, Any]) -> dict[str, Any]:
    """A copy of a module's ``__dict__`` whose plain containers are copies (:func:`as_now`),
    but for ``nn.Module``'s own tables (its hook dicts), kept by reference: compared by
    identity they cost nothing per call, and they are not settings."""
    return {
        key: value if key in MODULE_INTERNALS else as_now(value) for key, value in settings.items()
    }


def as_now(value: Any) -> Any:
    """``value`` as it is now: a plain container (a list, a dict, a tuple holding one) is
    copied, anything else is itself.

    A list or dict setting changed in place (``self.scales[1] = 3.0``) is the same
    object before and after: kept by reference, it compared equal to itself and the
    change went unseen (the loop's copies kept the old values, the grouped plan its
    traced constants, ``Ensemble.apply`` carried nothing). Comparing with a copy costs
    the container's length.
    """
    if isinstance(value, (tuple, list, set, frozenset, dict)) and plain_value(value):
        return copy.deepcopy(value)
    return value


class _Deleted:
    def __repr__(self) -> str:
        return "<deleted>"


DELETED: Any = _Deleted()


def _followed(value: Any) -> bool:
    return value is DELETED or plain_value(value)
