"""Match checkpoint keys to a module's tensors: prefixes, tied groups, shapes, the refusal.

Everything here only looks: it walks the module and the checkpoint's
:class:`~lightning_meta._load._source.Entry` list and builds a :class:`Plan`,
so a checkpoint that does not fit is refused before the module is touched.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_meta._deferred._handles import made_for
from lightning_meta._errors import ArgumentValueError, MetaTensorError
from lightning_meta._load._source import DENSE, Entry, Source
from lightning_meta._slots import Slot, tie_groups

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
    module: nn.Module, source: Source, where: str, *, prefix: str | None, strict: bool
) -> Plan:
    """Pair ``module``'s tensors with ``source``'s entries; refuse a checkpoint that does not fit.

    Args:
        module: the module to fill; only looked at.
        source: the opened checkpoint; only its entries are looked at.
        where: the checkpoint as the caller named it, for the message.
        prefix: the key prefix to strip, or ``None`` to detect it.
        strict: refuse any missing, unexpected or mis-shaped key.

    Returns:
        The :class:`Plan`.

    Raises:
        ArgumentValueError: ``prefix`` matches no checkpoint key.
        MetaTensorError: the prefix is ambiguous (see :func:`detect_prefix`),
            a module name asks for a tensor of a kind a module cannot hold
            (see :func:`unsupported_error`), or, with ``strict``, keys do not
            fit (see :func:`mismatch_error`).
    """
    groups, made = _join_made([Group.of(slots) for slots in tie_groups(module)])
    expected = {s.path for g in groups for s in g.slots if s.persistent}
    chosen = detect_prefix(source.entries, expected, prefix)
    _refuse_extra_state(module, source, where, chosen)
    plan = make_plan(groups, source.entries, source.others, chosen)
    plan.made = made
    if plan.unsupported:
        raise unsupported_error(where, plan)
    error = mismatch_error(module, where, plan, strict=strict)
    if error is not None:
        raise error
    return plan


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


def _join_made(groups: list[Group]) -> tuple[list[Group], list[tuple[Slot, torch.Tensor]]]:
    """Join to its real tensor's group each group holding a meta tensor made real elsewhere.

    A tie made after construction whose other end was loaded or
    materialized first (:func:`~lightning_meta._deferred._handles.made_for`)
    is that real tensor, in this load as in eager: returns the groups and
    the slots to put their real tensor in (done by ``swap_in``).
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
            target.slots = [*target.slots, *group.slots]
        else:  # the other end is outside the module loaded
            joined.append(Group(real, group.slots))
    return joined, made


def detect_prefix(keys: Iterable[str], expected: set[str], given: str | None) -> str:
    """Return the prefix to strip from checkpoint ``keys`` so they name ``expected`` keys.

    A Lightning checkpoint of a ``LightningModule`` whose network is
    ``self.model`` has keys ``model.*``; loading it into that inner network
    strips ``model.``. The prefix matching the most keys wins; two different
    prefixes matching equally many (two copies of one network) are refused.

    Args:
        keys: the checkpoint's keys.
        expected: the module's persistent names.
        given: the caller's prefix (a missing trailing dot is added), or
            ``None`` to detect it.

    Returns:
        The prefix, ending in a dot, or ``""`` for none.

    Raises:
        ArgumentValueError: ``given`` matches no key.
        MetaTensorError: several prefixes match equally many keys; ``paths``
            holds them, without their trailing dot.
    """
    keys = list(keys)
    if given is not None:
        if given and not given.endswith("."):
            given += "."
        if given and not any(k.startswith(given) for k in keys):
            found = _prefixes(keys)
            # Keys without a dot (a bare nn.Linear's 'weight') have no prefix to offer.
            choices = f"one of {found}, prefix='' (none)" if found else "prefix='' (none)"
            raise ArgumentValueError(
                f"load_checkpoint: prefix={given!r} matches no checkpoint key "
                f"(its first keys: {sorted(keys)[:3]}). "
                f"Fix: pass {choices} or prefix=None to detect it."
            )
        return given
    counts: dict[str, int] = {}
    for key in keys:
        start = 0
        while True:
            if key[start:] in expected:
                counts[key[:start]] = counts.get(key[:start], 0) + 1
            dot = key.find(".", start)
            if dot < 0:
                break
            start = dot + 1
    if not counts:
        return ""
    best = max(counts.values())
    winners = sorted(p for p, c in counts.items() if c == best)
    if "" in winners:
        return ""
    if len(winners) > 1:
        raise MetaTensorError(
            f"the checkpoint holds the module's keys under several prefixes {winners} "
            f"({best} keys each). Fix: choose one with load_checkpoint(..., prefix=...).",
            paths=[w[:-1] for w in winners],
        )
    return winners[0]


def _prefixes(keys: list[str]) -> list[str]:
    return sorted({k.split(".", 1)[0] + "." for k in keys if "." in k})[:20]


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
        made: slots holding a meta tensor made real at another place, with
            that real tensor (see :func:`_join_made`).
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
    made: list[tuple[Slot, torch.Tensor]] = field(default_factory=list)

    @property
    def loaded_names(self) -> list[str]:
        """Every module name the plan fills (each name of a tied group), sorted."""
        return sorted({n for g, _ in self.load for n in g.names})

    @property
    def skipped_names(self) -> list[str]:
        """Every module name of a group skipped for its shape, sorted."""
        return sorted({n for g in self.skipped for n in g.names})


def make_plan(
    groups: list[Group], entries: dict[str, Entry], others: list[str], prefix: str
) -> Plan:
    """Pair every persistent group with its checkpoint entry and list what does not fit.

    Args:
        groups: the module's tensor groups.
        entries: the checkpoint's tensors by key.
        others: checkpoint keys of values that are not tensors.
        prefix: the key prefix to strip (``""`` for none).

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
    for group in groups:
        if not group.persistent:
            continue
        names = [s.path for s in group.slots if s.persistent]
        present = [n for n in names if n in local]
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
    plan.unexpected = sorted(
        [prefix + k for k in local if k not in used] + [o for o in others if o.startswith(prefix)]
    )
    plan.missing.sort()
    plan.unsupported.sort()
    plan.mismatched.sort()
    plan.ignored.sort()
    return plan


def _close(name: str, pool: list[str]) -> str:
    match = difflib.get_close_matches(name, pool, n=1, cutoff=0.85)
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
    if not strict or not (plan.missing or plan.unexpected or plan.mismatched):
        return None
    lines = [
        f"cannot load {where!r} into {type(module).__name__}"
        + (f" (checkpoint prefix {plan.prefix!r} stripped)" if plan.prefix else "")
        + "; the module was left unchanged:"
    ]
    if plan.mismatched:
        lines.append(f"  shape mismatch ({len(plan.mismatched)}):")
        lines += [
            f"    {n!r} has shape {_shape(m)} in the model but {_shape(c)} in the checkpoint"
            for n, m, c in plan.mismatched
        ]
    unexpected_local = [u[len(plan.prefix) :] for u in plan.unexpected]
    if plan.missing:
        lines.append(f"  missing from the checkpoint ({len(plan.missing)}):")
        lines += [f"    {n!r}{_close(n, unexpected_local)}" for n in plan.missing]
    if plan.unexpected:
        lines.append(f"  unexpected in the checkpoint ({len(plan.unexpected)}):")
        lines += [
            f"    {u!r}{_close(ul, plan.missing)}"
            for u, ul in zip(plan.unexpected, unexpected_local, strict=True)
        ]
    lines.append(
        "Fix: load into the module the checkpoint was saved from, pass prefix= if its keys "
        "sit under another attribute, or strict=False to load what matches and get the rest "
        "listed in the report."
    )
    paths = [*plan.missing, *plan.unexpected, *(n for n, _, _ in plan.mismatched)]
    return MetaTensorError("\n".join(lines), paths=paths)


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
