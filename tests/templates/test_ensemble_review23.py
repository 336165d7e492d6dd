"""Ensembles of vision models written by others (hostile review, eighth session,
2026-12-08; torchvision and timm run in the torchvision/timm venv:
``bash scripts/compat-vision.sh``).

The review ran torchvision's and timm's classifiers through every plan and a Trainer and
found them exact, except where members checkpoint activations by a flag of their own and
only when their activations require gradients (torchvision's DenseNet with
``memory_efficient=True``, timm's ``set_grad_checkpointing()``): under ``torch.vmap`` the
activations read ``requires_grad=False``, so ``"auto"`` ran vmap without the
recomputation the loop runs, BatchNorm's statistics advanced once where the loop advances
them twice (0.06 off in eval after one training call), and a forced vmap failed in
backward with functorch's raw error. A ResNet trunk on a ``channels_last`` input came back
from vmap contiguous where the loop's output is ``channels_last`` (noise drawn on it 0.57
off), and two copies of one ``torch.fx`` GraphModule were refused as another architecture.
Each test failed on 15fb339, the tree before it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import lightning_meta as lm


def test_torchvision_densenet_memory_efficient_runs_as_the_loop() -> None:
    models = pytest.importorskip("torchvision.models", reason="torchvision venv")
    torch.manual_seed(0)

    def make() -> nn.Module:
        return models.DenseNet(
            growth_rate=8,
            block_config=(2, 2),
            num_init_features=16,
            num_classes=5,
            memory_efficient=True,
        )

    members = [make() for _ in range(2)]
    ref = copy.deepcopy(members)
    ens = lm.Ensemble(copy.deepcopy(members))  # "auto"
    x = torch.randn(4, 3, 32, 32)
    out = ens(x)
    loop = torch.stack([m(x) for m in ref])
    out.pow(2).sum().backward()
    loop.pow(2).sum().backward()
    assert ens.plan == "loop"  # vmap skipped the recomputation
    assert torch.equal(out, loop)
    tensors = ens.tensors()
    for k, _ in members[0].named_buffers():
        assert torch.equal(tensors[k], torch.stack([dict(m.named_buffers())[k] for m in ref])), k
    with pytest.raises(lm.ArgumentValueError, match=r"memory_efficient=False"):
        lm.Ensemble(copy.deepcopy(members), execution="vmap")(x)


def test_timm_set_grad_checkpointing_is_refused_by_vmap_and_run_by_auto() -> None:
    timm = pytest.importorskip("timm", reason="timm is tested in the torchvision/timm venv")
    torch.manual_seed(0)
    members = []
    for _ in range(2):
        m = timm.create_model("resnet10t", num_classes=5)
        m.set_grad_checkpointing()
        members.append(m)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(lm.ArgumentValueError, match=r"set_grad_checkpointing\(False\)"):
        lm.Ensemble(copy.deepcopy(members), execution="vmap")(x)  # functorch's raw error before
    ref = copy.deepcopy(members)
    ens = lm.Ensemble(copy.deepcopy(members))
    out = ens(x)
    out.sum().backward()
    loop = torch.stack([m(x) for m in ref])
    loop.sum().backward()
    assert torch.equal(out, loop)
    assert ens.plan == "loop"


def test_a_channels_last_resnet_trunk_is_laid_out_as_the_loop() -> None:
    models = pytest.importorskip("torchvision.models", reason="torchvision venv")
    torch.manual_seed(0)
    members = [nn.Sequential(*list(models.resnet18().children())[:-2]) for _ in range(2)]
    ref = copy.deepcopy(members)
    ens = lm.Ensemble(copy.deepcopy(members))
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    out = ens(x)
    loop = torch.stack([m(x) for m in ref])
    assert out.stride() == loop.stride()
    torch.manual_seed(1)
    noisy = out + torch.randn_like(out)
    torch.manual_seed(1)
    assert torch.equal(noisy, loop + torch.randn_like(loop))


def test_auto_runs_the_loop_for_channels_last_inputs() -> None:
    # torch alone: the plan "auto" picks for a channels_last input of conv members
    torch.manual_seed(0)
    members = [
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
        for _ in range(2)
    ]
    ref = copy.deepcopy(members)
    ens = lm.Ensemble(copy.deepcopy(members))
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    out = ens(x)
    loop = torch.stack([m(x) for m in ref])
    assert ens.plan == "loop"
    assert torch.equal(out, loop) and out.stride() == loop.stride()


def _traced() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))


def test_copies_of_one_fx_graph_module_form_an_ensemble() -> None:
    # torch.fx gives each GraphModule a class of its own; copies were refused as
    # "defined anew, with other code or values", with a fix already met
    torch.manual_seed(0)
    first = _traced()
    members = [first, copy.deepcopy(first), _traced()]
    ref = copy.deepcopy(members)
    x = torch.randn(5, 4)
    for execution in ("loop", "vmap"):
        ens = lm.Ensemble(copy.deepcopy(members), execution=execution)
        torch.testing.assert_close(ens(x), torch.stack([m(x) for m in ref]), rtol=0, atol=1e-6)
    assert torch.equal(
        lm.Ensemble(copy.deepcopy(members), execution="loop").member(2)(x), ref[2](x)
    )
    other = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    with pytest.raises(lm.MetaTensorError, match=r"member 1 has a Tanh at '1'"):
        lm.Ensemble([first, other])


def test_traced_graphs_that_compute_otherwise_are_refused() -> None:
    # control (passes on 15fb339): the same modules, another graph, stays refused
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.lin(x) * 2
            return out

    class Thrice(Twice):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.lin(x) * 3
            return out

    with pytest.raises(lm.MetaTensorError, match=r"same architecture"):
        lm.Ensemble([torch.fx.symbolic_trace(Twice()), torch.fx.symbolic_trace(Thrice())])


def _scaled(k: float) -> torch.fx.GraphModule:
    """A traced Linear whose graph then calls a function made per graph (x * k)."""

    def scale(x: torch.Tensor) -> torch.Tensor:
        return x * k

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    for node in gm.graph.nodes:
        if node.op == "output":
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(scale, (node.args[0],))
            node.args = (new,)
    gm.recompile()
    return gm


def test_graph_modules_calling_other_functions_under_one_name_are_refused() -> None:
    """A second look at the GraphModule fix: the generated code names the function the
    same in both (``scale``), its globals bind other ones; accepted, every plan was 1.36
    off the loop."""
    a, b = _scaled(2.0), _scaled(3.0)
    b.load_state_dict(a.state_dict())
    assert a.code == b.code
    with pytest.raises(lm.MetaTensorError, match=r"same architecture"):
        lm.Ensemble([a, b])
    one, two = _scaled(2.0), _scaled(2.0)
    x = torch.randn(3, 4)
    expected = torch.stack([one(x), two(x)])
    ens = lm.Ensemble([one, two], execution="loop")
    assert torch.equal(ens(x), expected)


def test_a_channels_last_call_after_a_contiguous_one_is_planned_apart() -> None:
    """A second look: the plan cache's key ignored the layout (a channels_last call reused
    the grouped plan timed on a contiguous one), and one channel in channels_last reads as
    contiguous (its strides tell)."""
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)) for _ in range(2)]
    ref = copy.deepcopy(members)
    x = torch.randn(4, 1, 16, 16)
    last = x.to(memory_format=torch.channels_last)
    assert last.is_contiguous()  # torch's answer for one channel
    ens = lm.Ensemble(copy.deepcopy(members)).eval()
    with torch.no_grad():
        ens(x)
        out = ens(last)
        loop = torch.stack([m(last) for m in ref])
    assert ens.plan == "loop"
    assert out.stride() == loop.stride() and torch.equal(out, loop)


def test_a_frozen_memory_efficient_densenet_is_not_refused_and_eval_mode_is() -> None:
    """A second look: a DenseNet layer checkpoints where its inputs require gradients (not
    with every tensor frozen, refused by the first version), in either mode (its eval mode
    was let through to torch's device error in backward), and timm's in either mode too."""
    models = pytest.importorskip("torchvision.models", reason="torchvision venv")
    torch.manual_seed(0)
    net = models.DenseNet(
        growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=3,
        memory_efficient=True,
    )  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    template = lm.MetaTemplate(net)
    frozen = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.testing.assert_close(template(frozen, x), net(x), rtol=0, atol=0)
    trained = {
        k: v.detach().clone().requires_grad_(v.is_floating_point())
        for k, v in net.named_parameters()
    }
    trained.update({k: v.clone() for k, v in net.named_buffers()})
    template.module.eval()
    with pytest.raises(lm.MetaTensorError, match=r"memory_efficient=False"):
        template(trained, x)


def test_the_template_refusal_names_timms_switch() -> None:
    timm = pytest.importorskip("timm", reason="timm is tested in the torchvision/timm venv")
    net = timm.create_model("resnet10t", num_classes=3)
    net.set_grad_checkpointing(True)
    state = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    state.update({k: v.clone() for k, v in net.named_buffers()})
    template = lm.MetaTemplate(net)
    with pytest.raises(lm.MetaTensorError, match=r"set_grad_checkpointing\(False\)"):
        template(state, torch.randn(2, 3, 32, 32))
    net.set_grad_checkpointing(False)  # the fix, followed
    plain = lm.MetaTemplate(net)
    torch.testing.assert_close(plain(state, torch.randn(2, 3, 32, 32)).shape, (2, 3))


class _Scaler:
    def __init__(self, k: float) -> None:
        self.k = k

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


class _ScaleFn:
    __name__ = "scalefn"

    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


def _calling(target: Any) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    for node in gm.graph.nodes:
        if node.op == "output":
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(target, (node.args[0],))
            node.args = (new,)
    gm.recompile()
    return gm


@pytest.mark.parametrize("make", [lambda k: _Scaler(k).apply, _ScaleFn], ids=["method", "object"])
def test_graphs_calling_bound_methods_or_objects_of_other_state_are_refused(make: Any) -> None:
    """A third look: a bound method or a callable object in a graph's globals was compared
    by type alone (accepted, 0.91 off a loop)."""
    a, b = _calling(make(2.0)), _calling(make(3.0))
    assert a.code == b.code
    with pytest.raises(lm.MetaTensorError, match=r"same architecture"):
        lm.Ensemble([a, b])
    one, two = _calling(make(2.0)), _calling(make(2.0))
    x = torch.randn(3, 4)
    expected = torch.stack([one(x), two(x)])
    assert torch.equal(lm.Ensemble([one, two], execution="loop")(x), expected)


def test_checkpointing_members_that_change_nothing_under_vmap_still_run_it() -> None:
    """A third look: a DenseNet in eval mode (BatchNorm's statistics not advanced, so the
    loop's recomputation changes nothing) and timm's with nothing to differentiate ran
    under a forced vmap as the loop before, and were refused by the second version."""
    models = pytest.importorskip("torchvision.models", reason="torchvision venv")
    timm = pytest.importorskip("timm", reason="timm is tested in the torchvision/timm venv")
    torch.manual_seed(0)
    dense = [
        models.DenseNet(
            growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=3,
            memory_efficient=True,
        ).eval()
        for _ in range(2)
    ]  # fmt: skip
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    ref = copy.deepcopy(dense)
    loop = torch.stack([m(x) for m in ref])
    out = lm.Ensemble(copy.deepcopy(dense), execution="vmap").eval()(x)
    torch.testing.assert_close(out, loop, rtol=0, atol=1e-6)
    vit = []
    for _ in range(2):
        m = timm.create_model(
            "vit_tiny_patch16_224", img_size=32, depth=1, embed_dim=16, num_heads=2, num_classes=3
        ).eval()
        m.set_grad_checkpointing(True)
        m.requires_grad_(False)
        vit.append(m)
    frozen = torch.randn(2, 3, 32, 32)
    expected = torch.stack([m(frozen) for m in copy.deepcopy(vit)])
    got = lm.Ensemble(copy.deepcopy(vit), execution="vmap").eval()(frozen)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
