"""Meta-device modules that just work in PyTorch Lightning."""

from __future__ import annotations

from lightning_meta._ensemble import Ensemble
from lightning_meta._errors import MaterializationError, MetaTensorError, MetaTensorWarning
from lightning_meta._template import MetaTemplate, meta_template

__version__ = "0.1.0"

__all__ = [
    "Ensemble",
    "MaterializationError",
    "MetaTemplate",
    "MetaTensorError",
    "MetaTensorWarning",
    "meta_template",
]
