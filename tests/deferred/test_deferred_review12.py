"""deferred_init under a hostile review (twelfth round): the grad mode and oneDNN flag a
recorded op ran under, gradients through a plain tensor attribute, writes through a view
of a real tensor captured from outside the block, ``.data =`` on such a tensor, and two
values for a tie under ``load_state_dict(assign=True)``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import lightning_meta as lm


@contextlib.contextmanager
def _onednn(enabled: bool) -> Iterator[None]:
    # Not torch.backends.mkldnn.flags(): it also sets a TF32 flag that warns on
    # builds without Intel GPU support.
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before  # type: ignore[assignment]


class _LstmSummary(nn.Module):
    def __init__(self, no_grad: bool) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4)
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            y, _ = self.rnn(torch.randn(5, 1, 3))
        self.register_buffer("summary", y.detach().sum(0))


class _ConvStat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3)
        with torch.no_grad():
            self.register_buffer("stat", self.conv(torch.randn(2, 8, 12, 12)).mean((0, 2, 3)))


def _eager_and_deferred(
    build: Callable[[], nn.Module],
    record: contextlib.AbstractContextManager[object],
    replay: contextlib.AbstractContextManager[object],
) -> tuple[nn.Module, nn.Module]:
    with record:
        torch.manual_seed(0)
        eager = build()
        torch.manual_seed(0)
        with lm.deferred_init():
            deferred = build()
    with replay:
        lm.materialize(deferred)
    return eager, deferred


@pytest.mark.parametrize(
    ("build", "record", "replay"),
    [
        # An LSTM run under no_grad in the block: torch's CPU kernel gives other
        # bits with grad mode on, which replay used (2.2e-8 off).
        (lambda: _LstmSummary(no_grad=True), contextlib.nullcontext, contextlib.nullcontext),
        # Run with grad on in the block, materialized under the caller's no_grad.
        (lambda: _LstmSummary(no_grad=False), contextlib.nullcontext, torch.no_grad),
        # Recorded under no_grad, materialized under inference_mode, which replay
        # leaves (turning grad mode on) after it had noted the caller's settings.
        (lambda: _LstmSummary(no_grad=True), contextlib.nullcontext, torch.inference_mode),
        # A convolution recorded with oneDNN on, replayed with it off, and back.
        (_ConvStat, contextlib.nullcontext, lambda: _onednn(False)),
        (_ConvStat, lambda: _onednn(False), contextlib.nullcontext),
    ],
    ids=["lstm-no-grad-block", "lstm-no-grad-materialize", "lstm-inference-materialize",
         "conv-onednn-off-at-materialize",
         "conv-onednn-off-in-block"],
)  # fmt: skip
def test_replay_runs_each_op_under_the_grad_mode_and_onednn_flag_it_was_recorded_under(
    build: Callable[[], nn.Module],
    record: Callable[[], contextlib.AbstractContextManager[object]],
    replay: Callable[[], contextlib.AbstractContextManager[object]],
) -> None:
    grad, onednn = torch.is_grad_enabled(), torch.backends.mkldnn.enabled
    eager, deferred = _eager_and_deferred(build, record(), replay())
    for (name, a), (_, b) in zip(
        eager.state_dict().items(), deferred.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), (name, (a - b).abs().max())
    # The caller's settings are put back.
    assert (torch.is_grad_enabled(), torch.backends.mkldnn.enabled) == (grad, onednn)


class _Temperature(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_temp = torch.zeros(3, requires_grad=True)  # learnable, a plain attribute
        self.temp = self.log_temp.exp() * 2  # eager: gradients reach log_temp
        self.lin = nn.Linear(3, 3)


def test_a_tensor_computed_from_a_plain_requires_grad_attribute_is_refused() -> None:
    # Before, 'temp' came back a leaf: eager's log_temp.grad is [2, 2, 2], the
    # materialized one's None, without an error.
    eager = _Temperature()
    eager.temp.sum().backward()
    assert eager.log_temp.grad is not None
    with lm.deferred_init():
        deferred = _Temperature()
    with pytest.raises(lm.MaterializationError, match=r"'temp' \(aten\.mul") as info:
        lm.materialize(deferred)
    assert "requires grad" in str(info.value) and "torch.no_grad()" in str(info.value)
    # Made without history, it materializes, equal to eager's.
    with torch.no_grad():
        torch.manual_seed(0)
        plain = _Temperature()
        torch.manual_seed(0)
        with lm.deferred_init():
            deferred = _Temperature()
    lm.materialize(deferred)
    assert torch.equal(deferred.temp, plain.temp) and torch.equal(
        deferred.lin.weight, plain.lin.weight
    )


def _view_write(table: torch.Tensor) -> None:
    table[0] = 5.0


def _slice_add(table: torch.Tensor) -> None:
    table[1:].add_(1.0)


def _view_of_view(table: torch.Tensor) -> None:
    table.view(3, 1)[1:].t().fill_(2.0)


def _random_out(table: torch.Tensor) -> None:
    torch.randn(3, out=table)


def _set(table: torch.Tensor) -> None:
    table.set_(torch.ones(3))


def _direct(table: torch.Tensor) -> None:
    table.add_(1.0)


@pytest.mark.parametrize(
    "write", [_view_write, _slice_add, _view_of_view, _random_out, _set, _direct]
)
def test_a_write_into_a_captured_tensor_or_a_view_of_it_is_refused_at_the_line(
    write: Callable[[torch.Tensor], None],
) -> None:
    # Before, a write through a view was lost (the outside tensor kept its old
    # values where eager wrote into it), and out= of a random op or set_ raised
    # torch's internal "Can't call metadata mutating ops on non-Fake Tensor inputs";
    # a direct write was refused after the fake mode had run it on the real tensor.
    table = torch.zeros(3)

    class Writes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            write(table)

    with pytest.raises(lm.MaterializationError, match="captured from outside the block") as info:
        with lm.deferred_init():
            Writes()
    assert "test_deferred_review12.py" in str(info.value) and "clone the tensor" in str(info.value)
    assert torch.equal(table, torch.zeros(3))


def test_reading_a_view_of_a_captured_tensor_still_replays_exactly() -> None:
    table = torch.arange(6.0).view(2, 3)

    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("row", table[1] * 2)
            self.lin = nn.Linear(3, 3)

    with lm.deferred_init():
        deferred = Reads()
    lm.materialize(deferred)
    assert torch.equal(deferred.row, torch.tensor([6.0, 8.0, 10.0]))


def test_data_assigned_to_a_tensor_from_outside_the_block_is_refused_at_the_line() -> None:
    # Before, ``table.data = torch.randn(3, 3)`` gave the outside tensor the block's
    # meta storage, silently: it stayed on meta after materialize (eager: random values).
    table = torch.zeros(3, 3)
    outside = nn.Linear(3, 3)  # a module built before the block
    weight = outside.weight.detach().clone()

    def assign(target: torch.Tensor) -> None:
        with lm.deferred_init():
            nn.Linear(3, 3)
            target.data = torch.randn(3, 3)

    for target in (table, outside.weight):
        with pytest.raises(lm.MaterializationError, match=r"Tensor\.data = .*outside the block"):
            assign(target)
    assert torch.equal(table, torch.zeros(3, 3)) and torch.equal(outside.weight, weight)
    assert "data" not in vars(torch.Tensor)  # the check lives only while a block is open


class _Reassigned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.lin.weight.data = torch.randn(3, 3) * 0.1  # a tensor of the block: recorded


def test_data_assigned_to_a_tensor_of_the_block_is_eagers() -> None:
    torch.manual_seed(0)
    eager = _Reassigned()
    torch.manual_seed(0)
    with lm.deferred_init():
        deferred = _Reassigned()
    lm.materialize(deferred)
    assert torch.equal(deferred.lin.weight, eager.lin.weight)
    assert torch.equal(deferred.lin.bias, eager.lin.bias)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight


def test_assign_true_with_two_values_for_a_tie_made_in_the_block_is_refused() -> None:
    # Before, the deferred model kept the tie and the file's emb.weight under both
    # names: head.weight's value was dropped, where eager's assign=True gives each
    # name its own (and breaks the tie).
    torch.manual_seed(1)
    sd = {"emb.weight": torch.randn(6, 4), "head.weight": torch.randn(6, 4)}
    with lm.deferred_init():
        model = _Tied()
    with pytest.raises(lm.MaterializationError, match="'head.weight' and 'emb.weight' are tied"):
        model.load_state_dict(dict(sd), assign=True)
    # Without assign=True: the last name's value under both, as eager's copy gives.
    eager = _Tied()
    eager.load_state_dict(dict(sd))
    with lm.deferred_init():
        model = _Tied()
    model.load_state_dict(dict(sd))
    lm.materialize(model)
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.emb.weight, eager.emb.weight)
    assert torch.equal(model.emb.weight, sd["head.weight"])
    # Equal values (a checkpoint saved from a tied model) load with assign=True.
    same = {"emb.weight": sd["emb.weight"], "head.weight": sd["emb.weight"].clone()}
    with lm.deferred_init():
        model = _Tied()
    model.load_state_dict(same, assign=True)
    lm.materialize(model)
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.head.weight, sd["emb.weight"])


def test_assign_true_compares_a_ties_two_values_bit_for_bit_dtype_included() -> None:
    # The same tensor (NaN in it) under both names loads; equal values in another
    # dtype are refused (eager's assign=True gives head.weight its float32 values,
    # the kept tie would hold emb.weight's bfloat16 ones).
    w = torch.randn(6, 4)
    w[0, 0] = float("nan")
    with lm.deferred_init():
        model = _Tied()
    model.load_state_dict({"emb.weight": w, "head.weight": w}, assign=True)
    lm.materialize(model)
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.emb.weight[1:], w[1:]) and model.emb.weight[0, 0].isnan()
    with lm.deferred_init():
        model = _Tied()
    with pytest.raises(lm.MaterializationError, match="are tied"):
        model.load_state_dict({"emb.weight": w.bfloat16(), "head.weight": w}, assign=True)


def test_deleting_data_in_a_block_raises_torchs_error() -> None:
    t = torch.zeros(2)
    with lm.deferred_init():
        nn.Linear(2, 2)
        with pytest.raises(RuntimeError):
            del t.data
