"""Watch a vmapped forward for embedding lookups with a padding index.

Where the indices differ per member (per-member inputs, or indices a forward
derives from a stacked buffer), ``torch.vmap`` looks every member's indices up
in one flattened table (its batching rule for ``embedding`` folds the member
dimension into the table's rows), and the backward of that lookup keeps only
member 0's padding row out of the gradient: members 1..N-1 train their
padding rows, which their own ``F.embedding(..., padding_idx=p)`` never does.
``nn.Embedding`` layers with per-member inputs are found by a module scan
(``_padded_embeddings``); a forward's own ``F.embedding`` call, and indices
made per-member inside the forward, only by watching the call, which this mode
does on the first vmapped call with gradients of each kind (``_call_kind``):
entered on every call, it cost 15-20 % of a vmapped step of small layers.
``F.embedding_bag``'s batching rule keeps every member's padding row out, so
it is not watched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lightning_meta._compat import compiler_disabled, made_at_level, transform_level, unwrapped
from lightning_meta._errors import ArgumentValueError

__all__ = ["PaddedLookupError", "PaddedLookupWatch"]


class PaddedLookupError(ArgumentValueError):
    """A vmapped forward looked indices that differ per member up with a padding index."""


class PaddedLookupWatch(TorchFunctionMode):  # type: ignore[misc]
    """Raise :class:`PaddedLookupError` on ``F.embedding`` / ``torch.embedding`` with a
    padding index whose indices and weight are both batched by the innermost vmap.

    ``names``: the stacked tensors vmap runs over, by name (the template's dotted paths),
    so that the error names the table.
    """

    def __init__(self, plan: str, names: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.plan = plan
        self._names = {id(t): name for name, t in names.items()}

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.embedding or func is torch.embedding:
            self._check(func, args, kwargs)
        return func(*args, **kwargs)

    # Eagerly, also under torch.compile: after a graph break in the ensemble's call,
    # dynamo traces the frames the eager rest of it runs, and the functorch queries
    # here are builtins it cannot trace (three "Dynamo does not know how to trace
    # the builtin" warnings for the user).
    @compiler_disabled
    def _check(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if func is F.embedding:
            names = ("input", "weight", "padding_idx")
            unset: Any = None
        else:  # torch.embedding(weight, indices, padding_idx=-1, ...)
            names = ("weight", "input", "padding_idx")
            unset = -1
        given = dict(zip(names, args, strict=False))
        given.update((k, v) for k, v in kwargs.items() if k in names or k == "indices")
        if "indices" in given:
            given["input"] = given.pop("indices")
        padding_idx = given.get("padding_idx", unset)
        indices, weight = given.get("input"), given.get("weight")
        if padding_idx is None or padding_idx == unset or not torch.is_grad_enabled():
            return  # no padding row, or no gradient (a lookup under no_grad in the forward)
        level = transform_level()
        if level is None or not all(
            isinstance(t, torch.Tensor) and made_at_level(t, level) for t in (indices, weight)
        ):
            return  # shared indices (or weights): looked up unbatched, exact
        assert isinstance(weight, torch.Tensor)  # made at the level, just above
        table = unwrapped(weight)
        if not table.requires_grad:
            return  # a frozen table: no padding row to train
        name = self._names.get(id(table))
        where = (
            f"the stacked parameter {name!r}"
            if name is not None
            else f"a trainable table of shape {tuple(weight.shape)} the forward computed"
        )
        forced = self.plan == "vmap"
        fix = (
            "Fix: use execution='loop' (or 'auto', which runs the loop for such a forward)."
            if forced
            else "Fix: use execution='loop'."
        )
        call = "F.embedding" if func is F.embedding else "torch.embedding"
        raise PaddedLookupError(
            f"Ensemble(execution={self.plan!r}) ran the template's forward under torch.vmap "
            f"with gradients on, and it looked indices that differ per member up in {where} "
            f"with {call}(..., padding_idx={padding_idx}) (an nn.Embedding layer's, or the "
            "forward's own call): torch.vmap looks every member's own indices "
            "up in one flattened table, whose backward keeps only member 0's padding row out "
            "of the gradient, so the other members' padding rows would train. " + fix
        )
