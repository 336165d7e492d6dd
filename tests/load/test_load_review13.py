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


class _Rope(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        angles = torch.outer(torch.arange(8.0), torch.tensor([1.0, 0.01]))
        cs = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
        self.register_buffer("cos", cs[..., 0])  # interleaved views of one storage
        self.register_buffer("sin", cs[..., 1])


class _Windows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        s = torch.randn(6)
        self.register_buffer("b", s[:4])  # overlapping views, neither within the other
        self.register_buffer("c", s[2:])


@pytest.mark.parametrize("make", [_Rope, _Windows])
def test_tensors_sharing_memory_without_one_within_the_other_load(
    make: type[nn.Module], tmp_path: Path
) -> None:
    # The first version of the sharing above refused these (a regression of the day's
    # review), naming a fix that did not apply; each keeps memory of its own.
    path = tmp_path / "m.pt"
    torch.save(make().state_dict(), path)
    eager = make()
    eager.load_state_dict(torch.load(path))
    model = lm.deferred_init(make)
    lm.load_checkpoint(model, path)
    for name, t in eager.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name


class _Cached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.register_buffer("wt", self.emb.weight.detach().t(), persistent=False)
        self.cache = self.emb.weight.detach()[0]  # a plain attribute viewing the weight


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_plain_attribute_viewing_a_cast_weight_is_refused_with_the_fix_that_applies(
    dtype: torch.dtype, tmp_path: Path
) -> None:
    path = tmp_path / "m.pt"
    torch.save(_Cached().state_dict(), path)
    with pytest.raises(lm.MaterializationError, match="with dtype= or device=") as info:
        lm.load_checkpoint(lm.deferred_init(_Cached), path, dtype=dtype)
    assert "leaves deferred" not in str(info.value)
    assert list(info.value.paths) == ["cache"]


class _Top(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Embedding(5, 4)
        self.dec = nn.Embedding(5, 4, _weight=self.enc.weight.data)  # the encoder's table
        self.register_buffer("first_rows", self.enc.weight.detach()[:2])


def test_a_submodule_loaded_alone_is_seen_by_the_rest_materialized_later(tmp_path: Path) -> None:
    # Before, dec.weight and first_rows kept the values of construction in memory of
    # their own, where eager's enc.load_state_dict writes the shared table.
    path = tmp_path / "enc.pt"
    torch.save({"weight": torch.full((5, 4), 7.0)}, path)
    torch.manual_seed(0)
    eager = _Top()
    eager.enc.load_state_dict(torch.load(path))
    torch.manual_seed(0)
    model = lm.deferred_init(_Top)
    lm.load_checkpoint(model.enc, path)
    lm.materialize(model)
    for name, t in eager.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    ptr = model.enc.weight.untyped_storage().data_ptr()
    assert model.dec.weight.untyped_storage().data_ptr() == ptr
    assert model.first_rows.untyped_storage().data_ptr() == ptr
