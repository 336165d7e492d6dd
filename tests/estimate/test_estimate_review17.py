"""estimate under a hostile review (seventeenth round): an optimizer callable that does not
build its optimizer over the parameters it is given."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import ArgumentTypeError, ArgumentValueError


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)


def _grads_and_weights(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for p in model.parameters() for t in (p, p.grad) if t is not None]


def test_an_optimizer_over_the_models_own_parameters_is_refused_and_changes_nothing() -> None:
    # Before: optimizer_state 0 and the peak about half of the real one, without an error,
    # and the simulated zero_grad wiped the real module's gradients.
    model = _Module()
    model(torch.randn(4, 32)).sum().backward()
    before = _grads_and_weights(model)
    with pytest.raises(
        ArgumentValueError,
        match=r"4 of its 4 tensors are not among them \(the first: the model's own 'net.0.weight'\).*Fix: build the optimizer",
    ):
        lm.estimate(
            model, torch.randn(4, 32), optimizer=lambda params: model.configure_optimizers()
        )
    after = _grads_and_weights(model)
    assert len(after) == len(before) == 8
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_an_optimizer_holding_a_tensor_it_was_not_given_is_refused() -> None:
    model = _Module()
    extra = nn.Parameter(torch.ones(3))

    def factory(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD([*params, extra], lr=0.1, weight_decay=0.5)

    with pytest.raises(ArgumentValueError, match=r"1 of its 5 tensors are not among them"):
        lm.estimate(model, torch.randn(4, 32), optimizer=factory)
    assert torch.equal(extra, torch.ones(3))


def test_a_callable_returning_no_optimizer_is_refused() -> None:
    model = _Module()
    with pytest.raises(
        ArgumentTypeError,
        match=r"returned dict, not an optimizer \(one with step\(\) and param_groups\)",
    ):
        lm.estimate(
            model,
            torch.randn(4, 32),
            optimizer=lambda params: {"optimizer": torch.optim.AdamW(params)},
        )


@pytest.mark.parametrize("part", ["all", "first layer"])
def test_an_optimizer_over_the_given_parameters_is_counted(part: str) -> None:
    # Controls: the parameters given, or some of them (a frozen part), are accepted.
    model = _Module()

    def factory(params: Any) -> torch.optim.Optimizer:
        chosen = list(params) if part == "all" else list(params)[:2]
        return torch.optim.AdamW(chosen, lr=1e-3)

    result = lm.estimate(model, torch.randn(4, 32), optimizer=factory)
    weights = 32 * 64 + 64 + 64 * 8 + 8
    counted = weights if part == "all" else 32 * 64 + 64
    # AdamW: two float32 moments per weight, and a step counter per tensor
    assert 2 * 4 * counted <= result.optimizer_state_bytes <= 2 * 4 * counted + 4 * 8


@pytest.mark.parametrize("foreach", [None, False])
def test_a_tensor_learning_rate_is_estimated_as_a_float_one(foreach: bool | None) -> None:
    # torch's single-tensor Adam takes lr=torch.tensor(...) on the CPU. Before, the warm-up
    # step ran foreach, which refuses it, and the estimate was refused as "cannot be built
    # or stepped", even with foreach=False.
    model = _Module()
    x = torch.randn(4, 32)
    as_tensor = lm.estimate(
        model, x, optimizer=lambda p: torch.optim.Adam(p, lr=torch.tensor(1e-3), foreach=foreach)
    )
    as_float = lm.estimate(
        model, x, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, foreach=foreach)
    )
    assert as_tensor.optimizer_state_bytes == as_float.optimizer_state_bytes > 0
    # the lr tensor itself, if alive at the peak
    assert 0 <= as_tensor.peak_bytes - as_float.peak_bytes <= 4


def test_a_tensor_learning_rate_made_before_the_estimate_is_refused_saying_why() -> None:
    # The single-tensor step reads a tensor lr's value (.item()); one made outside the
    # optimizer callable is a real tensor the shape-only step cannot read.
    lr = torch.tensor(1e-3)
    with pytest.raises(ArgumentValueError, match=r"reads the values of its own state"):
        lm.estimate(_Module(), torch.randn(4, 32), optimizer=lambda p: torch.optim.Adam(p, lr=lr))


class _Wrapper:
    """An optimizer wrapper that does not subclass Optimizer (as torchao's
    CPUOffloadOptimizer), over the parameters it was given."""

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.base = base
        self.param_groups = base.param_groups
        self.state = base.state

    def step(self, closure: Any = None) -> Any:
        return self.base.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)


def test_an_optimizer_wrapper_that_is_no_subclass_is_counted() -> None:
    model = _Module()
    x = torch.randn(4, 32)
    wrapped = lm.estimate(model, x, optimizer=lambda p: _Wrapper(torch.optim.AdamW(p)))
    plain = lm.estimate(model, x, optimizer=torch.optim.AdamW)
    assert wrapped.optimizer_state_bytes == plain.optimizer_state_bytes > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_tensor_learning_rate_on_cuda_steps_single_tensor_as_torch_picks() -> None:
    # torch's default picks foreach on CUDA, but not for a tensor lr without capturable;
    # the estimate's own default pick flipped it on, and the step was refused.
    model = _Module()
    x = torch.randn(4, 32)
    as_tensor = lm.estimate(
        model, x, device="cuda", optimizer=lambda p: torch.optim.Adam(p, lr=torch.tensor(1e-3))
    )
    assert as_tensor.optimizer_state_bytes > 0


class _Master(torch.optim.Optimizer):
    """Steps float32 copies of the parameters it is given (master weights)."""

    def __init__(self, params: Any) -> None:
        self.masters = [p.detach().float().clone() for p in params]
        super().__init__(self.masters, {"lr": 1e-3})

    def step(self, closure: Any = None) -> None:
        return None


def test_an_optimizer_over_copies_it_makes_is_refused_saying_so() -> None:
    # Before: optimizer_state_bytes 0, without an error.
    with pytest.raises(ArgumentValueError, match=r"tensors it made from them .*Fix: estimate with"):
        lm.estimate(_Module(), torch.randn(4, 32), optimizer=_Master)
