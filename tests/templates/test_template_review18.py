"""The review of 2026-12-07 (third session, second round): templates and ensembles over
other people's hook code (accelerate's ``add_hook_to_module``), and litgpt's rotary cache
made again after the template.

- accelerate keeps its hook object in ``module._hf_hook`` and sets ``module.forward`` to a
  partial reading it. The template copied the hook: a setting changed on ``net``'s hook
  after the template was made did not reach ``template(state_from(net), x)`` (0.11 off);
  a hook added to or removed from ``net`` since ran the template's forward (0.15 off).
- An ensemble of members whose accelerate hooks differ ran member 0's for every member
  (0.37 off a loop over the members), where torch's hook objects are compared; and for
  MLP members with the same hooks, ``"auto"`` picked the fused plan, which computes the
  layers without calling them: the hooks did not run (0.30 off).
- ``net.max_seq_length = 16`` (litgpt's way to shrink its rotary cache) after the
  template: the refusal's fix, ``functional_call(..., strict=False)``, did not apply.

A review of these fixes found: a forward swapped for a partial of the same function with
another argument (compared by code alone: 0.15 off); members refused whose accelerate hooks
differ only in bookkeeping keyed by each member's memory; and, there before, a GPT-2
dispatched with its tied head offloaded to disk, whose template calls were 0.6 to 3e36 off
net(x): such a model is refused now.

Every test but the loop's control and the bookkeeping one (which ran before the first fix
and guards it) failed on the tree before (36ed662).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import MetaTensorError

accelerate_hooks = pytest.importorskip("accelerate.hooks")


class _Scale(accelerate_hooks.ModelHook):  # type: ignore[misc, name-defined]
    def __init__(self, s: float) -> None:
        self.s = s

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return tuple(a * self.s for a in args), kwargs


def _net(hook: float | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    if hook is not None:
        accelerate_hooks.add_hook_to_module(net[0], _Scale(hook))
    return net


X = torch.randn(5, 4)


def test_the_hooks_object_is_the_users_so_a_setting_changed_on_net_is_followed() -> None:
    net = _net(2.0)
    template = lm.MetaTemplate(net)
    assert torch.equal(template(template.state_from(net), X), net(X))
    net[0]._hf_hook.s = 3.0
    assert torch.equal(template(template.state_from(net), X), net(X))


def test_a_hook_added_to_net_after_the_template_is_refused() -> None:
    net = _net()
    template = lm.MetaTemplate(net)
    accelerate_hooks.add_hook_to_module(net[0], _Scale(2.0))
    with pytest.raises(MetaTensorError, match=r"'0' has a forward set on the instance"):
        template(template.state_from(net), X)


def test_a_hook_removed_from_net_after_the_template_is_refused() -> None:
    net = _net(2.0)
    template = lm.MetaTemplate(net)
    accelerate_hooks.remove_hook_from_module(net[0])
    with pytest.raises(MetaTensorError, match=r"'0' has another forward set on the instance"):
        template(template.state_from(net), X)


def test_members_with_other_accelerate_hooks_are_refused() -> None:
    a, b = _net(1.0), _net(5.0)
    with pytest.raises(MetaTensorError, match=r"member 1 has an accelerate hook \['_Scale'\]"):
        lm.Ensemble([a, b])


def test_a_hooked_member_beside_one_without_is_refused() -> None:
    with pytest.raises(MetaTensorError, match=r"member 1 has a forward set on the instance \[\]"):
        lm.Ensemble([_net(2.0), _net()])


@pytest.mark.parametrize("execution", ["auto", "loop"])
def test_members_with_the_same_accelerate_hooks_run_as_a_loop(execution: str) -> None:
    members = [_net(2.0), _net(2.0)]
    with torch.no_grad():
        members[1][2].weight.mul_(0.5)
    expected = torch.stack([m(X) for m in members])
    ensemble = lm.Ensemble([copy.deepcopy(m) for m in members], execution=execution)
    assert torch.allclose(ensemble(X), expected, atol=1e-6)


def test_a_rotary_cache_made_again_names_the_change_not_strict_false() -> None:
    litgpt = pytest.importorskip("litgpt")
    torch.manual_seed(0)
    config = litgpt.Config(
        block_size=32, vocab_size=100, padded_vocab_size=100, n_layer=1, n_head=4, n_embd=32
    )
    net = litgpt.GPT(config)
    template = lm.MetaTemplate(net)
    net.max_seq_length = 16
    with pytest.raises(MetaTensorError, match=r"'cos' has shape \(16, \d+\)") as err:
        template(template.state_from(net), torch.randint(0, 100, (2, 7)))
    assert "strict=False" not in str(err.value)
    assert "make the template again" in str(err.value)


def test_a_forward_swapped_for_another_partial_after_the_template_is_refused() -> None:
    # Same code, another argument: a comparison by code alone let it through (0.15 off).
    def scaled(module: nn.Linear, scale: float, x: torch.Tensor) -> torch.Tensor:
        return nn.Linear.forward(module, x * scale)

    net = _net()
    net[0].forward = functools.partial(scaled, net[0], 2.0)
    template = lm.MetaTemplate(net)
    assert torch.equal(template(template.state_from(net), X), net(X))
    net[0].forward = functools.partial(scaled, net[0], 3.0)
    with pytest.raises(MetaTensorError, match=r"'0' has another forward set on the instance"):
        template(template.state_from(net), X)


@pytest.mark.parametrize("execution", ["auto", "loop"])
def test_members_whose_accelerate_hooks_differ_only_in_tied_weight_bookkeeping_run(
    execution: str,
) -> None:
    # AlignDevicesHook keys tied weights by data_ptr(), which every member has its own of:
    # a first version of the comparison refused such members, which ran exactly before.
    def member(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
        hook = accelerate_hooks.AlignDevicesHook(
            execution_device="cpu",
            io_same_device=True,
            tied_params_map={net[0].weight.data_ptr(): {}},
        )
        accelerate_hooks.add_hook_to_module(net[0], hook)
        return net

    members = [member(0), member(1)]
    expected = torch.stack([m(X) for m in members])
    ensemble = lm.Ensemble(members, execution=execution)
    assert torch.allclose(ensemble(X), expected, atol=1e-6)


def _dispatched_gpt2(tmp_path: Any, device_map: dict[str, str]) -> nn.Module:
    """A tiny GPT-2 (its head tied to its embedding) dispatched by accelerate."""
    transformers = pytest.importorskip("transformers")
    from accelerate import dispatch_model

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=2, use_cache=False
    )
    net = transformers.GPT2LMHeadModel(config).eval()
    dispatch_model(net, device_map=device_map, offload_dir=str(tmp_path))
    return net


def test_a_model_whose_tied_head_accelerate_offloads_is_refused(tmp_path: Any) -> None:
    # GPT-2 dispatched with its tied lm_head on disk: template calls were 0.6 to 3e36 off
    # net(x), without an error (accelerate shares tied weights by memory address).
    net = _dispatched_gpt2(tmp_path, {"transformer": "cpu", "lm_head": "disk"})
    with pytest.raises(lm.ArgumentValueError, match=r"offloads the tied weights lm_head.weight"):
        lm.MetaTemplate(net)


def test_a_model_whose_tied_weights_are_offloaded_on_both_ends_runs(tmp_path: Any) -> None:
    # Guard: a first version of the refusal above refused any offloaded tie; this ran
    # exactly before it.
    net = _dispatched_gpt2(tmp_path, {"transformer": "disk", "lm_head": "disk"})
    template = lm.MetaTemplate(net)
    ids = torch.randint(0, 100, (2, 7))
    for _ in range(2):
        assert torch.equal(template(template.state_from(net), ids).logits, net(ids).logits)


class _Wrap:
    def __init__(self, module: nn.Linear, scale: float) -> None:
        self.module, self.scale = module, scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Linear.forward(self.module, x * self.scale)


def _counted(module: nn.Linear, calls: list[int], x: torch.Tensor) -> torch.Tensor:
    calls.append(1)
    return nn.Linear.forward(module, x)


@pytest.mark.parametrize("kind", ["callable object", "partial over a list it appends to"])
def test_a_forward_the_template_holds_a_copy_of_runs(kind: str) -> None:
    # Guard: a first version compared what the forward holds by value, and the template's
    # copy (of a callable object; of a list the forward appends to) never equals net's.
    net = _net()
    if kind == "callable object":
        net[0].forward = _Wrap(net[0], 2.0)
    else:
        net[0].forward = functools.partial(_counted, net[0], [])
    template = lm.MetaTemplate(net)
    for _ in range(2):
        assert torch.equal(template(template.state_from(net), X), net(X))


def test_a_template_from_a_factory_names_a_hooked_net_as_built_otherwise() -> None:
    template = lm.MetaTemplate(lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    with pytest.raises(
        MetaTensorError, match=r"differs from the module the template was made from"
    ):
        template(template.state_from(_net(2.0)), X)
