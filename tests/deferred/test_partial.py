"""Materializing part of a model: shared memory, fallback dtypes, tensors left on meta on purpose."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import MaterializationError, deferred_init, is_deferred, materialize


class _Shared(nn.Module):
    """Parameters of three modules in one storage, three ways eager code makes that."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.wv = nn.Linear(4, 2)
        self.wv.weight = nn.Parameter(self.emb.weight[:2])  # a view
        self.e2 = nn.Embedding(10, 4, _weight=self.emb.weight.data)  # the same memory
        self.e3 = nn.Embedding(10, 4)
        self.e3.weight.data = self.emb.weight.data  # .data of another


def _step(model: nn.Module) -> None:
    with torch.no_grad():
        model.emb.weight.add_(1.0)  # an optimizer step on emb alone


def _check_like_eager(model: nn.Module) -> None:
    torch.manual_seed(0)
    eager = _Shared()
    _step(eager)
    _step(model)
    for name in ("emb", "wv", "e2", "e3"):
        assert torch.equal(getattr(model, name).weight, getattr(eager, name).weight), name
        assert type(getattr(model, name).weight) is nn.Parameter
    ptr = model.emb.weight.untyped_storage().data_ptr()
    for name in ("wv", "e2", "e3"):
        assert getattr(model, name).weight.untyped_storage().data_ptr() == ptr, name


@pytest.mark.parametrize(
    "order", [("emb", "wv", "e2", "e3"), ("wv", "e2", "e3", "emb"), ("e3", "emb", "wv", "e2")]
)
def test_submodules_materialized_one_by_one_keep_their_shared_memory(
    order: tuple[str, ...],
) -> None:
    torch.manual_seed(0)
    with deferred_init():
        model = _Shared()
    for name in order:
        materialize(getattr(model, name))
        assert is_deferred(model) == (name != order[-1])
    _check_like_eager(model)


def test_tensors_made_ahead_follow_deepcopy_and_pickle() -> None:
    # torch's deepcopy and pickle give each Parameter its own memory (eager's too).
    torch.manual_seed(0)
    eager = _Shared()
    torch.manual_seed(0)
    with deferred_init():
        model = _Shared()
    materialize(model.wv)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        for name in ("emb", "e2", "e3"):
            materialize(getattr(copied, name))
        assert not is_deferred(copied)
        for name in ("emb", "wv", "e2", "e3"):
            assert torch.equal(getattr(copied, name).weight, getattr(eager, name).weight)


def test_a_shared_parameter_cast_on_its_own_gets_its_own_memory_like_module_to() -> None:
    torch.manual_seed(0)
    eager = _Shared()
    torch.manual_seed(0)
    with deferred_init():
        model = _Shared()
    materialize(model.wv, dtype=torch.float16)
    materialize(model)
    assert model.wv.weight.dtype == torch.float16
    assert torch.equal(model.wv.weight, eager.wv.weight.half())
    assert torch.equal(model.emb.weight, eager.emb.weight)


def test_load_state_dict_with_assign_after_a_part_was_materialized_takes_the_checkpoint() -> None:
    torch.manual_seed(0)
    with deferred_init():
        model = _Shared()
    materialize(model.wv)
    loaded = torch.full((10, 4), 3.0)
    model.emb.load_state_dict({"weight": loaded}, assign=True)
    assert torch.equal(model.emb.weight, loaded)


def test_fallback_casts_to_the_dtype_asked_for() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    torch.manual_seed(0)
    materialize(model, fallback="reset_parameters", dtype=torch.float16)
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).to(torch.float16)
    for (name, got), want in zip(
        model.state_dict().items(), eager.state_dict().values(), strict=True
    ):
        assert got.dtype == torch.float16, name
        assert torch.equal(got, want), name


class _WithProbe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.probe = nn.Linear(3, 3, device="meta")  # a shape-only helper
        with torch.device("meta"):
            self.shape_only = nn.Linear(3, 2)
        self.template = lm.MetaTemplate(lambda: nn.Linear(3, 3))
        self.b = nn.Linear(3, 3)


def test_tensors_made_on_meta_on_purpose_stay_there_and_the_rest_is_exact() -> None:
    torch.manual_seed(0)
    eager = _WithProbe()
    after = torch.rand(3)
    torch.manual_seed(0)
    with deferred_init():
        model = _WithProbe()
    assert not is_deferred(model.probe)
    materialize(model.a)
    materialize(model)
    assert not is_deferred(model)
    for name in ("a", "b"):
        assert torch.equal(getattr(model, name).weight, getattr(eager, name).weight)
    assert model.probe.weight.is_meta and model.shape_only.bias.is_meta
    assert model.template.module.weight.is_meta
    assert torch.equal(torch.rand(3), after)
    materialize(model)  # a no-op, as on an eager model's meta helpers
    assert model.probe.weight.is_meta


def test_a_block_entered_inside_a_meta_device_context_is_refused() -> None:
    with torch.device("meta"), deferred_init():
        model = nn.Linear(2, 2)
    with pytest.raises(
        MaterializationError, match=r"was entered\s+inside a torch.device\('meta'\)"
    ):
        materialize(model)
