"""Meta-device modules that just work in PyTorch Lightning."""

from __future__ import annotations

from lightning_meta._deferred import deferred_init, is_deferred, materialize
from lightning_meta._ensemble import Ensemble
from lightning_meta._errors import MaterializationError, MetaTensorError, MetaTensorWarning
from lightning_meta._estimate import Estimate, InputSpec, ModuleEstimate, estimate
from lightning_meta._template import MetaTemplate, meta_template

__version__ = "0.1.0"

__all__ = [
    "Ensemble",
    "Estimate",
    "InputSpec",
    "MaterializationError",
    "MetaTemplate",
    "MetaTensorError",
    "MetaTensorWarning",
    "ModuleEstimate",
    "deferred_init",
    "estimate",
    "is_deferred",
    "materialize",
    "meta_template",
]
