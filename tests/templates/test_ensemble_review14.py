"""Ensemble under a hostile review (fourteenth round): the grouped plan's graph in another
call context than it was traced in, torch.func transforms and forward-mode AD over large
layers, and refusals that name the layer and a fix that applies."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.checkpoint import checkpoint

import lightning_meta as lm
from lightning_meta import ArgumentValueError


class _Float32Tail(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        with torch.autocast("cpu", enabled=False):  # a numerically sensitive part in float32
            return self.b(h.float()).mean((2, 3))


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        with torch.no_grad():  # a gate computed without gradients
            g = torch.sigmoid(self.b(h))
        return (h * g).mean((2, 3))


class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(lambda h: self.bn(self.a(h)), x, use_reentrant=False).mean((2, 3))


def _under_autocast(ensemble: nn.Module, members: list[nn.Module], x: torch.Tensor) -> None:
    ensemble(x)  # traced outside autocast, where the forward's own section is a no-op
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ensemble(x)
        ref = torch.stack([m(x) for m in members])
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _after_no_grad(ensemble: nn.Module, members: list[nn.Module], x: torch.Tensor) -> None:
    with torch.no_grad():
        ensemble(x)  # a prediction logged before training: traced under no_grad
        for m in members:
            m(x)
    ensemble(x).square().sum().backward()
    torch.stack([m(x) for m in members]).square().sum().backward()
    for name, stacked in ensemble.tensors().items():
        theirs = [dict(m.named_parameters()).get(name) for m in members]
        if stacked.requires_grad:
            if theirs[0] is None or theirs[0].grad is None:
                assert stacked.grad is None, name  # a layer the members run without gradients
            else:
                torch.testing.assert_close(stacked.grad, torch.stack([t.grad for t in theirs]))
    for name, buf in members[0].named_buffers():
        torch.testing.assert_close(
            ensemble.tensors()[name], torch.stack([dict(m.named_buffers())[name] for m in members])
        )
        torch.testing.assert_close(ensemble.member(0).get_buffer(name), buf)


@pytest.mark.parametrize("execution", ["auto", "grouped"])
@pytest.mark.parametrize(
    ("model", "check"),
    [(_Float32Tail, _under_autocast), (_Gated, _after_no_grad), (_Checkpointed, _after_no_grad)],
    ids=["autocast-off-section", "no-grad-gate", "checkpoint"],
)
def test_the_grouped_graph_is_traced_and_checked_in_each_context_of_the_call(
    execution: str,
    model: Callable[[], nn.Module],
    check: Callable[[nn.Module, list[nn.Module], torch.Tensor], None],
) -> None:
    # Before, the graph traced in the first call's context (where the forward's
    # no_grad / autocast(enabled=False) / checkpoint section changed nothing) ran in
    # the later call's: bfloat16 where the members compute float32 (1e-3 off), the
    # gate's layer trained (the members' has no gradient), BatchNorm counted once
    # where the members' recomputation counts twice.
    torch.manual_seed(0)
    members = [model() for _ in range(3)]
    x = torch.randn(4, 3, 10, 10)
    if execution == "grouped" and model is not _Float32Tail:
        with torch.no_grad():  # built (and traced) there, the refusal is not seen yet
            ensemble = lm.Ensemble(copy.deepcopy(members), execution="grouped")
    else:
        ensemble = lm.Ensemble(copy.deepcopy(members), execution=execution)  # type: ignore[arg-type]
    check(ensemble, members, x)


def _wide_mlp() -> nn.Module:
    # 1100 x 1100 float32 weights: over the size from which the ensemble reuses gradient
    # buffers through autograd Functions of its own
    return nn.Sequential(nn.Linear(1100, 1100), nn.Tanh(), nn.Linear(1100, 1))


@pytest.mark.parametrize("execution", ["auto", "loop", "fused"])
def test_torch_func_transforms_and_forward_ad_run_over_large_layers(execution: str) -> None:
    # Before: "You tried to vmap over _SharedLinear (or _Unstack), but it does not have
    # vmap support", and jvp's "You must implement the jvp function", naming the
    # package's private Functions.
    torch.manual_seed(0)
    members = [_wide_mlp() for _ in range(2)]
    ensemble = lm.Ensemble(copy.deepcopy(members), execution=execution)  # type: ignore[arg-type]
    x = torch.randn(3, 1100)

    def per_sample(module: nn.Module) -> dict[str, torch.Tensor]:
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            return functional_call(module, p, (xi.unsqueeze(0),)).sum()

        return vmap(grad(loss), in_dims=(None, 0))(params, x)  # type: ignore[no-any-return]

    # up to floating-point reassociation (guarantees.md): a batched matmul sums in
    # another order than each member's
    close = {"rtol": 1e-5, "atol": 1e-5}
    got = per_sample(ensemble)
    for i, member in enumerate(members):
        ref = per_sample(member)
        torch.testing.assert_close(got["stacked.0.weight"][:, i], ref["0.weight"], **close)

    params = {k: v.detach() for k, v in ensemble.named_parameters()}
    tangents = {k: torch.ones_like(v) for k, v in params.items()}
    out, tangent = jvp(lambda p: functional_call(ensemble, p, (x,)), (params,), (tangents,))
    for i, member in enumerate(members):
        mp = {k: v.detach() for k, v in member.named_parameters()}
        ref_out, ref_tangent = jvp(
            lambda p, m=member: functional_call(m, p, (x,)),
            (mp,),
            ({k: torch.ones_like(v) for k, v in mp.items()},),
        )
        torch.testing.assert_close(out[i], ref_out, **close)
        torch.testing.assert_close(tangent[i], ref_tangent, **close)

    # forward-mode AD without torch.func
    w = ensemble.tensors()["0.weight"]
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        _, got_tangent = forward_ad.unpack_dual(ensemble(dual))
        for i, member in enumerate(members):
            _, ref_tangent = forward_ad.unpack_dual(member(dual))
            torch.testing.assert_close(got_tangent[i], ref_tangent, **close)
    assert torch.equal(w, ensemble.tensors()["0.weight"])


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.softmax(self.c(x), dim=1)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.gate = _Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(torch.relu(self.c(x)))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.blocks = nn.Sequential(_Block(), _Block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean((2, 3))


def test_a_grouped_refusal_of_a_function_names_the_layer_whose_forward_calls_it() -> None:
    # Before: "the forward calls torch.softmax", with no path.
    with pytest.raises(ArgumentValueError) as info:
        lm.Ensemble([_Net(), _Net()], execution="grouped")
    assert info.value.paths == ("blocks.0.gate",)
    assert "layer 'blocks.0.gate'" in str(info.value) and "(_Gate's)" in str(info.value)


def test_a_grouped_refusal_names_only_fixes_that_run_the_template() -> None:
    # Before, the fix named 'vmap', which fails on a BatchNorm with momentum=None in
    # training (torch reads its step count with .item()).
    def member() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.Flatten())

    with pytest.raises(ArgumentValueError) as info:
        lm.Ensemble([member(), member()], execution="grouped")
    said = str(info.value)
    assert "'vmap'" not in said and "'loop'" in said and "'auto'" in said
    x = torch.randn(2, 3, 6, 6)
    for fix in ("auto", "loop"):
        lm.Ensemble([member(), member()], execution=fix)(x).sum().backward()  # type: ignore[arg-type]


def test_a_deferred_ensemble_called_on_real_inputs_before_materialize_is_refused() -> None:
    # Before, a convolution member returned uninitialised memory (values like 1.6e+22)
    # without an error, and a LightningModule.setup() computing a scale from it trained
    # on that; Linear members raised torch's bare device error.
    def conv() -> nn.Module:
        return nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU())

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 4), nn.ReLU())

    for member, x in ((conv, torch.randn(5, 2, 8)), (mlp, torch.randn(5, 8))):
        for execution in ("auto", "loop", "vmap"):
            with lm.deferred_init():
                ensemble = lm.Ensemble.from_factory(member, 3, execution=execution)  # type: ignore[arg-type]
            with pytest.raises(lm.MetaTensorError, match="materialize first") as info:
                ensemble(x)
            assert info.value.paths and info.value.paths[0].startswith("stacked.")
            if execution != "vmap":  # torch.vmap itself cannot run on meta tensors
                shapes = ensemble(x.to("meta"))  # meta inputs: a shape-only run
                assert shapes.is_meta and shapes.shape[0] == 3
            lm.materialize(ensemble)
            assert not ensemble(x).is_meta


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, rng: Any = None) -> torch.Tensor:
        y = self.a(x)
        return y if rng is None else y * rng.uniform(0.5, 1.5)


def test_a_generator_argument_runs_the_loop_when_nothing_is_timed() -> None:
    # Before, under torch.use_deterministic_algorithms(True) (Trainer(deterministic=True))
    # the static plan ran: after plain calls that ran vmap, vmap drew once from a
    # random.Random for all members (0.63 off the loop).
    import random

    torch.manual_seed(0)
    members = [_Noisy() for _ in range(32)]
    ensemble = lm.Ensemble(copy.deepcopy(members))
    x = torch.randn(2, 4)
    for _ in range(20):
        ensemble(x)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = ensemble(x, random.Random(0))
        theirs = random.Random(0)
        ref = torch.stack([m(x, theirs) for m in members])
    finally:
        torch.use_deterministic_algorithms(before)
    assert ensemble.plan == "loop"
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("execution", ["auto", "loop", "fused"])
def test_a_batched_backward_runs_over_large_layers(execution: str) -> None:
    # Before: "Batching rule not implemented for aten::mm.out" (aten::stack.out for the
    # loop): the Functions reusing gradient buffers wrote with out= under the vmap that
    # torch.autograd.grad(is_grads_batched=True) and a vectorized jacobian run.
    torch.manual_seed(0)
    members = [_wide_mlp() for _ in range(2)]
    ensemble = lm.Ensemble(copy.deepcopy(members), execution=execution)  # type: ignore[arg-type]
    x = torch.randn(3, 1100)
    out = ensemble(x)
    w = ensemble.tensors()["0.weight"]
    eye = torch.eye(out.numel()).reshape(out.numel(), *out.shape)
    (got,) = torch.autograd.grad(out, w, eye, is_grads_batched=True)
    for i, member in enumerate(members):
        ref_out = member(x)
        ref_eye = torch.eye(ref_out.numel()).reshape(ref_out.numel(), *ref_out.shape)
        (ref,) = torch.autograd.grad(ref_out, member[0].weight, ref_eye, is_grads_batched=True)
        rows = got.reshape(len(members), -1, *got.shape[1:])[i, :, i]  # member i's outputs
        torch.testing.assert_close(rows, ref, rtol=1e-5, atol=1e-5)
    ensemble(x).sum().backward()  # a plain step afterwards reuses its buffers as before
    ref_grad = torch.stack([torch.autograd.grad(m(x).sum(), m[0].weight)[0] for m in members])
    torch.testing.assert_close(w.grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks"),
    reason="torch < 2.8 has no saved-tensor hooks query (nothing to keep out of the graph)",
)
def test_the_grouped_plan_under_torch_compile_warns_of_nothing_it_calls() -> None:
    # The call context of the grouped plan asked torch which saved-tensor hooks are on,
    # which dynamo cannot trace: a graph break and a UserWarning in a user's compiled
    # training (found in the suite's warnings summary, 2026-12-06).
    import warnings

    torch.manual_seed(0)
    members = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()) for _ in range(2)]
    ensemble = lm.Ensemble(copy.deepcopy(members), execution="grouped")
    compiled = torch.compile(ensemble)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = compiled(x)
    said = [str(w.message) for w in seen if "saved_tensors" in str(w.message)]
    assert said == []
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))
