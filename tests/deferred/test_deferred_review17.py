"""The review of 2026-12-07 (third session): construction idioms of other people's code.

The reference is eager construction with the same seed (then ``load_state_dict`` and
``module.to(...)`` where the deferred program loads or converts).

- ``lm.load_checkpoint`` failed on every deferred model holding a torchmetrics metric:
  the load gave the record's own captured tensor (``torch.tensor(0)``'s) to the module,
  and the replay of the metric's ``_defaults`` after it found it gone ("given other
  memory since").
- ``head.weight.is_set_to(emb.weight)`` answered ``False`` for tied weights in a block
  (FakeTensorMode's answer even for a tensor and itself): the untied branch ran, 2.95 off.
- ``Tensor.apply_`` on a tensor made in a block crashed the interpreter.
- ``materialize(dtype=)`` and ``load_checkpoint(dtype=)`` skipped what modules add to
  ``module.to()``: torchmetrics' states stayed float32 (``compute()`` 2e-5 off eager's
  float16) and a LightningModule's ``self.dtype`` stayed float32 (a forward building
  tensors in it computed in float32).

- Three refusals said the wrong thing: ``nn.BatchNorm1d(8, device="meta")`` built on
  meta on purpose in a block was refused as a write "into a real tensor captured from
  outside the block"; ``p.set_(flat.untyped_storage(), offset, shape)`` (flat-parameter
  code) as "it loads a tensor (torch.load ...)"; ``torch.nn.utils.skip_init`` as
  ``Module.to()`` with a fix naming ``dtype=``.

Each test but the control (``apply_`` on a real tensor) failed (the ``apply_`` one by
crashing) on the tree before these fixes (7b349e6).
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
import torchmetrics
from torch import nn

import lightning_meta as lm
from support.deferred_models import assert_like_eager


class _WithMetric(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)
        self.mse = torchmetrics.MeanSquaredError()


class _KeepsACopy(nn.Module):
    """The shape of torchmetrics' state: a tensor and a deep copy of it kept in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)
        self.total = torch.tensor(0)
        self.defaults = {"total": copy.deepcopy(self.total)}


@pytest.mark.parametrize("build", [_WithMetric, _KeepsACopy], ids=["torchmetrics", "copy"])
def test_load_checkpoint_into_a_model_holding_a_metric(build: type, tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = build()
    torch.save(eager.state_dict(), tmp_path / "m.pt")
    with lm.deferred_init():
        deferred = build()
    lm.load_checkpoint(deferred, tmp_path / "m.pt")
    assert torch.equal(deferred.head.weight, eager.head.weight)
    if build is _KeepsACopy:
        assert torch.equal(deferred.defaults["total"], eager.defaults["total"])
        deferred.total += 1  # as eagerly: the copy in the dict is a tensor of its own
        assert deferred.defaults["total"].item() == 0
    else:
        x, y = torch.randn(4), torch.randn(4)
        deferred.mse.update(x, y)
        eager.mse.update(x, y)
        assert torch.equal(deferred.mse.compute(), eager.mse.compute())


class _TiedBySetTo(nn.Module):
    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        if tie:
            self.head.weight = self.emb.weight
        rows = self.emb.weight[1:]
        self.seen = (
            self.head.weight.is_set_to(self.emb.weight),
            rows.is_set_to(self.emb.weight),  # a view: another offset and shape
            rows.is_set_to(self.emb.weight[1:]),
        )
        if not self.seen[0]:  # untied: the head gets its own initialisation
            nn.init.normal_(self.head.weight, std=0.5)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_is_set_to_answers_as_eagerly_inside_a_block(tie: bool) -> None:
    deferred = assert_like_eager(_TiedBySetTo, tie)
    assert deferred.seen == (tie, False, True)


def test_apply_on_a_tensor_of_a_block_is_refused_not_a_crash() -> None:
    # In a subprocess: on the tree before, the interpreter died (segmentation fault).
    code = textwrap.dedent(
        """
        import torch, lightning_meta as lm
        try:
            with lm.deferred_init():
                table = torch.arange(5.0).apply_(lambda x: x ** 2 + 1)
        except lm.MaterializationError as e:
            print("refused:", e)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: deferred_init cannot record Tensor.apply_" in done.stdout
    assert "t ** 2 + 1" in done.stdout


def test_apply_on_a_real_tensor_inside_a_block_runs() -> None:
    table = torch.arange(5.0)
    with lm.deferred_init():
        table.apply_(lambda x: x + 1)  # a tensor from outside the block: real, as it is
    assert table.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


class _Lit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)
        self.mse = torchmetrics.MeanSquaredError()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + torch.full((1, 2), 0.1, dtype=self.dtype)


def _eager_converted(dtype: torch.dtype) -> _Lit:
    torch.manual_seed(0)
    return _Lit().to(dtype)


def _assert_converted_like(deferred: _Lit, eager: _Lit, dtype: torch.dtype) -> None:
    assert deferred.dtype == eager.dtype == dtype
    assert deferred.mse.sum_squared_error.dtype == eager.mse.sum_squared_error.dtype == dtype
    x = torch.randn(2, 3, dtype=dtype)
    assert torch.equal(deferred(x), eager(x))
    p, t = torch.randn(8, dtype=dtype), torch.randn(8, dtype=dtype)
    deferred.mse.update(p, t)
    eager.mse.update(p, t)
    assert torch.equal(deferred.mse.compute(), eager.mse.compute())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_materialize_with_a_dtype_converts_as_module_to_does(dtype: torch.dtype) -> None:
    eager = _eager_converted(dtype)
    torch.manual_seed(0)
    with lm.deferred_init():
        deferred = _Lit()
    lm.materialize(deferred, dtype=dtype)
    _assert_converted_like(deferred, eager, dtype)


def test_load_checkpoint_with_a_dtype_converts_as_module_to_does(tmp_path: Path) -> None:
    eager = _eager_converted(torch.bfloat16)
    torch.manual_seed(0)
    torch.save(_Lit().state_dict(), tmp_path / "m.pt")
    with lm.deferred_init():
        deferred = _Lit()
    lm.load_checkpoint(deferred, tmp_path / "m.pt", dtype=torch.bfloat16)
    _assert_converted_like(deferred, eager, torch.bfloat16)


def test_a_cast_after_the_block_names_the_module_that_converts_its_own_tensors() -> None:
    with lm.deferred_init():
        deferred = _Lit()
    deferred.to(torch.float16)
    with pytest.raises(lm.MaterializationError, match="MeanSquaredError convert") as info:
        lm.materialize(deferred)
    assert "pass device= or dtype= to materialize" in str(info.value)


def test_a_module_built_on_meta_on_purpose_inside_a_block_is_not_refused() -> None:
    # nn.BatchNorm1d(device="meta") makes its counter with torch.tensor(0, device="meta")
    # and zeroes it: refused before as a write "into a real tensor captured from outside".
    with lm.deferred_init():
        probe = nn.BatchNorm1d(8, device="meta")
    assert probe.running_mean.is_meta and probe.num_batches_tracked.is_meta


class _Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        params = list(self.parameters())
        self.register_buffer("flat", torch.cat([p.detach().reshape(-1) for p in params]))
        offset = 0
        with torch.no_grad():
            for p in params:
                p.set_(self.flat.untyped_storage(), offset, p.shape)
                offset += p.numel()


def test_set_onto_another_tensors_storage_is_refused_as_what_it_is() -> None:
    with pytest.raises(lm.MaterializationError, match="onto the storage of another") as info:
        with lm.deferred_init():
            _Flat()
    assert "loads a tensor" not in str(info.value)
    assert ".view_as(p)" in str(info.value)


def test_skip_init_inside_a_block_names_itself_in_the_refusal() -> None:
    # torch 2.6's to_empty() is recorded as empty_like (refused at materialize, as memory
    # eager leaves uninitialised); later torch's goes through the conversion refusal.
    def build_and_materialize() -> None:
        with lm.deferred_init():
            module = torch.nn.utils.skip_init(nn.Linear, 4, 3)
        lm.materialize(module)

    with pytest.raises(lm.MaterializationError) as err:
        build_and_materialize()
    assert re.search(
        r"skip_init\(cls, \.\.\.\) is to_empty|eager construction leaves uninitialised.*"
        r"'weight' \(aten\.empty_like",
        str(err.value),
    ), str(err.value)
