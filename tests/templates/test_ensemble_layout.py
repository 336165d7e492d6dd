"""Members laid out in memory other than contiguously (``channels_last`` convolutions, a
weight stored transposed): the stacked tensors keep each member's layout.

Before, every stacked tensor was contiguous. The loop plan then ran a ``channels_last``
member's convolution on a contiguous slice of its weight, so the convolution's output
was contiguous where the member's own is ``channels_last``, and a dropout after it
dropped other elements than the member's with the same seed: the ensemble trained
other numbers than its members, without an error (1.41 off in the first test here).
"""

from __future__ import annotations

import copy
import pickle

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm
from support.ensembles import MembersModule, rank_first


def _conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(8, 4, 3, padding=1)
    )


def _channels_last_members(n: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [_conv().to(memory_format=torch.channels_last) for _ in range(n)]


@pytest.mark.parametrize("execution", ["auto", "loop"])
def test_channels_last_members_train_as_their_own_loop(execution: str) -> None:
    members = _channels_last_members()
    ens = lm.Ensemble(copy.deepcopy(members), execution=execution)  # type: ignore[arg-type]
    x = torch.randn(4, 3, 8, 8)  # contiguous: the members' weights make the outputs channels_last
    for seed in range(3):  # "auto" times its plans on the first call
        ens.zero_grad()
        for m in members:
            m.zero_grad()
        torch.manual_seed(seed)
        out = ens(x)
        out.square().sum().backward()
        after = torch.get_rng_state()
        torch.manual_seed(seed)
        ref = torch.stack([m(x) for m in members])
        ref.square().sum().backward()
        assert torch.equal(torch.get_rng_state(), after)
        assert torch.equal(out, ref), (seed, (out - ref).abs().max().item())
        for name, stacked in ens.tensors().items():
            for i, m in enumerate(members):
                assert stacked.grad is not None
                assert torch.equal(stacked.grad[i], m.get_parameter(name).grad), (seed, name, i)


def test_the_stacked_slices_and_members_keep_the_members_layout() -> None:
    members = _channels_last_members()
    ens = lm.Ensemble(members)
    for name, stacked in ens.tensors().items():
        for i, m in enumerate(members):
            want = m.get_parameter(name)
            assert stacked[i].stride() == want.stride(), name
            assert torch.equal(stacked[i], want), name
    for i, m in enumerate(members):
        mine = ens.member(i)
        for (name, want), (_, got) in zip(
            m.state_dict().items(), mine.state_dict().items(), strict=True
        ):
            assert got.stride() == want.stride() and torch.equal(got, want), name
    # A checkpoint round trip into a fresh ensemble of the same members.
    again = lm.Ensemble(_channels_last_members())
    again.load_state_dict(ens.state_dict())
    for name, stacked in again.tensors().items():
        assert stacked.stride() == ens.tensors()[name].stride(), name
        assert torch.equal(stacked, ens.tensors()[name]), name


def test_a_weight_stored_transposed_is_stacked_transposed() -> None:
    torch.manual_seed(0)
    members = []
    for _ in range(3):
        lin = nn.Linear(8, 4)
        lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t())  # column-major
        members.append(lin)
    ens = lm.Ensemble(members, execution="loop")
    assert ens.tensors()["weight"][1].stride() == members[1].weight.stride() == (1, 4)
    x = torch.randn(5, 8)
    assert torch.equal(ens(x), torch.stack([m(x) for m in members]))


@pytest.mark.parametrize("first_channels_last", [True, False])
def test_members_laid_out_differently_are_refused(first_channels_last: bool) -> None:
    torch.manual_seed(0)
    members = [_conv() for _ in range(2)]
    members[0 if first_channels_last else 1].to(memory_format=torch.channels_last)
    with pytest.raises(lm.MetaTensorError, match="channels_last") as info:
        lm.Ensemble(members)
    assert "'0.weight' is laid out" in str(info.value)
    assert "'3.weight' is laid out" in str(info.value)
    assert info.value.paths == ("0.weight", "3.weight")


def _fit(ensemble: bool) -> list[torch.Tensor]:
    L.seed_everything(0, verbose=False)
    model = MembersModule(_channels_last_members(), "auto" if ensemble else None)
    data = TensorDataset(torch.randn(16, 3, 8, 8))
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=4))
    net = model.net
    if isinstance(net, lm.Ensemble):
        return [t for m in (net.member(i) for i in range(3)) for t in m.state_dict().values()]
    return [t for m in net for t in m.state_dict().values()]


def test_a_trainer_run_of_channels_last_members_trains_their_loops_weights() -> None:
    loop, ensemble = _fit(False), _fit(True)
    assert len(loop) == len(ensemble)
    for want, got in zip(loop, ensemble, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------- settings set on the template after its first call
def _dropout_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.01), nn.Dropout(0.5), nn.Linear(8, 2))


@pytest.mark.parametrize("execution", ["auto", "loop"])
def test_a_dropout_rate_set_on_the_template_later_reaches_the_loop(
    execution: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, the loop's member copies kept the p they were made with, where the
    # batched plans (which call the template) saw the new one: 0.73 apart, no error.
    rank_first(monkeypatch, "loop")  # "auto" runs the loop whatever the machine's load
    torch.manual_seed(0)
    members = [_dropout_mlp() for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members), execution=execution)  # type: ignore[arg-type]
    x = torch.randn(5, 4)
    ens(x)
    ens(x)
    assert ens.plan == "loop"
    for module in (ens.template.module, *members):
        module[2].p = 0.2
        module[1].negative_slope = 0.3
    for seed in range(2):
        torch.manual_seed(seed)
        out = ens(x)
        torch.manual_seed(seed)
        ref = torch.stack([m(x) for m in members])
        assert torch.equal(out, ref), seed


class _Remembers(nn.Module):
    """Keeps a number of its own member's weights in a plain attribute at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.0)
        self.norm = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.norm = float(self.lin.weight.detach().norm())
        return self.drop(self.lin(x))


def test_a_setting_followed_from_the_template_leaves_each_members_own_state() -> None:
    torch.manual_seed(0)
    members = [_Remembers() for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members), execution="loop")
    x = torch.randn(5, 4)
    ens(x)
    ens.template.module.drop.p = 0.5
    ens(x)
    for i, m in enumerate(members):
        m(x)
        got = ens.member(i)
        assert isinstance(got, _Remembers)
        assert got.norm == m.norm  # the member's own, not the template's 0.0
        assert got.drop.p == 0.5


@pytest.mark.parametrize("execution", ["auto", "loop", "vmap", "grouped"])
def test_a_momentum_set_on_the_template_later_reaches_every_plan(execution: str) -> None:
    # What Ensemble.apply's refusal of a changed setting now names as the fix.
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)) for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members), execution=execution)  # type: ignore[arg-type]
    x = torch.randn(8, 4)
    ens(x)
    for m in members:
        m(x)
    for module in (ens.template.module, *members):
        module[1].momentum = 0.5
    out = ens(x)
    ref = torch.stack([m(x) for m in members])
    torch.testing.assert_close(out, ref)
    for name in ("1.running_mean", "1.running_var"):
        want = torch.stack([m.get_buffer(name) for m in members])
        torch.testing.assert_close(ens.tensors()[name], want, msg=name)


# ------------------------------------------ found by the review of the two changes above
@pytest.mark.parametrize("then", ["hook", "deepcopy", "pickle", "member"])
def test_a_setting_set_on_the_template_survives_new_copies(then: str) -> None:
    # The copies made again (a hook added, a copied or unpickled ensemble) got the old
    # copies' state carried over, p=0.5 included, where the template had 0.1; member(i)
    # copied the copies' state without following the template first.
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)) for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members), execution="loop")
    x = torch.randn(5, 4)
    ens(x)
    for module in (ens.template.module, *members):
        module[1].p = 0.1
    if then == "member":
        assert all(ens.member(i)[1].p == 0.1 for i in range(3))
        return
    if then == "hook":
        ens.template.module[2].register_forward_hook(lambda mod, args, out: out)
    elif then == "deepcopy":
        ens = copy.deepcopy(ens)
    else:
        ens = pickle.loads(pickle.dumps(ens))
    torch.manual_seed(1)
    out = ens(x)
    torch.manual_seed(1)
    assert torch.equal(out, torch.stack([m(x) for m in members]))


def test_members_differing_only_in_the_strides_of_size_1_dims_are_refused() -> None:
    # A 1x1 convolution's weight (8, 3, 1, 1) made channels_last differs from a
    # contiguous one only in the strides of its size-1 dims, which torch reads to pick
    # the convolution's output format: the member's output is channels_last. Before,
    # the comparison left those strides out and accepted it; the loop then ran it on
    # member 0's layout and its dropout dropped other elements (1.6 off).
    def net() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 1), nn.Dropout(0.5), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        )

    torch.manual_seed(0)
    members = [net(), net().to(memory_format=torch.channels_last), net()]
    with pytest.raises(lm.MetaTensorError, match=r"'0.weight' is laid out channels_last"):
        lm.Ensemble(members)
    same = [net().to(memory_format=torch.channels_last) for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(same), execution="loop")
    x = torch.randn(2, 3, 5, 5)
    torch.manual_seed(0)
    out = ens(x)
    torch.manual_seed(0)
    assert torch.equal(out, torch.stack([m(x) for m in same]))


def test_a_weight_stored_transposed_in_one_member_is_refused_naming_the_strides() -> None:
    torch.manual_seed(0)
    members = [nn.Linear(64, 8) for _ in range(2)]
    members[1].weight = nn.Parameter(members[1].weight.detach().t().contiguous().t())
    with pytest.raises(lm.MetaTensorError, match=r"with strides \(1, 8\).*\.contiguous\(\)"):
        lm.Ensemble(members)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.LeakyReLU(0.01)
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)) * self.scale


@pytest.mark.parametrize("execution", ["grouped", "auto", "loop", "vmap"])
def test_a_forwards_own_setting_set_on_the_template_later_reaches_every_plan(
    execution: str,
) -> None:
    # The grouped plan traced the forward once, with self.scale as a constant of the
    # graph: 3.73 off after scale went from 1 to 3.
    torch.manual_seed(0)
    members = [_Scaled().eval() for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members), execution=execution).eval()  # type: ignore[arg-type]
    x = torch.randn(2, 3, 6, 6)
    ens(x)
    ens(x)
    for module in (ens.template.module, *members):
        module.scale = 3.0
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))


def test_a_submodule_added_to_the_template_later_leaves_the_settings_followed() -> None:
    # Before, the copies looked a setting up by the index of a fresh walk of the
    # template's modules, shifted by the new one: AttributeError, or the wrong module.
    def net() -> nn.Module:
        return nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), nn.Dropout(0.5))

    torch.manual_seed(0)
    members = [net() for _ in range(2)]
    ens = lm.Ensemble(copy.deepcopy(members), execution="loop")
    x = torch.randn(3, 4)
    ens(x)
    # On a module whose forward does not reach it (not a container, which would run it:
    # that is refused, tests/templates/test_ensemble_review16.py).
    ens.template.module[0][0].add_module("extra", nn.Identity())
    for module in (ens.template.module, *members):
        module[1].p = 0.0
    torch.manual_seed(1)
    out = ens(x)
    torch.manual_seed(1)
    assert torch.equal(out, torch.stack([m(x) for m in members]))


class _Listed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scales = [1.0, 1.0]
        self.options = {"shift": 0.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * self.scales[0] + y.relu() * self.scales[1] + self.options["shift"]


@pytest.mark.parametrize("execution", ["grouped", "auto", "loop", "vmap"])
@pytest.mark.parametrize("edit", ["list", "dict", "both"])
def test_a_list_or_dict_setting_changed_in_place_on_the_template_reaches_every_plan(
    execution: str, edit: str
) -> None:
    # The watch kept the very list and dict the template holds, so a change in place
    # compared equal to itself: the loop's copies kept [1.0, 1.0] and the grouped
    # plan its traced constants, while vmap read the new values (2.0 to 5.9 apart here).
    torch.manual_seed(0)
    members = [_Listed().eval() for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members), execution=execution).eval()  # type: ignore[arg-type]
    x = torch.randn(2, 3, 6, 6)
    ens(x)
    ens(x)
    for module in (ens.template.module, *members):
        if edit in ("list", "both"):
            module.scales[1] = 3.0
        if edit in ("dict", "both"):
            module.options["shift"] = 2.0
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))
    # And the change after that, on the copies the first change reached.
    for module in (ens.template.module, *members):
        module.scales.append(0.0)
        module.scales[0] = -1.0
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))


def test_apply_carries_a_list_setting_changed_in_place() -> None:
    # apply compared each member's settings before and after fn by reference: a list
    # fn changed in place was the same object, so nothing was carried to the template
    # and the ensemble kept computing with [1.0, 1.0], without an error.
    torch.manual_seed(0)
    members = [_Listed().eval() for _ in range(3)]
    ens = lm.Ensemble(copy.deepcopy(members), execution="loop").eval()  # type: ignore[arg-type]
    ref = nn.ModuleList(members)
    x = torch.randn(2, 3, 6, 6)
    ens(x)

    def rescale(m: nn.Module) -> None:
        if isinstance(m, _Listed):
            m.scales[1] = 3.0
            m.options["shift"] = 2.0

    ens.apply(rescale)
    ref.apply(rescale)
    assert ens.template.module.scales == [1.0, 3.0]
    assert ens.member(1).options == {"shift": 2.0}
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in ref]))

    def uneven(m: nn.Module) -> None:
        if isinstance(m, _Listed):
            m.scales.append(len(m.scales) + float(torch.rand(())))

    with pytest.raises(lm.MetaTensorError, match=r"settings \['scales'\] differently"):
        ens.apply(uneven)
