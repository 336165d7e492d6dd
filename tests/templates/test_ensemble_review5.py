"""Ensemble, fifth hostile review: random draws switched on on the template after
execution="auto" timed vmap (MC dropout with two dropout layers, randn noise turned on by
``train()``), and the untimed plan under torch.use_deterministic_algorithms."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lightning_meta as lm
from support.torch_modes import deterministic_algorithms


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*batching rule.*")


class _TwoDropouts(nn.Module):
    """Two dropout layers; cumsum keeps the fused and grouped plans off (vmap or loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 128)
        self.drop = nn.Dropout(0.1)
        self.drop2 = nn.Dropout(0.1)
        self.out = nn.Linear(128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop2(self.drop(torch.cumsum(self.fc(x), -1))))


class _Noisy(nn.Module):
    """Gaussian noise in training mode, switched on by the mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.cumsum(self.fc(x), -1))
        return h + torch.randn_like(h) if self.training else h


def _timed_vmap(members: list[nn.Module], call: Callable[[lm.Ensemble], object]) -> lm.Ensemble:
    """An ``"auto"`` ensemble whose timing chose vmap on ``call`` (a few tries: a timing on
    a loaded machine can go astray)."""
    for _ in range(6):
        ensemble = lm.Ensemble(members)
        call(ensemble)
        if ensemble.plan == "vmap":
            return ensemble
    raise AssertionError(f"auto chose {ensemble.plan!r}, not vmap: {ensemble.plans}")


def _loop_of(members: list[nn.Module], x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.stack([m(x) for m in members])


def _eval_calls(x: torch.Tensor) -> Callable[[lm.Ensemble], object]:
    def call(ensemble: lm.Ensemble) -> None:
        ensemble.eval()
        with torch.no_grad():
            for _ in range(20):  # past the second timing
                ensemble(x)

    return call


@pytest.mark.usefixtures("one_thread")
def test_mc_dropout_on_two_layers_set_on_the_template_after_vmap_was_timed_draws_the_loops_masks() -> (
    None
):
    # vmap draws the first dropout layer for all members, then the second; the
    # loop draws both for member 0, then member 1: other masks (max diff 10),
    # and "auto" kept vmap after dropout was turned on on the template.
    torch.manual_seed(0)
    members = [_TwoDropouts() for _ in range(32)]
    x = torch.randn(64, 32)
    ensemble = _timed_vmap(members, _eval_calls(x))
    with torch.no_grad():
        for m in ensemble.template.module.modules():
            if isinstance(m, nn.Dropout):
                m.train()
        for member in members:
            member.eval()
            member.drop.train()
            member.drop2.train()
        for seed in range(3):
            torch.manual_seed(seed)
            out = ensemble(x)
            assert torch.equal(out, _loop_of(members, x, seed))
            assert ensemble.plan == "loop"
        assert ensemble.plans[-1].how == "random draws"
        assert "train=drop,drop2" in ensemble.plans[-1].signature
        # Dropout off again: the kind of call timed in eval, and its plan, come back.
        for m in ensemble.template.module.modules():
            m.eval()
        ensemble(x)
        assert ensemble.plan == "vmap"


@pytest.mark.usefixtures("one_thread")
def test_randn_noise_turned_on_by_train_on_the_template_after_vmap_was_timed_draws_the_loops_noise() -> (
    None
):
    torch.manual_seed(0)
    members = [_Noisy() for _ in range(32)]
    x = torch.randn(33, 32)
    ensemble = _timed_vmap(members, _eval_calls(x))
    with torch.no_grad():
        for m in ensemble.template.module.modules():
            m.train()
        for member in members:
            member.train()
        for seed in range(3):
            torch.manual_seed(seed)
            out = ensemble(x)
            assert torch.equal(out, _loop_of(members, x, seed))
            assert ensemble.plan == "loop"


def test_untimed_vmap_with_two_dropout_layers_runs_the_loop() -> None:
    # Trainer(deterministic=True): nothing is timed, and the static plan of a
    # template of torch's own modules that fused cannot take is vmap.
    torch.manual_seed(0)
    members = [
        nn.Sequential(
            nn.Linear(16, 32), nn.Dropout(0.3), nn.LayerNorm(32), nn.Dropout(0.3), nn.Linear(32, 2)
        )
        for _ in range(8)
    ]
    x = torch.randn(5, 16)
    ensemble = lm.Ensemble(members)
    assert ensemble.execution == "vmap"
    with deterministic_algorithms():
        torch.manual_seed(3)
        out = ensemble(x)
    assert ensemble.plan == "loop"
    torch.testing.assert_close(out, _loop_of(members, x, 3), rtol=0, atol=0)
