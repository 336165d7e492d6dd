"""One rank's training step under DDP, FSDP2 and tensor parallelism, simulated on fake tensors.

No process group is created and nothing is communicated: the rank's step is
the single-process step of :mod:`~lightning_meta._estimate._run`, run on the
rank's share of the model, with the buffers the strategy allocates made at
the moments it allocates them. What each strategy holds, per rank:

* **DDP** (``DistributedDataParallel`` as Lightning's ``DDPStrategy`` wraps
  it): the whole model, its gradients and optimizer state, and the gradient
  buckets (one flat buffer per dtype, as large as the gradients; with
  ``gradient_as_bucket_view`` the gradients are views into them). Before
  every forward, DDP broadcasts the model's buffers from rank 0
  (``broadcast_buffers=True``, DDP's and Lightning's default) through
  ``torch.distributed._broadcast_coalesced``, which copies them into one flat
  tensor per bucket while the broadcast runs (:func:`buffer_sync_bytes`).
* **FSDP2** (``fully_shard`` on every block, then on the root, as in
  Lightning's ``ModelParallelStrategy`` and torchtitan): each parameter's
  padded dim-0 shard, the same shards of gradients and optimizer state, and
  per unit the all-gather and reduce-scatter buffers and unsharded
  parameters of torch's ``FSDPParamGroup``, when it has them
  (:mod:`~lightning_meta._estimate._fsdp2`). With a ``MixedPrecisionPolicy``,
  unsharded parameters and gradients are in ``param_dtype``, the
  reduce-scatter in ``reduce_dtype``.
* **Tensor parallelism** (torch's ``ColwiseParallel`` / ``RowwiseParallel``,
  without sequence parallelism): split layers hold their slice of the
  weight; a row-wise layer's output is all-reduced into a new tensor, a
  column-wise layer's input gradient likewise, and a gathered column-wise
  output (``colwise_rep``) is all-gathered into the full width.
* **The backend**: NCCL writes collectives into their buffers; with
  ``backend="gloo"`` (CPU processes) each all-gather and reduce-scatter also
  stages a copy of its full-size buffer while it runs, as gloo does.
* **Activation checkpointing** (non-reentrant, ``checkpoint_wrapper`` on
  every block): block forwards run under ``torch.utils.checkpoint`` and are
  recomputed in backward, whose FLOPs then include them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_meta._compat import FakeTensorMode, is_transformers_object
from lightning_meta._estimate._fsdp2 import FSDP2, UnitState, unit_hooks
from lightning_meta._estimate._layout import Layout, shard_rows
from lightning_meta._estimate._track import LiveBytes

__all__ = ["RankStep"]


# DistributedDataParallel's broadcast_bucket_size, and how many of its buffer
# broadcasts torch.distributed._broadcast_coalesced keeps in flight
# (torch/csrc/distributed/c10d/comm.cpp: max_in_flight).
_BROADCAST_BUCKET = 250 * 1024 * 1024
_IN_FLIGHT = 2


def buffer_sync_bytes(buffers: list[torch.Tensor]) -> int:
    """Return the most bytes DDP's buffer broadcast holds at once, besides the buffers.

    ``_broadcast_coalesced`` groups the tensors by dtype and device into
    buckets of ``broadcast_bucket_size`` (a bucket closes once it reaches the
    size), flattens each bucket into a new tensor (one contiguous tensor is
    broadcast as it is: no copy), and keeps two buckets in flight, copying a
    bucket back and freeing it before the third starts.

    Example::

        >>> buffer_sync_bytes([torch.zeros(1024), torch.zeros(1024)])  # one flat copy
        8192
        >>> buffer_sync_bytes([torch.zeros(1024)])
        0
    """
    buckets: list[list[int]] = []
    open_: dict[tuple[torch.dtype, torch.device], tuple[list[int], list[int]]] = {}
    for i, t in enumerate(buffers):
        indices, size = open_.setdefault((t.dtype, t.device), ([], [0]))
        indices.append(i)
        size[0] += t.numel() * t.element_size()
        if size[0] >= _BROADCAST_BUCKET:
            buckets.append(list(indices))
            del open_[(t.dtype, t.device)]
    buckets.extend(indices for indices, _ in open_.values())
    buckets.sort(key=min)
    flats = [
        0
        if len(b) == 1 and buffers[b[0]].is_contiguous()
        else sum(buffers[i].numel() * buffers[i].element_size() for i in b)
        for b in buckets
    ]
    return max(
        (sum(flats[max(0, k - _IN_FLIGHT + 1) : k + 1]) for k in range(len(flats))), default=0
    )


def _floating(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _stand_in(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, like: torch.Tensor
) -> torch.Tensor:
    new = torch.empty(shape, dtype=dtype, device=device)
    return (
        nn.Parameter(new, requires_grad=like.requires_grad)
        if isinstance(like, nn.Parameter)
        else new
    )


# ------------------------------------------------------------ collectives, as autograd sees them


class _GradAllReduce(torch.autograd.Function):
    """A column-wise layer's replicated input: its gradient is all-reduced into a new tensor."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone()


class _AllReduce(torch.autograd.Function):
    """A row-wise layer's partial output, all-reduced into a new tensor (backward: as is)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _AllGather(torch.autograd.Function):
    """A column-wise output gathered to full width: gathered on dim 0, then concatenated."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ranks: int) -> torch.Tensor:
        ctx.ranks = ranks
        gathered = x.new_empty((x.shape[0] * ranks, *x.shape[1:]))
        out = x.new_empty((*x.shape[:-1], x.shape[-1] * ranks))
        del gathered
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.narrow(-1, 0, grad.shape[-1] // ctx.ranks).contiguous(), None


# ------------------------------------------------------------ the rank's step


class RankStep:
    """Stand-ins, buffers and hooks of one rank's training step under ``layout``.

    Args:
        module: the model (possibly cut to a few of its blocks).
        layout: the rank's layout of the *full* model (shapes by name).
        mode: the step's ``FakeTensorMode``.
        device: the simulated device.
        cast_to: the dtype of floating tensors under a ``*-true`` precision.

    Attributes:
        state: what the forward computes with, by name: each parameter in its
            tensor-parallel shape (unsharded, in FSDP2's ``param_dtype``).
        optimizer_params: what the optimizer steps (FSDP2: the shards).
        held: the parameters the rank keeps between steps (tracked as such).
        grad_params: the parameters autograd accumulates gradients into.
    """

    def __init__(
        self,
        module: nn.Module,
        layout: Layout,
        mode: FakeTensorMode,
        device: torch.device,
        cast_to: torch.dtype | None,
    ) -> None:
        self.layout = layout
        self.parallel = layout.parallel
        self.device = device
        fsdp = self.parallel.strategy == "fsdp"
        param_dtype = self.parallel.param_dtype if fsdp else None
        self.state: dict[str, torch.Tensor] = {}
        made: dict[int, torch.Tensor] = {}
        self._shards: dict[int, nn.Parameter] = {}
        self._shard_of: dict[str, nn.Parameter] = {}
        with mode:
            for named in (module.named_parameters, module.named_buffers):
                for name, t in named(remove_duplicate=False):
                    if id(t) not in made:
                        dtype = cast_to if cast_to is not None and _floating(t) else t.dtype
                        shape = layout.local_shapes[name]
                        compute = (
                            param_dtype
                            if param_dtype is not None
                            and isinstance(t, nn.Parameter)
                            and _floating(t)
                            else dtype
                        )
                        made[id(t)] = _stand_in(shape, compute, device, t)
                        if fsdp and isinstance(t, nn.Parameter):
                            rows = shard_rows(shape[0], self.parallel.data_parallel) if shape else 0
                            local = (rows, *shape[1:]) if shape else shape
                            self._shards[id(t)] = nn.Parameter(
                                torch.empty(local, dtype=dtype, device=device),
                                requires_grad=t.requires_grad,
                            )
                    self.state[name] = made[id(t)]
                    if id(t) in self._shards:
                        self._shard_of[name] = self._shards[id(t)]
        unique = list({id(t): t for t in self.state.values()}.values())
        params = [t for t in unique if isinstance(t, nn.Parameter)]
        self.grad_params = [p for p in params if p.requires_grad]
        #: what the forward computes with but the rank does not keep (FSDP2's unsharded parameters)
        self.unsharded: list[torch.Tensor] = list(params) if fsdp else []
        self.held: list[nn.Parameter]
        if fsdp:
            self.held = list(self._shards.values())
            self.optimizer_params = [p for p in self.held if p.requires_grad]
        else:
            self.held = params
            self.optimizer_params = self.grad_params
        self._module = module
        #: calls of split layers: (name, phase, local matmul FLOPs, gradients computed)
        self._calls: list[tuple[str, str, int, int]] = []
        self._buckets: list[torch.Tensor] = []
        self._fsdp: FSDP2 | None = None
        #: the stand-ins of the model's buffers, in DDP's order (its broadcast before a forward)
        self.buffers = [self.state[name] for name, _ in module.named_buffers()]

    # -- persistent buffers
    def setup(self, mode: FakeTensorMode, tracker: LiveBytes) -> None:
        """Allocate what lives across steps besides parameters and optimizer state: DDP's buckets."""
        if self.parallel.strategy != "ddp" or not self.grad_params:
            return
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self.grad_params:
            by_dtype.setdefault(p.dtype, []).append(p)
        views = self.parallel.gradient_as_bucket_view
        self._views: dict[int, torch.Tensor] = {}
        with mode:
            for dtype, params in by_dtype.items():
                bucket = torch.empty(
                    (sum(p.numel() for p in params),), dtype=dtype, device=self.device
                )
                offset = 0
                for p in params:
                    self._views[id(p)] = bucket.narrow(0, offset, p.numel()).view(p.shape)
                    offset += p.numel()
                    if views and p.grad is not None:
                        p.grad = self._views[id(p)]
                self._buckets.append(bucket)
        for bucket in self._buckets:
            tracker.track(bucket, "gradients" if views else "communication")

    @contextlib.contextmanager
    def hooks(self, tracker: LiveBytes, modules_tracker: Any = None) -> Iterator[RankStep]:
        """Install the strategy's hooks on the model for the body; removed afterwards.

        ``modules_tracker`` is the step's ``ModuleTracker``: a recomputation
        that activation checkpointing stops early leaves the modules it
        entered in its ``parents``, which are restored.
        """
        with contextlib.ExitStack() as stack:
            modules = dict(self._module.named_modules())
            for name, kind in self.layout.tp_modules.items():
                if name in modules:
                    stack.enter_context(
                        _tensor_parallel(
                            modules[name],
                            kind,
                            self.parallel.tensor_parallel,
                            self._split_calls(name, tracker),
                        )
                    )
            if self.parallel.activation_checkpointing:
                for name in self.layout.blocks:
                    if name in modules:
                        stack.enter_context(_checkpointed(modules[name], modules_tracker))
            if self.parallel.strategy == "fsdp":
                self._fsdp = self._make_fsdp(modules, tracker)
                for u in self._fsdp.units:
                    stack.enter_context(unit_hooks(self._fsdp, u, root=u.unit.name == ""))
            else:
                if self.parallel.gradient_as_bucket_view:
                    stack.enter_context(self._bucket_views())
                if self.parallel.broadcast_buffers:
                    stack.enter_context(self._buffer_sync(tracker))
            yield self

    @contextlib.contextmanager
    def _buffer_sync(self, tracker: LiveBytes) -> Iterator[None]:
        """DDP: count the flat copies of its buffer broadcast when the root's forward starts,
        before any hook of the model's own (DDP's forward runs it before the module's)."""
        nbytes = buffer_sync_bytes(self.buffers)
        if not nbytes:
            yield
            return

        def sync(mod: nn.Module, args: tuple[Any, ...]) -> None:
            tracker.momentary(nbytes, "communication")

        handle = self._module.register_forward_pre_hook(sync, prepend=True)
        try:
            yield
        finally:
            handle.remove()

    def block_count(self, prefix: str) -> int | None:
        """Return how many blocks the container named by the counter's ``prefix`` holds now."""
        name = prefix.rstrip(".").partition(".")[2]
        try:
            return len(list(self._module.get_submodule(name).children()))
        except AttributeError:
            return None

    def _split_calls(self, name: str, tracker: LiveBytes) -> Callable[[nn.Module, Any], None]:
        """Note each call of split layer ``name``: its matmul FLOPs, and whether in backward."""

        def note(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            weight = getattr(mod, "weight", None)
            if not isinstance(mod, nn.Linear) or x is None or weight is None:
                return  # an embedding: FlopCounterMode counts no FLOPs for it
            rows = x.numel() // max(1, weight.shape[1])
            flops = 2 * rows * weight.shape[0] * weight.shape[1]
            grads = int(x.requires_grad) + int(weight.requires_grad)
            self._calls.append((name, tracker.phase, flops, grads))

        return note

    def count_as_dtensor(self, record: Any) -> None:
        """Count split layers as ``FlopCounterMode`` counts their ``DTensor`` ops: at unsplit size.

        The rank computes ``1 / tensor_parallel`` of a split layer's matmuls;
        ``FlopCounterMode`` on the real rank sees the layer's ``DTensor``
        operations with their global shapes. ``record`` keeps the rank's own
        totals (``rank_forward_flops``, ``rank_backward_flops``) and its
        FLOPs, per module and in total, become what the counter reports.
        """
        record.rank_forward_flops = record.forward_flops.get("", 0)
        record.rank_backward_flops = record.backward_flops.get("", 0)
        extra = self.parallel.tensor_parallel - 1
        for name, phase, flops, grads in self._calls:
            parts = name.split(".")
            holders = ["", *(".".join(parts[: i + 1]) for i in range(len(parts)))]
            if phase == "forward":  # the forward, and its backward (input and weight gradients)
                counts = (
                    (record.forward_flops, flops * extra),
                    (record.backward_flops, flops * extra * grads),
                )
            else:  # recomputed in backward by activation checkpointing
                counts = ((record.backward_flops, flops * extra), (record.backward_flops, 0))
            for table, add in counts:
                for holder in holders:
                    if add and (holder in table or holder == name or holder == ""):
                        table[holder] = table.get(holder, 0) + add

    def after_backward(self) -> None:
        """Run what FSDP2 runs when backward ends (its root's final callback)."""
        if self._fsdp is not None:
            self._fsdp.finish_backward()

    def _make_fsdp(self, modules: dict[str, nn.Module], tracker: LiveBytes) -> FSDP2:
        parallel = self.parallel
        states = []
        for unit in self.layout.units:
            if unit.name and unit.name not in modules:
                continue  # a block cut away for a sample step
            mod = modules[unit.name]
            prefix = f"{unit.name}." if unit.name else ""
            own = [prefix + n for n, _ in mod.named_parameters()]
            owned = set(unit.params)
            compute, shards, numel, grad_numel = [], [], 0, 0
            for name in own:
                if name not in owned:
                    continue
                p = self.state[name]
                shard = self._shard_of[name]
                assert isinstance(p, nn.Parameter)
                compute.append(p)
                shards.append(shard)
                numel += shard.numel()
                grad_numel += shard.numel() if shard.requires_grad else 0
            states.append(UnitState(unit, compute, shards, numel, grad_numel))
        dtypes = {p.dtype for u in states for p in u.compute if _floating(p)}
        param_dtype = parallel.param_dtype or (dtypes.pop() if len(dtypes) == 1 else torch.float32)
        orig = {p.dtype for u in states for p in u.shards if _floating(p)}
        cast = parallel.param_dtype is not None and orig != {parallel.param_dtype}
        return FSDP2(
            states,
            parallel.data_parallel,
            param_dtype,
            cast,
            parallel.reduce_dtype,
            self.device,
            tracker,
            parallel.reshard_after_forward,
            parallel.backend == "gloo",
        )

    @contextlib.contextmanager
    def _bucket_views(self) -> Iterator[None]:
        """DDP with ``gradient_as_bucket_view``: each new gradient becomes a view into its bucket."""

        def to_bucket(p: torch.Tensor) -> None:
            p.grad = self._views[id(p)]

        handles = [p.register_post_accumulate_grad_hook(to_bucket) for p in self.grad_params]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


@contextlib.contextmanager
def _tensor_parallel(
    module: nn.Module, kind: str, ranks: int, note: Callable[[nn.Module, Any], None]
) -> Iterator[None]:
    """The collectives of one split layer, as autograd functions around it; ``note`` sees each call."""

    def pre(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            return (_GradAllReduce.apply(args[0]), *args[1:])
        return args

    def post(mod: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        # noted once the forward ran: a recomputation may stop early inside it
        note(mod, args)
        if kind == "rowwise":
            out: torch.Tensor = _AllReduce.apply(output)
        elif kind == "colwise_gather":
            out = _AllGather.apply(output, ranks)
        else:
            out = output
        return out

    handles = [module.register_forward_hook(post)]
    if kind in ("colwise", "colwise_gather"):
        handles.append(module.register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# the arguments of transformers' blocks that carry a cache (GradientCheckpointingLayer's)
_CACHES = ("past_key_value", "past_key_values", "layer_past")


@contextlib.contextmanager
def _checkpointed(block: nn.Module, modules_tracker: Any = None) -> Iterator[None]:
    """Run ``block``'s forward under non-reentrant activation checkpointing for the body.

    The recomputation in backward stops early (by raising inside torch) once
    it has what backward needs; the modules it entered are then taken out of
    ``modules_tracker.parents`` again, so that later FLOPs are not counted to them.
    """
    had = "forward" in vars(block)
    inner = block.forward

    def run(*args: Any, **kwargs: Any) -> Any:
        parents = getattr(modules_tracker, "parents", None)
        if parents is None or not modules_tracker.is_bw:
            return inner(*args, **kwargs)
        saved = set(parents)
        try:
            return inner(*args, **kwargs)
        finally:
            parents.clear()
            parents.update(saved)

    try:
        signature: inspect.Signature | None = inspect.signature(inner)
    except (TypeError, ValueError):
        signature = None
    from_transformers = is_transformers_object(block)
    # the name of its **kwargs, where the cache can also arrive
    extra = next(
        (
            p.name
            for p in (signature.parameters.values() if signature else ())
            if p.kind is p.VAR_KEYWORD
        ),
        "",
    )

    def forward(*args: Any, **kwargs: Any) -> Any:
        # A cache the block appends to would grow again when recomputed: dropped,
        # as transformers' GradientCheckpointingLayer drops it; found by name also
        # where the model passes it by position (GPT-2's blocks get
        # past_key_values second: the recomputation failed, "different metadata").
        try:
            bound = signature.bind_partial(*args, **kwargs) if signature is not None else None
        except TypeError:
            bound = None
        named = [bound.arguments, bound.arguments.get(extra, {})] if bound is not None else [kwargs]
        changed = False
        for given in named:
            for key in _CACHES:
                # transformers' Cache objects only: a tensor under such a name (a learned
                # prefix) is an input the recomputation needs, not a cache
                if is_transformers_object(given.get(key)):
                    given[key], changed = None, True
            if given.get("use_cache") and from_transformers:
                given["use_cache"], changed = False, True
        if changed and bound is not None:
            args, kwargs = bound.args, bound.kwargs
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    block.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had:
            block.forward = inner  # type: ignore[method-assign]
        else:
            del block.forward
