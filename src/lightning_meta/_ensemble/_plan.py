"""Choosing how an ensemble runs: timed per kind of call, then cached.

No plan is fastest everywhere: a batched matmul wins for MLPs, a loop over
the members for most other layers on the CPU, ``torch.vmap`` for small
layers on an accelerator, and the order changes with the batch, the number
of members, the dtype, the number of threads and whether a backward
follows. ``execution="auto"`` therefore times every plan that applies the
first time it sees a kind of call (its :func:`signature`) and keeps the
fastest for later calls of that kind. It times them once more at the
``RETIME_CALL``-th call of that kind and keeps that choice for good: the
first call of a training run is where one-off costs pile up (lazy
initialisation, the allocator growing, data-loader workers starting on the
other cores), so a choice made there can be 1.7x off (measured on a loaded
2-core machine); by the later call the process runs as it will run.

Timing does not change what the user sees of a forward that does not
write into its parameters: the candidates run on aliases of the parameters
(their gradients land on the aliases, not on the ensemble's parameters;
without gradients, on the parameters themselves), on copies of the buffers
(BatchNorm's running statistics are not advanced) and of the inputs, and the
random number generators are put back afterwards, so the call that follows
draws what it would have drawn without the timing; saved-tensor hooks the
caller runs under (activation checkpointing) do not see the timed runs.
``forward`` code with Python-level side effects (a counter attribute, a
print) sees them, and so does a forward that writes into a parameter in
place (``nn.Embedding(max_norm=...)`` renormalises rows it looks up): the
aliases share the parameters' storage. Pass ``execution=`` to skip timing.

On one CPU thread the clock is the thread's own CPU time, so other processes
on a shared machine do not decide the plan; elsewhere it is wall time (with
the accelerator synchronised). Plans within noise of each other may be
chosen either way; any of them gives the same results up to floating-point
reassociation.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import statistics
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_meta._compat import (
    functorch_transform_active,
    tree_leaves,
    tree_map,
    tree_map_only,
    version_of,
)

__all__ = [
    "RETIME_CALL",
    "channels_last",
    "PlanCache",
    "PlanRecord",
    "fast_key",
    "measure",
    "signature",
    "untimed_reason",
]

logger = logging.getLogger(__name__)

Runner = Callable[[str, Mapping[str, torch.Tensor], tuple[Any, ...], Mapping[str, Any]], Any]

# After one untimed warm-up run each, candidates are timed in rounds (the
# order alternating from round to round); a candidate whose best round is more
# than _DROP_RATIO slower than the best is not run again. Rounds go on while
# two or more remain, at least _MIN_ROUNDS and at most _MAX_ROUNDS, and past
# _MIN_ROUNDS only while the timing has taken less than _BUDGET_SECONDS, or
# _CLOSE_BUDGET_FACTOR times that while the two best medians are within
# _CLOSE_RATIO of each other; those close calls go on up to _MAX_CLOSE_ROUNDS
# rounds (with a few milliseconds a call, nine rounds take a fraction of the
# budget). After the first round only a candidate more than
# _FIRST_DROP_RATIO slower is dropped. The finalists are ranked by their
# median ratio to the round's fastest: the plans of one round run back to
# back, so a slow stretch of the machine slows them alike, where it would
# move one plan's median and not the other's. Two plans 5 % apart
# (transformer layers: loop against vmap) were swapped in 3 of 10 timings by
# their medians of nine rounds.
_MIN_ROUNDS = 3
_MAX_ROUNDS = 9
_MAX_CLOSE_ROUNDS = 33
_BUDGET_SECONDS = 2.0
_CLOSE_RATIO = 1.1
_CLOSE_BUDGET_FACTOR = 3
_DROP_RATIO = 1.5
_FIRST_DROP_RATIO = 4.0
# A round repeats a candidate until it has run this long (seconds), so very
# small ensembles are not timed at the clock's resolution.
_MIN_ROUND_SECONDS = 2e-3
_MAX_REPEATS = 16
# The call of a kind at which its plans are timed again (the first is call 1).
RETIME_CALL = 16


@dataclass(frozen=True)
class PlanRecord:
    """How calls of one kind run.

    Attributes:
        signature: the kind of call (inputs' shapes rounded up to powers of
            two, dtypes, devices; train/eval, and the template's modules in
            another mode; gradients on/off; autocast;
            threads).
        plan: ``"fused"``, ``"grouped"``, ``"vmap"`` or ``"loop"``.
        how: ``"timed"`` (at the first call of its kind), ``"timed again"``
            (at call ``RETIME_CALL``, whose choice replaces the first one
            and is kept; a call on which every plan raises keeps the first
            one instead), ``"only plan"``, ``"random draws"`` (a timed run
            drew random numbers: the plans that draw the members' masks were
            timed, the loop and, where they can, the fused and grouped plans), or ``"forward keeps state"`` (the loop:
            a timed run's forward stored something in a module's plain
            attributes, which only the loop keeps for each member).
        timings_ms: the median time of each timed candidate in milliseconds
            (``inf``: it raised); empty for ``"only plan"``.
    """

    signature: str
    plan: str
    how: str
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        times = ", ".join(f"{k} {v:.3g} ms" for k, v in self.timings_ms.items())
        return f"{self.plan} ({self.how}{': ' + times if times else ''}) for {self.signature}"


class PlanCache:
    """The plans chosen so far, by signature (least recently used dropped beyond ``limit``).

    Timings belong to the machine and process that made them: a pickled or
    copied ensemble starts with an empty cache.
    """

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._records: OrderedDict[str, PlanRecord] = OrderedDict()
        # Exact calls already seen (see fast_key): a dict lookup per call
        # instead of building the signature.
        self._fast: dict[tuple[Any, ...], PlanRecord] = {}
        # Calls so far of each kind whose choice was timed once only.
        self._calls: dict[str, int] = {}

    def __reduce__(self) -> tuple[type[PlanCache], tuple[int]]:
        return (PlanCache, (self.limit,))

    def __deepcopy__(self, memo: dict[int, Any]) -> PlanCache:
        return PlanCache(self.limit)

    def get(self, key: str) -> PlanRecord | None:
        record = self._records.get(key)
        if record is not None:
            self._records.move_to_end(key)
        return record

    def add(self, record: PlanRecord) -> None:
        gone = [self._records.pop(record.signature)] if record.signature in self._records else []
        self._records[record.signature] = record
        while len(self._records) > self.limit:
            gone.append(self._records.popitem(last=False)[1])
        if gone:  # timed again, or dropped: exact calls no longer follow the old record
            self._fast = {k: v for k, v in self._fast.items() if all(v is not g for g in gone)}
            for old in gone:
                self._calls.pop(old.signature, None)

    def due(self, record: PlanRecord) -> bool:
        """Count a call that follows ``record``; whether its kind is to be timed again now.

        A record timed at the first call of its kind is timed again once, at
        call :data:`RETIME_CALL` (calls that cannot be timed do not count).
        """
        if record.how != "timed":
            return False
        calls = self._calls.get(record.signature, 1) + 1
        self._calls[record.signature] = calls
        return calls == RETIME_CALL

    def records(self) -> tuple[PlanRecord, ...]:
        return tuple(self._records.values())

    def clear(self) -> None:
        self._records.clear()
        self._fast.clear()
        self._calls.clear()

    def seen(self, fast: tuple[Any, ...] | None) -> PlanRecord | None:
        """The record of an exact call seen before (``fast`` from :func:`fast_key`).

        Its kind becomes the most recently used: a kind served only by exact
        calls is not the first one dropped.
        """
        record = None if fast is None else self._fast.get(fast)
        if record is not None:
            self._records.move_to_end(record.signature)
        return record

    def remember(self, fast: tuple[Any, ...] | None, record: PlanRecord) -> None:
        if fast is None:
            return
        if len(self._fast) >= 4 * self.limit:
            self._fast.clear()
        self._fast[fast] = record


def _bucket(size: int) -> int:
    return size if size <= 1 else 1 << (size - 1).bit_length()


def _named_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _describe_tree(tree: Any) -> Any:
    return tree_map(_describe, tree, is_leaf=_named_tuple)


def channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` (4-D or 5-D) is laid out channels_last and not as contiguous: a
    convolution's output then is too. With one channel ``is_contiguous()`` holds either
    way; the strides tell them apart."""
    if t.dim() not in (4, 5) or t.layout is not torch.strided:
        return False
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    if not t.is_contiguous(memory_format=fmt):
        return False
    contiguous, step = [], 1
    for size in reversed(t.shape):
        contiguous.append(step)
        step *= size
    return t.stride() != tuple(reversed(contiguous))


def _describe(x: Any) -> str:
    if _named_tuple(x):
        # Field by field: a named tuple rebuilt with descriptions would meet
        # its own checks (PackedSequence reads its data's device).
        fields = ", ".join(f"{f}={_describe_tree(v)}" for f, v in zip(x._fields, x, strict=True))
        return f"{type(x).__module__}.{type(x).__qualname__}({fields})"
    if isinstance(x, torch.Tensor):
        shape = ",".join(str(_bucket(s)) for s in x.shape)
        grad = "+grad" if x.requires_grad else ""
        # A sparse (or other layout's) input is a kind of its own: a plan timed on dense
        # inputs of the same shape (fused, which reshapes) fails on it.
        layout = "" if x.layout is torch.strided else f"/{str(x.layout).removeprefix('torch.')}"
        if channels_last(x):  # decides the plans that apply (see Ensemble._time)
            layout = "/channels_last"
        return f"{str(x.dtype).removeprefix('torch.')}[{shape}]{layout}@{x.device}{grad}"
    if x is None or isinstance(x, (bool, str)):
        return repr(x)
    if isinstance(x, (int, float)) and x == 0:
        # Zero often switches part of a forward off (noise_std=0.0, a dropout p of 0):
        # a kind of its own, timed apart, so one timed without draws is not reused
        # for a call that draws (other numbers are one kind: a step counter).
        return f"{type(x).__name__}=0"
    return type(x).__name__


def signature(
    inputs: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    training: bool,
    stacked: torch.Tensor | None,
    modes: str = "",
) -> str:
    """Describe a call for the plan cache: calls with the same description share a plan.

    Dimensions are rounded up to a power of two, so inputs of varying length
    (sequences) are timed once per octave, not once per length.
    """
    structure = _describe_tree((list(inputs), dict(kwargs)))
    device = stacked.device if stacked is not None else torch.device("cpu")
    mode = ["train" if training else "eval"]
    if modes:  # modules in other modes than the ensemble's (see _TemplateWalk.describe)
        mode.append(modes)
    if torch.is_inference_mode_enabled():
        mode.append("inference")
    elif not torch.is_grad_enabled():
        mode.append("no_grad")
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        mode.append(f"autocast={str(dtype).removeprefix('torch.')}")
    mode.append(f"threads={torch.get_num_threads()}")
    if stacked is not None:
        mode.append(f"params={str(stacked.dtype).removeprefix('torch.')}@{device}")
    return f"{structure} {' '.join(mode)}"


def fast_key(
    inputs: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    training: bool,
    stacked: torch.Tensor | None,
    modes: tuple[bool, ...] = (),
) -> tuple[Any, ...] | None:
    """An exact, cheap key for calls with tensor inputs only (``None`` for any other call).

    Calls with equal keys have equal signatures (see :func:`signature`).
    """
    if kwargs:
        return None
    described = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            return None
        described.append((x.shape, x.dtype, x.device, x.requires_grad, x.layout, channels_last(x)))
    if stacked is None:
        kind, params = "cpu", None
    else:
        device = stacked.device
        kind, params = device.type, (stacked.dtype, device)
    autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    return (
        tuple(described),
        training,
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        autocast,
        torch.get_num_threads(),
        params,
        modes,
    )


def untimed_reason() -> str | None:
    """Why plans cannot be timed in the current context, or ``None`` when they can."""
    if torch.compiler.is_compiling():
        return "not timed under torch.compile"
    if functorch_transform_active():
        return "not timed inside a torch.func transform"
    if torch.are_deterministic_algorithms_enabled():
        return "not timed with torch.use_deterministic_algorithms(True)"
    return None


def _devices(tensors: Iterable[torch.Tensor]) -> list[torch.device]:
    return sorted({t.device for t in tensors if t.device.type != "cpu"}, key=str)


def _synchronize(devices: Sequence[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _pack(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    return t, version_of(t)


def _unpack(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
    # Saved tensors stay plain tensors, and autograd's own check stays: a
    # plan whose backward would be refused (a buffer saved for backward and
    # updated in place by another member under the loop plan) fails its
    # timing instead of winning it.
    t, version = packed
    if version_of(t) != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation (version {version} -> {version_of(t)})"
        )
    return t


def _lay_out_as_accumulated(
    leaves: list[torch.Tensor], grads: tuple[torch.Tensor | None, ...], parameters: set[int]
) -> None:
    """Do what ``backward`` into a ``.grad`` set to ``None`` (``zero_grad()``) does beyond
    ``autograd.grad``, for the timing: copy a parameter's gradient into the parameter's
    layout where it comes out in another (AccumulateGrad's layout contract).

    ``torch.vmap`` gives a stacked Linear weight its gradient transposed: the copy
    into the weight's layout made a step of 4 large MLP members 1.8x the loop's,
    which a timing without it (0.9x) did not show, and ``"auto"`` chose it.
    """
    for t, g in zip(leaves, grads, strict=True):
        if g is not None and id(t) in parameters and g.stride() != t.stride():
            torch.empty_strided(t.shape, t.stride(), dtype=g.dtype, device=g.device).copy_(g)


def _wants_grad(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf


def _copy_input(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(t.requires_grad)


@contextlib.contextmanager
def _warnings_ignored() -> Iterator[None]:
    """Ignore every warning inside, and leave the memory of warnings already shown alone.

    ``warnings.catch_warnings`` does not: leaving it marks the filters as
    changed, which makes Python forget the warnings it has shown once per
    place, so a warning in a member's ``forward`` would show again after
    every timing. An ``"ignore"`` filter records nothing in that memory, so
    adding one in front and taking it out again changes nothing else.
    """
    entry = ("ignore", None, Warning, None, 0)
    warnings.filters.insert(0, entry)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for i, item in enumerate(warnings.filters):  # type: ignore[attr-defined]
            if item is entry:
                del warnings.filters[i]  # type: ignore[attr-defined]
                break


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off, as ``timeit`` has it: a collection of the
    process's garbage inside one timed run (90 ms of the thread's CPU time
    in a long test run) made a plan look 20 times slower than it is. A
    caller that had paused it finds it paused afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def measure(
    candidates: Sequence[str],
    run: Runner,
    tensors: Mapping[str, torch.Tensor],
    buffers: Iterable[str],
    inputs: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    around: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    same_draws: Collection[str] = (),
) -> tuple[dict[str, float], list[str], bool]:
    """Time ``run(plan, ...)`` for every candidate on copies.

    ``around``: a context entered before each run and left after it,
    outside the time measured (what it does there is not the plan's).
    ``same_draws``: the candidates whose random draws land on the elements
    the loop's do. When a first (untimed) run draws from the CPU or
    accelerator generator, only these are timed further: the others would
    give other dropout masks for the same seed.

    Returns each candidate's median seconds (``inf`` for one that raised),
    the finalists, the candidates still timed when timing ended, fastest
    first (the plan is the first), and whether a run drew random numbers.

    A forward (and, when gradients are enabled, the gradients of the
    copies from the outputs, accumulated nowhere) per run. Parameters are
    aliased (``detach``), buffers and inputs copied, and the CPU and
    accelerator generators restored afterwards.
    """
    buffer_names = set(buffers)
    leaves = [t for t in tree_leaves((inputs, dict(kwargs))) if isinstance(t, torch.Tensor)]
    devices = _devices([*tensors.values(), *leaves])
    repeats = dict.fromkeys(candidates, 1)
    # On one CPU thread, the thread's own CPU time: other processes on the
    # machine then do not decide the plan. Elsewhere, wall time.
    clock = time.thread_time if not devices and torch.get_num_threads() == 1 else time.perf_counter

    grad = torch.is_grad_enabled()

    def once(plan: str) -> float:
        # Parameters: aliases that collect the timed runs' gradients, or the
        # parameters themselves when no gradient is computed (so the runs see
        # what later calls see: the loop's cached views). Buffers: copies.
        state = {
            name: t.clone()
            if name in buffer_names
            else t.detach().requires_grad_(t.requires_grad)
            if grad
            else t
            for name, t in tensors.items()
        }
        xs = tree_map_only(torch.Tensor, _copy_input, inputs)
        kw = tree_map_only(torch.Tensor, _copy_input, dict(kwargs))
        parameters = {id(t) for name, t in state.items() if name not in buffer_names}
        # What ``around`` does before and after a run is not timed.
        with around() if around is not None else contextlib.nullcontext():
            _synchronize(devices)
            start = clock()
            out = run(plan, state, xs, kw)
            if grad:
                outs = [
                    o for o in tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad
                ]
                # Gradients of the copies only, never accumulated into any .grad:
                # a tensor the copies do not reach (one inside an input the tree
                # walk cannot open, a parameter a forward closes over) keeps what
                # the user's own backward gives it.
                wanted = [t for t in (*state.values(), *tree_leaves((xs, kw))) if _wants_grad(t)]
                if outs and wanted:
                    grads = torch.autograd.grad(
                        outs, wanted, [torch.ones_like(o) for o in outs], allow_unused=True
                    )
                    _lay_out_as_accumulated(wanted, grads, parameters)
            _synchronize(devices)
            elapsed = clock() - start
        return elapsed

    alive = list(candidates)
    rounds: dict[str, list[float]] = {plan: [] for plan in candidates}
    drew = False
    began = time.perf_counter()
    with (
        torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]),
        _warnings_ignored(),
        _collector_paused(),
        # Saved tensors stay plain tensors, whatever hooks the caller runs under
        # (activation checkpointing packs them for recomputation).
        torch.autograd.graph.saved_tensors_hooks(_pack, _unpack),
    ):
        for round_ in range(_MAX_CLOSE_ROUNDS + 1):
            for plan in alive[::-1] if round_ % 2 else list(alive):
                if plan not in alive:  # left out after another's run drew random numbers
                    continue
                try:
                    if round_ == 0:
                        before = _generator_states(devices)
                        seconds = once(plan)
                        if not drew and _moved(before, _generator_states(devices)):
                            drew = True
                            for other in [p for p in alive if p not in same_draws]:
                                alive.remove(other)
                                del rounds[other]
                            if plan not in alive:
                                continue
                        repeats[plan] = max(
                            1, min(_MAX_REPEATS, math.ceil(_MIN_ROUND_SECONDS / max(seconds, 1e-9)))
                        )
                        continue
                    seconds = sum(once(plan) for _ in range(repeats[plan])) / repeats[plan]
                except Exception as e:  # a plan that fails is not chosen
                    logger.debug("Ensemble plan %r failed while timed: %r", plan, e)
                    rounds[plan] = []
                    alive.remove(plan)
                    continue
                rounds[plan].append(seconds)
            if round_ == 0:
                continue
            fastest = min((min(rounds[p]) for p in alive), default=math.inf)
            # One round can be a burst of load from elsewhere: after it, only
            # a hopeless candidate is dropped.
            drop = _DROP_RATIO if round_ > 1 else _FIRST_DROP_RATIO
            alive = [p for p in alive if min(rounds[p]) <= drop * fastest]
            if len(alive) <= 1:
                break
            if round_ < _MIN_ROUNDS:
                continue
            first, second = sorted(statistics.median(rounds[p]) for p in alive)[:2]
            close = second <= _CLOSE_RATIO * first
            budget = _BUDGET_SECONDS * (_CLOSE_BUDGET_FACTOR if close else 1)
            if time.perf_counter() - began > budget or (round_ >= _MAX_ROUNDS and not close):
                break
    medians = {plan: statistics.median(ts) if ts else math.inf for plan, ts in rounds.items()}
    return medians, _ranked(alive, rounds, medians), drew


def _generator_states(devices: Sequence[torch.device]) -> list[torch.Tensor]:
    """The states of the generators a random op of the members draws from."""
    states = [torch.get_rng_state()]
    states += [torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"]
    return states


def _moved(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def _ranked(
    finalists: list[str], rounds: Mapping[str, Sequence[float]], medians: Mapping[str, float]
) -> list[str]:
    """``finalists``, fastest first by the median over rounds of each one's time over the
    round's fastest (every finalist ran in every round)."""
    count = min((len(rounds[p]) for p in finalists), default=0)
    if len(finalists) < 2 or count == 0:
        return list(finalists)
    score = {
        p: statistics.median(
            rounds[p][i] / max(min(rounds[q][i] for q in finalists), 1e-12) for i in range(count)
        )
        for p in finalists
    }
    return sorted(finalists, key=lambda p: (score[p], medians[p]))
