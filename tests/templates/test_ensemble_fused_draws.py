"""The fused plan draws every dropout mask as a loop over the members draws it (one member's
draws recorded, every member's drawn in the loop's order before the batched run): for the
same seed, the members' own numbers and generator state, under a forced ``"fused"`` and
under ``"auto"``, which may now time the fused plan for a training call that draws."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import lightning_meta as lm
from support.ensembles import call_context, chosen_plan, rank_first


def _mlp(*middle: nn.Module, bias: bool = True) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(8, 16, bias=bias),
            nn.ReLU(),
            *copy.deepcopy(list(middle)),
            nn.Linear(16, 16, bias=bias),
            nn.Tanh(),
            nn.Dropout(0.25),
            nn.Linear(16, 3, bias=bias),
        )

    return make


def _members(make: Callable[[], nn.Module], n: int = 5) -> list[nn.Module]:
    torch.manual_seed(0)
    return [make() for _ in range(n)]


def _members_run(mods: list[nn.Module], x: torch.Tensor, per_member: bool) -> torch.Tensor:
    """What the members themselves give, one after the other (the loop a user writes)."""
    return torch.stack([m(x[i] if per_member else x) for i, m in enumerate(mods)])


def _compare(
    mods: list[nn.Module], ens: lm.Ensemble, x: torch.Tensor, *, plan: str, seed: int = 3
) -> None:
    """Output, generator state after, and gradients of ``ens`` against the members'."""
    per_member = ens.per_member_inputs
    torch.manual_seed(seed)
    out = ens(x)
    after = torch.get_rng_state()
    assert ens.plan == plan
    torch.manual_seed(seed)
    ref = _members_run(mods, x, per_member)
    # The same masks: the members' numbers (a single other mask would differ by O(1)).
    assert torch.equal(torch.get_rng_state(), after)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    if torch.is_grad_enabled():
        w = torch.linspace(-1, 2, out.numel()).view(out.shape)
        (out * w).sum().backward()
        (ref * w).sum().backward()
        for i, m in enumerate(mods):
            for name, p in m.named_parameters():
                got = ens.stacked.get_parameter(name).grad
                assert got is not None and p.grad is not None
                torch.testing.assert_close(got[i], p.grad, rtol=1e-5, atol=1e-6)


_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict[str, Any]]] = {
    "dropout": (_mlp(nn.Dropout(0.4)), (7, 8), {}),
    # In place where the members allow it: not on a ReLU's output, which its backward reads.
    "in-place": (
        lambda: nn.Sequential(
            nn.Linear(8, 16), nn.Dropout(0.4, inplace=True), nn.ReLU(), nn.Linear(16, 3)
        ),
        (7, 8),
        {},
    ),
    "alpha": (_mlp(nn.AlphaDropout(0.3)), (7, 8), {}),
    "p=1": (_mlp(nn.Dropout(1.0)), (7, 8), {}),
    "no-bias": (_mlp(nn.Dropout(0.4), bias=False), (7, 8), {}),
    "3-d input": (_mlp(nn.Dropout(0.4)), (2, 3, 8), {}),
    "unbatched": (_mlp(nn.Dropout(0.4)), (8,), {}),
    "chunks": (_mlp(nn.Dropout(0.4)), (7, 8), {"chunk_size": 2}),
    "per-member": (_mlp(nn.Dropout(0.4)), (5, 7, 8), {"per_member_inputs": True}),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_fused_dropout_trains_as_its_members(case: str) -> None:
    make, shape, kw = _CASES[case]
    mods = _members(make)
    ens = lm.Ensemble(copy.deepcopy(mods), execution="fused", **kw)
    x = torch.randn(*shape)
    for step in range(2):
        _compare(mods, ens, x, plan="fused", seed=step)


def test_fused_dropout_without_grad_and_with_one_layer_in_eval_draws_the_members_masks() -> None:
    # MC dropout style: one dropout in train mode, the other in eval; no autograd.
    mods = _members(_mlp(nn.Dropout(0.4)))
    for m in mods:
        m[2].eval()
    ens = lm.Ensemble(copy.deepcopy(mods), execution="fused")
    ens.template.module[2].eval()
    with torch.no_grad():
        _compare(mods, ens, torch.randn(7, 8), plan="fused")


def test_auto_times_the_fused_plan_for_a_training_call_that_draws(
    ranked_first: Callable[[str], None],
) -> None:
    ranked_first("fused")
    mods = _members(_mlp(nn.Dropout(0.4)), 8)
    auto = lm.Ensemble(copy.deepcopy(mods))
    x = torch.randn(32, 8)
    _compare(mods, auto, x, plan=chosen_plan(auto, x), seed=11)
    assert auto.plan == "fused"
    record = auto.plans[0]
    assert record.how == "random draws"
    assert {"loop", "fused"} <= set(record.timings_ms)
    assert all(t < float("inf") for t in record.timings_ms.values())


def _wide(n: int = 16) -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Sequential(
            nn.Linear(32, 256),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(256, 4),
        )
        for _ in range(n)
    ]


@pytest.fixture
def ranked_first(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``ranked_first(plan)``: :func:`support.ensembles.rank_first` for this test."""
    return lambda plan: rank_first(monkeypatch, plan)


@pytest.mark.parametrize("case", ["transposed-after-contiguous", "autocast", "inference-mode"])
@pytest.mark.parametrize("plan", ["fused", "grouped"])
def test_auto_never_runs_batched_draws_that_are_not_the_loops(
    plan: str, case: str, ranked_first: Callable[[str], None]
) -> None:
    # Calls whose masks the record cannot give as the loop draws them (other strides,
    # autocast and inference mode, which the meta record does not see): "auto", which
    # timed the plan on a contiguous call of the kind, runs the loop there.
    ranked_first(plan)
    mods = _wide(4)
    auto = lm.Ensemble(copy.deepcopy(mods))
    x = torch.randn(64, 32)
    assert chosen_plan(auto, x) == plan  # it draws the loop's masks: a finalist
    if case == "transposed-after-contiguous":
        x = torch.randn(32, 64).t()  # the same kind of call, other strides
    with call_context(case):
        torch.manual_seed(4)
        out = auto(x)
        after = torch.get_rng_state()
        torch.manual_seed(4)
        ref = _members_run(mods, x, False)
    assert auto.plan == "loop"
    assert torch.equal(torch.get_rng_state(), after)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_forced_fused_call_on_a_strided_input_draws_its_own_masks() -> None:
    # Where the record cannot be used, a forced "fused" draws on the stacked
    # activations, as documented: reproducible for a seed, other masks than the loop's.
    mods = _wide(4)
    ens = lm.Ensemble(copy.deepcopy(mods), execution="fused")
    x = torch.randn(32, 64).t()
    torch.manual_seed(5)
    out = ens(x)
    torch.manual_seed(5)
    assert torch.equal(ens(x), out) and ens.plan == "fused"
    torch.manual_seed(5)
    assert (out - _members_run(mods, x, False)).abs().max() > 0.1


@pytest.mark.parametrize("execution", ["auto", "fused"])
def test_a_fused_call_a_hook_sends_to_the_loop_draws_the_members_masks(
    execution: str, ranked_first: Callable[[str], None]
) -> None:
    # A forward hook added to the template after the plan was made: the fused plan
    # leaves the call to another plan. Before, that was vmap, which draws other
    # masks than the loop with two dropout layers; now the loop runs a call that draws.
    mods = _members(_mlp(nn.Dropout(0.4)), 8)
    if execution == "auto":
        ranked_first("fused")
    ens = lm.Ensemble(copy.deepcopy(mods), execution=execution)  # type: ignore[arg-type]
    x = torch.randn(32, 8)
    if execution == "auto":
        assert chosen_plan(ens, x) == "fused"
    seen: list[bool] = []
    ens.template.module[0].register_forward_hook(lambda m, a, out: seen.append(out.is_meta))
    _compare(mods, ens, x, plan="loop")
    assert seen and not any(seen)  # the loop ran the hook; no record ran it on meta tensors


@pytest.mark.parametrize("timed", [True, False], ids=["timed", "untimed"])
def test_a_hook_for_every_module_never_sees_the_records_meta_tensors(timed: bool) -> None:
    # The record runs the template's forward on meta tensors: a hook would see them.
    from torch.nn.modules.module import register_module_forward_hook

    from support.torch_modes import deterministic_algorithms

    mods = _members(_mlp(nn.Dropout(0.4)), 3)
    ens = lm.Ensemble(copy.deepcopy(mods))
    seen: list[bool] = []
    handle = register_module_forward_hook(lambda m, a, out: seen.append(out.is_meta))
    try:
        with contextlib.nullcontext() if timed else deterministic_algorithms():
            _compare(mods, ens, torch.randn(7, 8), plan="loop")
    finally:
        handle.remove()
    assert seen and not any(seen)


# ----------------------------------------------- found by the review of the fused plan's draws
@pytest.mark.parametrize("execution", ["fused", "grouped"])
def test_a_first_call_under_non_reentrant_checkpoint_draws_the_members_masks(
    execution: str,
) -> None:
    # The record ran its meta forward under checkpoint's saved-tensor hooks, which
    # counted its saved tensors: CheckpointError on the first call of each kind.
    from torch.utils.checkpoint import checkpoint

    mods = _members(_mlp(nn.Dropout(0.4)), 3)
    ens = lm.Ensemble(copy.deepcopy(mods), execution=execution)  # type: ignore[arg-type]
    x = torch.randn(7, 8)
    torch.manual_seed(2)
    out = checkpoint(ens, x, use_reentrant=False)
    assert isinstance(out, torch.Tensor)
    out.sum().backward()
    assert ens.plan == execution
    torch.manual_seed(2)
    torch.testing.assert_close(out, _members_run(mods, x, False), rtol=1e-5, atol=1e-6)


class _NanCheck(torch.overrides.TorchFunctionMode):
    """A caller's mode reading every result (which fails on meta tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[Any] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.seen.add(func)
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            assert not bool(out.isnan().any())
        return out


@pytest.mark.parametrize("context", ["save_on_cpu", "function-mode"])
def test_a_record_that_fails_in_a_callers_context_is_not_kept(context: str) -> None:
    # save_on_cpu's hook copied the record's meta tensors to the CPU, a mode read them:
    # the record failed, its None was kept for the kind of call, and forced "fused"
    # drew its own masks on every later call too (0.65 off the members).
    mods = _members(_mlp(nn.Dropout(0.4)), 3)
    ens = lm.Ensemble(copy.deepcopy(mods), execution="fused")
    x = torch.randn(7, 8)
    around: Any = torch.autograd.graph.save_on_cpu() if context == "save_on_cpu" else _NanCheck()
    with around:
        _compare(mods, ens, x, plan="fused", seed=1)
    _compare(mods, ens, x, plan="fused", seed=2)
    if isinstance(around, _NanCheck):
        # The masks' memory is allocated and drawn inside the plan, as eager's dropout
        # does in its kernel: the mode saw uninitialised memory (NaN, at random) before.
        assert torch.empty not in around.seen and torch.Tensor.bernoulli_ not in around.seen


@pytest.mark.parametrize("execution", ["fused", "grouped", "auto"])
def test_an_ensemble_moved_to_bfloat16_draws_the_members_masks_batched(execution: str) -> None:
    # Lightning's precision="bf16-true" converts the ensemble with .to(): the record
    # ran on the template's float32 meta tensors, recorded float32 masks, and every
    # call that drew ran the loop (forced "fused" too, quietly).
    mods = [m.to(torch.bfloat16) for m in _members(_mlp(nn.Dropout(0.4)), 4)]
    ens = lm.Ensemble(
        [copy.deepcopy(m).float() for m in mods],
        execution=execution,  # type: ignore[arg-type]
    ).to(torch.bfloat16)
    x = torch.randn(7, 8, dtype=torch.bfloat16)
    if execution == "auto":
        chosen_plan(ens, x)
    torch.manual_seed(6)
    out = ens(x)
    after = torch.get_rng_state()
    torch.manual_seed(6)
    ref = _members_run(mods, x, False)
    assert torch.equal(torch.get_rng_state(), after)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    if execution != "auto":
        assert ens.plan == execution
    else:  # the batched plans ran when timed for this call that draws (they had raised)
        timings = ens.plans[0].timings_ms
        assert all(timings.get(p, math.inf) < math.inf for p in ("fused", "grouped")), timings


def _noise(m: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    return out + 0.1 * torch.randn_like(out)


@pytest.mark.parametrize("execution", ["auto", "fused"])
def test_a_noise_hook_added_after_the_first_call_runs_on_the_loop(
    execution: str, ranked_first: Callable[[str], None]
) -> None:
    # The fused plan leaves a template with hooks to another plan: vmap, which drew
    # other noise than the members' hooks (0.23 off), with no dropout in training.
    ranked_first("fused")
    mods = _members(_mlp(nn.Dropout(0.4)), 8)
    for m in mods:
        m.eval()
    ens = lm.Ensemble(copy.deepcopy(mods), execution=execution).eval()  # type: ignore[arg-type]
    x = torch.randn(32, 8)
    assert chosen_plan(ens, x) == "fused"
    for m in (*mods, ens.template.module):
        m[0].register_forward_hook(_noise)
        m[3].register_forward_hook(_noise)
    _compare(mods, ens, x, plan="loop")
