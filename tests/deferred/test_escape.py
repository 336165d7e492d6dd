"""No fake tensor survives a deferred_init block (issue #11, item 2).

Tensors the built modules keep in list, tuple and dict attributes are
materialized like buffers; a tensor kept anywhere else raises on first use,
naming where it was made, and is findable.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
