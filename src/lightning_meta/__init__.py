"""Meta-device modules that just work in PyTorch Lightning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_meta._deferred import deferred_init, is_deferred, materialize
from lightning_meta._ensemble import Ensemble
from lightning_meta._errors import MaterializationError, MetaTensorError, MetaTensorWarning
from lightning_meta._estimate import Estimate, InputSpec, ModuleEstimate, estimate
from lightning_meta._find import MetaFinding, assert_no_meta, find_meta_tensors
from lightning_meta._load import LoadReport, load_checkpoint
from lightning_meta._template import MetaTemplate, meta_template

if TYPE_CHECKING:
    from lightning_meta._guard import MetaGuard

__version__ = "0.1.0"

__all__ = [
    "Ensemble",
    "Estimate",
    "InputSpec",
    "LoadReport",
    "MaterializationError",
    "MetaFinding",
    "MetaGuard",
    "MetaTemplate",
    "MetaTensorError",
    "MetaTensorWarning",
    "ModuleEstimate",
    "assert_no_meta",
    "deferred_init",
    "estimate",
    "find_meta_tensors",
    "is_deferred",
    "load_checkpoint",
    "materialize",
    "meta_template",
]


def __getattr__(name: str) -> Any:
    # MetaGuard is a Lightning Callback: importing it imports Lightning, which
    # the rest of the package (torch only) does not need.
    if name == "MetaGuard":
        from lightning_meta._guard import MetaGuard

        return MetaGuard
    raise AttributeError(f"module 'lightning_meta' has no attribute {name!r}")
