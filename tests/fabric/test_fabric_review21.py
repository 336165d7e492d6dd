"""litgpt's own meta pattern under ``fabric_setup`` (2026-12-07, sixth session): a model
built on meta (``fabric.init_module(empty_init=True)`` on FSDP2) and filled by
``lm.load_checkpoint`` keeps its non-persistent rotary buffers on meta, which no
checkpoint holds. ``fabric_setup`` refuses it, rightly, but its fix said "or load real
weights into it first", which the user had just done, and left out what works:
``materialize(module, fallback='reset_parameters')``, which the load's own report names."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm


class Rotary(nn.Module):
    """A weight and a rotary cache recomputed by ``reset_parameters`` (litgpt's ``GPT``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("cos", torch.empty(16, 4), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        positions = torch.arange(16, dtype=torch.float32, device=self.cos.device)
        self.cos = torch.cos(positions[:, None] / (10 ** torch.arange(4.0, device=self.cos.device)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.cos[: x.size(0), :1]


def test_the_fix_names_the_fallback_and_the_fallback_gives_eagers_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = Rotary()
    torch.save(eager.state_dict(), tmp_path / "lit_model.pth")
    fabric = L.Fabric(accelerator="cpu", devices=1)
    with torch.device("meta"):
        model = Rotary()
    lm.load_checkpoint(model, tmp_path / "lit_model.pth")
    with pytest.raises(lm.MetaTensorError, match=r"'cos' \(buffer") as info:
        lm.fabric_setup(fabric, model)
    assert "A checkpoint holds no non-persistent buffer" in str(info.value)
    assert "where their modules have reset_parameters() (litgpt's GPT), call" in str(info.value)
    assert "materialize(module, fallback='reset_parameters') after the load" in str(info.value)
    lm.materialize(model, fallback="reset_parameters")
    model = lm.fabric_setup(fabric, model)
    assert torch.equal(model.module.cos, eager.cos)
    assert torch.equal(model.module.lin.weight, eager.lin.weight)
    assert torch.equal(model.module.lin.bias, eager.lin.bias)


def test_without_reset_parameters_the_fix_names_deferred_init(tmp_path: Path) -> None:
    # the second look: transformers' rotary embedding has no reset_parameters, and the
    # fallback's own fix said "load these tensors from a checkpoint", which holds none
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=32,
    )  # fmt: skip
    torch.manual_seed(0)
    eager = transformers.LlamaForCausalLM(config)
    torch.save(eager.state_dict(), tmp_path / "llama.pth")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    lm.load_checkpoint(model, tmp_path / "llama.pth")
    with pytest.raises(lm.MaterializationError, match="none holds a non-persistent buffer"):
        lm.materialize(model, fallback="reset_parameters")
    # what both fixes name first gives eager's model, rotary buffers included
    with lm.deferred_init():
        model = transformers.LlamaForCausalLM(config)
    lm.load_checkpoint(model, tmp_path / "llama.pth")
    model = lm.fabric_setup(L.Fabric(accelerator="cpu", devices=1), model)
    for name, buffer in eager.named_buffers():
        assert torch.equal(model.module.get_buffer(name), buffer)
    for name, param in eager.named_parameters():
        assert torch.equal(model.module.get_parameter(name), param)
