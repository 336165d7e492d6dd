"""fabric_setup, hostile sweep of 2026-12-05 (evening): a module the block made on meta on
purpose (a template kept in a list, the classic workaround) was refused, naming the
package's own record of it (``templates.0._lightning_meta_on_meta.weight``) as a meta
tensor "made after the deferred_init block"."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm


class _WithTemplates(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.templates = [nn.Linear(4, 4, device="meta")]  # outside the tree, on purpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {k: v.detach() for k, v in self.lin.named_parameters()}
        return torch.func.functional_call(self.templates[0], params, (self.lin(x),))


def test_a_meta_module_the_block_made_on_purpose_is_accepted() -> None:
    torch.manual_seed(0)
    eager = _WithTemplates()
    torch.manual_seed(0)
    with lm.deferred_init():
        model = _WithTemplates()
    found = {f.path: f.hidden for f in lm.find_meta_tensors(model)}
    assert found == {
        "lin.weight": False,
        "lin.bias": False,
        "templates.0.weight": True,  # outside the tree: left alone
        "templates.0.bias": True,
    }
    fabric = L.Fabric(accelerator="cpu", devices=1)
    wrapped = lm.fabric_setup(fabric, model)
    x = torch.randn(2, 4)
    assert torch.equal(wrapped(x), eager(x))
    assert model.templates[0].weight.is_meta


def test_a_meta_module_filled_by_to_empty_leaves_no_finding() -> None:
    with lm.deferred_init():
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, device="meta"))
    model[1].to_empty(device="cpu")
    model[1].reset_parameters()
    lm.materialize(model)
    assert lm.find_meta_tensors(model) == []
    lm.assert_no_meta(model)


def test_a_bad_draw_on_is_refused_by_fabric_setup_by_name() -> None:
    # "materialize got draw_on='gpu'", and under ModelParallelStrategy only once
    # fabric.setup was running.
    with lm.deferred_init():
        model = nn.Linear(4, 4)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    with pytest.raises(lm.MetaTensorError, match=r"^fabric_setup got draw_on='gpu'"):
        lm.fabric_setup(fabric, model, draw_on="gpu")  # type: ignore[arg-type]
    assert model.weight.is_meta


class _Rotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("inv_freq", torch.rand(4) / 3, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.inv_freq


def test_a_cast_after_the_block_is_refused_with_a_fix_for_fabric() -> None:
    # The fix was "pass dtype= to materialize" (fabric_setup has none) and "use
    # lm.fabric_setup(fabric, model)", which was the call refused.
    with lm.deferred_init():
        model = _Rotary()
    model.to(torch.bfloat16)
    with pytest.raises(lm.MaterializationError, match=r"^fabric_setup cannot fill") as e:
        lm.fabric_setup(L.Fabric(accelerator="cpu", devices=1), model)
    assert "L.Fabric(precision='bf16-true')" in str(e.value)
    assert "dtype=" not in str(e.value).split("Fix:")[1].split("dtype inside")[0]
    # ... which works: the values of eager construction under that precision.
    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="bf16-true")
    eager = fabric.setup(_Rotary())
    torch.manual_seed(0)
    with lm.deferred_init():
        model = _Rotary()
    model = lm.fabric_setup(L.Fabric(accelerator="cpu", devices=1, precision="bf16-true"), model)
    assert model.inv_freq.dtype == torch.bfloat16
    for (name, a), b in zip(eager.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(eager.inv_freq, model.inv_freq)
