"""Estimate under a hostile review (ninth round): an Ensemble's loop plan, a module under two
names whose weight is tied elsewhere."""

from __future__ import annotations

import torch
from torch import nn

import lightning_meta as lm


def test_an_ensembles_loop_plan_weighs_as_its_vmap_plan() -> None:
    # Both plans hold the same tensors in a step (a real step peaks at the same bytes, by
    # torch.profiler's allocator events). Before, the loop plan's copies of the meta
    # template were made inside the weighed step and counted: +32 % here.
    x = torch.randn(16, 256)

    def ensemble(execution: str) -> lm.Ensemble:
        return lm.Ensemble([nn.Linear(256, 256) for _ in range(8)], execution=execution)

    loop = lm.estimate(lambda: ensemble("loop"), x, optimizer="sgd")
    vmap = lm.estimate(lambda: ensemble("vmap"), x, optimizer="sgd")
    stacked = 8 * (256 * 256 + 256) * 4
    assert abs(loop.peak_bytes - vmap.peak_bytes) < 0.01 * stacked
    assert loop.activation_bytes == vmap.activation_bytes


class _AliasPlusTie(nn.Module):
    """transformers 4's T5 in small: ``a`` is ``shared``, and ``head`` ties to it."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(50, 16)
        self.a = self.shared
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.shared.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(ids))  # type: ignore[no-any-return]


class _TieOnly(_AliasPlusTie):
    def __init__(self) -> None:
        super().__init__()
        del self.a

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(ids))  # type: ignore[no-any-return]


def test_a_module_under_two_names_with_a_tied_weight_is_estimated() -> None:
    # Before: KeyError 'a.weight' from torch's tie handling, reported as "the optimizer
    # adamw of _AliasPlusTie cannot be simulated".
    both = lm.estimate(_AliasPlusTie, "2,8:int64")
    tie = lm.estimate(_TieOnly, "2,8:int64")
    assert both.parameters == tie.parameters == 800
    assert both.peak_bytes == tie.peak_bytes
