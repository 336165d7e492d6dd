"""Stand-ins for what a simulated training step touches: the module's tensors and its inputs.

``estimate`` never reads a tensor value: parameters, buffers and inputs are
replaced by fake tensors of the same shape, dtype and aliasing on the target
device, created under the step's ``FakeTensorMode``. The inputs are first
normalised once per call (:func:`inputs_of`), the fakes made afresh for each
simulated step (:func:`fake_state`, :func:`fake_inputs`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lightning_meta._compat import FakeTensorMode, storage_id
from lightning_meta._deferred._handles import deferred_view_base
from lightning_meta._deferred._reach import MODULE_TABLES
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError
from lightning_meta._estimate._specs import InputSpec, describe_tensor, spec_of
from lightning_meta._estimate._values import Values
from lightning_meta._guard._find import find_meta_tensors

__all__ = [
    "fake_inputs",
    "fake_state",
    "input_names",
    "input_text",
    "inputs_of",
    "map_leaves",
    "meta_in_containers",
]

_FORMS = (
    "tensors, meta tensors, InputSpec(shape, dtype) or 'SHAPE:DTYPE' strings: one, a tuple "
    "of positional inputs or a dict of keyword inputs"
)


def map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """Apply ``leaf`` to every value in dicts, lists and tuples, rebuilding the containers.

    Named tuples are leaves: their constructor takes fields, not an iterable,
    and an :class:`InputSpec` is one.
    """
    return map_named_leaves(value, "", lambda v, _: leaf(v))


def map_named_leaves(value: Any, name: str, leaf: Callable[[Any, str], Any]) -> Any:
    """:func:`map_leaves`, giving ``leaf`` each value's path under ``name`` too:
    ``batch['attention_mask']``, ``pair[1]``."""
    if isinstance(value, Mapping):
        return {k: map_named_leaves(v, f"{name}[{k!r}]", leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(map_named_leaves(v, f"{name}[{i}]", leaf) for i, v in enumerate(value))
    return leaf(value, name)


def _spec_to_meta(value: Any) -> Any:
    spec = spec_of(value)
    return spec.to_meta() if spec is not None else value


def _check_form(example_inputs: Any) -> None:
    """Raise if ``example_inputs`` cannot be a forward's inputs, before anything runs."""
    if isinstance(example_inputs, nn.Module):
        raise ArgumentTypeError(
            f"estimate: example_inputs is a module ({type(example_inputs).__name__}). Fix: pass "
            f"the model first and its inputs second, estimate(model, inputs), with inputs as "
            f"{_FORMS}."
        )
    if isinstance(example_inputs, (set, frozenset, Iterator)):
        # a set has no order and an iterator is used up by the first of several steps
        raise ArgumentTypeError(
            f"estimate: example_inputs is a {type(example_inputs).__name__}. Fix: pass a tuple "
            f"or list of positional inputs, or a dict of keyword inputs: {_FORMS}."
        )
    if isinstance(example_inputs, Mapping):
        keys = [k for k in example_inputs if not isinstance(k, str)]
        if keys:
            raise ArgumentTypeError(
                f"estimate: the keys of a dict of example_inputs are the forward's keyword "
                f"names, got {keys[0]!r} ({type(keys[0]).__name__}). Fix: use the parameter "
                "names of forward as keys, or pass a tuple of positional inputs."
            )


def inputs_of(module: nn.Module, example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Normalise ``example_inputs`` into ``(args, kwargs)`` as ``ModelSummary`` does.

    Specs and ``'SHAPE:DTYPE'`` strings become meta tensors; other values stay.

    Args:
        module: the model; its ``example_input_array`` stands in for ``None``.
        example_inputs: one input, a tuple or list of positional inputs, or a
            dict of keyword inputs (see :func:`lightning_meta.estimate`).

    Returns:
        The positional and keyword inputs of the forward.

    Raises:
        ArgumentValueError: if there are no inputs (``None`` and no
            ``example_input_array``), a spec has a negative size, one larger
            than a tensor can be, or an unknown dtype.
        ArgumentTypeError: if ``example_inputs`` is a module, a set or an
            iterator, a dict with keys that are not strings, or holds a bad
            :class:`InputSpec`.

    Example::

        >>> inputs_of(nn.Linear(2, 2), ("4,2:float32", 3))
        ((tensor(..., device='meta', size=(4, 2)), 3), {})
    """
    if example_inputs is None:
        example_inputs = getattr(module, "example_input_array", None)
        if example_inputs is None:
            raise ArgumentValueError(
                f"estimate: no inputs for {type(module).__name__}: example_inputs is None and "
                "the module has no example_input_array. Fix: pass example_inputs (tensors, "
                "meta tensors, InputSpec(shape, dtype) or 'SHAPE:DTYPE' strings; --input "
                "SHAPE:DTYPE on the command line), or set self.example_input_array in the "
                "LightningModule."
            )
    _check_form(example_inputs)
    if isinstance(example_inputs, Mapping):
        args: tuple[Any, ...] = ()
        kwargs = dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)) and not isinstance(example_inputs, InputSpec):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    return map_leaves(args, _spec_to_meta), map_leaves(kwargs, _spec_to_meta)


def fake_state(
    module: nn.Module,
    mode: FakeTensorMode | None,
    device: torch.device,
    cast_to: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """Return stand-ins, on ``device``, for every parameter and buffer of ``module``.

    Tensors shared under several names (tied weights) get one shared stand-in,
    so the step sees the same aliasing as the real model. A plain tensor
    attribute viewing a parameter's or buffer's memory (``self.w_t =
    self.lin.weight.t()``) is that view of its stand-in, with its autograd link;
    one holding a meta tensor of its own (a factory's ``self.scale =
    torch.ones(8)``, built on meta) gets a stand-in of its own dtype, as
    ``module.to`` leaves it; a real one of its own is read as it is.

    Args:
        module: the model.
        mode: the step's ``FakeTensorMode``; ``None`` makes plain tensors on
            ``device`` (meta), enough where they are only counted, as for
            the result of an extrapolated step, whose steps ran on a cut model.
        device: the device of the stand-ins.
        cast_to: converts floating tensors the way ``module.to(dtype)`` would.

    Returns:
        The stand-ins by name, every name of a shared tensor included.
    """
    state: dict[str, torch.Tensor] = {}
    made: dict[int, torch.Tensor] = {}
    with mode if mode is not None else contextlib.nullcontext():
        for named in (module.named_parameters, module.named_buffers):
            for name, t in named(remove_duplicate=False):
                if id(t) not in made:
                    dtype = cast_to if cast_to is not None and t.is_floating_point() else t.dtype
                    made[id(t)] = _stand_in(t, dtype, device)
                state[name] = made[id(t)]
        # The parameter or buffer owning each storage, for plain attributes viewing one.
        owners: dict[int, torch.Tensor] = {}
        for named in (module.named_parameters, module.named_buffers):
            for _, t in named():
                owners.setdefault(storage_id(t.untyped_storage()), t)
        for name, t in _plain_tensors(module):
            if id(t) not in made:
                view = _viewed(t, owners)
                if view is not None and id(view[0]) in made and made[id(view[0])].dtype == t.dtype:
                    # self.w_t = self.lin.weight.t(): a view of the stand-in, so its bytes
                    # are the weight's and backward reaches the weight, as in a real run
                    made[id(t)] = _view_of_stand_in(t, *view, made[id(view[0])])
                elif t.is_meta:
                    # A factory's torch.ones(8) kept as a plain attribute: built on meta
                    # here, on the device in a real run. module.to() neither moves nor
                    # casts it (nor a view of a tensor it casts: memory of its own then).
                    made[id(t)] = _stand_in(t, t.dtype, device)
                else:
                    continue  # a real tensor of its own: the step reads it as it is
            state[name] = made[id(t)]
    return state


def _viewed(
    t: torch.Tensor, owners: dict[int, torch.Tensor]
) -> tuple[torch.Tensor, int, bool] | None:
    """The parameter or buffer whose memory ``t`` views, ``t``'s element offset from it, and
    whether ``t`` carries autograd history from it; ``None`` when it views none. A deferred
    model's tensors each have a meta storage of their own: its record knows the views."""
    deferred = deferred_view_base(t)
    if deferred is not None:
        return deferred
    owner = owners.get(storage_id(t.untyped_storage()))
    if owner is None or owner is t:
        return None
    return owner, int(t.storage_offset()) - int(owner.storage_offset()), t.grad_fn is not None


def _view_of_stand_in(
    t: torch.Tensor, owner: torch.Tensor, offset: int, graded: bool, stand_in: torch.Tensor
) -> torch.Tensor:
    """``t``, a view of ``owner``'s memory at element ``offset`` from it, as the same view of
    ``owner``'s stand-in; with ``t``'s autograd link to it where ``graded`` (``weight.t()``,
    not ``weight.detach().t()``)."""
    offset += int(stand_in.storage_offset())
    if graded and stand_in.requires_grad:
        with torch.enable_grad():
            return stand_in.as_strided(t.shape, t.stride(), offset)
    return stand_in.detach().as_strided(t.shape, t.stride(), offset)


def _plain_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(dotted name, tensor)`` for every plain tensor attribute of ``module`` and its
    submodules (neither a parameter nor a buffer)."""
    for path, sub in module.named_modules(remove_duplicate=False):
        for name, value in vars(sub).items():
            if name not in MODULE_TABLES and isinstance(value, torch.Tensor):
                yield (f"{path}.{name}" if path else name), value


def meta_in_containers(module: nn.Module) -> list[str]:
    """Return the dotted names of plain attributes of ``module`` (and its submodules) that
    hold meta tensors inside lists, tuples, sets, dicts, dataclasses, other objects or
    modules not registered as submodules, at any depth: no stand-in reaches inside them.
    (Read only when the step failed on a meta tensor.) The search is
    :func:`~lightning_meta.find_meta_tensors`'."""
    modules = {name for name, _ in module.named_modules()}
    found: list[str] = []
    for finding in find_meta_tensors(module):
        registered = finding.kind in ("parameter", "buffer") and not finding.hidden
        if registered or finding.kind == "template" or finding.escaped is not None:
            continue
        parts = finding.path.split(".")
        # The attribute after the deepest registered module on the path holds it.
        owner = max(i for i in range(len(parts)) if ".".join(parts[:i]) in modules)
        attribute = ".".join(parts[: owner + 1])
        if attribute == finding.path and not finding.hidden:
            continue  # a tensor held directly as an attribute: it has a stand-in
        if attribute not in found:
            found.append(attribute)
    return found


def _stand_in(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if t.is_contiguous():
        new = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device)
    else:
        new = torch.empty(t.shape, dtype=dtype, device=device)
    return nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


def input_names(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Name the inputs as the forward's signature does: ``mask`` for ``forward(self, x,
    mask)``'s second positional input, ``inputs[1]`` for ``forward(self, *inputs)``'s,
    ``args[1]`` where the signature cannot be read; then the keyword inputs' names."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C forward
        params = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names: list[str] = []
    for i in range(len(args)):
        p = params[i] if i < len(params) else None
        if p is not None and p.kind in positional:
            names.append(p.name)
            continue
        star = next((q for q in params if q.kind is inspect.Parameter.VAR_POSITIONAL), None)
        if star is not None and params.index(star) <= i:
            names.append(f"{star.name}[{i - params.index(star)}]")
        else:
            names.append(f"args[{i}]")
    return names + list(kwargs)


def fake_inputs(
    value: tuple[tuple[Any, ...], dict[str, Any]],
    mode: FakeTensorMode,
    device: torch.device,
    cast_to: torch.dtype | None,
    values: Values | None = None,
    names: list[str] | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Replace the tensors in ``value`` (as :func:`inputs_of` left it) by fakes on ``device``.

    Args:
        value: the positional and keyword inputs.
        mode: the step's ``FakeTensorMode``.
        device: the device of the fakes.
        cast_to: the dtype floating inputs are converted to (``*-true`` precisions).
        values: receives the value of each fake: the real input's, or zeros for
            an input given by shape (a spec or a meta tensor).
        names: the inputs' names (:func:`input_names`), positional then keyword,
            for ``values``' list of reads answered from zeros.

    Returns:
        ``value`` with every tensor replaced by a fake of its shape; a tensor given
        several times gets one fake (``mha(x, x, x)`` takes self-attention's path
        on ``query is key is value``, and the input's bytes are held once).
    """
    made_for: dict[int, torch.Tensor] = {}

    def fake(leaf: Any, name: str) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        if id(leaf) not in made_for:
            made_for[id(leaf)] = one(leaf, name)
        return made_for[id(leaf)]

    def one(leaf: torch.Tensor, name: str) -> torch.Tensor:
        dtype = cast_to if cast_to is not None and leaf.is_floating_point() else leaf.dtype
        with mode:
            if leaf.layout is not torch.strided or leaf.is_nested:
                made = torch.empty(leaf.shape, dtype=dtype, device=device)
            else:
                # the real input's strides (a transposed or expanded batch takes other
                # kernels and holds other bytes) and its requires_grad (the step then
                # also computes, and holds, the input's gradient); a cast, as
                # Lightning's precision makes it, keeps both as ``.to`` does
                made = torch.empty_strided(
                    leaf.shape, leaf.stride(), dtype=leaf.dtype, device=device
                )
                made.requires_grad_(leaf.requires_grad)
                if dtype != leaf.dtype:
                    made = made.to(dtype)
        if values is not None:
            values.give(made, leaf, name)
        return made

    args, kwargs = value
    if names is None:
        names = [f"args[{i}]" for i in range(len(args))] + list(kwargs)
    fake_args = tuple(map_named_leaves(a, n, fake) for a, n in zip(args, names, strict=False))
    fake_kwargs = {
        k: map_named_leaves(v, n, fake)
        for (k, v), n in zip(kwargs.items(), names[len(args) :], strict=False)
    }
    return fake_args, fake_kwargs


def input_text(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Return the inputs as an error message shows them: ``(float32[8, 16], mask=bool[8])``."""

    def one(v: Any) -> str:
        return describe_tensor(v) if isinstance(v, torch.Tensor) else type(v).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"
