"""Meta-device modules that just work in PyTorch Lightning."""

import typing as _typing

from lightning_meta._deferred._block import deferred_init, is_deferred
from lightning_meta._deferred._materialize import materialize
from lightning_meta._ensemble._ensemble import Ensemble
from lightning_meta._errors import (
    ArgumentTypeError,
    ArgumentValueError,
    MaterializationError,
    MetaTensorError,
    MetaTensorWarning,
)
from lightning_meta._estimate._estimate import estimate
from lightning_meta._estimate._fit import Fit, find_fit
from lightning_meta._estimate._result import Estimate, ModuleEstimate, RankEstimate
from lightning_meta._estimate._specs import InputSpec
from lightning_meta._fabric._setup import fabric_setup
from lightning_meta._guard._find import MetaFinding, assert_no_meta, find_meta_tensors
from lightning_meta._load._checkpoint import LoadReport, load_checkpoint
from lightning_meta._template._template import MetaTemplate, TemplateState, meta_template

if _typing.TYPE_CHECKING:
    from lightning_meta._guard._callback import MetaGuard

__version__ = "0.1.0"

__all__ = [
    "ArgumentTypeError",
    "ArgumentValueError",
    "Ensemble",
    "Estimate",
    "Fit",
    "InputSpec",
    "LoadReport",
    "MaterializationError",
    "MetaFinding",
    "MetaGuard",
    "MetaTemplate",
    "MetaTensorError",
    "MetaTensorWarning",
    "ModuleEstimate",
    "RankEstimate",
    "TemplateState",
    "assert_no_meta",
    "deferred_init",
    "estimate",
    "fabric_setup",
    "find_fit",
    "find_meta_tensors",
    "is_deferred",
    "load_checkpoint",
    "materialize",
    "meta_template",
]


def __getattr__(name: str) -> object:
    # MetaGuard is a Lightning Callback: importing it imports Lightning, which
    # the rest of the package (torch only) does not need.
    if name == "MetaGuard":
        from lightning_meta._guard._callback import MetaGuard

        return MetaGuard
    raise AttributeError(f"module 'lightning_meta' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__", *(n for n in globals() if n.startswith("_"))})
