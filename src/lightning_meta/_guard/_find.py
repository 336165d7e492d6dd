"""Find every meta tensor reachable from a module, an optimizer or a container.

:func:`find_meta_tensors` lists them by dotted path; :func:`assert_no_meta`
raises :class:`~lightning_meta.MetaTensorError` listing them all. Both are
torch-only: the Lightning callback (``_guard``) and the ``check`` command build
on them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import time
import types
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

from lightning_meta._compat import is_dtensor
from lightning_meta._deferred import _handles
from lightning_meta._deferred._escaped import escaped_alias, escaped_site
from lightning_meta._deferred._handles import (
    ON_META_ATTR,
    Handle,
    handle_of,
    handles_of,
    made_for,
)
from lightning_meta._deferred._reach import MAX_DEPTH, MAX_ITEMS
from lightning_meta._errors import MetaTensorError
from lightning_meta._slots import HANDLES_ATTR, buffer_names, parameter_names, tensor_at
from lightning_meta._template._template import MetaTemplate

__all__ = ["MetaFinding", "assert_no_meta", "find_meta_tensors"]

Kind = Literal["parameter", "buffer", "attribute", "optimizer", "tensor", "template"]

# Module internals walked explicitly (the module's own tables), and the package's
# bookkeeping: a deferred tensor's handles, and the tensors a block made on meta on
# purpose (the tables hold them while they are the module's; stale after to_empty()).
_SKIP = frozenset({"_parameters", "_buffers", "_modules", HANDLES_ATTR, ON_META_ATTR})
# Objects of these packages hold no model of the user's that a walk should find
# (a Trainer, a strategy, a DataLoader would lead it through the whole run).
_FOREIGN = frozenset(
    {
        "torch",
        "lightning",
        "pytorch_lightning",
        "lightning_fabric",
        "lightning_meta",
        "numpy",
        # A logger's attributes lead to every logger of the process (its manager).
        "logging",
    }
)
# Objects of torch that hold a model's tensors as plain attributes: a distribution
# (``D.Normal(torch.zeros_like(head.weight), 0.05)``, a weight-noise regulariser) held
# a meta ``loc`` through a whole Trainer run, on uninitialised memory, before
# 2026-12-07 (seventh session).
_TORCH_HOLDERS = ("torch.distributions.",)
# Objects searched below each plain object a module or container holds, at most.
MAX_PLAIN_VISITS = 10_000
# What holds no tensor (the items of a table of data): passed over at once.
_SCALARS = frozenset({int, float, bool, complex, str, bytes, type(None)})
# Searched item by item, as a list.
_SEQUENCES = (list, tuple, collections.deque)
# Past the bounds, the search from the root (forwards) and the trace back from
# the deferred tensors (backwards) take turns, each while it has used less time
# than the other; the forward one starts with this much (seconds) before the
# first heap scan of the backward one (a tenth of a second on a heap of 2M objects).
_FORWARD_HEAD_START = 0.05
# Objects the forward search visits between two looks at the clock.
_TICK_VISITS = 512

FIX = (
    "Fix: keep a stateless copy as lightning_meta.MetaTemplate(module) (Lightning never "
    "sees it), or build the module inside `with lightning_meta.deferred_init():` so that "
    "lightning_meta.materialize (or the MetaGuard callback) gives it exact real values, "
    "or load real weights into it first. A checkpoint holds no non-persistent buffer "
    "(rotary caches): build the module under deferred_init, whose load_checkpoint replays "
    "them, or, where their modules have reset_parameters() (litgpt's GPT), call "
    "lightning_meta.materialize(module, fallback='reset_parameters') after the load."
)

BESIDE_DEFERRED_FIX = (
    "Next to deferred tensors, a meta tensor that is not deferred was made after the "
    "deferred_init block: from deferred ones (nn.Parameter(w.detach().clone()), a "
    "parametrization or pruning applied to the deferred model), or built on meta and "
    "assigned; or made on meta before the block and set in it, or inside the block where "
    "it sees no op (torch.tensor(...) under a torch.device('meta') context there). It holds "
    "no values and no record gives them. Fix: make it inside the deferred_init block "
    "without the meta device, or after materialize (under MetaGuard, in on_fit_start, "
    "which runs after it), or load real weights into it first."
)

ESCAPED_FIX = (
    "A tensor created inside a deferred_init block but kept outside the modules built "
    "there (a local variable assigned after the block, a closure, a global list) holds no "
    "data, and materialize cannot fill it: any use raises. Fix: register it on a module "
    "built in the block (self.register_buffer(name, t, persistent=False), or a plain "
    "attribute set inside the block), or create it after materialize. An object holding "
    "tensors computed from the module's (a torch.distributions object keeps broadcast "
    "views of its arguments) cannot be followed: build it after materialize."
)

ESCAPED_AS_FIX = (
    "A tensor of a module built in a deferred_init block, referenced from outside the "
    "modules since inside the block (a functools.partial, a closure or a lambda's default "
    "holding self.head.weight), is the block's placeholder: the module's own became a "
    "deferred tensor, which materialize makes real, and the reference still holds no data. "
    "Fix: read the tensor through the module when it is used (self.head.weight inside the "
    "call, not a reference taken in __init__), or build the object holding it after "
    "materialize."
)

STALE_FIX = (
    "A tensor 'materialized elsewhere' is a reference taken before materializing: "
    "materialize (or a load) put a real tensor in its place on the module that owns it, and "
    "this reference still holds no data. Fix: create optimizers after materializing (in "
    "configure_optimizers under MetaGuard, after lightning_meta.fabric_setup with Fabric), "
    "and take other references to the tensor (a tie to another model's weight) after the "
    "model that owns it is materialized."
)


@dataclasses.dataclass(frozen=True)
class MetaFinding:
    """One meta tensor (or template) found by :func:`find_meta_tensors`.

    Attributes:
        path: dotted path from the object searched, e.g. ``"encoder.0.weight"``
            or ``"param_groups.0.params.3"``.
        kind: ``"parameter"`` or ``"buffer"`` (registered on a module, so
            Lightning moves, wraps and saves it), ``"attribute"`` (a plain
            tensor attribute, possibly inside a list, tuple, dict or dataclass),
            ``"optimizer"`` (a parameter or state of an optimizer), ``"tensor"``
            (inside a plain container searched directly) or ``"template"``
            (a :class:`~lightning_meta.MetaTemplate`: meta by design, not a
            problem).
        shape: the tensor's shape; ``()`` for a template.
        dtype: the tensor's dtype; ``None`` for a template.
        deferred: built under :func:`~lightning_meta.deferred_init`, so
            :func:`~lightning_meta.materialize` can fill it exactly.
        hidden: held by a module reached only through a plain container
            (``self.templates = [net]``): outside the module tree, so Lightning
            never moves, wraps or saves it (the classic template workaround;
            :class:`~lightning_meta.MetaTemplate` is the supported form).
        escaped: for a tensor created inside a
            :func:`~lightning_meta.deferred_init` block and kept outside the
            modules built there, the ``file:line`` that created it (else
            ``None``). It is not on the meta device but holds no data either
            (a fake tensor of the finished block): nothing can fill it and any
            use raises :class:`~lightning_meta.MetaTensorError`.
        escaped_as: for such a tensor that was a tensor of a module built in the
            block when it ended (a reference to ``self.head.weight`` taken
            inside the block, in a ``functools.partial`` or a closure), that
            tensor's path (``"head.weight"``): the module's own is deferred and
            materializes, the reference does not (else ``None``).
        stale: a meta tensor that :func:`~lightning_meta.materialize` (or a
            load) already replaced by a real one at the place that owns it
            (a module's parameter): a reference taken before materializing,
            such as an optimizer created in ``__init__``. It stays without
            data; take the reference after materializing instead.

    Example::

        >>> import torch, lightning_meta as lm
        >>> net = lm.deferred_init(torch.nn.Linear, 4, 2)
        >>> found = lm.find_meta_tensors(net)
        >>> [(f.path, f.kind, f.shape, f.deferred) for f in found]
        [('weight', 'parameter', (2, 4), True), ('bias', 'parameter', (2,), True)]
        >>> found[0].problem, found[0].describe()
        (True, "'weight' (parameter, shape (2, 4), torch.float32, deferred)")
    """

    path: str
    kind: Kind
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    deferred: bool
    hidden: bool = False
    escaped: str | None = None
    stale: bool = False
    escaped_as: str | None = None

    @property
    def problem(self) -> bool:
        """Whether this finding is a meta tensor (not a template)."""
        return self.kind != "template"

    def describe(self) -> str:
        """Return a one-line description: path, kind, shape, dtype, deferred."""
        if self.kind == "template":
            return f"{self.path!r} (MetaTemplate: meta by design, ignored)"
        where = ", outside the module tree" if self.hidden else ""
        if self.escaped is not None and self.escaped_as is not None:
            state = (
                f"created in a deferred_init block at {self.escaped} as {self.escaped_as!r}, "
                "held by a reference taken inside the block"
            )
        elif self.escaped is not None:
            state = f"created in a deferred_init block at {self.escaped} and left outside it"
        elif self.stale:
            state = "materialized elsewhere: a reference taken before materializing"
        else:
            state = "deferred" if self.deferred else "not deferred"
        return f"{self.path!r} ({self.kind}, shape {self.shape}, {self.dtype}, {state}{where})"


def find_meta_tensors(obj: Any) -> list[MetaFinding]:
    """Return every meta tensor reachable from ``obj``, with its dotted path.

    Searches parameters, buffers, plain tensor attributes of every submodule
    and tensors inside lists, tuples, dicts, sets, dataclasses, other plain
    objects (their attributes) and closures (their variables) held as
    attributes (modules hidden there are searched too; not objects of torch,
    except ``torch.distributions`` ones, or of Lightning, such as the
    trainer); the parameter groups
    and state of an optimizer; or the items of a plain container. A tensor
    created inside a :func:`~lightning_meta.deferred_init` block but kept
    outside the modules built there holds no data either: it is listed too,
    with the ``file:line`` that created it (``MetaFinding.escaped``).
    :class:`~lightning_meta.MetaTemplate` objects (also ``Ensemble.template``)
    are listed with kind ``"template"`` and not searched: they are meta by
    design. Each object is visited once, so a shared submodule is reported
    under its first path. Plain objects are searched a few objects deep and
    far; where the search stops there, the deferred tensors still alive that
    it did not find are traced back to their holders, and those ``obj``
    reaches are listed too.

    Args:
        obj: an ``nn.Module``, a ``torch.optim.Optimizer``, a tensor, a
            ``MetaTemplate``, or a list, tuple, dict, set or dataclass of those.

    Returns:
        The findings in traversal order (parameters, buffers, attributes,
        then submodules); empty when nothing is on meta. A module reached
        only through a container is outside the module tree: its findings
        have ``hidden=True``.

    Example::

        >>> import copy, torch, lightning_meta as lm
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> net.stray = copy.deepcopy(net[0]).to("meta")
        >>> [f.describe() for f in lm.find_meta_tensors(net)]
        ["'stray.weight' (parameter, shape (2, 2), torch.float32, not deferred)", "'stray.bias' (parameter, shape (2,), torch.float32, not deferred)"]
    """
    walker = _Walker()
    found = list(walker.walk(obj, ""))
    if walker.truncated:
        found += _beyond_bounds(obj, walker.tensors)
    return found


def find_meta_tensors_beside(
    module: nn.Module, others: dict[str, Any]
) -> dict[str, list[tuple[MetaFinding, torch.Tensor | None]]]:
    """Return, by name, the meta tensors each of ``others`` reaches outside ``module``'s tree,
    each with its tensor (``None`` for a template).

    The modules of ``module``'s tree are passed over, so that an object holding
    the model (a callback's bound ``log`` method, ``log.__self__``) is not reported
    as holding the model's tensors. Each tensor is reported once, under the first of
    ``others`` that reaches it. A bounded search (no trace back past the bounds).
    """
    walker = _Walker()
    walker.tree = {id(m) for m in module.modules()}
    walker.seen.update(walker.tree)
    walker.once = True
    walker.order = []
    found: dict[str, list[tuple[MetaFinding, torch.Tensor | None]]] = {}
    for name, value in others.items():
        found[name] = []
        for f in walker.walk(value, name):
            found[name].append((f, walker.order[-1] if f.kind != "template" else None))
    return found


def assert_no_meta(obj: Any, *, name: str | None = None) -> None:
    """Raise if any meta tensor (other than a template) is reachable from ``obj``.

    Args:
        obj: anything :func:`find_meta_tensors` accepts.
        name: how to call ``obj`` in the message (default: its type name).

    Raises:
        MetaTensorError: listing every meta tensor with its path, kind, shape
            and dtype, and the fix (``materialize`` for deferred ones,
            ``MetaTemplate`` or ``deferred_init`` for the others).

    Example::

        >>> import torch, lightning_meta as lm
        >>> lm.assert_no_meta(torch.nn.Linear(2, 2))
        >>> lm.assert_no_meta(torch.nn.Linear(2, 2, device="meta"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_meta._errors.MetaTensorError: Linear holds 2 meta tensors, which hold no data:...
    """
    problems = [f for f in find_meta_tensors(obj) if f.problem]
    if problems:
        raise explain(problems, name or type(obj).__name__)


def count_meta(found: list[MetaFinding]) -> str:
    """``"3 meta tensors"``, for a message about ``found``."""
    return f"{len(found)} meta tensor{'s' if len(found) != 1 else ''}"


def first_paths(found: list[MetaFinding], shown: int = 3) -> str:
    """The first ``shown`` paths of ``found``, quoted, then how many more."""
    names = ", ".join(repr(f.path) for f in found[:shown])
    return names + (f", ... {len(found) - shown} more" if len(found) > shown else "")


def explain(
    problems: list[MetaFinding],
    owner: str,
    consequence: str = "",
    *,
    left: bool = False,
    beside_deferred: bool = False,
) -> MetaTensorError:
    """Return the error for ``problems``: every path, why it matters, then the fix.

    ``left``: materialize already ran and left them (its advice would not help).
    ``beside_deferred``: the module also holds deferred tensors, so the others
    were made after its block (building it under ``deferred_init`` is done).
    """
    n = len(problems)
    # Escaped tensors are not on the meta device (their fake data raises on use).
    if any(f.escaped is not None for f in problems):
        them = "tensors that hold" if n != 1 else "tensor that holds"
    else:
        them = "meta tensors, which hold" if n != 1 else "meta tensor, which holds"
    lines = [f"{owner} holds {n} {them} no data:"]
    lines += [f"  {f.describe()}" for f in problems]
    if consequence:
        lines.append(consequence)
    deferred = [f.path for f in problems if f.deferred]
    if deferred and not left:
        lines.append(
            "Deferred tensors are filled exactly by lightning_meta.materialize(module) "
            "(MetaGuard does it for you inside Trainer.fit)."
        )
    if any(f.escaped is not None and f.escaped_as is None for f in problems):
        lines.append(ESCAPED_FIX)
    if any(f.escaped_as is not None for f in problems):
        lines.append(ESCAPED_AS_FIX)
    if any(f.stale for f in problems):
        lines.append(STALE_FIX)
    if any(not f.deferred and f.escaped is None and not f.stale for f in problems):
        lines.append(BESIDE_DEFERRED_FIX if beside_deferred else FIX)
    return MetaTensorError("\n".join(lines), paths=[f.path for f in problems])


class _Walker:
    def __init__(self) -> None:
        self.seen: set[int] = set()
        # Every module of the tree searched: one reached through a container
        # but not in here is outside the tree (hidden from Lightning).
        self.tree: set[int] | None = None
        # Plain objects entered on the way here (see _plain_attributes), and
        # how many objects the search visited below one.
        self.plain_depth = 0
        self.plain_visits = 0
        # Whether a bound above left something unsearched, and the tensors found.
        self.truncated = False
        self.tensors: set[int] = set()
        # For the search past the bounds (see _beyond_bounds): no bounds, only
        # the objects in ``only`` (if given), only the tensors in ``targets``,
        # and every ``tick`` objects visited, ``_TICK`` yielded (if not 0).
        self.bounded = True
        self.only: set[int] | None = None
        self.targets: set[int] | None = None
        self.tick = 0
        self.visits = 0
        # Report each tensor once, across walks (see find_meta_tensors_beside),
        # and note each tensor reported, in order.
        self.once = False
        self.order: list[torch.Tensor] | None = None

    def _report(self, t: torch.Tensor) -> bool:
        if self.targets is not None and id(t) not in self.targets:
            return False
        if self.once and id(t) in self.tensors:
            return False
        self.tensors.add(id(t))
        if self.order is not None:
            self.order.append(t)
        return True

    def walk(
        self, obj: Any, path: str, kind: Kind = "tensor", hidden: bool = False
    ) -> Iterator[MetaFinding]:
        if isinstance(obj, torch.Tensor):
            if _holds_no_data(obj) and self._report(obj):
                yield _finding(path, kind, obj, handle_of(obj) is not None, hidden)
            return
        if self.only is not None and id(obj) not in self.only:
            return
        if isinstance(obj, MetaTemplate):
            yield MetaFinding(path or "<template>", "template", (), None, False)
            return
        if id(obj) in self.seen:
            return
        if type(obj) in _SCALARS:
            return
        bounded = self.bounded
        if self.tick:
            self.visits += 1
            if self.visits % self.tick == 0:
                yield _TICK
        if self.plain_depth and bounded:
            # A plain object can lead anywhere (a linked list, a graph of
            # thousands of objects): each one the module holds is searched
            # MAX_DEPTH plain objects deep and MAX_PLAIN_VISITS objects far.
            self.plain_visits += 1
            if self.plain_visits > MAX_PLAIN_VISITS:
                self.truncated = True
                return
        if not _container(obj):
            if self.plain_depth >= MAX_DEPTH and bounded:
                self.truncated = self.truncated or bool(_plain_attributes(obj))
                return
            attributes = _plain_attributes(obj, bounded)
            if (
                bounded
                and attributes is not None
                and len(attributes) < len(_plain_attributes(obj, False) or ())
            ):
                self.truncated = True
            if attributes is None:
                return
            self.seen.add(id(obj))
            if not self.plain_depth:
                self.plain_visits = 0
            self.plain_depth += 1
            try:
                for key, value in attributes:
                    yield from self._contained(value, _join(path, key), hidden)
            finally:
                self.plain_depth -= 1
            return
        self.seen.add(id(obj))
        if isinstance(obj, nn.Module):
            if self.tree is None:
                self.tree = {id(m) for m in obj.modules()}
            yield from self._module(obj, path, hidden)
        elif isinstance(obj, torch.optim.Optimizer):
            yield from self._optimizer(obj, path)
        else:
            for key, value in _items(obj):
                if type(value) not in _SCALARS:
                    yield from self.walk(value, _join(path, key), kind, hidden)

    def _module(self, module: nn.Module, prefix: str, hidden: bool) -> Iterator[MetaFinding]:
        handles = handles_of(module)
        tables: tuple[tuple[Kind, list[str]], ...] = (
            ("parameter", parameter_names(module)),
            ("buffer", buffer_names(module)),
        )
        for kind, names in tables:
            for name in names:
                t = tensor_at(module, name)
                if t is not None and _holds_no_data(t) and self._report(t):
                    deferred = _deferred(t, handles.get(name))
                    yield _finding(_join(prefix, name), kind, t, deferred, hidden)
        for name, value in vars(module).items():
            if name in _SKIP:
                continue
            if isinstance(value, torch.Tensor):
                if _holds_no_data(value) and self._report(value):
                    deferred = _deferred(value, handles.get(name))
                    yield _finding(_join(prefix, name), "attribute", value, deferred, hidden)
            else:
                yield from self._contained(value, _join(prefix, name), hidden)
        for name, child in module.named_children():
            yield from self.walk(child, _join(prefix, name), hidden=hidden)

    def _contained(self, obj: Any, path: str, hidden: bool) -> Iterator[MetaFinding]:
        if isinstance(obj, nn.Module):
            if self.tree is not None and id(obj) in self.tree:
                # A module of the tree held again (``self.encode = self.encoder.forward``,
                # a closure over it) is searched as a child, under its own path.
                return
            yield from self.walk(obj, path, hidden=True)
        elif isinstance(obj, torch.optim.Optimizer) or not _container(obj):
            yield from self.walk(obj, path, "attribute")
        elif id(obj) not in self.seen and (self.only is None or id(obj) in self.only):
            self.seen.add(id(obj))
            for key, value in _items(obj):
                if type(value) not in _SCALARS:
                    yield from self._contained(value, _join(path, key), hidden)

    def _optimizer(self, opt: torch.optim.Optimizer, prefix: str) -> Iterator[MetaFinding]:
        # Parameters are numbered across groups, as in optimizer.state_dict().
        index: dict[int, int] = {}
        for g, group in enumerate(opt.param_groups):
            for i, p in enumerate(group["params"]):
                index.setdefault(id(p), len(index))
                if isinstance(p, torch.Tensor) and _holds_no_data(p) and self._report(p):
                    path = _join(prefix, f"param_groups.{g}.params.{i}")
                    yield _finding(path, "optimizer", p, handle_of(p) is not None)
        for p, state in opt.state.items():
            where = _join(prefix, f"state.{index.get(id(p), '?')}")
            for key, value in state.items() if isinstance(state, Mapping) else ():
                yield from self.walk(value, _join(where, str(key)), "optimizer")


def _beyond_bounds(root: Any, found: set[int]) -> list[MetaFinding]:
    """The deferred tensors ``root`` reaches that the bounded search above left unsearched.

    The bounds keep the search cheap on large object graphs, but a deferred
    module past them would train on uninitialised memory. The package knows
    every deferred tensor still alive; those the search did not find are
    looked for in two ways at once, taking turns by the time each has used:
    the search from ``root`` again without bounds (cheap where ``root``
    reaches little, such as a tokenizer's vocabulary), and the trace back
    from those tensors (cheap where a large heap holds little that reaches
    them: one scan of the heap per step). The first to finish decides; both
    give the same findings. Traced back, the objects from which a tensor is
    reachable over the edges the search follows (attributes, items,
    closures; not a class, a module's globals or a frame) are found with
    :func:`gc.get_referrers`; if ``root`` is among them, it is searched again
    without bounds, through those objects only, for those tensors. A deferred
    model only held elsewhere (a teacher built for later) is not reachable,
    so not reported.
    """
    pending = {id(t): t for t in _handles.deferred_tensors() if id(t) not in found}
    if not pending:
        return []
    targets = set(pending)
    forward = _Walker()
    forward.bounded, forward.targets, forward.tick = False, targets, _TICK_VISITS
    searching: Iterator[MetaFinding] | None = forward.walk(root, "")
    findings: list[MetaFinding] = []
    ancestors: set[int] = set()
    tracing = _ancestors(list(pending.values()), ancestors)
    del pending
    spent = {"forward": -_FORWARD_HEAD_START, "backward": 0.0}
    while True:
        start = time.perf_counter()
        if searching is not None and spent["forward"] <= spent["backward"]:
            try:
                # Until the next tick: a bounded share of the forward search.
                while (f := next(searching)) is not _TICK:
                    findings.append(f)
            except StopIteration:
                return findings
            except RecursionError:
                # A chain of objects deeper than Python's stack: the trace back decides.
                searching = None
            spent["forward"] += time.perf_counter() - start
            continue
        if next(tracing, True) is True:
            break
        spent["backward"] += time.perf_counter() - start
    del searching, forward, findings
    if id(root) not in ancestors:
        return []
    walker = _Walker()
    walker.bounded, walker.only, walker.targets = False, ancestors, targets
    return list(walker.walk(root, ""))


def _ancestors(tensors: list[torch.Tensor], out: set[int]) -> Iterator[None]:
    """Add to ``out`` the ids of the objects from which any of ``tensors`` is reachable
    over the search's edges; one step back (one scan of the heap) per item yielded."""
    frontier: list[Any] = list(tensors)
    del tensors
    mine = {id(frontier), id(out)}
    # No gc.collect() first: a dead cycle that reaches a tensor is no referrer
    # of anything alive, so it never leads back to the root (it costs a scan).
    while frontier:
        here = {id(o) for o in frontier}
        mine.add(id(here))
        step: list[Any] = []
        mine.add(id(step))
        refs = gc.get_referrers(*frontier)
        mine.add(id(refs))
        for r in refs:
            if id(r) in mine or id(r) in out or not _edge(r, here):
                continue
            if (
                type(r) is tuple
                and len(r) == len(frontier)
                and all(a is b for a, b in zip(r, frontier, strict=True))
            ):
                continue  # the arguments of the call above
            out.add(id(r))
            step.append(r)
        del refs
        frontier = step
        mine.add(id(frontier))
        yield None


def _edge(r: Any, children: set[int]) -> bool:
    """Whether the search follows ``r`` to what it holds (of ``children``)."""
    kind = type(r)
    if issubclass(
        kind,
        (*_SEQUENCES, dict, set, frozenset, types.CellType, types.MethodType, functools.partial),
    ):
        return True
    if issubclass(kind, types.FunctionType):
        held = (r.__closure__, r.__defaults__, r.__kwdefaults__)
        return any(h is not None and id(h) in children for h in held)
    if issubclass(kind, (nn.Module, torch.optim.Optimizer)):
        return True
    if issubclass(
        kind,
        (
            type,
            types.ModuleType,
            types.FrameType,
            types.CodeType,
            types.GeneratorType,  # the forward search's own, suspended
            Handle,
        ),
    ):
        return False
    return not _foreign(kind)


def _foreign(kind: type) -> bool:
    """Whether objects of class ``kind`` belong to a package whose objects the search
    passes over (:data:`_FOREIGN`)."""
    where = kind.__module__ or ""
    return where.split(".", 1)[0] in _FOREIGN and not where.startswith(_TORCH_HOLDERS)


# Yielded by a forward search past the bounds every ``tick`` objects: time to look at the clock.
_TICK = MetaFinding("<tick>", "tensor", (), None, False)


def _container(obj: Any) -> bool:
    return isinstance(
        obj, (nn.Module, torch.optim.Optimizer, Mapping, *_SEQUENCES, set, frozenset)
    ) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type))


def _plain_attributes(obj: Any, bounded: bool = True) -> list[tuple[str, Any]] | None:
    """The attributes of a plain object (an instance of the user's class, a
    ``SimpleNamespace``) or the variables a function closes over, or ``None``.

    A helper object holding a deferred module (``self.helper = Helper(proj)``)
    or a closure using one hides it as well as a list does; the search
    reports it. Long containers there (a dataset's samples) are skipped.
    """
    if isinstance(obj, types.FunctionType):
        return _function_values(obj)
    if isinstance(obj, types.MethodType):
        # A bound method (``self.fn = helper.apply``) holds its object as a closure does.
        return [("__self__", obj.__self__), ("__func__", obj.__func__)]
    if isinstance(obj, functools.partial):
        found = [("func", obj.func)]
        found += [(f"args.{i}", value) for i, value in enumerate(obj.args)]
        found += [(f"keywords.{key}", value) for key, value in obj.keywords.items()]
        return found
    kind = type(obj)
    if issubclass(kind, (type, types.ModuleType, str, bytes)) or _foreign(kind):
        return None
    # A class with __slots__ keeps those attributes outside __dict__ (or has none).
    values: list[tuple[str, Any]] = list(_slot_values(obj))
    try:
        attributes = object.__getattribute__(obj, "__dict__")
    except (AttributeError, TypeError):
        attributes = None
    if isinstance(attributes, dict):
        values += [(str(name), value) for name, value in attributes.items()]
    elif not values:
        return None
    return [
        (name, value)
        for name, value in values
        if not name.startswith("__")
        and not (bounded and isinstance(value, (*_SEQUENCES, dict, set)) and len(value) > MAX_ITEMS)
    ]


def _function_values(fn: types.FunctionType) -> list[tuple[str, Any]]:
    """What a function holds: the variables it closes over and its default arguments
    (``lambda x, w=w: ...`` keeps ``w`` as a closure would)."""
    found = []
    cells = fn.__closure__ or ()
    for name, cell in zip(fn.__code__.co_freevars, cells, strict=False):
        try:
            found.append((f"<closure {fn.__name__}: {name}>", cell.cell_contents))
        except ValueError:  # a cell not filled yet
            continue
    code = fn.__code__
    defaults = fn.__defaults__ or ()
    positional = code.co_varnames[: code.co_argcount]
    for name, value in zip(positional[len(positional) - len(defaults) :], defaults, strict=True):
        found.append((f"<default {fn.__name__}: {name}>", value))
    for name, value in (fn.__kwdefaults__ or {}).items():
        found.append((f"<default {fn.__name__}: {name}>", value))
    return found


def _slot_values(obj: Any) -> Iterator[tuple[str, Any]]:
    # Read through each slot's own descriptor: a property of a subclass of the same
    # name is not run (getattr would run it).
    seen: set[str] = set()
    for klass in type(obj).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name.startswith("__") and not name.endswith("__"):
                name = f"_{klass.__name__.lstrip('_')}{name}"  # stored under its mangled name
            slot = klass.__dict__.get(name)
            if name in seen or not isinstance(slot, types.MemberDescriptorType):
                continue
            seen.add(name)
            try:
                yield name, slot.__get__(obj, type(obj))
            except AttributeError:  # a slot not set
                continue


def _items(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield str(key), value
    elif isinstance(obj, _SEQUENCES):
        # A copy (made while holding the GIL): a deque another thread appends to (a
        # replay buffer) raises if it changes while it is iterated.
        for i, value in enumerate(tuple(obj)):
            yield str(i), value
    elif isinstance(obj, (set, frozenset)):
        for i, value in enumerate(obj):
            yield f"<set item {i}>", value
    else:  # a dataclass instance
        for field in dataclasses.fields(obj):
            yield field.name, getattr(obj, field.name, None)


def _deferred(t: torch.Tensor, handle: Any) -> bool:
    """A deferred tensor, or the sharded stand-in (a DTensor) of one."""
    if handle_of(t) is not None:
        return True
    # fully_shard swaps a deferred parameter for a DTensor of the same global
    # shape; the handle stays on the owning module under the same name.
    return (
        handle is not None
        and handle.tensor.is_meta
        and tuple(handle.tensor.shape) == tuple(t.shape)
        and is_dtensor(t)
    )


def _holds_no_data(t: torch.Tensor) -> bool:
    """A meta tensor, or a fake tensor of a finished ``deferred_init`` block (on no device)."""
    return t.is_meta or escaped_site(t) is not None


def _finding(
    path: str, kind: Kind, t: torch.Tensor, deferred: bool, hidden: bool = False
) -> MetaFinding:
    escaped = escaped_site(t)
    deferred = deferred and escaped is None
    return MetaFinding(
        path or "<tensor>",
        kind,
        tuple(t.shape),
        t.dtype,
        deferred,
        hidden,
        escaped,
        stale=not deferred and escaped is None and made_for(t) is not None,
        escaped_as=escaped_alias(t) if escaped is not None else None,
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
