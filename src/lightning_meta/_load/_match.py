"""Match checkpoint keys to a module's tensors: prefixes, tied groups, shapes, the refusal.

Everything here only looks: it walks the module and the checkpoint's
:class:`~lightning_meta._load._source.Entry` list and builds a :class:`Plan`,
so a checkpoint that does not fit is refused before the module is touched.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from lightning_meta import _compat
from lightning_meta._arguments import spelled
from lightning_meta._deferred._handles import handle_of, made_for
from lightning_meta._errors import ArgumentValueError, MetaTensorError
from lightning_meta._load._hooks import (
    LoadCode,
    LoadFix,
    describe_all,
    load_code,
    load_code_refusal,
    post_hooked,
    renamings_only,
    skeleton_of,
    trace_load,
    unwrapped_name,
)
from lightning_meta._load._lightning_class import partial_load
from lightning_meta._load._source import (
    DENSE,
    Entry,
    Source,
    norm_fills_counter,
    two_values_error,
)
from lightning_meta._slots import Slot, iter_slots, tie_groups

__all__ = [
    "Group",
    "Plan",
    "detect_prefix",
    "make_plan",
    "mismatch_error",
    "plan_load",
    "unsupported_error",
]


@dataclass
class Group:
    """One tensor object and every slot that holds it (more than one: tied weights)."""

    tensor: torch.Tensor
    slots: list[Slot] = field(default_factory=list)

    @classmethod
    def of(cls, slots: list[Slot]) -> Group:
        """Return the group of one :func:`~lightning_meta._slots.tie_groups` entry."""
        return cls(slots[0].tensor, slots)

    @property
    def names(self) -> list[str]:
        """Every dotted name of the tensor, in walk order."""
        return [s.path for s in self.slots]

    @property
    def persistent(self) -> bool:
        """Whether ``state_dict`` holds the tensor under any of its names."""
        return any(s.persistent for s in self.slots)


def plan_load(
    module: nn.Module,
    source: Source,
    where: str,
    *,
    prefix: str | None,
    strict: bool,
    own: Collection[str] = (),
) -> Plan:
    """Pair ``module``'s tensors with ``source``'s entries; refuse a checkpoint that does not fit.

    Args:
        module: the module to fill; only looked at.
        source: the opened checkpoint; only its entries are looked at.
        where: the checkpoint as the caller named it, for the message.
        prefix: the key prefix to strip, or ``None`` to detect it.
        strict: refuse any missing, unexpected or mis-shaped key.
        own: names a LightningModule's ``on_load_checkpoint`` filled with the module's
            own tensors (see :func:`~lightning_meta._load._lightning_hooks.
            follow_on_load_checkpoint`): not missing, and left as the module holds them.

    Returns:
        The :class:`Plan`.

    Raises:
        ArgumentValueError: ``prefix`` matches no checkpoint key.
        MetaTensorError: the prefix is ambiguous (see :func:`detect_prefix`),
            a module name asks for a tensor of a kind a module cannot hold
            (see :func:`unsupported_error`), or, with ``strict``, keys do not
            fit (see :func:`mismatch_error`).
    """
    _refuse_lazy(module, where)
    # Walk order is state_dict order (the order tie_groups' slots come in).
    order = {s.path: i for i, s in enumerate(iter_slots(module, remove_duplicate=False))}
    groups, made = _join_made([Group.of(slots) for slots in tie_groups(module)], order)
    # Modules with load code of their own (hooks, a _load_from_state_dict
    # override): what load_state_dict would do is traced on a meta skeleton.
    code = load_code(module)
    renames = renamings_only(code)
    persistent = [s.path for g in groups for s in g.slots if s.persistent]

    def guess() -> str:
        # Refused before the prefix is detected (a module that cannot be copied): the
        # fix strips the prefix of the module's own names, if one is clear.
        try:
            return detect_prefix(source.entries, set(persistent), prefix)
        except (ArgumentValueError, MetaTensorError):
            return ""

    fix = LoadFix(source, guess=guess)
    skeleton = skeleton_of(module, where, code, fix) if code and not renames else None
    display = skeleton.display() if skeleton is not None else {}
    if renames:
        display = {p: unwrapped_name(p) for p in persistent if unwrapped_name(p) != p}
    expected = {display.get(p, p) for p in persistent}
    chosen = fix.prefix = detect_prefix(source.entries, expected, prefix)
    _refuse_extra_state(module, source, where, chosen)
    sources = None
    if renames:
        sources = {p: unwrapped_name(p) for p in persistent}
    elif skeleton is not None:
        local = {k[len(chosen) :]: e for k, e in source.entries.items() if k.startswith(chosen)}
        sources = trace_load(module, code, local, where, skeleton, _local_versions(source, chosen))
    # Only a clash at a key this load reads is refused (the module's names, or what
    # its own load code reads): elsewhere both values would be unexpected anyway.
    reads = expected if sources is None else {*expected, *sources.values()}
    clashed = {
        k: f
        for k, f in source.clashes.items()
        if k.startswith(chosen) and k[len(chosen) :] in reads
    }
    if clashed:
        # One file's keys under its name (an index's clashes can be in several shards).
        first = next(iter(clashed.values()))
        raise two_values_error(first, [k for k, f in clashed.items() if f == first])
    plan = make_plan(groups, source.entries, source.others, chosen, sources=sources)
    if sources is not None:
        _refuse_fan_out(module, code, where, fix, plan)
    plan.made = made
    plan.code = code
    plan.fix = fix
    plan.display = display
    if sources is not None:
        plan.missing = sorted(display.get(n, n) for n in plan.missing)
        if skeleton is not None and (plan.missing or plan.unexpected):
            _apply_post_hook_edits(plan, skeleton.post_hook_edits())
    if own:
        # the module's own values: deferred (replayed, as eager's init) or real (kept); a
        # plain meta tensor has none, and stays missing
        valued = {
            display.get(n, n)  # as state_dict names them (a checkpoint_wrapper's, unwrapped)
            for g in groups
            if handle_of(g.tensor) is not None or not g.tensor.is_meta
            for n in g.names
        }
        plan.missing = [n for n in plan.missing if n not in own or n not in valued]
    if plan.missing:
        _fill_batch_counters(module, source, plan)
    if sources is not None:
        _refuse_post_hooks_on_meta(where, plan)
    if plan.unsupported:
        raise unsupported_error(where, plan)
    error = mismatch_error(module, where, plan, strict=strict)
    if error is not None:
        raise error
    return plan


def _apply_post_hook_edits(
    plan: Plan, edits: tuple[set[str], set[str], set[str], set[str]] | None
) -> None:
    """Take off (or add to) the plan's missing and unexpected keys what the post-hooks do.

    ``load_state_dict`` checks ``strict`` and returns the key lists after
    the modules' load post-hooks edited them in place; the report and the
    strict check here do the same.
    """
    if edits is None:
        return
    gone_m, new_m, gone_u, new_u = edits
    shown = plan.display
    gone_m = {shown.get(n, n) for n in gone_m}
    plan.missing = sorted(
        {n for n in plan.missing if n not in gone_m} | {shown.get(n, n) for n in new_m}
    )
    strip = len(plan.prefix)
    plan.unexpected = sorted(
        {u for u in plan.unexpected if u[strip:] not in gone_u} | {plan.prefix + u for u in new_u}
    )


def _fill_batch_counters(module: nn.Module, source: Source, plan: Plan) -> None:
    """Fill a norm layer's missing ``num_batches_tracked`` as its ``_load_from_state_dict`` does.

    ``nn.BatchNorm`` (any ``_NormBase`` tracking running stats) puts its own
    counter in a state dict whose version for the module is below 2 or
    unknown (old torchvision weights, safetensors, a dict built from a state
    dict), or ``tensor(0)`` when the counter is on meta. Here a real counter
    stays as it is, a deferred one is replayed (eager's own value), and a
    plain meta one is given ``tensor(0)``; none of them is missing.
    """
    if source.own_versions:
        return
    groups = {id(g.tensor): g for g in plan.groups}
    for path, mod in module.named_modules():
        if not _compat.counts_batches(mod):
            continue
        name = f"{path}.num_batches_tracked" if path else "num_batches_tracked"
        shown = plan.display.get(name, name)
        if shown not in plan.missing:
            continue
        if not norm_fills_counter(
            source.versions, plan.prefix + path if path else plan.prefix[:-1]
        ):
            continue
        plan.missing.remove(shown)
        counter = mod.num_batches_tracked
        group = groups.get(id(counter))
        if counter.is_meta and handle_of(counter) is None and group is not None:
            entry = source.supply(plan.prefix + shown, torch.tensor(0, dtype=torch.long))
            plan.load.append((group, entry))


def _refuse_fan_out(
    module: nn.Module, code: list[LoadCode], where: str, fix: LoadFix, plan: Plan
) -> None:
    """Refuse load code that copies one checkpoint key into two tensors that are not tied.

    The load reads each key once, into one tensor group (tied names, ties made after
    construction joined): a pre-hook fanning a fused key out to two separate tensors
    would fill only one of them.
    """
    by_key: dict[str, list[Group]] = {}
    for group, entry in plan.load:
        by_key.setdefault(entry.key, []).append(group)
    fanned = {
        key[len(plan.prefix) :]: sorted(plan.display.get(n, n) for g in groups for n in g.names)
        for key, groups in by_key.items()
        if len({id(g) for g in groups}) > 1
    }
    if not fanned:
        return
    bad = sorted(p for paths in fanned.values() for p in paths)
    shown = "; ".join(f"{key!r} into {paths}" for key, paths in sorted(fanned.items())[:4])
    raise load_code_refusal(
        module,
        fix,
        where,
        code,
        f"it copies one checkpoint tensor into several tensors that are not tied ({shown}); "
        "load_checkpoint fills each tensor, with its tied names, from a key of its own",
        paths=bad,
    )


def _local_versions(source: Source, prefix: str) -> Mapping[str, Any] | bool | None:
    """The versions the file saved its modules with (``_metadata``), by module path relative
    to ``prefix`` (the loaded module's own path in the file: ``""`` for it); ``None`` where
    the file keeps none; ``True`` where eager loading gives the modules their own."""
    if source.own_versions:
        return True
    if source.versions is None:
        return None
    root = prefix[:-1]
    out: dict[str, Any] = {}
    for path, value in source.versions.items():
        if not prefix:
            out[path] = value
        elif path == root:
            out[""] = value
        elif path.startswith(prefix):
            out[path[len(prefix) :]] = value
    return out


def _refuse_post_hooks_on_meta(where: str, plan: Plan) -> None:
    """Refuse before loading when a module's load post-hook would run on tensors left on meta.

    The post-hooks run for real after the load (what they refresh, such as a
    derived buffer, must come out as ``load_state_dict`` gives it); on a meta
    tensor they would compute nothing.
    """
    hooked = post_hooked(plan.code)
    if not hooked:
        return
    loaded = {id(g) for g, _ in plan.load}
    skipped = {id(g) for g in plan.skipped}
    left = [
        s.path
        for g in plan.groups
        if id(g) not in loaded
        and g.tensor.is_meta
        and (handle_of(g.tensor) is None or id(g) in skipped)
        for s in g.slots
    ]
    bad = sorted({p for p in left for c in hooked if not c.path or p.startswith(c.path + ".")})
    if bad:
        shown = [plan.display.get(p, p) for p in bad]
        raise MetaTensorError(
            f"cannot load {where!r}: load_state_dict post-hooks of "
            f"{describe_all(hooked)} run after the load, but {shown} would "
            "still be on the meta device (not in the checkpoint and never deferred, or "
            "skipped for their shape), so the hooks could not compute on them; nothing in "
            "the module was changed. Fix: build those tensors for real (or under "
            "lm.deferred_init) or put them in the checkpoint, or materialize the model and use "
            "model.load_state_dict(torch.load(path, mmap=True, weights_only=True)).",
            paths=shown,
        )


def _refuse_lazy(module: nn.Module, where: str) -> None:
    """Refuse a module holding lazy parameters or buffers that have no shape yet.

    ``load_state_dict`` gives them the checkpoint's shapes (a load hook of
    ``nn.LazyModuleMixin``); this loader plans by the module's shapes and
    has none to plan with.
    """
    lazy = [
        s.path
        for s in iter_slots(module, remove_duplicate=False)
        if isinstance(s.tensor, (UninitializedParameter, UninitializedBuffer))
    ]
    if lazy:
        raise MetaTensorError(
            f"cannot load {where!r} into {type(module).__name__}: it holds lazy parameters or "
            f"buffers that have no shape yet (nn.Lazy* modules): {sorted(lazy)}; the module was "
            "left unchanged. Fix: run one forward with an example input (or build the module "
            "with explicit sizes) so they take their shapes, then load; or fill it with "
            "module.load_state_dict(torch.load(path, weights_only=True)), which takes the "
            "shapes from the checkpoint.",
            paths=sorted(lazy),
        )


def _refuse_extra_state(module: nn.Module, source: Source, where: str, prefix: str) -> None:
    """Refuse a checkpoint holding the extra state of a module that takes one.

    ``Module.load_state_dict`` hands ``<path>._extra_state`` to the module's
    ``set_extra_state``; this loader reads tensors only, and would report it
    as unexpected (or, with ``strict=False``, leave the state out).
    """
    keys = [*source.entries, *source.others]
    held = []
    for path, mod in module.named_modules():
        if type(mod).set_extra_state is nn.Module.set_extra_state:
            continue
        key = f"{prefix}{path}._extra_state" if path else f"{prefix}_extra_state"
        if any(k == key or k.startswith(key + ".") for k in keys):
            held.append(key)
    if held:
        raise MetaTensorError(
            f"{where!r} holds the extra state of modules that keep one (set_extra_state): "
            f"{held}. load_checkpoint reads tensors only and does not restore it. Fix: load "
            "that file with module.load_state_dict(torch.load(path)) (materialize a deferred "
            "model first), or save the extra state apart from the tensors.",
            paths=held,
        )


def _join_made(
    groups: list[Group], order: dict[str, int]
) -> tuple[list[Group], list[tuple[Slot, torch.Tensor]]]:
    """Join to its real tensor's group each group holding a meta tensor made real elsewhere.

    A tie made after construction whose other end was loaded or
    materialized first (:func:`~lightning_meta._deferred._handles.made_for`)
    is that real tensor, in this load as in eager: returns the groups and
    the slots to put their real tensor in (done by ``swap_in``). A joined
    group's slots stay in walk (``state_dict``) order, given by ``order``
    (position by path), so that the last name the checkpoint holds is the
    one whose value the tie gets, as with ``load_state_dict``.
    """
    by_tensor = {id(g.tensor): g for g in groups}
    joined: list[Group] = []
    made: list[tuple[Slot, torch.Tensor]] = []
    for group in groups:
        real = made_for(group.tensor) if group.tensor.is_meta else None
        if real is None:
            joined.append(group)
            continue
        made += [(slot, real) for slot in group.slots]
        target = by_tensor.get(id(real))
        if target is not None:
            target.slots = sorted([*target.slots, *group.slots], key=lambda s: order[s.path])
        else:  # the other end is outside the module loaded
            joined.append(Group(real, group.slots))
    return joined, made


def detect_prefix(keys: Iterable[str], expected: set[str], given: str | None) -> str:
    """Return the prefix to strip from checkpoint ``keys`` so they name ``expected`` keys.

    A Lightning checkpoint of a ``LightningModule`` whose network is
    ``self.model`` has keys ``model.*``; loading it into that inner network
    strips ``model.``. Each key counts for the shortest prefix that makes it
    a module name. Keys that are module names as they are win, whatever
    the counts (``load_state_dict`` reads them; the rest is then unexpected,
    which ``strict`` refuses): the module's own keys beside a reference copy
    under ``ref.`` load the own ones, never the copy. Otherwise the prefix
    counted most wins (a Lightning checkpoint's ``model.`` over a loss
    module's ``loss_fn.weight``, a T5 encoder's ``encoder.`` over its
    decoder's); two counted equally (two copies of one network) are refused.

    Args:
        keys: the checkpoint's keys.
        expected: the module's persistent names.
        given: the caller's prefix (a missing trailing dot is added), or
            ``None`` to detect it.

    Returns:
        The prefix, ending in a dot, or ``""`` for none.

    Raises:
        ArgumentValueError: ``given`` matches no key.
        MetaTensorError: several prefixes are counted most, equally;
            ``paths`` holds them, without their trailing dot.
    """
    keys = list(keys)
    if given is not None:
        if given and not given.endswith("."):
            given += "."
        if given and not any(k.startswith(given) for k in keys):
            # Only prefixes that make some key a name of the module: each is a fix.
            found = _fitting_prefixes(keys, expected)
            bare = any(k in expected for k in keys)
            api = [f"one of {found}"] if found else []
            cli = [f"--prefix with one of {found}"] if found else []
            if bare:
                api.append("prefix='' (none)")
                cli.append("--prefix '' (none)")
            fix = spelled(
                "pass " + ", ".join(api) + (" or " if api else "") + "prefix=None to detect it",
                ("pass " + ", ".join(cli) + ", or " if cli else "")
                + "leave --prefix out to detect it",
            )
            raise ArgumentValueError(
                f"{spelled(f'load_checkpoint: prefix={given!r}', f'--prefix {given!r}')} "
                f"matches no checkpoint key (its first keys: {sorted(keys)[:3]}). Fix: {fix}."
            )
        return given
    counts: dict[str, int] = {}
    for key in keys:
        start = 0
        while True:
            if key[start:] in expected:
                # The shortest prefix only: 'sub.weight' is the module's own
                # name even where 'weight' is one too.
                counts[key[:start]] = counts.get(key[:start], 0) + 1
                break
            dot = key.find(".", start)
            if dot < 0:
                break
            start = dot + 1
    if not counts or "" in counts:
        return ""
    best = max(counts.values())
    winners = sorted(p for p, c in counts.items() if c == best)
    if len(winners) > 1:
        raise MetaTensorError(
            f"the checkpoint holds the module's keys under several prefixes {winners} "
            f"({best} keys each). Fix: choose one with "
            f"{spelled('load_checkpoint(..., prefix=...)', '--prefix')}.",
            paths=[w[:-1] for w in winners],
        )
    return winners[0]


def _fitting_prefixes(keys: list[str], expected: set[str]) -> list[str]:
    """The prefixes whose removal makes some key one of ``expected``, most keys first."""
    counts: dict[str, int] = {}
    for key in keys:
        for i, c in enumerate(key):
            if c == "." and key[i + 1 :] in expected:
                counts[key[: i + 1]] = counts.get(key[: i + 1], 0) + 1
    return sorted(counts, key=lambda p: (-counts[p], p))[:20]


@dataclass
class Plan:
    """What to load where, and everything that does not fit, each list sorted.

    Attributes:
        prefix: the checkpoint key prefix stripped.
        groups: every tensor group of the module, persistent or not.
        load: each group to fill, with its checkpoint entry.
        missing: persistent names the checkpoint lacks.
        unexpected: checkpoint keys (prefix included) the module has no place for.
        mismatched: ``(name, shape in the model, shape in the checkpoint)``.
        ignored: checkpoint keys outside ``prefix``.
        skipped: groups left as they are because a shape differs.
        unsupported: ``(key, kind)`` of checkpoint tensors a module name asks
            for but a module cannot hold (meta, sparse, quantized, ...).
        not_tensors: persistent names whose checkpoint key holds a value that is
            not a tensor (a list): a malformed file, which ``load_state_dict``
            refuses with ``strict=False`` too.
        made: slots holding a meta tensor made real at another place, with
            that real tensor (see :func:`_join_made`).
        code: the modules with load code of their own (their post-hooks run
            after the load).
        display: walk names to ``state_dict`` names, where these differ
            (a ``checkpoint_wrapper``), for the report.
        twice: for each tied group the checkpoint holds under several keys,
            ``(the group's names, those keys, prefix included)``: loaded from
            the last key, as ``load_state_dict`` loads it.
    """

    prefix: str
    groups: list[Group] = field(default_factory=list)
    load: list[tuple[Group, Entry]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    skipped: list[Group] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)
    not_tensors: list[str] = field(default_factory=list)
    made: list[tuple[Slot, torch.Tensor]] = field(default_factory=list)
    code: list[LoadCode] = field(default_factory=list)
    fix: LoadFix | None = None
    display: dict[str, str] = field(default_factory=dict)
    twice: list[tuple[list[str], list[str]]] = field(default_factory=list)

    @property
    def loaded_names(self) -> list[str]:
        """Every module name the plan fills (each name of a tied group), sorted."""
        return sorted({n for g, _ in self.load for n in g.names})

    @property
    def skipped_names(self) -> list[str]:
        """Every module name of a group skipped for its shape, sorted."""
        return sorted({n for g in self.skipped for n in g.names})


def make_plan(
    groups: list[Group],
    entries: dict[str, Entry],
    others: list[str],
    prefix: str,
    *,
    sources: dict[str, str] | None = None,
) -> Plan:
    """Pair every persistent group with its checkpoint entry and list what does not fit.

    Args:
        groups: the module's tensor groups.
        entries: the checkpoint's tensors by key.
        others: checkpoint keys of values that are not tensors.
        prefix: the key prefix to strip (``""`` for none).
        sources: for a module with load code of its own, the checkpoint key
            (prefix stripped) each persistent name is filled from, as traced
            (see :mod:`~lightning_meta._load._hooks`); ``None``: each name
            from the key of the same name.

    Returns:
        The :class:`Plan`; a group is paired with the entry of its last name
        the checkpoint holds (``load_state_dict`` leaves that value), and every
        other name it holds must agree in shape.
    """
    plan = Plan(prefix, groups=groups)
    local: dict[str, Entry] = {}
    for key, entry in entries.items():
        if key.startswith(prefix):
            local[key[len(prefix) :]] = entry
        else:
            plan.ignored.append(key)
    used: set[str] = set()
    other_local = {o[len(prefix) :] for o in others if o.startswith(prefix)}
    for group in groups:
        if not group.persistent:
            continue
        names = [s.path for s in group.slots if s.persistent]
        keys = {n: n for n in names} if sources is None else sources
        held = [n for n in names if n in keys and keys[n] in other_local]
        if held:  # any name of the group, tied ones too: load_state_dict refuses it
            plan.not_tensors.extend(held)
            used.update(keys[n] for n in held)
            continue
        present = [keys[n] for n in names if n in keys and keys[n] in local]
        if not present:
            plan.missing.extend(names)
            continue
        used.update(present)
        odd = [(prefix + n, local[n].kind) for n in present if local[n].kind != DENSE]
        if odd:
            plan.unsupported.extend(odd)
            continue
        shape = tuple(group.tensor.shape)
        bad = [n for n in present if local[n].shape != shape]
        if bad:
            plan.mismatched.extend((n, shape, local[n].shape) for n in bad)
            plan.skipped.append(group)
            continue
        # Tied names the checkpoint holds twice (with different values, maybe):
        # the last, in state_dict order, as load_state_dict leaves it.
        plan.load.append((group, local[present[-1]]))
        if len(set(present)) > 1:
            plan.twice.append((names, [prefix + k for k in dict.fromkeys(present)]))
    plan.unexpected = sorted(
        [prefix + k for k in local if k not in used]
        + [o for o in others if o.startswith(prefix) and o[len(prefix) :] not in used]
    )
    # values that are not tensors outside the prefix too (a fabric.save file's
    # "iter_num", an optimizer's hyperparameters): the report's list is complete
    plan.ignored += [o for o in others if not o.startswith(prefix)]
    plan.missing.sort()
    plan.not_tensors.sort()
    plan.unsupported.sort()
    plan.mismatched.sort()
    plan.ignored.sort()
    return plan


def _close(name: str, pool: list[str]) -> str:
    # Not the name itself: listed on both sides, it is explained apart (see mismatch_error).
    match = difflib.get_close_matches(name, [p for p in pool if p != name], n=1, cutoff=0.85)
    return f" (closest: {match[0]!r})" if match else ""


def _shape(s: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in s) + ("," if len(s) == 1 else "") + ")"


def mismatch_error(
    module: nn.Module, where: str, plan: Plan, *, strict: bool
) -> MetaTensorError | None:
    """Return the error listing every key that does not fit, or ``None`` if loading may go on.

    With ``strict=True`` any mis-shaped, missing or unexpected key fails;
    with ``strict=False`` nothing does (the report lists them).

    Args:
        module: the module, named in the message.
        where: the checkpoint as the caller named it.
        plan: the plan to judge.
        strict: whether anything that does not fit fails.

    Returns:
        A :class:`~lightning_meta.MetaTensorError` whose ``paths`` are every
        key it lists (missing and mis-shaped module names, unexpected
        checkpoint keys), or ``None``.
    """
    lines = [
        f"cannot load {where!r} into {type(module).__name__}"
        + (f" (checkpoint prefix {plan.prefix!r} stripped)" if plan.prefix else "")
        + "; the module was left unchanged:"
    ]
    if plan.not_tensors:
        # torch's load_state_dict refuses these whatever strict says.
        lines.append(f"  not a tensor in the checkpoint ({len(plan.not_tensors)}):")
        lines += [f"    {plan.prefix + n!r}" for n in plan.not_tensors]
        lines.append(
            "Fix: the file is malformed at these keys (load_state_dict refuses them too, "
            "whatever strict says): save it again from the model's state_dict(), whose "
            "values are tensors."
        )
        return MetaTensorError("\n".join(lines), paths=list(plan.not_tensors))
    # What transformers' save_pretrained leaves out on purpose (Marian's sinusoidal
    # positions), which its from_pretrained does not ask the file for either: left as
    # built (a deferred model's replayed), and listed in the report as missing.
    unsaved = _compat.transformers_unsaved(module) if plan.missing else set()
    missing = [n for n in plan.missing if n not in unsaved]
    if not strict or not (missing or plan.unexpected or plan.mismatched):
        return None
    if plan.mismatched:
        lines.append(f"  shape mismatch ({len(plan.mismatched)}):")
        lines += [
            f"    {n!r} has shape {_shape(m)} in the model but {_shape(c)} in the checkpoint"
            for n, m, c in plan.mismatched
        ]
    unexpected_local = [u[len(plan.prefix) :] for u in plan.unexpected]
    if missing:
        lines.append(f"  missing from the checkpoint ({len(missing)}):")
        lines += [f"    {n!r}{_close(n, unexpected_local)}" for n in missing]
    if plan.unexpected:
        lines.append(f"  unexpected in the checkpoint ({len(plan.unexpected)}):")
        lines += [
            f"    {u!r}{_close(ul, plan.missing)}"
            for u, ul in zip(plan.unexpected, unexpected_local, strict=True)
        ]
    # Not dropped as from_pretrained drops them: a key its patterns match may be a
    # weight of another configuration (DeBERTa's position_embeddings), which
    # strict=True exists to catch. Named, where of a module the model has (leftovers,
    # not a prefix that differs).
    lenient = _compat.transformers_ignored_unexpected(module, unexpected_local)
    if lenient:
        modules = {n for n, _ in module.named_modules()}
        lenient = {u for u in lenient if u.rpartition(".")[0] in modules}
    if lenient:
        first = next(u for u in unexpected_local if u in lenient)
        lines.append(
            f"transformers' from_pretrained ignores {len(lenient)} of the unexpected keys for "
            f"this model (its _keys_to_ignore_on_load_unexpected: first {first!r}); strict "
            "load_state_dict does not, nor does this load."
        )
    conversions = _compat.transformers_conversions(module, unexpected_local)
    if conversions:
        # transformers 5 saves some layers in another layout than the module holds
        # (a mixture of experts' per-expert weights) and converts them when it loads;
        # strict=False would leave the converted tensors as initialised.
        name = type(module).__name__
        lines.append(
            f"transformers converts this layout when it loads into {name} ("
            + "; ".join(conversions)
            + "); load_checkpoint reads the tensors as stored and applies none of them."
        )
        lines.append(
            f"Fix: load it with transformers ({name}.from_pretrained(...)), save that "
            "model's state_dict once (safetensors.torch.save_model, or torch.save), and "
            "load the saved file; "
            f"{spelled('strict=False', '--no-strict')} would leave the "
            f"{len(plan.missing)} missing tensors as initialised."
        )
    elif plan.code:
        # Names here are as the module's own load code sees them; strict=False
        # is no fix for keys that code was meant to map.
        skipped = sorted(set(plan.missing) & set(unexpected_local))
        if skipped:
            # Listed as missing and unexpected under one name: the code saw the key
            # and did not copy it (a load_state_dict override that loads nothing).
            lines.append(
                f"The load code of {describe_all(plan.code)} did not copy {len(skipped)} "
                f"of the checkpoint's tensors into the names they match (first "
                f"{skipped[0]!r}): load_state_dict on this module leaves them as they are."
            )
        lines.append(
            "Fix: load into the module the checkpoint was saved from, or pass "
            f"{spelled('prefix=', '--prefix')} if its keys sit under another attribute. Names are as module.state_dict() shows them, "
            "after the load code of "
            + describe_all(plan.code)
            + " mapped the checkpoint's keys as load_state_dict does."
        )
    else:
        saved_from = _saved_from(plan.missing, unexpected_local)
        inner, extra = saved_from if saved_from is not None else (None, [])
        rest = (
            f", or {partial_load(module)} to load what matches and get the "
            "rest listed in the report."
            if plan.load
            else f"; {spelled('strict=False', '--no-strict')} on this module would load nothing."
        )
        if inner is not None:
            # Keys the submodule has no place for may be leftovers (the hub's first GPT-2
            # files hold attention masks no GPT2Model keeps) or trained weights (biases a
            # model built without them lacks): named, for the reader to judge.
            fix = (
                f"Fix: the checkpoint holds the keys of submodule {inner!r}"
                + (f", and {len(extra)} it has no place for (first {extra[0]!r})" if extra else "")
                + ": load into it ("
                + spelled(f"lm.load_checkpoint(module.{inner}, ...)", "a target that builds it")
                + (
                    f", with {spelled('strict=False', '--no-strict')} if those {len(extra)} are "
                    "not weights it needs (they are then listed, not loaded)"
                    if extra
                    else ""
                )
                + f"; {spelled('prefix=', '--prefix')} only strips a prefix from checkpoint "
                "keys)" + rest
            )
        else:
            fix = (
                "Fix: "
                + spelled(
                    "load into the module the checkpoint was saved from",
                    "build the model the checkpoint was saved from (its arguments: --args)",
                )
                + (", pass " if plan.load else ", or pass ")
                + f"{spelled('prefix=', '--prefix')} if its keys sit under another attribute"
                + rest
            )
        lines.append(fix)
    paths = [*plan.missing, *plan.unexpected, *(n for n, _, _ in plan.mismatched)]
    return MetaTensorError("\n".join(lines), paths=paths)


def _saved_from(missing: list[str], unexpected: list[str]) -> tuple[str, list[str]] | None:
    """The submodule whose ``state_dict`` names every unexpected key, shortest first (a base
    model's checkpoint loaded into a model with a head: ``transformer`` of GPT2LMHeadModel),
    with ``[]``; else the one whose missing names the checkpoint all holds under its name
    and which names most of them (at least half), with the unexpected keys it does not
    name (attention masks of the hub's first GPT-2 files, a pooler, a deeper layer)."""
    if not unexpected:
        return None
    wanted = set(unexpected)
    owners = sorted(
        {m.rsplit(".", i)[0] for m in missing for i in range(1, m.count(".") + 1)},
        key=lambda o: (o.count("."), o),
    )
    best: tuple[str, set[str]] | None = None
    for owner in owners:
        names = {m[len(owner) + 1 :] for m in missing if m.startswith(owner + ".")}
        if wanted <= names:
            return owner, []
        if (
            names <= wanted
            and 2 * len(names) >= len(wanted)
            and (best is None or len(names) > len(best[1]))
        ):
            best = owner, names
    return (best[0], sorted(wanted - best[1])) if best is not None else None


def unsupported_error(where: str, plan: Plan) -> MetaTensorError:
    """Return the refusal of checkpoint tensors a module cannot be filled with.

    A meta tensor has no values; sparse, quantized and nested tensors and
    tensor subclasses are not what a dense parameter or buffer holds, and
    copying them in would fail half way or lose their meaning.

    Returns:
        A :class:`~lightning_meta.MetaTensorError` whose ``paths`` are the keys.
    """
    lines = [f"  {key!r}: a {kind} tensor" for key, kind in plan.unsupported]
    return MetaTensorError(
        f"cannot load {where!r}: it holds tensors of kinds a module's parameters and buffers "
        "cannot take; the module was left unchanged:\n"
        + "\n".join(lines)
        + "\nFix: save dense tensors with real values (e.g. t.to_dense(), t.dequantize(), "
        "a model materialized off the meta device), or drop these keys from the checkpoint.",
        paths=[k for k, _ in plan.unsupported],
    )
