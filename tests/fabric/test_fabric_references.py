"""fabric_setup: optimizers that keep their own list of parameters, a teacher kept in a list,
and the line deferred_init names inside ``fabric.init_module()``."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm


@pytest.fixture
def fabric() -> L.Fabric:
    return L.Fabric(accelerator="cpu", devices=1)


def test_lbfgs_is_pointed_at_the_real_parameters(fabric: L.Fabric) -> None:
    # LBFGS keeps the first group's list as its own `_params`: replacing the
    # group's list left it on the meta parameters, and its step raised.
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(3, 1)

    def lbfgs(net: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(net.parameters(), lr=0.1, max_iter=3)

    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    results = []
    for deferred in (False, True):
        if deferred:
            with lm.deferred_init():
                net = build()
            net, opt = lm.fabric_setup(fabric, net, lbfgs(net))
        else:
            net = build()
            net, opt = fabric.setup(net, lbfgs(net))

        def closure(net: nn.Module = net, opt: torch.optim.Optimizer = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = net(x).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        results.append(net.weight.detach().clone())
    assert torch.equal(results[0], results[1])


def test_a_teacher_kept_in_a_list_is_materialized(fabric: L.Fabric) -> None:
    class WithTeacher(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = nn.Linear(3, 1)
            self.teacher = [nn.Linear(3, 1, bias=False)]

    torch.manual_seed(0)
    eager = WithTeacher()
    torch.manual_seed(0)
    with lm.deferred_init():
        model = WithTeacher()
    model.student.weight.requires_grad_(False)
    model = lm.fabric_setup(fabric, model)
    assert torch.equal(model.teacher[0].weight, eager.teacher[0].weight)
    assert lm.find_meta_tensors(model) == []


def test_a_refusal_inside_init_module_names_the_users_line(fabric: L.Fabric) -> None:
    # Lightning's _EmptyInit (a TorchFunctionMode) is active there: its
    # __torch_function__ frame was named as the user's line.
    def build() -> None:
        with fabric.init_module(), lm.deferred_init():
            nn.Linear(3, 1).weight.sum().item()

    with pytest.raises(lm.MaterializationError, match=r"test_fabric_references\.py:\d+"):
        build()


def test_an_optimizer_created_inside_the_block_is_refused(fabric: L.Fabric) -> None:
    # It holds the block's fake parameters: its steps changed nothing, silently.
    with lm.deferred_init():
        net = nn.Linear(3, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(lm.MaterializationError, match="created inside the deferred_init block"):
        lm.fabric_setup(fabric, net, opt)


def _two_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    with lm.deferred_init():
        return nn.Linear(3, 3), nn.Linear(3, 1)


def test_an_optimizer_spanning_two_models_is_refused_with_a_fix_that_applies(
    fabric: L.Fabric,
) -> None:
    # A GAN's or a shared optimizer: fabric_setup takes one model, so "create the
    # optimizer from model.parameters() of the model you pass" could not be followed.
    a, b = _two_models()
    opt = torch.optim.Adam([*a.parameters(), *b.parameters()], lr=0.05)
    with pytest.raises(
        lm.MaterializationError,
        match=r"(?s)2 meta parameters that are deferred parameters of another model than Linear"
        r".*Fix: set up every model it trains first.*fabric\.setup_optimizers\(optimizer\)",
    ):
        lm.fabric_setup(fabric, a, opt)
    assert all(p.is_meta for p in b.parameters())  # refused before anything was replayed


def test_an_optimizer_created_before_an_earlier_fabric_setup_trains_or_is_refused(
    fabric: L.Fabric,
) -> None:
    # Either materialize keeps the parameters' identity (the optimizer then holds
    # the real ones, as in eager code) or it is refused with the fix that works.
    def step(a: nn.Module, b: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        fabric.backward(b(a(x)).pow(2).mean())
        opt.step()
        return [p.detach().clone() for p in (*a.parameters(), *b.parameters())]

    torch.manual_seed(0)
    ea, eb = nn.Linear(3, 3), nn.Linear(3, 1)
    eopt = torch.optim.SGD([*ea.parameters(), *eb.parameters()], lr=0.1)
    ea = fabric.setup(ea)
    eb, eopt = fabric.setup(eb, eopt)
    want = step(ea, eb, eopt)
    a, b = _two_models()
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1)
    a = lm.fabric_setup(fabric, a)
    refusal: lm.MaterializationError | None = None
    try:
        b, opt = lm.fabric_setup(fabric, b, opt)
    except lm.MaterializationError as e:
        refusal = e
    if refusal is not None:
        assert "materialized elsewhere" in str(refusal)
        assert "Fix: set up every model it trains first" in str(refusal)
    else:
        got = step(a, b, opt)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_an_optimizer_not_passed_to_fabric_setup_trains_as_eager(fabric: L.Fabric) -> None:
    # The review's case: the optimizer built on the deferred parameters and
    # used directly, lm.fabric_setup(fabric, model) given only the model.
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
    results = []
    for deferred in (False, True):
        torch.manual_seed(0)
        if deferred:
            with lm.deferred_init():
                module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        else:
            module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = torch.optim.Adam(module.parameters(), lr=0.01)
        wrapped = lm.fabric_setup(fabric, module) if deferred else fabric.setup(module)
        for _ in range(3):
            opt.zero_grad()
            fabric.backward(nn.functional.mse_loss(wrapped(x), y))
            opt.step()
        results.append(module)
    eager, module = results
    for (name, got), want in zip(
        module.state_dict().items(), eager.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
