"""Deferred init under a hostile review (tenth round): nested tensors read or made in a
block."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lightning_meta as lm


def _nested(layout: torch.layout) -> torch.Tensor:
    with warnings.catch_warnings():  # torch: "nested tensors ... prototype stage"
        warnings.simplefilter("ignore", UserWarning)
        return torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)], layout=layout)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
def test_a_captured_nested_tensor_is_refused_naming_the_fix(layout: torch.layout) -> None:
    # Before: a strided one raised torch's "Internal error: NestedTensorImpl doesn't support
    # sizes. Please file an issue.", and a jagged one was called "a tensor around others,
    # such as a sharded one" with t.full_tensor() as the fix.
    src = _nested(layout)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("b", src + 1)

    with (
        pytest.raises(lm.MaterializationError, match=r"nested tensor.*t\.to_padded_tensor"),
        lm.deferred_init(),
    ):
        Holder()
