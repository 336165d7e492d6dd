"""Ensemble, sixth hostile review (a torchvision/timm sweep): forwards that switch grad
mode, autocast or saved-tensor hooks for part of their work. The grouped plan traces the
forward with torch.fx, whose graph keeps none of these; it ran them as the rest of the
forward, and ``execution="auto"`` chose it, so the ensemble trained layers the members
froze and skipped the recomputation the members ran, without an error."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lightning_meta as lm


class _StraightThrough(torch.autograd.Function):
    """ReLU in forward, the gradient passed unchanged in backward (a straight-through
    estimator)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _Net(nn.Module):
    """A small CNN whose forward runs one part of it in ``context``."""

    def __init__(self, context: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.context == "no_grad":
            with torch.no_grad():
                h = self.stem(x)
            h = self.block(h)
        elif self.context == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.stem(x)
            h = self.block(h.float())
        elif self.context == "checkpoint":
            h = checkpoint(self.block, self.stem(x), use_reentrant=False)
        elif self.context == "reentrant":  # its input needs no grad: the stem gets none
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                h = self.block(checkpoint(self.stem, x, use_reentrant=True))
        else:
            h = self.block(self.stem(x))
            h = _StraightThrough.apply(h) if self.context == "function" else torch.relu(h)
        return self.head(h)  # type: ignore[no-any-return]


CONTEXTS = ["no_grad", "autocast", "checkpoint", "reentrant", "function"]
_WHAT = {
    "no_grad": "with gradients switched off or on",
    "autocast": "under another torch.autocast setting",
    "checkpoint": "under saved-tensor hooks",
    "reentrant": "with gradients switched off or on",
    "function": "with gradients switched off or on",
}


@pytest.mark.parametrize("context", CONTEXTS)
def test_the_grouped_plan_refuses_a_forward_switching_autograd_context(context: str) -> None:
    torch.manual_seed(0)
    members = [_Net(context) for _ in range(3)]
    with pytest.raises(
        lm.ArgumentValueError, match=rf"the forward computes '\w+' {_WHAT[context]}"
    ):
        lm.Ensemble(copy.deepcopy(members), execution="grouped")
    # The same forward without the context is grouped (the control).
    lm.Ensemble(copy.deepcopy([_Net("plain") for _ in range(3)]), execution="grouped")


@pytest.mark.parametrize("context", [c for c in CONTEXTS if c != "autocast"])
def test_auto_trains_a_forward_switching_autograd_context_as_the_members(context: str) -> None:
    # autocast is left out: vmap, which "auto" may choose, rounds in bfloat16
    # otherwise than the members' own ops (see docs/guarantees.md).
    torch.manual_seed(0)
    members = [_Net(context) for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members), execution="auto")
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        out = ens(x)
        out.square().sum().backward()
        expected = torch.stack([m(x) for m in members])
        expected.square().sum().backward()
        torch.testing.assert_close(out, expected)
    assert ens.plan != "grouped"
    for i, member in enumerate(members):
        got = dict(ens.member(i).named_parameters())
        mine = {k: v.grad for k, v in ens.named_parameters()}
        for name, p in member.named_parameters():
            grad = mine["stacked." + name]
            assert (p.grad is None) == (grad is None), name
            if p.grad is not None and grad is not None:
                torch.testing.assert_close(grad[i], p.grad)
            torch.testing.assert_close(got[name], p)
        for name, b in member.named_buffers():
            torch.testing.assert_close(dict(ens.member(i).named_buffers())[name], b)


class _Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.ones(1, 4, 1, 1)


def test_a_constant_made_in_the_forward_is_named_as_such() -> None:
    # Before: "the forward changes '_tensor_constant0' ... state each member keeps",
    # an attribute torch.fx sets on the root itself while tracing.
    members = [_Constant() for _ in range(2)]
    with pytest.raises(lm.ArgumentValueError, match=r"makes a tensor from constants") as e:
        lm.Ensemble(copy.deepcopy(members), execution="grouped")
    assert "_tensor_constant" not in str(e.value)
    ens = lm.Ensemble(copy.deepcopy(members))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))
    assert not hasattr(ens.template.module, "_tensor_constant0")


class _MaybeDropout(nn.Module):
    """timm's blocks add a DropPath only where drop_path_rate > 0."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        if p > 0:
            self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        return self.drop(x) if hasattr(self, "drop") else x


def test_members_differing_by_a_submodule_without_tensors_name_it() -> None:
    # Before: "member 1 has '(drop): Dropout(...)' where member 0 has ')'", no path.
    with pytest.raises(lm.MetaTensorError, match=r"member 1 has an extra submodule 'drop'") as e:
        lm.Ensemble([_MaybeDropout(0.0), _MaybeDropout(0.1)])
    assert e.value.paths == ("drop",)
    with pytest.raises(lm.MetaTensorError, match=r"member 1 lacks the submodule 'drop'"):
        lm.Ensemble([_MaybeDropout(0.1), _MaybeDropout(0.0)])


class _McDropout(nn.Module):
    """Two dropout layers and a plain tensor attribute (litgpt's GPT keeps `mask_cache`)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.lin2 = nn.Linear(8, 8)
        self.drop2 = nn.Dropout(0.5)
        self.scale = torch.ones(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.lin2(self.drop(self.lin(x)))) * self.scale


def test_auto_under_inference_mode_draws_the_loops_masks() -> None:
    # Before: the copies made in the call were inference tensors, whose version
    # counter the timing reads, so every timed plan failed and "auto" ran vmap,
    # whose dropout masks are not the members' (4.4 apart), without an error.
    torch.manual_seed(0)
    members = [_McDropout() for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members))  # train mode: MC dropout
    x = torch.randn(4, 8)
    for _ in range(2):
        torch.manual_seed(1)
        with torch.inference_mode():
            expected = torch.stack([m(x) for m in members])
        torch.manual_seed(1)
        with torch.inference_mode():
            got = ens(x)
        assert torch.equal(got, expected)
    assert ens.plan == "loop"
    assert all(t != float("inf") for t in ens.plans[-1].timings_ms.values())


class _Counts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add_(1)  # an inference tensor: no version counter
        return self.lin(x) + self.seen


def test_an_inference_tensor_changed_in_place_is_put_back_after_the_timed_runs() -> None:
    torch.manual_seed(0)
    members = [_Counts() for _ in range(3)]
    twins = copy.deepcopy(members)
    with torch.inference_mode():
        for m in (*members, *twins):
            m.seen = torch.zeros(4)  # set where litgpt's generate sets its caches
    ens = lm.Ensemble(twins)
    x = torch.randn(2, 4)
    with torch.inference_mode():
        for _ in range(3):
            expected = torch.stack([m(x) for m in members])
            assert torch.equal(ens(x), expected)
    assert ens.plan == "loop"
    for i, m in enumerate(members):
        assert torch.equal(ens.member(i).seen, m.seen) and m.seen[0] == 3
