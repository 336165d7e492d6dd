"""What a deferred model holds outside its module tree gets eager construction's tensors.

A module kept in a plain container (``self.teacher = [net]``, out of
Lightning's sight on purpose) and a reference taken after the block
(``self.shared = [self.proj.weight]``) stayed on meta after materialize and
after loading; a CPU matmul with a meta weight returns uninitialised memory
without an error, so a forward gave garbage. Dict subclasses
(``OrderedDict``, Lightning's ``AttributeDict``) were walked by their keys,
so their tensors stayed fake.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch import nn

import lightning_meta as lm
from lightning_meta import deferred_init, is_deferred, materialize


class _Teacher(nn.Module):
    """A frozen teacher kept in a list: outside the tree, in no state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.teacher = [nn.Linear(4, 3, bias=False)]


def _check_teacher(module: _Teacher, eager: _Teacher) -> None:
    weight = module.teacher[0].weight
    assert not weight.is_meta and weight.device.type == "cpu"
    assert torch.equal(weight, eager.teacher[0].weight)
    assert lm.find_meta_tensors(module) == []


def _loads(tmp_path: Path, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return {
        "materialize": lambda m: materialize(m),
        "load_checkpoint": lambda m: lm.load_checkpoint(m, path),
        "load_state_dict": lambda m: m.load_state_dict(state),
        "load_state_dict(assign=True)": lambda m: m.load_state_dict(state, assign=True),
    }


def test_a_deferred_module_kept_in_a_list_gets_eager_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = _Teacher()
    after = torch.get_rng_state()
    for how, fill in _loads(tmp_path, eager.state_dict()).items():
        torch.manual_seed(0)
        module = deferred_init(_Teacher)
        fill(module)
        _check_teacher(module, eager)
        assert torch.equal(torch.get_rng_state(), after), how
    torch.manual_seed(0)
    module = deferred_init(_Teacher)
    report = lm.load_checkpoint(module, tmp_path / "state.pt")
    assert report.replayed == ["teacher.0.weight"]


def test_a_template_kept_in_a_list_stays_meta() -> None:
    # Meta tensors that were never deferred (the classic template workaround)
    # are left alone: only what eager construction made real is made real.
    template = nn.Linear(4, 3, device="meta")
    with deferred_init():
        module = nn.Linear(2, 2)
    module.templates = [template]
    materialize(module)
    assert template.weight.is_meta and not module.weight.is_meta


def _hold(module: nn.Module, kind: str, weight: torch.Tensor) -> None:
    if kind == "attribute":
        module.__dict__["alias"] = weight  # not a registered parameter
    elif kind == "list":
        module.shared = [weight]
    elif kind == "dict":
        module.shared = {"w": weight}
    else:
        module.shared = (weight, "label")


def _held(module: nn.Module, kind: str) -> Any:
    if kind == "attribute":
        return module.alias
    return module.shared["w"] if kind == "dict" else module.shared[0]


@pytest.mark.parametrize("kind", ["attribute", "list", "dict", "tuple"])
def test_a_reference_taken_after_the_block_is_the_real_tensor(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = nn.Linear(4, 6)
    state = {k: torch.randn_like(v) for k, v in eager.state_dict().items()}
    for how, fill in _loads(tmp_path, state).items():
        torch.manual_seed(0)
        with deferred_init():
            module = nn.Linear(4, 6)
        _hold(module, kind, module.weight)
        fill(module)
        assert _held(module, kind) is module.weight, how
        assert not is_deferred(module) and lm.find_meta_tensors(module) == [], how


@pytest.mark.parametrize("kind", [OrderedDict, AttributeDict])
def test_tensors_in_a_dict_subclass_are_materialized(kind: type) -> None:
    class Rope(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            t = torch.arange(8.0)
            self.cache = kind(cos=t.cos(), noise=torch.randn(3))

    torch.manual_seed(0)
    eager = Rope()
    torch.manual_seed(0)
    module = deferred_init(Rope)
    assert type(module.cache) is kind and module.cache["noise"].is_meta
    materialize(module)
    assert torch.equal(module.cache["cos"], eager.cache["cos"])
    assert torch.equal(module.cache["noise"], eager.cache["noise"])


def test_a_real_tensor_deep_copied_inside_the_block_is_a_real_copy() -> None:
    import copy

    real = torch.tensor([1.0, 5.0, 10.0])
    original = vars(torch.Tensor)["__deepcopy__"]
    with deferred_init():
        module = nn.Linear(2, 2)
        module.weights = copy.deepcopy(real)
    assert type(module.weights) is torch.Tensor and torch.equal(module.weights, real)
    assert module.weights.data_ptr() != real.data_ptr()
    materialize(module)
    assert torch.equal(module.weights, real)
    assert vars(torch.Tensor)["__deepcopy__"] is original  # nothing outlives the block


class _Student(nn.Module):
    """A teacher in a list whose weight is the student's (a tie across the tree's edge)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)
        self.register_buffer("nb", torch.randn(3), persistent=False)
        teacher = nn.Linear(4, 4, bias=False)
        teacher.weight = self.proj.weight
        self.teacher = [teacher]


def test_a_tie_across_the_trees_edge_and_references_to_replayed_buffers(tmp_path: Path) -> None:
    # load_checkpoint replayed the teacher before loading: it kept its initial
    # values and lost the tie; a reference to the top module's non-persistent
    # buffer was settled before that buffer was replayed, and stayed meta.
    state = {"proj.weight": torch.full((4, 4), 7.0)}
    for how, fill in _loads(tmp_path, state).items():
        torch.manual_seed(0)
        module = deferred_init(_Student)
        module.refs = [module.nb]
        fill(module)
        assert module.teacher[0].weight is module.proj.weight, how
        assert module.refs[0] is module.nb and not module.nb.is_meta, how


def test_what_materialize_reaches_stays_within_bounds() -> None:
    # A back-reference to the parent (materializing one block materialized the
    # whole model, ignoring a later dtype=), a template built on meta on
    # purpose (torch's "Cannot copy out of meta tensor"), containers referring
    # to each other (a walk of width**depth) and large tables (walked on
    # every materialize and load).
    class Block(nn.Module):
        def __init__(self, owner: nn.Module) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self._owner = [owner]

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block(self) for _ in range(2))
            self.template = [nn.LayerNorm(4, device="meta")]
            graph: dict[str, Any] = {}
            graph.update({str(i): graph for i in range(60)})
            self.graph = graph
            self.table = [list(range(300)) for _ in range(3000)]

    module = deferred_init(Model)
    materialize(module.blocks[0])
    assert is_deferred(module.blocks[1])
    materialize(module.blocks[1], dtype=torch.float64)
    assert module.blocks[1].lin.weight.dtype == torch.float64
    materialize(module)
    assert module.template[0].weight.is_meta and not is_deferred(module.blocks[0])
