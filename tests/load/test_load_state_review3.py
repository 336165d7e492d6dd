"""`load_checkpoint` leaves the state eager loading leaves: FSDP2 shards, gradients.

- An FSDP2 model that ran a ``no_grad`` forward holds unsharded copies that
  the next reshard frees: the load reshards first (as FSDP2's own load
  pre-hooks do for ``load_state_dict``), so training after it equals "load,
  then shard" (2 gloo ranks, `tests/support/run_fsdp_load_after_forward.py`).
- ``dtype=``/``device=`` on a real module convert each parameter's ``.grad``
  as ``module.to`` does: an AdamW step after a bf16 load equals eager's.
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
