"""Estimate parameters, FLOPs and training memory of a model without allocating it.

:func:`estimate` runs in phases, each a function of its own: check the
options (:func:`~lightning_meta._estimate._options.resolve_options`), build
the module (:func:`_build`), normalise the inputs
(:func:`~lightning_meta._estimate._fake.inputs_of`), simulate the step on
fake tensors (:func:`simulate`, through :func:`fake_step` and
:func:`run_step`, extrapolated over identical blocks where it can be), and
assemble the result (:func:`~lightning_meta._estimate._result.assemble`).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_meta._arguments import build_on_meta, spelled
from lightning_meta._compat import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from lightning_meta._errors import (
    ArgumentTypeError,
    ArgumentValueError,
    MetaTensorError,
    MetaTensorWarning,
)
from lightning_meta._estimate._closed import estimate_modes, new_mode
from lightning_meta._estimate._fake import (
    fake_inputs,
    fake_state,
    input_names,
    input_text,
    inputs_of,
    meta_in_containers,
)
from lightning_meta._estimate._kept import built_by_estimate, module_kept
from lightning_meta._estimate._kernels import FakeKernelStricter, KernelRefusal
from lightning_meta._estimate._layout import Layout, layout_of
from lightning_meta._estimate._options import OptimizerLike, Options, resolve_options
from lightning_meta._estimate._parallel import resolve_parallel
from lightning_meta._estimate._ranks import RankStep
from lightning_meta._estimate._repeat import RANK_SAMPLES, SAMPLES, extrapolate_step, find_repeat
from lightning_meta._estimate._result import Estimate, ModuleEstimate, RankEstimate, assemble
from lightning_meta._estimate._run import StepRecord, default_loss, simulate_step, trace_forward
from lightning_meta._estimate._specs import InputSpec
from lightning_meta._estimate._values import IndexRefusal, Values
from lightning_meta._guard._check import own_configure_model

__all__ = ["Estimate", "InputSpec", "ModuleEstimate", "RankEstimate", "estimate"]


def _build(module_or_factory: Any) -> nn.Module:
    """Return the module, calling a factory under ``torch.device("meta")``.

    Raises:
        ArgumentTypeError: if ``module_or_factory`` is neither a module nor
            callable, or the factory returns something else than a module.
        MetaTensorError: if the factory fails.
    """
    if isinstance(module_or_factory, nn.Module):
        module = module_or_factory
        if own_configure_model(module) is None or any(_tensors_of(module)):
            return module  # configured already: Lightning's configure_model is idempotent
        # Layers built in configure_model (Lightning's pattern for large models),
        # not built yet: configured on a copy (of no tensors: cheap), on meta, so
        # the user's module is left as it was.
        try:
            module = copy.deepcopy(module)
        except Exception as e:
            raise _uncopyable(module, e) from e
    elif not callable(module_or_factory):
        raise ArgumentTypeError(
            f"estimate: expected an nn.Module or a factory returning one, got "
            f"{type(module_or_factory).__name__}. Fix: pass the module, its class, or a "
            "function that builds it."
        )
    else:
        module = build_on_meta(module_or_factory, "estimate: factory")
    configure = own_configure_model(module)
    if configure is not None:
        # What the Trainer does before the first step (before, the forward failed
        # on the missing layers, blamed on the model's code).
        def configured() -> nn.Module:
            configure()
            return module

        build_on_meta(configured, "estimate: configure_model")
    return built_by_estimate(module)


def _uncopyable(module: nn.Module, e: Exception) -> MetaTensorError:
    """Return the error for an unconfigured module that ``copy.deepcopy`` cannot copy,
    naming the first attribute it fails on."""
    culprit = None
    for path, sub in module.named_modules():
        for name, value in vars(sub).items():
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            try:
                copy.deepcopy(value)
            except Exception:
                culprit = f"{path}.{name}" if path else name
                break
        if culprit is not None:
            break
    what = f" (its attribute {culprit!r})" if culprit is not None else ""
    root = type(module).__name__
    return MetaTensorError(
        f"estimate: {root} builds its layers in configure_model and holds none yet, so "
        "estimate configures a deep copy of it (leaving the module for the Trainer to "
        f"configure), but the copy failed{what}: {type(e).__name__}: {e}. Fix: pass a "
        f"factory instead, estimate({root}) or estimate(lambda: {root}(...)), which "
        "estimate builds and configures itself, or call configure_model() before estimate.",
        paths=(culprit,) if culprit is not None else (),
    )


def _tensors_of(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _refuse_sparse(module: nn.Module) -> None:
    """Raise if ``module`` has layers whose weights get sparse gradients: the step's
    gradient of such a weight would be simulated dense (twice a real SGD step's peak on a
    large embedding, and ``torch.optim.SparseAdam`` refused)."""
    sparse = [
        path
        for path, mod in module.named_modules()
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag))
        and mod.sparse
        and mod.weight.requires_grad
    ]
    if sparse:
        raise MetaTensorError(
            f"estimate: {type(module).__name__} has layers with sparse gradients "
            f"({', '.join(repr(p) if p else 'the model itself' for p in sparse)}: nn.Embedding "
            "or nn.EmbeddingBag with "
            "sparse=True), which estimate does not simulate: their gradients would be counted "
            "as dense tensors of the weight's size, not the rows a step looks up. Fix: "
            "estimate a model built with sparse=False, whose step holds dense gradients "
            "instead, with an optimizer that takes them (Adam where the model's is "
            "SparseAdam, which refuses dense gradients), and read its gradient and optimizer "
            "terms as that.",
            paths=sparse,
        )


def _refuse_lazy(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise if ``module`` has lazy (uninitialised) parameters or buffers: no shape to simulate."""
    lazy = [
        name
        for named in (module.named_parameters, module.named_buffers)
        for name, t in named(remove_duplicate=False)
        if isinstance(t, (nn.UninitializedParameter, nn.UninitializedBuffer))
    ]
    if not lazy:
        return
    first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
    call = "model(...)"
    if first is not None:
        dtype = "" if first.dtype == torch.float32 else f", dtype={first.dtype}"
        call = f"model(torch.empty({', '.join(map(str, first.shape))}{dtype}))"
    shown = ", ".join(repr(n) for n in lazy[:3]) + (", ..." if len(lazy) > 3 else "")
    raise MetaTensorError(
        f"estimate: {type(module).__name__} has lazy parameters or buffers without a shape "
        f"yet ({shown}): a lazy module (nn.LazyLinear, nn.LazyConv2d, ...) infers them on its "
        "first forward, and estimate simulates a step of a model whose shapes are known. "
        "Fix: initialise them before estimate: in the factory, call the model once on an "
        f"input of the example's shape before returning it ({call}; under the factory's "
        "torch.device('meta') this allocates nothing); for a real module, call it on one batch "
        "first.",
        paths=lazy,
    )


@dataclass(frozen=True)
class FakeStep:
    """The fake tensors of one simulated step, all made under ``mode``.

    ``rank`` is one rank's step under a strategy (``None`` for one process);
    ``state`` is then what its forward computes with.
    """

    mode: FakeTensorMode
    state: dict[str, torch.Tensor]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    values: Values
    rank: RankStep | None = None


def fake_step(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: Options,
    layout: Layout | None = None,
) -> FakeStep:
    """Return a fresh ``FakeTensorMode`` with fakes of the module's state and of the inputs.

    Args:
        module: the model.
        args: the positional inputs, as :func:`inputs_of` returns them.
        kwargs: the keyword inputs, likewise.
        options: the checked options (device, precision).
        layout: one rank's layout under a strategy; ``None`` for one process.

    Returns:
        The :class:`FakeStep`.
    """
    mode = new_mode()
    cast_to = options.precision.cast_to
    values = Values()
    rank = RankStep(module, layout, mode, options.device, cast_to) if layout is not None else None
    # Together: a tensor given positionally and by keyword is one tensor.
    fake_args, fake_kwargs = fake_inputs(
        (args, kwargs), mode, options.device, cast_to, values, input_names(module, args, kwargs)
    )
    return FakeStep(
        mode=mode,
        state=rank.state if rank is not None else fake_state(module, mode, options.device, cast_to),
        args=fake_args,
        kwargs=fake_kwargs,
        values=values,
        rank=rank,
    )


def _dtype_fix(e: KernelRefusal, module: nn.Module, stage: str) -> str:
    """Return the fix for inputs a real kernel refuses for their dtype."""
    floats = [t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    model = str(max(set(floats), key=floats.count)).removeprefix("torch.") if floats else None
    if stage == "loss":
        return (
            "Fix: make loss_fn give the loss the dtypes it expects (class targets as int64, "
            "predictions and float targets in one floating dtype)"
        )
    integer = [d for d in e.dtypes if not (d.is_floating_point or d.is_complex)]
    kinds = f"{model} " if model else "floating point "
    if not integer and ("index" in e.reason.lower() or "indices" in e.reason.lower()):
        return (
            "Fix: pass integer ids (int64) where the model indexes with its inputs "
            "(e.g. the spec '8,16:int64')"
        )
    if integer:
        return (
            f"Fix: pass {kinds}inputs to this module, or integer ids only to an nn.Embedding "
            "(e.g. the spec '8,16:float32' rather than '8,16:int64')"
        )
    computes = f"the dtype the model computes in ({model})" if model else "one floating dtype"
    return (
        f"Fix: pass inputs of {computes}, and choose the training dtype with precision= "
        "(e.g. 'bf16-true', '64-true') rather than by casting the inputs"
    )


def _optimizer_option(names: str) -> str:
    """``names`` (Python's quoted spelling), or on the command line as ``--optimizer``."""
    return spelled(
        names,
        "--optimizer "
        + names.replace("'", "")
        .replace(" or ", " or --optimizer ")
        .replace(", ", ", --optimizer "),
    )


def _optimizer_fail(e: Exception, root: str, stage: str, name: str | None) -> ArgumentValueError:
    """Return the error for an optimizer that cannot be built or stepped in a simulated step.

    The optimizer is an option of ``estimate`` (``--optimizer`` on the command
    line), so this is an :class:`ArgumentValueError`, whatever the optimizer's
    own code raised.
    """
    which = f"optimizer {name}" if name else "optimizer"
    raised = f"{type(e).__name__}: {str(e).rstrip('. ')}"
    if isinstance(e, (DataDependentOutputException, DynamicOutputShapeException)):
        why = (
            "its step() reads the values of its own state or of the gradients (.item(), a "
            "data-dependent branch), which a shape-only run does not know; the model is not "
            "at fault"
        )
        fix = (
            "Fix: pass an optimizer whose step computes on tensors only, such as "
            + _optimizer_option("'adamw', 'adam', 'sgd' or 'sgd-momentum'")
        )
    elif isinstance(e, TypeError) and "closure" in str(e):
        why = (
            "its step() needs a closure that re-evaluates the model (several forward and "
            "backward passes per step, as LBFGS does), which estimate does not simulate"
        )
        fix = (
            "Fix: pass an optimizer whose step takes no closure, such as "
            + _optimizer_option("'adamw' or 'sgd'")
            + " (the estimate then lacks the closure's extra passes and the optimizer's own "
            "history)"
        )
    else:
        why = "it cannot be built or stepped on the model's parameters"
        fix = spelled(
            "Fix: pass an optimizer name, class or factory that accepts the parameters",
            "Fix: pass an --optimizer (a name such as adamw, or MODULE:CLASS) that accepts "
            "the parameters",
        )
    return ArgumentValueError(
        f"estimate: the {which} of {root} cannot be simulated (stage: {stage}): {why} "
        f"({raised}). {fix}."
    )


# what torch and models say when an input has the wrong shape or dtype
_INPUT_WORDS = re.compile(
    r"shape|size|dim|dtype|scalar type|type|expected|match|broadcast|unpack|ind(ex|ices)|channel"
    r"|length",
    re.IGNORECASE,
)


def _about_inputs(e: Exception) -> bool:
    """Whether ``e`` may come from inputs of the wrong shape or dtype (else: the model's code).

    A wrong call (``TypeError``) or a failed ``assert`` (models assert their
    input shapes) counts; an error of torch's or of a model's checks counts
    when it speaks of shapes, sizes, dimensions or dtypes. A ``KeyError`` or an
    ``AttributeError`` is the model's own.
    """
    if isinstance(e, (TypeError, AssertionError)):
        return True
    return isinstance(e, (RuntimeError, ValueError, IndexError)) and bool(
        _INPUT_WORDS.search(str(e))
    )


# torch's words when a kernel reads the values of a fake tensor (no storage):
# nn.LSTM's packed-sequence kernel reading its batch sizes.
_UNALLOCATED = "its data is not allocated yet"


def _inputs_option() -> str:
    """``example_inputs`` as its reader types it (``--input`` on the command line)."""
    return spelled("example_inputs", "--input")


# What Lightning's ModelParallelStrategy accepts (its accelerator connector's check).
_MODEL_PARALLEL_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")


def _device_mismatch(e: Exception) -> bool:
    """Whether ``e`` is the fake mode's refusal of tensors on two devices, meta one of them
    (torch 2.13's ``FakeTensorDeviceMismatchError``; torch 2.6's "Unhandled FakeTensor
    Device Propagation", a :class:`FakeKernelStricter` here)."""
    said = str(e) + str(getattr(e, "reason", ""))
    return type(e).__name__ == "FakeTensorDeviceMismatchError" or (
        isinstance(e, RuntimeError) and "meta" in said and "device" in said.lower()
    )


def _fail(
    e: Exception,
    module: nn.Module,
    record: StepRecord,
    inputs: str,
    layout: Layout | None = None,
    optimizer: str | None = None,
) -> MetaTensorError:
    """Return the error for exception ``e`` of a step, naming its stage, module and fix."""
    root = type(module).__name__
    where = [n for n in record.module_path if n]
    place = f" in module {where[-1]!r}" if where else ""
    if record.stage in ("optimizer", "optimizer step"):
        return _optimizer_fail(e, root, record.stage, optimizer)
    held = meta_in_containers(module) if _device_mismatch(e) else []
    if held:
        listed = ", ".join(repr(n) for n in held)
        fix = (
            f"The model keeps meta tensors inside plain attributes ({listed}: containers, "
            "dataclasses, other objects, or modules not registered as submodules): the "
            "factory ran under torch.device('meta'), and estimate gives stand-ins on the device to "
            "parameters, buffers and tensors held directly as attributes, not to tensors "
            "inside other objects. Fix: register each tensor as a buffer "
            "(self.register_buffer(name, t, persistent=False)) or hold it directly as an "
            "attribute, and each module as a submodule (nn.ModuleList instead of a list), or "
            "pass a model built on the device"
        )
        return MetaTensorError(
            f"estimate: the {record.stage} of {root}{place} failed on inputs {inputs}: "
            f"{type(e).__name__}: {str(e).rstrip('. ')}. {fix}.",
            paths=tuple(held),
        )
    if isinstance(e, FakeKernelStricter):
        return MetaTensorError(
            f"estimate: the {record.stage} of {root}{place} cannot be simulated: torch's "
            f"shape-only (fake) kernel of {e.op} refuses a call its real CPU kernel accepts "
            f"({e.inputs}): {e.reason.rstrip('. ')}. The inputs are not at fault (estimate's "
            f"inputs: {inputs}). Fix: estimate at a precision that kernel accepts (for "
            "aten._grouped_mm: precision='bf16-true'), or make the model compute this module "
            "with other operators (for transformers' mixture-of-experts layers: "
            "model.set_experts_implementation('batched_mm') in the factory, which is then "
            "the run estimated: another kernel with another peak, 4.2 times grouped_mm's "
            "on a tiny Mixtral in float32, so train with it too; 'eager' routes with "
            "data-dependent shapes, which a shape-only run cannot follow).",
            paths=where[-1:],
        )
    if isinstance(e, KernelRefusal):
        return MetaTensorError(
            f"estimate: the {record.stage} of {root}{place} would fail on a real device: "
            f"{e.op} refuses the dtypes of its tensors ({e.inputs}): {e.reason.rstrip('. ')} "
            f"(estimate's inputs: {inputs}). {_dtype_fix(e, module, record.stage)}.",
            paths=where[-1:],
        )
    if isinstance(e, IndexRefusal):
        return MetaTensorError(
            f"estimate: the {record.stage} of {root}{place} would fail on a real device: "
            f"{e.op}: {e.reason} (estimate's inputs: {inputs}). Fix: pass indices below "
            f"{e.size} (token ids within the vocabulary; a sequence no longer than the "
            f"model's positions), or a larger {'table' if e.op == 'aten.embedding' else 'tensor'}.",
            paths=where[-1:],
        )
    if isinstance(e, (DataDependentOutputException, DynamicOutputShapeException)) or (
        isinstance(e, RuntimeError) and _UNALLOCATED in str(e)
    ):
        fix = (
            "The model reads tensor values a shape-only run does not know: values computed "
            "from its weights or drawn at random (a data-dependent branch, .item() or an "
            "output whose shape depends on data; transformers' LayerDrop, in BART, Whisper "
            "and others, draws torch.rand([]) at every layer in training, even with "
            "layerdrop=0.0; an nn.LSTM, GRU or RNN fed a PackedSequence reads its batch "
            "sizes; F.ctc_loss sizes its buffers by the target lengths; a mixture of experts "
            "that gathers each expert's tokens by the router's choice, as litgpt's LLaMAMoE "
            "does, has shapes that depend on the weights); only the values of "
            "the inputs (zeros for inputs given by shape) and of what is computed from them "
            "and constants alone are known. Fix: make that code depend on shapes or inputs "
            "only (padded sequences rather than packed ones), or estimate the submodules "
            "around it (the layers themselves, for LayerDrop; the model without its loss, "
            "for a CTC loss)"
        )
    elif record.stage == "forward" and layout is not None and layout.tp_modules:
        fix = (
            f"Fix: pass {_inputs_option()} of the shapes and dtypes {root}.forward expects; under "
            f"tensor parallelism each rank runs the forward on its slice of the split layers "
            f"({len(layout.tp_modules)} of them), so the model must reshape with -1 (its local "
            "head count), not with the whole model's sizes, and the plan must pair column-wise "
            "layers with the row-wise ones that consume them"
        )
    elif record.stage == "forward" and not _about_inputs(e):
        fix = (
            f"Fix: this comes from the code of {root}{place}, not from the inputs' shapes or "
            "dtypes: fix that code (the exception and its traceback are chained as the "
            "cause) and check that one eager step runs"
        )
    elif record.stage == "forward":
        fix = f"Fix: pass {_inputs_option()} of the shapes and dtypes {root}.forward expects"
    elif record.stage == "loss":
        fix = "Fix: make loss_fn take the model's output and return a one-element tensor"
    else:
        fix = "Fix: check the model's backward pass"
    return MetaTensorError(
        f"estimate: the {record.stage} of {root}{place} failed on inputs {inputs}: "
        f"{type(e).__name__}: {str(e).rstrip('. ')}. {fix}.",
        paths=where[-1:],
    )


def run_step(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: Options,
    block_prefix: str | None = None,
    layout: Layout | None = None,
) -> tuple[dict[str, torch.Tensor], StepRecord]:
    """Simulate one training step of ``module``; return its fake state and what it measured.

    Args:
        module: the model (possibly cut to a few of its blocks).
        args: the positional inputs, as :func:`inputs_of` returns them.
        kwargs: the keyword inputs, likewise.
        options: the checked options.
        block_prefix: see :func:`~lightning_meta._estimate._run.simulate_step`.
        layout: one rank's layout under a strategy; ``None`` for one process.

    Returns:
        The fake parameters and buffers by name, and the step's record.

    Raises:
        MetaTensorError: if the model, the loss or the optimizer fails,
            naming the stage, the module and the inputs.
    """
    with module_kept(module):
        return _run_step(module, args, kwargs, options, block_prefix, layout)


def _run_step(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: Options,
    block_prefix: str | None,
    layout: Layout | None,
) -> tuple[dict[str, torch.Tensor], StepRecord]:
    """:func:`run_step` on a module whose own state the caller puts back."""
    fake = fake_step(module, args, kwargs, options, layout)
    record = StepRecord()
    root = type(module).__name__

    def where() -> str:
        path = record.module_path
        return (path[-1] or root) if path else f"{root} ({record.stage})"

    fake.values.where = where
    try:
        simulate_step(
            module,
            fake.state,
            fake.args,
            fake.kwargs,
            mode=fake.mode,
            device=options.device,
            loss_fn=options.loss_fn or default_loss,
            optimizer_factory=options.optimizer_factory,
            precision=options.precision,
            zero_grad_before_forward=options.zero_grad_before_forward,
            record=record,
            block_prefix=block_prefix,
            values=fake.values,
            rank=fake.rank,
        )
    except MetaTensorError:
        raise
    except Exception as e:
        raise _fail(
            e, module, record, input_text(fake.args, fake.kwargs), layout, options.optimizer_name
        ) from e
    record.zero_input_reads = list(fake.values.zero_reads)
    return fake.state, record


def _trace(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: Options,
    into: list[Any],
) -> None:
    """List the operators of the forward and loss of ``module`` into ``into`` (one process)."""
    with module_kept(module):
        fake = fake_step(module, args, kwargs, options)
        trace_forward(
            module,
            fake.state,
            fake.args,
            fake.kwargs,
            mode=fake.mode,
            device=options.device,
            loss_fn=options.loss_fn or default_loss,
            precision=options.precision,
            values=fake.values,
            into=into,
        )


def simulate(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: Options,
    layout: Layout | None = None,
) -> tuple[dict[str, torch.Tensor], StepRecord, str]:
    """Simulate the training step, extrapolated over identical blocks where that is exact.

    Args:
        module: the model.
        args: the positional inputs, as :func:`inputs_of` returns them.
        kwargs: the keyword inputs, likewise.
        options: the checked options.
        layout: one rank's layout under a strategy; ``None`` for one process.

    Returns:
        Stand-ins for the model's parameters and buffers, the step's record,
        and how it was simulated (:attr:`Estimate.method`).

    Raises:
        MetaTensorError: if the (full) step fails.
    """
    rep, why = find_repeat(module) if options.extrapolate else (None, "")
    samples = SAMPLES if layout is None else RANK_SAMPLES
    if rep is not None:
        found, why = extrapolate_step(
            rep,
            lambda prefix: run_step(module, args, kwargs, options, prefix, layout)[1],
            lambda into: _trace(module, args, kwargs, options, into),
            type(module).__name__,
            samples,
        )
        if found is not None:
            # the sample steps ran on a cut model; the full model's tensors are
            # only counted, so meta stand-ins serve
            state = fake_state(module, None, torch.device("meta"), options.precision.cast_to)
            sampled = ", ".join(map(str, samples))
            method = (
                f"{rep.name or 'the root'}: {rep.count} identical blocks, extrapolated exactly "
                f"from steps with {sampled} of them"
            )
            return state, found, method
    state, record = run_step(module, args, kwargs, options, layout=layout)
    return state, record, f"full step (not extrapolated: {why})" if why else "full step"


def _warn_untracked(module: nn.Module, record: StepRecord) -> None:
    """Warn, for the caller of ``estimate``, that some tensors are missing from the peak."""
    if record.untracked_tensors:
        warnings.warn(
            f"estimate: {record.untracked_tensors} sparse or nested tensors of "
            f"{type(module).__name__} have no single storage and are left out of peak_bytes.",
            MetaTensorWarning,
            stacklevel=3,  # the caller of estimate
        )


def _warn_rnn_workspace(module: nn.Module, record: StepRecord) -> None:
    """Warn, for the caller of ``estimate``, that nn.LSTM's oneDNN workspace is not counted."""
    if record.rnn_workspace_bytes > 0:
        warnings.warn(
            f"estimate: peak_bytes of {type(module).__name__} may be too low by up to "
            f"{record.rnn_workspace_bytes} bytes: nn.LSTM's oneDNN kernel on the CPU keeps a "
            "workspace for backward (62-86 bytes per time step, batch row and hidden unit, "
            "per layer and direction, by torch version) that its shape-only kernel reports "
            "as empty, so it is not in peak_bytes. Leave that much headroom (the bound is "
            "generous), or measure one real step.",
            MetaTensorWarning,
            stacklevel=3,  # the caller of estimate
        )


def _warn_scratch(module: nn.Module, record: StepRecord) -> None:
    """Warn, for the caller of ``estimate``, that kernel scratch may exceed the peak.

    Not for a possible excess of 5 % or less (within the peak's stated
    tolerance): oneDNN's blocked copies in a ResNet at batch 32 may add 0.5 %,
    and a warning on every such model would be one users learn to ignore.
    """
    over = record.scratch_bound_bytes - record.peak_bytes
    if over > record.peak_bytes // 20:
        kernels = "; ".join(record.scratch_kernels) or "a CPU kernel"
        warnings.warn(
            f"estimate: peak_bytes of {type(module).__name__} may be too low by up to "
            f"{over} bytes: CPU kernels allocate scratch memory inside themselves that a "
            f"shape-only run does not see, and its size is only bounded here ({kernels}): "
            "oneDNN's convolutions copy their input, output and weight into blocked layouts, "
            "the slow ones (float64, float16, a float32 batch of 1) hold im2col columns, the "
            "CPU flash attention per-thread blocks and copies of its inputs. Leave that much "
            "headroom (the bound is generous), or measure one real step.",
            MetaTensorWarning,
            stacklevel=3,  # the caller of estimate
        )


def _rank_of(
    module: nn.Module, layout: Layout, cast_to: torch.dtype | None, record: StepRecord
) -> RankEstimate:
    """Return what one rank holds of ``module`` under ``layout``."""
    parallel = layout.parallel
    numel = size = 0
    seen: set[int] = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = layout.held_numel(name)
        dtype = cast_to if cast_to is not None and p.is_floating_point() else p.dtype
        numel += n
        size += n * dtype.itemsize
    fsdp = parallel.strategy == "fsdp"

    def dtype_name(d: torch.dtype | None) -> str | None:
        return str(d).removeprefix("torch.") if d is not None else None

    return RankEstimate(
        strategy=parallel.strategy,
        world_size=parallel.world_size,
        data_parallel_size=parallel.data_parallel,
        tensor_parallel_size=parallel.tensor_parallel,
        activation_checkpointing=parallel.activation_checkpointing,
        reshard_after_forward=parallel.reshard_after_forward if fsdp else None,
        param_dtype=dtype_name(parallel.param_dtype),
        reduce_dtype=dtype_name(parallel.reduce_dtype),
        blocks=len(layout.blocks) if fsdp or parallel.activation_checkpointing else 0,
        blocks_found=layout.blocks_source,
        tensor_parallel_layers=len(layout.tp_modules),
        parameters=numel,
        parameter_bytes=size,
        forward_flops=record.rank_forward_flops,
        backward_flops=record.rank_backward_flops,
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
    strategy: str | None = None,
    world_size: int | None = None,
    tensor_parallel: int = 1,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool | None = None,
    mixed_precision: Any = None,
    blocks: str | type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
    tensor_parallel_plan: dict[str, str] | None = None,
    gradient_as_bucket_view: bool = False,
    backend: str | None = None,
    broadcast_buffers: bool = True,
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

    With a ``strategy``, the step is one rank's of a ``world_size``-rank run
    (rank 0's, the busiest): its share of parameters, gradients and optimizer
    state, its activations on its own batch, and the buffers the strategy's
    collectives allocate, when they allocate them. ``forward_flops`` and
    ``backward_flops`` are what ``FlopCounterMode`` counts on the real rank,
    which sees a tensor-parallel layer's ``DTensor`` operations at their
    unsplit size; what the rank itself computes is ``rank.forward_flops`` and
    ``rank.backward_flops`` (the same without tensor parallelism). No
    process is started and nothing is communicated (see
    :mod:`~lightning_meta._estimate._ranks` for what each strategy holds).

    Args:
        module_or_factory: an ``nn.Module`` (on meta, deferred, or even real:
            its tensor values are never read, and what its forward sets on
            it, a cache or a buffer, is put back afterwards), a
            ``LightningModule``, or a callable returning a module, called
            under ``torch.device("meta")``.
        example_inputs: the forward's inputs: one tensor, a tuple of positional
            inputs or a dict of keyword inputs, where each tensor may be real,
            meta, an :class:`InputSpec` or a ``"SHAPE:DTYPE"`` string such as
            ``"8,16:float32"`` (``"8,16"`` alone is ``float32``, as on the
            command line). ``None`` takes the module's
            ``example_input_array``. Under a strategy, one rank's batch (what
            its dataloader yields). Code that reads an input's value sees
            the real tensor's values, or zeros for one given by shape.
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
            count grows exactly linearly per block and the full model's
            forward runs the same operators as the cut one, its block and
            the stretch between two blocks repeated (the result is then the
            same as the full step's, in a fraction of the time); otherwise,
            or with ``False``, simulate the full model. ``method`` says which.
            Blocks that differ in an attribute, a tensor or a per-block
            ``config`` list (``config.layer_types``), a forward that skips
            blocks or runs other operators for some of them are simulated in
            full; code that only keeps some blocks' tensors alive longer
            (appends every sixth output to a list) runs no other operator and
            is not detected: pass ``False`` for such models.
        strategy: ``None`` (one process), ``"ddp"`` (Lightning's
            ``DDPStrategy``) or ``"fsdp"`` (FSDP2, ``fully_shard`` on every
            block and the root, as under Lightning's ``ModelParallelStrategy``;
            also ``"fsdp2"``, ``"model_parallel"``).
        world_size: the number of ranks, ``data_parallel x tensor_parallel``.
        tensor_parallel: ranks per tensor-parallel group (``"fsdp"`` only):
            the layers of ``tensor_parallel_plan`` are split over them.
        activation_checkpointing: checkpoint every block (non-reentrant, as
            ``checkpoint_wrapper`` does).
        reshard_after_forward: FSDP2's option for the blocks (default
            ``True``); the root is never resharded after forward, as FSDP2 does.
        mixed_precision: FSDP2's ``MixedPrecisionPolicy``: ``"bf16"`` (bf16
            parameters, gradients reduced in float32) or a pair
            ``(param_dtype, reduce_dtype)``.
        blocks: what FSDP2 wraps and activation checkpointing checkpoints one
            by one: a container's dotted name (``"model.layers"``) or block
            classes; default: the children of the longest ``ModuleList`` or
            ``Sequential`` of modules of one class.
        tensor_parallel_plan: module name patterns (``"model.layers.*.mlp.up_proj"``)
            to ``"colwise"``, ``"rowwise"``, ``"colwise_rep"`` (column-wise,
            output gathered) or ``"replicate"``, as given to torch's
            ``parallelize_module``; default: the plan transformers applies
            (the model's ``tp_plan``, else ``config.base_model_tp_plan``).
        gradient_as_bucket_view: DDP's option: gradients are views into its
            buckets instead of a second copy.
        broadcast_buffers: DDP's option (its default, and Lightning's, is
            ``True``): the buffers are broadcast from rank 0 before every
            forward, through one flat copy per bucket, which the peak counts;
            ``False`` for ``DDPStrategy(broadcast_buffers=False)``.
        backend: the process-group backend whose buffers are simulated:
            ``"nccl"`` (default; whatever ``device`` simulates the kernels) or
            ``"gloo"`` (CPU processes), which stages a copy of each
            all-gather and reduce-scatter buffer while it runs.

    Returns:
        An :class:`Estimate`; under a strategy its ``rank`` field says what the
        rank holds, and the step's fields are the rank's.

    Raises:
        ArgumentTypeError: if an argument has the wrong type: a
            ``module_or_factory`` that is neither a module nor callable, an
            ``example_inputs`` that is a module, set or iterator, a
            ``device``, ``precision``, ``optimizer``, ``loss_fn`` or
            ``depth`` of the wrong kind, a bad :class:`InputSpec`, or a
            strategy option of the wrong kind. Also a ``TypeError``.
        ArgumentValueError: if an argument has a value that cannot work: an
            unknown precision, optimizer name or ``loop``, a negative
            ``depth``, no inputs (``None`` and no ``example_input_array``),
            an input spec that does not parse or is larger than a tensor can
            be, a ``device`` that is ``meta``, unknown, or missing on this
            machine (checked before anything touches it); an unknown
            strategy, a ``world_size`` the ``(data, tensor)`` mesh cannot
            divide, a ``tensor_parallel`` that does not divide the model's
            heads or a split layer, tensor parallelism under DDP, strategy
            options without a strategy. Also a ``ValueError``.
        MetaTensorError: (the base of both) if the factory fails, the inputs
            do not fit the model (wrong rank or width), a real kernel would
            refuse the dtypes an operator of the forward or the loss gets
            (an ``int64`` input to a float ``nn.Linear``, say: fake kernels
            skip that check, so each distinct call is tried on tiny real
            tensors; the message names the operator, the module and the
            fix), the loss or optimizer cannot be used, or the model reads
            tensor values computed from its weights.

    Example::

        >>> import torch, lightning_meta as lm
        >>> from torch import nn
        >>> est = lm.estimate(lambda: nn.Linear(16, 4), "8,16:float32", optimizer="sgd")
        >>> est.parameters, est.forward_flops, est.backward_flops
        (68, 1024, 1024)
        >>> net = lambda: nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 16))
        >>> est = lm.estimate(net, "8,16:float32", strategy="fsdp", world_size=4)
        >>> est.parameters, est.rank.parameters, est.rank.data_parallel_size
        (2128, 532, 4)

    .. warning::
        The estimate counts tensor storage, as ``torch.cuda.memory_allocated``
        does, not allocator caching or fragmentation, CUDA context or library
        workspaces (NCCL's among them); leave headroom on a real device.
        Scratch that a CPU kernel allocates inside itself (oneDNN's
        convolutions' blocked copies of their operands, the im2col columns
        of slow convolutions, the CPU flash attention's blocks) is
        not seen either: where it could raise the peak, a
        :class:`MetaTensorWarning` names the kernel and module and bounds
        by how much ``peak_bytes`` may be too low. oneDNN's bfloat16
        matmuls on the CPU hold up to a few hundred KB of scratch per call,
        without a warning: a tiny bf16 model's real peak can be tens of
        percent higher, a large one's is not moved.
        Tensor values are never read, so models whose control flow depends
        on values computed from their weights cannot be estimated.
    """
    options = resolve_options(
        loss_fn=loss_fn,
        optimizer=optimizer,
        precision=precision,
        device=device,
        depth=depth,
        loop=loop,
        extrapolate=extrapolate,
    )
    parallel = resolve_parallel(
        strategy=strategy,
        world_size=world_size,
        tensor_parallel=tensor_parallel,
        activation_checkpointing=activation_checkpointing,
        reshard_after_forward=reshard_after_forward,
        mixed_precision=mixed_precision,
        blocks=blocks,
        tensor_parallel_plan=tensor_parallel_plan,
        gradient_as_bucket_view=gradient_as_bucket_view,
        backend=backend,
        broadcast_buffers=broadcast_buffers,
    )
    if (
        parallel is not None
        and parallel.strategy == "fsdp"
        and options.precision.name not in _MODEL_PARALLEL_PRECISIONS
    ):
        # Lightning's ModelParallelStrategy refuses them when the Trainer is built:
        # no run to estimate (a figure was printed for it before 2026-12-07).
        raise ArgumentValueError(
            f"estimate: precision {options.precision.name!r} does not run under "
            + spelled("strategy='fsdp'", "--strategy fsdp")
            + f" (Lightning's ModelParallelStrategy accepts {', '.join(_MODEL_PARALLEL_PRECISIONS)})."
            + " Fix: pass "
            + spelled("precision=", "--precision ")
            + "one of those, or "
            + spelled("strategy='ddp'", "--strategy ddp")
            + "."
        )
    # Out of the caller's inference mode: the fake state and the optimizer's are
    # made before the step (which turns gradients on itself, see _run._trainer_modes).
    with torch.inference_mode(False), estimate_modes():
        module = _build(module_or_factory)
        args, kwargs = inputs_of(module, example_inputs)
        _refuse_lazy(module, args, kwargs)
        _refuse_sparse(module)
        layout = layout_of(module, parallel) if parallel is not None else None
        state, record, method = simulate(module, args, kwargs, options, layout)
        _warn_untracked(module, record)
        _warn_scratch(module, record)
        _warn_rnn_workspace(module, record)
        cast_to = options.precision.cast_to
        rank = None
        if layout is not None:  # the model's own counts, not the rank's stand-ins
            state = fake_state(module, None, torch.device("meta"), cast_to)
            rank = _rank_of(module, layout, cast_to, record)
        return assemble(
            module,
            state,
            record,
            depth=options.depth,
            optimizer=options.optimizer_name,
            precision=options.precision.name,
            device=options.device,
            method=method,
            rank=rank,
        )
