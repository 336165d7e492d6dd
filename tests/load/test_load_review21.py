"""The fix for load code in a ``torch.distributed.checkpoint`` directory (2026-12-07, sixth
session): it said "dcp_to_torch_save writes it as one torch file, the prefix 'model.'
stripped from its keys", but that file holds the mapping as it was saved, nested: a
Trainer's under ``["state_dict"]``, Fabric's ``{"model": model}`` under ``["model"]``, and
stripping "model." from its top keys found nothing. Followed as now written, each works."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import lightning_meta as lm
from load.test_load_review14 import _Doubling


@pytest.mark.parametrize("layout", ["trainer", "fabric"])
def test_the_fix_for_a_dcp_directory_indexes_the_mapping_as_saved(
    layout: str, tmp_path: Path
) -> None:
    state = _Doubling().state_dict()
    saved = (
        {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 1}
        if layout == "trainer"
        else {"model": dict(state), "step": 3}
    )
    with warnings.catch_warnings():  # torch's note that no process group is initialized
        warnings.simplefilter("ignore")
        dcp.save(saved, checkpoint_id=tmp_path / "ckpt")
    model = lm.deferred_init(_Doubling)
    with pytest.raises(lm.MetaTensorError, match="with values it computes") as refused:
        lm.load_checkpoint(model, tmp_path / "ckpt")
    said = " ".join(str(refused.value).split())
    assert (
        "dcp_to_torch_save writes it as one torch file, its mappings nested as they were saved"
        in said
    )
    # what the words say, in code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(tmp_path / "ckpt", tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    if layout == "trainer":
        assert "its ['state_dict'], the prefix 'model.' stripped from its keys" in said
        loaded = {k.removeprefix("model."): v for k, v in full["state_dict"].items()}
    else:
        assert (
            "the mapping under its 'model', as Fabric's save of {'model': model} holds it" in said
        )
        loaded = full["model"]
    lm.materialize(model)
    model.load_state_dict(loaded)
    assert torch.equal(model.proj.weight, state["proj.weight"] * 2)
    assert torch.equal(model.proj.bias, state["proj.bias"])
