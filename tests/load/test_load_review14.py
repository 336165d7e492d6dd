"""Checkpoint loading under a hostile review (fourteenth round): tensors sharing memory in
another dtype (``torch.view_as_real``, ``.view(torch.int32)``), and a checkpoint that fills
only a view of a tensor it lacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta import MaterializationError


class _Rotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        freqs = torch.polar(torch.ones(4), torch.randn(4))
        self.register_buffer("freqs", freqs)
        self.register_buffer("freqs_ri", torch.view_as_real(freqs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # an update in place, which the other view sees
            self.freqs.mul_(torch.polar(torch.ones(4), torch.full((4,), 0.1)))
        return x * self.freqs_ri[:, 0]


def test_a_view_of_another_dtype_shares_the_loaded_memory_as_in_eager(tmp_path: Path) -> None:
    # Before, the complex buffer and its view_as_real each got memory of their own:
    # after one in-place update of one, outputs were 0.089 off eager's.
    torch.manual_seed(0)
    path = tmp_path / "rotary.pt"
    torch.save({k: v.clone() for k, v in _Rotary().state_dict().items()}, path)
    eager = _Rotary()
    eager.load_state_dict(torch.load(path))
    model = lm.deferred_init(_Rotary)
    lm.load_checkpoint(model, path)
    assert model.freqs.untyped_storage().data_ptr() == model.freqs_ri.untyped_storage().data_ptr()
    x = torch.ones(4)
    for _ in range(3):
        assert torch.equal(model(x), eager(x))
    assert torch.equal(model.freqs, eager.freqs)


class _Bits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", torch.arange(6.0))
        self.register_buffer("bits", self.a.view(torch.int32), persistent=False)


def test_an_integer_view_of_a_loaded_buffer_holds_the_loaded_bits(tmp_path: Path) -> None:
    path = tmp_path / "bits.pt"
    torch.save({"a": torch.arange(6.0) + 0.5}, path)
    eager = _Bits()
    eager.load_state_dict(torch.load(path))
    model = lm.deferred_init(_Bits)
    lm.load_checkpoint(model, path)
    assert model.bits.dtype == torch.int32
    assert torch.equal(model.bits, eager.bits)
    assert model.bits.untyped_storage().data_ptr() == model.a.untyped_storage().data_ptr()


def test_an_integer_view_of_a_buffer_cast_by_the_load_is_refused_with_a_fix_that_applies(
    tmp_path: Path,
) -> None:
    # Before, dtype= gave 'bits' the cast float64 values of 'a' (eager: the loaded float32
    # bits, as int32, which module.to leaves alone); before the round-13 fix, the bits of
    # construction.
    path = tmp_path / "bits.pt"
    torch.save({"a": torch.arange(6.0) + 0.5}, path)
    with pytest.raises(MaterializationError) as info:
        lm.load_checkpoint(lm.deferred_init(_Bits), path, dtype=torch.float64)
    assert info.value.paths == ("bits",) and "module.to(dtype)" in str(info.value)
    eager = _Bits()
    eager.load_state_dict(torch.load(path))
    eager.to(torch.float64)
    model = lm.deferred_init(_Bits)  # the fix
    lm.load_checkpoint(model, path)
    model.to(torch.float64)
    assert model.bits.dtype == eager.bits.dtype and torch.equal(model.bits, eager.bits)
    assert model.a.dtype == torch.float64 and torch.equal(model.a, eager.a)


class _Prefix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", torch.randn(6))
        self.register_buffer("b", self.a[:2])


def test_a_checkpoint_filling_only_a_view_names_the_tensor_it_lacks_and_a_fix(
    tmp_path: Path,
) -> None:
    # Before, the error said 'a' views memory of a tensor made real before it (it is 'b'
    # that views 'a') and named fixes that did not apply.
    path = tmp_path / "b.pt"
    torch.save({"b": torch.tensor([-1.0, -2.0])}, path)
    torch.manual_seed(0)
    model = lm.deferred_init(_Prefix)
    with pytest.raises(MaterializationError) as info:
        lm.load_checkpoint(model, path, strict=False)
    said = str(info.value)
    assert info.value.paths == ("a",) and "views part of the memory of 'a'" in said
    torch.manual_seed(0)
    eager = _Prefix()
    eager.load_state_dict(torch.load(path), strict=False)
    torch.manual_seed(0)
    model = lm.deferred_init(_Prefix)  # the fix it names
    lm.materialize(model)
    lm.load_checkpoint(model, path, strict=False)
    assert torch.equal(model.a, eager.a) and torch.equal(model.b, eager.b)
    assert model.b.data_ptr() == model.a.data_ptr()


class _Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        packed = torch.tensor([1.1, 2.3, 0.7, 5.9]).view(torch.int32)  # scales kept as raw bits
        self.register_buffer("packed", packed)
        self.register_buffer("scale", packed.view(torch.float32), persistent=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_floating_view_of_an_integer_buffer_is_cast_as_module_to_casts_it(
    dtype: torch.dtype, tmp_path: Path
) -> None:
    # Before (the first fix of this round), 'scale' stayed float32 under dtype=, sharing
    # the int32 buffer, where load_state_dict then module.to(dtype) casts it.
    path = tmp_path / "packed.pt"
    torch.save(_Packed().state_dict(), path)
    eager = _Packed()
    eager.load_state_dict(torch.load(path))
    eager.to(dtype)
    model = lm.deferred_init(_Packed)
    lm.load_checkpoint(model, path, dtype=dtype)
    assert model.scale.dtype == eager.scale.dtype == dtype
    assert torch.equal(model.scale, eager.scale) and torch.equal(model.packed, eager.packed)
