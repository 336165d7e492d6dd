"""The loop plan: run the template once per member, on views of the stacked tensors.

A Python loop over separate modules is what every other plan is measured
against; on the CPU it beats ``torch.vmap`` for most layers but the
batched-matmul ones. This is that loop with the members' tensors taken as
views of the stacked ones: one ``unbind`` per stacked tensor gives every
member its slice, and its backward writes all members' gradients into the
stacked gradient at once (the gradients are the ones N separate modules
would get). In-place buffer updates (BatchNorm running statistics) land in
the stacked buffers through the views.

Each member runs in its own copy of the (meta) template (:class:`MemberShells`),
with its views put straight into the copy's parameter and buffer tables (the
slots :func:`lightning_meta._slots.tie_groups` finds, tied names included)
instead of through ``torch.func.functional_call``, whose per-call bookkeeping
costs as much as a small layer. Views that need no gradient are kept from
call to call (:class:`ViewCache`), so an inference call puts nothing at all.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_meta._compat import (
    buffers_of,
    compiler_disabled,
    deepcopy_module,
    dispatch_mode_active,
    functorch_transform_active,
    hook_ids,
    modes_and_hooks,
    no_dispatch_modes,
    tensor_tables,
    tree_flatten,
    tree_leaves,
    tree_map_only,
    tree_unflatten,
)
from lightning_meta._ensemble._grads import GradBuffers, unstack
from lightning_meta._errors import ArgumentValueError
from lightning_meta._forward_state import (
    CopyState,
    apply_state,
    carry_state,
    copy_state,
    state_of,
    watched,
)
from lightning_meta._settings import DELETED, SettingsWatch, differs, plain_value
from lightning_meta._slots import Slot, tie_groups

__all__ = [
    "MemberShells",
    "MemberSlots",
    "Reassigned",
    "ViewCache",
    "changed_in_place",
    "check_no_draw",
    "check_output_leaves",
    "join_outputs",
    "replay_rng",
    "restack",
    "rng_states",
    "run_loop",
    "separate_views",
    "write_back",
]


class MemberSlots:
    """Where each stacked tensor goes in one template module: name -> the slots of its tie group."""

    def __init__(self, module: nn.Module, groups: Sequence[tuple[str, Sequence[Slot]]]) -> None:
        self.module = module
        self.groups = tuple((name, tuple(slots)) for name, slots in groups)
        # Flat, pre-bound: put() runs once per member per call.
        self._puts = tuple((name, slot.put) for name, slots in self.groups for slot in slots)
        self._originals = tuple(
            (slot.put, slot.tensor) for _, slots in self.groups for slot in slots
        )
        # Where a forward may put a new tensor in place of a buffer
        # (self.ema = 0.9 * self.ema + ...): the buffer tables themselves.
        self._buffer_reads = tuple(
            (name, buffers_of(slot.owner), slot.name)
            for name, slots in self.groups
            for slot in slots
            if slot.kind == "buffer"
        )

    @classmethod
    def of(cls, module: nn.Module, names: Sequence[str]) -> MemberSlots:
        """Find the slots of ``module`` for the stacked tensors ``names``."""
        wanted = set(names)
        groups = []
        for group in tie_groups(module):
            slots = tuple(s for s in group if s.kind != "attr")
            name = next((s.path for s in slots if s.path in wanted), None)
            if name is not None:
                groups.append((name, slots))
        return cls(module, groups)

    def aliases(self) -> dict[str, str]:
        """Every slot's dotted path -> the stacked tensor's name (tied names map to one)."""
        return {slot.path: name for name, slots in self.groups for slot in slots}

    def put(self, values: Mapping[str, Sequence[torch.Tensor]], index: int) -> None:
        """Put member ``index``'s view of every stacked tensor into the template."""
        for name, put in self._puts:
            put(values[name][index])

    @property
    def watches_buffers(self) -> bool:
        """Whether the module has buffers a forward could replace."""
        return bool(self._buffer_reads)

    def reassigned(
        self,
        given: Mapping[str, Any],
        index: int | None,
        shapes: Mapping[str, torch.Size] | None = None,
    ) -> list[tuple[str, Any]]:
        """The buffers the forward replaced by another value: ``(name, what it put there)``.

        ``given`` holds what was put (member ``index``'s slices, or the
        tensors themselves when ``index`` is ``None``).

        Raises:
            ArgumentValueError: given ``shapes`` (each slice's shape), a slice
                the forward resized in place (``resize_``, as torch.ao's
                per-channel observers grow ``scale`` from ``(1,)`` on their
                first call): it grew over the next members' rows of the one
                stacked tensor, whose values it overwrote (before 2026-12-07,
                seventh session, the stacked buffer, ``state_dict`` and
                ``member(i)`` kept wrong values without an error).
        """
        out = []
        for name, table, key in self._buffer_reads:
            now = table.get(key)
            put = given[name] if index is None else given[name][index]
            if now is not put:
                out.append((name, now))
            elif (
                shapes is not None
                and isinstance(now, torch.Tensor)
                and now.numel() > math.prod(shapes[name])
            ):
                # grown: past its own row (a view reshaped in place, unsqueeze_, stays in it)
                raise ArgumentValueError(
                    f"Ensemble member {index}'s forward resized buffer {name!r} in place, from "
                    f"{tuple(shapes[name])} to {tuple(now.shape)} (a resize_, as torch.ao's "
                    "per-channel observers do on their first call). On the loop plan each "
                    "member's buffer is a view of one stacked tensor, and the resized view "
                    "grew over the next members' rows: this call left the ensemble's buffers "
                    "wrong. Fix: run each member's forward once before building the ensemble "
                    "(its buffers then have their final shapes: calibrate, for quantization-"
                    "aware training), or pass execution='vmap', which stacks the new buffers.",
                    paths=[name],
                )
        return out

    def restore(self) -> None:
        """Put the template's own (meta) tensors back."""
        for put, tensor in self._originals:
            put(tensor)


class ViewCache:
    """Member views of the stacked tensors that need no gradient, kept from call to call.

    Buffers, and parameters under ``torch.no_grad()``, are sliced once and the
    views reused while the stacked tensor is the same object over the same
    memory (an optimizer step writes through them; ``.to()`` or
    ``load_state_dict(assign=True)`` makes new ones). Views that carry a
    gradient are made on every call. CPU tensors only: the views hold the
    stacked memory, which must not outlive a move off an accelerator. Never
    pickled or copied.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Any, ...]] = {}
        self._last: dict[str, Sequence[torch.Tensor]] | None = None

    def __reduce__(self) -> tuple[type[ViewCache], tuple[()]]:
        return (ViewCache, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> ViewCache:
        return ViewCache()

    def clear(self) -> None:
        self._entries.clear()
        self._last = None

    def views_of(
        self,
        tensors: Mapping[str, torch.Tensor],
        grads: GradBuffers,
        renormed: Collection[str] = (),
    ) -> dict[str, Sequence[torch.Tensor]]:
        """Every stacked tensor's member views (``stacked[0], stacked[1], ...``), by name.

        While every view comes from the cache, this returns the very dict of
        the previous call (never changed once returned), so that
        :meth:`MemberShells.ready` sees in one comparison that nothing is to be put.
        """
        grad = torch.is_grad_enabled()
        # Inside torch.func the stacked tensors may be wrappers without
        # storage (a vmap over them), and under a dispatch mode (FakeTensorMode,
        # an estimate) the views are that mode's: nothing is kept. A fake view kept
        # made the next real call compute on it and return a fake tensor.
        keep = not functorch_transform_active() and not dispatch_mode_active()
        inference = torch.is_inference_mode_enabled()
        last = self._last
        out = {}
        for name, stacked in tensors.items():
            if grad and name in renormed and stacked.requires_grad:
                views = separate_views(stacked)
            else:
                views = self._views(name, stacked, grads, grad, keep, inference)
            if last is not None and last.get(name) is not views:
                last = None
            out[name] = views
        if last is not None and len(last) == len(out):
            return last
        self._last = out if keep else None
        return out

    def _views(
        self,
        name: str,
        stacked: torch.Tensor,
        grads: GradBuffers,
        grad: bool,
        keep: bool,
        inference: bool,
    ) -> Sequence[torch.Tensor]:
        if grad and stacked.requires_grad:
            return unstack(stacked, grads, name)
        if not keep:
            return stacked.unbind(0)  # a transform's wrappers
        if not stacked.is_cpu:
            return _member_views(stacked)
        # Everything that says what the memory holds: .data can be given the
        # same memory read in another order, as another dtype, or conjugated.
        key = (
            stacked.data_ptr(),
            stacked.shape,
            stacked.stride(),
            stacked.dtype,
            stacked.is_conj(),
            stacked.is_neg(),
            inference,
        )
        entry = self._entries.get(name)
        if entry is not None and entry[0] is stacked and entry[1] == key:
            return entry[2]  # type: ignore[no-any-return]
        views = _member_views(stacked)
        self._entries[name] = (stacked, key, views)
        return views


def separate_views(stacked: torch.Tensor) -> Sequence[torch.Tensor]:
    """Each member's slice of ``stacked`` as a copy of its own, for a tensor the forward
    changes in place (``nn.Embedding(max_norm=...)`` renormalises the rows it looks up,
    under ``no_grad``); :func:`write_back` puts each copy's values back after the
    member's forward.

    Views would not do: ``unbind``'s cannot be used by autograd once their base changed
    (torch: "Output 0 of Unbind is a view and its base ... has been modified inplace"),
    and any view shares the stacked tensor's version counter, so member ``i + 1``'s
    renormalisation would void what member ``i`` saved for backward (a head tied to the
    embedding). A copy changes alone, as each member's own weight does; its gradient
    flows to the stacked tensor through one ``unbind``.
    """
    return tuple(v.clone() for v in stacked.unbind(0))


def changed_in_place(e: RuntimeError, member: int) -> ArgumentValueError | None:
    """The package's error for torch's refusal of a change in place to a member's view of a
    stacked parameter (a forward's own ``F.embedding(..., max_norm=...)``); ``None`` for
    any other error, which stays as it is."""
    if "is a view and its base or another view of its base has been modified inplace" not in str(e):
        return None
    return ArgumentValueError(
        f"Ensemble's loop plan: member {member}'s forward changed in place a view that the "
        "loop shares between the members with gradients on (a parameter, changed by "
        "F.embedding(..., max_norm=...) or another in-place op in the forward's own code), "
        f"which torch refuses (torch: {str(e).splitlines()[0]}) Fix: if it is a parameter, "
        "use nn.Embedding(max_norm=...) or nn.EmbeddingBag(max_norm=...), whose weights the "
        "loop gives each member a copy of, or execution='vmap'; otherwise the member's own "
        "forward fails the same way."
    )


def write_back(
    tensors: Mapping[str, torch.Tensor],
    views: Mapping[str, Sequence[torch.Tensor]],
    renormed: Collection[str],
    index: int,
) -> None:
    """Put member ``index``'s copies (:func:`separate_views`) of the ``renormed`` tensors
    back into the stacked tensors: what its forward changed in place, as on its own."""
    with torch.no_grad():
        for name in renormed:
            copies, stacked = views.get(name), tensors.get(name)
            if copies is None or stacked is None:
                continue
            if copies[index].data_ptr() != stacked[index].data_ptr():  # a copy, not a view
                stacked[index].copy_(copies[index])


def _member_views(stacked: torch.Tensor) -> Sequence[torch.Tensor]:
    """``stacked.unbind(0)``: views, which share the stacked tensor's version counter.

    So a change to the stacked buffer between forward and backward is refused
    by autograd, as it is for the members; the price is that a buffer one
    member updates in place after another member saved its own slice for
    backward (``self.n += 1; return y * self.n``) is refused too, which
    separate modules are not: ``execution="auto"`` does not pick the loop
    plan then (its timing runs with autograd's check).
    """
    return stacked.unbind(0)


def _with_states(states: list[CopyState] | None) -> MemberShells:
    shells = MemberShells()
    shells._pending = states
    return shells


class MemberShells:
    """One copy of the (meta) template per member, holding that member's views.

    A member's views go into its own copy and stay there, so a call whose
    views are those of the previous call (no gradient: see
    :class:`ViewCache`) puts nothing at all, and modules that cache derived
    state of their weights (an RNN's flattened weight list) keep it, as do
    forwards that keep state in plain attributes. The copies follow the
    template's train/eval modes (running their own ``train()``, as the
    members would) and the plain settings changed on it (a dropout's ``p``),
    and are rebuilt when the template or any hook of its
    modules changes (hooks are copied with the template; what the old copies
    held is carried over). On an accelerator, and inside a ``torch.func``
    transform, the views are taken out again after every call, so no copy
    holds device memory the ensemble has let go, or a transform's wrappers.
    Pickled and copied as what the copies hold in their plain attributes
    (:func:`~lightning_meta._forward_state.state_of`), never as the copies.
    """

    def __init__(self) -> None:
        self._template: nn.Module | None = None
        self._state: list[tuple[bool, Any]] = []
        self._members: list[MemberSlots] = []
        # The views the copies hold: the very mapping last passed (never changed after).
        self._last: Mapping[str, Sequence[torch.Tensor]] = {}
        self._module_list: list[nn.Module] = []
        # Whether the last change of modes was a train()/eval() call (the
        # copies run their own train() then) or flags set directly.
        self.by_train_call = True
        # What the copies of a copied or unpickled ensemble held, for the
        # copies made next.
        self._pending: list[CopyState] | None = None
        # The parameter and buffer tables of the copies' modules whose forward
        # may register one (see watched), with their sizes when made.
        self._tables: list[tuple[Mapping[str, Any], int, Mapping[str, Any], int]] = []
        # The template gained tensors: the copies are made again on the next call.
        self._stale = False
        # The handle ids of the template's hooks when the copies were made: a
        # copy's other hooks are its forward's (carried like its attributes).
        self.template_hooks: frozenset[int] = frozenset()
        # The template's plain settings as the copies last followed them.
        self._watch = SettingsWatch()

    def __reduce__(self) -> tuple[Callable[..., MemberShells], tuple[Any, ...]]:
        return (_with_states, (self._states(),))

    def __deepcopy__(self, memo: dict[int, Any]) -> MemberShells:
        return _with_states(self._states())

    def _states(self) -> list[CopyState] | None:
        """What each copy holds in its plain attributes (copies of it), for a copy of the
        ensemble: the copies themselves are made again from the template."""
        if not self._members:
            # Not run since it was copied: a copy of what it was given.
            return None if self._pending is None else [copy_state(s) for s in self._pending]
        self.follow_settings()  # what was set on the template since the last call
        return [
            state_of(m.module, copy=True, template_hooks=self.template_hooks) for m in self._members
        ]

    def clear(self) -> None:
        """Drop the copies (and the views they hold)."""
        self._template, self._state, self._members, self._last = None, [], [], {}
        self._module_list = []
        self._tables = []
        self._watch = SettingsWatch()

    def remake(self) -> None:
        """Make the copies again on the next call (the template gained a buffer), keeping
        what they hold in their plain attributes."""
        self._stale = True

    def registered(self) -> bool:
        """Whether a forward registered (or removed) a parameter or buffer in a copy since
        it was made (one of the modules whose forward may: see ``watched``)."""
        return any(len(p) != n_p or len(b) != n_b for p, n_p, b, n_b in self._tables)

    # Eagerly, also inside torch.compile: dynamo tracing this bookkeeping
    # (identity checks of the cached views, the deep copies, the puts as side
    # effects) ran a second ensemble, compiled after one of another structure,
    # on its copies' meta tensors ("found at least two devices, cpu and meta").
    # The member calls after it are compiled as before.
    @compiler_disabled
    def ready(
        self,
        template: nn.Module,
        views: Mapping[str, Sequence[torch.Tensor]],
        num_members: int,
    ) -> list[MemberSlots]:
        """Return every member's copy, holding the member's views of ``views``."""
        self.build(template, list(views), num_members)
        last = self._last
        if views is not last and any(last.get(name) is not v for name, v in views.items()):
            for i, member in enumerate(self._members):
                member.put(views, i)
        self._last = views
        return self._members

    def build(self, template: nn.Module, names: Sequence[str], num_members: int) -> None:
        """Make the copies of ``template`` for the stacked tensors ``names``, unless made."""
        # The copies follow the template's train/eval modes and hooks. The
        # module list is walked once per template: the walk (named_modules)
        # cost as much as the member calls of a small layer.
        if self._template is not template:
            self._module_list = list(template.modules())
        else:
            # Before anything below carries the copies' state into new copies: the
            # carried state would otherwise put back the values they were made with.
            self.follow_settings()
        state = modes_and_hooks(self._module_list)
        same = self._template is template and len(self._members) == num_members
        if same and self._state == state and not self._stale:
            return
        copies = [list(m.module.modules()) for m in self._members] if same else []
        if (
            same
            and not self._stale
            and [hooks for _, hooks in state] == [hooks for _, hooks in self._state]
            and all(len(mods) == len(self._module_list) for mods in copies)
        ):
            # Modes only: the copies keep what their forwards stored (a
            # member's state survives train()/eval()), and run their own
            # train() where the members would (LeViT's drops its cache there).
            for member, mods in zip(self._members, copies, strict=True):
                if self.by_train_call:
                    member.module.train(template.training)
                for mine, theirs in zip(mods, self._module_list, strict=True):
                    mine.training = theirs.training
            self._state = state
            return
        old = self._members if same else []
        # Made outside inference mode even in a call under it: the copies' tensor
        # attributes are then plain tensors, as the members' are (an inference
        # tensor has no version counter and refuses later in-place updates). And
        # outside the caller's dispatch modes: the copies are made once, before the
        # steps a memory estimate's tracker weighs (it counted their meta tensors as
        # memory: the stacked parameters' bytes once more, 17-35 % of the peak).
        with torch.inference_mode(False), no_dispatch_modes():
            self._members = [
                MemberSlots.of(deepcopy_module(template), names) for _ in range(num_members)
            ]
        for before, after in zip(old, self._members, strict=False):
            # A hook added or removed: the new copies keep what the old ones stored
            # (and the hooks their forwards registered).
            carry_state(before.module, after.module, template_hooks=self.template_hooks)
        self.template_hooks = hook_ids(self._module_list)
        if not old and self._pending is not None and len(self._pending) == num_members:
            for held, after in zip(self._pending, self._members, strict=True):
                apply_state(after.module, held)
        self._pending = None
        self._template, self._state, self._last = template, state, {}
        self._stale = False
        self._tables = [
            (params, len(params), buffers, len(buffers))
            for member in self._members
            for _, mod in watched(member.module.named_modules())
            for params, buffers in (tensor_tables(mod),)
        ]
        self._watch.reset(template)

    def follow_settings(self) -> None:
        """Put every plain setting changed on the template since the copies last looked (a
        dropout's ``p``, an activation's slope, a forward's own ``self.scale``) into every
        copy.

        The plans that call the template see such a change at once; without this the
        copies kept the value they were made with, and the plans computed different
        functions without an error. Only plain values the template changed are put:
        what a copy's forward stored for its member stays. Modes are followed by
        :meth:`build`; hooks make new copies.
        """
        if self._template is None or not self._members:
            return
        self._put(self._watch.changed(self._template))

    def _put(self, settings: Sequence[tuple[str, str, Any]]) -> None:
        """Put ``settings`` (module path, key, plain value or ``DELETED``) into every copy."""
        for member in self._members:
            for path, key, value in settings:
                target = member.module.get_submodule(path).__dict__
                if value is DELETED:
                    target.pop(key, None)
                else:  # a list or dict of its own per copy, as the copies were made
                    target[key] = copy.deepcopy(value)

    def put_settings(
        self,
        template: nn.Module,
        names: Sequence[str],
        num_members: int,
        settings: Mapping[str, Any],
    ) -> None:
        """Put ``settings`` (dotted name -> plain value) into every copy, made first where they
        are not (what a copied ensemble's copies held is carried into them before).

        For ``Ensemble.apply``, whose ``fn`` set them on every member: the copies follow
        what the template *changed*, and a value it already held is no change.
        """
        if not settings:
            return
        self.build(template, names, num_members)
        changes = []
        for name, value in settings.items():
            path, _, key = name.rpartition(".")
            changes.append((path, key, value))
        self._put(changes)

    @property
    def copies(self) -> list[MemberSlots]:
        """The copies as they are now (a new list whenever they are rebuilt)."""
        return self._members

    def modules(self) -> list[tuple[str, nn.Module]]:
        """Every copy's modules, with their paths in the copy."""
        return [pair for member in self._members for pair in member.module.named_modules()]

    def release(self) -> None:
        """Put the copies' own (meta) tensors back."""
        for member in self._members:
            member.restore()
        self._last = {}


# Buffer name -> member index -> the tensor that member's forward put in its place.
Reassigned = dict[str, dict[int, Any]]


def restack(tensors: dict[str, torch.Tensor], changes: Reassigned) -> list[str]:
    """Put new stacked buffers in ``tensors`` for the buffers members' forwards replaced.

    A member that replaced nothing keeps its slice. Returns the names
    replaced. The old stacked tensors are left as they were (a member's old
    buffer is left alone when its forward assigns a new one).

    Raises:
        ArgumentValueError: a new value that cannot be stacked with the
            others (``None``, another shape, dtype or device, or one that
            carries a gradient history).
    """
    for name, per_member in changes.items():
        old = tensors[name]
        rows = []
        for i, row in enumerate(old.unbind(0)):
            new = per_member.get(i, row)
            if (
                not isinstance(new, torch.Tensor)
                or new.requires_grad
                or (new.shape, new.dtype, new.device) != (row.shape, row.dtype, row.device)
            ):
                what = (
                    f"a {type(new).__name__}"
                    if not isinstance(new, torch.Tensor)
                    else "a tensor that requires grad"
                    if new.requires_grad
                    else f"a tensor of shape {tuple(new.shape)} {new.dtype} on {new.device}"
                )
                raise ArgumentValueError(
                    f"Ensemble member {i}'s forward replaced buffer {name!r} "
                    f"({tuple(row.shape)} {row.dtype} on {row.device}) by {what}, which cannot "
                    "be stacked with the other members' buffers. Fix: assign a tensor of the "
                    "same shape, dtype and device, detached from the graph (or update the "
                    "buffer in place)."
                )
            rows.append(new)
        tensors[name] = torch.stack(rows)
    return list(changes)


def rng_states(device: torch.device) -> list[tuple[Callable[[torch.Tensor], None], torch.Tensor]]:
    """The default generators a member's random ops draw from, with their current states."""
    states: list[tuple[Callable[[torch.Tensor], None], torch.Tensor]] = [
        (torch.set_rng_state, torch.get_rng_state())
    ]
    if device.type == "cuda":
        states.append(
            (lambda s: torch.cuda.set_rng_state(s, device), torch.cuda.get_rng_state(device))
        )
    return states


def replay_rng(states: list[tuple[Callable[[torch.Tensor], None], torch.Tensor]]) -> None:
    """Put every generator of ``states`` (from :func:`rng_states`) back (``randomness="same"``)."""
    for set_state, state in states:
        set_state(state)


def check_no_draw(
    states: list[tuple[Callable[[torch.Tensor], None], torch.Tensor]],
    device: torch.device,
    member: int,
) -> None:
    """Raise if a generator of ``states`` moved since (``randomness="error"``)."""
    # A plain loop, not any(<generator>): torch.compile (2.6) cannot trace the latter here.
    for (_, state), (_, now) in zip(states, rng_states(device), strict=True):
        if torch.equal(state, now):
            continue
        raise ArgumentValueError(
            f"Ensemble(randomness='error'): member {member} drew random numbers (dropout or "
            "another random op). Fix: pass randomness='different' (one draw per member) "
            "or 'same' (one draw shared), or call ensemble.eval()."
        )


def run_loop(
    shells: MemberShells,
    template: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    inputs: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    num_members: int,
    per_member_inputs: bool,
    randomness: str,
    grad_buffers: GradBuffers,
    view_cache: ViewCache,
    changes: Reassigned,
    renormed: Collection[str] = (),
) -> Any:
    """Run every member in turn on views of ``tensors``; stack the outputs on a new dim 0.

    ``randomness="same"`` replays the generators' state for every member (one
    mask for all, as ``vmap`` draws it); ``"error"`` refuses a member that
    drew from them. Buffers a member's forward replaced go in ``changes``; ``renormed``
    names the stacked tensors the forward changes in place (:func:`separate_views`).
    """
    views = view_cache.views_of(tensors, grad_buffers, renormed)
    members = shells.ready(template, views, num_members)
    member_inputs: list[tuple[Any, ...]] = [inputs] * num_members
    member_kwargs: list[Mapping[str, Any]] = [kwargs] * num_members
    if per_member_inputs:
        # One unbind per input (a select per member would make the input's
        # gradient N full-size zero tensors); keyword inputs are split too.
        split = {
            id(t): t.unbind(0)
            for t in tree_leaves((inputs, dict(kwargs)))
            if isinstance(t, torch.Tensor)
        }

        def member(i: int, tree: Any) -> Any:
            return tree_map_only(torch.Tensor, lambda t: split[id(t)][i], tree)

        member_inputs = [member(i, inputs) for i in range(num_members)]
        member_kwargs = [member(i, dict(kwargs)) for i in range(num_members)]
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    replay = rng_states(device) if randomness != "different" else []
    # each member's slice's shape, to see a forward resize a buffer in place
    rows = {name: t.shape[1:] for name, t in tensors.items()}
    outs = []
    try:
        for i in range(num_members):
            if randomness == "same" and i > 0:
                replay_rng(replay)
            try:
                outs.append(members[i].module(*member_inputs[i], **member_kwargs[i]))
            except RuntimeError as e:
                refusal = changed_in_place(e, i)
                if refusal is None:
                    raise
                raise refusal from e
            if renormed and torch.is_grad_enabled():
                write_back(tensors, views, renormed, i)
            for name, new in members[i].reassigned(views, i, rows):
                changes.setdefault(name, {})[i] = new
            if randomness == "error":
                check_no_draw(replay, device, i)
        if changes:
            # The copies hold what the forwards assigned: the next call puts
            # the slices of the new stacked buffers back in.
            shells.release()
    finally:
        # Off the CPU, inside a torch.func transform and under a dispatch mode,
        # the copies let go of the views (device memory; the transform's
        # wrappers; the mode's fake tensors).
        if device.type != "cpu" or functorch_transform_active() or dispatch_mode_active():
            shells.release()
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs)
    return join_outputs(outs, torch.stack)


def check_output_leaves(leaves: Sequence[Any]) -> None:
    """Refuse an output leaf that is neither a tensor nor a plain value (a cache object
    holding tensors cannot be stacked, and under vmap its tensors would escape)."""
    for j, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) and not plain_value(leaf):
            raise ArgumentValueError(
                f"Ensemble members return a {type(leaf).__name__} in output leaf {j}, which is "
                "neither a tensor nor a plain value and cannot be stacked. Fix: return tensors "
                "(for a transformers model's cache, pass use_cache=False)."
            )


def join_outputs(outs: Sequence[Any], join: Callable[[list[torch.Tensor]], torch.Tensor]) -> Any:
    """Join the members' (or chunks') outputs leaf by leaf: ``join`` the tensors; any other
    leaf (``None``, a number) must be the same in every output and is kept once."""
    flat = [tree_flatten(out) for out in outs]
    leaves, spec = flat[0]
    for i, (_, other) in enumerate(flat[1:], start=1):
        if other != spec:
            raise ArgumentValueError(
                f"Ensemble member or chunk {i} returned an output of another structure than "
                f"the first ({other} vs {spec}). Fix: return the same structure from every "
                "member."
            )
    check_output_leaves(leaves)
    joined: list[Any] = []
    for j, first in enumerate(leaves):
        column = [f[0][j] for f in flat]
        odd = next((c for c in column[1:] if not _same_leaf(first, c)), _NONE)
        if odd is not _NONE:
            raise ArgumentValueError(
                f"Ensemble members returned different values in output leaf {j} "
                f"({_describe(first)}, then {_describe(odd)}), which is not a tensor in every "
                "output and cannot be stacked. Fix: return it as a tensor, or the same value "
                "from every member."
            )
        joined.append(join(column) if isinstance(first, torch.Tensor) else first)
    return tree_unflatten(joined, spec)


_NONE = object()


def _same_leaf(a: Any, b: Any) -> bool:
    """Whether two output leaves can be joined: both tensors, or equal plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return type(a) is type(b) and not differs(a, b)


def _describe(leaf: Any) -> str:
    return (
        f"a tensor of shape {tuple(leaf.shape)}" if isinstance(leaf, torch.Tensor) else repr(leaf)
    )
