"""What fits in a memory budget: the largest batch or sequence, the smallest world size.

:func:`find_fit` searches with :func:`~lightning_meta.estimate` itself: each
candidate is a full (per-rank) estimate, so the answer is exactly as good as
one estimate, and the estimates on both sides of the boundary come back with
it. Peak memory grows with the batch and the sequence and shrinks as FSDP2
shards over more ranks; the search assumes that (straight-line predictions
guarded by doubling and bisection, so at most about ``4 * log2(limit)``
estimates) and reports the two estimates that bracket the answer, so the
assumption can be checked.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from lightning_meta import _compat
from lightning_meta._arguments import spelled
from lightning_meta._errors import ArgumentTypeError, ArgumentValueError, MetaTensorError
from lightning_meta._estimate._fake import inputs_of, map_leaves
from lightning_meta._estimate._result import Estimate
from lightning_meta._estimate._values import IndexRefusal, filled_meta

__all__ = ["Fit", "find_fit", "parse_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_FSDP = "strategy='fsdp'"
_VARY_WORLD = "vary='world_size'"


def parse_bytes(value: Any) -> int:
    """Return a memory size in bytes: an ``int``, or text such as ``"80GiB"`` or ``"79.6 GB"``.

    ``GB`` is 10**9 bytes and ``GiB`` 2**30 (an "80GB" GPU holds about 80 GiB).

    Raises:
        ArgumentTypeError: if ``value`` is neither a number nor text.
        ArgumentValueError: if the text does not parse or the size is not positive.

    Example::

        >>> parse_bytes("80GiB"), parse_bytes("1.5 GB"), parse_bytes(4096)
        (85899345920, 1500000000, 4096)
    """
    fix = spelled(
        "pass bytes as an int, or text such as '80GiB' or '79GB'",
        "pass bytes, or a size such as 80GiB or 79GB",
    )
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ArgumentTypeError(f"find_fit: memory={value!r} is not a size. Fix: {fix}.")
    if isinstance(value, str):
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        unit = found.group(2).lower() if found else None
        if found is None or unit not in _UNITS:
            raise ArgumentValueError(f"find_fit: memory={value!r} does not parse. Fix: {fix}.")
        size = float(found.group(1)) * _UNITS[unit]
    else:
        try:
            size = float(value)
        except OverflowError:  # an int beyond what a float holds (10**400)
            size = math.inf
    if not math.isfinite(size) or size < 1:
        raise ArgumentValueError(
            f"find_fit: memory={value!r} is not a positive size in bytes (at least 1, "
            f"finite). Fix: {fix}."
        )
    return int(size)


@dataclasses.dataclass(frozen=True)
class Fit:
    """The answer of :func:`find_fit`.

    ``value`` is the largest batch (or sequence length) whose peak fits in
    ``memory`` bytes, or the smallest world size whose per-rank peak does;
    ``None`` when none does within ``limit``. ``fits`` is the estimate at
    ``value`` and ``beyond`` the one at the next candidate (one more sample
    or token, the next smaller world size), which does not fit; either is
    ``None`` where there is none. ``estimates`` counts the estimates run.
    ``at_limit`` is true when a batch or sequence search stopped at
    ``limit`` with memory to spare: the answer is then *at least* ``value``.
    ``refused`` is the message of the model's refusal of the next candidate
    (a sequence longer than its positions, which a real forward refuses by
    index), or the length the model declares (an int ``max_seq_length`` of
    its own, litgpt's ``GPT``: a sequence search with no ``limit`` stops
    there), or the positions a transformers config gives
    (``config.max_position_embeddings``, where torch's shape error at the
    next length names it and the answer is that length: BERT), when that,
    not memory, bounds the answer; ``""`` otherwise.
    ``smallest`` is the smallest batch or sequence the model runs (``1``
    unless it refuses smaller ones, as BatchNorm refuses a batch of 1 in
    training): with ``value`` ``None``, ``beyond`` is the estimate there.

    Example::

        >>> import torch, lightning_meta as lm
        >>> from torch import nn
        >>> fit = lm.find_fit(lambda: nn.Linear(256, 256), "1,256:float32", memory="4MiB",
        ...                   optimizer="sgd")
        >>> fit.vary, fit.fits.peak_bytes <= fit.memory < fit.beyond.peak_bytes
        ('batch', True)
        >>> fit.fits.input_bytes == fit.value * 256 * 4, fit.at_limit, fit.refused
        (True, False, '')
        >>> sorted(fit.to_dict())[:4]
        ['at_limit', 'beyond_peak_bytes', 'estimates', 'fits']
    """

    vary: str
    value: int | None
    memory: int
    fits: Estimate | None
    beyond: Estimate | None
    estimates: int
    limit: int
    at_limit: bool = False
    refused: str = ""
    smallest: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Return the answer as plain JSON-serialisable values."""
        return {
            "vary": self.vary,
            "value": self.value,
            "memory": self.memory,
            "fits_peak_bytes": self.fits.peak_bytes if self.fits is not None else None,
            "beyond_peak_bytes": self.beyond.peak_bytes if self.beyond is not None else None,
            "estimates": self.estimates,
            "limit": self.limit,
            "at_limit": self.at_limit,
            "refused": self.refused,
            "smallest": self.smallest,
            "fits": self.fits.to_dict() if self.fits is not None else None,
        }


def _meta_like(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    return filled_meta(shape, t, dim)


def _leaves(value: Any) -> list[Any]:
    out: list[Any] = []
    map_leaves(value, out.append)
    return out


def _resized(module: nn.Module, example_inputs: Any, dim: int) -> tuple[Callable[[int], Any], int]:
    """Return the inputs as a function of the size of ``dim``, and the size they have now.

    Every input tensor whose ``dim`` has the first input's size is resized
    (as a meta tensor: inputs given for real lose their values, read as zeros,
    unless all of them are one value, an all-ones ``attention_mask``, or they
    count along ``dim``, ``position_ids``: the resized ones follow that rule).
    """
    args, kwargs = inputs_of(module, example_inputs)
    tensors = [t for t in _leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    what = "batch (dim 0)" if dim == 0 else "sequence (dim 1)"
    if not tensors or tensors[0].dim() <= dim:
        raise ArgumentValueError(
            f"find_fit: the first input has no {what} to vary. Fix: pass inputs whose first tensor "
            f"has the {what}, such as '1,4096:int64'."
        )
    if args and kwargs:
        raise ArgumentValueError(
            "find_fit: inputs that are both positional and keyword cannot be varied. Fix: pass a "
            "tuple of positional inputs or a dict of keyword inputs."
        )
    size = int(tensors[0].shape[dim])

    def leaf(n: int) -> Callable[[Any], Any]:
        made: dict[int, torch.Tensor] = {}  # a tensor given several times stays one

        def resize(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() > dim and t.shape[dim] == size:
                if id(t) not in made:
                    made[id(t)] = _meta_like(t, dim, n)
                return made[id(t)]
            return t

        return resize

    def inputs(n: int) -> Any:
        return map_leaves(kwargs, leaf(n)) if kwargs else map_leaves(args, leaf(n))

    return inputs, size


def _declared_length(module: nn.Module) -> int | None:
    """The longest sequence ``module`` declares it takes: an int ``max_seq_length`` of its
    own (litgpt's ``GPT``, whose forward raises "Cannot forward sequence of length" past
    it; sentence-transformers' models), else ``None``. A refusal by the model's own code
    is no bound a search may trust (a model that takes square token grids refuses 37 and
    runs 49), a declared length is."""
    return _positive_int(getattr(module, "max_seq_length", None))


def _config_positions(module: nn.Module) -> tuple[int, str] | None:
    """The positions a transformers model's config gives it (``max_position_embeddings``),
    and where: BERT-like models slice a buffer of that many position ids, and a longer
    sequence fails in their own code on a shape, not by index. That is no length the
    model must refuse (Llama's rotary positions run past it), so only refusals *above* it
    are taken as the model's bound, and the same checks as for an index refusal follow.
    The config of ``module``, or of the one transformers model it holds (a
    LightningModule's ``self.bert``); its ``text_config``'s where it has none (CLIP)."""
    owner, path = module, type(module).__name__
    if getattr(module, "config", None) is None:
        models = _compat.outermost_transformers_models(module)
        if len(models) != 1:
            return None
        owner, path = models[0][1], f"{path}.{models[0][0]}"
    config = getattr(owner, "config", None)
    for name in ("", "text_config"):
        held = getattr(config, name, None) if name else config
        value = _positive_int(getattr(held, "max_position_embeddings", None))
        if value is not None:
            return value, ".".join(p for p in (path, "config", name) if p)
    return None


def _beyond_positions(e: MetaTensorError, n: int, positions: int | None) -> bool:
    """Whether ``e``, the refusal of length ``n``, is the model's length: ``n`` beyond the
    config's ``positions``, and a shape error of torch's that names that many (BERT: "The
    expanded size of the tensor (513) must match the existing size (512)"), not a rule of
    the model's own (its ``ValueError`` or ``assert``, which may name the length too while
    it runs longer sequences of other lengths)."""
    if positions is None or n <= positions or type(e.__cause__) is not RuntimeError:
        return False
    return re.search(rf"(?<![0-9.]){positions}(?![0-9.])", str(e.__cause__)) is not None


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _varied(
    e: MetaTensorError, vary: str, given: int, n: int, *, ran_at: int | None = None
) -> MetaTensorError:
    """Return ``e`` (an estimate at a size the search chose) saying what the search varied;
    ``ran_at``: a larger size the model ran, which makes ``n``'s refusal no bound."""
    dim = 0 if vary == "batch" else 1
    if ran_at is not None:
        fix = (
            f"Fix: the model runs some sizes and refuses others (at {ran_at} it runs), so no "
            "largest size can be searched for: estimate the sizes it accepts one by one, or "
            "make it accept any size"
        )
    elif vary == "sequence":
        fix = (
            "Fix: if dim 1 of the inputs is not a sequence (a feature or channel size), search "
            "the batch instead: vary='batch' (--fit batch); otherwise make the model accept "
            "any sequence length" + spelled(", or pass the longest length it takes as limit=N", "")
        )
    else:
        fix = "Fix: make the model accept any batch size, or search another dimension"
    refuses = "the model refuses them"
    if ran_at is None and str(e).startswith("estimate: the loss of "):
        refuses = "the model runs but its loss_fn fails"
        # the model ran; the loss_fn computes with tensors of the example's size (labels
        # taken from the caller's scope), which the search does not vary
        fix = (
            "Fix: loss_fn computes with tensors of the example's size, maybe (labels of "
            f"{given}): pass them as an input of the model's "
            "forward (the search varies every input), or make loss_fn build them from the "
            "output's shape"
        )
    cause = str(e).partition(" Fix: ")[0].rstrip(". ")  # the estimate's own Fix is for its inputs
    return type(e)(
        f"find_fit: vary={vary!r} (--fit {vary}) varies dim {dim} of the inputs, given as "
        f"{given}; at {n} {refuses} ({cause}). {fix}.",
        paths=e.paths,
    )


def _search(
    peak: Callable[[int], Estimate | None], memory: int, start: int, limit: int, grows: bool
) -> tuple[int | None, Estimate | None, Estimate | None, int, int]:
    """Find the boundary of ``peak(n).peak_bytes <= memory`` over ``1..limit``.

    With ``grows``, the largest ``n`` that fits (the peak grows with ``n``):
    ``1``, then ``start``, then steps predicted by the straight line through
    two estimates (extrapolated from the two largest fits until a candidate
    does not fit, then interpolated across the bracket), each guarded: a
    predicted step that neither doubles the largest fit nor halves the
    bracket is followed by a doubling or a bisection. A straight peak takes
    a few estimates, a curved one (attention is quadratic in the sequence)
    at most about ``4 * log2(limit)``. Without ``grows``, the smallest ``n``
    that fits (the peak shrinks with ``n``), by doubling and bisection.

    ``peak`` returns ``None`` for an ``n`` the model refuses (with ``grows``,
    above ``start`` every larger one is taken to be refused too, and below it
    every smaller one: BatchNorm refuses a batch of 1 in training): it does
    not fit. With ``grows``, the search then starts from the smallest ``n``
    that runs, found by bisection between ``1`` and ``start``.

    Returns:
        ``(n or None, estimate at n, estimate beyond n, estimates run, the smallest n
        the model runs)``.
    """
    seen: dict[int, Estimate | None] = {}

    def at(n: int) -> Estimate | None:
        if n not in seen:
            seen[n] = peak(n)
        return seen[n]

    def fits(n: int) -> bool:
        found = at(n)
        return found is not None and found.peak_bytes <= memory

    if not grows:  # double until one fits, then bisect below it
        lo, n = 0, 1  # lo does not fit (0: nothing tried)
        while not fits(n):
            if n >= limit:
                return None, None, at(n), len(seen), 1
            lo, n = n, min(limit, n * 2)
        hi = n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return hi, at(hi), at(lo) if lo >= 1 else None, len(seen), 1

    def line(a: int, b: int) -> int | None:
        """Where the line through the peaks at ``a < b`` reaches ``memory``; None if flat."""
        ea, eb = at(a), at(b)
        if ea is None or eb is None:
            return None
        pa, pb = ea.peak_bytes, eb.peak_bytes
        return a + (memory - pa) * (b - a) // (pb - pa) if pb > pa else None

    first = min(max(start, 1), limit)
    least = 1  # the smallest n the model runs
    if first > 1 and at(1) is None:
        refused, least = 1, first  # the given size runs (refusing it raises)
        while least - refused > 1:
            mid = (refused + least) // 2
            refused, least = (mid, least) if at(mid) is None else (refused, mid)
    if not fits(least):
        return None, None, at(least), len(seen), least
    lo, hi, below = (
        least,
        0,
        0,
    )  # lo fits; hi (when not 0) does not; below (when not 0): a smaller fit
    if first > least:
        lo, hi, below = (first, 0, least) if fits(first) else (least, first, 0)
    safe = False  # the last predicted step made too little progress: this one doubles or bisects
    while lo < limit and (hi == 0 or hi - lo > 1):
        was_safe, before, old = safe, hi - lo, lo
        if hi == 0:
            guess = line(below, lo) if below else None
            n = min(limit, 2 * lo if safe or guess is None else max(guess, lo + 1))
        else:
            guess = line(lo, hi)
            n = (lo + hi) // 2 if safe or guess is None else min(max(guess, lo + 1), hi - 1)
        if fits(n):
            below, lo = lo, n
        else:
            hi = n
        if was_safe:
            safe = False
        elif before < 0:  # there was no bracket: the fit must have doubled, or a bracket formed
            safe = hi == 0 and lo < 2 * old
        else:
            safe = (hi - lo) * 2 > before
    return lo, at(lo), at(hi) if hi else None, len(seen), least


def find_fit(
    module_or_factory: nn.Module | Callable[[], nn.Module],
    example_inputs: Any = None,
    *,
    memory: int | str,
    vary: Literal["batch", "sequence", "world_size"] = "batch",
    limit: int | None = None,
    global_batch: int | None = None,
    **options: Any,
) -> Fit:
    """Find what fits in ``memory`` per device: the largest batch or sequence, or the fewest ranks.

    Each candidate is one :func:`~lightning_meta.estimate` with ``options``
    (``optimizer``, ``precision``, ``strategy``, ``world_size``,
    ``tensor_parallel``, ``activation_checkpointing``...), whose
    ``peak_bytes`` is compared with ``memory``. A batch or sequence search
    tries 1 (if the model refuses it, as BatchNorm refuses a batch of 1 in
    training, the smallest size that runs, found by bisection below the
    given one), then the size of ``example_inputs``, then sizes predicted by a
    straight line through two estimates, guarded by doubling and bisection:
    at most about ``4 * log2(limit)`` estimates, a few when the peak is
    linear in the size. A world-size search doubles, then bisects.

    Args:
        module_or_factory: as for :func:`~lightning_meta.estimate`; a
            factory is built once.
        example_inputs: as for :func:`~lightning_meta.estimate` (one rank's
            batch under a strategy); the sizes varied are read from them.
        memory: the memory of one device: bytes, or text such as
            ``"80GiB"`` (``GB`` is 10**9 bytes, ``GiB`` 2**30).
        vary: ``"batch"`` (dim 0 of every input that has the first input's
            batch size), ``"sequence"`` (dim 1 likewise), or
            ``"world_size"`` (the fewest ranks, a multiple of
            ``tensor_parallel``, for ``strategy="fsdp"``).
        limit: the largest batch or sequence, or world size, tried
            (default: 2**20 samples or tokens, 2**16 ranks).
        global_batch: with ``vary="world_size"``, keep this many samples per
            step across the data-parallel ranks: each rank's batch is
            ``global_batch / data_parallel``, and only world sizes whose
            data-parallel size divides it are tried.
        **options: keyword options of :func:`~lightning_meta.estimate`.

    Returns:
        A :class:`Fit`.

    Raises:
        ArgumentTypeError: if ``memory``, ``limit`` or an option has the wrong type.
        ArgumentValueError: if ``vary`` is unknown, the inputs have no such
            dimension, ``vary="world_size"`` is asked without
            ``strategy="fsdp"``, or an option of ``estimate`` is refused.
        MetaTensorError: if an estimate fails.

    Example::

        >>> import torch, lightning_meta as lm
        >>> from torch import nn
        >>> net = lambda: nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))
        >>> answer = lm.find_fit(net, "1,256:float32", memory="16MiB", optimizer="sgd")
        >>> answer.value, answer.fits.peak_bytes <= 2**24 < answer.beyond.peak_bytes
        (950, True)
    """
    from lightning_meta._estimate._estimate import _build, estimate

    budget = parse_bytes(memory)
    if vary not in ("batch", "sequence", "world_size"):
        raise ArgumentValueError(
            f"find_fit: unknown vary={vary!r}. Fix: pass 'batch', 'sequence' or 'world_size'."
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ArgumentTypeError(
            f"find_fit: limit must be a positive int, got {limit!r}. Fix: pass limit=4096."
        )
    strategy = str(options.get("strategy") or "")
    if vary == "world_size" and strategy.lower() not in ("fsdp", "fsdp2", "model_parallel"):
        raise ArgumentValueError(
            f"find_fit: {spelled(_VARY_WORLD, '--fit world-size')} needs "
            f"{spelled(_FSDP, '--strategy fsdp')}: only sharding lowers the memory of "
            "a rank as ranks are added (DDP replicates the model on every rank). Fix: pass "
            f"{spelled(_FSDP, '--strategy fsdp')}."
        )
    for key in ("world_size",) if vary == "world_size" else ():
        if key in options:
            raise ArgumentValueError(
                f"find_fit: {spelled(_VARY_WORLD, '--fit world-size')} searches "
                f"{spelled(key, '--world-size')} itself. Fix: leave {spelled(key, '--world-size')} out."
            )
    if global_batch is not None and vary != "world_size":
        raise ArgumentValueError(
            "find_fit: global_batch applies to vary='world_size'. Fix: leave it out, or pass "
            "vary='world_size'."
        )
    module = _build(module_or_factory)

    said: dict[int, list[warnings.WarningMessage]] = {}

    def run(inputs: Any, **more: Any) -> Estimate:
        # Each estimate's warnings are held back, and only the answer's are the
        # caller's: a search of 11 estimates warned of the scratch bound 11 times.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = estimate(module, inputs, **options, **more)
        said[id(found)] = caught
        return found

    def answer(fit: Fit) -> Fit:
        for w in said.get(id(fit.fits), []) if fit.fits is not None else []:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        return fit

    if vary in ("batch", "sequence"):
        inputs_at, start = _resized(module, example_inputs, 0 if vary == "batch" else 1)
        declared = _declared_length(module) if vary == "sequence" and limit is None else None
        configured = _config_positions(module) if vary == "sequence" else None
        positions = configured[0] if configured is not None else None
        top = limit or declared or 2**20
        refusals: dict[int, MetaTensorError] = {}

        ran: list[int] = []  # the sizes the model ran

        def probe(n: int) -> Estimate | None:
            try:
                found = run(inputs_at(n))
            except MetaTensorError as e:
                if n == start or isinstance(e, (ArgumentTypeError, ArgumentValueError)):
                    raise  # the inputs as given, or an option: not the search's doing
                if n < start:
                    # a size below the one given that the model refuses (BatchNorm
                    # refuses a batch of 1 in training): smaller ones are refused too
                    return None
                # a size above the one given that the forward refuses by index
                # (positions beyond the model's), or beyond the positions its config
                # gives: larger ones are taken to be refused too, which the sizes the
                # search ran must not contradict (below); at 1 it is the model's
                bounded = isinstance(e.__cause__, IndexRefusal) or _beyond_positions(
                    e, n, positions
                )
                if n == 1 or not bounded:
                    raise _varied(e, vary, start, n) from e
                refusals[n] = e
                return None
            ran.append(n)
            return found

        value, at, beyond, runs, smallest = _search(probe, budget, start, top, True)
        if value is not None and value + 1 in refusals:
            # The answer is a refusal's bound. Twice the size that runs keeps its
            # factors, and so does the size plus its largest power of two: a model
            # that takes only multiples of something (a patch, a power of two)
            # runs one of them, and is not bounded there.
            for n in (2 * value, value + (value & -value)):
                if value + 1 < n <= top and n not in refusals and n not in ran:
                    probe(n)
                    runs += 1
        for n, e in sorted(refusals.items()):
            larger = [m for m in ran if m > n]
            if larger:  # refused at n but run above it: no bound to stop below
                raise _varied(e, vary, start, n, ran_at=min(larger)) from e
        refused = refusals.get(value + 1) if value is not None else None
        # the estimate's own Fix is for its inputs: the search found this bound
        bound = str(refused).partition(" Fix: ")[0].rstrip(" .") if refused is not None else ""
        if (
            value is not None
            and refused is not None
            and not isinstance(refused.__cause__, IndexRefusal)
        ):
            # kept only where _beyond_positions held (probe): the config's length is the
            # bound if the answer is that length, else there is none
            if configured is None or value != positions:
                raise _varied(refused, vary, start, value + 1) from refused
            bound = f"longer than {configured[1]}.max_position_embeddings ({positions}): {bound}"
        if declared is not None and value == top:
            bound = f"longer than {type(module).__name__}.max_seq_length ({declared})"
        return answer(
            Fit(
                vary,
                value,
                budget,
                at,
                beyond,
                runs,
                top,
                at_limit=value == top and not bound,
                refused=bound,
                smallest=smallest,
            )
        )
    if global_batch is not None and (
        isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1
    ):
        raise ArgumentTypeError(
            f"find_fit: global_batch must be a positive int, got {global_batch!r}. Fix: pass 256."
        )
    tp = options.get("tensor_parallel", 1)
    tp = tp if isinstance(tp, int) and not isinstance(tp, bool) and tp >= 1 else 1
    top = limit or 2**16
    inputs_at, start = _resized(module, example_inputs, 0)
    # candidates by data-parallel size d (world size d * tp); with a global batch,
    # only the d that divide it
    sizes = [
        d for d in range(1, max(1, top // tp) + 1) if global_batch is None or global_batch % d == 0
    ]

    def per_rank(i: int) -> Estimate:
        d = sizes[i - 1]
        batch = global_batch // d if global_batch is not None else start
        return run(inputs_at(batch), world_size=d * tp)

    index, at, beyond, runs, _ = _search(per_rank, budget, 1, len(sizes), False)
    value = sizes[index - 1] * tp if index is not None else None
    return answer(Fit(vary, value, budget, at, beyond, runs, top))
