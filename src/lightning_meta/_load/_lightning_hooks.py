"""A LightningModule's own ``on_load_checkpoint`` and ``strict_loading``, followed as
Lightning's ``load_from_checkpoint`` follows them.

``load_from_checkpoint`` hands the whole checkpoint to the module's
``on_load_checkpoint`` (which may rename keys, convert old formats, drop
entries) before it loads ``checkpoint["state_dict"]``, and loads with the
module's ``strict_loading`` unless told otherwise. A loader that skipped the
hook gave other numbers without an error (a module converting a saved
``log(temperature)`` with ``.exp()``). Lightning is recognised by its classes'
module names: the loading core imports no Lightning.
"""

from __future__ import annotations

import contextvars
import importlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from lightning_meta._arguments import spelled
from lightning_meta._compat import storage_id
from lightning_meta._errors import ArgumentValueError, MetaTensorError
from lightning_meta._load._lightning_class import LIGHTNING_PACKAGES, lightning_module
from lightning_meta._load._source import Source, TorchSource, saved_versions, state_tensors
from lightning_meta._load._torchfile import Archive, TensorRef, Unsupported

__all__ = [
    "HYPERPARAMETER_OVERRIDES",
    "Followed",
    "follow_on_load_checkpoint",
    "resolve_strict",
]


#: keyword arguments the model was built with beyond the checkpoint's (``load-check
#: --args``), which ``load_from_checkpoint(path, **kwargs)`` writes into the
#: ``"hyper_parameters"`` the hook sees
HYPERPARAMETER_OVERRIDES: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "lightning_meta_hyperparameter_overrides", default=None
)


def _own_hook(module: nn.Module) -> str | None:
    """The qualified name of ``module``'s own ``on_load_checkpoint``; ``None`` where it is
    Lightning's (which does nothing) or ``module`` is no LightningModule."""
    if not lightning_module(module):
        return None
    if "on_load_checkpoint" in vars(module):  # set on the instance
        return f"{type(module).__name__}.on_load_checkpoint (set on the instance)"
    for cls in type(module).__mro__:
        if "on_load_checkpoint" in vars(cls):
            if cls.__module__.startswith(LIGHTNING_PACKAGES):
                return None
            return f"{cls.__qualname__}.on_load_checkpoint"
    return None


def resolve_strict(module: nn.Module, strict: bool | None, who: str) -> tuple[bool, bool]:
    """``strict`` as ``load_from_checkpoint`` resolves it, and whether the module decided
    it: ``None`` is the module's ``strict_loading`` (True unless a LightningModule sets
    it), and an explicit value that contradicts one the module set is refused, as
    Lightning refuses it."""
    if not lightning_module(module):
        return (True if strict is None else strict), False
    own = getattr(module, "_strict_loading", None)
    if strict is None:
        return bool(getattr(module, "strict_loading", True)), True
    if own is not None and bool(own) != strict:
        name = type(module).__name__
        given = spelled(f"strict={strict}", "--no-strict")
        leave = spelled("leave strict out", "leave --no-strict out")
        raise ArgumentValueError(
            f"{spelled(who, 'load-check')}: {given} contradicts {name}.strict_loading={bool(own)}, which Lightning's "
            f"load_from_checkpoint refuses too. Fix: {leave} (the module's strict_loading then "
            "decides); to load part of a checkpoint into this module, set its "
            "strict_loading = False (or leave it unset)."
        )
    return strict, False


class Followed(NamedTuple):
    """What :func:`follow_on_load_checkpoint` gave: the source to load, the hook that ran
    (its qualified name, or ``None``), and the keys the hook filled with the module's own
    meta tensors (``sd.setdefault(k, v)`` over ``self.state_dict()``, for keys an older
    checkpoint lacks): they keep the module's values, as loading them into itself does."""

    source: Source
    hook: str | None
    own: frozenset[str]
    #: the hook not run: the file holds no "state_dict" (see the refusals that name it)
    skipped: str | None = None


def follow_on_load_checkpoint(
    module: nn.Module, source: Source, *, prefix: str | None, verify: bool, mapped: bool
) -> Followed:
    """Run ``module``'s own ``on_load_checkpoint`` on the checkpoint, as Lightning does, and
    return a source of the ``"state_dict"`` it leaves; ``source`` itself where there is no
    such hook, the file holds no ``"state_dict"`` and records no Lightning version (a
    plain state dict), or ``prefix`` names one (the module loaded is a part of the one the
    file was saved from, whose hook Lightning would not run).

    The hook gets the whole file with its tensors read (optimizer states too), as
    ``torch.load`` gives it to Lightning's ``load_from_checkpoint``, after Lightning's own
    migration of the file's format and with ``"hyper_parameters"`` set (``{}`` where the
    file has none), as that method does: the file is read once, and the tensors the state
    dict then holds are the ones loaded.

    Raises:
        MetaTensorError: the hook applies to a distributed checkpoint (its tensors are
            read rank by rank, not as one checkpoint a hook could be given), or leaves
            no ``"state_dict"`` mapping.
    """
    hook = _own_hook(module)
    if hook is None or prefix:
        return Followed(source, None, frozenset())
    archive = getattr(source, "archive", None)
    lightning_file = (
        archive is not None and isinstance(archive.obj, Mapping) and _VERSION_KEY in archive.obj
    )
    if not source.under_state_dict and not lightning_file:
        # a plain state dict (Lightning's load_from_checkpoint fails on one without its
        # version): read as one, and a refusal says the hook did not run. A Lightning file
        # without "state_dict" gets the hook, which may build it (a fourth look)
        return Followed(source, None, frozenset(), skipped=hook)
    if not isinstance(source, TorchSource) or archive is None:
        raise MetaTensorError(
            f"load_checkpoint cannot follow {hook} for {str(source.path)!r} (a "
            f"{source.format} checkpoint, read rank by rank): Lightning hands the hook the "
            "whole checkpoint before loading, and the loaded values may depend on what it "
            "does. Fix: load it through Lightning's own resume, which hands the hook the "
            "directory's other state: trainer.fit(model, ckpt_path=...) (or "
            "trainer.validate) with the strategy that wrote it.",
            paths=[str(source.path)],
        )
    refs: dict[str, tuple[Archive, TensorRef | Unsupported | torch.Tensor]] = {}

    def collect(x: Any, depth: int = 0) -> None:
        if isinstance(x, TensorRef):
            refs.setdefault(f"\0{id(x)}", (archive, x))
        elif depth < 64 and isinstance(x, Mapping):
            for v in x.values():
                collect(v, depth + 1)
        elif depth < 64 and isinstance(x, (list, tuple)):
            for v in x:
                collect(v, depth + 1)

    collect(archive.obj)
    reader = TorchSource(Path(source.path), source.format, refs)
    read = dict(reader.read(list(refs), verify=verify, mapped=mapped))
    checkpoint = _rebuilt(archive.obj, read)
    if isinstance(checkpoint, dict):
        if _VERSION_KEY in checkpoint:
            checkpoint = _migrated(module, checkpoint, Path(source.path))
        checkpoint.setdefault("hyper_parameters", {})
        overrides = HYPERPARAMETER_OVERRIDES.get()
        if overrides and isinstance(checkpoint["hyper_parameters"], dict):
            # as load_from_checkpoint(path, **kwargs) does (a fifth look at the CLI: the hook
            # saw the file's values, not --args')
            checkpoint["hyper_parameters"].update(overrides)
    places = {
        k: _place(t)
        for k, t in module.state_dict(keep_vars=True).items()
        if isinstance(t, torch.Tensor)
    }
    try:
        module.on_load_checkpoint(checkpoint)  # type: ignore[operator]
    except Exception as e:
        around = _saved_around(module, source)
        if not around:
            raise
        raise MetaTensorError(
            f"{hook} raised {type(e).__name__}: {e} on {str(source.path)!r}, whose keys name "
            f"{type(module).__name__}'s tensors under {around!r}: saved from another module "
            "holding it, maybe, whose hook Lightning would run instead of this one. Fix: if "
            f"so, pass {spelled(f'prefix={around!r}', f'--prefix {around}')} (the hook of the "
            "module loaded then does not run).",
            paths=[str(source.path)],
        ) from e
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise MetaTensorError(
            f"{hook} left checkpoint['state_dict'] a {type(state).__name__}, not a state dict, "
            f"so there is nothing to load from {str(source.path)!r} (Lightning's "
            "load_from_checkpoint fails on it too). Fix: leave a mapping of tensors there.",
            paths=[str(source.path)],
        )
    # Values the hook took from the module itself (its meta or deferred tensors: they share
    # their storage, state_dict() detaches): loading them would copy the module's values
    # into itself; they are left to the module. Other meta tensors hold no values.
    # (the module's own at that very key: another key's tensor, a slice or a clone is not).
    # A real one too: load_state_dict copies it into itself, after the keys before it, so a
    # tie's other name loaded from the file stays (a fifth look: read before the load, the
    # tied head kept its starting values, 2.24 off, on an eager model).
    own = frozenset(
        k for k, v in state.items() if isinstance(v, torch.Tensor) and places.get(k) == _place(v)
    )
    metas = {k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_meta}
    made = sorted(metas - own)
    if made:
        raise MetaTensorError(
            f"{hook} put meta tensors under {made} that are not the module's own tensor at "
            "that key (a tensor made on the module's device, meta here: torch.eye(n, "
            "device=self.head.weight.device), torch.zeros_like(self.head.bias); a clone; "
            "another key's tensor), which hold no values; eager construction gives them "
            "real ones. Fix: fill a key from the module's own tensor at that key "
            "(self.state_dict()[k], no clone), make real values on the CPU (torch.eye(n), "
            "torch.zeros(shape)), or load into a module built eagerly.",
            paths=made,
        )
    if own:
        state = {k: v for k, v in state.items() if k not in own}
    clashes: list[str] = []
    leaves, others = state_tensors(Path(source.path), state, clashes)
    out = TorchSource(
        Path(source.path),
        source.format,
        {k: (archive, v) for k, v in leaves.items()},
        others=others,
    )
    out.under_state_dict = True
    out.mapping = state
    out.clashes = dict.fromkeys(clashes, Path(source.path))
    out.versions = saved_versions(state)
    return Followed(out, hook, own)


def _saved_around(module: nn.Module, source: Source) -> str:
    """The prefix under which the file's keys name ``module``'s tensors (``model.``), if
    only under one: the file may have been saved from another module holding it, whose
    hook Lightning runs, not this one's; ``""`` otherwise."""
    from lightning_meta._load._match import detect_prefix

    try:
        return detect_prefix(source.entries, set(module.state_dict()), None)
    except MetaTensorError:  # no match (a hook renaming keys), or no one prefix
        return ""


_VERSION_KEY = "pytorch-lightning_version"


def _place(t: torch.Tensor) -> tuple[Any, ...]:
    """Where ``t`` lies: its storage, offset, shape and strides (``state_dict()`` detaches,
    and the detached tensor lies where the module's does)."""
    return (storage_id(t.untyped_storage()), t.storage_offset(), tuple(t.shape), t.stride())


def _migrated(module: nn.Module, checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """``checkpoint`` upgraded as ``load_from_checkpoint`` upgrades it before the hook
    (Lightning's ``_pl_migrate_checkpoint``, which also sets the version to the running
    one: a hook branching on it saw the file's before 2026-12-07, seventh session).

    Lightning is imported here only for a LightningModule, whose package is loaded already:
    the loading core pulls in no Lightning for anyone else.
    """
    package = next(
        c.__module__.split(".", 1)[0]
        for c in type(module).__mro__
        if c.__name__ == "LightningModule" and c.__module__.startswith(LIGHTNING_PACKAGES)
    )
    where = "lightning.pytorch" if package == "lightning" else "pytorch_lightning"
    utils = importlib.import_module(f"{where}.utilities.migration.utils")
    migrate = getattr(utils, "_pl_migrate_checkpoint", None)
    if migrate is None:
        raise MetaTensorError(
            f"load_checkpoint cannot follow {type(module).__name__}.on_load_checkpoint as "
            f"load_from_checkpoint does: {where}.utilities.migration.utils has no "
            "_pl_migrate_checkpoint (a Lightning this version of lightning_meta does not "
            "know). Fix: load with Lightning's load_from_checkpoint, or upgrade lightning_meta."
        )
    migrated: dict[str, Any] = migrate(checkpoint, checkpoint_path=path)
    return migrated


def _rebuilt(x: Any, read: dict[str, torch.Tensor], depth: int = 0) -> Any:
    """``x`` with its tensor references replaced by the tensors read (containers rebuilt, a
    state dict's ``_metadata`` kept, as ``torch.load`` gives them)."""
    if isinstance(x, TensorRef):
        return read[f"\0{id(x)}"]
    if depth >= 64:
        return x
    if isinstance(x, Mapping):
        out: dict[Any, Any] = OrderedDict() if isinstance(x, OrderedDict) else {}
        for k, v in x.items():
            out[k] = _rebuilt(v, read, depth + 1)
        versions = getattr(x, "_metadata", None)
        if versions is not None and isinstance(out, OrderedDict):
            out._metadata = versions  # type: ignore[attr-defined]
        return out
    if type(x) is list:
        return [_rebuilt(v, read, depth + 1) for v in x]
    if type(x) is tuple:
        return tuple(_rebuilt(v, read, depth + 1) for v in x)
    return x
