"""``materialize(fallback="reset_parameters")``: meta tensors that were never deferred.

The modules' ``reset_parameters()`` is first *recorded* on fake tensors, the
way a ``deferred_init`` block records construction (random numbers drawn
for real, generators moving as they would eagerly), then replayed onto real
memory. Recording first is what makes the fallback safe: a method that
writes only part of a tensor, or none of it, is seen (the tensor still holds
uninitialised memory) and refused, and a method that raises has changed
nothing; in both cases every tensor is back on meta and the generators are
where they were.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from lightning_meta._deferred._handles import dress_like, replaced_by_to, tensor_attrs
from lightning_meta._deferred._record import Record
from lightning_meta._deferred._recorder import Recorder
from lightning_meta._deferred._replay import replay
from lightning_meta._deferred._rng import default_generator
from lightning_meta._deferred._session import close, recording
from lightning_meta._errors import MaterializationError
from lightning_meta._slots import Slot, own_slots

__all__ = ["overwritten", "reset_parameters", "resetting", "without_reset"]


def resetting(plain: list[Slot]) -> dict[int, nn.Module]:
    """Return (by ``id``) the modules whose ``reset_parameters()`` initialises ``plain``.

    Those that hold one of them as a parameter or buffer and have the method.
    """
    return {
        id(s.owner): s.owner
        for s in plain
        if s.kind != "attr" and callable(getattr(s.owner, "reset_parameters", None))
    }


def overwritten(plain: list[Slot]) -> dict[str, list[str]]:
    """Return the other tensors each :func:`resetting` module's method would write, by its path.

    ``reset_parameters()`` initialises every parameter and buffer of its
    module; one that ``plain`` does not hold (deferred, so given eager's
    values, or real already) would be drawn again, which eager construction
    does not do.
    """
    filled = {id(s.tensor) for s in plain}
    found: dict[str, list[str]] = {}
    for slot in plain:
        if slot.kind == "attr" or not callable(getattr(slot.owner, "reset_parameters", None)):
            continue
        prefix = slot.path[: -len(slot.name)].rstrip(".")
        others = [
            s.path
            for s in own_slots(slot.owner, prefix)
            if s.kind != "attr" and id(s.tensor) not in filled
        ]
        if others:
            found[prefix or "the module itself"] = others
    return found


def without_reset(plain: list[Slot]) -> list[str]:
    """Return the paths of ``plain`` whose tensor no :func:`resetting` module holds.

    A slot of a module without the method is covered by another slot of the
    same tensor that has it: transformers' ``set_output_embeddings`` ties an
    MLM head's ``bias`` to its new ``decoder.bias``, which ``nn.Linear`` resets.
    """
    covered = {
        id(s.tensor)
        for s in plain
        if s.kind != "attr" and callable(getattr(s.owner, "reset_parameters", None))
    }
    return sorted({s.path for s in plain if id(s.tensor) not in covered})


def reset_parameters(
    plain: list[Slot], device: torch.device, dtype: torch.dtype | None = None
) -> None:
    """Initialise never-deferred meta tensors with their modules' ``reset_parameters()``.

    ``dtype``: floating point results are cast to it afterwards, as
    ``module.to(dtype)`` casts (``reset_parameters()`` draws in the tensors'
    own dtype, as it would eagerly before the cast).

    Raises:
        MaterializationError: ``reset_parameters()`` leaves a tensor wholly or
            partly unwritten; every tensor is put back on meta.
        Exception: whatever ``reset_parameters()`` raised; every tensor is put
            back on meta.
    """
    owners = resetting(plain)
    generators = [
        g for g in {default_generator(torch.device("cpu")), default_generator(device)} if g
    ]
    entry = [(g, g.get_state()) for g in generators]
    record = Record()
    converted: dict[int, Callable[[], str]] = {}
    recorder: Recorder | None = None
    ok = False
    try:
        with recording(record, track_modules=False) as recorder:
            fakes: dict[int, torch.Tensor] = {}
            for slot in plain:
                fake = fakes.get(id(slot.tensor))
                if fake is None:
                    t = slot.tensor
                    fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
                    if isinstance(t, nn.Parameter):
                        fake = nn.Parameter(fake, requires_grad=t.requires_grad)
                    fakes[id(t)] = fake
                slot.put(fake)
            with torch.no_grad():
                for owner in owners.values():
                    owner.reset_parameters()  # type: ignore[operator]
            made = {slot.path: slot.current() for slot in plain}
            vids = {path: recorder.vid_at_exit(t) for path, t in made.items() if t is not None}
            dtypes = {path: t.dtype for path, t in made.items() if t is not None}
            converted.update({id(t): functools.partial(str, p) for p, t in made.items()})
        untouched = sorted(p for p, v in vids.items() if recorder.garbage_site(v) is not None)
        if untouched:
            raise MaterializationError(
                f"materialize(fallback='reset_parameters') left {untouched} uninitialised: "
                "reset_parameters() of their modules does not write them (or writes only "
                "part of them). The module was put back on meta. Fix: build the module under "
                "deferred_init or load these tensors from a checkpoint.",
                paths=untouched,
            )
        ok = True
    finally:
        if not ok:
            for slot in plain:
                slot.put(slot.tensor)
            for gen, state in entry:
                gen.set_state(state)
        if recorder is not None:
            close(recorder, converted)
    wanted = {vid: path for path, vid in vids.items()}
    values = replay(record, wanted, device=device, dtype=dtype)
    record.release()
    real: dict[int, torch.Tensor] = {}  # tied slots get one object
    params = {id(slot.tensor) for slot in plain if slot.kind == "param"}
    for slot in plain:
        new = real.get(id(slot.tensor))
        if new is None:
            value = values[vids[slot.path]]
            if id(slot.tensor) not in params and value.dtype != dtypes[slot.path]:
                new = replaced_by_to(slot.tensor, value)  # a buffer module.to(dtype) casts
            else:
                new = dress_like(slot.tensor, value, tensor_attrs(slot.tensor))
            real[id(slot.tensor)] = new
        slot.put(new)
