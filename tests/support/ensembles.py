"""Helpers for tests of ``Ensemble``'s plan choice."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
import torch

import lightning_meta as lm


def chosen_plan(ens: lm.Ensemble, x: torch.Tensor) -> str:
    """The plan ``ens`` settles on for ``x`` (its first call times them; a training step,
    whose gradients are cleared after, and the generator state put back)."""
    state = torch.get_rng_state()
    ens(x).sum().backward()
    ens.zero_grad(set_to_none=True)
    torch.set_rng_state(state)
    assert ens.plan is not None
    return ens.plan


def rank_first(monkeypatch: pytest.MonkeyPatch, plan: str) -> None:
    """Make ``"auto"``'s timing rank ``plan`` first where it was timed: every plan is timed as
    usual (one that draws other masks than the loop's is left out once a run drew, and has
    no time), so a test of what follows the choice does not depend on the machine's load."""
    from lightning_meta._ensemble import _ensemble

    timed = _ensemble.measure

    def first(candidates: Any, *args: Any, **kwargs: Any) -> Any:
        seconds, finalists, drew = timed(candidates, *args, **kwargs)
        if seconds.get(plan, math.inf) < math.inf:  # timed to the end or dropped as slow
            finalists = [plan, *(p for p in finalists if p != plan)]
        return seconds, finalists, drew

    monkeypatch.setattr(_ensemble, "measure", first)


def call_context(case: str) -> contextlib.AbstractContextManager[Any]:
    """The context a call of ``case`` runs in: ``"autocast"`` (CPU, bfloat16),
    ``"inference-mode"``, or grad mode on for any other case."""
    if case == "autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if case == "inference-mode":
        return torch.inference_mode()
    return torch.enable_grad()
