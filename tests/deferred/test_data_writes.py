"""Writes through ``.data`` to a deferred tensor after its block.

``.data`` has a version counter of its own, so a write through it after the
block (``model.apply(init_weights)`` with ``m.weight.data.normal_(0, 0.02)``,
the classic idiom) left nothing on the parameter to see: ``materialize``
replayed construction's values and the initialisation was lost without an
error. Each refusal test here materialized such a model silently before.
The other tests hold what the fix must not change: reading ``.data``, the
classes after ``materialize`` and loads, copies, and ``.data`` once real.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_deferred import assert_same_as_eager
from torch import nn

import lightning_meta as lm
from lightning_meta import MaterializationError, deferred_init, materialize
from support import program_models as pm


class _Net(nn.Module):
    def __init__(self, tagged: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        # A Parameter subclass whose constructor takes other arguments: kept
        # by materialize, refused by a load and lost by torch's own pickling.
        self.tagged = (
            pm.Tagged(torch.zeros(3), tag="kept") if tagged else nn.Parameter(torch.zeros(3))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        m.weight.data.normal_(mean=0.0, std=0.02)
        m.bias.data.zero_()


def _deferred(tagged: bool = True) -> _Net:
    torch.manual_seed(0)
    with deferred_init():
        return _Net(tagged)


def _eager(tagged: bool = True) -> _Net:
    torch.manual_seed(0)
    return _Net(tagged)


_WRITES: dict[str, tuple[Callable[[_Net], Any], list[str]]] = {
    "init_weights": (lambda m: m.apply(_init_weights), ["lin.bias", "lin.weight"]),
    "fill_": (lambda m: m.lin.weight.data.fill_(3.0), ["lin.weight"]),
    "setitem": (lambda m: m.lin.bias.data.__setitem__(0, 1.0), ["lin.bias"]),
    "copy_": (lambda m: m.lin.bias.data.copy_(torch.ones(4, device="meta")), ["lin.bias"]),
    "buffer": (lambda m: m.norm.running_var.data.fill_(2.0), ["norm.running_var"]),
    "subclass": (lambda m: m.tagged.data.add_(1.0), ["tagged"]),
}


@pytest.mark.parametrize("write", sorted(_WRITES))
def test_a_write_through_data_after_the_block_is_refused(write: str) -> None:
    do, paths = _WRITES[write]
    model = _deferred()
    do(model)
    with pytest.raises(MaterializationError, match=r"through \.data") as info:
        materialize(model)
    assert sorted(info.value.paths) == paths


def test_real_data_assigned_after_the_block_is_refused_naming_the_fix() -> None:
    # torch's "incompatible tensor type" named neither tensor nor a way out.
    torch.manual_seed(0)
    with deferred_init():
        module = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with pytest.raises(lm.MetaTensorError, match=r"`\.data = ` a cpu tensor on a deferred "):
        module[0].weight.data = torch.zeros(3, 3)
    module[0].weight = nn.Parameter(torch.zeros(3, 3))  # the fix it names
    materialize(module)
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    eager[0].weight.data = torch.zeros(3, 3)
    for a, b in zip(module.state_dict().values(), eager.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_write_through_data_stops_a_trainer_before_a_step_is_taken() -> None:
    class _LM(pm.ContainerLM):
        def __init__(self) -> None:
            super().__init__(deferred=True)
            self.net.apply(_init_weights)

    model = _LM()
    trainer = pm.trainer(steps=2)
    with pytest.raises(MaterializationError, match=r"through \.data"):
        trainer.fit(model, pm.loader())
    assert trainer.global_step == 0


def test_reading_data_after_the_block_keeps_eager_values() -> None:
    model = _deferred()
    seen = [(p.data.shape, p.data.dtype, p.data.is_meta) for p in model.parameters()]
    snapshot = model.lin.weight.data.clone()  # a copy of its own: writes to it change nothing
    snapshot.fill_(5.0)
    assert all(is_meta for *_, is_meta in seen)
    materialize(model)
    assert_same_as_eager(_eager(), model)
    assert model.tagged.tag == "kept"


def test_real_tensors_have_their_own_class_and_data_after_materialize() -> None:
    model = _deferred()
    materialize(model)
    assert type(model.lin.weight) is nn.Parameter
    assert type(model.norm.running_mean) is torch.Tensor
    assert type(model.tagged) is pm.Tagged
    # torch's own .data again: a write through it is not counted on the parameter.
    version = model.lin.weight._version
    model.lin.weight.data.add_(1.0)
    assert model.lin.weight._version == version


def test_real_tensors_have_their_own_class_after_load_checkpoint(tmp_path: Path) -> None:
    eager = _eager(tagged=False)
    torch.save(eager.state_dict(), tmp_path / "model.pt")
    model = _deferred(tagged=False)
    lm.load_checkpoint(model, tmp_path / "model.pt")
    assert type(model.lin.weight) is nn.Parameter
    assert type(model.norm.running_mean) is torch.Tensor
    assert_same_as_eager(eager, model)
    # A write through .data after the load is a write to a real tensor, as eagerly.
    model.lin.bias.data.zero_()
    assert torch.equal(model.lin.bias, torch.zeros(4))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_a_deferred_model_see_writes_through_data(how: str) -> None:
    def copied(m: nn.Module) -> Any:
        return copy.deepcopy(m) if how == "deepcopy" else pickle.loads(pickle.dumps(m))

    model = _deferred(tagged=False)
    clone = copied(model)
    clone.apply(_init_weights)
    with pytest.raises(MaterializationError, match=r"through \.data"):
        materialize(clone)
    materialize(model)  # the original was not written
    assert_same_as_eager(_eager(tagged=False), model)
    fresh = copied(_deferred(tagged=False))
    materialize(fresh)
    assert_same_as_eager(_eager(tagged=False), fresh)


def test_conversions_after_the_block_keep_eager_values() -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 4))

    with deferred_init():
        model = build()
    # Parameters only: a buffer cast after the block is refused (another test).
    model.to(memory_format=torch.channels_last).double()
    model[2].weight.data = model[2].weight.data  # no new values
    model[2].bias.data = model[2].bias.data.clone()  # what Lightning's ddp_spawn does
    materialize(model)
    eager = build().to(memory_format=torch.channels_last).double()
    assert_same_as_eager(eager, model)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "chain", [("half", "float"), ("half", "bfloat16"), ("double", "half", "float")]
)
def test_casts_after_the_block_round_as_each_eager_cast(chain: tuple[str, ...]) -> None:
    # Before, the record's values were cast once, to the last dtype (or not at
    # all where the last dtype was construction's): float16's rounding was lost.
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(64, 64)

    eager = build()
    with deferred_init():
        model = build()
    for cast in chain:
        getattr(eager, cast)()
        getattr(model, cast)()
    materialize(model)
    assert_same_as_eager(eager, model)


def test_materialize_dtype_after_a_cast_there_and_back_is_refused() -> None:
    with deferred_init():
        model = nn.Linear(4, 4)
    model.half().float()
    with pytest.raises(MaterializationError, match="already cast"):
        materialize(model, dtype=torch.bfloat16)


def test_a_deferred_tensor_prints_as_before() -> None:
    with deferred_init():
        model = nn.Linear(2, 2)
    assert repr(model.weight).startswith("Parameter containing:\ntensor(..., device='meta'")
    assert type(model.weight).__name__ == "Parameter"


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_a_deferred_model_keep_each_cast(how: str) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(64, 64)

    with deferred_init():
        model = build()
    model.half().float()
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    materialize(clone)
    assert_same_as_eager(build().half().float(), clone)


def test_parameters_made_from_deferred_tensors_are_plain_parameters(tmp_path: Path) -> None:
    # nn.Parameter(t) of a tensor of a subclass wants detach() of that subclass;
    # without the watch class's answer these raised torch's RuntimeError.
    model = _deferred(tagged=False)
    p = nn.Parameter(model.lin.weight)
    q = nn.Parameter(model.norm.running_mean, requires_grad=False)
    assert type(p) is nn.Parameter and type(q) is nn.Parameter
    assert "_is_param" not in vars(p) and p.requires_grad and not q.requires_grad
    assert type(model.lin.weight.detach()) is torch.Tensor
    assert type(nn.ParameterList([model.norm.running_var])[0]) is nn.Parameter

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))

    eager = torch.nn.utils.parametrizations.weight_norm(build()[0])
    torch.save(eager.state_dict(), tmp_path / "wn.pt")
    with deferred_init():
        net = build()
    loaded = torch.nn.utils.parametrizations.weight_norm(net[0])
    lm.load_checkpoint(loaded, tmp_path / "wn.pt")
    assert_same_as_eager(eager, loaded)


def _init_normal(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)


@pytest.mark.parametrize("load", ["load_checkpoint", "load_state_dict"])
def test_a_load_over_changes_made_after_the_block_warns(load: str, tmp_path: Path) -> None:
    # Eager's init draws from the global generator; on meta nothing is drawn,
    # so after the load the generator was not eager's, without a word.
    eager = _eager(tagged=False)
    torch.save(eager.state_dict(), tmp_path / "model.pt")
    model = _deferred(tagged=False)
    model.apply(_init_normal)
    path = tmp_path / "model.pt"

    def run() -> Any:
        if load == "load_checkpoint":
            return lm.load_checkpoint(model, path)
        return model.load_state_dict(torch.load(path))

    with pytest.warns(lm.MetaTensorWarning, match=r"filled \['lin.weight'\].*global generator"):
        run()
    assert_same_as_eager(eager, model)


def test_a_resume_over_changes_made_after_the_block_warns_once(tmp_path: Path) -> None:
    class _LM(pm.ContainerLM):
        def __init__(self, deferred: bool) -> None:
            super().__init__(deferred=deferred)
            self.net.apply(_init_normal)

    trainer = pm.trainer(steps=1, callbacks=[])
    trainer.fit(_LM(deferred=False), pm.loader())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    with pytest.warns(lm.MetaTensorWarning) as caught:
        pm.trainer(steps=2).fit(_LM(deferred=True), pm.loader(), ckpt_path=tmp_path / "last.ckpt")
    ours = [w for w in caught if issubclass(w.category, lm.MetaTensorWarning)]
    assert len(ours) == 1 and "net.fc.weight" in str(ours[0].message)
    assert ours[0].filename == __file__  # the line that resumed, not Lightning's


def test_tensors_made_like_a_deferred_one_are_of_its_base_class() -> None:
    # accelerate's set_module_tensor_to_device fills a meta model with
    # type(old)(value, requires_grad=...): that made real parameters of the
    # watch class, whose .data then shared the version counter for good
    # (a .data write between forward and backward broke backward).
    model = _deferred(tagged=False)
    for name, value in _eager(tagged=False).named_parameters():
        owner, _, attr = name.rpartition(".")
        old = model.get_submodule(owner)._parameters[attr]
        assert old is not None
        made = type(old)(value.detach().clone(), requires_grad=old.requires_grad)
        assert type(made) is nn.Parameter
        setattr(model.get_submodule(owner), attr, made)
    x = torch.randn(3, 4)
    loss = model.lin(x).pow(2).sum()
    model.lin.weight.data.clamp_(-0.1, 0.1)
    loss.backward()  # eager's .data: the write is invisible to autograd


def test_an_ensemble_of_a_deferred_and_a_meta_member_is_built() -> None:
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    with deferred_init():
        deferred = build()
    with torch.device("meta"):
        plain = build()
        ensemble = lm.Ensemble([deferred, plain])
    assert dict(ensemble.named_parameters())["stacked.0.weight"].shape == (2, 8, 4)


def test_refusals_of_changes_after_the_block_name_what_to_move() -> None:
    # Both told the user to move "the initialisation", or named only litgpt's
    # assignment, for a conversion there and back and a parametrization.
    with deferred_init():
        model = nn.BatchNorm1d(4)
    model.half().float()
    with pytest.raises(MaterializationError, match=r"\.half\(\)\.float\(\)"):
        materialize(model)
    with deferred_init():
        lin = nn.Linear(4, 4)
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", nn.Identity())
    with pytest.raises(MaterializationError, match="parametrization"):
        materialize(lin)
