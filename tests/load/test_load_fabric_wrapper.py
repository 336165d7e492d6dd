"""``lm.load_checkpoint`` into the module ``lm.fabric_setup`` returns (Fabric's wrapper).

Its ``state_dict`` and ``load_state_dict`` are the wrapped module's, so torch
loads a plain state dict into it; ``load_checkpoint`` saw the wrapper's own
submodules, refused every key with ``strict=True`` (and named a fix that fails
under DDP), and with ``strict=False`` loaded nothing and raised nothing (hostile
review of 2026-12-05).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_meta as lm
from support.processes import run_module
from support.run_fabric_load import Tied


@pytest.mark.parametrize("strict", [True, False])
def test_load_into_the_wrapper_fabric_setup_returns_on_one_device(
    tmp_path: Path, strict: bool
) -> None:
    torch.manual_seed(1)
    saved = Tied().state_dict()
    torch.save(saved, tmp_path / "tied.pt")
    fabric = L.Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    with lm.deferred_init():
        model = Tied()
    wrapper = lm.fabric_setup(fabric, model)
    report = lm.load_checkpoint(wrapper, tmp_path / "tied.pt", strict=strict)
    assert sorted(report.loaded) == sorted(saved)  # names as wrapper.state_dict() shows them
    state = wrapper.state_dict()
    assert sorted(state) == sorted(saved)
    for name, value in saved.items():
        assert torch.equal(state[name], value), name
    assert model.head.weight is model.emb.weight


@pytest.mark.slow
def test_load_into_the_wrapper_fabric_setup_returns_under_ddp(tmp_path: Path) -> None:
    proc = run_module("run_fabric_load", str(tmp_path), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(2)]
    for cases in ranks:
        assert sorted(cases) == ["strict=False", "strict=True"]
        for case in cases.values():
            assert case == {
                "differ": [],
                "tied": True,
                "loaded": ["emb.weight", "head.weight", "lin.bias", "lin.weight"],
            }
