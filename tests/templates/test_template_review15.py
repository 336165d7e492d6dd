"""The hostile review of 2026-12-07: a module appended to ``net`` after its template was made.

``template(template.state_from(net), x)`` ran the template's own modules, without the one appended
to ``net`` (a ``Tanh`` at the end of an ``nn.Sequential``): 0.04 off ``net(x)``, without an error.
The first test fails on dfbaf2c; the second keeps what must still work.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_meta as lm


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("where", ["root", "nested"])
def test_a_module_appended_to_a_sequential_after_the_template_is_refused(where: str) -> None:
    net = nn.Sequential(_net(), nn.Identity())
    template = lm.MetaTemplate(net)
    (net if where == "root" else net[0]).append(nn.Tanh())
    path = "the root" if where == "root" else "'0'"
    with pytest.raises(lm.MetaTensorError, match=rf"{path} holds other modules") as info:
        template(template.state_from(net), torch.randn(5, 4))
    assert list(info.value.paths) == ["" if where == "root" else "0"]


class _WithHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_module_added_beside_a_forward_or_a_parametrization_is_not_refused() -> None:
    # Only containers whose members run in turn are compared: a helper module set on a
    # module of its own, or a parametrization's ModuleDict, runs nothing the template lacks.
    net = _WithHelper()
    template = lm.MetaTemplate(net)
    net.helper = nn.Linear(2, 2)  # not used by forward
    nn.utils.parametrize.register_parametrization(net.body[0], "weight", nn.Identity())
    x = torch.randn(5, 4)
    assert torch.equal(template(template.state_from(net), x), net(x))
