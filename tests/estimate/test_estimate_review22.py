"""Fixes from the reviews of 2026-12-07 (seventh session) in ``estimate``.

Each test failed on 08308e5, the tree before them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_meta import InputSpec, estimate


class _Gated(nn.Module):
    """Branches on the values of a mask and of labels, each read once."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def step(self, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.fc(x)
        if bool(mask.sum() > 0):
            h = h * 2
        return h if bool((labels == -100).all()) else h + 1


class _Batch(_Gated):
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.step(batch["x"], batch["mask"], batch["labels"])


class _Star(_Gated):
    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return self.step(x, *rest)


def test_reads_answered_from_zeros_name_the_input_they_read() -> None:
    # Before, each entry said "<op> in <module>" alone: a model reading a mask and
    # labels by shape listed the same entry for both, and the user could not tell
    # which input to give for real.
    x = torch.randn(2, 4)
    batch = {"x": x, "mask": InputSpec((2,), torch.int64), "labels": torch.zeros(2)}
    assert estimate(_Batch, (batch,), optimizer=None).inputs_read_as_zeros == (
        "aten._local_scalar_dense in _Batch, reading batch['mask']",
    )
    both = {"x": x, "mask": "2:int64", "labels": "2:int64"}
    assert estimate(_Batch, (both,), optimizer=None).inputs_read_as_zeros == (
        "aten._local_scalar_dense in _Batch, reading batch['mask']",
        "aten._local_scalar_dense in _Batch, reading batch['labels']",
    )
    star = estimate(_Star, (x, torch.ones(2), "2:int64"), optimizer=None)
    assert star.inputs_read_as_zeros == ("aten._local_scalar_dense in _Star, reading rest[1]",)


def test_a_transformers_mask_given_by_shape_is_named() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    ids = torch.randint(0, 64, (1, 16))
    est = estimate(
        lambda: transformers.LlamaForCausalLM(config),
        {"input_ids": ids, "attention_mask": InputSpec((1, 16), torch.int64), "labels": ids},
        optimizer=None,
    )
    assert est.inputs_read_as_zeros
    assert all(r.endswith("reading attention_mask") for r in est.inputs_read_as_zeros)
