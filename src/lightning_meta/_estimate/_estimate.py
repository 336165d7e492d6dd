"""Estimate parameters, FLOPs and training memory of a model without allocating it."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from lightning_meta._compat import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from lightning_meta._errors import MetaTensorError, MetaTensorWarning
from lightning_meta._estimate._options import (
    InputSpec,
    OptimizerLike,
    describe_tensor,
    make_optimizer_factory,
    resolve_precision,
    spec_of,
)
from lightning_meta._estimate._repeat import SAMPLES, extrapolate_step, find_repeat, shape_state
from lightning_meta._estimate._run import StepRecord, default_loss, fake_state, simulate_step

__all__ = ["Estimate", "InputSpec", "ModuleEstimate", "estimate"]


@dataclasses.dataclass(frozen=True)
class ModuleEstimate:
    """One row of the per-module table of an :class:`Estimate`.

    ``name`` is the dotted name from ``named_modules()`` (``""`` for the root),
    ``depth`` its number of components (0 for the root). FLOPs and bytes
    include those of the module's children.
    """

    name: str
    type: str
    depth: int
    parameters: int
    forward_flops: int
    backward_flops: int
    uncounted_flops: int
    activation_bytes: int


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What one training step of a model costs, as returned by :func:`estimate`.

    All counts are plain ``int`` (bytes, FLOPs, elements). ``forward_flops``
    and ``backward_flops`` are what :class:`torch.utils.flop_counter.FlopCounterMode`
    counts for the real model on the same device; ``uncounted_forward_flops``
    and ``uncounted_backward_flops`` hold the FLOPs of kernels it counts as 0
    (the CPU flash-attention kernel behind ``scaled_dot_product_attention``),
    never folded in. ``peak_breakdown`` splits ``peak_bytes`` by what the
    memory is held for at the moment of the peak; ``peak_phase`` says when
    that moment is (``forward``, ``backward`` or ``optimizer step``).
    ``method`` says how the step was simulated: in full, or for a stack of
    identical blocks, with a few of them and extrapolated exactly.
    """

    parameters: int
    trainable_parameters: int
    parameter_bytes: int
    parameters_by_dtype: dict[str, int]
    buffer_bytes: int
    forward_flops: int
    backward_flops: int
    loss_flops: int
    uncounted_forward_flops: int
    uncounted_backward_flops: int
    activation_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    input_bytes: int
    peak_bytes: int
    peak_breakdown: dict[str, int]
    peak_phase: str
    modules: tuple[ModuleEstimate, ...]
    optimizer: str | None
    precision: str
    device: str
    method: str = "full step"

    @property
    def flops(self) -> int:
        """Forward plus backward FLOPs of one step, as ``FlopCounterMode`` counts them."""
        return self.forward_flops + self.backward_flops

    def to_dict(self) -> dict[str, Any]:
        """Return the estimate as plain JSON-serialisable Python values."""
        out = dataclasses.asdict(self)
        out["modules"] = [dataclasses.asdict(m) for m in self.modules]
        return out


def _describe(obj: object) -> str:
    return str(getattr(obj, "__qualname__", None) or type(obj).__qualname__)


def _build(module_or_factory: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """Return the module, calling a factory under ``torch.device("meta")``."""
    if isinstance(module_or_factory, nn.Module):
        return module_or_factory
    if not callable(module_or_factory):
        raise MetaTensorError(
            f"estimate: expected an nn.Module or a factory returning one, got "
            f"{type(module_or_factory).__name__}. Fix: pass the module, its class, or a "
            "function that builds it."
        )
    name = _describe(module_or_factory)
    try:
        # meta as default device: parameters of model size never get storage
        with torch.device("meta"):
            module = module_or_factory()
    except MetaTensorError:
        raise
    except Exception as e:
        raise MetaTensorError(
            f"estimate: factory {name!r} failed under torch.device('meta'): "
            f"{type(e).__name__}: {e}. Fix: make the factory build the module without "
            "reading tensor values (no .item(), .tolist(), printing or data-dependent branches)."
        ) from e
    if not isinstance(module, nn.Module):
        raise MetaTensorError(
            f"estimate: factory {name!r} returned {type(module).__name__}, expected an "
            "nn.Module. Fix: return the module."
        )
    return module


def _inputs(
    module: nn.Module, example_inputs: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Normalise ``example_inputs`` into ``(args, kwargs)`` as ``ModelSummary`` does."""
    if example_inputs is None:
        example_inputs = getattr(module, "example_input_array", None)
        if example_inputs is None:
            raise MetaTensorError(
                f"estimate: no inputs for {type(module).__name__}: example_inputs is None and "
                "the module has no example_input_array. Fix: pass example_inputs (tensors, "
                "meta tensors, InputSpec(shape, dtype) or 'SHAPE:DTYPE' strings), or set "
                "self.example_input_array in the LightningModule."
            )
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)) and not isinstance(example_inputs, InputSpec):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _fake_inputs(
    value: Any, mode: FakeTensorMode, device: torch.device, cast_to: torch.dtype | None
) -> Any:
    """Replace tensors, specs and ``'SHAPE:DTYPE'`` strings by fake tensors on ``device``."""
    spec = spec_of(value)
    if spec is not None:
        value = spec.to_meta()
    if isinstance(value, torch.Tensor):
        dtype = cast_to if cast_to is not None and value.is_floating_point() else value.dtype
        with mode:
            return torch.empty(value.shape, dtype=dtype, device=device)
    if isinstance(value, Mapping):
        return {k: _fake_inputs(v, mode, device, cast_to) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_fake_inputs(v, mode, device, cast_to) for v in value)
    return value


def _input_text(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        return describe_tensor(v) if isinstance(v, torch.Tensor) else type(v).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _fail(e: Exception, module: nn.Module, record: StepRecord, inputs: str) -> MetaTensorError:
    root = type(module).__name__
    where = [n for n in record.module_path if n]
    place = f" in module {where[-1]!r}" if where else ""
    if isinstance(e, (DataDependentOutputException, DynamicOutputShapeException)):
        fix = (
            "the model reads tensor values (a data-dependent branch, .item() or an output "
            "whose shape depends on data), which a shape-only run cannot follow. Fix: "
            "make that code depend on shapes only, or estimate the submodules around it"
        )
    elif record.stage == "forward":
        fix = f"Fix: pass example_inputs of the shapes and dtypes {root}.forward expects"
    elif record.stage == "loss":
        fix = "Fix: make loss_fn take the model's output and return a one-element tensor"
    elif record.stage in ("optimizer", "optimizer step"):
        fix = "Fix: pass an optimizer name, class or factory that accepts the parameters"
    else:
        fix = "Fix: check the model's backward pass"
    return MetaTensorError(
        f"estimate: the {record.stage} of {root}{place} failed on inputs {inputs}: "
        f"{type(e).__name__}: {str(e).rstrip('. ')}. {fix}."
    )


def estimate(
    module_or_factory: nn.Module | Callable[[], nn.Module],
    example_inputs: Any = None,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: OptimizerLike = "adamw",
    precision: str | int = "32-true",
    device: str | torch.device = "cpu",
    depth: int = 2,
    loop: Literal["lightning", "plain"] = "lightning",
    extrapolate: bool = True,
) -> Estimate:
    """Estimate parameters, FLOPs and peak memory of one training step, allocating nothing.

    The step runs under :class:`~torch._subclasses.fake_tensor.FakeTensorMode`
    on ``device``: every operator sees tensors of the right shape, dtype and
    device (so dispatch, e.g. the attention backend, is the real model's),
    but no storage is allocated. FLOPs come from
    :class:`torch.utils.flop_counter.FlopCounterMode`; memory from following
    every storage the step creates and frees. The step is Lightning's
    automatic optimization in steady state: forward and loss, ``zero_grad``,
    backward, ``optimizer.step()``, with optimizer state and the previous
    step's gradients alive from the start.

    Args:
        module_or_factory: an ``nn.Module`` (on meta, deferred, or even real:
            its tensor values are never read), a ``LightningModule``, or a
            callable returning a module, called under ``torch.device("meta")``.
        example_inputs: the forward's inputs: one tensor, a tuple of positional
            inputs or a dict of keyword inputs, where each tensor may be real,
            meta, an :class:`InputSpec` or a ``"SHAPE:DTYPE"`` string such as
            ``"8,16:float32"``. ``None`` takes the module's
            ``example_input_array``.
        loss_fn: takes the model's output and returns the loss; default:
            ``output.loss`` when the model computes one, else the sum of its
            floating-point outputs.
        optimizer: ``"sgd"``, ``"sgd-momentum"``, ``"adam"``, ``"adamw"``, an
            ``Optimizer`` class, a callable taking the parameters, or ``None``
            for forward and backward only.
        precision: a Lightning precision name (``"32-true"``, ``"16-mixed"``,
            ``"bf16-mixed"``, ``"16-true"``, ``"bf16-true"``, ``"64-true"``).
        device: the device the model would train on; kernels are chosen for it.
        depth: how deep the per-module table in ``modules`` goes (root: 0).
        loop: ``"lightning"`` zeroes gradients after the forward pass, as
            Lightning does, so last step's gradients are alive during it;
            ``"plain"`` zeroes them before the forward pass.
        extrapolate: for a ``ModuleList`` or ``Sequential`` of at least 10
            identical blocks (a transformer's layers), simulate the step with
            2, 3 and 4 blocks and extrapolate to the full depth when every
            count grows exactly linearly per block (the result is then the
            same as the full step's, in a fraction of the time); otherwise,
            or with ``False``, simulate the full model. ``method`` says which.
            Blocks that differ in an attribute, a tensor or a per-block
            ``config`` list (``config.layer_types``) are simulated in full; a
            block whose forward branches on its index some other way is not
            detected: pass ``False`` for such models.

    Returns:
        An :class:`Estimate`.

    Raises:
        MetaTensorError: if the factory fails, the inputs do not fit the model
            (wrong rank or dtype), the loss or optimizer cannot be used, an
            option is unknown, or the model reads tensor values.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> est = estimate(lambda: nn.Linear(16, 4), "8,16:float32", optimizer="sgd")
        >>> est.parameters, est.forward_flops, est.backward_flops
        (68, 1024, 1024)

    .. warning::
        The estimate counts tensor storage, as ``torch.cuda.memory_allocated``
        does, not allocator caching or fragmentation, CUDA context or library
        workspaces; leave headroom on a real device. Tensor values are never
        read, so models whose control flow depends on data cannot be estimated.
    """
    prec = resolve_precision(precision)
    opt_name, opt_factory = make_optimizer_factory(optimizer)
    if loop not in ("lightning", "plain"):
        raise MetaTensorError(f"estimate: loop must be 'lightning' or 'plain', got {loop!r}.")
    dev = torch.device(device)
    if dev.type == "meta":
        raise MetaTensorError(
            "estimate: device='meta' picks kernels no real device runs (attention, for one). "
            "Fix: pass the device the model would train on, such as 'cpu' or 'cuda'."
        )
    if depth < 0:
        raise MetaTensorError(f"estimate: depth must be >= 0, got {depth}.")
    module = _build(module_or_factory)
    args, kwargs = _inputs(module, example_inputs)

    def run(block_prefix: str | None = None) -> tuple[dict[str, torch.Tensor], StepRecord]:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        state = fake_state(module, mode, dev, prec.cast_to)
        fargs = _fake_inputs(args, mode, dev, prec.cast_to)
        fkwargs = _fake_inputs(kwargs, mode, dev, prec.cast_to)
        record = StepRecord()
        try:
            simulate_step(
                module,
                state,
                fargs,
                fkwargs,
                mode=mode,
                device=dev,
                loss_fn=loss_fn or default_loss,
                optimizer_factory=opt_factory,
                precision=prec,
                zero_grad_before_forward=loop == "plain",
                record=record,
                block_prefix=block_prefix,
            )
        except MetaTensorError:
            raise
        except Exception as e:
            raise _fail(e, module, record, _input_text(fargs, fkwargs)) from e
        return state, record

    method = "full step"
    found: StepRecord | None = None
    rep, why = find_repeat(module) if extrapolate else (None, "")
    if rep is not None:
        found, why = extrapolate_step(rep, lambda prefix: run(prefix)[1], type(module).__name__)
        where = rep.name or "the root"
        if found is not None:
            sampled = ", ".join(map(str, SAMPLES))
            method = (
                f"{where}: {rep.count} identical blocks, extrapolated exactly from steps "
                f"with {sampled} of them"
            )
            state = shape_state(module, prec.cast_to)
            record = found
    if found is None:
        if why:
            method = f"full step (not extrapolated: {why})"
        state, record = run()
    if record.untracked_tensors:
        warnings.warn(
            f"estimate: {record.untracked_tensors} sparse or nested tensors of "
            f"{type(module).__name__} have no single storage and are left out of peak_bytes.",
            MetaTensorWarning,
            stacklevel=2,
        )
    return _result(module, state, record, depth, opt_name, prec.name, dev, method)


def _fill_containers(module: nn.Module, values: dict[str, int]) -> dict[str, int]:
    """Give modules that were never called (``ModuleList``, ``ModuleDict``) their children's sum."""
    out = dict(values)

    def visit(name: str, mod: nn.Module) -> int:
        total = 0
        for child_name, child in mod.named_children():
            total += visit(f"{name}.{child_name}" if name else child_name, child)
        if name not in out and total:
            out[name] = total
        return out.get(name, 0)

    visit("", module)
    return out


def _result(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    record: StepRecord,
    depth: int,
    optimizer: str | None,
    precision: str,
    device: torch.device,
    method: str,
) -> Estimate:
    unique = {id(t): t for t in state.values()}.values()
    params = [t for t in unique if isinstance(t, nn.Parameter)]
    by_dtype: dict[str, int] = {}
    for p in params:
        key = str(p.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + p.numel()
    forward = _fill_containers(module, record.forward_flops)
    backward = _fill_containers(module, record.backward_flops)
    uncounted = _fill_containers(
        module,
        {
            k: record.uncounted_forward.get(k, 0) + record.uncounted_backward.get(k, 0)
            for k in {*record.uncounted_forward, *record.uncounted_backward}
        },
    )
    activations = _fill_containers(module, record.module_activations)
    rows = []
    for name, mod in module.named_modules():
        level = 0 if not name else name.count(".") + 1
        if level > depth:
            continue
        rows.append(
            ModuleEstimate(
                name=name,
                type=type(mod).__name__,
                depth=level,
                parameters=sum(p.numel() for p in mod.parameters()),
                forward_flops=forward.get(name, 0),
                backward_flops=backward.get(name, 0),
                uncounted_flops=uncounted.get(name, 0),
                activation_bytes=activations.get(name, 0),
            )
        )
    return Estimate(
        parameters=sum(p.numel() for p in params),
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        parameter_bytes=sum(p.numel() * p.element_size() for p in params),
        parameters_by_dtype=by_dtype,
        buffer_bytes=sum(
            t.numel() * t.element_size() for t in unique if not isinstance(t, nn.Parameter)
        ),
        forward_flops=record.forward_flops.get("", 0),
        backward_flops=record.backward_flops.get("", 0),
        loss_flops=record.loss_flops,
        uncounted_forward_flops=record.uncounted_forward.get("", 0),
        uncounted_backward_flops=record.uncounted_backward.get("", 0),
        activation_bytes=record.activation_bytes,
        gradient_bytes=record.gradient_bytes,
        optimizer_state_bytes=record.optimizer_state_bytes,
        input_bytes=record.input_bytes,
        peak_bytes=record.peak_bytes,
        peak_breakdown=dict(record.peak_breakdown),
        peak_phase=record.peak_phase,
        modules=tuple(rows),
        optimizer=optimizer,
        precision=precision,
        device=str(device),
        method=method,
    )
