"""Materialize a deferred model where a strategy needs it: whole, shard by shard, or unit by unit.

Torch only; the Lightning callback in ``_guard`` decides when to call these.
The sequence (torchtitan's meta -> shard -> materialize) is:

1. refuse meta parameters and buffers that were never deferred
   (:func:`refuse_strays`), before anything is allocated;
2. replay the deferred tensors that are plain tensors on the root device
   (:func:`materialize_model`);
3. for parameters ``fully_shard`` (FSDP2) turned into meta ``DTensor``\\ s:
   allocate only the local shards (``empty_like`` on meta tensors only, so
   real weights are never touched), then replay each full tensor in turn and
   copy this rank's shard out of it. Peak memory is the shards plus one full
   tensor.

For FSDP1 (``strategy="fsdp"``), torch materializes a wrapped unit at a time
through ``param_init_fn``; :func:`fsdp_param_init_fn` replays the deferred
tensors of each module it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lightning_meta import _compat
from lightning_meta._deferred._handles import (
    Handle,
    deferred_slots,
    drop,
    handle_of,
    handles_of,
    lone_module,
)
from lightning_meta._deferred._materialize import materialize, materialize_paths
from lightning_meta._errors import MetaTensorError
from lightning_meta._guard._find import MetaFinding, explain, find_meta_tensors
from lightning_meta._slots import buffer_names, parameter_names, tensor_at

__all__ = ["fsdp_param_init_fn", "materialize_model", "refuse_strays"]

logger = logging.getLogger(__name__)

REACHES = (
    "Lightning would fail on them when it moves the model to the device, wraps it for "
    "distributed training, builds the optimizer or saves a checkpoint; forward fails on "
    "any of them it uses (a plain tensor attribute is not moved by Lightning either)."
)


# What LightningModule.save_hyperparameters keeps: copied into checkpoints (which
# MetaGuard checks when they are saved), never computed with by forward.
HYPERPARAMETERS = frozenset({"_hparams", "_hparams_initial"})


def strays(module: nn.Module) -> list[MetaFinding]:
    """Return the meta tensors of ``module`` that no replay can fill and training would touch.

    Parameters, buffers and plain tensor attributes of the module tree (forward
    uses those as data). Modules held outside the tree in a plain container
    (``self.templates = [net]``) are left alone: Lightning never sees them, and
    ``torch.func.functional_call`` runs them with real tensors.
    """
    return [
        f
        for f in find_meta_tensors(module)
        if f.kind in ("parameter", "buffer", "attribute")
        and not f.deferred
        and not f.hidden
        and f.path.split(".", 1)[0] not in HYPERPARAMETERS
    ]


def refuse_strays(module: nn.Module, owner: str | None = None) -> None:
    """Raise :class:`MetaTensorError` naming every meta parameter or buffer that was not deferred."""
    found = strays(module)
    if found:
        raise explain(found, owner or type(module).__name__, REACHES)


def materialize_model(
    module: nn.Module,
    device: torch.device,
    *,
    on_device: frozenset[int] = frozenset(),
) -> int:
    """Materialize every deferred tensor of ``module`` on ``device``; return how many.

    Args:
        module: the model, possibly with parameters sharded by ``fully_shard``.
        device: the root device of this process.
        on_device: ``id``\\ s of deferred tensors built directly on ``device``
            (in ``configure_model`` under Lightning's device context); they
            are replayed with that device's generator, like eager construction
            there. Others are drawn on the CPU and moved, like a model built
            in ``__init__`` and moved by Lightning.
    """
    refuse_strays(module)
    # Sharded ones first: materializing the plain ones drops every handle
    # whose slot now holds another tensor (the DTensors) as stale.
    sharded = list(_sharded_slots(module))
    if sharded:
        _allocate_shards(module, device)
        for owner, name, handle in sharded:
            _fill_shard(owner, name, handle, device)
    count = len(sharded)
    plain = deferred_slots(module)
    for draw_on in ("cpu", "device"):
        names = [s.path for s in plain if (id(s.tensor) in on_device) == (draw_on == "device")]
        if names:
            materialize_paths(module, names, device=device, draw_on=draw_on)
            count += len(names)
    logger.debug("MetaGuard materialized %d deferred tensors on %s", count, device)
    return count


def _sharded_slots(module: nn.Module) -> Iterator[tuple[nn.Module, str, Handle]]:
    """Yield the deferred parameters that ``fully_shard`` replaced by meta DTensors."""
    for mod in module.modules():
        for name, handle in handles_of(mod).items():
            t = tensor_at(mod, name)
            if (
                t is not None
                and t is not handle.tensor
                and t.is_meta
                and type(t).__name__ == "DTensor"
                and tuple(t.shape) == tuple(handle.tensor.shape)
            ):
                yield mod, name, handle


def _allocate_shards(module: nn.Module, device: torch.device) -> None:
    # Module.to_empty() on the root would also replace every *real* tensor
    # with uninitialised memory (the damage Lightning's materializer does);
    # only meta DTensors (the local shards) are allocated here, deferred plain
    # tensors are replayed afterwards. FSDPModule._apply re-registers its
    # sharded parameters afterwards, as it does for to_empty().
    def empty_if_meta(t: torch.Tensor) -> torch.Tensor:
        if t.is_meta and type(t).__name__ == "DTensor":
            return torch.empty_like(t, device=device)
        return t

    _compat.apply_to_tensors(module, empty_if_meta)


def _fill_shard(owner: nn.Module, name: str, handle: Handle, device: torch.device) -> None:
    from torch.distributed.tensor import DTensor

    full = _replay_one(name, handle, device)
    target = tensor_at(owner, name)
    if not isinstance(target, DTensor):
        raise MetaTensorError(
            f"MetaGuard expected a sharded DTensor at {type(owner).__name__}.{name} after "
            "allocating shards, found "
            f"{type(target).__name__}. Fix: apply fully_shard to the deferred model before "
            "MetaGuard materializes it (in configure_model), and do not replace its parameters.",
            paths=[name],
        )
    # Every rank replayed the same full tensor: each slices its own shard.
    local = _compat.local_shard(full, target.device_mesh, target.placements)
    with torch.no_grad():
        target.to_local().copy_(local)
    drop(owner, name, handle)


def _replay_one(name: str, handle: Handle, device: torch.device) -> torch.Tensor:
    """Replay one deferred tensor, full size, through a scratch module holding only it."""
    scratch = lone_module(name, handle)
    materialize(scratch, device=device)
    out = tensor_at(scratch, name)
    if out is None or out.is_meta:  # materialize raises first; this guards the invariant
        raise MetaTensorError(f"materialize left {name!r} on meta", paths=[name])
    return out.detach()


def fsdp_param_init_fn(device: torch.device) -> Callable[[nn.Module], None]:
    """Return a ``param_init_fn`` for torch's ``FullyShardedDataParallel`` (FSDP1).

    FSDP1 calls it on each module of a unit that holds meta tensors, right
    before flattening and sharding that unit; it replays the module's own
    deferred tensors on ``device`` and refuses any other meta tensor (which
    FSDP would otherwise ``reset_parameters()`` into different values).
    """

    def init(module: nn.Module) -> None:
        tensors = {
            n: tensor_at(module, n) for n in (*parameter_names(module), *buffer_names(module))
        }
        own = [n for n, t in tensors.items() if t is not None and t.is_meta]
        own += [n for n in handles_of(module) if n not in own]
        held = {n: tensor_at(module, n) for n in own}
        deferred = [n for n, t in held.items() if t is not None and handle_of(t) is not None]
        if len(deferred) != len([n for n, t in held.items() if t is not None and t.is_meta]):
            refuse_strays(module)
        if deferred:
            materialize_paths(module, deferred, device=device)

    return init
