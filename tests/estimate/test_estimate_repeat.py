"""Tests for lightning_meta._estimate._repeat: deep stacks estimated from 2, 3 and 4 blocks."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from lightning_meta import Estimate, estimate
from lightning_meta._compat import saved_tensor_hooks_on
from lightning_meta._estimate._repeat import MIN_BLOCKS, find_repeat


def deep_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=MIN_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    return LlamaForCausalLM(cfg)


class Block(nn.Module):
    def __init__(self, width: int = 16, scale: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) * self.scale


class Stack(nn.Module):
    """``n`` blocks in a ModuleList; ``use`` limits how many the forward calls."""

    def __init__(self, blocks: list[nn.Module], use: int | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(16, 4)
        self.use = use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks[: self.use]:
            x = block(x)
        out: torch.Tensor = self.head(x)
        return out


class Dense(Stack):
    """Every block sees all earlier outputs: the cost grows with the square of the depth."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for block in self.blocks:
            mixed = torch.cat(outs, dim=-1) @ torch.ones(16 * len(outs), 16)
            outs.append(block(mixed))
        out: torch.Tensor = self.head(outs[-1])
        return out


class Periodic(Stack):
    """A shared extra layer after every sixth block: the cut models never reach it."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__(blocks)
        self.extra = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i % 6 == 5:
                x = self.extra(x)
        out: torch.Tensor = self.head(x)
        return out


class Late(Block):
    """Blocks from the seventh on also square their output (the block's index is allowed)."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * out if self.layer_idx >= 6 else out


def _same(a: Estimate, b: Estimate) -> None:
    da, db = a.to_dict(), b.to_dict()
    assert da.pop("method") != db.pop("method")
    for key in da:
        assert da[key] == db[key], key


@pytest.mark.parametrize(
    ("optimizer", "precision", "loop"),
    [("adamw", "32-true", "lightning"), ("sgd", "bf16-mixed", "plain")],
)
def test_extrapolated_equals_full_step(optimizer: str, precision: str, loop: Any) -> None:
    options = dict(optimizer=optimizer, precision=precision, loop=loop, depth=5)
    fast = estimate(deep_llama, "2,12:int64", **options)
    full = estimate(deep_llama, "2,12:int64", extrapolate=False, **options)
    assert fast.method.startswith(f"model.layers: {MIN_BLOCKS} identical blocks, extrapolated")
    assert full.method == "full step"
    _same(fast, full)  # every field, every per-module row down to depth 5
    names = [m.name for m in fast.modules]
    assert f"model.layers.{MIN_BLOCKS - 1}.self_attn.q_proj" in names


def test_the_model_is_left_as_it_was() -> None:
    with torch.device("meta"):
        model = deep_llama()
    before = list(model.model.layers)
    est = estimate(model, "2,12:int64")
    assert "extrapolated" in est.method
    assert list(model.model.layers) == before
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_shallow_stacks_run_in_full() -> None:
    est = estimate(lambda: Stack([Block() for _ in range(MIN_BLOCKS - 1)]), "4,16:float32")
    assert est.method == "full step"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: Stack([Block(scale=1.0 + (i == 5)) for i in range(12)]), r"differ in 'scale'"),
        (
            lambda: Stack([Block() for _ in range(11)] + [nn.Sequential(nn.Linear(16, 16))]),
            r"different submodules",
        ),
        (lambda: Stack([Block() for _ in range(12)], use=2), r"does not call each block once"),
        (lambda: Dense([Block() for _ in range(12)]), r"other operators after block 1"),
        (lambda: Stack([Block() for _ in range(12)], use=6), r"6 of 12 called"),
        (lambda: Periodic([Block() for _ in range(12)]), r"other operators after block 5"),
        (lambda: Stack([Late(i) for i in range(12)]), r"block 6 runs other operators"),
    ],
    ids=["attribute", "structure", "some-blocks", "quadratic", "first-half", "periodic", "late"],
)
def test_extrapolation_refused(make: Any, reason: str) -> None:
    est = estimate(make, "4,16:float32", optimizer="adamw", depth=3)
    assert est.method.startswith("full step (not extrapolated: ")
    assert re.search(reason, est.method), est.method
    full = estimate(make, "4,16:float32", optimizer="adamw", depth=3, extrapolate=False)
    da, db = est.to_dict(), full.to_dict()
    da.pop("method"), db.pop("method")
    assert da == db
    model, x = make(), torch.zeros(4, 16)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    assert est.forward_flops + est.backward_flops == counter.get_total_flops()


def test_tied_blocks_are_not_extrapolated() -> None:
    shared = Block()
    model = Stack([Block() for _ in range(11)])
    model.blocks.append(shared)
    model.blocks[0].fc.weight = shared.fc.weight
    rep, why = find_repeat(model)
    assert rep is None
    assert "shares a tensor" in why


def test_layer_index_attribute_is_allowed() -> None:
    blocks = [Block() for _ in range(12)]
    for i, b in enumerate(blocks):
        b.layer_idx = i  # type: ignore[assignment]
    rep, why = find_repeat(Stack(blocks))
    assert rep is not None and rep.name == "blocks" and rep.count == 12, why


class _Scheduled(nn.Module):
    """Blocks alike but for their index, which decides what backward does."""

    def __init__(self, mode: str, layer_idx: int) -> None:
        super().__init__()
        self.mode, self.layer_idx = mode, layer_idx
        self.fc = nn.Linear(16, 16)

    def _f(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_idx >= 8 and self.mode == "checkpoint":
            return checkpoint(self._f, x, use_reentrant=False)  # type: ignore[no-any-return]
        if self.layer_idx >= 8 and self.mode == "no_grad":
            with torch.no_grad():
                return self._f(x)
        return self._f(x)


@pytest.mark.parametrize("mode", ["checkpoint", "no_grad"])
def test_blocks_alike_but_for_what_backward_does_are_not_extrapolated(mode: str) -> None:
    # Before: "12 identical blocks, extrapolated exactly" from blocks 0-3, whose
    # forward the last 4 run under checkpointing or without gradients: backward
    # FLOPs 8 % over or 1500x over the real step's, peak 19 % or 70 % over.
    if mode == "checkpoint" and saved_tensor_hooks_on() is None:
        pytest.skip("torch < 2.8 cannot say whether saved-tensor hooks are on")

    def make() -> nn.Module:
        return Stack([_Scheduled(mode, i) for i in range(12)])

    est = estimate(make, "4,16:float32", optimizer="adamw")
    assert est.method.startswith("full step (not extrapolated: block 8 runs other operators")
    full = estimate(make, "4,16:float32", optimizer="adamw", extrapolate=False)
    assert (est.forward_flops, est.backward_flops) == (full.forward_flops, full.backward_flops)


def test_modules_held_in_plain_attributes_are_compared_by_structure() -> None:
    # transformers 5.25 gives every attention layer a kernel function module of
    # its own in a plain dict (`self._kernel_funcs = {"rotary_pos_emb": Func()}`):
    # compared by identity, every stack of its models ran in full.
    blocks = [Block() for _ in range(12)]
    for b in blocks:
        b._kernel_funcs = {"rotary": nn.Identity()}  # type: ignore[assignment]
    rep, why = find_repeat(Stack(blocks))
    assert rep is not None and rep.count == 12, why
    blocks[5]._kernel_funcs = {"rotary": nn.ReLU()}  # type: ignore[assignment]
    rep, why = find_repeat(Stack(blocks))
    assert rep is None and "differ in '_kernel_funcs'" in why


def test_per_block_config_settings_refuse_extrapolation() -> None:
    """Blocks that read `config.layer_types[self.layer_idx]` look alike but differ."""
    from types import SimpleNamespace

    kinds = ["full" if i % 6 == 5 else "local" for i in range(12)]
    model = Stack([Block() for _ in range(12)])
    model.config = SimpleNamespace(layer_types=kinds)  # type: ignore[assignment]
    rep, why = find_repeat(model)
    assert rep is None
    assert why == "blocks: config.layer_types differs between blocks"
    model.config = SimpleNamespace(layer_types=["full"] * 12)  # type: ignore[assignment]
    assert find_repeat(model)[0] is not None
