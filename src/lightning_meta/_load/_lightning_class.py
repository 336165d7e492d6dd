"""Whether a module is a LightningModule, and what that changes in a loader's fixes.

Lightning is recognised by its classes' module names: the loading core imports no
Lightning. Apart from ``_lightning_hooks`` so that the plan's refusals (``_match``) can
word their fixes without importing the hooks, which import the plan's prefix detection.
"""

from __future__ import annotations

from torch import nn

from lightning_meta._arguments import spelled

__all__ = ["LIGHTNING_PACKAGES", "lightning_module", "partial_load"]

#: the packages a LightningModule's class comes from
LIGHTNING_PACKAGES = ("lightning.", "pytorch_lightning.")


def lightning_module(module: nn.Module) -> bool:
    """Whether ``module`` is a ``LightningModule`` (of ``lightning`` or ``pytorch_lightning``)."""
    return any(
        c.__name__ == "LightningModule" and c.__module__.startswith(LIGHTNING_PACKAGES)
        for c in type(module).__mro__
    )


def partial_load(module: nn.Module) -> str:
    """How a fix names loading part of a checkpoint into ``module``: ``strict=False``
    (``--no-strict``), or, where a LightningModule set ``strict_loading = True``, which
    refuses both as ``load_from_checkpoint`` does, setting it to ``False``."""
    if lightning_module(module) and getattr(module, "_strict_loading", None):
        name = type(module).__name__
        refused = spelled("strict=False", "--no-strict")
        return f"set {name}.strict_loading = False (its True refuses {refused})"
    return spelled("strict=False", "--no-strict")
