"""MetaTemplate, regression sweep of 2026-12-05: a meta tensor given as an input among a real
mapping, and the refusal of ``modes=`` for a forward with ``**kwargs``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import lightning_meta as lm


class _Project(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))
        self.k = nn.Parameter(torch.randn(1, 8, 6))

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w @ x, torch.bmm(q, self.k)


def test_a_meta_input_meeting_real_parameters_is_refused() -> None:
    # torch's CPU matmuls take the meta operand and return uninitialised memory: the
    # watch was entered only for meta tensors of the mapping or the template.
    net = _Project()
    template = lm.MetaTemplate(net)
    real = template.state_from(net)
    x, q = torch.randn(8, 3), torch.randn(1, 3, 8)
    for meta_x, meta_q in ((True, False), (False, True)):
        args = (x.to("meta") if meta_x else x, q.to("meta") if meta_q else q)
        with pytest.raises(lm.MetaTensorError, match=r"made a real tensor from an input"):
            template(real, *args)
    # Real inputs, and a shape probe (meta inputs, meta mapping), run as before.
    torch.testing.assert_close(template(real, x, q), net(x, q), rtol=0, atol=0)
    meta_state = {k: torch.empty_like(v, device="meta") for k, v in real.items()}
    out = template(meta_state, x.to("meta"), q.to("meta"))
    assert [o.is_meta for o in out] == [True, True]
    assert [o.shape for o in out] == [torch.Size([4, 3]), torch.Size([1, 3, 6])]


class _ReadsModes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        out: torch.Tensor = self.l(x) * kw.get("modes", {}).get("scale", 1.0)
        return out


def test_modes_through_kwargs_is_refused_with_a_true_reason_and_a_working_fix() -> None:
    net = _ReadsModes()
    template = lm.MetaTemplate(net)
    params = dict(net.named_parameters())
    x = torch.randn(3, 4)
    with pytest.raises(lm.ArgumentValueError, match=r"\*\*kwargs may drop it") as info:
        template(params, x, modes={"scale": 2.0})
    assert "which does not take it" not in str(info.value)
    # The fix the message gives: functional_call's kwargs reach the forward.
    out = template.functional_call(params, (x,), {"modes": {"scale": 2.0}})
    torch.testing.assert_close(out, net(x, modes={"scale": 2.0}), rtol=0, atol=0)


class _KeptProjection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 8)
        self.proj = torch.randn(4, 8)  # a plain attribute, which MetaTemplate(module) keeps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj @ self.l(x).T
        return out


def test_a_shape_probe_meeting_the_templates_real_plain_attribute_is_refused() -> None:
    # Found by the regression sweep of 2026-12-05: a meta mapping and meta inputs never
    # entered the watch, and proj @ meta returned uninitialised memory.
    net = _KeptProjection()
    template = lm.MetaTemplate(net)
    real = template.state_from(net)
    meta_state = {k: torch.empty_like(v, device="meta") for k, v in real.items()}
    with pytest.raises(lm.MetaTensorError, match=r"real where MetaTemplate\(module\) kept"):
        template(meta_state, torch.randn(3, 8, device="meta"))
    x = torch.randn(3, 8)
    torch.testing.assert_close(template(real, x), net(x), rtol=0, atol=0)
