"""Tests for lightning_meta._estimate._values: reads of values known from the inputs alone."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_meta import MetaTensorError, estimate
from lightning_meta._compat import FakeTensorMode
from lightning_meta._estimate._values import MAX_ELEMENTS, Values


class Gated(nn.Module):
    """Skips a layer when the mask is all ones, as transformers' BERT drops such a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.extra = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.fc(x)
        if bool(torch.all(mask == 1)):
            return h
        return self.extra(h) * mask.unsqueeze(-1)


def _real_forward_flops(model: nn.Module, *args: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops()


class Compared(nn.Module):
    """Branches on ``torch.equal`` of its input, which has a kernel of its own (no ``.item()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.fc(x)
        if torch.equal(x, torch.zeros_like(x)):
            return h
        return h * 2


def test_torch_equal_of_inputs_is_answered_like_item() -> None:
    # it was refused, blaming "values computed from its weights or drawn at random"
    x = torch.randn(2, 4)
    by_spec = estimate(Compared, "2,4", optimizer=None)
    assert by_spec.forward_flops == _real_forward_flops(Compared(), torch.zeros(2, 4))
    assert by_spec.inputs_read_as_zeros == ("aten.equal in Compared, reading x",)
    by_value = estimate(Compared, x, optimizer=None)
    assert by_value.inputs_read_as_zeros == ()
    assert by_value.peak_bytes > by_spec.peak_bytes  # the real input takes the other branch

    class OfWeights(Compared):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if torch.equal(self.fc.weight, torch.zeros_like(self.fc.weight)) else x * 2

    with pytest.raises(MetaTensorError, match="aten.equal"):
        estimate(OfWeights, "2,4", optimizer=None)


class Close(Compared):
    """Branches on ``torch.allclose`` of its input, with a tolerance given by keyword."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.fc(x)
        # a tolerance as a keyword: dropped, the answer would be False for x = 0.5
        return h if torch.allclose(x, torch.ones_like(x), atol=0.6) else h * 2


def test_torch_allclose_of_inputs_is_answered_with_its_keywords() -> None:
    half = torch.full((2, 4), 0.5)
    assert estimate(Close, half, optimizer=None).peak_bytes < (
        estimate(Close, torch.zeros(2, 4), optimizer=None).peak_bytes
    )  # allclose true for 0.5 (within 0.6 of 1), false for 0: the * 2 costs a tensor
    assert estimate(Close, "2,4", optimizer=None).inputs_read_as_zeros == (
        "aten.allclose in Close, reading x",
    )


def test_a_spec_input_reads_as_zeros_and_a_real_input_as_itself() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4)
    ones = torch.ones(2, 3)
    zeros = torch.zeros(2, 3)
    by_spec = estimate(Gated, (x, "2,3:float32"), optimizer=None)
    assert by_spec.forward_flops == _real_forward_flops(Gated(), x, zeros)
    by_value = estimate(Gated, (x, ones), optimizer=None)
    assert by_value.forward_flops == _real_forward_flops(Gated(), x, ones)
    assert by_value.forward_flops < by_spec.forward_flops
    # the result says which reads were answered from zeros, and where; real inputs are not listed
    assert by_spec.inputs_read_as_zeros == ("aten._local_scalar_dense in Gated, reading mask",)
    assert json.loads(json.dumps(by_spec.to_dict()))["inputs_read_as_zeros"] == [
        "aten._local_scalar_dense in Gated, reading mask"
    ]
    assert by_value.inputs_read_as_zeros == ()

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Gated()

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.inner(x, mask)
            return out

    nested = estimate(Outer, (x, "2,3:float32"), optimizer=None)
    assert nested.inputs_read_as_zeros == ("aten._local_scalar_dense in inner, reading mask",)
    # a model that reads no input value lists none
    assert estimate(nn.Linear(4, 4), "2,4:float32").inputs_read_as_zeros == ()


def test_tolist_and_a_data_dependent_shape_follow_the_inputs() -> None:
    class Ragged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            parts = torch.split(x, lengths.tolist())  # sizes read from an input
            keep = (lengths > 1).nonzero().squeeze(1)  # a shape read from an input
            out: torch.Tensor = self.fc(torch.cat(parts)).sum() + x[keep].sum()
            return out

    x = torch.randn(6, 4)
    lengths = torch.tensor([1, 2, 3])
    est = estimate(Ragged, (x, lengths), optimizer=None, loss_fn=lambda out: out)
    assert est.forward_flops == _real_forward_flops(Ragged(), x, lengths)


def test_reading_a_value_computed_from_weights_still_fails() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h: torch.Tensor = self.fc(x)
            return h if h.sum() > 0 else h * 2

    with pytest.raises(
        MetaTensorError,
        match=r"forward of Branchy.*reads tensor values a shape-only run does not know",
    ):
        estimate(Branchy, torch.ones(2, 4))


def test_an_input_overwritten_with_weight_values_is_no_longer_known() -> None:
    class Overwrites(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.clone()
            view = y[0]
            y.copy_(self.fc(x))  # unknown values into y's storage: the view is stale too
            return self.fc(x) * view.sum().item()

    with pytest.raises(MetaTensorError, match=r"reads tensor values"):
        estimate(Overwrites, "2,4:float32")


def test_values_are_copies_and_large_tensors_are_not_followed() -> None:
    mode, values = FakeTensorMode(), Values()
    real = torch.arange(6).reshape(2, 3)
    with mode:
        small = torch.empty(2, 3, dtype=torch.int64)
        large = torch.empty(MAX_ELEMENTS + 1, dtype=torch.int8)
    values.give(small, real)
    values.give(large, None)
    known = values.of(small)
    assert known is not None and torch.equal(known, real) and known is not real
    assert values.of(large) is None
    assert values.of(torch.empty(3, device="meta")) is None


def test_random_operators_are_not_followed_and_do_not_draw() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            noise = torch.rand(2, 4)  # values unknown: reading them must fail
            return self.fc(x) * float(noise.sum())

    state = torch.get_rng_state()
    with pytest.raises(MetaTensorError, match=r"reads tensor values"):
        estimate(Noisy, "2,4:float32")
    assert torch.equal(torch.get_rng_state(), state)


class Positioned(nn.Module):
    """Token and position embeddings, positions built with arange: at most 16 of them."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(100, 8)
        self.positions = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        where = torch.arange(ids.shape[1], device=ids.device)
        h = self.tokens(ids) + self.positions(where)
        out: torch.Tensor = self.head(h[:, -1])  # a negative index is in range
        return out


def test_a_known_index_out_of_range_is_refused_like_the_real_kernel() -> None:
    ids = torch.tensor([[5, 150]])
    with pytest.raises(IndexError):
        nn.Embedding(100, 8)(ids)
    with pytest.raises(
        MetaTensorError,
        match=r"the forward of Embedding would fail on a real device: aten.embedding: index 150 "
        r"is out of range for the rows of the embedding of size 100.*Fix: pass indices below 100",
    ):
        estimate(lambda: nn.Embedding(100, 8), ids)
    assert estimate(lambda: nn.Embedding(100, 8), torch.tensor([[5, 99]])).parameters == 800


def test_positions_beyond_the_model_are_refused_and_find_fit_stops_there() -> None:
    from lightning_meta import find_fit

    with pytest.raises(IndexError):
        Positioned()(torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(MetaTensorError, match=r"in module 'positions'.*index 16 is out of range"):
        estimate(Positioned, "2,17:int64")
    assert estimate(Positioned, "2,16:int64").forward_flops == 2 * 2 * 8 * 4
    fit = find_fit(Positioned, "2,4:int64", memory="1GiB", vary="sequence")
    assert fit.value == 16 and not fit.at_limit
    assert "index 16 is out of range" in fit.refused


def test_class_targets_out_of_range_are_refused_and_ignored_ones_pass() -> None:
    def loss(target: torch.Tensor) -> Any:
        return lambda out: nn.functional.cross_entropy(out, target)

    with pytest.raises(IndexError):
        loss(torch.tensor([0, 4]))(nn.Linear(3, 4)(torch.zeros(2, 3)))
    with pytest.raises(MetaTensorError, match=r"the loss of Linear.*index 4 is out of range"):
        estimate(lambda: nn.Linear(3, 4), "2,3:float32", loss_fn=loss(torch.tensor([0, 4])))
    assert estimate(lambda: nn.Linear(3, 4), "2,3:float32", loss_fn=loss(torch.tensor([3, -100])))
