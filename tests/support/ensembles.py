"""Helpers for tests of ``Ensemble``: its plan choice, and a LightningModule over members."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

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


class MembersModule(L.LightningModule):
    """The members as an ``Ensemble(members, execution=execution)``, or, for ``execution=None``,
    as an ``nn.ModuleList`` run in a loop: the same outputs (stacked), loss (mean of
    squares) and optimizer (SGD, lr 0.1), so a Trainer run of one is compared with the
    other's."""

    def __init__(self, members: list[nn.Module], execution: str | None) -> None:
        super().__init__()
        self.net: nn.Module = (
            nn.ModuleList(members)
            if execution is None
            else lm.Ensemble(members, execution=execution)  # type: ignore[arg-type]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.net, nn.ModuleList):
            return torch.stack([m(x) for m in self.net])
        out: torch.Tensor = self.net(x)
        return out

    def training_step(self, batch: tuple[torch.Tensor], _: int) -> torch.Tensor:
        return self(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)
