"""``load_state_dict`` hooks that let deferred modules be filled by plain torch and Lightning.

Loading a real tensor into a meta parameter with ``Module.load_state_dict``
is a silent no-op in torch (``meta.copy_(x)`` does nothing), which is why
``LightningModule.load_from_checkpoint`` and ``Trainer.fit(ckpt_path=...)``
cannot fill a deferred model by themselves. :func:`install_load_hooks`, called
by :func:`~lightning_meta.deferred_init` when its block ends, registers on
every module that owns deferred tensors:

- a pre-hook that gives each deferred tensor present in the state dict (with
  the right shape) real storage in the module's dtype, on the state dict
  tensor's device, just before torch copies the values into it; with
  ``assign=True`` it hands torch the wrapped state dict tensor itself so that
  tied weights stay one object;
- a post-hook that replays, exactly, every deferred tensor the state dict did
  not fill (non-persistent buffers, a new head).

The hooks are module-level functions, so modules stay picklable and
deep-copyable, and they do nothing once no deferred tensor is left.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_meta._deferred_record import HANDLES_ATTR, Handle

__all__ = ["install_load_hooks"]

_HOOKED_ATTR = "_lightning_meta_load_hooks"


def install_load_hooks(modules: Iterable[nn.Module]) -> None:
    """Register the load hooks on every module under ``modules`` that owns deferred tensors.

    Installing twice on one module is a no-op.

    Example::

        >>> import torch, lightning_meta as lm
        >>> net = lm.deferred_init(torch.nn.Linear, 2, 2)  # installs the hooks
        >>> _ = net.load_state_dict({"weight": torch.ones(2, 2), "bias": torch.zeros(2)})
        >>> net.weight.is_meta, net.weight.sum().item()
        (False, 4.0)
    """
    seen: set[int] = set()
    for top in modules:
        for mod in top.modules():
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            if not mod.__dict__.get(HANDLES_ATTR) or mod.__dict__.get(_HOOKED_ATTR):
                continue
            mod.register_load_state_dict_pre_hook(_fill_before_copy)
            mod.register_load_state_dict_post_hook(_replay_rest)
            mod.__dict__[_HOOKED_ATTR] = True


def _deferred_slots(module: nn.Module) -> list[tuple[str, str, bool, Handle, torch.Tensor]]:
    """Return ``(name, kind, persistent, handle, tensor)`` for the still-deferred tensors."""
    handles: dict[str, Handle] = module.__dict__.get(HANDLES_ATTR) or {}
    out: list[tuple[str, str, bool, Handle, torch.Tensor]] = []
    for name, handle in handles.items():
        current: torch.Tensor | None
        if name in module._parameters:
            kind, persistent, current = "param", True, module._parameters[name]
        elif name in module._buffers:
            persistent = name not in module._non_persistent_buffers_set
            kind, current = "buffer", module._buffers[name]
        else:
            kind, persistent, current = "attr", False, module.__dict__.get(name)
        if current is handle.tensor and current.is_meta:
            out.append((name, kind, persistent, handle, current))
    return out


def _put(module: nn.Module, kind: str, name: str, value: torch.Tensor) -> None:
    if kind == "param":
        module._parameters[name] = value  # type: ignore[assignment]
    elif kind == "buffer":
        module._buffers[name] = value
    else:
        module.__dict__[name] = value


def _wrap(old: torch.Tensor, data: torch.Tensor, handle: Handle) -> torch.Tensor:
    if isinstance(old, nn.Parameter):
        new: torch.Tensor = type(old)(data, requires_grad=old.requires_grad)
    else:
        new = data.requires_grad_(old.requires_grad) if old.requires_grad else data
    for key, value in handle.attrs.items():
        setattr(new, key, value)
    return new


def _fill_before_copy(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    if torch._C._len_torch_dispatch_stack() > 0:
        return  # inside FakeTensorMode or a deferred_init block: nothing real to fill
    assign = bool(local_metadata.get("assign_to_params_buffers", False))
    filled: list[str] = []
    for name, kind, persistent, handle, old in _deferred_slots(module):
        key = prefix + name
        value = state_dict.get(key)
        if not persistent or not isinstance(value, torch.Tensor) or value.is_meta:
            continue
        if value.shape != old.shape:
            continue  # torch reports the mismatch; the tensor stays deferred
        ref = handle.record.materialized.get(handle.vid)
        new = ref() if ref is not None else None
        if new is None:
            if assign:
                # torch assigns state_dict[key]; make it the wrapped tensor so a
                # tie's other end (below, via `materialized`) gets the same object.
                new = _wrap(old, value.detach(), handle)
            else:
                # Only storage: torch's own copy_ fills it right after this hook,
                # with its shape checks and dtype conversion.
                new = _wrap(old, torch.empty_like(old, device=value.device), handle)
            handle.record.materialized[handle.vid] = weakref.ref(new)
        if assign:
            state_dict[key] = new
        _put(module, kind, name, new)
        filled.append(name)
    if filled:
        from lightning_meta._deferred import forget

        forget(module, filled)


def _replay_rest(module: nn.Module, incompatible_keys: Any) -> None:
    if torch._C._len_torch_dispatch_stack() > 0:
        return
    rest = [name for name, *_ in _deferred_slots(module)]
    if not rest:
        return
    from lightning_meta._deferred import materialize_names

    owned = (*module._parameters.values(), *module._buffers.values())
    real = [t for t in owned if t is not None and not t.is_meta]
    device = real[0].device if real else None
    materialize_names(module, rest, device=device)
