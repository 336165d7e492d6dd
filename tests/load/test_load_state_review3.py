"""`load_checkpoint` leaves the state eager loading leaves: FSDP2 shards, gradients, strides.

- An FSDP2 model that ran a ``no_grad`` forward holds unsharded copies that
  the next reshard frees: the load reshards first (as FSDP2's own load
  pre-hooks do for ``load_state_dict``), so training after it equals "load,
  then shard" (2 gloo ranks, `tests/support/run_fsdp_load_after_forward.py`).
- ``dtype=``/``device=`` on a real module convert each parameter's ``.grad``
  as ``module.to`` does: an AdamW step after a bf16 load equals eager's.
- Meta, deferred and real targets keep the module's strides (a channels_last
  convolution, a parameter stored transposed), as ``to_empty()`` or eager
  construction then ``load_state_dict`` (then ``module.to``) do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_meta as lm
from support.capabilities import FSDP2_ON_CPU, FSDP2_ON_CPU_REASON
from support.processes import run_module


@pytest.mark.slow
@pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_ON_CPU_REASON)
def test_fsdp2_model_after_a_no_grad_forward_trains_as_load_then_shard(tmp_path: Path) -> None:
    proc = run_module("run_fsdp_load_after_forward", "2", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = {p.stem[7:]: json.loads(p.read_text()) for p in tmp_path.glob("result-*.json")}
    assert sorted(results) == ["0", "1"]
    for rank, cases in results.items():
        assert sorted(cases) == ["output_default", "whole_default", "whole_no_reshard"]
        for name, r in cases.items():
            assert r["losses"] == r["ref"], (rank, name)
            assert r["unequal"] == [], (rank, name)


def _trained(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    m = nn.Linear(4, 3)
    m(torch.randn(5, 4)).sum().backward()
    return m


@pytest.mark.parametrize("optimizer", ["foreach", "for-loop", "fused"])
def test_dtype_converts_gradients_as_module_to(optimizer: str, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.manual_seed(0)
    torch.save(nn.Linear(4, 3).state_dict(), path)
    eager = _trained(1)
    eager.load_state_dict(torch.load(path, weights_only=True))
    eager.to(torch.bfloat16)
    model = _trained(1)
    grad = model.weight.grad
    lm.load_checkpoint(model, path, dtype=torch.bfloat16)
    assert model.weight.grad is grad  # converted in place, as Module._apply does
    for name, p in model.named_parameters():
        e = eager.get_parameter(name)
        assert p.grad is not None and e.grad is not None
        assert p.grad.dtype == e.grad.dtype == torch.bfloat16, name
        assert torch.equal(p.grad, e.grad), name
    kwargs = {
        "foreach": {"foreach": True},
        "for-loop": {"foreach": False},
        "fused": {"fused": True},
    }
    for m in (eager, model):
        torch.optim.AdamW(m.parameters(), lr=0.1, **kwargs[optimizer]).step()
    for name, p in model.named_parameters():
        assert torch.equal(p, eager.get_parameter(name)), name


def test_a_failed_swap_gives_the_gradients_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_meta._load import _phases

    path = tmp_path / "m.pt"
    torch.save(nn.Linear(4, 3).state_dict(), path)
    model = _trained(1)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    calls = {"n": 0}
    real = _phases._set_data

    def failing(old: torch.Tensor, new: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # the second parameter's .grad
            raise RuntimeError("boom")
        real(old, new)

    monkeypatch.setattr(_phases, "_set_data", failing)
    with pytest.raises(lm.MetaTensorError, match="put back as it was"):
        lm.load_checkpoint(model, path, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None, name
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, grads[name]), name


class Laid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
        self.wt = nn.Parameter(torch.randn(5, 4).t())  # stored transposed
        self.register_buffer("cl", torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wt = nn.Parameter(torch.randn(5, 4).t())


@pytest.mark.parametrize("kind", ["meta", "deferred", "real"])
@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_strides_kept_as_eager(kind: str, dtype: torch.dtype | None, tmp_path: Path) -> None:
    # A deferred model cannot record .to(memory_format=...) of a submodule: Transposed.
    cls = Transposed if kind == "deferred" else Laid
    path = tmp_path / "m.pt"
    torch.manual_seed(0)
    # saved contiguous, as safetensors files always are
    torch.save({k: v.contiguous() for k, v in cls().state_dict().items()}, path)
    torch.manual_seed(1)
    eager = cls()
    eager.load_state_dict(torch.load(path, weights_only=True))
    if dtype is not None:
        eager.to(dtype)
    torch.manual_seed(1)
    if kind == "meta":
        with torch.device("meta"):
            model = cls()
    elif kind == "deferred":
        model = lm.deferred_init(cls)
    else:
        model = cls()
    lm.load_checkpoint(model, path, dtype=dtype)
    want = dict(eager.state_dict())
    got = dict(model.state_dict())
    assert sorted(got) == sorted(want)
    for name, t in got.items():
        assert t.stride() == want[name].stride(), name
        assert t.dtype == want[name].dtype, name
        assert torch.equal(t, want[name]), name


def test_a_checkpoint_saved_channels_last_is_taken_without_a_copy(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.manual_seed(0)
    torch.save(Laid().state_dict(), path)  # torch.save keeps the strides
    with torch.device("meta"):
        model = Laid()
    lm.load_checkpoint(model, path, mmap=True)
    # mapped from the file, not copied: the tensor's storage is the file's pages
    assert model.conv.weight.stride() == (27, 1, 9, 3)
    assert not model.conv.weight.untyped_storage().resizable()
