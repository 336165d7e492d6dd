"""Ensemble under a hostile review (twelfth round): an in-place layer after the fused
plan's large shared-input layer, a parent's ``.to(memory_format=...)``, and the gradient
layout copy ``"auto"``'s timing left out."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lightning_meta as lm


def _wide(inplace: nn.Module) -> nn.Module:
    # 4 members x 512 x 512 float32: 4 MiB, the size from which the first layer
    # writes its weight gradient into a reused buffer (_fused._SharedLinear).
    return nn.Sequential(nn.Linear(512, 512), inplace, nn.Linear(512, 4))


@pytest.mark.parametrize("inplace", [nn.ReLU(inplace=True), nn.Hardtanh(inplace=True)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_an_in_place_activation_after_a_large_shared_input_layer_runs_fused(
    inplace: nn.Module, deterministic: bool
) -> None:
    # Before, the layer returned a view made inside its autograd.Function, and the
    # in-place activation raised torch's "Output 0 of _SharedLinear is a view and
    # is being modified inplace": with execution="fused", and with "auto" where it
    # does not time (deterministic algorithms, so Trainer(deterministic=True)).
    torch.manual_seed(0)
    members = [_wide(copy.deepcopy(inplace)) for _ in range(4)]
    x = torch.randn(8, 512)
    ref_members = copy.deepcopy(members)
    ref = torch.stack([m(x) for m in ref_members])
    ref.square().sum().backward()
    execution = "auto" if deterministic else "fused"
    ensemble = lm.Ensemble(members, execution=execution)
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = ensemble(x)
        out.square().sum().backward()
        out2 = ensemble(x)  # the reused gradient buffer, second step
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out2, out)
    for name, p in ensemble.named_parameters():
        leaf = name.removeprefix("stacked.")
        grads = [m.get_parameter(leaf).grad for m in ref_members]
        want = torch.stack([g for g in grads if g is not None])
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, want)


def _conv2d() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))


def _conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU())


@pytest.mark.parametrize(
    ("factory", "shape"), [(_conv2d, (2, 3, 8, 8)), (_conv1d, (2, 3, 8))], ids=["conv2d", "conv1d"]
)
@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["same-dtype", "float64"])
def test_a_parents_to_memory_format_lays_out_each_members_slice(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], dtype: torch.dtype | None
) -> None:
    # Before, model.to(memory_format=torch.channels_last) on a module holding an
    # Ensemble of Conv2d members raised torch's "required rank 4 tensor to use
    # channels_last format" (the stacked weights are 5-D), and over Conv1d members
    # laid the 4-D stack out as channels_last where the members' 3-D weights stay
    # contiguous. Ensemble.to(memory_format=...) itself was right.
    torch.manual_seed(0)
    members = [factory() for _ in range(3)]
    loop = nn.ModuleList(copy.deepcopy(members))
    parent = nn.Sequential(lm.Ensemble(copy.deepcopy(members)))
    kwargs: dict[str, object] = {"memory_format": torch.channels_last}
    args = () if dtype is None else (dtype,)
    loop.to(*args, **kwargs)  # type: ignore[arg-type]
    parent.to(*args, **kwargs)  # type: ignore[arg-type]
    ensemble = parent[0]
    assert isinstance(ensemble, lm.Ensemble)
    for i, member in enumerate(loop):
        mine = ensemble.member(i)
        for (name, want), (_, got) in zip(
            member.state_dict().items(), mine.state_dict().items(), strict=True
        ):
            assert got.dtype == want.dtype and got.stride() == want.stride(), name
            assert torch.equal(got, want), name
        stacked = ensemble.tensors()["0.weight"][i]
        assert stacked.stride() == member[0].weight.stride()
    x = torch.randn(*shape, dtype=dtype or torch.float32)
    torch.testing.assert_close(ensemble(x), torch.stack([m(x) for m in loop]))


def _copies(run: Callable[[], object], numel: int) -> int:
    """How many copies of ``numel`` elements ``run`` makes (torch.profiler)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        run()
    shapes = [e.input_shapes for e in prof.events() if e.name in ("aten::copy_", "aten::clone")]
    return sum(1 for s in shapes if s and s[0] and math.prod(s[0]) == numel)


@pytest.mark.parametrize("execution", ["vmap", "fused"])
def test_auto_times_the_gradient_layout_copy_that_backward_makes(execution: str) -> None:
    # torch.vmap gives a stacked Linear weight its gradient transposed, and
    # backward into a .grad set to None copies it into the weight's layout
    # (AccumulateGrad): 4 members of 512-1024-1024-10 took 1.7x the loop's step
    # with vmap, which "auto" timed with torch.autograd.grad alone (no copy), at
    # 0.9x, and chose. The timing now makes the copies backward makes.
    from lightning_meta._ensemble._plan import _lay_out_as_accumulated

    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(16, 32)) for _ in range(3)]
    ensemble = lm.Ensemble(members, execution=execution)
    x = torch.randn(8, 16)
    weight = ensemble.tensors()["0.weight"]
    params = list(ensemble.parameters())

    def backward() -> None:
        for p in params:
            p.grad = None
        ensemble(x).sum().backward()

    def timed() -> None:
        grads = torch.autograd.grad(ensemble(x).sum(), params)
        _lay_out_as_accumulated(params, grads, {id(p) for p in params})

    backward()
    grads = torch.autograd.grad(ensemble(x).sum(), params)
    transposed = grads[[n for n, _ in ensemble.named_parameters()].index("stacked.0.weight")]
    assert (transposed.stride() != weight.stride()) == (execution == "vmap")
    assert _copies(timed, weight.numel()) == _copies(backward, weight.numel())
