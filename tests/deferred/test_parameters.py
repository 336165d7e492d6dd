"""Parameter subclasses and the reset_parameters fallback (issue #11, items 9-10)."""

from __future__ import annotations

import pytest
import torch
from test_deferred import assert_same_as_eager, build_deferred, build_eager
from test_materialize import assert_unchanged, snapshot
from torch import nn

from lightning_meta import MaterializationError, deferred_init, load_checkpoint, materialize
from lightning_meta._watched import tensor_class
from support import program_models as pm


def test_parameter_subclasses_keep_their_class_and_attributes() -> None:
    eager, _ = build_eager(pm.WithParameterSubclasses)
    module = build_deferred(pm.WithParameterSubclasses)
    # Already on meta, in the class deferred tensors wear until materialize (see _watched).
    assert tensor_class(module.a) is pm.Tagged and isinstance(module.a, pm.Tagged)
    assert module.a.tag == "decay"
    materialize(module)
    assert_same_as_eager(eager, module)
    assert type(module.a) is pm.Tagged and type(module.b) is pm.Plain
    assert (module.a.tag, module.a.from_new) == ("decay", "DECAY")
    assert type(module.c) is nn.Parameter


def _tag_after_the_block(model: nn.Module) -> None:
    # What code does between building and training: flags for optimizer groups.
    model[1].weight._no_weight_decay = True
    model[0].weight.tp_sharded = "col"
    del model[0].bias.note


def _tagged_in_the_block() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[0].bias.note = "set in __init__"
    return model


@pytest.mark.parametrize("fill", ["materialize", "load_checkpoint", "fallback"])
def test_attributes_set_or_deleted_after_the_block_are_kept(tmp_path, fill: str) -> None:
    # The real tensors used to get the attributes the block ended with.
    torch.manual_seed(0)
    eager = _tagged_in_the_block()
    _tag_after_the_block(eager)
    if fill == "fallback":  # never deferred: meta tensors filled by reset_parameters
        with torch.device("meta"):
            model = _tagged_in_the_block()
        _tag_after_the_block(model)
        materialize(model, fallback="reset_parameters")
    else:
        torch.manual_seed(0)
        with deferred_init():
            model = _tagged_in_the_block()
        _tag_after_the_block(model)
        if fill == "materialize":
            materialize(model)
            assert_same_as_eager(eager, model)
        else:
            torch.save(eager.state_dict(), tmp_path / "m.pt")
            load_checkpoint(model, tmp_path / "m.pt")
    assert model[1].weight._no_weight_decay is True
    assert model[0].weight.tp_sharded == "col"
    assert not hasattr(model[0].bias, "note")


def test_fallback_equals_to_empty_then_reset_parameters() -> None:
    def build() -> nn.Module:
        with torch.device("meta"):
            return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))

    torch.manual_seed(0)
    eager = build().to_empty(device="cpu")
    with torch.no_grad():
        for m in eager.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    after = torch.rand(3)
    torch.manual_seed(0)
    module = materialize(build(), fallback="reset_parameters")
    assert_same_as_eager(eager, module)
    assert torch.equal(torch.rand(3), after)


class HalfReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(4, device="meta"))

    def reset_parameters(self) -> None:
        self.w[:2].fill_(1.0)  # the rest is left as it was


class FailingReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(4, device="meta"))

    def reset_parameters(self) -> None:
        raise RuntimeError("cannot reset")


def test_fallback_refuses_a_reset_that_writes_part_of_a_tensor() -> None:
    module = nn.Sequential(nn.Linear(2, 2, device="meta"), HalfReset())
    before = snapshot(module)
    state = torch.get_rng_state()
    with pytest.raises(MaterializationError, match=r"left \['1.w'\] uninitialised.*part of them"):
        materialize(module, fallback="reset_parameters")
    assert_unchanged(module, before)
    assert torch.equal(torch.get_rng_state(), state)


def test_fallback_that_raises_leaves_every_module_on_meta() -> None:
    module = nn.Sequential(nn.Linear(2, 2, device="meta"), FailingReset())
    before = snapshot(module)
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="cannot reset"):
        materialize(module, fallback="reset_parameters")
    assert_unchanged(module, before)
    assert all(t.is_meta for t in before.values())
    assert torch.equal(torch.get_rng_state(), state)
