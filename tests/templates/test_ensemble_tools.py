"""Ensemble: buffers a forward registers, tools that walk modules (apply), frozen tensors in
member(i), layers vmap cannot batch (sparse gradients) and members it cannot stack (lazy)."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import lightning_meta as lm
from support.torch_modes import deterministic_algorithms


class Scaler(nn.Module):
    """Registers a running peak of its activations on its first call (a lazily built statistic)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        peak = y.detach().abs().amax(0)
        if "peak" not in self._buffers:
            self.register_buffer("peak", peak)
        else:
            self.peak = torch.maximum(self.peak, peak)
        return y / self.peak


def scalers(n: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [Scaler() for _ in range(n)]


def inputs() -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    for scale in (4.0, 1.0, 9.0, 0.5):  # a smaller input after a larger one keeps the old peak
        yield torch.randn(5, 4, generator=g) * scale


def all_meta(ens: lm.Ensemble) -> bool:
    module = ens.template.module
    return all(t.is_meta for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("execution", ["auto", "loop"])
def test_a_buffer_the_first_forward_registers_becomes_a_stacked_buffer(execution: str) -> None:
    mods = scalers()
    ens = lm.Ensemble(copy.deepcopy(mods), execution=execution)  # type: ignore[arg-type]
    for x in inputs():
        torch.testing.assert_close(ens(x), torch.stack([m(x) for m in mods]), rtol=0, atol=0)
        assert ens.plan == "loop"
    assert sorted(ens.state_dict()) == ["stacked.fc.bias", "stacked.fc.weight", "stacked.peak"]
    assert torch.equal(ens.state_dict()["stacked.peak"], torch.stack([m.peak for m in mods]))
    assert all_meta(ens)  # the template gained a meta `peak`, nothing real
    for i, m in enumerate(mods):
        back = ens.member(i)
        assert torch.equal(back.peak, m.peak)
        assert not back.peak.is_meta
    # Checkpoints: into an ensemble that ran (as into members that did), and copies.
    other = lm.Ensemble(scalers(), execution=execution)  # type: ignore[arg-type]
    other(torch.ones(2, 4))
    other.load_state_dict(ens.state_dict())
    for copied in (other, copy.deepcopy(ens), pickle.loads(pickle.dumps(ens))):
        x = torch.randn(3, 4)
        torch.testing.assert_close(copied(x), torch.stack([copy.deepcopy(m)(x) for m in mods]))


def test_vmap_refuses_a_forward_registering_a_buffer_and_leaves_the_template_meta() -> None:
    ens = lm.Ensemble(scalers(), execution="vmap")
    with pytest.raises(lm.MetaTensorError, match=r"registered .*'peak'.*__init__") as info:
        ens(torch.randn(5, 4))
    assert info.value.paths == ("peak",) or list(info.value.paths) == ["peak"]
    assert "peak" not in ens.template.module._buffers
    assert all_meta(ens)


def test_grouped_refuses_a_forward_registering_a_buffer_and_leaves_the_template_meta() -> None:
    class ConvScaler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            if "peak" not in self._buffers:
                self.register_buffer("peak", torch.ones(2, 1, 1))
            return y * 2

    with pytest.raises(lm.MetaTensorError, match=r"cannot: the forward registers .*'peak'"):
        lm.Ensemble([ConvScaler() for _ in range(2)], execution="grouped")
    ens = lm.Ensemble([ConvScaler() for _ in range(2)])
    ens(torch.randn(3, 2, 4, 4))  # auto: the grouped trace put back, then the loop
    assert ens.plan == "loop"
    assert all_meta(ens)
    assert ens.template.module.peak.is_meta


def test_auto_with_a_registering_forward_keeps_working_after_the_first_call() -> None:
    mods = scalers()
    ens = lm.Ensemble(copy.deepcopy(mods))
    for _ in range(3):
        torch.testing.assert_close(
            ens(torch.ones(2, 4)), torch.stack([m(torch.ones(2, 4)) for m in mods])
        )
    assert ens.plan == "loop"
    assert all_meta(ens)


def test_a_forward_registering_a_parameter_is_refused_naming_the_fix() -> None:
    class Lazy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if "scale" not in self._parameters:
                self.scale = nn.Parameter(torch.ones(x.shape[-1]))
            return x * self.scale + self.offset

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("offset", torch.zeros(4))

    ens = lm.Ensemble([Lazy() for _ in range(2)], execution="loop")
    with pytest.raises(lm.MetaTensorError, match=r"registered parameter 'scale'.*Fix: register"):
        ens(torch.randn(3, 4))
    assert list(ens.state_dict()) == ["stacked.offset"]


@pytest.mark.parametrize("execution", ["auto", "vmap", "loop"])
def test_member_takes_requires_grad_from_the_stacked_tensor(execution: str) -> None:
    torch.manual_seed(0)
    ens = lm.Ensemble(
        [nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)) for _ in range(3)],
        execution=execution,  # type: ignore[arg-type]
    )
    ens.tensors()["0.weight"].requires_grad_(False)  # a layer frozen after the ensemble was built
    ens(torch.randn(2, 3)).sum().backward()
    back = ens.member(1)
    assert not back[0].weight.requires_grad
    assert back[0].bias.requires_grad and back[2].weight.requires_grad


def sparse_members() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Embedding(20, 4, sparse=True), nn.Linear(4, 1)) for _ in range(3)]


def test_vmap_refuses_sparse_gradients_when_built() -> None:
    with pytest.raises(lm.MetaTensorError, match=r"\['0'\].*sparse=True.*execution='loop'") as info:
        lm.Ensemble(sparse_members(), execution="vmap")
    assert list(info.value.paths) == ["0"]


@pytest.mark.parametrize("deterministic", [False, True])
def test_auto_runs_sparse_gradients_on_the_loop(deterministic: bool) -> None:
    mods = sparse_members()
    ens = lm.Ensemble(copy.deepcopy(mods))
    idx = torch.tensor([[1, 2, 2], [5, 1, 7]])
    with deterministic_algorithms(deterministic):
        out = ens(idx)
        out.sum().backward()
    assert ens.plan == "loop" and ens.execution == "loop"
    ref = torch.stack([m(idx) for m in mods])
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    grad = ens.stacked.get_parameter("0.weight").grad
    assert grad is not None
    for i, m in enumerate(mods):
        torch.testing.assert_close(grad[i].to_dense(), m[0].weight.grad.to_dense())


@pytest.mark.parametrize("lazy_member", [0, 1])
def test_uninitialised_lazy_members_are_refused_naming_member_and_paths(lazy_member: int) -> None:
    mods = [nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 1)) for _ in range(3)]
    for i, m in enumerate(mods):
        if i < lazy_member:
            m(torch.randn(2, 5))
    with pytest.raises(
        lm.MetaTensorError,
        match=rf"member {lazy_member} has \['0.bias', '0.weight'\] not initialised.*Fix: run one",
    ) as info:
        lm.Ensemble(mods)
    assert list(info.value.paths) == ["0.bias", "0.weight"]


def bn_members() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        for _ in range(3)
    ]


def init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight)
        nn.init.uniform_(m.bias)


@pytest.mark.parametrize("execution", ["auto", "vmap", "loop"])
def test_apply_reaches_the_members_as_on_a_module_list(execution: str) -> None:
    mods = bn_members()
    ens = lm.Ensemble(copy.deepcopy(mods), execution=execution)  # type: ignore[arg-type]
    ref = nn.ModuleList(copy.deepcopy(mods))
    x = torch.randn(4, 8)
    ens(x)
    ref_out = [m(x) for m in ref]  # the same running statistics
    torch.manual_seed(3)
    assert ens.apply(init_weights) is ens
    torch.manual_seed(3)
    ref.apply(init_weights)
    for name, stacked in ens.tensors().items():
        expected = torch.stack([m.state_dict()[name] for m in ref])
        if isinstance(stacked, nn.Parameter):  # drawn in the members' order: the same bits
            assert torch.equal(stacked, expected), name
        else:  # running statistics: what the plan computed, up to reassociation
            torch.testing.assert_close(stacked, expected)
    assert all_meta(ens) and len(ref_out) == 3


def test_apply_carries_requires_grad_and_modes_and_refuses_settings() -> None:
    mods = bn_members()
    ens = lm.Ensemble(copy.deepcopy(mods), execution="loop")
    ref = nn.ModuleList(copy.deepcopy(mods))

    def freeze_bn(m: nn.Module) -> None:
        if isinstance(m, nn.BatchNorm1d):
            m.eval()
            m.requires_grad_(False)

    ens.apply(freeze_bn)
    ref.apply(freeze_bn)
    assert not ens.stacked.get_parameter("1.weight").requires_grad
    assert ens.stacked.get_parameter("0.weight").requires_grad
    x = torch.randn(4, 8)
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in ref]), rtol=0, atol=0)
    assert torch.equal(
        ens.tensors()["1.running_mean"], torch.stack([m[1].running_mean for m in ref])
    )
    assert not ens.member(0)[1].training and not ens.member(0)[1].weight.requires_grad

    # A plain setting, alike in every member, is carried to the template, which every
    # plan follows (refused before 2026-12-07, naming it).
    def slow_bn(m: nn.Module) -> None:
        init_weights(m)
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = 0.5

    torch.manual_seed(5)
    ens.apply(slow_bn)
    torch.manual_seed(5)
    ref.apply(slow_bn)
    assert ens.template.module[1].momentum == 0.5 and ens.member(2)[1].momentum == 0.5
    ens.train()
    ref.train()
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in ref]), rtol=0, atol=0)
    assert torch.equal(
        ens.tensors()["1.running_mean"], torch.stack([m[1].running_mean for m in ref])
    )

    before = {k: v.clone() for k, v in ens.state_dict().items()}

    def swap_activation(m: nn.Module) -> None:
        init_weights(m)
        if isinstance(m, nn.BatchNorm1d):
            m.register_forward_hook(lambda mod, args, out: out * 2)

    with pytest.raises(lm.MetaTensorError, match=r"changed \['1.<hooks>'\].*left as it was"):
        ens.apply(swap_activation)
    for k, v in ens.state_dict().items():
        assert torch.equal(v, before[k]), k

    calls = iter(range(100))

    def uneven(m: nn.Module) -> None:
        if isinstance(m, nn.BatchNorm1d):
            m.eps = 1e-5 * (1 + next(calls))

    with pytest.raises(lm.MetaTensorError, match=r"settings \['1.eps'\] differently") as info:
        ens.apply(uneven)
    assert list(info.value.paths) == ["1.eps"]
    assert ens.template.module[1].eps == 1e-5


def test_update_bn_member_by_member_gives_the_members_statistics() -> None:
    """The documented way to recompute BatchNorm statistics (update_bn finds none in an
    ensemble: its BatchNorms live in the meta template)."""
    from torch.optim.swa_utils import update_bn

    mods = bn_members()
    ens = lm.Ensemble(copy.deepcopy(mods), execution="loop")
    batches = [torch.randn(6, 8) for _ in range(3)]
    update_bn(batches, ens)  # finds no BatchNorm: changes nothing
    assert torch.equal(ens.tensors()["1.running_mean"], torch.zeros(3, 8))
    for i in range(len(ens)):
        member = ens.member(i)
        update_bn(batches, member)
        with torch.no_grad():
            for name, b in member.named_buffers():
                ens.tensors()[name][i].copy_(b)
    for m in mods:
        update_bn(batches, m)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        expected = torch.stack([m.get_buffer(name) for m in mods])
        assert torch.equal(ens.tensors()[name], expected), name


class _OnSharedEmbedding(nn.Module):
    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.emb = emb
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x))


def _shared_frozen() -> list[nn.Module]:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    emb.weight.requires_grad_(False)  # frozen and shared: accepted, stacked per member
    return [_OnSharedEmbedding(emb) for _ in range(3)]


def test_apply_on_a_frozen_tensor_the_members_shared_writes_it_member_after_member() -> None:
    # Each member's copy got its own draw: on the members, the one shared
    # tensor is written member after member and all end with the last write.
    def draw(mod: nn.Module) -> None:
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight)

    def double(mod: nn.Module) -> None:  # reads what the previous member wrote
        if isinstance(mod, nn.Embedding):
            with torch.no_grad():
                mod.weight.mul_(2)

    x = torch.tensor([[1, 2]])
    for fn in (draw, double):
        ref, ens = nn.ModuleList(_shared_frozen()), lm.Ensemble(_shared_frozen(), execution="loop")
        torch.manual_seed(1)
        ref.apply(fn)
        after = torch.get_rng_state()
        torch.manual_seed(1)
        ens.apply(fn)
        assert torch.equal(torch.get_rng_state(), after)
        with torch.no_grad():
            torch.testing.assert_close(ens(x), torch.stack([m(x) for m in ref]), rtol=0, atol=0)
        for i in range(3):
            assert torch.equal(ens.member(i).emb.weight, ref[i].emb.weight)
