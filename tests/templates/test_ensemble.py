"""Ensemble: agreement with a loop over members on every execution path, state, errors."""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import pickle
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import lightning_meta as lm
from support.torch_modes import deterministic_algorithms

EXECUTIONS = ["auto", "vmap", "loop"]


def mlp(dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Dropout(dropout), nn.Linear(8, 2))


def members(n: int = 4, make=mlp) -> list[nn.Module]:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return [make() for _ in range(n)]


def loop(mods: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return torch.stack([m(x) for m in mods])


def assert_outputs_and_gradients_match(
    ens: lm.Ensemble, mods: list[nn.Module], x: torch.Tensor
) -> None:
    out, ref = ens(x), loop(mods, x)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for i, m in enumerate(mods):
        for name, p in m.named_parameters():
            torch.testing.assert_close(ens.stacked.get_parameter(name).grad[i], p.grad)


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_outputs_and_gradients_match_a_loop(execution: str) -> None:
    mods = members()
    ens = lm.Ensemble(mods, execution=execution)  # type: ignore[arg-type]
    assert_outputs_and_gradients_match(ens, mods, torch.randn(5, 3))


def test_auto_picks_the_fused_path_for_linear_stacks_only() -> None:
    assert lm.Ensemble(members()).execution == "fused"
    conv = [nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU()) for _ in range(2)]
    assert lm.Ensemble(conv).execution == "vmap"
    with pytest.raises(lm.MetaTensorError, match="execution='fused'.*nn.Sequential of nn.Linear"):
        lm.Ensemble(conv, execution="fused")


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_per_member_inputs_and_leading_dims(execution: str) -> None:
    mods = members()
    ens = lm.Ensemble(mods, per_member_inputs=True, execution=execution)  # type: ignore[arg-type]
    x = torch.randn(4, 2, 5, 3)
    torch.testing.assert_close(ens(x), torch.stack([m(xi) for m, xi in zip(mods, x, strict=True)]))
    shared = lm.Ensemble(mods, execution=execution)  # type: ignore[arg-type]
    torch.testing.assert_close(shared(x[0]), loop(mods, x[0]))


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_chunk_size_gives_the_same_result(execution: str) -> None:
    mods = members(5)
    x = torch.randn(6, 3)
    ens = lm.Ensemble(mods, chunk_size=2, execution=execution)  # type: ignore[arg-type]
    torch.testing.assert_close(ens(x), loop(mods, x))
    per = lm.Ensemble(mods, chunk_size=2, per_member_inputs=True, execution=execution)  # type: ignore[arg-type]
    xs = torch.randn(5, 6, 3)
    torch.testing.assert_close(
        per(xs), torch.stack([m(xi) for m, xi in zip(mods, xs, strict=True)])
    )


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))


@pytest.mark.parametrize("execution", ["vmap", "loop"])
def test_batchnorm_running_stats_update_per_member(execution: str) -> None:
    mods = members(3, bn_net)
    ens = lm.Ensemble(mods, execution=execution)  # type: ignore[arg-type]
    x = torch.randn(8, 3)
    for _ in range(3):
        torch.testing.assert_close(ens(x), loop(mods, x))
    for i, m in enumerate(mods):
        torch.testing.assert_close(ens.stacked.get_buffer("1.running_mean")[i], m[1].running_mean)
        assert int(ens.stacked.get_buffer("1.num_batches_tracked")[i]) == 3
    ens.eval()
    for m in mods:
        m.eval()
    torch.testing.assert_close(ens(x), loop(mods, x))


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_dropout_differs_between_members_and_eval_switches_it_off(execution: str) -> None:
    mods = [nn.Sequential(nn.Linear(3, 64), nn.Dropout(0.5)) for _ in range(2)]
    with torch.no_grad():
        for m in mods:
            m[0].weight.fill_(1.0)
            m[0].bias.fill_(0.0)
    ens = lm.Ensemble(mods, execution=execution)  # type: ignore[arg-type]
    out = ens(torch.ones(1, 3))
    assert not torch.equal(out[0] == 0, out[1] == 0)  # independent masks
    ens.eval()
    assert ens.template.training is False
    torch.testing.assert_close(ens(torch.ones(1, 3)), torch.full((2, 1, 64), 3.0))


def test_randomness_same_and_error() -> None:
    mods = [nn.Sequential(nn.Linear(3, 64), nn.Dropout(0.5)) for _ in range(2)]
    same = lm.Ensemble(mods, randomness="same")
    assert same.execution == "vmap"
    out = same(torch.ones(1, 3))
    assert torch.equal(out[0] == 0, out[1] == 0)
    # Every plan refuses the draw: the fix is another randomness or eval(), not the loop.
    with pytest.raises(lm.MetaTensorError, match="randomness='error'") as info:
        lm.Ensemble(mods, randomness="error")(torch.ones(1, 3))
    assert "execution='loop'" not in str(info.value)
    assert "randomness='different'" in str(info.value) and "eval()" in str(info.value)


def test_tied_weights_in_members() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    mods = members(3, Tied)
    ens = lm.Ensemble(mods)
    assert sorted(ens.state_dict()) == ["stacked.a.bias", "stacked.a.weight", "stacked.b.bias"]
    x = torch.randn(2, 4)
    torch.testing.assert_close(ens(x), loop(mods, x))
    member = ens.member(1)
    assert member.b.weight is member.a.weight


def test_member_returns_an_independent_real_module() -> None:
    mods = members(3, bn_net)
    ens = lm.Ensemble(mods).eval()
    m = ens.member(-1)
    assert isinstance(m, nn.Sequential) and not m.training
    for (name, t), ref in zip(m.state_dict().items(), mods[2].state_dict().values(), strict=True):
        assert torch.equal(t, ref), name
    with torch.no_grad():
        m[0].weight.add_(1.0)
    assert not torch.equal(ens.stacked.get_parameter("0.weight")[2], m[0].weight)
    with pytest.raises(lm.MetaTensorError, match=r"member\(3\) is out of range for 3 members"):
        ens.member(3)


def test_from_factory_holds_one_member_at_a_time() -> None:
    alive: list[weakref.ref[nn.Module]] = []

    def factory() -> nn.Module:
        gc.collect()
        count = sum(r() is not None for r in alive)
        assert count <= 1, f"{count} earlier members are still alive"
        m = mlp()
        alive.append(weakref.ref(m))
        return m

    ens = lm.Ensemble.from_factory(factory, 6)
    assert len(ens) == 6 and ens.stacked.get_parameter("0.weight").shape == (6, 8, 3)
    with pytest.raises(lm.MetaTensorError, match="num_members >= 1"):
        lm.Ensemble.from_factory(mlp, 0)


def test_state_dict_round_trip_and_readable_keys() -> None:
    mods = members(3, bn_net)
    ens = lm.Ensemble(mods)
    other = lm.Ensemble(members(3, bn_net))
    other.load_state_dict(ens.state_dict())
    assert list(ens.state_dict()) == [
        "stacked.0.weight",
        "stacked.0.bias",
        "stacked.1.weight",
        "stacked.1.bias",
        "stacked.1.running_mean",
        "stacked.1.running_var",
        "stacked.1.num_batches_tracked",
        "stacked.3.weight",
        "stacked.3.bias",
    ]
    x = torch.randn(4, 3)
    torch.testing.assert_close(other(x), ens(x))
    assert all(t.is_meta for t in other.template.module.parameters())


def test_non_persistent_buffers_stay_non_persistent() -> None:
    class WithBuffer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("freq", torch.arange(2.0), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.freq

    ens = lm.Ensemble(members(2, WithBuffer))
    assert "stacked.freq" not in ens.state_dict()
    assert ens.stacked.get_buffer("freq").shape == (2, 2)


def test_deepcopy_and_pickle() -> None:
    mods = members()
    ens = lm.Ensemble(mods)
    x = torch.randn(3, 3)
    for clone in (copy.deepcopy(ens), pickle.loads(pickle.dumps(ens))):
        torch.testing.assert_close(clone(x), ens(x))
        assert clone.stacked.get_parameter("0.weight") is not ens.stacked.get_parameter("0.weight")
        assert clone.template.module.get_parameter("0.weight").is_meta


def test_pruning_hooks_on_stacked_tensors_apply() -> None:
    from torch.nn.utils import prune

    mods = members()
    ens = lm.Ensemble(mods)
    holder = ens.stacked.get_submodule("0")
    prune.l1_unstructured(holder, "weight", amount=0.5)
    x = torch.randn(3, 3)
    mask = holder.get_buffer("weight_mask")
    with torch.no_grad():
        for i, m in enumerate(mods):
            m[0].weight.mul_(mask[i])
    torch.testing.assert_close(ens(x), loop(mods, x))
    ens(x).sum().backward()
    assert holder.get_parameter("weight_orig").grad is not None


def test_module_to_moves_stacked_tensors_but_not_the_template() -> None:
    ens = lm.Ensemble(members()).to(torch.float64)
    assert ens.stacked.get_parameter("0.weight").dtype == torch.float64
    assert ens.template.module.get_parameter("0.weight").is_meta
    assert ens(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64


def test_wrong_input_width_raises_torch_error_from_the_member() -> None:
    ens = lm.Ensemble(members())
    with pytest.raises(RuntimeError, match=r"\[4, 5\] but got: \[4, 3\]|cannot be multiplied"):
        ens(torch.randn(2, 5))


def test_differently_shaped_members_are_listed() -> None:
    a = mlp()
    b = nn.Sequential(nn.Linear(3, 9), nn.GELU(), nn.Dropout(0.0), nn.Linear(9, 2))
    c = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Dropout(0.0))
    with pytest.raises(lm.MetaTensorError) as info:
        lm.Ensemble([a, b])
    message = str(info.value)
    assert "member 1: parameter '0.weight' is (9, 3) torch.float32, member 0 has (8, 3)" in message
    assert "member 1: parameter '3.weight' is (2, 9)" in message
    with pytest.raises(lm.MetaTensorError, match=r"member 1 lacks '3.weight' \(2, 8\)"):
        lm.Ensemble([a, c])
    with pytest.raises(lm.MetaTensorError, match="member 1 is Linear, member 0 is Sequential"):
        lm.Ensemble([a, nn.Linear(3, 2)])
    d = mlp()
    d[0].weight.requires_grad_(False)
    with pytest.raises(lm.MetaTensorError, match="'0.weight' has requires_grad=False"):
        lm.Ensemble([a, d])
    with pytest.raises(
        lm.MetaTensorError, match="member 1 holds '0.weight' on float64|is \\(8, 3\\) torch.float64"
    ):
        lm.Ensemble([a, mlp().double()])
    with pytest.raises(
        lm.MetaTensorError,
        match=r"member 1 has Dropout\(p=0.5, inplace=False\) at '2', member 0 has Dropout\(p=0.0",
    ) as info:
        lm.Ensemble([a, mlp(dropout=0.5)])
    assert info.value.paths == ("2",)


def test_other_bad_input() -> None:
    with pytest.raises(lm.MetaTensorError, match="got no members"):
        lm.Ensemble([])
    with pytest.raises(lm.MetaTensorError, match="expects a sequence of modules, got one Linear"):
        lm.Ensemble(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(lm.MetaTensorError, match="member 0 is int"):
        lm.Ensemble([1, 2])  # type: ignore[list-item]
    with pytest.raises(lm.MetaTensorError, match="on the meta device"):
        lm.Ensemble([nn.Linear(2, 2, device="meta")])
    with pytest.raises(lm.MetaTensorError, match="randomness='sometimes'"):
        lm.Ensemble(members(), randomness="sometimes")  # type: ignore[arg-type]
    with pytest.raises(lm.MetaTensorError, match="execution='fast'"):
        lm.Ensemble(members(), execution="fast")  # type: ignore[arg-type]
    with pytest.raises(lm.MetaTensorError, match="chunk_size=0"):
        lm.Ensemble(members(), chunk_size=0)


def test_keyword_inputs_go_to_every_member() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
            return self.lin(x) * scale

    mods = members(3, Scaled)
    x = torch.randn(4, 2)
    for execution in EXECUTIONS:
        ens = lm.Ensemble(mods, execution=execution)  # type: ignore[arg-type]
        torch.testing.assert_close(ens(x, scale=2.0), torch.stack([m(x, scale=2.0) for m in mods]))


@pytest.mark.parametrize("bias", [True, False])
def test_per_member_gemm_path_for_large_layers(monkeypatch: pytest.MonkeyPatch, bias: bool) -> None:
    from lightning_meta._ensemble import _fused as _ensemble_fused

    monkeypatch.setattr(_ensemble_fused, "_PER_MEMBER_GRAD_MACS", 0)  # every layer takes it
    torch.manual_seed(0)
    mods = [
        nn.Sequential(
            nn.Linear(3, 8, bias=bias),
            nn.ReLU(),
            nn.Linear(8, 8, bias=bias),
            nn.ReLU(),
            nn.Linear(8, 2, bias=bias),
        )
        for _ in range(3)
    ]
    ens = lm.Ensemble(mods)
    assert_outputs_and_gradients_match(ens, mods, torch.randn(5, 3))
    xs = torch.randn(3, 5, 3, requires_grad=True)
    per = lm.Ensemble(mods, per_member_inputs=True)
    per(xs).sum().backward()
    assert xs.grad is not None and xs.grad.shape == xs.shape


def test_members_with_other_settings_are_refused() -> None:
    with pytest.raises(
        lm.MetaTensorError,
        match=r"member 1 has Dropout\(p=0.5, inplace=False\) at '2', member 0 has Dropout\(p=0.0",
    ):
        lm.Ensemble([mlp(), mlp(dropout=0.5)])


class Scaled(nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.k = k  # read by forward, shown by no repr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.k


def with_bn() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_members_with_settings_repr_does_not_show_are_refused() -> None:
    # The template is member 0: another member's setting would be lost silently.
    with pytest.raises(lm.MetaTensorError, match=r"member 1 has k = 3.0, member 0 has 2.0"):
        lm.Ensemble([Scaled(2.0), Scaled(3.0)])
    frozen = with_bn()
    frozen[1].eval()
    with pytest.raises(
        lm.MetaTensorError, match=r"member 1 has 1.training = False, member 0 has True"
    ):
        lm.Ensemble([with_bn(), frozen])
    other = with_bn()
    running_mean = other[1].running_mean
    del other[1].running_mean
    other[1].register_buffer("running_mean", running_mean, persistent=False)
    with pytest.raises(
        lm.MetaTensorError, match=r"1._non_persistent_buffers_set = \{'running_mean'\}"
    ):
        lm.Ensemble([with_bn(), other])
    lm.Ensemble([Scaled(2.0), Scaled(2.0)])  # equal settings pass
    # Private bookkeeping is not a setting: a hook registered once and removed.
    hooked = Scaled(2.0)
    hooked.register_full_backward_hook(lambda *args: None).remove()
    lm.Ensemble([Scaled(2.0), hooked])


class _Set(nn.Module):
    """A setting forward reads, held as given (any kind of value)."""

    def __init__(self, setting: Any, private: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.private = private
        if private:
            self._setting = setting
        else:
            self.setting = setting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self._setting if self.private else self.setting
        if callable(value):
            return value(self.lin(x))  # type: ignore[no-any-return]
        if isinstance(value, list):
            value = value[0]
        return self.lin(x) * float(value)


def _scaler(k: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda y: y * k


@pytest.mark.parametrize(
    ("mine", "theirs", "private", "shown"),
    [
        (1.0, 3.0, True, r"_setting = 3.0, member 0 has 1.0"),
        (np.float32(1.0), np.float32(3.0), False, r"setting = (np\.float32\()?3\.0"),
        (torch.relu, torch.tanh, False, r"setting = torch.tanh, member 0 has torch.relu"),
        (_scaler(1.0), _scaler(3.0), False, r"setting = _scaler.<locals>.<lambda>"),
        ([torch.tensor(1.0)], [torch.tensor(3.0)], False, r"tensor\(3\.\)\]\), member 0"),
    ],
    ids=["private", "numpy", "function", "closure", "tensor-in-list"],
)
def test_members_with_settings_of_any_kind_are_refused(
    mine: Any, theirs: Any, private: bool, shown: str
) -> None:
    # Each ran with member 0's setting, without an error: private attributes,
    # numpy values, functions and tensors in lists were not compared.
    with pytest.raises(lm.MetaTensorError, match=shown):
        lm.Ensemble([_Set(mine, private), _Set(theirs, private)])
    same = [_Set(mine, private), _Set(copy.copy(mine), private)]
    x = torch.randn(4, 3)
    torch.testing.assert_close(lm.Ensemble(same)(x), torch.stack([m(x) for m in same]))


class _Noisy(nn.Module):
    """Draws noise from a generator of its own (a seed per member)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + torch.randn(x.shape[0], 3, generator=self.gen)


def test_members_with_other_generators_are_refused() -> None:
    # Members drawing from generators of their own ran with copies of member
    # 0's: every member drew member 0's noise, without an error.
    torch.manual_seed(0)
    with pytest.raises(
        lm.MetaTensorError, match=r"gen = torch.Generator\(.*initial_seed=1\)"
    ) as info:
        lm.Ensemble([_Noisy(seed) for seed in (0, 1, 2)])
    assert info.value.paths == ("gen",)
    assert "torch.Generator that differs per member" in str(info.value)
    # Generators in the same state draw the same noise, as the members do.
    mods = [_Noisy(7) for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(mods), execution="loop")
    x = torch.zeros(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(mods, x))


def test_a_generator_of_the_members_draws_as_in_a_loop_over_them() -> None:
    # "auto"'s timed runs drew from the copies' generators and left them
    # advanced; vmap drew N values from the template's one; the copies'
    # states were not carried into member(i), deepcopy or pickle: every call
    # gave other noise than a loop over the members, without an error.
    x = torch.zeros(2, 3)
    for execution in ("auto", "loop"):
        torch.manual_seed(0)
        mods = [_Noisy(7) for _ in range(3)]
        ens = lm.Ensemble(copy.deepcopy(mods), execution=execution)
        with torch.no_grad():
            for _ in range(3):
                torch.testing.assert_close(ens(x), loop(mods, x), rtol=0, atol=0)
            assert ens.plan == "loop"
            want = loop(copy.deepcopy(mods), x)
            torch.testing.assert_close(ens.member(1)(x), want[1], rtol=0, atol=0)
            torch.testing.assert_close(copy.deepcopy(ens)(x), want, rtol=0, atol=0)
            torch.testing.assert_close(pickle.loads(pickle.dumps(ens))(x), want, rtol=0, atol=0)
    with pytest.raises(lm.MetaTensorError, match=r"changed 'gen'") as info:
        lm.Ensemble([_Noisy(7) for _ in range(3)], execution="vmap")(x)
    assert info.value.paths == ("gen",)


def test_members_sharing_one_generator_are_refused() -> None:
    # A loop over them draws from it member after member; the ensemble's
    # members drew from copies of it, every member the same noise.
    shared = [_Noisy(7) for _ in range(3)]
    for mod in shared[1:]:
        mod.gen = shared[0].gen
    with pytest.raises(lm.MetaTensorError, match=r"share \['gen'\].*torch\.Generator") as info:
        lm.Ensemble(shared)
    assert info.value.paths == ("gen",)


def test_members_with_other_module_hooks_are_refused() -> None:
    # The template runs member 0's hooks for every member: a hook on another
    # member, or one closing over another value, was dropped silently.
    def scale(k: float) -> Callable[..., torch.Tensor]:
        return lambda mod, args, out: out * k

    a, b = Scaled(1.0), Scaled(1.0)
    a.lin.register_forward_hook(scale(1.0))
    b.lin.register_forward_hook(scale(2.0))
    with pytest.raises(
        lm.MetaTensorError,
        match=r"member 1 has forward hooks \['test_members_with_other_module_hooks_are_refused"
        r"\.<locals>\.scale\.<locals>\.<lambda>'\] on 'lin'.*closing over",
    ):
        lm.Ensemble([a, b])
    c = Scaled(1.0)
    with pytest.raises(lm.MetaTensorError, match=r"member 1 has forward hooks \[\] on 'lin'"):
        lm.Ensemble([a, c])
    c.lin.register_forward_hook(scale(1.0))  # the same hook on every member runs
    x = torch.randn(4, 3)
    for plan in ("loop", "vmap"):
        ens = lm.Ensemble([a, c], execution=plan)  # type: ignore[arg-type]
        torch.testing.assert_close(ens(x), torch.stack([a(x), c(x)]))


def test_members_sharing_a_tensor_are_refused() -> None:
    # One shared embedding, trained once by a loop, was split into a copy per
    # member that trained apart (5e4 apart after two SGD steps).
    shared = nn.Embedding(5, 3)
    built = [nn.Sequential(shared, nn.Linear(3, 2)) for _ in range(3)]
    with pytest.raises(lm.MetaTensorError, match=r"members 0 and 1 share \['0.weight'\]") as info:
        lm.Ensemble(built)
    assert info.value.paths == ("0.weight",)
    with pytest.raises(lm.MetaTensorError, match=r"members 0 and 1 share"):
        lm.Ensemble.from_factory(lambda: nn.Sequential(shared, nn.Linear(3, 2)), 3)
    lm.Ensemble.from_factory(lambda: nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)), 3)
    # Running statistics a loop updates member after member.
    norm = nn.BatchNorm1d(2, affine=False)
    with pytest.raises(lm.MetaTensorError, match=r"members 0 and 1 share \['1'\]"):
        lm.Ensemble([nn.Sequential(nn.Linear(3, 2), norm) for _ in range(2)])
    # Stateless modules and constant buffers taken from one cache are fine.
    act, mask = nn.GELU(), torch.ones(2)
    mods = []
    for _ in range(2):
        m = nn.Sequential(nn.Linear(3, 2), act)
        m[0].register_buffer("mask", mask)
        mods.append(m)
    x = torch.randn(4, 3)
    torch.testing.assert_close(lm.Ensemble(mods)(x), torch.stack([m(x) for m in mods]))


class _HeldOutside(nn.Module):
    def __init__(self, held: Any) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.held = held

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize(
    ("held", "where"),
    [
        ([nn.Parameter(torch.randn(4))], r"\['held\[0\]'\]"),
        ({"shift": torch.randn(4, requires_grad=True)}, r"\[\"held\['shift'\]\"\]"),
        ([nn.Linear(4, 4)], r"\['held\[0\].bias', 'held\[0\].weight'\]"),
    ],
    ids=["parameter-in-list", "leaf-in-dict", "module-in-list"],
)
def test_tensors_that_require_grad_outside_the_parameters_are_refused(
    held: Any, where: str
) -> None:
    # The template kept a copy of member 0's: no gradient reached it.
    with pytest.raises(lm.MetaTensorError, match=rf"require grad outside its parameters: {where}"):
        lm.Ensemble([_HeldOutside(held), _HeldOutside(held)])


@pytest.mark.parametrize(
    "wrap",
    [
        torch.nn.utils.spectral_norm,
        torch.nn.utils.weight_norm,
        lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", 0.5),
    ],
    ids=["spectral_norm", "weight_norm", "prune"],
)
def test_weights_a_hook_recomputes_are_refused_naming_the_fix(wrap: Callable[..., Any]) -> None:
    # spectral_norm's weight was compared as a setting (a wrong refusal
    # printing the whole tensor); weight_norm and prune raised torch's
    # deepcopy RuntimeError.
    mods = [nn.Sequential(nn.Linear(5, 4), nn.ReLU()) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm's deprecation
        for m in mods:
            wrap(m[0])
    with pytest.raises(
        lm.MetaTensorError, match=r"\['0.weight'\] made by a hook.*parametrizations"
    ) as info:
        lm.Ensemble(mods)
    assert info.value.paths == ("0.weight",)


def test_member_differences_carry_their_paths() -> None:
    with pytest.raises(lm.MetaTensorError) as info:
        lm.Ensemble([nn.Linear(3, 4), nn.Linear(3, 5)])
    assert info.value.paths == ("bias", "weight")
    frozen = with_bn()
    frozen[1].eval()
    with pytest.raises(lm.MetaTensorError, match=r"call \.train\(\) or \.eval\(\) alike") as info:
        lm.Ensemble([with_bn(), frozen])
    assert info.value.paths == ("1.training",)


def _block(scale: float) -> nn.Module:
    class Block(nn.Module):  # a class a factory defines per call, closing over a value
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * scale

    return Block()


class _Scale:
    """A hook object whose state decides what it computes."""

    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, mod: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return out * self.k


def test_members_are_compared_by_what_computes_their_output() -> None:
    # Classes defined per instance (torch's parametrizations, a factory's
    # class) compare by definition; a factory class closing over another
    # value, a hook object with other state, a function closing over a
    # tensor that requires grad were taken from member 0 without an error.
    x = torch.randn(4, 3)
    same = [_block(1.0), _block(1.0)]
    torch.testing.assert_close(lm.Ensemble(same)(x), torch.stack([m(x) for m in same]))
    with pytest.raises(lm.MetaTensorError, match=r"has a _block.<locals>.Block \(defined anew"):
        lm.Ensemble([nn.Sequential(_block(1.0)), nn.Sequential(_block(5.0))])
    normed = [torch.nn.utils.parametrizations.spectral_norm(nn.Linear(3, 2)) for _ in range(2)]
    lm.Ensemble(normed)
    hooked = [Scaled(1.0), Scaled(1.0)]
    for m, k in zip(hooked, (1.0, 2.0), strict=True):
        m.register_forward_hook(_Scale(k))
    with pytest.raises(lm.MetaTensorError, match=r"forward hooks \['_Scale'\] on the member"):
        lm.Ensemble(hooked)
    shift = torch.zeros(2, requires_grad=True)
    closing = [_Set(lambda y: y + shift), _Set(lambda y: y + shift)]
    with pytest.raises(lm.MetaTensorError, match=r"\[\"setting \(closing over 'shift'\)\"\]"):
        lm.Ensemble(closing)


def test_members_wrapped_by_torch_compile_or_sharing_frozen_weights_are_accepted() -> None:
    # torch.compile's wrapper keeps per-instance ids and a config getter,
    # which are not settings; a frozen shared embedding trains nowhere.
    compiled = [torch.compile(Scaled(2.0)) for _ in range(2)]
    lm.Ensemble(compiled, execution="loop")  # type: ignore[arg-type]
    frozen = nn.Embedding(5, 3).requires_grad_(False)
    heads = [nn.Sequential(frozen, nn.Linear(3, 2)) for _ in range(2)]
    ids = torch.tensor([[0, 1], [2, 3]])
    torch.testing.assert_close(lm.Ensemble(heads)(ids), torch.stack([m(ids) for m in heads]))
    with pytest.raises(lm.MetaTensorError, match=r"TorchScript module.*before torch.jit.script"):
        lm.Ensemble([torch.jit.script(nn.Linear(3, 2)) for _ in range(2)])


def test_members_modes_are_kept_submodule_by_submodule() -> None:
    members = [with_bn() for _ in range(3)]
    for m in members:
        m[1].eval()  # a frozen BatchNorm, as a plain module wrapping them would keep it
    ens = lm.Ensemble(members)
    assert ens.training and not ens.template.module[1].training
    x = torch.randn(5, 3)
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))
    assert torch.equal(
        ens.stacked.get_buffer("1.num_batches_tracked"), torch.zeros(3, dtype=torch.long)
    )
    assert not ens.member(0)[1].training and ens.member(0)[0].training
    ens.train()  # nn.Module.train: every submodule
    assert ens.template.module[1].training
    evaluated = lm.Ensemble([with_bn().eval() for _ in range(2)])
    assert not evaluated.training and not evaluated.template.module.training
    assert not any(m.training for m in evaluated.modules())  # its holders too


class ScaledBy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        y = self.lin(x)
        return y if scale is None else y * scale


@pytest.mark.parametrize("execution", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_per_member_keyword_inputs_are_split(execution: str, chunk_size: int | None) -> None:
    torch.manual_seed(0)
    members = [ScaledBy() for _ in range(3)]
    x, scale = torch.randn(3, 5, 4), torch.rand(3, 5, 1)
    expected = torch.stack([m(x[i], scale=scale[i]) for i, m in enumerate(members)])
    ens = lm.Ensemble(members, per_member_inputs=True, execution=execution, chunk_size=chunk_size)
    torch.testing.assert_close(ens(x, scale=scale), expected)


@pytest.mark.parametrize("execution", ["auto", "fused", "vmap", "loop"])
def test_per_member_inputs_need_one_slice_per_member(execution: str) -> None:
    members = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(3)]
    ens = lm.Ensemble(members, per_member_inputs=True, execution=execution)
    for bad in (torch.randn(6, 5, 4), torch.randn(2, 5, 4), torch.randn(4)):
        with pytest.raises(ValueError, match=r"input 0 holds a tensor of shape"):
            ens(bad)
    with pytest.raises(ValueError, match=r"keyword input 'scale'"):
        lm.Ensemble([ScaledBy() for _ in range(3)], per_member_inputs=True)(
            torch.randn(3, 5, 4), scale=torch.rand(5, 1)
        )


class Tagged(nn.Parameter):
    pass


def test_bad_arguments_are_refused_with_a_type_error() -> None:
    members = [nn.Linear(2, 2) for _ in range(2)]
    with pytest.raises(TypeError, match=r"per_member_inputs='yes'; expected True or False"):
        lm.Ensemble(members, per_member_inputs="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"chunk_size=True"):
        lm.Ensemble(members, chunk_size=True)
    with pytest.raises(TypeError, match=r"num_members=True, a bool"):
        lm.Ensemble.from_factory(lambda: nn.Linear(2, 2), True)
    ens = lm.Ensemble(members)
    for bad in (1.0, "0"):
        with pytest.raises(TypeError, match=r"needs an int index"):
            ens.member(bad)  # type: ignore[arg-type]
    assert torch.equal(ens.member(torch.tensor(1)).weight, members[1].weight)
    tagged = nn.Linear(2, 2)
    tagged.weight = Tagged(tagged.weight.detach())
    with pytest.raises(lm.MetaTensorError, match=r"member 1: parameter \(Tagged\) 'weight'"):
        lm.Ensemble([nn.Linear(2, 2), tagged])


def test_inference_calls_follow_every_change_to_the_stacked_tensors_and_template() -> None:
    """The loop plan keeps member views from call to call without gradients: each way of
    changing a stacked tensor or the template must still reach the next call."""
    from torch.nn.utils import parameters_to_vector, prune, vector_to_parameters

    mods = members()
    ens = lm.Ensemble(mods, execution="loop").eval()
    x = torch.randn(5, 3)
    holder = ens.stacked.get_submodule("0")
    with torch.no_grad():
        first = ens(x)
        assert torch.equal(ens(x), first)
        # In place, as an optimizer step writes.
        holder.get_parameter("weight").mul_(2)
        for m in mods:
            m[0].weight.mul_(2)
        torch.testing.assert_close(ens(x), loop(mods, x))
        # New memory behind the same Parameter (vector_to_parameters assigns .data).
        vector_to_parameters(parameters_to_vector(ens.parameters()) * 0.5, ens.parameters())
        for m in mods:
            vector_to_parameters(parameters_to_vector(m.parameters()) * 0.5, m.parameters())
        torch.testing.assert_close(ens(x), loop(mods, x))
        # A new Parameter object.
        state = {k: v * -1 for k, v in ens.state_dict().items()}
        ens.load_state_dict(state, assign=True)
        for m in mods:
            m.load_state_dict({k: v * -1 for k, v in m.state_dict().items()})
        torch.testing.assert_close(ens(x), loop(mods, x))
        # The same memory read in another order (same data_ptr, other strides).
        weight = ens.stacked.get_parameter("0.weight")
        reordered = weight.data.view(4, 3, 8).transpose(1, 2)
        weight.data = reordered
        for i, m in enumerate(mods):
            m[0].weight.data = reordered[i].clone()
        torch.testing.assert_close(ens(x), loop(mods, x))
        # A hook on the template runs in every member.
        calls: list[int] = []
        handle = ens.template.module[0].register_forward_hook(lambda *_: calls.append(1))
        ens(x)
        assert len(calls) == 4
        handle.remove()
        # A reparametrisation on a holder (pruning) applies at once.
        pruned = ens.stacked.get_submodule("3")
        prune.l1_unstructured(pruned, "weight", amount=0.5)
        mask = pruned.get_buffer("weight_mask")
        for i, m in enumerate(mods):
            m[3].weight.mul_(mask[i])
        torch.testing.assert_close(ens(x), loop(mods, x))
        pruned.get_parameter("weight_orig").mul_(3)  # the hook recomputes the weight
        for m in mods:
            m[3].weight.mul_(3)
        torch.testing.assert_close(ens(x), loop(mods, x))


def test_plans_are_ranked_by_their_ratio_to_the_fastest_of_each_round() -> None:
    from lightning_meta._ensemble._plan import _ranked

    # b is faster in three rounds of five, a in two; a's median is lower.
    rounds = {"a": [1.0, 1.0, 1.0, 2.1, 2.1], "b": [1.9, 1.9, 0.95, 0.95, 2.0]}
    medians = {p: sorted(t)[2] for p, t in rounds.items()}
    assert medians["a"] < medians["b"]
    assert _ranked(["a", "b"], rounds, medians) == ["b", "a"]
    assert _ranked(["a"], rounds, medians) == ["a"]
    # Equal ratios: the smaller median first.
    assert _ranked(["b", "a"], {"a": [1.0, 2.0], "b": [2.0, 1.0]}, {"a": 1.0, "b": 2.0}) == [
        "a",
        "b",
    ]


def test_hooks_swapped_or_added_on_the_template_run() -> None:
    mods = members()
    ens = lm.Ensemble(copy.deepcopy(mods), execution="loop").eval()
    for m in mods:
        m.eval()
    x = torch.randn(5, 3)

    def on_all(layer: int, hook):  # type: ignore[no-untyped-def]
        return [m[layer].register_forward_hook(hook) for m in [ens.template.module, *mods]]

    with torch.no_grad():
        handles = on_all(3, lambda m, i, o: o * 2)
        torch.testing.assert_close(ens(x), loop(mods, x))
        for h in handles:
            h.remove()
        handles = on_all(3, lambda m, i, o: o * 3)  # as many hooks as before, another one
        torch.testing.assert_close(ens(x), loop(mods, x))
        on_all(3, lambda m, i, o: o + 1)  # a second hook on the same layer
        torch.testing.assert_close(ens(x), loop(mods, x))


def test_stacked_memory_given_another_dtype_or_conjugated_is_read_anew() -> None:
    torch.manual_seed(0)
    mods = [nn.Linear(3, 2, dtype=torch.complex64) for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(mods), execution="loop")
    x = torch.randn(5, 3, dtype=torch.complex64)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(mods, x))
        weight = ens.stacked.get_parameter("weight")
        weight.data = weight.data.conj()  # same data_ptr, shape and strides
        for m in mods:
            m.weight.data = m.weight.data.conj()
        torch.testing.assert_close(ens(x), loop(mods, x))
    # The same bits read as another dtype of the same size.
    mods = [nn.Linear(3, 2, dtype=torch.float16) for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(mods), execution="loop")
    with torch.no_grad():
        ens(torch.randn(5, 3, dtype=torch.float16))
        for holder in [ens.stacked, *mods]:
            for p in holder.parameters():
                p.data = p.data.view(torch.bfloat16)
        x = torch.randn(5, 3, dtype=torch.bfloat16)
        torch.testing.assert_close(ens(x), loop(mods, x))


def test_holders_offloaded_by_accelerate_and_parametrized_holders_copied() -> None:
    accelerate = pytest.importorskip("accelerate")
    from torch.nn.utils import parametrize

    mods = members()
    for m in mods:
        m.eval()
    x = torch.randn(5, 3)
    for execution in ("loop", "vmap"):
        ens = lm.Ensemble(copy.deepcopy(mods), execution=execution).eval()
        with torch.no_grad():
            ens(x)
            # accelerate sets forward on each holder and leaves meta tensors in its tables.
            accelerate.cpu_offload(ens, execution_device=torch.device("cpu"))
            assert ens.stacked.get_submodule("0").get_parameter("weight").is_meta
            torch.testing.assert_close(ens(x), loop(mods, x))

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 2

    ens = lm.Ensemble(copy.deepcopy(mods), execution="loop").eval()
    with torch.no_grad():
        ens(x)
        parametrize.register_parametrization(ens.stacked.get_submodule("3"), "weight", Double())
        doubled = copy.deepcopy(mods)
        for m in doubled:
            parametrize.register_parametrization(m[3], "weight", Double())
        # (torch pickles no parametrized module.)
        for clone in (ens, copy.deepcopy(ens)):
            torch.testing.assert_close(clone(x), loop(doubled, x))


def test_torch_func_over_the_stacked_tensors_of_the_loop_plan() -> None:
    from torch.func import functional_call, vmap

    mods = members()
    for m in mods:
        m.eval()
    ens = lm.Ensemble(copy.deepcopy(mods), execution="loop").eval()
    x = torch.randn(5, 3)
    weight = ens.stacked.get_parameter("0.weight").detach()
    with torch.no_grad():
        ens(x)  # views cached outside the transform
        out = vmap(lambda w: functional_call(ens, {"stacked.0.weight": w}, (x,)))(
            torch.stack([weight, weight * 2])
        )
        for k, scale in enumerate((1, 2)):
            ref = torch.stack(
                [functional_call(m, {"0.weight": m[0].weight * scale}, (x,)) for m in mods]
            )
            torch.testing.assert_close(out[k], ref)
        torch.testing.assert_close(ens(x), loop(mods, x))


class _ScaledByHook(nn.Module):
    """Hooks of the model's own, registered in ``__init__`` as model code does: a method,
    a ``functools.partial`` of one, an object holding the model, a submodule, and a
    function closing over the model."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.register_buffer("scale", torch.tensor(2.0))
        self.post = _Post()
        self.gate: torch.Tensor | None = None
        self.register_forward_hook(self._scale)
        self.lin.register_forward_hook(functools.partial(self._gate, "lin"))
        self.lin.register_forward_hook(_GateHook(self))
        self.lin.register_forward_hook(self.post)
        self.lin.register_forward_hook(lambda m, i, o: None if self.gate is None else o - self.gate)

    def _scale(self, module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        return output * self.scale

    def _gate(self, name: str, module: nn.Module, inputs: object, output: torch.Tensor) -> Any:
        return None if self.gate is None else output * self.gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        self.gate = gate
        return self.lin(x)


class _Post(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(4))

    def forward(self, module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        return output * self.weight


class _GateHook:
    def __init__(self, owner: _ScaledByHook) -> None:
        self.owner = owner

    def __call__(self, module: nn.Module, inputs: object, output: torch.Tensor) -> Any:
        return None if self.owner.gate is None else output + self.owner.gate


@pytest.mark.parametrize("execution", ["loop", "vmap"])
def test_hooks_the_model_registers_on_itself_run_on_each_member(execution: str) -> None:
    torch.manual_seed(0)
    mods = [_ScaledByHook() for _ in range(3)]
    for k, m in enumerate(mods):
        m.scale.fill_(k + 1.0)
    # The members themselves: a copy.deepcopy of them would keep closures over the originals.
    ens = lm.Ensemble(mods, execution=execution)
    x, gate = torch.randn(5, 3), torch.rand(4)
    with torch.no_grad():
        for g in (None, gate):
            torch.testing.assert_close(ens(x, g), torch.stack([m(x, g) for m in mods]))
    assert ens.template.module.post.weight.is_meta
    torch.testing.assert_close(ens(x, gate), torch.stack([m(x, gate) for m in mods]))


class _Normalized(nn.Module):
    """A hook closing over the model beside state it shares with another hook (``nonlocal``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.normalize = True
        scale = torch.tensor(1.0)

        def measure(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            nonlocal scale
            scale = inputs[0].abs().amax()

        def divide(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
            return output / scale if self.normalize else output

        self.lin.register_forward_pre_hook(measure)
        self.lin.register_forward_hook(divide)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("execution", ["loop", "vmap"])
def test_closure_hooks_keep_shared_state_and_survive_copies_of_the_ensemble(
    execution: str,
) -> None:
    torch.manual_seed(0)
    mods = [_Normalized() for _ in range(3)]
    x = torch.randn(4, 3) * 10
    ens = lm.Ensemble(mods, execution=execution)
    with torch.no_grad():
        ref = torch.stack([m(x) for m in mods])
        torch.testing.assert_close(ens(x), ref)
        for i, m in enumerate(mods):
            torch.testing.assert_close(ens.member(i)(x), m(x))
        clone = copy.deepcopy(ens)
        torch.testing.assert_close(clone(x), ref)
        torch.testing.assert_close(clone.member(1)(x), mods[1](x))


def _shared_activation() -> nn.Module:
    act = nn.Tanh()  # one module used twice: a common idiom
    return nn.Sequential(nn.Linear(4, 16), act, nn.Linear(16, 16), act, nn.Linear(16, 2))


def _shared_linear() -> nn.Module:
    lin = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), lin, nn.ReLU(), lin)


@pytest.mark.parametrize("factory", [_shared_activation, _shared_linear])
def test_a_module_used_twice_in_a_sequential_is_not_fused(factory: Callable[[], nn.Module]) -> None:
    # The fused path walked named_children(), which lists a module once, so
    # its second use was skipped; "auto" picked fused, with wrong outputs.
    torch.manual_seed(0)
    members = [factory() for _ in range(3)]
    x = torch.randn(32, 4)
    expected = torch.stack([m(x) for m in members])
    with pytest.raises(lm.MetaTensorError, match=r"layer '\d' \(\w+\) is used more than once"):
        lm.Ensemble(members, execution="fused")
    ensemble = lm.Ensemble(members, execution="auto")
    torch.testing.assert_close(ensemble(x), expected)
    assert ensemble.plan != "fused"


class _GradientGated(nn.Module):
    """A full backward pre-hook registered in __init__ that zeroes the incoming gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)
        self.b.register_full_backward_pre_hook(lambda m, grad_output: (grad_output[0] * 0.0,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("deterministic", [False, True], ids=["timed", "untimed"])
def test_backward_hooks_keep_auto_off_vmap(deterministic: bool) -> None:
    # torch.vmap does not run module backward hooks: "auto" picked vmap and
    # gave gradients the members do not have, without an error.
    torch.manual_seed(0)
    members = [_GradientGated() for _ in range(3)]
    x = torch.randn(5, 4)
    for m in members:
        m(x).sum().backward()
    ensemble = lm.Ensemble(members, execution="auto")
    with deterministic_algorithms(deterministic):  # no timing: the static choice
        ensemble(x).sum().backward()
    assert ensemble.plan == "loop"
    for name in ("a.weight", "b.weight"):
        expected = torch.stack([m.get_parameter(name).grad for m in members])
        torch.testing.assert_close(ensemble.tensors()[name].grad, expected)
    with pytest.raises(lm.MetaTensorError, match="backward hooks .* torch.vmap does not run"):
        lm.Ensemble(members, execution="vmap")(x)


class _Scaled(nn.Module):
    """Two linear layers whose forward takes a keyword (no fused or grouped plan)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))) * scale


def _auto_choosing(
    plan: str, members: list[nn.Module], call: Callable[[lm.Ensemble], object]
) -> lm.Ensemble:
    """An ``execution="auto"`` ensemble of ``members`` whose timing chose ``plan`` on ``call``.

    On a loaded machine one timing can go astray (fused 31 ms against
    vmap's 5 ms once, in a full run; three in a row with four other test
    runs on two cores): a few fresh ensembles are timed. The callers run on
    one thread, where the timing reads the thread's CPU time, which other
    processes do not move.
    """
    for _ in range(6):
        ensemble = lm.Ensemble(members, execution="auto")
        call(ensemble)
        if ensemble.plan == plan:
            return ensemble
    raise AssertionError(f"auto chose {ensemble.plan!r}, not {plan!r}: {ensemble.plans}")


@pytest.mark.usefixtures("one_thread")
def test_backward_hook_added_after_vmap_was_timed_runs() -> None:
    # A backward hook registered on the template after "auto" had timed vmap
    # was skipped until clear_plans(): the gradients ignored it, without an error.
    torch.manual_seed(0)
    members = [_Scaled() for _ in range(64)]  # vmap clearly beats a loop of 64
    x = torch.randn(5, 4)
    ensemble = _auto_choosing(
        "vmap", members, lambda e: e(x, scale=2.0).sum().backward()
    )  # the case under test
    ensemble.zero_grad(set_to_none=True)
    handle = ensemble.template.module.b.register_full_backward_pre_hook(
        lambda m, grad_output: (grad_output[0] * 0.0,)
    )
    ensemble(x, scale=2.0).sum().backward()
    assert ensemble.plan == "loop"
    grads = ensemble.tensors()["a.weight"].grad
    assert grads is not None and not grads.any()  # the hook zeroed what reaches a
    handle.remove()
    ensemble(x, scale=2.0)
    assert ensemble.plan == "vmap"  # the timed choice again, once the hook is gone


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))


@pytest.mark.usefixtures("one_thread")
def test_backward_hook_added_after_fused_was_chosen_runs() -> None:
    # The fused plan sends a template with hooks to vmap, which skipped a
    # backward hook registered after "fused" was chosen (or forced): the
    # gradients ignored it, without an error.
    torch.manual_seed(0)
    members = [_mlp() for _ in range(64)]
    x = torch.randn(5, 4)
    auto = _auto_choosing("fused", members, lambda e: e(x).sum().backward())  # the case under test
    forced = lm.Ensemble(members, execution="fused")
    forced(x).sum().backward()
    assert forced.plan == "fused"
    handles = [
        e.template.module[2].register_full_backward_pre_hook(
            lambda m, grad_output: (grad_output[0] * 0.0,)
        )
        for e in (auto, forced)
    ]
    auto.zero_grad(set_to_none=True)
    auto(x).sum().backward()
    assert auto.plan == "loop"
    grads = auto.tensors()["0.weight"].grad
    assert grads is not None and not grads.any()  # the hook zeroed what reaches layer 0
    with pytest.raises(
        lm.MetaTensorError, match=r"execution='fused'\) cannot run with backward.* on \['2'\]"
    ) as info:
        forced(x)
    assert info.value.paths == ("2",)
    with torch.no_grad():  # no backward runs: nothing is skipped
        torch.testing.assert_close(forced(x), torch.stack([m(x) for m in members]))
    for handle in handles:
        handle.remove()
    auto(x)
    assert auto.plan == "fused"  # the timed choice again, once the hook is gone
    forced(x)


class _TensorSetting(nn.Module):
    """A setting kept as a plain tensor attribute, neither parameter nor buffer."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.temperature = torch.tensor(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) / self.temperature


@pytest.mark.parametrize(
    ("factory", "shown"),
    [(_TensorSetting, r"temperature = tensor\(2\.\), member 0 has tensor\(1\.\)")],
)
def test_settings_in_tensor_attributes_must_agree(
    factory: Callable[[float], nn.Module], shown: str
) -> None:
    # Every member ran with member 0's setting, without an error.
    with pytest.raises(lm.MetaTensorError, match=shown):
        lm.Ensemble([factory(1.0), factory(2.0)])
    members = [factory(2.0), factory(2.0)]
    x = torch.randn(3, 4)
    torch.testing.assert_close(lm.Ensemble(members)(x), torch.stack([m(x) for m in members]))


class _FrozenRow(nn.Module):
    """A gradient hook on a parameter, registered in __init__, that masks its gradient."""

    def __init__(self, post_accumulate: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        if post_accumulate:
            self.lin.weight.register_post_accumulate_grad_hook(lambda p: None)
        else:
            self.lin.weight.register_hook(torch.zeros_like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("post_accumulate", [False, True], ids=["hook", "post_accumulate"])
def test_gradient_hooks_on_member_parameters_are_refused(post_accumulate: bool) -> None:
    # The stacked tensors did not run them: other gradients than the members'.
    with pytest.raises(lm.MetaTensorError, match=r"gradient hooks on \['lin.weight'\]"):
        lm.Ensemble([_FrozenRow(post_accumulate), _FrozenRow(post_accumulate)])


class _Ema(nn.Module):
    """A buffer the forward assigns a new tensor (not an in-place update)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if self.training:
            self.ema = 0.9 * self.ema + 0.1 * y.detach().mean(0)
        return y - self.ema


@pytest.mark.parametrize(
    ("execution", "chunk_size"), [("loop", None), ("vmap", None), ("vmap", 2), ("auto", None)]
)
def test_a_buffer_the_forward_reassigns_is_kept(execution: str, chunk_size: int | None) -> None:
    # Only in-place updates reached the stacked buffers: the new tensor was
    # dropped after each call, under every plan, without an error.
    torch.manual_seed(0)
    members = [_Ema() for _ in range(3)]
    ensemble = lm.Ensemble(members, execution=execution, chunk_size=chunk_size)
    for _ in range(3):
        x = torch.randn(5, 4)
        torch.testing.assert_close(ensemble(x), torch.stack([m(x) for m in members]))
    torch.testing.assert_close(ensemble.stacked.ema, torch.stack([m.ema for m in members]))
    torch.testing.assert_close(ensemble.member(1).ema, members[1].ema)


class _BadEma(_Ema):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        self.ema = y.mean(0) if self.how == "grad" else torch.zeros(2)
        return y


@pytest.mark.parametrize("execution", ["loop", "vmap"])
@pytest.mark.parametrize(
    ("how", "shown"),
    [("grad", "a tensor that requires grad"), ("shape", r"a tensor of shape \(2,\)")],
)
def test_a_reassigned_buffer_that_cannot_be_stacked_is_refused(
    execution: str, how: str, shown: str
) -> None:
    ensemble = lm.Ensemble([_BadEma(how), _BadEma(how)], execution=execution)
    with pytest.raises(lm.MetaTensorError, match=f"replaced buffer 'ema' .* by {shown}"):
        ensemble(torch.randn(5, 4))
    assert torch.equal(ensemble.stacked.ema, torch.zeros(2, 4))  # nothing changed


class _Counted(nn.Module):
    """A buffer updated in place and then used in the autograd graph."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        return self.lin(x) * self.n


def test_a_buffer_updated_in_place_and_saved_for_backward_trains_under_auto() -> None:
    # The loop plan's member slices share the stacked buffer's version counter,
    # so autograd refuses member 0's backward once member 1 updated its slice.
    # Its timing ran without autograd's check, so "auto" picked it and the
    # call raised in backward.
    torch.manual_seed(0)
    members = [_Counted() for _ in range(3)]
    x = torch.randn(5, 4)
    forced = lm.Ensemble(copy.deepcopy(members), execution="loop")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        forced(x).sum().backward()
    ensemble = lm.Ensemble(members, execution="auto")
    ensemble(x).sum().backward()
    assert ensemble.plan != "loop"
    torch.stack([m(x) for m in members]).sum().backward()
    expected = torch.stack([m.lin.weight.grad for m in members])
    torch.testing.assert_close(ensemble.stacked.lin.weight.grad, expected)
    torch.testing.assert_close(ensemble.stacked.n, torch.stack([m.n for m in members]))


@pytest.mark.parametrize("execution", ["loop", "vmap"])
def test_transformers_dynamic_rope_updates_its_buffer_per_member(execution: str) -> None:
    # Llama's rotary module re-registers inv_freq in forward past
    # max_position_embeddings: the update was lost, later calls differed.
    # (Not "auto": the forward also keeps a Python counter, max_seq_len_cached,
    # which the timing runs move; guarantees.md says to pass execution= then.)
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        max_position_embeddings=16,
        use_cache=False,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    )
    torch.manual_seed(0)
    members = [transformers.LlamaModel(config).eval() for _ in range(2)]
    ensemble = lm.Ensemble(members, execution=execution).eval()
    for length in (40, 48, 40):  # growing only: a reset reads a tensor attribute (meta)
        ids = torch.randint(0, 50, (1, length))
        expected = torch.stack([m(ids, return_dict=False)[0] for m in members])
        torch.testing.assert_close(ensemble(ids, return_dict=False)[0], expected)
    name = next(k for k in ensemble.tensors() if k.endswith("inv_freq"))
    torch.testing.assert_close(ensemble.tensors()[name][0], members[0].get_buffer(name))


def test_what_vmap_cannot_batch_is_an_argument_error_naming_the_fix() -> None:
    # BatchNorm with momentum=None calls .item() in train mode: torch's own
    # RuntimeError reached the user, without the fix.
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None))

    ensemble = lm.Ensemble([build(), build()], execution="vmap")
    with pytest.raises(lm.MetaTensorError, match=r"ran torch.vmap \(forced\).*execution='loop'"):
        ensemble(torch.randn(2, 3, 8, 8))


def test_hooks_registered_for_every_module_keep_plans_that_skip_them_out() -> None:
    # A global full backward hook that zeroes grad_input ran under the loop
    # plan only: "auto" picked grouped and gave other gradients, silently.
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))

    torch.manual_seed(0)
    members = [build() for _ in range(3)]
    x = torch.randn(2, 3, 8, 8)
    handle = torch.nn.modules.module.register_module_full_backward_hook(
        lambda m, grad_input, grad_output: tuple(
            None if g is None else torch.zeros_like(g) for g in grad_input
        )
    )
    try:
        xs = [x.clone().requires_grad_() for _ in members]
        for m, xi in zip(members, xs, strict=True):
            m(xi).sum().backward()
        ensemble = lm.Ensemble(copy.deepcopy(members), execution="auto")
        xe = x.clone().requires_grad_()
        ensemble(xe).sum().backward()
        assert ensemble.plan == "loop"
        torch.testing.assert_close(xe.grad, sum(xi.grad for xi in xs))
        for execution in ("vmap", "grouped"):
            forced = lm.Ensemble(copy.deepcopy(members), execution=execution)
            with pytest.raises(lm.MetaTensorError, match="registered for every module"):
                forced(x)
    finally:
        handle.remove()


def test_backward_hooks_under_autocast_time_the_plans_left() -> None:
    # With vmap already left out for the hooks, leaving it out again for
    # autocast raised ValueError from list.remove at the first call.
    torch.manual_seed(0)
    members = [_GradientGated() for _ in range(2)]
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.stack([m(x) for m in members])
        ensemble = lm.Ensemble(members, execution="auto")
        torch.testing.assert_close(ensemble(x), expected)
    assert ensemble.plan == "loop"


def test_the_hook_check_is_not_carried_to_another_process() -> None:
    # The hook-registration counter restarts in each process (ddp_spawn
    # pickles the model): a carried answer could match a new count there.
    import pickle

    ensemble = lm.Ensemble([_Scaled() for _ in range(2)])
    ensemble(torch.randn(3, 4), scale=1.0)
    assert ensemble._backward_hooked._stamp != -1
    copied = pickle.loads(pickle.dumps(ensemble))
    assert copied._backward_hooked._stamp == -1


@dataclasses.dataclass
class _Batch:
    h: torch.Tensor


class _FromBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, batch: _Batch) -> torch.Tensor:
        return self.lin(batch.h)


def test_timing_the_plans_leaves_gradients_outside_the_ensemble_alone() -> None:
    # execution="auto" timed each plan with a backward through everything the
    # outputs reach: a tensor inside an input it could not copy (a dataclass)
    # collected every timed run's gradient on top of the real one (9x the loop's).
    torch.manual_seed(0)
    upstream = nn.Parameter(torch.randn(4))
    mods = [_FromBatch() for _ in range(3)]
    x = torch.randn(5, 4)
    torch.stack([m(_Batch(x + upstream)) for m in mods]).sum().backward()
    want = upstream.grad.clone()  # type: ignore[union-attr]
    upstream.grad = None
    ens = lm.Ensemble(mods)
    ens(_Batch(x + upstream)).sum().backward()
    assert ens.plan in {"loop", "vmap"}
    torch.testing.assert_close(upstream.grad, want)


def test_two_ensembles_of_different_structure_compiled_in_one_process_are_exact() -> None:
    # dynamo traced the loop plan's bookkeeping (which copy holds which views):
    # after one ensemble was compiled and run, the first compiled call of
    # another of another structure ran its copies on their meta tensors
    # ("Tensor device mismatch ... cpu and meta"), with every backend.
    torch.compiler.reset()

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    def cnn() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(2, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        )

    torch.manual_seed(0)
    for make, x in ((mlp, torch.randn(6, 5)), (cnn, torch.randn(4, 2, 6, 6))):
        members = [make() for _ in range(3)]
        twins = copy.deepcopy(members)
        compiled = torch.compile(lm.Ensemble(members, execution="loop"), backend="eager")
        for _ in range(2):
            out = compiled(x)
            want = torch.stack([m(x) for m in twins])
            torch.testing.assert_close(out, want, rtol=0, atol=0)
