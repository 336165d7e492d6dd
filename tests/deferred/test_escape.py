"""No fake tensor survives a deferred_init block (issue #11, item 2).

Tensors the built modules keep in list, tuple and dict attributes are
materialized like buffers; a tensor kept anywhere else raises on first use,
naming where it was made, and is findable.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import MetaTensorError, deferred_init, is_deferred, materialize
from lightning_meta._deferred._escaped import escaped_site
from support import program_models as pm


def test_list_dict_and_tuple_attributes_are_materialized_exactly() -> None:
    torch.manual_seed(0)
    eager = pm.WithContainers()
    after = torch.rand(3)
    torch.manual_seed(0)
    module = deferred_init(pm.WithContainers)
    assert module.noise[0].is_meta and module.table["nested"][0].is_meta
    assert module.pair[0].is_meta and module.pair[1] == "label"
    assert module.shared[0] is module.fc.weight
    assert is_deferred(module)
    materialize(module)
    assert not is_deferred(module)
    for got, want in [
        (module.noise[0], eager.noise[0]),
        (module.noise[1], eager.noise[1]),
        (module.table["freqs"], eager.table["freqs"]),
        (module.table["nested"][0], eager.table["nested"][0]),
        (module.pair[0], eager.pair[0]),
    ]:
        assert torch.equal(got, want)
        assert got.dtype == want.dtype
    assert module.shared[0] is module.fc.weight  # still one object
    assert torch.equal(module.fc.weight, eager.fc.weight)
    assert torch.equal(torch.rand(3), after)


def test_container_items_are_replayed_when_a_state_dict_fills_the_module() -> None:
    torch.manual_seed(0)
    eager = pm.WithContainers()
    torch.manual_seed(0)
    module = deferred_init(pm.WithContainers)
    module.load_state_dict(eager.state_dict())
    assert not is_deferred(module)
    assert torch.equal(module.noise[1], eager.noise[1])
    assert torch.equal(module.pair[0], eager.pair[0])


def test_container_items_are_replayed_by_load_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = pm.WithContainers()
    path = tmp_path / "net.pt"
    torch.save(eager.state_dict(), path)
    torch.manual_seed(0)
    module = deferred_init(pm.WithContainers)
    report = lm.load_checkpoint(module, path)
    assert not is_deferred(module)
    assert torch.equal(module.table["nested"][0], eager.table["nested"][0])
    assert "noise.0" in report.replayed


def test_a_tensor_kept_in_a_closure_raises_on_first_use_naming_its_line() -> None:
    kept: list[torch.Tensor] = []
    with deferred_init():
        net = torch.nn.Linear(2, 2)
        kept.append(torch.randn(3))  # the line the error names
    materialize(net)
    with pytest.raises(
        MetaTensorError,
        match=r"created inside a deferred_init block at .*test_escape\.py:\d+.*Fix: register it",
    ):
        torch.ones(3) + kept[0]
    with pytest.raises(MetaTensorError, match="after the block ended"):
        kept[0].sum()
    assert escaped_site(kept[0]) is not None
    assert escaped_site(net.weight) is None
    assert escaped_site(torch.ones(1)) is None


def test_a_deferred_container_tensor_trains_exactly_under_metaguard() -> None:
    eager = pm.ContainerLM(deferred=False)
    torch.manual_seed(1)
    pm.trainer(steps=3).fit(eager, pm.loader())
    model = pm.ContainerLM(deferred=True)
    torch.manual_seed(1)
    pm.trainer(steps=3).fit(model, pm.loader())
    assert model.losses == eager.losses
    for (name, got), want in zip(
        model.state_dict().items(), eager.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
    assert torch.equal(model.net.noise[0], eager.net.noise[0])


def test_a_tensor_that_escaped_stops_a_trainer_before_a_step_is_taken() -> None:
    model = pm.EscapingLM()
    trainer = pm.trainer(steps=2)
    with pytest.raises(MetaTensorError, match="created inside a deferred_init block"):
        trainer.fit(model, pm.loader())
    assert trainer.global_step == 0


class _Views(nn.Module):
    """Views of a parameter kept as an attribute, in a list and in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.row = self.lin.weight[0]
        self.rows = [self.lin.weight[1:], self.lin.bias]
        self.table = {"t": self.lin.weight.t()}


def _views(m: _Views) -> list[torch.Tensor]:
    return [m.row, m.rows[0], m.rows[1], m.table["t"]]


def _shares(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def test_views_kept_on_the_module_stay_views_of_their_parameter() -> None:
    # A view kept in a list or dict came back as a copy: a later change to
    # the weight (an optimizer step) no longer reached it.
    torch.manual_seed(0)
    eager = _Views()
    torch.manual_seed(0)
    module = deferred_init(_Views)
    materialize(module)
    for m in (eager, module):
        assert all(_shares(v, m.lin.weight) for v in (m.row, m.rows[0], m.table["t"]))
        assert m.rows[1] is m.lin.bias
        with torch.no_grad():
            m.lin.weight.add_(1.0)
    for got, want in zip(_views(module), _views(eager), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("load", ["load_state_dict", "load_checkpoint"])
def test_views_of_a_weight_cast_after_the_block_keep_their_values(
    load: str, tmp_path: Path
) -> None:
    # module.to(dtype) gives the weight other memory: eager's views keep the
    # initial values, and loading must not make them views of the new weight.
    torch.manual_seed(1)
    path = tmp_path / "views.pt"
    torch.save(_Views().state_dict(), path)
    torch.manual_seed(0)
    eager = _Views().to(torch.float64)
    torch.manual_seed(0)
    module = deferred_init(_Views).to(torch.float64)
    for m in (eager, module):
        if load == "load_checkpoint":
            lm.load_checkpoint(m, path)
        else:
            m.load_state_dict(torch.load(path))
    for got, want in zip(_views(module), _views(eager), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("load", ["load_state_dict", "assign", "load_checkpoint"])
def test_views_kept_on_the_module_see_what_a_load_copies(load: str, tmp_path: Path) -> None:
    # Eager loading copies into the weight, which its views see; the views
    # were replayed with the initial values instead. Deferred loading keeps
    # views and ties with assign=True too (eager's assign=True breaks both).
    torch.manual_seed(1)
    path = tmp_path / "views.pt"
    torch.save(_Views().state_dict(), path)
    torch.manual_seed(0)
    eager = _Views()
    torch.manual_seed(0)
    module = deferred_init(_Views)
    for m in (eager, module):
        if load == "load_checkpoint":
            lm.load_checkpoint(m, path)
        else:
            m.load_state_dict(torch.load(path), assign=load == "assign" and m is module)
    assert not is_deferred(module)
    for got, want in zip(_views(module), _views(eager), strict=True):
        assert torch.equal(got, want)
    assert _shares(module.row, module.lin.weight) and module.rows[1] is module.lin.bias


class _Straddling(nn.Module):
    """Two parameters cut from one tensor, and a view across both kept in a list."""

    def __init__(self) -> None:
        super().__init__()
        flat = torch.randn(10)
        self.a = nn.Parameter(flat[:4])
        self.b = nn.Parameter(flat[4:])
        self.span = [flat[2:6]]


def test_a_view_across_two_loaded_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "straddling.pt"
    torch.save(_Straddling().state_dict(), path)
    module = deferred_init(_Straddling)
    with pytest.raises(MetaTensorError, match=r"'span\.0'.*views memory") as info:
        lm.load_checkpoint(module, path)
    assert list(info.value.paths) == ["span.0"]
    assert is_deferred(module) and module.a.is_meta  # nothing was changed
