"""`lm.fabric_setup` on one device, in this process: exact weights, the optimizer carried over,
training equal to the eager-built model, and the refusals. Multi-rank meshes: test_fabric_meshes.py."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm
from support.mesh_models import Llama, deferred, eager, full, train, unequal
from support.processes import run_module


@pytest.fixture
def fabric() -> L.Fabric:
    return L.Fabric(accelerator="cpu", devices=1)


def test_plain_fabric_setup_cannot_take_a_deferred_model(fabric: L.Fabric) -> None:
    # Why fabric_setup exists: torch's error, whose advice (to_empty) loses the values.
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        fabric.setup(deferred())


def test_optimizer_built_first_trains_exactly_like_eager(fabric: L.Fabric) -> None:
    model = deferred()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = lm.fabric_setup(fabric, model, optimizer)
    assert unequal(full(model), full(eager())) == []
    params = {id(p) for p in model.parameters()}
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [
        id(p) for p in model.parameters()
    ]
    assert all(id(p) in params for g in optimizer.param_groups for p in g["params"])
    reference = eager()
    reference, ref_opt = fabric.setup(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2))
    assert train(fabric, model, optimizer) == train(fabric, reference, ref_opt)
    assert unequal(full(model), full(reference)) == []


def test_inside_fabric_init_module(fabric: L.Fabric) -> None:
    torch.manual_seed(0)
    with fabric.init_module(), lm.deferred_init():
        model = Llama()
    model = lm.fabric_setup(fabric, model)
    assert unequal(full(model), full(eager())) == []


def test_empty_init_is_refused_as_uninitialised(fabric: L.Fabric) -> None:
    # empty_init=True skips every initialiser: eager construction holds garbage there.
    torch.manual_seed(0)
    with fabric.init_module(empty_init=True), lm.deferred_init():
        model = Llama()
    with pytest.raises(lm.MaterializationError, match="uninitialised") as info:
        lm.fabric_setup(fabric, model)
    assert "Fix:" in str(info.value)
    assert all(p.is_meta for p in model.parameters())
    # The explicit opt-in keeps eager's uninitialised memory (fabric_setup had none).
    model = lm.fabric_setup(fabric, model, allow_uninitialized=True)
    assert not any(p.is_meta for p in model.parameters())
    with pytest.raises(TypeError, match=r"fabric_setup got allow_uninitialized=1 \(int\)"):
        lm.fabric_setup(fabric, deferred(), allow_uninitialized=1)  # type: ignore[arg-type]


def test_a_stray_meta_tensor_is_refused_before_anything_is_allocated(fabric: L.Fabric) -> None:
    model = deferred()
    model.extra = nn.Linear(2, 2, device="meta")
    with pytest.raises(lm.MetaTensorError, match="extra.weight"):
        lm.fabric_setup(fabric, model)
    assert all(p.is_meta for p in model.parameters())


def test_an_optimizer_on_other_meta_parameters_is_refused(fabric: L.Fabric) -> None:
    model = deferred()
    other = nn.Linear(2, 2, device="meta")
    optimizer = torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1)
    with pytest.raises(lm.MaterializationError, match="not deferred parameters of Llama"):
        lm.fabric_setup(fabric, model, optimizer)
    assert all(p.is_meta for p in model.parameters())


def test_a_model_without_meta_tensors_is_set_up_unchanged(fabric: L.Fabric) -> None:
    model = eager()
    before = full(model)
    assert unequal(full(lm.fabric_setup(fabric, model)), before) == []


def test_bad_arguments(fabric: L.Fabric) -> None:
    with pytest.raises(TypeError, match="expected a lightning.fabric.Fabric"):
        lm.fabric_setup(object(), deferred())
    with pytest.raises(TypeError, match="expected the torch.nn.Module"):
        lm.fabric_setup(fabric, "model")  # type: ignore[arg-type]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inside_init_module_equals_eager_built_on_the_device() -> None:
    fabric = L.Fabric(accelerator="cuda", devices=1)
    torch.manual_seed(0)
    with fabric.init_module(), lm.deferred_init():
        model = Llama()
    model = lm.fabric_setup(fabric, model)
    torch.manual_seed(0)
    with torch.device(fabric.device):
        on_device = Llama()
    assert unequal(full(model), full(on_device)) == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_move_to_device_false_leaves_the_model_on_the_cpu() -> None:
    fabric = L.Fabric(accelerator="cuda", devices=1)
    model = lm.fabric_setup(fabric, deferred(), move_to_device=False)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert unequal(full(model), full(eager())) == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fsdp1_and_fsdp2(tmp_path: Path) -> None:
    proc = run_module("run_fabric_cuda", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert json.loads((tmp_path / "result.json").read_text()) == {"fsdp1": [], "fsdp2": []}


def test_move_to_device_false_materializes_where_eager_construction_leaves_it(
    fabric: L.Fabric,
) -> None:
    model = lm.fabric_setup(fabric, deferred(), move_to_device=False)
    assert unequal(full(model), full(eager())) == []
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_move_to_device_false_refuses_drawing_on_the_device(fabric: L.Fabric) -> None:
    # The model stays on the CPU: no device generator can give the device's values.
    model = deferred()
    with pytest.raises(ValueError, match="draw_on='device' with move_to_device=False"):
        lm.fabric_setup(fabric, model, draw_on="device", move_to_device=False)
    assert all(p.is_meta for p in model.parameters())


def test_an_escaped_tensor_is_refused_without_calling_it_a_meta_tensor(fabric: L.Fabric) -> None:
    with lm.deferred_init():
        model = nn.Linear(2, 2)
        scale = torch.ones(1) * 2  # kept outside the module built in the block
    model.scale = scale
    with pytest.raises(
        lm.MetaTensorError, match="Linear holds 1 tensor that holds no data"
    ) as info:
        lm.fabric_setup(fabric, model)
    assert "'scale'" in str(info.value) and "Fix: register it" in str(info.value)
    assert all(p.is_meta for p in model.parameters())
