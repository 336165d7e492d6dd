"""Ensemble under a hostile review (thirteenth round): random generators passed as call
arguments."""

from __future__ import annotations

import copy
import random

import torch
from torch import nn

import lightning_meta as lm


class _NoisyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h + torch.randn(h.shape, generator=generator))


def test_a_torch_generator_argument_runs_the_loop_and_is_left_as_the_loop_leaves_it() -> None:
    # Before, "auto"'s timed runs (calls 1 and 16) drew from the caller's generator:
    # outputs 2.5 away from the loop's and the generator moved on.
    torch.manual_seed(0)
    members = [_NoisyHead() for _ in range(4)]
    ensemble = lm.Ensemble(copy.deepcopy(members))
    x = torch.randn(4, 8)
    for call in range(1, 18):
        mine, theirs = torch.Generator().manual_seed(call), torch.Generator().manual_seed(call)
        out = ensemble(x, generator=mine)
        ref = torch.stack([m(x, generator=theirs) for m in members])
        torch.testing.assert_close(out, ref)
        assert torch.equal(mine.get_state(), theirs.get_state()), call
        assert ensemble.plan == "loop"


class _Jitter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return self.lin(x) * rng.uniform(0.5, 1.5)


def test_a_python_random_argument_draws_member_after_member() -> None:
    # Before, "auto" ran vmap: one draw for all members, 1.8-7.5 away from the loop.
    torch.manual_seed(0)
    members = [_Jitter() for _ in range(4)]
    ensemble = lm.Ensemble(copy.deepcopy(members))
    x = torch.randn(2, 4)
    for call in range(3):
        out = ensemble(x, random.Random(call))
        rng = random.Random(call)
        torch.testing.assert_close(out, torch.stack([m(x, rng) for m in members]))


class _NoiseLevel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, noise_std: float = 0.0) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if noise_std > 0:
            h = h + noise_std * torch.randn_like(h)
        return self.b(h)


def test_a_number_argument_switching_noise_on_from_zero_is_a_kind_of_call_of_its_own() -> None:
    # Before, a float argument was described by its type alone: the plan timed at
    # noise_std=0.0 (no draws: vmap for 32 members) ran the calls at 1.0, whose
    # noise then differed from the loop's by 5.9 for the same seed.
    torch.manual_seed(0)
    members = [_NoiseLevel() for _ in range(32)]
    ensemble = lm.Ensemble(copy.deepcopy(members))
    x = torch.randn(4, 8)
    for _ in range(3):
        ensemble(x, noise_std=0.0)
    for seed in range(3):
        torch.manual_seed(seed)
        out = ensemble(x, noise_std=1.0)
        torch.manual_seed(seed)
        ref = torch.stack([m(x, noise_std=1.0) for m in members])
        torch.testing.assert_close(out, ref)
        assert ensemble.plan == "loop"
