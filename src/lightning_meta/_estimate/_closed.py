"""The fake modes of a finished estimate: every later op on one of their tensors raises.

``estimate`` runs the model's forward on fake tensors. Code outside the
model may keep one (transformers' DINOv3 ViT caches
``get_patches_center_coordinates`` in a process-wide ``functools.lru_cache``;
a helper object, a global): a real model run later would then compute on it,
and ``real + fake`` quietly gives a fake tensor, a loss that trains nothing.
So when an estimate ends, the modes it made are *closed*, as a finished
``deferred_init`` block's is: any op on one of their tensors raises
:class:`~lightning_meta.MetaTensorError` naming the cause and the fix.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

from lightning_meta._compat import ClosedFakeMode, FakeTensorMode
from lightning_meta._errors import MetaTensorError

__all__ = ["estimate_modes", "new_mode"]

# The fake modes the estimate running in this context made (None outside one).
_MODES: contextvars.ContextVar[list[FakeTensorMode] | None] = contextvars.ContextVar(
    "lightning_meta_estimate_modes", default=None
)


class _ClosedStepMode(ClosedFakeMode):
    """The fake mode of a finished estimate: every op on its tensors raises."""

    def refusal(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception:
        return MetaTensorError(
            f"{func} was called on a tensor of the training step lightning_meta.estimate "
            "simulated, after the estimate ended: code outside the model kept it (a cache such "
            "as a functools.lru_cache, a global, a helper object the model holds a reference "
            "to), and it holds no values, so the result would be a fake tensor. Fix: clear "
            "that cache after the estimate (lru_cache's cache_clear()), or estimate in a "
            "process of its own (lightning-meta estimate)."
        )


def new_mode() -> FakeTensorMode:
    """A fake mode for the estimate running now, closed when it ends (see :func:`estimate_modes`)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    made = _MODES.get()
    if made is not None:
        made.append(mode)
    return mode


@contextlib.contextmanager
def estimate_modes() -> Iterator[None]:
    """Close every fake mode :func:`new_mode` makes in the body when the body ends."""
    made: list[FakeTensorMode] = []
    token = _MODES.set(made)
    try:
        yield
    finally:
        _MODES.reset(token)
        for mode in made:
            mode.__class__ = _ClosedStepMode
