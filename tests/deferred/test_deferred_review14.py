"""deferred_init under a hostile review (fourteenth round): the block's own checks raise no
warning eager construction does not raise."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import lightning_meta as lm


class _Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.w_t = self.lin.weight.t()  # a plain attribute viewing the weight: not a leaf


def test_a_non_leaf_tensor_kept_by_the_model_raises_no_warning_under_warnings_as_errors() -> None:
    # Before, the block's check for a .grad set in the block read .grad of every tensor
    # the model keeps, and torch warned for each non-leaf ("The .grad attribute of a
    # Tensor that is not a leaf Tensor is being accessed"): under -W error the block
    # failed with that warning, where eager construction is silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(0)
        eager = _Transposed()
        torch.manual_seed(0)
        with lm.deferred_init():
            model = _Transposed()
        lm.materialize(model)
    assert torch.equal(model.w_t, eager.w_t)
    assert model.w_t.data_ptr() == model.lin.weight.data_ptr()
