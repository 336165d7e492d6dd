"""Gaps of 2026-12-07 closed in the second session: a storage's ``data_ptr()`` inside a block.

Each test failed on 4ef1a69: the block gave other values than eager's without an error, or
(the tied control, the last test) a storage's address was 0 inside the block.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lightning_meta as lm
from support.deferred_models import assert_like_eager


class _TiesByStorage(nn.Module):
    """Tells shared weights apart by their storages' addresses, as transformers' and
    accelerate's ``id_tensor_storage`` do."""

    def __init__(self, tie: bool, typed: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        if tie:
            self.head.weight = self.emb.weight

        def address(t: torch.Tensor) -> int:
            if typed:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TypedStorage is deprecated
                    return int(t.storage().data_ptr())
            return int(t.untyped_storage().data_ptr())

        if address(self.head.weight) != address(self.emb.weight):
            nn.init.normal_(self.head.weight, std=0.5)
        rows = self.emb.weight[3:]
        # A view's storage is its base's: the same address, as eagerly.
        self.seen = (address(rows) == address(self.emb.weight), address(self.emb.weight) != 0)


@pytest.mark.parametrize("typed", [False, True], ids=["untyped_storage", "storage"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_storage_data_ptr_tells_storages_apart_inside_a_block(tie: bool, typed: bool) -> None:
    # Every fake tensor's storage answered data_ptr() 0: untied weights looked shared, so
    # the block skipped eager's draw of the head (other values, no error). Tied: the control.
    assert_like_eager(_TiesByStorage, tie, typed)


class _MetaInside(nn.Module):
    """Keeps a meta tensor made in __init__ (a shape-only placeholder), whose addresses
    are 0 eagerly."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        shape_only = torch.empty(8, 8, device="meta")
        self.seen = (shape_only.data_ptr(), shape_only.untyped_storage().data_ptr())
        if shape_only.data_ptr() != 0:
            nn.init.zeros_(self.lin.weight)


def test_a_meta_tensor_made_in_a_block_has_eagers_address_zero() -> None:
    assert_like_eager(_MetaInside)


def test_storages_outside_a_block_keep_their_own_addresses() -> None:
    # The control: the stand-in answers a block's storages only, and only while it is open.
    real = torch.ones(3)
    with lm.deferred_init():
        lin = nn.Linear(2, 2)
        assert real.untyped_storage().data_ptr() == real.data_ptr() != 0
        inside = lin.weight.untyped_storage().data_ptr()
        assert inside != 0
    assert lin.weight.untyped_storage().data_ptr() == 0  # a meta tensor after the block
    assert real.untyped_storage().data_ptr() == real.data_ptr()
