"""Construction that reads values records and replays; weights stay unreadable (issue #11, item 1)."""

from __future__ import annotations

import pytest
import torch
from test_deferred import assert_same_as_eager, build_deferred, build_eager
from torch import nn

from lightning_meta import MaterializationError, deferred_init, materialize
from support import program_models as pm


def test_values_computed_from_python_numbers_are_read_while_recording() -> None:
    eager, after = build_eager(pm.ReadsConstants)
    module = build_deferred(pm.ReadsConstants)
    assert module.rates == eager.rates and module.listed == eager.listed
    assert_same_as_eager(eager, materialize(module))
    assert torch.equal(torch.rand(4), after)


def test_trunc_normal_redraws_exactly_as_eager() -> None:
    eager, after = build_eager(pm.Truncated)
    module = build_deferred(pm.Truncated)
    assert_same_as_eager(eager, materialize(module))
    assert torch.equal(torch.rand(4), after)
    assert module.w.abs().max() <= 1.0


def test_trunc_normal_per_submodule_in_reverse() -> None:
    def build() -> nn.Module:
        return nn.ModuleList([pm.Truncated(), pm.Truncated()])

    eager, after = build_eager(build)
    module = build_deferred(build)
    for sub in reversed(list(module)):
        materialize(sub)
    assert_same_as_eager(eager, module)
    assert torch.equal(torch.rand(4), after)


@pytest.mark.parametrize(
    ("read", "op"),
    [
        (lambda t: t.numpy(), r"Tensor\.numpy"),
        (lambda t: t.tolist(), r"Tensor\.tolist"),
        (lambda t: t.sum().item(), r"aten\._local_scalar_dense\.default"),
        (lambda t: bool(t.sum() > 0), r"aten\._local_scalar_dense\.default"),
    ],
    ids=["numpy", "tolist", "item", "bool"],
)
def test_reading_weights_raises_naming_the_op_the_path_and_the_line(read: object, op: str) -> None:
    class ReadsWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3))
            read(self.w)  # type: ignore[operator]

    with pytest.raises(
        MaterializationError,
        match=rf"cannot record {op} on 'ReadsWeights\.w' issued at .*test_reads\.py:\d+: it needs the "
        r"values of a tensor.* computed from random draws.*Fix:",
    ) as info:
        deferred_init(ReadsWeights)
    assert info.value.paths == ("w",)


def test_reading_uninitialised_memory_raises() -> None:
    def build() -> nn.Module:
        t = torch.empty(3)
        return nn.Linear(int(t.sum().item() > 0) + 1, 2)

    with pytest.raises(MaterializationError, match=r"reads uninitialised memory"):
        deferred_init(build)
