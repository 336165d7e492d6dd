"""MetaTemplate, hostile sweep of 2026-12-05 (evening): a shallow copy of a template; a
real call whose output stayed meta."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from torch import nn

import lightning_meta as lm


def test_a_shallow_copy_is_an_independent_template() -> None:
    # copy.copy shared the meta module but not the mode flag: eval() on the copy
    # switched the original's dropout off while original.training still said True.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 4)).train()
    template = lm.MetaTemplate(net)
    other = copy.copy(template)
    other.eval()
    assert template.training and template.module.training and not other.module.training
    assert other.module is not template.module
    assert all(p.is_meta for p in other.module.parameters())
    x = torch.randn(8, 4)
    torch.manual_seed(1)
    got = template(dict(net.named_parameters()), x)
    torch.manual_seed(1)
    assert torch.equal(got, net(x))


class _Slow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        time.sleep(x.shape[0] / 10)  # the other thread's call runs meanwhile
        return self.a(h)


def test_a_shallow_copy_in_another_thread_does_not_mix_tensors() -> None:
    # Each copy had its own lock over the one shared module: the second layer of
    # one call read the weight the other call had swapped in.
    template = lm.MetaTemplate(_Slow())
    other = copy.copy(template)
    first: list[torch.Tensor] = []
    two = {"a.weight": 2 * torch.eye(3)}
    thread = threading.Thread(target=lambda: first.append(other(two, torch.ones(5, 3))))
    thread.start()
    time.sleep(0.1)
    try:
        second = template({"a.weight": 3 * torch.eye(3)}, torch.ones(8, 3))
    finally:
        thread.join()
    assert len(first) == 1 and torch.equal(first[0], torch.full((5, 3), 4.0))
    assert torch.equal(second, torch.full((8, 3), 9.0))


class _Projected(nn.Module):
    """A plain tensor attribute met through einsum, whose result stays meta with a meta
    operand (``@`` made a real tensor from uninitialised memory, which was refused)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.proj = 2 * torch.eye(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,ij->bj", self.lin(x), self.proj)


def test_a_real_call_whose_output_stays_meta_is_refused_naming_the_attribute() -> None:
    # A factory's attribute is built on meta: the output was a meta tensor, and the
    # loss failed with torch's device error alone.
    net = _Projected()
    template = lm.MetaTemplate(_Projected)
    x = torch.randn(2, 4)
    with pytest.raises(lm.MetaTensorError, match=r"returned a meta tensor .*'proj'") as e:
        template(dict(net.named_parameters()), x)
    assert e.value.paths == ("'proj'",)
    # A shape probe (meta tensors only in the mapping) still answers with meta.
    probe = template(template.module.state_dict(), x.to("meta"))
    assert probe.is_meta and probe.shape == (2, 4)
    # As a module, the template keeps the attribute's values.
    real = lm.MetaTemplate(net)
    assert torch.equal(real(dict(net.named_parameters()), x), net(x))
