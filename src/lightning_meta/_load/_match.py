"""Match checkpoint keys to a module's tensors: prefixes, tied groups, shapes, messages.

Everything here only looks: it walks the module and the checkpoint's
:class:`~lightning_meta._load_formats.Entry` list and builds a :class:`Plan`,
so a checkpoint that does not fit is refused before the module is touched.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_meta._errors import MetaTensorError
from lightning_meta._load._formats import Entry
from lightning_meta._slots import Slot, iter_slots

__all__ = ["Group", "Plan", "Slot", "detect_prefix", "make_plan", "module_groups"]


@dataclass
class Group:
    """One tensor object and every slot that holds it (more than one: tied weights)."""

    tensor: torch.Tensor
    slots: list[Slot] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.path for s in self.slots]

    @property
    def persistent(self) -> bool:
        return any(s.persistent for s in self.slots)


def module_groups(module: nn.Module) -> list[Group]:
    """Return every tensor of ``module`` (parameters, buffers, deferred attributes) as groups.

    Shared submodules and tied tensors appear under every name, as in
    ``state_dict``; a group collects the names of one tensor object.
    """
    groups: dict[int, Group] = {}
    for slot in iter_slots(module, remove_duplicate=False):
        groups.setdefault(id(slot.tensor), Group(slot.tensor)).slots.append(slot)
    return list(groups.values())


def detect_prefix(keys: Iterable[str], expected: set[str], given: str | None) -> str:
    """Return the prefix to strip from checkpoint ``keys`` so they name ``expected`` keys.

    A Lightning checkpoint of a ``LightningModule`` whose network is
    ``self.model`` has keys ``model.*``; loading it into that inner network
    strips ``model.``. The prefix matching the most keys wins; two different
    prefixes matching equally many (two copies of one network) are refused.
    """
    keys = list(keys)
    if given is not None:
        if given and not given.endswith("."):
            given += "."
        if given and not any(k.startswith(given) for k in keys):
            raise MetaTensorError(
                f"prefix={given!r} matches no checkpoint key. Fix: pass one of "
                f"{_prefixes(keys)} or prefix=None to detect it."
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
            f"({best} keys each). Fix: choose one with load_checkpoint(..., prefix=...)."
        )
    return winners[0]


def _prefixes(keys: list[str]) -> list[str]:
    return sorted({k.split(".", 1)[0] + "." for k in keys if "." in k})[:20]


@dataclass
class Plan:
    """What to load where, and everything that does not fit, each list sorted."""

    prefix: str
    load: list[tuple[Group, Entry]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    skipped: list[Group] = field(default_factory=list)


def make_plan(
    groups: list[Group], entries: dict[str, Entry], others: list[str], prefix: str
) -> Plan:
    """Pair every persistent group with its checkpoint entry and list what does not fit."""
    plan = Plan(prefix)
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
        shape = tuple(group.tensor.shape)
        bad = [n for n in present if local[n].shape != shape]
        if bad:
            plan.mismatched.extend((n, shape, local[n].shape) for n in bad)
            plan.skipped.append(group)
            continue
        plan.load.append((group, local[present[0]]))
    plan.unexpected = sorted(
        [prefix + k for k in local if k not in used] + [o for o in others if o.startswith(prefix)]
    )
    plan.missing.sort()
    plan.mismatched.sort()
    plan.ignored.sort()
    return plan


def _close(name: str, pool: list[str]) -> str:
    match = difflib.get_close_matches(name, pool, n=1, cutoff=0.85)
    return f" (closest: {match[0]!r})" if match else ""


def _shape(s: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in s) + ("," if len(s) == 1 else "") + ")"


def mismatch_message(module: nn.Module, where: str, plan: Plan, *, strict: bool) -> str | None:
    """Return the error listing every key that does not fit, or ``None`` if loading may go on.

    Mis-shaped tensors always fail with ``strict=True``; missing and
    unexpected keys fail only then too. With ``strict=False`` nothing fails.
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
    return "\n".join(lines)
