"""Materialized dtypes are eager construction's dtypes (issue #11, item 3)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from test_deferred import assert_same_as_eager, tensors
from torch import nn

from lightning_meta import deferred_init, materialize
from support import deferred_models as md


@pytest.fixture(autouse=True)
def _default_dtype_restored() -> Iterator[None]:
    before = torch.get_default_dtype()
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_default_dtype_of_the_block_is_kept(dtype: torch.dtype) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)
        try:
            return md.Custom()
        finally:
            torch.set_default_dtype(torch.float32)

    eager = build()
    with deferred_init():
        module = build()
    assert module.scale.dtype == dtype  # the meta tensors had the right dtype already
    materialize(module)
    assert module.scale.dtype == dtype
    assert_same_as_eager(eager, module)


def test_default_dtype_changed_inside_the_block_is_replayed_op_by_op() -> None:
    def build() -> nn.Module:
        first = nn.Linear(3, 3)
        torch.set_default_dtype(torch.float64)
        try:
            second = nn.Linear(3, 3)
            ratio = nn.Parameter(torch.arange(4) / 3)  # true division: the default dtype
        finally:
            torch.set_default_dtype(torch.float32)
        return nn.ParameterList([first.weight, second.weight, ratio])

    torch.manual_seed(0)
    eager = build()
    torch.manual_seed(0)
    module = deferred_init(build)
    materialize(module)
    assert [t.dtype for t in tensors(module).values()] == [
        torch.float32,
        torch.float64,
        torch.float64,
    ]
    assert_same_as_eager(eager, module)


def test_transformers_from_config_with_dtype() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        eager = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
        torch.manual_seed(0)
        with deferred_init():
            module = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    materialize(module)
    assert module.model.embed_tokens.weight.dtype == torch.bfloat16
    assert_same_as_eager(eager, module)


def test_fabric_init_module_with_bf16_true() -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-true")
    torch.manual_seed(0)
    with fabric.init_module():
        eager = md.NanoGPT()
    torch.manual_seed(0)
    with fabric.init_module(), deferred_init():
        module = md.NanoGPT()
    materialize(module)
    assert module.lm_head.weight.dtype == torch.bfloat16
    assert_same_as_eager(eager, module)
