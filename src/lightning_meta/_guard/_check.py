"""Walk a LightningModule through the lifecycle a Trainer would, without training.

Used by ``lightning-meta check``: :func:`check_module` returns one
:class:`Row` per finding; a row with ``status == "problem"`` is a meta-related
failure (the command exits 1), ``"note"`` a failure of another kind (an
unpicklable attribute), ``"info"`` and ``"ok"`` are for reading.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from lightning_meta._compat import is_torch_meta_error
from lightning_meta._deferred._handles import deferred_paths
from lightning_meta._deferred._materialize import materialize_beyond, materialize_paths
from lightning_meta._errors import MetaTensorError
from lightning_meta._guard._find import (
    ESCAPED_AS_FIX,
    ESCAPED_FIX,
    STALE_FIX,
    explain,
    find_meta_tensors,
)
from lightning_meta._guard._materialize import HYPERPARAMETERS, refuse_left

__all__ = ["Row", "check_module", "own_configure_model"]

Status = Literal["ok", "info", "note", "problem"]

_MATERIALIZE = "MetaGuard (or lightning_meta.materialize) fills it exactly"


@dataclass(frozen=True)
class Row:
    """One line of the report: which step, what happened, where, and the fix."""

    step: str
    status: Status
    path: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def check_module(module: nn.Module, *, stage: str = "fit") -> list[Row]:
    """Walk ``module`` through setup, configure_model, materialization, device transfer,
    state-dict round trip, optimizer construction, deepcopy, pickle and summary.

    The module is changed the way a Trainer would change it (a
    ``LightningModule``'s ``setup(stage)`` then ``configure_model`` are
    called, deferred tensors are materialized on the CPU).
    """
    rows: list[Row] = []
    if _is_lightning_module(module):
        # The Trainer calls setup(stage) before configure_model; layers built
        # there are what MetaGuard sees too.
        rows.append(_step(f"setup({stage!r})", lambda: module.setup(stage)))  # type: ignore[operator]
    configure = getattr(module, "configure_model", None)
    if callable(configure):
        rows.append(_step("configure_model", configure))
    for f in find_meta_tensors(module):
        if f.kind == "template":
            rows.append(
                Row(
                    "find meta tensors",
                    "ok",
                    f.path,
                    "MetaTemplate: meta by design, hidden from Lightning",
                )
            )
        elif f.escaped is not None:
            rows.append(
                Row(
                    "find meta tensors",
                    "problem",
                    f.path,
                    f"{f.kind} {f.shape} created at {f.escaped}. "
                    + (ESCAPED_FIX if f.escaped_as is None else ESCAPED_AS_FIX),
                )
            )
        elif f.deferred:
            rows.append(
                Row(
                    "find meta tensors",
                    "info",
                    f.path,
                    f"deferred {f.kind} {f.shape}: {_MATERIALIZE}",
                )
            )
        elif f.hidden:
            rows.append(
                Row(
                    "find meta tensors",
                    "note",
                    f.path,
                    f"meta {f.kind} {f.shape} of a module held outside the module tree: "
                    "Lightning never sees it, and torch.func.functional_call runs it with real "
                    "tensors. lightning_meta.MetaTemplate(module) is the supported form.",
                )
            )
        elif f.path.split(".", 1)[0] in HYPERPARAMETERS:
            rows.append(
                Row(
                    "find meta tensors",
                    "problem",
                    f.path,
                    f"meta hyperparameter {f.shape}: every checkpoint would save it, and "
                    "load_from_checkpoint would then build the model with a meta tensor. "
                    "Fix: pass a real tensor, or leave it out of save_hyperparameters(ignore=...).",
                )
            )
        elif f.stale:
            rows.append(
                Row(
                    "find meta tensors",
                    "problem",
                    f.path,
                    f"{f.kind} {f.shape} materialized elsewhere: a reference taken before "
                    f"materializing. {STALE_FIX}",
                )
            )
        elif f.kind in ("parameter", "buffer"):
            rows.append(
                Row(
                    "find meta tensors",
                    "problem",
                    f.path,
                    f"meta {f.kind} {f.shape}, not deferred: Lightning cannot move, wrap, optimize or save it",
                )
            )
        else:
            rows.append(
                Row(
                    "find meta tensors",
                    "problem",
                    f.path,
                    f"meta {f.kind} {f.shape}, not deferred: Lightning does not move it, and "
                    "forward fails on it (a meta tensor holds no data). Fix: register it as a "
                    "buffer built under deferred_init, or keep it in a MetaTemplate.",
                )
            )
    materialized = True
    if any(f.deferred for f in find_meta_tensors(module)):
        row = _step("materialize deferred", lambda: _materialize(module))
        rows.append(row)
        materialized = row.status == "ok"
        if materialized:
            row = _step(
                "nothing deferred left",
                lambda: refuse_left(module, only_deferred=True),
            )
            rows.append(row)
            materialized = row.status == "ok"
    strays = ", ".join(
        f.path
        for f in find_meta_tensors(module)
        if f.kind in ("parameter", "buffer") and not f.hidden
    )
    steps: list[tuple[str, Callable[[], Any], str]] = [
        ("device transfer (.to('cpu'))", lambda: module.to("cpu"), strays),
        ("state_dict round trip", lambda: _round_trip(module), ""),
        ("optimizer construction", lambda: _optimizers(module), ""),
    ]
    for name, fn, paths in steps:
        if materialized:
            rows.append(_step(name, fn, paths))
        else:
            # Each would fail on the tensors materialize left deferred: one
            # cause, reported once, in the row above.
            rows.append(Row(name, "note", "", "not run: 'materialize deferred' failed above"))
    rows.append(_step("deepcopy", lambda: copy.deepcopy(module)))
    rows.append(_step("pickle", lambda: pickle.loads(pickle.dumps(module))))
    rows.append(_step("summary", lambda: _summary(module)))
    return rows


def _step(name: str, fn: Callable[[], Any], paths: str = "") -> Row:
    try:
        fn()
    except Exception as e:  # every failure becomes a row; the cause is in the detail
        status: Status = "problem" if _meta_related(e) else "note"
        text = _ANSI.sub("", str(e)).strip()  # torch's UnpicklingError bolds a phrase
        first = text.splitlines()[0] if text else ""
        # torch.load(weights_only=True)'s first line is its general advice; the cause
        # (the global it refused) is on a line of its own
        cause = [
            line.strip()
            for line in text.splitlines()
            if line.strip().startswith("WeightsUnpickler error:")
        ]
        first = cause[0].split(". ")[0] + "." if cause else first
        # The fix, where the message gives one after its first line.
        fix = text[text.index("Fix:") :].split("\n\n")[0] if "Fix:" in text[len(first) :] else ""
        detail = f"{type(e).__name__}: {first}" + (f" {' '.join(fix.split())}" if fix else "")
        return Row(name, status, _path_of(e) or paths, detail)
    return Row(name, "ok", "", "")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _meta_related(e: BaseException) -> bool:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, MetaTensorError) or is_torch_meta_error(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _path_of(e: BaseException) -> str:
    return ", ".join(e.paths) if isinstance(e, MetaTensorError) else ""


def _materialize(module: nn.Module) -> None:
    materialize_paths(module, deferred_paths(module), device="cpu")
    # As MetaGuard: modules the tree holds in lists, tuples and dicts too.
    materialize_beyond(module, device="cpu")


def _round_trip(module: nn.Module) -> None:
    state = module.state_dict()
    meta = [f for f in find_meta_tensors(state) if f.problem]
    if meta:
        raise MetaTensorError(
            "state_dict() holds meta tensors (a checkpoint would save them without error, "
            "and load_from_checkpoint would then move the model to meta):\n"
            + "\n".join(f"  {f.describe()}" for f in meta),
            paths=[f.path for f in meta],
        )
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    module.load_state_dict(torch.load(buffer, weights_only=True))


def _optimizers(module: nn.Module) -> None:
    configure = getattr(module, "configure_optimizers", None)
    if not callable(configure) or _lightnings_own(module, "configure_optimizers"):
        return  # (Lightning's own warns "must be implemented" and returns nothing)
    result = configure()
    optimizers = [o for o in _flatten(result) if isinstance(o, torch.optim.Optimizer)]
    meta = [f for f in find_meta_tensors(optimizers) if f.problem]
    if meta:
        raise explain(meta, "configure_optimizers()")


def _flatten(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return [x for item in obj for x in _flatten(item)]
    if isinstance(obj, dict):
        return [x for item in obj.values() for x in _flatten(item)]
    return [obj]


def own_configure_model(module: nn.Module) -> Callable[[], None] | None:
    """``module.configure_model`` where ``module`` is a ``LightningModule`` that overrides it
    (what Lightning's ``load_from_checkpoint`` calls), else ``None``."""
    if not _is_lightning_module(module) or _lightnings_own(module, "configure_model"):
        return None
    return cast("Callable[[], None]", module.configure_model)


def _lightning_module_class() -> type | None:
    try:
        from lightning.pytorch import LightningModule
    except ImportError:  # pragma: no cover (the command needs Lightning for its targets)
        return None
    return LightningModule


def _is_lightning_module(module: nn.Module) -> bool:
    base = _lightning_module_class()
    return base is not None and isinstance(module, base)


def is_lightning_module_class(obj: object) -> bool:
    """Whether ``obj`` is a ``LightningModule`` subclass (also of the old package name,
    ``pytorch_lightning``, where the target imported it: its checkpoints are the same)."""
    base = _lightning_module_class()
    if base is None:  # pragma: no cover (the command needs Lightning for its targets)
        return False
    old = getattr(sys.modules.get("pytorch_lightning"), "LightningModule", base)
    return isinstance(obj, type) and issubclass(obj, (base, old))


def _lightnings_own(module: nn.Module, method: str) -> bool:
    """Whether ``module`` is a ``LightningModule`` that does not override ``method``."""
    base = _lightning_module_class()
    return (
        base is not None
        and isinstance(module, base)
        and getattr(type(module), method, None) is getattr(base, method, None)
    )


def _summary(module: nn.Module) -> None:
    from lightning.pytorch import LightningModule
    from lightning.pytorch.utilities.model_summary.model_summary import ModelSummary

    if isinstance(module, LightningModule):
        with warnings.catch_warnings():
            # about the counts of lazy modules, which this step does not print
            warnings.filterwarnings("ignore", message="The total number of parameters detected")
            str(ModelSummary(module, max_depth=1))
