"""find_meta_tensors / assert_no_meta on modules, optimizers and containers."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import MetaFinding, assert_no_meta, find_meta_tensors


@dataclass
class Cache:
    keys: torch.Tensor
    count: int = 0


def paths(obj: object) -> dict[str, tuple[str, bool]]:
    return {f.path: (f.kind, f.deferred) for f in find_meta_tensors(obj)}


def test_real_module_has_no_findings() -> None:
    assert find_meta_tensors(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))) == []
    assert_no_meta(nn.Linear(2, 2))


def test_every_place_a_tensor_can_hide() -> None:
    net = nn.Sequential(nn.Linear(2, 2))
    net.register_buffer("stat", torch.empty(3, device="meta"))
    net.plain = torch.empty(4, device="meta")
    net.hidden = [nn.Linear(2, 2, device="meta")]
    net.nested = {"a": (torch.zeros(1), torch.empty(5, device="meta"))}
    net.cache = Cache(torch.empty(6, device="meta"))
    net.teacher = copy.deepcopy(net[0]).to("meta")
    assert paths(net) == {
        "stat": ("buffer", False),
        "plain": ("attribute", False),
        "hidden.0.weight": ("parameter", False),
        "hidden.0.bias": ("parameter", False),
        "nested.a.1": ("attribute", False),
        "cache.keys": ("attribute", False),
        "teacher.weight": ("parameter", False),
        "teacher.bias": ("parameter", False),
    }
    found = {f.path: f for f in find_meta_tensors(net)}
    assert found["cache.keys"].shape == (6,) and found["cache.keys"].dtype == torch.float32


def test_deferred_tensors_are_marked() -> None:
    with lm.deferred_init():
        net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    found = find_meta_tensors(net)
    assert {f.path for f in found} == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    assert all(f.deferred for f in found)
    lm.materialize(net)
    assert find_meta_tensors(net) == []


def test_templates_are_reported_not_problems() -> None:
    holder = nn.Module()
    holder.template = lm.MetaTemplate(nn.Linear(2, 2))
    holder.ensemble = lm.Ensemble([nn.Linear(2, 2) for _ in range(3)])
    found = find_meta_tensors(holder)
    assert [(f.path, f.kind, f.problem) for f in found] == [
        ("template", "template", False),
        ("ensemble.template", "template", False),
    ]
    assert_no_meta(holder)


def test_optimizer_params_and_state() -> None:
    real = nn.Parameter(torch.zeros(2))
    ghost = nn.Parameter(torch.empty(3, device="meta"))
    opt = torch.optim.SGD([{"params": [real]}, {"params": [ghost]}], lr=0.1, momentum=0.9)
    opt.state[real]["momentum_buffer"] = torch.empty(2, device="meta")
    assert paths(opt) == {
        "param_groups.1.params.0": ("optimizer", False),
        "state.0.momentum_buffer": ("optimizer", False),
    }


def test_plain_containers_and_cycles() -> None:
    items: list[object] = [torch.empty(1, device="meta"), {"x": torch.empty(2, device="meta")}]
    items.append(items)  # a cycle is walked once
    assert paths(items) == {"0": ("tensor", False), "1.x": ("tensor", False)}
    assert paths(torch.empty(2, device="meta")) == {"<tensor>": ("tensor", False)}


def test_shared_submodule_reported_once() -> None:
    shared = nn.Linear(2, 2, device="meta")
    net = nn.Module()
    net.a, net.b = shared, shared
    assert list(paths(net)) == ["a.weight", "a.bias"]


def test_assert_no_meta_lists_all_with_fix() -> None:
    net = nn.Module()
    net.teacher = nn.Linear(2, 2, device="meta")
    with lm.deferred_init():
        net.student = nn.Linear(2, 2)
    pattern = (
        r"(?s)Net holds 4 meta tensors, which hold no data:\n"
        r"  'teacher\.weight' \(parameter, shape \(2, 2\), torch\.float32, not deferred\)"
        r".*'student\.bias' \(parameter, shape \(2,\), torch\.float32, deferred\)"
        r".*lightning_meta\.materialize\(module\).*MetaTemplate.*deferred_init"
    )
    with pytest.raises(lm.MetaTensorError, match=pattern):
        assert_no_meta(net, name="Net")


def test_assert_no_meta_deferred_only_mentions_materialize() -> None:
    with lm.deferred_init():
        net = nn.Linear(2, 2)
    with pytest.raises(lm.MetaTensorError, match=r"materialize") as info:
        assert_no_meta(net)
    assert "MetaTemplate" not in str(info.value)


def test_finding_describe() -> None:
    f = MetaFinding("a.b", "buffer", (2,), torch.float16, True)
    assert f.describe() == "'a.b' (buffer, shape (2,), torch.float16, deferred)" and f.problem
