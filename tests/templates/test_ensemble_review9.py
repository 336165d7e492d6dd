"""Ensemble under a hostile review (ninth round): torch's layers that draw random numbers in
their own forward, where ``execution="auto"`` times nothing."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lightning_meta as lm


def _untimed(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` under deterministic algorithms (Trainer(deterministic=True)): auto times nothing."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return fn()
    finally:
        torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("mode", ["loop", "auto"])
def test_attention_dropout_untimed_runs_the_loops_masks(mode: str) -> None:
    # MultiheadAttention's dropout= is a float, not a dropout layer: before, the untimed
    # static plan was vmap, whose attention masks are not the loop's (on torch 2.6 the
    # outputs differed by 1.49, and a deterministic Trainer fit by 3.01 in the loss).
    torch.manual_seed(0)
    members = [nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True) for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members), execution="loop" if mode == "loop" else "auto")
    x = torch.randn(5, 2, 4)

    def ensemble() -> torch.Tensor:
        torch.manual_seed(1)
        return ens(x, x, x, need_weights=False)[0]  # type: ignore[no-any-return]

    def loop() -> torch.Tensor:
        torch.manual_seed(1)
        return torch.stack([m(x, x, x, need_weights=False)[0] for m in members])

    out, expected = _untimed(ensemble), _untimed(loop)
    assert ens.plan == "loop"
    assert torch.equal(out, expected)


def test_attention_without_dropout_untimed_keeps_vmap() -> None:
    # Nothing drawn (eval, or dropout=0): the static plan stands.
    members = [nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True).eval() for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members)).eval()
    x = torch.randn(5, 2, 4)
    out = _untimed(lambda: ens(x, x, x, need_weights=False)[0])
    expected = torch.stack([m(x, x, x, need_weights=False)[0] for m in members])
    assert ens.plan == "vmap"
    torch.testing.assert_close(out, expected)


def test_fractional_max_pool_untimed_runs_the_loop() -> None:
    # It draws its pooling regions in every call, in eval too.
    torch.manual_seed(0)
    members = [
        nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.FractionalMaxPool2d(2, output_ratio=0.5))
        for _ in range(3)
    ]
    ens = lm.Ensemble(copy.deepcopy(members)).eval()
    x = torch.randn(4, 2, 8, 8)

    def ensemble() -> torch.Tensor:
        torch.manual_seed(1)
        return ens(x)  # type: ignore[no-any-return]

    out = _untimed(ensemble)
    torch.manual_seed(1)
    expected = torch.stack([m.eval()(x) for m in members])
    assert ens.plan == "loop"
    assert torch.equal(out, expected)


@pytest.mark.parametrize("execution", ["loop", "auto"])
def test_a_call_under_fake_tensor_mode_leaves_no_fake_view_behind(execution: str) -> None:
    # Before, the loop plan kept the member views it made under FakeTensorMode (a shape
    # probe, an estimate): the next real call computed on them and returned a FakeTensor.
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)) for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members), execution=execution)
    x = torch.randn(4, 8)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        ens(mode.from_tensor(x))
    out = ens(x)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))
    for name, buffer in ens.named_buffers():
        assert type(buffer) is torch.Tensor, name
