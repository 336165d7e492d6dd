"""Ensembles: N same-shaped modules as stacked real tensors plus one meta template."""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from copy import deepcopy
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from lightning_meta._compat import (
    FakeTensor,
    active_fake_mode,
    apply_to_tensors,
    backward_hooked,
    children_of,
    compiler_disabled,
    default_device,
    dispatch_mode_active,
    functorch_transform_active,
    global_module_hooks,
    has_backward_hooks,
    has_module_hooks,
    has_tensor_hooks,
    hook_registrations,
    hook_reparametrised,
    is_dtensor,
    made_at_level,
    module_apply,
    non_persistent_of,
    parametrize_cache,
    structure_of,
    tensor_tables,
    to_memory_format,
    transform_level,
    tree_flatten,
    tree_leaves,
    tree_map,
    tree_map_only,
    tree_unflatten,
    version_of,
)
from lightning_meta._ensemble._fused import (
    FusedPlan,
    NotFusableError,
    Refusal,
    draws,
    draws_in_forward,
    plan_fused,
)
from lightning_meta._ensemble._grads import GradBuffers
from lightning_meta._ensemble._grouped import DROPOUTS, GroupedPlan, LayoutLog, NotGroupableError
from lightning_meta._ensemble._lookups import PaddedLookupError, PaddedLookupWatch
from lightning_meta._ensemble._loop import (
    MemberShells,
    MemberSlots,
    Reassigned,
    ViewCache,
    changed_in_place,
    check_no_draw,
    check_output_leaves,
    join_outputs,
    replay_rng,
    restack,
    rng_states,
    run_loop,
    separate_views,
    write_back,
)
from lightning_meta._ensemble._members import (
    Profile,
    SharedTensors,
    changed_since,
    compare,
    held_outside,
    slice_strides,
)
from lightning_meta._ensemble._plan import (
    PlanCache,
    PlanRecord,
    channels_last,
    fast_key,
    measure,
    signature,
    untimed_reason,
)
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError, MetaTensorError
from lightning_meta._forward_state import (
    AttributeState,
    GlobalRandom,
    StateWrittenError,
    among,
    carry_state,
    global_draw_error,
    state_written_error,
    tensor_ids,
    watched,
)
from lightning_meta._settings import differs, plain_value
from lightning_meta._slots import named_tensors, slot_at
from lightning_meta._template._template import (
    CHECKPOINTING_OFF,
    CheckpointingRefused,
    MetaTemplate,
    copy_module,
    ensembles_in,
    hook_objects_copied,
)
from lightning_meta._watched import holds_values

__all__ = ["Ensemble"]

# torch.backends.mha's fast-path switch is one flag for the process: vmap
# calls of several ensembles (threads) count themselves in and out, so that one
# leaving does not turn it back on under another still running.
_ATTENTION_LOCK = threading.Lock()
_attention_users = 0
_attention_was_on = False


@contextlib.contextmanager
def _standard_attention() -> Iterator[None]:
    """Run the body with torch's eval fast path of attention off (``torch.backends.mha``).

    Under vmap the stacked parameters report no ``requires_grad``, so
    ``nn.MultiheadAttention`` and the transformer layers would take their
    fused eval kernels, which the members (whose parameters require grad)
    do not take and which have no derivative. The switch is process-wide:
    other code running attention in another thread meanwhile takes the
    standard path too (the same function, rounded otherwise).
    """
    global _attention_users, _attention_was_on
    with _ATTENTION_LOCK:
        if _attention_users == 0:
            _attention_was_on = torch.backends.mha.get_fastpath_enabled()
            if _attention_was_on:
                torch.backends.mha.set_fastpath_enabled(False)
        _attention_users += 1
    try:
        yield
    finally:
        with _ATTENTION_LOCK:
            _attention_users -= 1
            if _attention_users == 0 and _attention_was_on:
                torch.backends.mha.set_fastpath_enabled(True)


logger = logging.getLogger(__name__)

Execution = Literal["auto", "fused", "grouped", "vmap", "loop"]
Randomness = Literal["different", "same", "error"]
_EXECUTIONS = ("auto", "fused", "grouped", "vmap", "loop")
_RANDOMNESS = ("different", "same", "error")


def _slicer(start: int, stop: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x[start:stop]``, or ``x[start]`` when ``stop`` is None, along dim 0."""
    if stop is None:
        return lambda x: x[start]
    return lambda x: x[start:stop]


def _check_member_inputs(inputs: tuple[Any, ...], kwargs: Mapping[str, Any], n: int) -> None:
    """Refuse a tensor input without one slice per member on dim 0 (``per_member_inputs=True``)."""
    named = [(f"input {i}", x) for i, x in enumerate(inputs)]
    named += [(f"keyword input {k!r}", v) for k, v in kwargs.items()]
    for where, value in named:
        for t in tree_leaves(value):
            if isinstance(t, torch.Tensor) and (t.dim() == 0 or t.shape[0] != n):
                raise ArgumentValueError(
                    f"Ensemble(per_member_inputs=True) of {n} members takes one slice per member "
                    f"on dim 0 of every tensor input, but {where} holds a tensor of shape "
                    f"{tuple(t.shape)}. Fix: stack the members' inputs on a new dim 0 "
                    "(torch.stack), or pass per_member_inputs=False to give every member the "
                    "same inputs."
                )


# Where a tensor leaf of a vmap output goes back (see Ensemble._vmap).
_BATCHED = object()


def _half_precision(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a stacked floating point tensor is 16-bit (bfloat16, float16)."""
    return any(t.is_floating_point() and t.itemsize == 2 for t in tensors.values())


def _refuse_meta_with_values(
    tensors: dict[str, torch.Tensor], inputs: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Raise if the stacked tensors are meta (deferred, or built on meta) and an input holds
    values: each plan computes on views of the stacked tensors, which deferred_init's watch
    does not see, and a CPU kernel given a meta weight and a real input returns
    uninitialised memory, without an error (meta inputs give a shape-only run)."""
    stacked = next(iter(tensors.values()), None)
    if stacked is None or not stacked.is_meta or active_fake_mode() is not None:
        return
    real = next((x for x in tree_leaves((inputs, kwargs)) if holds_values(x)), None)
    if real is None:
        return
    name = next(n for n, t in tensors.items() if t.is_meta)
    raise MetaTensorError(
        f"Ensemble got a real {real.device.type} input while its stacked tensors are on the "
        f"meta device ('stacked.{name}', {tuple(stacked.shape)}): built under "
        "lightning_meta.deferred_init (or on meta), it holds no values until "
        "lightning_meta.materialize, and computing would return uninitialised memory. Fix: "
        "materialize first; under MetaGuard, which materializes when the strategy is set up "
        "(after LightningModule.setup() and configure_model), call the ensemble from "
        "on_fit_start on, or call lightning_meta.materialize(module) where you need it "
        "earlier. To follow shapes without values, pass meta inputs.",
        paths=(f"stacked.{name}",),
    )


def _generator_argument(inputs: Any, kwargs: Any) -> bool:
    """Whether a call's arguments hold a random generator: ``torch.Generator``,
    ``random.Random``, or numpy's ``Generator``, ``RandomState`` or bit generator."""
    if not kwargs and all(isinstance(x, torch.Tensor) for x in inputs):
        return False  # the common call, checked without flattening
    return _holds_generator_eagerly(inputs, kwargs)


def _holds_generator(inputs: Any, kwargs: Any) -> bool:
    for leaf in tree_leaves((inputs, kwargs)):
        if isinstance(leaf, (torch.Generator, random.Random)):
            return True
        kind = type(leaf)
        if kind.__module__.startswith("numpy.random") and (
            hasattr(leaf, "bit_generator") or hasattr(leaf, "get_state") or hasattr(leaf, "state")
        ):
            return True
    return False


# Run eagerly under torch.compile: dynamo cannot trace an isinstance of
# random.Random ("RandomClassVariable() is not a constant"), which every compiled
# call with a keyword or non-tensor argument reached before 2026-12-07 (fifth session).
_holds_generator_eagerly = compiler_disabled(_holds_generator)


def _subclass_input(inputs: tuple[Any, ...], kwargs: Mapping[str, Any]) -> type | None:
    """The class of the first tensor input that is a subclass of ``torch.Tensor`` with a
    ``__torch_function__`` of its own (``None`` if none is): it sees every op of the
    members' forwards in the loop, but other ops (one batched matmul for all members) in
    the other plans, so its own results there are not the members'. ``nn.Parameter``,
    DTensors (tensor parallel) and fake tensors (an estimate) are the package's to run."""
    leaves = inputs if not kwargs else tree_leaves((inputs, dict(kwargs)))
    for x in leaves:
        kind = type(x)
        if (
            kind is not torch.Tensor
            and isinstance(x, torch.Tensor)
            and kind is not nn.Parameter
            and getattr(kind.__torch_function__, "__func__", None) is not _PLAIN_TORCH_FUNCTION
            and not is_dtensor(x)
            and not isinstance(x, FakeTensor)
        ):
            return kind
    return None


_PLAIN_TORCH_FUNCTION = getattr(torch.Tensor.__torch_function__, "__func__", None)


def _float16(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether the members compute in float16 (stacked float16 tensors, or autocast to it)."""
    first = next(iter(tensors.values()), None)
    if first is None:
        return False
    kind = first.device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16:
        return True
    return any(t.dtype == torch.float16 for t in tensors.values())


def _autocasting(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether autocast is on for the device of the stacked tensors."""
    first = next(iter(tensors.values()), None)
    return first is not None and torch.is_autocast_enabled(first.device.type)


class _Stacked(nn.Module):
    """Holds the stacked tensors of one submodule of the template.

    Reading them through ``__call__`` runs this module's forward pre-hooks, so
    reparametrisations that live in hooks (``torch.nn.utils.prune``, as used
    by Lightning's ``ModelPruning``) are applied before every forward.
    """

    def __init__(self, leaves: Sequence[str] = ()) -> None:
        super().__init__()
        self.leaves: tuple[str, ...] = tuple(leaves)

    def forward(self) -> dict[str, torch.Tensor]:
        return {leaf: getattr(self, leaf) for leaf in self.leaves}


def _refuse_uncopyable(member: nn.Module, index: int) -> None:
    """Refuse what the template cannot copy, naming the fix: TorchScript modules, and the
    weights the hooks of ``torch.nn.utils.spectral_norm`` / ``weight_norm`` / ``prune`` make."""
    if isinstance(member, torch.jit.ScriptModule):
        raise ArgumentTypeError(
            f"Ensemble member {index} is a TorchScript module ({type(member).__name__}), which "
            "cannot be copied to meta or called with stacked tensors. Fix: pass the modules "
            "before torch.jit.script (or compile the ensemble with torch.compile instead)."
        )
    inner = ensembles_in(member)
    if inner:
        where = ", ".join(repr(p) if p else "the member itself" for p in inner)
        raise ArgumentTypeError(
            f"Ensemble member {index} is or holds an Ensemble ({where}): an ensemble of "
            "ensembles is not supported, since the inner one runs its own members through "
            "stacked tensors that the outer one's stacked call cannot reach. Fix: make one "
            "Ensemble of all the inner members (Ensemble.from_factory(make, N * M)), or hold "
            "the inner modules as plain modules (nn.ModuleList) in each member.",
            paths=inner,
        )
    lazy = sorted(name for name, t in named_tensors(member).items() if nn.parameter.is_lazy(t))
    if lazy:
        raise ArgumentValueError(
            f"Ensemble member {index} has {lazy} not initialised yet (a lazy module such as "
            "nn.LazyLinear), so they have no shape to stack. Fix: run one forward on an "
            "example batch through every member before building the ensemble (or give the "
            "sizes: nn.Linear(in_features, ...) instead of nn.LazyLinear).",
            paths=lazy,
        )
    found = hook_reparametrised(member)
    if found:
        raise ArgumentValueError(
            f"Ensemble member {index} has {found} made by a hook of torch.nn.utils."
            "spectral_norm, weight_norm or prune: a tensor attribute the hook recomputes, "
            "with autograd history, which the ensemble's template cannot carry. Fix: use "
            "torch.nn.utils.parametrizations.spectral_norm / weight_norm instead (which torch "
            "recommends), and prune.remove() the members before building (prune the "
            "ensemble's stacked tensors instead, ensemble.stacked).",
            paths=found,
        )


def _refuse_sharded_holders(stacked: nn.Module) -> None:
    """Raise if FSDP2 sharded ``ensemble.stacked`` or holders in it, not the ensemble.

    The ensemble reads its stacked tensors from the holders, so FSDP2's units
    there do not see the members' computation: a unit whose forward never runs
    (``ensemble.stacked``, a holder of holders) leaves its shards ungathered
    (torch's DTensor errors), and a holder's unit under another (the ensemble
    sharded too) reshards right after the read, freeing the storage the
    members then compute on (torch's out-of-bounds storage error). A holder
    that is a root of its own ran, its tensors gathered from the first forward
    on (FSDP2 keeps a root's gathered after forward): sharding in name only.
    """
    units = [
        f"stacked.{name}" if name else "stacked"
        for name, module in stacked.named_modules()
        if _fsdp_unit(module)
    ]
    if units:
        raise ArgumentValueError(
            f"Ensemble cannot run: fully_shard was applied to {units}, inside the ensemble's "
            "holders of stacked tensors, which FSDP2 cannot shard apart from the members' "
            "computation (the ensemble reads the tensors there; the members compute "
            "elsewhere). Fix: call fully_shard on the Ensemble as a whole (or on a module "
            "holding it), not on ensemble.stacked or its submodules.",
            paths=units,
        )


def _fsdp_unit(module: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _sharded_call(
    tensors: dict[str, torch.Tensor], inputs: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> bool:
    """Whether the call computes on DTensors (tensor parallel: stacked tensors or inputs;
    FSDP2 around the ensemble gives plain ones): its plans are not timed, as each rank
    would time them apart, and the collectives of one rank's timed runs would wait for
    another's that run other plans, or no more (a hang)."""
    return any(is_dtensor(t) for t in tensors.values()) or any(
        is_dtensor(x) for x in (*inputs, *kwargs.values())
    )


def _refuse_member_shards(tensors: dict[str, torch.Tensor]) -> None:
    """Raise if a stacked tensor is a DTensor sharded over the members (dim 0), which the
    loop plan cannot split member by member (torch refuses unbind on a sharded dim)."""
    from torch.distributed.tensor import Shard

    split = sorted(
        name
        for name, t in tensors.items()
        if is_dtensor(t) and any(isinstance(p, Shard) and p.dim == 0 for p in t.placements)
    )
    if split:
        raise ArgumentValueError(
            f"Ensemble cannot run the loop plan: the stacked tensors {_named(split)} are "
            "DTensors sharded over the members (dim 0), and the loop takes each member's "
            "tensors whole. Fix: use execution='vmap', 'fused' or 'grouped', which compute "
            "on the sharded members (with randomness='different', their dropout masks are "
            "other draws than the loop's), or shard another dim of those tensors.",
            paths=split,
        )


def _channels_last(
    tensors: Mapping[str, torch.Tensor], inputs: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> bool:
    """Whether an input tensor, or a member's slice of a stacked tensor, is laid out
    channels_last (and not as contiguous): the members' outputs may then be too."""
    leaves = tree_leaves((inputs, dict(kwargs)))
    if any(isinstance(x, torch.Tensor) and channels_last(x) for x in leaves):
        return True
    return any(t.dim() > 1 and channels_last(t[0]) for t in tensors.values())


def _laid_out_as_stacked(out: Any) -> Any:
    """Lay each output tensor out in memory as the loop's ``torch.stack`` of the members' would be.

    The values are the same, the order in memory not always (the fused plan's
    transposed product, vmap moving the member dimension inward): a
    ``randn_like`` or dropout on the output then draws other numbers than on the
    loop's, and ``.view`` fails where the loop's output allows it.
    """
    if isinstance(out, torch.Tensor):  # most outputs: no pytree walk on every call
        return _stack_layout(out)
    return tree_map_only(torch.Tensor, _stack_layout, out)


def _stack_layout(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0 or t.is_contiguous():
        return t  # what stacking contiguous slices gives
    if t.dim() > 3:
        # torch.stack may give 3-D and larger slices a channels_last layout (a conv
        # member's output): stack them as the loop does.
        return torch.stack(t.unbind(0))
    return t.contiguous()  # what stacking 2-D or smaller slices gives, in one copy


def _refuse_padded_vmap(padded: list[str]) -> None:
    raise ArgumentValueError(
        f"Ensemble(execution='vmap', per_member_inputs=True) cannot run the nn.Embedding "
        f"layers with a padding_idx ({_named(padded)}): torch.vmap looks every member's own "
        "indices up in one flattened table, whose backward keeps only member 0's padding "
        "row out of the gradient, so the other members' padding rows would train. Fix: use "
        "execution='loop' (or 'auto', which does not pick vmap for them).",
        paths=padded,
    )


def _call_kind(
    training: bool, inputs: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[Any, ...]:
    """What a forward's control flow may depend on, without sizes (a new sequence length
    is the same kind of call): the mode, the inputs' structure, dtypes and dimensions, and
    their plain values."""
    leaves, spec = tree_flatten((inputs, dict(kwargs)))
    return (
        training,
        str(spec),
        tuple(
            (x.dtype, x.dim()) if isinstance(x, torch.Tensor) else _plain_kind(x) for x in leaves
        ),
    )


def _plain_kind(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str, type(None))) else type(value)


def _skipped_hooks(plan: str, backward_hooked: bool) -> str | None:
    """Which hooks ``plan`` would not run (``None``: none), to name in an error.

    The fused and grouped plans compute layers without calling them (they
    look for the template's own hooks on every call); vmap runs forward
    hooks but no backward hooks. A template with hooks of its own sends
    the fused and grouped plans to the loop; a forced fused plan with
    backward hooks is refused all the same, as it was when such a template
    went to vmap. ``backward_hooked``: whether the
    template has module backward hooks of its own (:class:`_HookCheck`).
    """
    forward, backward = global_module_hooks()
    if not torch.is_grad_enabled():
        # No backward runs (no_grad, inference_mode: validation): nothing to skip.
        backward = backward_hooked = False
    if plan in ("fused", "grouped") and (forward or backward):
        return "module hooks registered for every module (register_module_forward_hook and its kin)"
    if plan == "fused" and backward_hooked:
        return "backward hooks (register_full_backward_hook / register_full_backward_pre_hook)"
    if plan != "vmap":
        return None
    if backward:
        return (
            "module backward hooks registered for every module "
            "(register_module_full_backward_hook and its kin)"
        )
    if backward_hooked:
        return "backward hooks (register_full_backward_hook / register_full_backward_pre_hook)"
    return None


class _HookCheck:
    """Whether a template has module backward hooks, walked again only when it may have changed.

    A hook registered anywhere moves :func:`hook_registrations`; a different
    template module (a copy carries its hooks without registering them) is
    walked too. So every call sees a hook added since the last one, at the
    cost of one integer comparison when none was. Removing a hook moves
    nothing: a hooked template is walked on every call, until the walk
    finds no hook.
    """

    __slots__ = ("_hooked", "_module", "_stamp")

    def __init__(self) -> None:
        self._stamp = -1
        self._module: nn.Module | None = None
        self._hooked = False

    def __reduce__(self) -> tuple[type[_HookCheck], tuple[()]]:
        # The counter restarts in another process (ddp_spawn pickles the
        # model): a copy walks again on its first call.
        return (_HookCheck, ())

    def __call__(self, module: nn.Module) -> bool:
        stamp = hook_registrations()
        if self._hooked or stamp != self._stamp or module is not self._module:
            self._stamp, self._module = stamp, module
            self._hooked = has_backward_hooks(module)
        return self._hooked


def _sparse_gradients(template: nn.Module) -> list[str]:
    """Paths of the layers whose weights get sparse gradients (``nn.Embedding`` and
    ``nn.EmbeddingBag`` with ``sparse=True``), whose backward ``torch.vmap`` cannot batch
    (torch's "reshape is not implemented for sparse tensors")."""
    return [
        path
        for path, mod in template.named_modules()
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.sparse
    ]


_COMPILED_STATE = (
    "Ensemble cannot run under torch.compile a forward that keeps state in its "
    "modules' plain attributes (seen when its plans were timed): torch.compile "
    "runs every member through the one template, while each member keeps its "
    "own state. Fix: call the ensemble without torch.compile (compile the "
    "members' layers instead)."
)


def _ensemble_refuses_torch_compile_of_a_forward_keeping_state() -> None:
    raise ArgumentValueError(_COMPILED_STATE)


# Run eagerly: dynamo tracing a raise of this exception class failed with an
# AssertionError of its own (torch 2.11), which hid the message; under
# fullgraph=True dynamo refuses the call and shows the reason instead.
_refuse_compiled_state = compiler_disabled(
    _ensemble_refuses_torch_compile_of_a_forward_keeping_state, _COMPILED_STATE
)


def _convert_keeping_layout(
    fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor
) -> torch.Tensor:
    """What ``nn.Module.to``'s conversion ``fn`` makes of ``t``'s dtype and device, in ``t``'s
    own layout (the memory format it would apply is left to ``Ensemble._to_memory_format``)."""
    if t.dim() not in (4, 5):
        return fn(t)
    target = fn(t.new_empty(0))  # 1-D: converted without a memory format
    if (target.dtype, target.device) == (t.dtype, t.device):
        return t
    out = torch.empty_strided(t.shape, t.stride(), dtype=target.dtype, device=target.device)
    return out.copy_(t)


def _plain_settings(member: nn.Module, changed: Sequence[str]) -> dict[str, Any]:
    """The names among ``changed`` (:func:`changed_since` of ``member``) that are plain
    settings of a submodule (a number, string or container of them in its ``__dict__``,
    not its mode), with their values now."""
    out = {}
    for name in changed:
        path, _, key = name.rpartition(".")
        try:
            module = member.get_submodule(path)
        except AttributeError:
            continue
        value = module.__dict__.get(key, _NO_SETTING)
        if key != "training" and value is not _NO_SETTING and plain_value(value):
            out[name] = value
    return out


_NO_SETTING = object()


def _stacked_like(ref: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised memory for ``n`` members' copies of ``ref``, each member's slice laid
    out in memory as ``ref`` is (``channels_last``, a weight stored transposed).

    The loop plan runs every member on its slice: a contiguous slice of a
    ``channels_last`` convolution weight makes the convolution's output contiguous
    where the member's own is ``channels_last``, and a dropout after it then
    drops other elements than the member's with the same seed. The slice's strides
    are :func:`slice_strides`', which ``Ensemble`` also compares across members.
    """
    strides = slice_strides(ref)
    if strides is None:
        return torch.empty((n, *ref.shape), dtype=dtype, device=ref.device)
    return torch.empty_strided(
        (n, *ref.shape), (ref.numel(), *strides), dtype=dtype, device=ref.device
    )


def _recurrent_layers(template: nn.Module) -> list[str]:
    """Paths of the recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``, ``nn.LSTMCell``),
    which ``torch.vmap`` never runs: their kernels have no batching rule and no fallback
    ("We could not generate a fallback"), and on CUDA ``flatten_parameters`` reads the data
    pointer of vmap's weights, which have none (a raw ``RuntimeError`` where the CPU's names
    the rule). ``nn.GRUCell`` and ``nn.RNNCell`` run under vmap through torch's slow
    fallback: "auto" times them."""
    return [
        path for path, mod in template.named_modules() if isinstance(mod, (nn.RNNBase, nn.LSTMCell))
    ]


def _named(paths: list[str]) -> str:
    """``paths`` for a message: the template itself is the empty path."""
    return ", ".join(repr(p) if p else "the template itself" for p in paths)


def _holders(root: nn.Module, path: str = "") -> Iterator[tuple[str, _Stacked]]:
    """Every holder of stacked tensors under ``root`` (itself included), with its path.

    The ``parametrizations`` of a holder that ``torch.nn.utils.parametrize``
    reparametrised are its own business, not holders.
    """
    holder = _as_stacked(root, path)
    yield path, holder
    skip = "parametrizations" if parametrize.is_parametrized(holder) else None
    for name, child in holder.named_children():
        if name != skip:
            yield from _holders(child, f"{path}.{name}" if path else name)


def _as_stacked(module: nn.Module, path: str) -> _Stacked:
    if not isinstance(module, _Stacked):
        raise MetaTensorError(
            f"Ensemble.stacked.{path} is a {type(module).__name__}, not a holder of stacked "
            "tensors. Fix: do not register modules under `ensemble.stacked`.",
            paths=[f"stacked.{path}"],
        )
    return module


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# The layers that draw through a dropout's kind, and all that may draw in their forward.
_DRAW_KINDS = (*DROPOUTS, nn.RReLU)
_MAY_DRAW = (
    *_DRAW_KINDS,
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
)


def _refuse_changed(
    path: str,
    module: nn.Module,
    cls: type[nn.Module],
    table: Mapping[str, nn.Module | None],
    built: Mapping[str, nn.Module | None],
) -> None:
    """Raise for the template's module at ``path`` if it is no more as built: another class,
    a child replaced or removed, or a child added to a container (see
    :meth:`_TemplateWalk.check_structure`)."""

    def kind(m: nn.Module | None, was: nn.Module | None = None) -> str:
        if m is None:
            return "none"
        if was is not None and type(was) is type(m):
            return f"another {type(m).__name__}"
        return f"a {type(m).__name__}"

    where = "template.module" + (f".{path}" if path else "")
    said: list[str] = []
    paths: list[str] = []
    if type(module) is not cls:
        said.append(f"{where} is now a {type(module).__name__} (was a {cls.__name__})")
        paths.append(where)
    added = isinstance(module, _CONTAINERS)
    for key in dict.fromkeys([*built, *table]):
        if built.get(key) is not table.get(key) and (key in built or added):
            said.append(
                f"{where}'s child {key!r} is now {kind(table.get(key), built.get(key))} "
                f"(was {kind(built.get(key))})"
            )
            paths.append(f"{where}.{key}")
    if not said:
        return
    raise ArgumentValueError(
        f"Ensemble's template changed after the ensemble was built: {'; '.join(said)}. "
        "Every plan is laid out for the template as built (the loop's copies of it, the "
        "grouped plan's trace, the fused plan's layers), so they would not agree with each "
        "other or with members built that way. Fix: build a new Ensemble from members that "
        "have the new submodules (settings such as a dropout's `p` may be changed on the "
        "template).",
        paths=paths,
    )


def _tie_pattern(module: nn.Module) -> dict[str, str]:
    """Every parameter's dotted name -> the first name of its tie group."""
    first: dict[int, str] = {}
    return {
        name: first.setdefault(id(p), name)
        for name, p in module.named_parameters(remove_duplicate=False)
    }


def _refuse_retied(built: Mapping[str, str], now: Mapping[str, str]) -> None:
    """Raise for template parameters whose names or ties differ from those built."""
    changed = [k for k in dict.fromkeys([*built, *now]) if built.get(k) != now.get(k)]
    raise ArgumentValueError(
        "Ensemble's template changed after the ensemble was built: its parameter"
        f"{'s' if len(changed) > 1 else ''} {', '.join(map(repr, changed))} "
        f"{'were' if len(changed) > 1 else 'was'} tied, untied, added or removed (as "
        "tie_weights() does). The loop's copies hold the parameters as built, while the plans "
        "that call the template reach the new ones, so they would not agree with each other "
        "or with members built that way. Fix: build a new Ensemble from members made that way "
        "(tie their weights before building it).",
        paths=[f"template.module.{k}" for k in changed],
    )


class _TemplateWalk:
    """What an ensemble's calls look up about its template's modules, walked once: their
    paths, whether one is an ``nn.MultiheadAttention``, the ``nn.TransformerEncoder`` ones,
    and (found again once a hook was registered anywhere) those whose forward may store
    state in plain attributes."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.paths: list[tuple[str, nn.Module]] = list(module.named_modules())
        self.attention = any(isinstance(m, nn.MultiheadAttention) for _, m in self.paths)
        self.encoders: list[tuple[str, nn.Module]] = [
            (p, m) for p, m in self.paths if isinstance(m, nn.TransformerEncoder)
        ]
        self._watched: tuple[int, list[tuple[str, nn.Module]]] | None = None
        self.modules = [m for _, m in self.paths]
        # By path, for the fused plan's layers: check_structure keeps them the template's.
        # Every path, a module used twice included (an activation at two places).
        self.by_path: dict[str, nn.Module] = dict(module.named_modules(remove_duplicate=False))
        # Every module's children as built (see check_structure). Not its table itself:
        # nn.Sequential's __delitem__ gives the module a new one.
        self._children = [
            (path, m, type(m), dict(children_of(m)), list(children_of(m).values()))
            for path, m in self.paths
        ]
        # And its parameters' ties as built (tie_weights() on the template replaces one),
        # compared when a parameter is another object than last seen (see _flatten).
        self._ties = _tie_pattern(module)
        self._flatten()
        # The modules whose settings decide, call by call, whether vmap would train padding
        # rows or the forward renormalises a table in place (padding_idx, max_norm), and
        # whether a call draws random numbers (a dropout's p, attention's dropout): settings
        # a user may change on the template between calls.
        self.embeddings = [
            (p, m) for p, m in self.paths if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        ]
        self.drawers = [m for _, m in self.paths if isinstance(m, _MAY_DRAW)]
        self._path_of = {id(m): p or "<root>" for p, m in self.paths}
        # The template's parameters and their requires_grad as last seen (see
        # Ensemble._follow_template_grads).
        self.parameters: list[tuple[str, torch.Tensor]] = list(module.named_parameters())
        self.grads_seen = self.grad_flags()
        # Their stacked tensors' names and flags as last seen (taken to agree with the
        # template's when the walk is made: the next call mirrors any that do not).
        self.stacked_names: list[str] | None = None
        self.stacked_seen = self.grads_seen
        self._described: dict[tuple[tuple[bool, ...], tuple[bool, ...]], str] = {}

    def check_structure(self) -> None:
        """Refuse a call after a submodule of the template was replaced, added or removed
        (``ensemble.template.module[1] = nn.Tanh()``, a parametrization registered).

        Every plan is laid out for the template as built: the loop's copies are made once,
        while the plans that call the template (``fused``, ``grouped``, ``vmap``) reach the
        new submodule, so the plans, and ``"auto"``'s choice among them, gave other numbers
        without an error. A child added to a module other than a container
        (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``, which run or hand out
        every child) is let be: the forward does not reach it unless its code names it.
        Parameters tied, untied, added or removed are refused likewise (:meth:`_check_ties`).

        Raises:
            ArgumentValueError: naming the changed children's or parameters' paths.
        """
        types, children, params = structure_of(self.modules)
        if (
            types == self._types
            and children == self._flat_children
            and len(params) == len(self._flat_params)
            and all(map(operator.is_, params, self._flat_params))
        ):
            return  # the common case: three flat lists, compared in C
        for i, (path, module, cls, built, seen) in enumerate(self._children):
            table = children_of(module)
            if type(module) is not cls or list(table.values()) != seen:
                _refuse_changed(path, module, cls, table, built)
                # A child added where the forward does not reach it: seen, not checked again.
                self._children[i] = (path, module, cls, built, list(table.values()))
        if len(params) != len(self._flat_params) or not all(
            map(operator.is_, params, self._flat_params)
        ):
            self._check_ties()
        self._flatten()

    def _flatten(self) -> None:
        """Note what :meth:`check_structure` compares first, flat: every module's class,
        children and parameters, as now."""
        self._types, self._flat_children, self._flat_params = structure_of(self.modules)

    def _check_ties(self) -> None:
        """Refuse a call after the template's parameters were renamed, added, removed, tied
        or untied; a parameter made anew in place of one (the package's own calls of the
        template may do so) is no change."""
        now = _tie_pattern(self.module)
        if now != self._ties:
            _refuse_retied(self._ties, now)

    def grad_flags(self) -> tuple[bool, ...]:
        """Every template parameter's ``requires_grad``."""
        return tuple([p.requires_grad for _, p in self.parameters])

    def modes(self) -> tuple[bool, ...]:
        """Every module's ``training``, in the plan cache's keys: a change of any module's
        mode (dropout turned on on the template) is a new kind of call, timed again, and
        the timing sees whether it draws random numbers."""
        return tuple([m.training for m in self.modules])

    def describe(
        self, modes: tuple[bool, ...], training: bool, drawing: tuple[bool, ...] = ()
    ) -> str:
        """``modes`` in words for a signature: the modules in another mode than the
        ensemble's ("" when there are none), and, in training mode, those of ``drawers``
        that draw nothing now (a dropout with ``p=0``)."""
        text = self._described.get((modes, drawing))
        if text is None:
            other = [
                p or "<root>"
                for (p, _), flag in zip(self.paths, modes, strict=True)
                if flag != training
            ]
            text = f"{'eval' if training else 'train'}={','.join(other)}" if other else ""
            idle = [
                self._path_of[id(m)]
                for m, draws_now in zip(self.drawers, drawing, strict=True)
                if m.training and not draws_now
            ]
            if idle:
                text = f"{text} idle={','.join(idle)}".strip()
            self._described[(modes, drawing)] = text
        return text

    def drawing(self) -> tuple[bool, ...]:
        """Whether each module that may draw random numbers in its forward (a dropout, torch's
        layers with a ``dropout=``) draws in a call now: in the plan cache's keys, so that a
        dropout's ``p`` raised from 0 after timing is a new kind of call, timed again."""
        return tuple([draws(m, _DRAW_KINDS) or draws_in_forward(m) for m in self.drawers])

    def padded(self) -> list[str]:
        """Paths of the ``nn.Embedding`` layers with a ``padding_idx``, whose padding row
        ``torch.vmap`` trains when each member looks up its own indices: its batching rule
        looks the members' rows up in one flattened table, whose backward keeps only member
        0's padding row out of the gradient (batched indices only: shared indices are
        looked up unbatched, with the padding row kept out for every member, unless the
        forward makes them per-member itself, which :mod:`._lookups` sees). Forward values
        are exact: only a call with gradients on the weight is concerned."""
        return [
            p
            for p, m in self.embeddings
            if isinstance(m, nn.Embedding) and m.padding_idx is not None
        ]

    def renormed(self) -> list[str]:
        """Paths of the ``nn.Embedding`` / ``nn.EmbeddingBag`` layers with a ``max_norm`` now."""
        return [p for p, m in self.embeddings if m.max_norm is not None]

    def watched(self) -> list[tuple[str, nn.Module]]:
        stamp = hook_registrations()
        if self._watched is None or self._watched[0] != stamp:
            self._watched = (stamp, watched(self.paths))
        return self._watched[1]


class Ensemble(nn.Module):
    """Run N same-shaped modules as one, with stacked real parameters and a meta template.

    The ensemble holds one real parameter (or buffer) per parameter of the
    members, stacked on a new dim 0 of size N, and a :class:`MetaTemplate` of
    the members' architecture. Lightning, optimizers, checkpoints,
    ``ModelSummary``, DDP, FSDP and precision plugins therefore see ordinary
    parameters, with readable keys such as ``stacked.0.weight`` of shape
    ``(N, out, in)``.

    Args:
        modules: the members: same class, same parameter and buffer names,
            shapes, dtypes and weight ties, same settings (attributes,
            train/eval mode of every submodule), on one device. Their values
            and modes are copied; the modules themselves are not kept.
        per_member_inputs: ``False`` (default): every member gets the same
            inputs. ``True``: tensor inputs, keyword ones included, are
            stacked on dim 0, one slice per member (any other size of dim 0
            is an ``ArgumentValueError``).
        randomness: ``torch.vmap`` randomness. ``"different"`` (default) gives
            each member its own dropout mask, as N separate modules would;
            ``"same"`` shares one; ``"error"`` refuses random operations.
        chunk_size: run at most this many members at a time, to bound
            activation memory (default: all at once).
        execution: how the members run. ``"auto"`` (default) times the plans
            that apply the first time it sees a kind of call (input shapes
            rounded up to powers of two, dtypes, devices, the train/eval
            mode of every module,
            gradients on/off, autocast, threads) and keeps the fastest for
            every later call of that kind (see :attr:`plan` and
            :attr:`plans`). The others force a plan: ``"fused"``, one
            batched matmul per layer (an ``nn.Sequential`` of ``nn.Linear``,
            element-wise activations and dropout only, or a subclass that only
            builds them in ``__init__``, such as ``torchvision.ops.MLP``);
            ``"grouped"``, the
            members' channels side by side, so that a convolution is one
            grouped convolution and BatchNorm one BatchNorm (convolutions,
            BatchNorm, pooling, ``Linear``, element-wise ops, residual
            additions and dropout, and torch's ``nn.TransformerEncoderLayer``
            and ``nn.TransformerEncoder`` without masks, with the members
            folded into the batch, traced with ``torch.fx``, so Python code in
            ``forward`` such as a print or a warning runs when traced, not on
            every call; inputs it cannot lay out run on the loop);
            ``"vmap"``, ``torch.vmap``; ``"loop"``,
            a Python loop over the members on views of the stacked tensors.
            Every plan agrees with a loop over the original modules up to
            floating-point reassociation: outputs, gradients, BatchNorm
            running statistics, a dropout mask per member; but only the
            loop, and the fused and grouped plans on the CPU (contiguous
            inputs, outside autocast and inference mode), draw the masks the
            members would: elsewhere those two give other dropout masks for
            the same seed (and vmap other ``randn`` noise, and other masks
            with two dropout layers or more), so for a call that draws
            random numbers ``"auto"`` chooses between the loop and the
            fused and grouped plans where they draw the members' masks.

    Attributes:
        execution: the plan used where nothing is timed (under
            ``torch.compile``, inside a ``torch.func`` transform, with
            ``torch.use_deterministic_algorithms(True)``): the forced one, or
            for ``"auto"`` ``"fused"`` when the template can take it and
            ``"vmap"`` otherwise (outside ``torch.compile``, the loop runs
            instead of ``"vmap"`` for a template with modules of other
            classes than torch's, whose forward may keep state, and in
            16-bit floats; instead of ``"fused"`` in float16; and for
            members without parameters or buffers).
        plan: the plan the last call ran.
        plans: how ``"auto"`` chose, per kind of call (with the timings).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import lightning_meta as lm
        >>> members = [nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)) for _ in range(4)]
        >>> ensemble = lm.Ensemble(members)
        >>> x = torch.randn(5, 3)
        >>> ensemble(x).shape
        torch.Size([4, 5, 1])
        >>> torch.testing.assert_close(ensemble(x), torch.stack([m(x) for m in members]))
        >>> sorted(k for k in ensemble.state_dict())
        ['stacked.0.bias', 'stacked.0.weight', 'stacked.2.bias', 'stacked.2.weight']
        >>> ensemble.plan in ("fused", "grouped", "vmap", "loop")  # the fastest here, as timed
        True
        >>> lm.Ensemble(members, execution="loop")(x).shape
        torch.Size([4, 5, 1])

    .. warning::
        Members are copied when the ensemble is built: training the ensemble
        does not change the original modules. Use :meth:`member` to get a
        real module back. Each member's slice of a stacked tensor is laid out
        in memory as member 0's tensor (``channels_last`` included); members
        laid out unlike member 0 are refused.

    .. warning::
        With ``execution="auto"``, the first call of each kind, and its 16th
        call once more, run every applicable plan a few times (forward, and
        backward when gradients are enabled) before their own forward: a
        cost of several steps, twice per kind of call; the 16th call's choice
        is kept (the first call is where one-off costs of a run pile up).
        Those runs use copies of the buffers and inputs and aliases of the
        parameters, and restore the random number generators, so running
        statistics, gradients and later random draws are exactly those of an
        untimed call; only Python-level side effects of ``forward`` repeat.
        Plans differ in floating-point summation order, so two processes may
        differ in the last bits; pass ``execution=`` to fix the plan. A call
        that draws random numbers (dropout in training mode) runs the loop
        or, on the CPU for contiguous inputs, the fused or grouped plan,
        whose masks are the members' own; where they cannot draw those
        (an accelerator, autocast, strided inputs), a forced ``"fused"`` or
        ``"grouped"`` plan gives other dropout masks than the loop for the
        same seed (reproducible, but not the loop's numbers).

    .. warning::
        Tools that find modules by class in ``model.modules()`` or treat a
        parameter as one tensor see holders of stacked tensors, not the
        members, and do nothing to them without an error:
        ``torch.optim.swa_utils.update_bn`` and Lightning's
        ``StochasticWeightAveraging`` (no BatchNorm statistics recomputed:
        run ``update_bn`` on :meth:`member` ``(i)`` and copy its buffers
        back into :meth:`tensors`), ``Trainer(sync_batchnorm=True)``,
        ``quantize_dynamic`` and other conversions by class,
        ``BaseFinetuning.freeze`` (BatchNorm weights frozen too), weight
        decay rules by ``p.dim()`` or module class (group by the template's
        parameters: ``template.module.named_parameters()``, then
        ``stacked.get_parameter(name)``), and optimizers whose update
        depends on a whole tensor (Adafactor, LAMB, LARS, Shampoo,
        per-tensor norm clipping), which treat N members as one tensor;
        element-wise ones (SGD, Adam, AdamW, RMSprop) give each member its
        own update. ``model.apply(fn)`` reaches the members (:meth:`apply`).
        In 16-bit parameters, torch's CPU ``add_(..., alpha=)`` (SGD) rounds
        some elements of a stacked tensor one unit differently from a
        member's own. See docs/guarantees.md, "What does not reach the
        members".
    """

    # No template holds an Ensemble (see _template.to_meta).
    _lightning_meta_stacks_members: ClassVar[bool] = True

    def __init__(
        self,
        modules: Iterable[nn.Module],
        *,
        per_member_inputs: bool = False,
        randomness: Randomness = "different",
        chunk_size: int | None = None,
        execution: Execution = "auto",
    ) -> None:
        super().__init__()
        if isinstance(modules, nn.Module) and not isinstance(
            modules, (nn.ModuleList, nn.Sequential)
        ):
            raise ArgumentTypeError(
                f"Ensemble expects a sequence of modules, got one {type(modules).__name__}. "
                "Fix: `Ensemble([m1, m2, ...])` or `Ensemble.from_factory(make, n)`."
            )
        members = list(modules)
        self._setup(
            len(members),
            members[0] if members else None,
            per_member_inputs,
            randomness,
            chunk_size,
            execution,
        )
        shared, reference = SharedTensors(), Profile(members[0])
        for i, member in enumerate(members):
            self._store(i, member, reference=reference, shared=shared)
        self._aliased = sorted(shared.aliased)

    @classmethod
    def from_factory(
        cls, factory: Callable[[], nn.Module], num_members: int, **options: Any
    ) -> Ensemble:
        """Build an ensemble of ``num_members`` modules made by ``factory``, one at a time.

        Only one member exists besides the stacked tensors at any moment (each
        is dropped once copied into them, member 0 too), so peak memory is the
        ensemble plus one member (a list would need N).
        ``options`` are those of :class:`Ensemble`.

        Example::

            >>> import torch
            >>> from torch import nn
            >>> import lightning_meta as lm
            >>> ens = lm.Ensemble.from_factory(lambda: nn.Linear(3, 2), 8)
            >>> len(ens), ens.stacked.weight.shape
            (8, torch.Size([8, 2, 3]))
        """
        if not isinstance(num_members, int) or isinstance(num_members, bool):
            raise ArgumentTypeError(
                f"Ensemble.from_factory got num_members={num_members!r}, a "
                f"{type(num_members).__name__}. Fix: pass the number of members as an int."
            )
        if num_members < 1:
            raise ArgumentValueError(
                f"Ensemble.from_factory needs num_members >= 1, got {num_members!r}. "
                "Fix: pass the number of members as a positive int."
            )
        first = factory()
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(num_members, first, **options)
        shared, reference = SharedTensors(), Profile(first)
        self._store(0, first, reference=reference, shared=shared)
        # Later members are compared with what was read of member 0 and its
        # meta copy, the template: member 0's memory is free for the next.
        reference.stand_in(self.template.module)
        del first
        for i in range(1, num_members):
            self._store(i, factory(), reference=reference, shared=shared)
        self._aliased = sorted(shared.aliased)
        return self

    # ---------------------------------------------------------------- set-up
    def _setup(
        self,
        n: int,
        first: nn.Module | None,
        per_member_inputs: bool = False,
        randomness: Randomness = "different",
        chunk_size: int | None = None,
        execution: Execution = "auto",
    ) -> None:
        if first is None or n < 1:
            raise ArgumentValueError("Ensemble got no members. Fix: pass at least one module.")
        if not isinstance(first, nn.Module):
            raise ArgumentTypeError(
                f"Ensemble member 0 is {type(first).__name__}, expected an nn.Module. "
                "Fix: pass modules (or a factory returning one)."
            )
        if not isinstance(per_member_inputs, bool):
            raise ArgumentTypeError(
                f"Ensemble per_member_inputs={per_member_inputs!r}; expected True or False."
            )
        if randomness not in _RANDOMNESS:
            raise ArgumentValueError(
                f"Ensemble randomness={randomness!r}; choose one of {_RANDOMNESS}."
            )
        if execution not in _EXECUTIONS:
            raise ArgumentValueError(
                f"Ensemble execution={execution!r}; choose one of {_EXECUTIONS}."
            )
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
        ):
            raise ArgumentValueError(
                f"Ensemble chunk_size={chunk_size!r}; expected None or an int >= 1."
            )
        self.num_members = n
        self.per_member_inputs = per_member_inputs
        self.randomness: Randomness = randomness
        self.chunk_size = chunk_size
        _refuse_uncopyable(first, 0)  # before MetaTemplate copies it
        # The members' modes, submodule by submodule (a frozen BatchNorm stays
        # frozen), as a module wrapping them would leave them.
        with hook_objects_copied():
            self.template = MetaTemplate(first)
        self._mode_applied = first.training
        self._modes_before_eval: list[bool] | None = None
        template = self.template.module
        # One stacked tensor per distinct tensor of the template; tied names
        # are filled in by functional_call(tie_weights=True).
        self._names: list[str] = [name for name, _ in template.named_parameters()]
        self._names += [name for name, _ in template.named_buffers()]
        self.stacked = _Stacked()
        for name, t in [*template.named_parameters(), *template.named_buffers()]:
            holder = self._holder(name.rpartition(".")[0])
            leaf = name.rpartition(".")[2]
            ref = (
                first.get_parameter(name) if isinstance(t, nn.Parameter) else first.get_buffer(name)
            )
            if ref.is_meta and default_device().type != "meta":
                # Under torch.device("meta") (lm.estimate builds a model there) the
                # members and the stacked tensors are shape-only alike.
                raise MetaTensorError(
                    f"Ensemble member 0 holds {name!r} on the meta device, and the ensemble "
                    "is built outside torch.device('meta'), so its stacked tensors would be "
                    "real and hold nothing of the member's. Fix: give the members real "
                    "tensors first (lm.materialize a member made by lm.deferred_init, "
                    "to_empty() and initialise one built on meta), or build the ensemble "
                    "under the same torch.device('meta') block as its members (a shape-only "
                    "ensemble, as lm.estimate builds).",
                    paths=[name],
                )
            data = _stacked_like(ref, n, t.dtype)
            if isinstance(t, nn.Parameter):
                holder.register_parameter(leaf, nn.Parameter(data, requires_grad=t.requires_grad))
            else:
                slot = slot_at(first.get_submodule(name.rpartition(".")[0]), leaf)
                persistent = slot is None or slot.persistent
                holder.register_buffer(leaf, data, persistent=persistent)
            holder.leaves = (*holder.leaves, leaf)
        self._buffer_names: tuple[str, ...] = tuple(name for name, _ in template.named_buffers())
        if not self._names and execution in ("grouped", "vmap"):
            raise ArgumentValueError(
                f"Ensemble(execution={execution!r}) got members without parameters or buffers "
                f"({type(first).__name__}): the {execution} plan runs every member through "
                "stacked tensors, and there are none to stack. Fix: use execution='auto' or "
                "'loop' (a loop over the members' copies), or give the members their tensors."
            )
        nn.Module.train(self, first.training)  # this module and its holders; the template as is
        self._sparse = _sparse_gradients(template)
        if execution == "vmap" and self._sparse:
            raise ArgumentValueError(
                f"Ensemble(execution='vmap') cannot run {self._sparse} (nn.Embedding or "
                "nn.EmbeddingBag with sparse=True): torch.vmap cannot batch the sparse "
                "gradients of their weights in backward. Fix: use execution='loop' (or "
                "'auto', which runs the loop for them), or sparse=False.",
                paths=self._sparse,
            )
        self._recurrent = _recurrent_layers(template)
        if execution == "vmap" and self._recurrent:
            raise ArgumentValueError(
                f"Ensemble(execution='vmap') cannot run the recurrent layers "
                f"({_named(self._recurrent)}: nn.RNN, nn.LSTM, nn.GRU, nn.LSTMCell): torch.vmap "
                "has no batching rule for their kernels (aten::lstm, aten::gru, aten::rnn_tanh, "
                "aten::lstm_cell). Fix: use execution='loop' (or "
                "'auto', which runs the loop for them).",
                paths=self._recurrent,
            )
        # A lookup with a padding index of indices that differ per member, seen under
        # vmap with gradients (see _lookups): the refusal's message, kept for the calls
        # after it, which run the loop where they have gradients.
        self._padded_lookup: str | None = None
        self._lookups_watched: set[tuple[Any, ...]] = set()  # call kinds seen without one
        fused = plan_fused(template, randomness)
        if execution == "fused" and isinstance(fused, Refusal):
            where = f"layer {fused.path!r}" if fused.path else "the template"
            raise ArgumentValueError(
                f"Ensemble(execution='fused') runs an nn.Sequential of nn.Linear and element-wise "
                f"activations or dropout only, and {where} cannot be fused: {fused.reason}. "
                "Fix: use execution='auto', which picks among the plans that run it, or "
                "'loop'.",
                paths=[fused.path] if fused.path else [],
            )
        self._fused: FusedPlan | None = (
            fused if execution in ("auto", "fused") and isinstance(fused, FusedPlan) else None
        )
        self._init_caches()  # before the static plan, which looks at the template's walk
        self._requested: Execution = execution
        self.execution: Execution = (
            (
                "fused"
                if self._fused is not None
                else "vmap"
                if self._names
                and not self._sparse
                and not self._recurrent
                and not (per_member_inputs and self._padded())
                else "loop"
            )
            if execution == "auto"
            else execution
        )
        if execution == "grouped":
            grouped = self._grouped.graph(template)
            if isinstance(grouped, Refusal):
                where = f"layer {grouped.path!r}" if grouped.path else "the template"
                raise ArgumentValueError(
                    f"Ensemble(execution='grouped') runs convolutions, BatchNorm, pooling, Linear, "
                    f"element-wise ops and dropout with the members' channels side by side, and "
                    # 'vmap' is not named: it fails on some of these (a BatchNorm with
                    # momentum=None reads its step count with .item() in training)
                    f"{where} cannot: {grouped.reason}. Fix: use execution='auto' (it "
                    "chooses among the plans that run this template) or 'loop'.",
                    paths=[grouped.path] if grouped.path else [],
                )

    def _init_caches(self) -> None:
        self._plans = PlanCache()
        self._grads = GradBuffers()
        self._views = ViewCache()
        self._shells = MemberShells()
        self._member_slots: MemberSlots | None = None
        self._renormed_for: MemberSlots | None = None  # see _renormed
        self._renormed_names: tuple[str, ...] = ()
        self._renormed_paths: list[str] = []
        self._backward_hooked = _HookCheck()
        # The holders of stacked tensors, in walk order, with their names
        # (built on first use).
        self._holders: list[tuple[_Stacked, str, tuple[tuple[str, str], ...]]] | None = None
        # When the modules under stacked were last checked for FSDP2 units, and their
        # classes then: fully_shard changes a unit's class and registers hooks on it (a
        # unit added under a parametrized holder is a new module of an old class), see
        # _refuse_sharded_holders.
        self._checked_classes: tuple[int, list[tuple[nn.Module, type]]] | None = None
        self._aliases: dict[str, str] = {}
        self._grouped = GroupedPlan(self.randomness)
        self._last_plan: str | None = None
        self._walk: _TemplateWalk | None = None
        # The modes (self.training) in which a vmap call was seen drawing
        # nothing from the global Python generators (see _vmap).
        self._draws_seen: set[bool] = set()
        # Tensors changed in place by a timed run that could not be put back (see _time).
        self._lost: list[str] = []
        # The forward was seen changing its modules' plain attributes:
        # execution="auto" runs the loop from then on (see _keeps_state).
        self._writes_state = False
        # A call ran the one template for every member (vmap, grouped), which
        # then holds the state such calls leave (see _keeps_state).
        self._ran_shared = False
        # From here on, `training` set directly is followed at once (see __setattr__).
        self._follows_training = True
        # Walked now: the template's requires_grad flags as built, so that one set on it
        # before the first call is a change (see _follow_template_grads).
        self._template_walk()

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "training" and self.__dict__.get("_follows_training", False):
            # Lightning puts modes back after validation by setting `training` on every
            # module it sees, the ensemble included, the template not. Followed at the next
            # call, it put the template's modules back after the user's code had changed
            # them (a BatchNorm frozen on the template in on_train_epoch_start trained on).
            self._follow_mode()

    def _holder(self, path: str) -> _Stacked:
        holder = self.stacked
        for part in path.split(".") if path else ():
            child = dict(holder.named_children()).get(part)
            if child is None:
                child = _Stacked()
                holder.add_module(part, child)
            holder = _as_stacked(child, path)
        return holder

    @torch.no_grad()
    def _store(
        self, index: int, member: nn.Module, *, reference: Profile, shared: SharedTensors
    ) -> None:
        problems = []
        if member is not reference.module:  # member 0 was checked before it was copied
            _refuse_uncopyable(member, index)
            problems = compare(reference, member, index)
        if problems:
            lines = "\n  ".join(line for line, _ in problems)
            cached = (
                " A tensor kept in a plain attribute that differs per member may be what a "
                "forward cached (an eval-mode cache such as timm LeViT's): empty it, or build "
                "the Ensemble before the members run, so that each member's copy fills its own."
                if "tensor(" in lines
                else ""
            )
            if "torch.Generator(" in lines:
                cached += (
                    " A torch.Generator that differs per member (a seed per member) would run "
                    "every member with member 0's: draw from the global generator instead "
                    "(randomness='different' gives every member its own draws), or pass the "
                    "noise in as an input."
                )
            raise MetaTensorError(
                f"Ensemble members must have the same architecture as member 0 "
                f"({type(reference.module).__qualname__}):\n  {lines}\nFix: build every member "
                "with the same class and configuration, settings and hooks (or register "
                f"hooks on ensemble.template.module once it is built).{cached}",
                paths=sorted({p for _, paths in problems for p in paths.split(", ") if p}),
            )
        outside = held_outside(member)
        if outside:
            raise ArgumentValueError(
                f"Ensemble member {index} holds tensors that require grad outside its "
                f"parameters: {outside}. The ensemble keeps a copy of member 0's there, which "
                "no gradient reaches (and a later change to it is not seen). Fix: register "
                "them as parameters of each member (nn.Parameter, or a submodule), or pass "
                "them in as inputs.",
                paths=outside,
            )
        both = shared.add(index, member)
        if both:
            names = sorted({name for name, _ in both})
            other = both[0][1]
            raise ArgumentValueError(
                f"Ensemble members {other} and {index} share {names} (parameters that require "
                "grad, modules holding buffers, or torch.Generator objects): one object, which "
                "a loop over the members trains once for all (whose buffers it updates, and "
                "from whose generator it draws, member after member), but the ensemble keeps "
                "a copy per member, trained and drawn from apart. Fix: keep the shared module "
                "outside the ensemble and pass its output in (it then runs once, not once per "
                "member), or give every member its own copy (copy.deepcopy); for a generator, "
                "draw from the global one instead (randomness='different' gives every member "
                "its own draws).",
                paths=names,
            )
        stacked = self.tensors()
        sources = named_tensors(member)
        hooked = sorted(name for name, t in sources.items() if has_tensor_hooks(t))
        if hooked:
            # The members' tensors are copied into stacked ones: their hooks
            # would be lost, and the stacked gradients would differ from theirs.
            raise ArgumentValueError(
                f"Ensemble member {index} has gradient hooks on {hooked} (tensor.register_hook "
                "or register_post_accumulate_grad_hook), which the stacked tensors would not "
                "run. Fix: build the members without them and register the hook on "
                "ensemble.tensors()[name] (it sees every member's gradient), or use a "
                "module hook (register_full_backward_hook).",
                paths=hooked,
            )
        for name in self._names:
            src = sources[name]
            if src.is_meta and not stacked[name].is_meta:
                raise MetaTensorError(
                    f"Ensemble member {index} holds {name!r} on the meta device, where member "
                    "0 holds real tensors. Fix: give every member real tensors (lm.materialize "
                    "a member made by lm.deferred_init).",
                    paths=[name],
                )
            if src.device != stacked[name].device:
                raise MetaTensorError(
                    f"Ensemble member {index} holds {name!r} on {src.device}, member 0 on "
                    f"{stacked[name].device}. Fix: move every member to one device first.",
                    paths=[name],
                )
            stacked[name][index].copy_(src)

    # --------------------------------------------------------------- access
    def __len__(self) -> int:
        return self.num_members

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return the stacked tensors by the template's dotted names (pre-hooks applied)."""
        holders = self._holders
        if holders is None:
            holders = []
            for path, holder in _holders(self.stacked):
                if holder.leaves:
                    prefix = f"{path}." if path else ""
                    reads = tuple((prefix + leaf, leaf) for leaf in holder.leaves)
                    holders.append((holder, prefix, reads))
            self._holders = holders
        out: dict[str, torch.Tensor] = {}
        for holder, prefix, reads in holders:
            # A holder whose forward is its own and that has no hooks is read
            # from its tables: __call__, and even nn.Module.__getattr__, cost
            # more than the read, on every forward. Hooks (pruning) and a
            # forward set on the instance (accelerate's offloading) run.
            hooked = has_module_hooks(holder)
            if hooked or "forward" in holder.__dict__:
                values = holder() if hooked else holder.forward()
                for leaf, value in values.items():
                    out[prefix + leaf] = value
                continue
            params, buffers = tensor_tables(holder)
            for full, leaf in reads:
                value = params.get(leaf)
                if value is None:
                    value = buffers.get(leaf)
                    if value is None:
                        value = getattr(holder, leaf)
                out[full] = value
        return out

    def member(self, index: int) -> nn.Module:
        """Return member ``index`` as a real, independent module (a copy, on the ensemble's device).

        Its tensors are plain and whole: where FSDP2 (``fully_shard``,
        Lightning's ``ModelParallelStrategy``) or tensor parallelism made the
        stacked tensors ``DTensor`` s, they are gathered, which is a collective:
        call ``member`` on every rank, as for ``DTensor.full_tensor()``.

        Raises:
            MetaTensorError: ``index`` is out of range.
        """
        try:
            index = operator.index(index)
        except TypeError:
            raise ArgumentTypeError(
                f"Ensemble.member({index!r}) needs an int index, got a {type(index).__name__}. "
                "Fix: pass the member's position as an int."
            ) from None
        if not -self.num_members <= index < self.num_members:
            raise ArgumentValueError(
                f"Ensemble.member({index}) is out of range for {self.num_members} members. "
                f"Fix: pass an index in [-{self.num_members}, {self.num_members})."
            )
        self._follow_mode()
        self._follow_template_grads()
        tensors = self.tensors()

        def make(name: str, t: torch.Tensor) -> torch.Tensor:
            stacked = tensors[name]
            if is_dtensor(stacked):
                # FSDP2 or tensor parallel sharded the stacked tensor: the member is
                # whole and plain, as the docstring promises (a collective).
                stacked = stacked.full_tensor()
            value = stacked[index].detach().clone()
            if isinstance(t, nn.Parameter):
                # requires_grad as the stacked tensor has it now (a layer
                # frozen after the ensemble was built), not as the template.
                return nn.Parameter(value, requires_grad=tensors[name].requires_grad)
            return value

        # A copy of the template: its modes, submodule by submodule.
        member = copy_module(self.template.module, make)
        self._shells.follow_settings()  # set on the template since the last call
        copies = self._shells.copies
        if len(copies) == self.num_members:
            # What the member's forward kept in its plain attributes, under the loop plan.
            shell = copies[index].module
            carry_state(shell, member, copy=True, template_hooks=self._shells.template_hooks)
        return member

    def apply(self, fn: Callable[[nn.Module], None]) -> Ensemble:
        """Call ``fn`` on every submodule of every member, then on the ensemble itself.

        What ``nn.Module.apply`` does to an ``nn.ModuleList`` of the members:
        member after member, each submodule before its parent, so
        ``model.apply(init_weights)`` on a model holding the ensemble draws the
        same random numbers in the same order as on one holding the members,
        and gives the same values. ``fn`` runs on :meth:`member` copies; what
        it changes there is carried back into the ensemble: the values of
        parameters and buffers (changed in place or assigned), their
        ``requires_grad`` and the submodules' train/eval modes (each alike in
        every member). The holders of stacked tensors (``ensemble.stacked``)
        are not passed to ``fn``. Peak memory: the stacked tensors twice.

        Raises:
            ArgumentValueError: ``fn`` changed what the ensemble cannot carry (a
                setting such as BatchNorm's ``momentum``, a hook, a tensor's
                shape or dtype, a submodule), or changed members differently
                (``requires_grad``, modes); the ensemble is left as it was.
        """
        sharded = sorted(n for n, t in self.tensors().items() if is_dtensor(t))
        if sharded:
            raise ArgumentValueError(
                f"Ensemble.apply cannot write into the stacked tensors {_named(sharded)}, which "
                "FSDP2 or tensor parallelism made DTensors: each rank holds a shard of the "
                "members, not whole members to pass to fn. Fix: call ensemble.apply(fn) before "
                "sharding (in configure_model, before fully_shard or parallelize_module).",
                paths=sharded,
            )
        names = self._names
        values: list[dict[str, torch.Tensor]] = []
        grads: dict[str, bool] = {}
        modes: list[bool] | None = None
        # A frozen tensor the members shared (one object, stacked per member):
        # on the members, fn writes it member after member, each reading the
        # last write, and all end with the last one.
        chained = [n for n in getattr(self, "_aliased", ()) if n in names]
        last: dict[str, torch.Tensor] = {}
        # Plain settings fn changed (dotted name -> value), alike in every member.
        carried: dict[str, Any] = {}
        for i in range(self.num_members):
            member = self.member(i)
            if last:
                with torch.no_grad():
                    for name, tensor in named_tensors(member).items():
                        if name in last:
                            tensor.copy_(last[name])
            before = Profile(member)
            _ = before.signature, before.settings, before.hooks  # read before fn runs
            member.apply(fn)
            changed = changed_since(before)
            settings = _plain_settings(member, changed)
            changed = [k for k in changed if k not in settings]
            uneven = (
                sorted(
                    k
                    for k in settings.keys() | carried.keys()
                    if k not in settings or k not in carried or differs(settings[k], carried[k])
                )
                if i > 0
                else []
            )
            carried = settings
            mine = [m.training for m in member.modules()]
            table = named_tensors(member)
            differ = (
                [
                    n
                    for n in names
                    if grads.setdefault(n, table[n].requires_grad) != table[n].requires_grad
                ]
                if not changed
                else []
            )
            if changed or uneven or differ or (modes is not None and mine != modes):
                what = (
                    f"changed {changed}, which the ensemble cannot carry (its template and "
                    "the copies the loop plan runs are member 0's)"
                    if changed
                    else f"changed the settings {uneven} differently in member {i} than in "
                    "member 0 (the ensemble's settings are one for all members)"
                    if uneven
                    else f"set requires_grad on {differ} differently in member {i} than in member 0"
                    if differ
                    else f"left member {i} in other train/eval modes than member 0"
                )
                raise ArgumentValueError(
                    f"Ensemble.apply({getattr(fn, '__qualname__', fn)}) ran on copies of the "
                    f"members, and it {what}; the ensemble is left as it was. Fix: apply "
                    "functions that change values, requires_grad, modes and plain settings "
                    "(a dropout's p, BatchNorm's momentum) alike in every member; change "
                    "hooks, submodules and other settings on the members and build a new "
                    "Ensemble.",
                    paths=changed or uneven or differ,
                )
            modes = mine
            values.append({name: table[name] for name in names})
            last = {name: table[name].detach() for name in chained}
        for member_values in values:
            member_values.update(last)
        tensors = self.tensors()
        with torch.no_grad():
            for i, member_values in enumerate(values):
                for name, value in member_values.items():
                    tensors[name][i].copy_(value)
        for name, flag in grads.items():
            if tensors[name].requires_grad != flag:
                tensors[name].requires_grad_(flag)
        walk = self._template_walk()
        for name, param in walk.parameters:
            wanted = grads.get(self._aliases.get(name, name))
            if wanted is not None and param.requires_grad != wanted:
                param.requires_grad_(wanted)  # the template says what the members hold
        walk.grads_seen = walk.grad_flags()
        if modes is not None:
            template_modules = list(self.template.module.modules())
            if [m.training for m in template_modules] != modes:
                # Dropout turned on in eval (MC dropout): the plans timed without
                # random draws are timed again (see _time).
                self._plans.clear()
            for module, flag in zip(template_modules, modes, strict=True):
                module.training = flag
        for name, value in carried.items():
            # On the template, which the plans call and the loop's copies follow.
            path, _, key = name.rpartition(".")
            self.template.module.get_submodule(path).__dict__[key] = deepcopy(value)
        # And on the copies themselves: a value the template already held (a counter a
        # forward keeps, reset to where it started) is no change the copies would follow,
        # and they kept counting.
        self._shells.put_settings(self.template.module, self._names, self.num_members, carried)
        fn(self)
        return self

    def train(self, mode: bool = True) -> Ensemble:
        follows = self.__dict__.get("_follows_training", False)
        self.__dict__["_follows_training"] = False  # a train() call is not a restore
        try:
            super().train(mode)
        finally:
            self.__dict__["_follows_training"] = follows
        self._apply_mode(mode, restore=False)
        return self

    def _apply_mode(self, mode: bool, *, restore: bool) -> None:
        """Put the template in ``mode``; with ``restore``, back into the modes it had before
        the last switch to eval (submodule by submodule)."""
        # Lightning sets the modes it puts back directly, without train(): the
        # loop's copies follow it so, as the members would.
        self._shells.by_train_call = not restore
        modules = list(self.template.module.modules())
        if not mode and self._mode_applied:
            self._modes_before_eval = [m.training for m in modules]
        before = self._modes_before_eval
        if mode and restore and before is not None and len(before) == len(modules):
            self.template.train(True)
            for m, flag in zip(modules, before, strict=True):
                m.training = flag
        else:
            self.template.train(mode)
        if mode:
            self._modes_before_eval = None
        self._mode_applied = mode

    def _follow_template_grads(self, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Put ``requires_grad`` set on a template parameter since the last look
        (``ensemble.template.module[0].requires_grad_(False)``) onto its stacked tensor, and
        a flag set on a stacked tensor by other means since (Lightning's ``BaseFinetuning``,
        ``p.requires_grad = False`` on ``ensemble.parameters()``) back onto the template's.

        The template is where settings and modes are set, and its meta parameters hold
        a flag of their own: set there, it changed nothing, and every plan went on
        computing and accumulating the layer's gradient, without an error. Only a
        change of the template's flag is put: the stacked tensors' own stay as they are,
        and are mirrored on the template, so that setting the template's flag again is a
        change (a layer frozen on the template, unfrozen by ``ensemble.requires_grad_()``,
        then frozen on the template again, trained on before). ``tensors``: the stacked
        tensors (``None``: the ensemble's own).
        """
        if functorch_transform_active():
            # The stacked tensors are the transform's wrappers (torch.func over the ensemble),
            # whose flags are the transform's and on which requires_grad_ is refused: the
            # next call outside it looks.
            return
        walk = self._template_walk()
        now = walk.grad_flags()
        table = self.tensors() if tensors is None else tensors
        names = walk.stacked_names
        if names is None:
            aliases = self._slots().aliases()
            names = walk.stacked_names = [aliases.get(n, n) for n, _ in walk.parameters]
        stacked = [table[name] for name in names]
        flags = tuple([t.requires_grad for t in stacked])
        if now == walk.grads_seen and flags == walk.stacked_seen:
            return
        for i, (_, p) in enumerate(walk.parameters):
            if walk.grads_seen[i] != now[i]:  # set on the template: put on the stacked tensor
                if stacked[i].requires_grad != now[i]:
                    stacked[i].requires_grad_(now[i])
            elif walk.stacked_seen[i] != flags[i] and p.requires_grad != flags[i]:
                p.requires_grad_(flags[i])  # set on the stacked tensor: mirrored
        walk.grads_seen = walk.grad_flags()
        walk.stacked_seen = tuple([t.requires_grad for t in stacked])

    def requires_grad_(self, requires_grad: bool = True) -> Ensemble:
        """:meth:`nn.Module.requires_grad_` on the stacked tensors, mirrored on the template's
        parameters at once (see :meth:`_follow_template_grads`)."""
        self._follow_template_grads()  # a flag set on the template before this one is put first
        super().requires_grad_(requires_grad)
        self._follow_template_grads()
        return self

    def _follow_mode(self) -> None:
        """Follow ``self.training`` when it was set directly, not through :meth:`train`.

        Lightning does so when it puts modes back after validation: it sets
        ``training`` on every module it sees, and the template is not one of
        them. The template then returns to the modes it had before the
        switch to eval, as every module Lightning sees does. Run where it is set
        (:meth:`__setattr__`), and again by every call and :meth:`member` for a flag
        written into ``__dict__`` itself.
        """
        if self.training != self._mode_applied:
            self._apply_mode(self.training, restore=True)

    # ----------------------------------------------------------------- plans
    @property
    def plan(self) -> str | None:
        """The plan the last call ran: ``"fused"``, ``"grouped"``, ``"vmap"`` or ``"loop"`` (``None`` before the first)."""
        return self._last_plan

    @property
    def plans(self) -> tuple[PlanRecord, ...]:
        """Every timed choice of ``execution="auto"`` so far: signature, plan and timings."""
        return self._plans.records()

    def clear_plans(self) -> None:
        """Forget the timed choices (the next call of each kind is timed again)."""
        self._plans.clear()

    def _candidates(self, inputs: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[str]:
        if not self._names:  # nothing stacked: nothing for vmap or grouped to batch
            return ["loop"]
        plans = ["loop"] if self._sparse or self._recurrent else ["vmap", "loop"]
        if "vmap" in plans and self._padded_gradients(None):
            plans.remove("vmap")  # see _TemplateWalk.padded and _lookups
        if (
            not kwargs
            and all(isinstance(x, torch.Tensor) for x in inputs)
            and self._grouped.placeholders(self.template.module) == len(inputs)
        ):
            plans.insert(0, "grouped")
        fused = self._fused
        if (
            fused is not None
            and not kwargs
            and len(inputs) == 1
            and isinstance(inputs[0], torch.Tensor)
            and fused.fits(inputs[0], self.per_member_inputs)
        ):
            plans.insert(0, "fused")
        hooked = self._backward_hooked(self.template.module)
        return [p for p in plans if _skipped_hooks(p, hooked) is None]

    def _choose(
        self, tensors: dict[str, torch.Tensor], inputs: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> str:
        odd = _subclass_input(inputs, kwargs)
        if odd is not None:
            if self._requested not in ("auto", "loop"):
                raise ArgumentValueError(
                    f"Ensemble(execution={self._requested!r}) cannot run an input of class "
                    f"{odd.__name__}, a torch.Tensor subclass with a __torch_function__ of its "
                    "own: it would see this plan's ops (one batched call for all members), not "
                    "the members' own, and its results would differ from theirs. Fix: use "
                    "execution='auto' or 'loop', which run the members' forwards on it, or pass "
                    "x.as_subclass(torch.Tensor)."
                )
            return self._unhooked("loop")
        if self._requested != "auto":
            return self._requested
        if self._writes_state:  # see _timed_state
            return "loop"
        stacked = next(iter(tensors.values()), None)
        if stacked is not None and (stacked.is_meta or active_fake_mode() is not None):
            return self._unhooked("loop")
        if _generator_argument(inputs, kwargs):
            # A generator passed in (generator=torch.Generator, a random.Random or
            # numpy one): a loop draws from it member after member, vmap once for
            # all, and a timed run would draw from the caller's generator; untimed
            # calls too (deterministic algorithms, torch.compile, a transform).
            return self._unhooked("loop")
        if untimed_reason() is not None or _sharded_call(tensors, inputs, kwargs):
            static = self.execution
            if static == "fused" and _float16(tensors):
                static = "loop"  # see _time
            if static == "vmap" and (
                _half_precision(tensors)  # see _time
                # Untimed, no run shows whether the forward keeps state in
                # its modules' attributes, which vmap would refuse: the loop,
                # unless every module is one of torch's own (see _state), or
                # under torch.compile (which traces the call once).
                or (
                    not torch.compiler.is_compiling()
                    and self._watched_template()
                    # A vmap call ran: its state is in the template, where vmap keeps it.
                    and not self._ran_shared
                )
            ):
                static = "loop"
            if self._draws_elsewhere(static, tensors, inputs) or (
                static == "vmap" and self._padded_gradients(tensors)  # padding_idx set since
            ):
                static = "loop"
            return self._unhooked(static)
        if dispatch_mode_active():
            # A FLOP counter or another TorchDispatchMode of the caller's would
            # see every timed run (Lightning's ModelSummary counted 30 calls),
            # and time its own overhead: this call runs the loop, the FLOPs of
            # a loop over the members, and nothing is recorded.
            return self._unhooked("loop")
        # A change of any module's mode (MC dropout turned on on the template
        # after timing) is a new kind of call, timed again: the timing sees
        # whether it draws random numbers, and runs the loop if so.
        walk = self._template_walk()
        modes = walk.modes()
        # Likewise a module that starts or stops drawing (a dropout's p set from 0 to 0.5).
        drawing = walk.drawing()
        fast = fast_key(
            inputs, kwargs, training=self.training, stacked=stacked, modes=(*modes, *drawing)
        )
        record = self._plans.seen(fast)
        if record is None:
            key = signature(
                inputs,
                kwargs,
                training=self.training,
                stacked=stacked,
                modes=walk.describe(modes, self.training, drawing),
            )
            record = self._plans.get(key)
            if record is None:
                record = self._time(key, tensors, inputs, kwargs, previous=None)
            elif self._plans.due(record):
                record = self._time(key, tensors, inputs, kwargs, previous=record)
            self._plans.remember(fast, record)
        elif self._plans.due(record):
            record = self._time(record.signature, tensors, inputs, kwargs, previous=record)
            self._plans.remember(fast, record)
        return self._unhooked(record.plan)

    def _unhooked(self, plan: str) -> str:
        """``plan``, or the loop when ``plan`` would skip hooks (see :func:`_skipped_hooks`).

        Hooks can be registered at any time, after the plan was timed too, so
        they are checked on every call (but the loop's, which runs every hook).
        """
        if plan == "loop":
            return plan
        hooked = self._backward_hooked(self.template.module)
        if _skipped_hooks(plan, hooked) is not None:
            return "loop"
        return plan

    def _draws_elsewhere(
        self, plan: str, tensors: Mapping[str, torch.Tensor], inputs: tuple[Any, ...]
    ) -> bool:
        """Whether ``plan`` would draw this call's random numbers onto other elements than
        the loop, by the template's modules (once per plan and modes): a dropout in
        training mode on the fused or grouped plan where it cannot draw the loop's masks
        (an accelerator, autocast, inputs that are not contiguous: see
        :func:`._draws.exact_possible`), or a dropout (or ``nn.RReLU``) in
        training mode on vmap, which draws a layer for all members before the next layer
        (so too torch's layers that draw in their own forward: ``nn.MultiheadAttention``'s
        ``dropout=``, see :func:`draws_in_forward`).
        Timed calls see the draws themselves (a timed run moves the generator); an untimed
        one has only this, which sees no random op in a forward's own code."""
        template = self.template.module
        walk = self._template_walk()
        if plan == "grouped":
            stacked = next(iter(tensors.values()), None)
            return stacked is not None and self._grouped.draws_elsewhere(
                template,
                tensors,
                inputs,
                self.per_member_inputs,
                GroupedPlan.log(inputs, self.chunk_size).key,
            )
        if plan == "fused":
            fused = self._fused
            return (
                fused is not None
                and fused.draws(walk.by_path)
                and fused.exact(template, walk.by_path, tensors, inputs, self.per_member_inputs)
                is None
            )

        # Looked at on every call: the settings it depends on (a dropout's p) may change.
        return plan == "vmap" and any(walk.drawing())

    def _time(
        self,
        key: str,
        tensors: dict[str, torch.Tensor],
        inputs: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        previous: PlanRecord | None,
    ) -> PlanRecord:
        """Time the plans that apply to this call; record and return the choice.

        ``previous``: the first timing's record, when this is the second.
        """
        candidates = self._candidates(inputs, kwargs)
        if (_autocasting(tensors) or _half_precision(tensors)) and "vmap" in candidates:
            # Under autocast see _vmap. In 16-bit floats torch.vmap's batching
            # rules round some ops twice (a batched nn.Linear is a matmul, then
            # the bias added: two roundings where the members' addmm has one),
            # so its results differ from the members' own in the last bits.
            candidates.remove("vmap")
        if "vmap" in candidates and self._nested_encoder(tensors) is not None:
            candidates.remove("vmap")  # see _nested_encoder
        if _channels_last(tensors, inputs, kwargs):
            # vmap and grouped may return a channels_last output contiguous (vmap over a
            # ResNet trunk: the loop's stack keeps the members' channels_last layout),
            # and noise drawn on it then differs from the loop's (found by the eighth
            # session's review): the loop is the plan that lays it out as the loop does
            candidates = [p for p in candidates if p not in ("vmap", "grouped")]
        if _float16(tensors) and "fused" in candidates:
            # In float16 the fused plan's GEMMs over the members' stacked
            # weights round differently from each member's own (bfloat16
            # gives the members' bits): it is not chosen there.
            candidates.remove("fused")
        # vmap is left to the timing, which sees its draws (the reason
        # ``plans`` gives then is "random draws").
        candidates = [
            p for p in candidates if p == "vmap" or not self._draws_elsewhere(p, tensors, inputs)
        ]
        if len(candidates) == 1:
            record = PlanRecord(key, candidates[0], "only plan")
        else:
            self._lost = []
            seconds, finalists, drew = measure(
                candidates,
                functools.partial(self._run, strict=True),
                tensors,
                self._buffer_names,
                inputs,
                kwargs,
                around=self._timed_state,
                # Every candidate but vmap draws random numbers as the members
                # would: the loop, and the fused and grouped plans where they are
                # still candidates (they then draw the loop's masks: see
                # _draws_elsewhere). torch.vmap's batched normal_ maps the stream
                # onto other elements (its bernoulli does not, but a template may
                # draw either). Timing noise would pick the masks otherwise.
                same_draws=tuple(p for p in candidates if p != "vmap"),
            )
            if self._lost:
                raise ArgumentValueError(
                    f"Ensemble(execution='auto') timed its plans, and the forward changed "
                    f"{sorted(set(self._lost))} in place: tensors kept in plain attributes, too "
                    "large for the timing to copy and put back, or objects it cannot put back "
                    "(one whose data is in its constructor's arguments, such as "
                    "itertools.count), so the timed runs changed them. Fix: use "
                    "execution='loop' (which each member's copy runs as the member would).",
                    paths=sorted(set(self._lost)),
                )
            if not finalists and previous is not None:
                # Every plan raised on this call (a bad input): keep the first
                # choice, and let the call raise under it.
                return previous
            # Every plan raised: run the loop, which raises the members' own error
            # (or, where only the timing failed, runs as a loop over the members).
            chosen = (
                finalists[0] if finalists else "loop" if "loop" in candidates else self.execution
            )
            how = "timed" if previous is None else "timed again"
            if drew and finalists:
                how = "random draws"
            if self._writes_state:  # see _timed_state
                chosen, how = "loop", "forward keeps state"
            record = PlanRecord(key, chosen, how, {p: t * 1e3 for p, t in seconds.items()})
        logger.debug("Ensemble plan: %s", record)
        self._plans.add(record)
        return record

    # -------------------------------------------------------------- forward
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Run every member on ``inputs`` and stack the outputs on a new dim 0 of size N."""
        self._follow_mode()
        self._template_walk().check_structure()
        if self.per_member_inputs:
            _check_member_inputs(inputs, kwargs, self.num_members)
        checked = self._checked_classes
        stamp = hook_registrations()  # fully_shard registers hooks on the module it shards
        if checked is None or checked[0] != stamp or any(type(m) is not c for m, c in checked[1]):
            _refuse_sharded_holders(self.stacked)
            self._checked_classes = (stamp, [(m, type(m)) for m in self.stacked.modules()])
        tensors = self.tensors()
        self._follow_template_grads(tensors)
        _refuse_meta_with_values(tensors, inputs, kwargs)
        plan = self._choose(tensors, inputs, kwargs)
        if plan != self._last_plan:  # nn.Module.__setattr__ costs on every call otherwise
            self._last_plan = plan
        replaced: list[str] = []
        out = _packed_once(self._run(plan, tensors, inputs, kwargs, replaced=replaced))
        if self._last_plan in ("vmap", "grouped") and not self._ran_shared:
            self._ran_shared = True
        for name in replaced:
            # A forward assigned the buffer a new tensor (self.ema = ...), as
            # each member's own forward would: the stacked buffer is replaced.
            path, _, leaf = name.rpartition(".")
            setattr(self._holder(path), leaf, tensors[name])
        if self._last_plan == "loop" and self._shells.registered():
            self._adopt_registered()
        return out

    def _adopt_registered(self) -> None:
        """Stack the buffers the members' forwards registered in their loop copies.

        A forward that registers a buffer on its first call (a lazily built
        running statistic) gives each member a buffer of its own: it becomes a
        stacked buffer of the ensemble (``state_dict``, ``member(i)``,
        checkpoints), as it is a buffer of each member, and the template gains
        its meta counterpart. Anything else registered or removed is refused.
        """
        template = self.template.module
        copies = [member.module for member in self._shells.copies]
        n = len(copies)
        added: dict[str, list[Any]] = {}
        refused: list[tuple[int, str, str]] = []
        for i, copy in enumerate(copies):
            for path, mod in copy.named_modules():
                try:
                    mine = template.get_submodule(path)
                except AttributeError:
                    continue  # a submodule the forward added: state of the copy
                params, buffers = tensor_tables(mod)
                my_params, my_buffers = tensor_tables(mine)
                dot = f"{path}." if path else ""
                refused += [
                    (i, dot + k, "registered parameter") for k in params.keys() - my_params.keys()
                ]
                refused += [
                    (i, dot + k, "removed parameter") for k in my_params.keys() - params.keys()
                ]
                refused += [
                    (i, dot + k, "removed buffer") for k in my_buffers.keys() - buffers.keys()
                ]
                for key in buffers.keys() - my_buffers.keys():
                    added.setdefault(dot + key, [None] * n)[i] = buffers[key]
        for name, rows in added.items():
            first = rows[0]
            for i, row in enumerate(rows):
                if not isinstance(row, torch.Tensor):
                    why = "did not register it" if row is None else f"registered a {type(row)}"
                    refused.append((i, name, f"registered buffer (member {i} {why})"))
                elif row.requires_grad or functorch_transform_active():
                    refused.append((i, name, "registered buffer (carrying a gradient history)"))
                elif isinstance(first, torch.Tensor) and (row.shape, row.dtype, row.device) != (
                    first.shape,
                    first.dtype,
                    first.device,
                ):
                    refused.append((i, name, "registered buffer (other shape, dtype or device)"))
        if refused:
            i, name, what = refused[0]
            raise ArgumentValueError(
                f"Ensemble member {i}'s forward {what} {name!r}, which the ensemble cannot "
                "stack: it stacks a buffer the members' forwards register (the same shape, "
                "dtype and device in every member, detached from the graph), and nothing else. "
                "Fix: register the tensor in the module's __init__ (self.register_buffer("
                "name, torch.zeros(...)), or an nn.Parameter), so that every member has it "
                "when the ensemble is built.",
                paths=sorted({path for _, path, _ in refused}),
            )
        for name, rows in added.items():
            path, _, leaf = name.rpartition(".")
            persistent = leaf not in non_persistent_of(copies[0].get_submodule(path))
            holder = self._holder(path)
            holder.register_buffer(leaf, torch.stack(rows), persistent=persistent)
            holder.leaves = (*holder.leaves, leaf)
            meta = torch.empty_like(rows[0], device="meta")
            template.get_submodule(path).register_buffer(leaf, meta, persistent=persistent)
            self._names.append(name)
            self._buffer_names = (*self._buffer_names, name)
        self._holders = None
        self._checked_classes = None
        self._member_slots = None
        self._views.clear()
        # The next call's copies have slots for the new buffers, holding the
        # stacked ones' views.
        self._shells.remake()

    @contextlib.contextmanager
    def _timed_state(self) -> Iterator[None]:
        """Around each timed run of :func:`measure` (not timed): leave no module changed.

        What the forward changed in the plain attributes of the template or of
        the member copies is put back: a timed run's cache or step count is
        not the call's. A forward that changes anything there keeps state each
        member keeps for itself, which only the loop's copies keep (one value
        for all members in the template): ``execution="auto"`` then runs the
        loop from then on.
        """
        self._shells.build(self.template.module, self._names, self.num_members)
        state = AttributeState(
            watched([*self._template_modules(), *self._shells.modules()]), keep=True
        )
        # Python's random and numpy's global generator: a forward drawing from
        # them (a LayerDrop) makes one draw under vmap for all members, where
        # each member draws its own; only the loop draws as the members do.
        generators = GlobalRandom()
        # Inside torch.nn.utils.parametrize.cached(), a timed run's parametrized weights
        # would stay cached, and the call would use them: their graph already freed by the
        # timed backward ("backward through the graph a second time"), or none at all.
        cache = parametrize_cache()
        cached = dict(cache) if cache else None
        try:
            yield
        finally:
            if cache is not None:
                cache.clear()
                cache.update(cached or {})
            if state.changed(among(tensor_ids(state.modules))):
                self._keeps_state()
            self._lost += state.restore()
            if generators.moved():
                generators.restore()  # a timed run's draws are not the call's
                self._keeps_state()

    def _keeps_state(self) -> None:
        """Note that the forward changes its modules' plain attributes: from now on
        ``execution="auto"`` runs the loop, whose copies keep each member's own."""
        if self._writes_state:
            return
        self._writes_state = True
        if self._ran_shared:
            # Calls that ran the one template (vmap) left their state there:
            # the copies are made from it again.
            self._shells.clear()

    def _template_walk(self) -> _TemplateWalk:
        """What calls look up about the template's modules (walked once per template)."""
        module = self.template.module
        if self._walk is None or self._walk.module is not module:
            self._walk = _TemplateWalk(module)
        return self._walk

    def _template_modules(self) -> list[tuple[str, nn.Module]]:
        """The template's modules with their paths."""
        return self._template_walk().paths

    def _watched_template(self) -> list[tuple[str, nn.Module]]:
        """The template's modules whose forward may store state (:func:`watched`), found again
        only when a hook was registered somewhere since (see :class:`_HookCheck`)."""
        return self._template_walk().watched()

    def _has_attention(self) -> bool:
        """Whether the template holds an ``nn.MultiheadAttention`` (a transformer layer's
        too), whose eval fast path :func:`_standard_attention` keeps vmap off."""
        return self._template_walk().attention

    def _nested_encoder(self, tensors: Mapping[str, torch.Tensor]) -> str | None:
        """The path of an ``nn.TransformerEncoder`` of the template whose members may take
        torch's nested-tensor fast path on this call (``None``: none).

        In eval mode, with no gradient to compute, such an encoder given a
        ``src_key_padding_mask`` runs its layers on a nested tensor and returns
        zeros at the padded positions, where its standard path (the only one
        vmap can run) computes values there: vmap cannot give the members'
        numbers, so the loop runs the call.
        """
        encoders = self._template_walk().encoders
        if not encoders:
            return None
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
            return None  # the members' fast path needs no gradient
        for path, encoder in encoders:
            if not encoder.training and getattr(encoder, "use_nested_tensor", False):
                return path
        return None

    def _refuse_written(
        self,
        state: AttributeState,
        runner: str,
        shared: Callable[[torch.Tensor], bool],
        *,
        any_change: bool,
    ) -> None:
        """Raise if the forward stored a tensor of its own in a plain attribute, or with
        ``any_change`` (the forward ran more than once for the call) changed anything there
        (see ``_state``)."""
        written = state.changed(shared) if any_change else state.written(shared)
        if written:
            registered = state.registered()
            state.restore()
            self._keeps_state()
            plan, forced = self._requested, self._requested != "auto"
            raise state_written_error(plan, runner, written, forced=forced, registered=registered)

    def _padded_gradients(
        self, tensors: Mapping[str, torch.Tensor] | None, *, compiling: bool = False
    ) -> bool:
        """Whether vmap would train padding rows on this call (:meth:`_TemplateWalk.padded`,
        :mod:`._lookups`): gradients on, and a padded ``nn.Embedding``'s stacked weight
        requiring one with per-member inputs (or any input under ``torch.compile``, where
        no lookup is watched and ``"auto"`` takes the loop), or a forward whose own
        batched lookup with a padding index was seen. ``tensors``: the stacked tensors
        (``None``: the ensemble's own)."""
        if not torch.is_grad_enabled():
            return False
        table = self.tensors() if tensors is None else tensors
        # Seen under vmap with a trainable table: any trainable tensor keeps vmap off.
        if (
            self._padded_lookup is not None
            and self._requested != "vmap"
            and any(t.requires_grad for t in table.values())
        ):
            return True
        padded = self._padded()
        if not padded or not (self.per_member_inputs or compiling):
            return False
        if compiling and not self.per_member_inputs and self._requested == "vmap":
            return False  # forced, with shared indices: not checked (docs/guarantees.md)
        aliases = self._slots().aliases()
        for path in padded:
            name = f"{path}.weight" if path else "weight"
            weight = table.get(aliases.get(name, name))
            if weight is None or weight.requires_grad:
                return True
        return False

    def _padded(self) -> list[str]:
        """Paths of the template's ``nn.Embedding`` layers with a ``padding_idx``, as set now
        (:meth:`_TemplateWalk.padded`)."""
        return self._template_walk().padded()

    def _renormed(self) -> tuple[str, ...]:
        """The stacked names of the ``nn.Embedding`` / ``nn.EmbeddingBag(max_norm=...)``
        weights, which the forward renormalises in place: with gradients, the loop gives
        each member a copy of its own (:func:`separate_views`)."""
        slots = self._slots()
        # Looked up on every call: max_norm may be set on the template after the first.
        paths = [
            f"{path}.weight" if path else "weight" for path in self._template_walk().renormed()
        ]
        if self._renormed_for is not slots or paths != self._renormed_paths:
            self._renormed_paths = paths
            aliases = slots.aliases()
            # A tuple, not a frozenset: torch 2.6's dynamo cannot write a frozenset it
            # made into an attribute when the compiled loop breaks its graph
            # ("frozenset not in co_names").
            self._renormed_names = tuple(dict.fromkeys(aliases.get(p, p) for p in paths))
            self._renormed_for = slots
        return self._renormed_names

    def _slots(self) -> MemberSlots:
        module = self.template.module
        if self._member_slots is None or self._member_slots.module is not module:
            self._member_slots = MemberSlots.of(module, self._names)
            self._aliases = self._member_slots.aliases()
        return self._member_slots

    def _run(
        self,
        plan: str,
        tensors: dict[str, torch.Tensor],
        inputs: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        strict: bool = False,
        replaced: list[str] | None = None,
    ) -> Any:
        """Run ``plan``; with ``strict``, an input the plan cannot take raises instead of
        falling back to the loop (so that timing never credits one plan with another).

        Buffers the members' forwards assigned new tensors get new stacked
        tensors in ``tensors``; their names go in ``replaced``.
        """
        changes: Reassigned = {}
        out = self._run_plan(plan, tensors, inputs, kwargs, strict, changes)
        if changes:
            names = restack(tensors, changes)
            if replaced is not None:
                replaced.extend(names)
        return out

    def _run_plan(
        self,
        plan: str,
        tensors: dict[str, torch.Tensor],
        inputs: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        strict: bool,
        changes: Reassigned,
    ) -> Any:
        if self._requested == plan and plan != "loop":  # the loop runs every hook
            skipped = _skipped_hooks(plan, self._backward_hooked(self.template.module))
            if skipped is not None:
                runner = "torch.vmap" if plan == "vmap" else f"the {plan} plan"
                hooked = [
                    path or "(the template itself)"
                    for path in backward_hooked(self.template.module)
                ]
                where = f" on {hooked}" if hooked else ""
                raise ArgumentValueError(
                    f"Ensemble(execution={plan!r}) cannot run with {skipped}{where}: {runner} "
                    "does not run them, so the results would differ from the members' own. "
                    "Fix: use execution='auto' or 'loop'.",
                    paths=hooked,
                )
        if plan == "grouped" and kwargs:
            # The traced graph takes positional tensors only: the loop runs the call.
            if strict:
                raise NotGroupableError("keyword inputs")
            plan = self._last_plan = "loop"
        if plan == "grouped":
            log = self._grouped.log(inputs, self.chunk_size)
            try:
                out = self._chunked(
                    tensors, inputs, kwargs, functools.partial(self._grouped_call, log=log)
                )
            except NotGroupableError:
                log.restore()  # the running statistics its BatchNorms had advanced
                if strict:
                    raise
                plan = self._last_plan = "loop"
            else:
                self._grouped.laid_out(log)
                return _laid_out_as_stacked(out)
        if plan == "loop" and torch.compiler.is_compiling():
            if self._writes_state:
                _refuse_compiled_state()
            return self._functional_loop(tensors, inputs, kwargs, changes)
        if plan == "loop":
            return self._loop(tensors, inputs, kwargs, changes)
        if plan == "fused":
            if self._fused is not None and not kwargs:
                return _laid_out_as_stacked(
                    self._chunked(
                        tensors, inputs, kwargs, functools.partial(self._fused_call, strict=strict)
                    )
                )
            if strict:
                raise NotFusableError
            plan = self._last_plan = "vmap"
        if self._requested == "auto" and not strict and not torch.compiler.is_compiling():
            return _laid_out_as_stacked(self._vmap_or_loop(tensors, inputs, kwargs, changes))
        return _laid_out_as_stacked(self._vmapped(tensors, inputs, kwargs, changes))

    def _vmapped(
        self,
        tensors: dict[str, torch.Tensor],
        inputs: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        changes: Reassigned,
    ) -> Any:
        """The vmap plan, chunk by chunk."""
        return self._chunked(
            tensors, inputs, kwargs, lambda t, x, kw, start: self._vmap(t, x, kw, start, changes)
        )

    def _loop(
        self,
        tensors: dict[str, torch.Tensor],
        inputs: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        changes: Reassigned,
    ) -> Any:
        """The loop plan: each member in its own copy of the template (:func:`run_loop`)."""
        if _sharded_call(tensors, (), {}):
            _refuse_member_shards(tensors)
        return run_loop(
            self._shells,
            self.template.module,
            tensors,
            inputs,
            kwargs,
            num_members=self.num_members,
            per_member_inputs=self.per_member_inputs,
            randomness=self.randomness,
            grad_buffers=self._grads,
            view_cache=self._views,
            changes=changes,
            renormed=self._renormed() if torch.is_grad_enabled() else (),
        )

    def _vmap_or_loop(
        self,
        tensors: dict[str, torch.Tensor],
        inputs: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        changes: Reassigned,
    ) -> Any:
        """``execution="auto"``'s vmap call; the loop instead when the forward turns out to keep
        state (first seen on this call) and nothing else changed yet (no buffer, no random
        generator): the call is then run again, as the members would have run it."""
        if self._padded_gradients(tensors):
            self._last_plan = "loop"  # a timed choice of vmap made before the lookup was seen
            return self._loop(tensors, inputs, kwargs, changes)
        if not self._watched_template():
            # No module whose forward may store state, or call F.embedding itself
            # (torch's own modules only): nothing to note before the call.
            return self._vmapped(tensors, inputs, kwargs, changes)
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        buffers = [(t, version_of(t)) for n, t in tensors.items() if n in self._buffer_names]
        generators = rng_states(device)
        try:
            return self._vmapped(tensors, inputs, kwargs, changes)
        except (StateWrittenError, PaddedLookupError):
            untouched = all(version_of(t) == v for t, v in buffers) and all(
                torch.equal(state, getter)
                for (_, state), (_, getter) in zip(generators, rng_states(device), strict=True)
            )
            if not untouched or changes:
                raise
            self._last_plan = "loop"
            return self._loop(tensors, inputs, kwargs, changes)

    def _chunked(
        self,
        tensors: Mapping[str, torch.Tensor],
        inputs: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        run: Callable[[dict[str, torch.Tensor], tuple[Any, ...], Mapping[str, Any], int], Any],
    ) -> Any:
        size = self.chunk_size
        if size is None or size >= self.num_members:
            return run(dict(tensors), inputs, kwargs, 0)
        outs = []
        # randomness="same": one draw shared by every member, so every chunk
        # draws from the generators' states before the first, as the loop does.
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        replay = rng_states(device) if self.randomness == "same" else []
        for start in range(0, self.num_members, size):
            if replay and start > 0:
                replay_rng(replay)
            part = {k: v[start : start + size] for k, v in tensors.items()}
            xs, kw = inputs, kwargs
            if self.per_member_inputs:
                xs = tree_map_only(torch.Tensor, _slicer(start, start + size), inputs)
                kw = tree_map_only(torch.Tensor, _slicer(start, start + size), dict(kwargs))
            outs.append(run(part, xs, kw, start))
        return join_outputs(outs, torch.cat)

    def _grouped_call(
        self,
        tensors: dict[str, torch.Tensor],
        inputs: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        start: int,
        *,
        log: LayoutLog,
    ) -> Any:
        module = self.template.module
        self._slots()  # the aliases of tied names
        return self._grouped(
            module,
            tensors,
            self._aliases,
            inputs,
            self.per_member_inputs,
            log,
            exact_draws=self._requested == "auto",
        )

    def _fused_call(
        self,
        tensors: dict[str, torch.Tensor],
        inputs: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        start: int,
        *,
        strict: bool = False,
    ) -> Any:
        """The fused plan; the loop for a call it cannot take (an input of another shape,
        hooks added to the template since), or with ``strict`` a :class:`NotFusableError`.

        A call that draws random numbers draws the loop's masks where the plan can
        (:meth:`FusedPlan.exact`); under ``"auto"`` it runs nowhere else.
        """
        template = self.template.module
        modules = self._template_walk().by_path
        fused = self._fused
        drawing = fused is not None and fused.draws(modules)
        rng = None
        try:
            if fused is None or len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
                raise NotFusableError
            schedule = None
            if drawing:
                schedule = fused.exact(template, modules, tensors, inputs, self.per_member_inputs)
                if schedule is None and self._requested == "auto":
                    raise NotFusableError  # "auto" timed it where it drew the loop's masks
                if schedule is not None:
                    rng = torch.get_rng_state()
            return fused(
                modules,
                tensors,
                inputs[0],
                self.per_member_inputs,
                self._grads,
                start,
                schedule=schedule,
            )
        except NotFusableError:
            if rng is not None:  # the chunk's draws, made before the plan turned out not to fit
                torch.set_rng_state(rng)
            if strict:  # timing must not credit the fused plan with the loop's time
                raise
            # The loop runs the call (this chunk: the chunks before drew as it
            # does): it reports a shape error in the member's own terms, runs the
            # hooks added since as the members would (vmap, which ran here before
            # 2026-12-06, drew other noise for a hook's randn_like, and other masks),
            # and rounds 16-bit floats as they do.
            if self._last_plan != "loop":
                self._last_plan = "loop"
            return self._functional_loop(tensors, inputs, {}, None, start)

    def _call_template(
        self,
        given: Mapping[str, torch.Tensor],
        xs: tuple[Any, ...],
        kw: Mapping[str, Any],
        seen: dict[str, Any] | None,
    ) -> Any:
        """``template.functional_call``, noting in ``seen`` the buffers its forward replaced
        (name -> what it put there).

        ``functional_call`` puts the template's own tensors back on return, so
        a forward hook on the template's root reads the buffer tables while
        the call's tensors are still in them (not under torch.compile, which
        traces the call).
        """
        template = self.template
        slots = self._slots() if seen is not None else None
        if slots is None or not slots.watches_buffers or torch.compiler.is_compiling():
            return template.functional_call(given, xs, kw, strict=False)
        assert seen is not None

        def note(module: nn.Module, args: Any, output: Any) -> None:
            seen.update(slots.reassigned(given, None))

        handle = template.module.register_forward_hook(note)
        try:
            return template.functional_call(given, xs, kw, strict=False)
        finally:
            handle.remove()

    def _functional_loop(
        self,
        tensors: Mapping[str, torch.Tensor],
        inputs: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        changes: Reassigned | None = None,
        start: int = 0,
    ) -> Any:
        """The loop through ``functional_call``, which torch.compile traces (it cannot trace
        the per-member template copies of :func:`run_loop`). ``tensors`` are members
        ``start``, ``start + 1``, ... of the ensemble."""
        renormed = self._renormed() if torch.is_grad_enabled() else ()
        views = {
            k: separate_views(v) if k in renormed and v.requires_grad else v.unbind(0)
            for k, v in tensors.items()
        }
        compiling = torch.compiler.is_compiling()
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        # randomness="same": every member draws from the generators' states
        # before the first (CPU and the parameters' accelerator), as run_loop does.
        replay = rng_states(device) if self.randomness != "different" else []
        outs = []
        members = next(iter(tensors.values())).shape[0] if tensors else self.num_members
        for i in range(members):
            if self.randomness == "same" and i > 0:
                replay_rng(replay)
            xs, kw = inputs, kwargs
            if self.per_member_inputs:
                xs = tree_map_only(torch.Tensor, _slicer(i, None), inputs)
                kw = tree_map_only(torch.Tensor, _slicer(i, None), dict(kwargs))
            params = {k: v[i] for k, v in views.items()}
            seen: dict[str, Any] | None = {} if changes is not None else None
            state = None if compiling else AttributeState(self._watched_template())
            try:
                outs.append(self._call_template(params, xs, kw, seen))
            except RuntimeError as e:
                refusal = changed_in_place(e, start + i)
                if refusal is None:
                    raise
                raise refusal from e
            if renormed:
                write_back(tensors, views, renormed, i)
            if state is not None:
                # The next member would read this one's value there (a count
                # would count every member); the member's inputs are the same
                # value for every member.
                given = {id(t) for t in tree_leaves((xs, kw)) if isinstance(t, torch.Tensor)}
                self._refuse_written(
                    state,
                    "once per member",
                    among(given | tensor_ids(state.modules)),
                    any_change=True,
                )
            if changes is not None and seen:
                for name, new in seen.items():
                    changes.setdefault(name, {})[start + i] = new
            if self.randomness == "error":
                check_no_draw(replay, device, i)
        return join_outputs(outs, torch.stack)

    def _vmap(
        self,
        tensors: dict[str, torch.Tensor],
        inputs: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        start: int = 0,
        changes: Reassigned | None = None,
    ) -> Any:
        if _autocasting(tensors):
            # torch.vmap does not apply autocast to every op (nn.Linear's bias
            # add stays float32: pytorch/pytorch#192617), so its result would
            # differ from the members'.
            if self._requested == "vmap":
                raise ArgumentValueError(
                    "Ensemble(execution='vmap') cannot run under torch.autocast: torch.vmap "
                    "does not apply autocast to every op (pytorch/pytorch#192617), so the "
                    "result would differ from the members' own. Fix: use execution='auto' or "
                    "'loop'."
                )
            if self._last_plan != "loop":
                self._last_plan = "loop"  # what ran, for ensemble.plan
            return self._functional_loop(tensors, inputs, kwargs, changes, start)
        if self._padded_gradients(tensors, compiling=torch.compiler.is_compiling()):
            if self._requested == "vmap":
                _refuse_padded_vmap(self._padded())
            if self._last_plan != "loop":
                self._last_plan = "loop"  # what ran, for ensemble.plan
            return self._functional_loop(tensors, inputs, kwargs, changes, start)
        encoder = self._nested_encoder(tensors)
        if encoder is not None:
            if self._requested == "vmap":
                where = f"at {encoder!r}" if encoder else "(the template)"
                raise ArgumentValueError(
                    f"Ensemble(execution='vmap') cannot run the nn.TransformerEncoder {where} "
                    "in eval mode without gradients: there each member takes "
                    "torch's nested-tensor fast path (given a src_key_padding_mask, it returns "
                    "zeros at the padded positions), which torch.vmap cannot run, and vmap's "
                    "standard path gives other values there. Fix: use execution='loop' (or "
                    "'auto', which runs the loop there), or build the encoder with "
                    "enable_nested_tensor=False.",
                    paths=[encoder] if encoder else [],
                )
            if self._last_plan != "loop":
                self._last_plan = "loop"  # what ran, for ensemble.plan
            return self._functional_loop(tensors, inputs, kwargs, changes, start)
        template = self.template

        structure: list[Any] = []
        # Buffers the forward replaced: the names of those given a tensor (vmap
        # returns tensors only: they come back as a second output), and the
        # other values assigned (restack refuses them).
        replaced: list[str] = []
        others: dict[str, Any] = {}

        compiling = torch.compiler.is_compiling()

        def one(t: dict[str, torch.Tensor], xs: tuple[Any, ...], kw: dict[str, Any]) -> Any:
            seen: dict[str, Any] | None = {} if changes is not None else None
            state = None if compiling else AttributeState(self._watched_template())
            out = self._call_template(t, xs, kw, seen)
            if state is not None:
                # What vmap made is batched at its level (or an inner one).
                level = transform_level()
                chunked = self.chunk_size is not None and self.chunk_size < self.num_members
                self._refuse_written(
                    state,
                    "under torch.vmap" + (" once per chunk" if chunked else ""),
                    lambda t: level is None or not made_at_level(t, level),
                    any_change=chunked,
                )
            if isinstance(out, torch.Tensor):
                result: Any = out
            else:
                # vmap returns tensors only: other leaves (None, a number) are kept
                # aside and put back, once for all members. The batched tensors
                # themselves must not be kept (they would escape vmap).
                leaves, spec = tree_flatten(out)
                check_output_leaves(leaves)
                structure[:] = [
                    [_BATCHED if isinstance(x, torch.Tensor) else x for x in leaves],
                    spec,
                ]
                result = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
            if seen is None:
                return result
            others.update((n, v) for n, v in seen.items() if not isinstance(v, torch.Tensor))
            replaced[:] = [n for n, v in seen.items() if isinstance(v, torch.Tensor)]
            return result, [seen[n] for n in replaced]

        kw = dict(kwargs)
        if self.per_member_inputs:
            # Keyword inputs are split like positional ones (vmap batches none by
            # itself); what is not a tensor (None, a number) is given to every member.
            def split(v: Any) -> Any:
                return 0 if isinstance(v, torch.Tensor) else None

            dims: Any = tuple(tree_map(split, x) for x in inputs)
            kw_dims: Any = {k: tree_map(split, v) for k, v in kw.items()}
        else:
            dims, kw_dims = None, None
        batched = torch.vmap(one, in_dims=(0, dims, kw_dims), randomness=self.randomness)
        # Shared inputs: vmap runs the forward once for all members, so an
        # in-place change to one (x.div_(255)) happens once, where a loop over
        # the members makes it once per member.
        if self.per_member_inputs:
            shared: Sequence[torch.Tensor] = ()
        elif not kw and all(isinstance(t, torch.Tensor) for t in inputs):
            shared = inputs  # the common case, without a tree walk
        else:
            shared = [t for t in tree_leaves((inputs, kw)) if isinstance(t, torch.Tensor)]
        # Inference tensors keep no version counter: a change to one under
        # torch.inference_mode() cannot be seen (reading it would raise).
        shared = [t for t in shared if not t.is_inference()]
        versions = [version_of(t) for t in shared]
        # A forward of the user's own may draw from Python's random or numpy,
        # which vmap would do once for all members (see _state.GlobalRandom).
        # Noting them costs about 20 to 60 microseconds, so the first vmap call
        # in train mode and the first in eval mode are watched (a forward
        # draws on every call of the mode it draws in, as a LayerDrop does).
        generators = None
        if not compiling and self.training not in self._draws_seen and self._watched_template():
            generators = GlobalRandom()
        # torch's fused eval fast paths (nn.TransformerEncoderLayer,
        # nn.MultiheadAttention) see no stacked parameter requiring grad
        # under vmap, so with gradients on they would run where the members do
        # not (their kernels have no derivative): vmap runs the members'
        # standard path then. Without gradients the members take the fast path
        # too (the nested-tensor one excepted, see _nested_encoder).
        standard = not compiling and torch.is_grad_enabled() and self._has_attention()
        # The lookups' watch costs every torch call of the forward (about 15 % of a
        # vmapped step of small layers): it is entered on the first call of each kind
        # with gradients, and not under torch.compile (see _padded_gradients).
        lookups = None
        if (
            not compiling
            and torch.is_grad_enabled()
            and (bool(self._padded()) or bool(self._watched_template()))
            and any(t.requires_grad for t in tensors.values())
        ):
            lookups = _call_kind(self.training, inputs, kw)
            if lookups in self._lookups_watched:
                lookups = None
        try:
            with (
                _standard_attention() if standard else contextlib.nullcontext(),
                PaddedLookupWatch(self._requested, tensors)
                if lookups
                else contextlib.nullcontext(),
            ):
                result = batched(tensors, inputs, kw)
            if lookups is not None:
                self._lookups_watched.add(lookups)
        except PaddedLookupError as e:
            self._padded_lookup = str(e)  # the calls after this one do not try vmap
            raise
        except CheckpointingRefused as e:
            # the members' own gradient checkpointing: the template's words and fix
            # were for a MetaTemplate the user did not build
            raise ArgumentValueError(
                f"Ensemble(execution='vmap') cannot run members that recompute activations "
                f"in backward (activation checkpointing) at {', '.join(map(repr, e.paths))}: "
                "the recomputation runs after torch.vmap has returned. Fix: use "
                "execution='loop' (or 'auto'), which runs them as the members do, or "
                f"disable it ({CHECKPOINTING_OFF}).",
                paths=e.paths,
            ) from e
        except MetaTensorError:
            raise  # the package's own refusals (_refuse_written) say what ran
        except RuntimeError as e:
            # torch's own refusals name vmap or its batching rules: an .item()
            # (BatchNorm with momentum=None), data-dependent control flow, an
            # autograd.Function without setup_context. The model's own errors
            # (a shape mismatch) pass through as they are.
            if "Batching rule" not in str(e) and "vmap" not in str(e):
                raise
            if self.randomness == "error" and "randomness" in str(e):
                # Every plan refuses the draw: the loop is no fix.
                raise ArgumentValueError(
                    "Ensemble(randomness='error'): the members drew random numbers (dropout "
                    "or another random op) under torch.vmap. Fix: pass "
                    "randomness='different' (one draw per member) or 'same' (one draw "
                    "shared), or call ensemble.eval()."
                ) from e
            fix = "pass execution='loop'"
            if self._requested == "vmap":
                how = "forced"
            elif untimed_reason() is not None:
                how = "used where no plan is timed"
            else:
                # Timed on an earlier call of this kind: a setting changed on the template
                # since (BatchNorm's momentum=None) makes torch refuse it now.
                how = "chosen by timing an earlier call of this kind"
                fix = (
                    "after changing a setting of the template, call ensemble.clear_plans() "
                    "so that the next call is timed again, or pass execution='loop'"
                )
            raise ArgumentValueError(
                f"Ensemble(execution={self._requested!r}) ran torch.vmap ({how}), which cannot "
                f"run {type(template.module).__name__}: {str(e).splitlines()[0]} Fix: {fix}."
            ) from e
        if generators is not None:
            drawn = generators.moved()
            if drawn:
                generators.restore()
                self._keeps_state()
                raise global_draw_error(self._requested, drawn, forced=self._requested != "auto")
            self._draws_seen.add(self.training)
        changed = [
            i for i, (t, v) in enumerate(zip(shared, versions, strict=True)) if version_of(t) != v
        ]
        if changed:
            raise ArgumentValueError(
                f"Ensemble(execution={self._requested!r}) ran torch.vmap, which runs the "
                "template's forward once for all members, and the forward changed its shared "
                f"input in place (tensor input{'s' if len(changed) > 1 else ''} "
                f"{', '.join(map(str, changed))} among the tensors in the inputs, in order): a "
                "loop over the members changes it once per member, each member seeing the "
                "previous member's change, so the results would differ from the members' own. "
                "The input has been changed once. Fix: change a copy in the forward "
                "(x = x / 255 instead of x.div_(255)), or pass execution='loop', which runs "
                "the members as a loop would."
            )
        if changes is not None:
            result, news = result
            size = next(iter(tensors.values())).shape[0]
            for name, new in zip(replaced, news, strict=True):
                per_member = changes.setdefault(name, {})
                for j, row in enumerate(new.unbind(0)):
                    per_member[start + j] = row
            for name, value in others.items():
                changes.setdefault(name, {}).update((start + j, value) for j in range(size))
        if not structure:
            return result
        leaves, spec = structure
        outs = iter(result)
        return tree_unflatten([next(outs) if x is _BATCHED else x for x in leaves], spec)

    def to(self, *args: Any, **kwargs: Any) -> Ensemble:  # type: ignore[override]
        """``nn.Module.to``; ``memory_format=`` lays out each member's slice of a stacked
        tensor as ``.to(memory_format=...)`` lays out that member's own tensor."""
        memory_format = kwargs.pop("memory_format", None)
        if memory_format is None or args or kwargs:
            super().to(*args, **kwargs)
        if memory_format is not None:
            self._to_memory_format(memory_format)
        return self

    def _to_memory_format(self, memory_format: torch.memory_format) -> None:
        # nn.Module.to converts the 4-D and 5-D tensors of a module; a stacked
        # tensor has one dim more than the member's, so its slices are converted.
        if memory_format == torch.preserve_format:
            return  # each tensor as it is
        named = [*self.stacked.named_parameters(), *self.stacked.named_buffers()]
        refused = []
        for name, t in named:
            if t.dim() in (5, 6):
                try:
                    torch.empty(t.shape[1:], device="meta").to(memory_format=memory_format)
                except RuntimeError as e:
                    refused.append((name, t.dim() - 1, str(e)))
        if refused:
            names = [name for name, _, _ in refused]
            _, dims, why = refused[0]
            raise ArgumentValueError(
                f"Ensemble.to(memory_format={memory_format}) cannot lay out {names}: the "
                f"members' tensors there have {dims} dims, and torch refuses them as it "
                f"would on the members ({why}). Fix: use torch.channels_last for 4-D "
                "(Conv2d) and torch.channels_last_3d for 5-D (Conv3d) weights.",
                paths=names,
            )

        def lay_out(t: torch.Tensor) -> torch.Tensor:
            if t.dim() not in (5, 6):
                return t
            member = torch.empty_like(t[0], device="meta").to(memory_format=memory_format)
            strides = (member.numel(), *member.stride())
            if t.stride() == strides:
                return t
            out = torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)
            return out.copy_(t)

        apply_to_tensors(self, lay_out)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        # .to(), .cuda(), .half(), ... replace the stacked tensors: drop the
        # views of (and the gradient memory beside) the old ones first.
        for cache in ("_views", "_grads"):
            if cache in self.__dict__:
                self.__dict__[cache].clear()
        if "_shells" in self.__dict__:
            # The copies keep what each member's forward stored (plain
            # attributes, which .to() leaves alone on the members too).
            self._shells.release()
        memory_format = to_memory_format(fn)
        if memory_format is None:
            return module_apply(self, fn, recurse)
        # A parent's .to(memory_format=...): its conversion would lay out the
        # stacked tensors by their own dims (refusing a 5-D stack of Conv2d
        # weights, converting a 4-D stack of Conv1d ones); convert dtype and
        # device alone here, then lay out each member's slice as Ensemble.to does.
        module_apply(self, functools.partial(_convert_keeping_layout, fn), recurse)
        self._to_memory_format(memory_format)
        return self

    # ------------------------------------------------------- copy and pickle
    def __getstate__(self) -> dict[str, Any]:
        # A requires_grad set on the template since the last call is put on the stacked
        # tensors first: the copy walks its template anew and would take it as built.
        self._follow_template_grads()
        state = dict(self.__dict__)
        state["_member_slots"] = None  # refers to the template's modules; rebuilt on use
        state["_renormed_for"] = None
        state["_aliases"] = {}
        state["_holders"] = None
        state["_checked_classes"] = None
        state["_last_plan"] = None
        state["_walk"] = None  # refers to the template's modules; walked again on use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_mode_applied" not in state:  # pickled by a version that kept no modes
            self._mode_applied = self.template.module.training
            self._modes_before_eval = None
        # Pickled by a version that did not watch the forward's attributes.
        self.__dict__.setdefault("_writes_state", False)
        self.__dict__.setdefault("_ran_shared", False)
        self.__dict__.setdefault("_follows_training", True)
        self.__dict__.setdefault("_walk", None)
        self.__dict__.setdefault("_checked_classes", None)
        self.__dict__.setdefault("_draws_seen", set())
        self.__dict__.setdefault("_lost", [])
        self.__dict__.setdefault("_renormed_for", None)
        self.__dict__.setdefault("_renormed_names", ())
        self.__dict__.setdefault("_renormed_paths", [])
        if "_sparse" not in self.__dict__:  # pickled by a version that did not look
            self._sparse = _sparse_gradients(self.template.module)
        self.__dict__.pop("_padded", None)  # pickled by a version that kept it: looked up now
        self.__dict__.setdefault("_padded_lookup", None)
        self.__dict__.setdefault("_lookups_watched", set())
        if "_recurrent" not in self.__dict__:  # likewise
            self._recurrent = _recurrent_layers(self.template.module)
            if (
                self._recurrent
                and self.__dict__.get("execution") == "vmap"
                and self.__dict__.get("_requested", "auto") == "auto"
            ):
                self.execution = "loop"  # auto's plan where nothing is timed, as __init__'s
        if isinstance(self.__dict__.get("_fused"), FusedPlan):
            # Planned again from the template: an earlier pickle's steps read a
            # tied tensor by the layer's own name (and have another form).
            fused = plan_fused(self.template.module, self.randomness)
            self._fused = fused if isinstance(fused, FusedPlan) else None
        if "_plans" not in state:  # pickled by a version without plans
            self._requested = state.get("execution", "auto")
            self._buffer_names = tuple(name for name, _ in self.template.module.named_buffers())
            self._init_caches()

    def extra_repr(self) -> str:
        arch = type(self.template.module).__name__
        plan = "" if self._last_plan is None else f", plan={self._last_plan!r}"
        return (
            f"num_members={self.num_members}, template={arch}, execution={self._requested!r}"
            f"{plan}, randomness={self.randomness!r}, per_member_inputs={self.per_member_inputs}"
        )


def _packed_once(out: Any, depth: int = 0) -> Any:
    """``out`` with each ``PackedSequence`` in it (an ``nn.LSTM`` given a packed input)
    holding its members' data stacked, ``(N, total, *)``, and its ``batch_sizes`` and
    indices once, as each member's: every plan stacks all four, and a stacked
    ``batch_sizes`` made torch's ``pad_packed_sequence`` fail on ``PackedSequence(
    out.data[i], out.batch_sizes, ...)`` (before 2026-12-07, seventh session).

    Raises:
        ArgumentValueError: the members' batch sizes or orders differ (per-member inputs
            of other lengths), which one ``PackedSequence`` cannot hold.
    """
    if isinstance(out, PackedSequence):
        if out.batch_sizes.dim() != 2:
            return out
        once: list[torch.Tensor | None] = []
        for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            t = getattr(out, name)
            if t is not None and not all(torch.equal(t[0], row) for row in t[1:]):
                raise ArgumentValueError(
                    f"Ensemble members returned PackedSequences of other {name} (inputs of "
                    "other lengths per member), which one PackedSequence cannot hold. Fix: "
                    "unpack them in the forward (pad_packed_sequence) and return the padded "
                    "tensor and the lengths."
                )
            once.append(t[0] if t is not None else None)
        return PackedSequence(out.data, *once)
    if depth >= 4:
        return out
    if type(out) in (tuple, list) or (isinstance(out, tuple) and hasattr(out, "_fields")):
        items = [_packed_once(x, depth + 1) for x in out]
        if all(a is b for a, b in zip(items, out, strict=True)):
            return out
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    if isinstance(out, MutableMapping):  # a dict, an OrderedDict, transformers' ModelOutput
        for k, v in list(out.items()):
            new = _packed_once(v, depth + 1)
            if new is not v:
                out[k] = new  # the ensemble's own output, made by its stacking
    return out
