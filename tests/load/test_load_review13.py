"""Checkpoint loading under a hostile review (thirteenth round): a tensor the checkpoint
does not fill that views one it fills, under ``dtype=``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_meta as lm


class _Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.register_buffer("wt", self.weight.detach().t(), persistent=False)
        self.register_buffer("row", self.weight.detach()[1], persistent=False)


@pytest.mark.parametrize("kind", ["real", "deferred"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_non_persistent_view_of_a_loaded_parameter_is_cast_from_the_loaded_values(
    kind: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    # Before, dtype= cast the buffers from the values of construction (real) or
    # replayed them (deferred), where load_state_dict then module.to(dtype) casts
    # the loaded ones, which the views see.
    path = tmp_path / "w.pt"
    torch.save({"weight": torch.arange(12.0).view(3, 4) / 7}, path)
    torch.manual_seed(0)
    eager = _Transposed()
    eager.load_state_dict(torch.load(path), strict=False)
    eager.to(dtype)
    torch.manual_seed(0)
    model = _Transposed() if kind == "real" else lm.deferred_init(_Transposed)
    lm.load_checkpoint(model, path, dtype=dtype)
    for name in ("weight", "wt", "row"):
        got, want = getattr(model, name), getattr(eager, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
        assert got.stride() == want.stride(), name
    # module.to() gave each buffer memory of its own.
    assert model.wt.untyped_storage().data_ptr() != model.weight.untyped_storage().data_ptr()


class _Views(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", torch.arange(6.0))
        self.register_buffer("b", self.a[:2])  # a persistent view of a


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(4))
        self.b = nn.Parameter(self.a.data)


@pytest.mark.parametrize(
    ("make", "state"),
    [
        (_Views, {"a": torch.full((6,), 10.0), "b": torch.tensor([-1.0, -2.0])}),
        (_Views, {"b": torch.tensor([-1.0, -2.0]), "a": torch.full((6,), 10.0)}),
        (_Shared, {"b": torch.full((4,), 2.0), "a": torch.full((4,), 1.0)}),
    ],
)
def test_deferred_tensors_sharing_memory_share_it_after_the_load_as_eagerly(
    make: type[nn.Module], state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # Before, each was read into memory of its own: `a` took only its own values
    # (10 where eager's holds b's -1, -2; 1 where eager's holds b's 2), and an
    # in-place update of one no longer reached the other.
    path = tmp_path / "s.pt"
    torch.save(state, path)
    eager = make()
    eager.load_state_dict(torch.load(path))
    model = lm.deferred_init(make)
    report = lm.load_checkpoint(model, path)
    assert sorted(report.loaded) == ["a", "b"]
    for name in ("a", "b"):
        assert torch.equal(getattr(model, name), getattr(eager, name)), name
    ptr = model.a.untyped_storage().data_ptr()
    assert model.b.untyped_storage().data_ptr() == ptr
    with torch.no_grad():
        model.a.add_(1)
        eager.a.add_(1)
    assert torch.equal(model.b, eager.b)
