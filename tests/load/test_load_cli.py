"""``lightning-meta load-check``: progress on stderr, the report on stdout, exit statuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_meta._cli import main
from support import SUPPORT
from support import load_models as ml

TARGET = str(SUPPORT / "deferred_models.py") + ":NanoGPT"


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return ml.write("safetensors", ml.eager(), tmp_path)


def test_load_check_prints_report(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load-check", TARGET, str(checkpoint)]) == 0
    out, err = capsys.readouterr()
    assert "loaded 29 tensors" in out
    assert "replayed (2):" in out
    assert "lm_head.weight = transformer.wte.weight" in out
    assert "kB" in err or "MB" in err or "bytes" in err  # the progress bar, over bytes


def test_load_check_json(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load-check", TARGET, str(checkpoint), "--json", "--dtype", "bfloat16"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "safetensors"
    assert "lm_head.weight" in data["cast"]
    assert data["tied"] == [["lm_head.weight", "transformer.wte.weight"]]


def test_load_check_failures(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["load-check", TARGET, str(checkpoint), "--args", '{"n_embd": 8}']) == 1
    assert "shape mismatch" in capsys.readouterr().err
    assert main(["load-check", "torch.nn:Linnear", str(checkpoint)]) == 2
    assert "'Linear'" in capsys.readouterr().err
    assert main(["load-check", TARGET, str(checkpoint), "--dtype", "floaty"]) == 2
    assert "--dtype 'floaty' is not a torch dtype" in capsys.readouterr().err
    torch.save({"x": torch.ones(1)}, tmp_path / "x.pt")
    assert main(["load-check", TARGET, str(tmp_path / "x.pt"), "--no-strict"]) == 0
    assert "unexpected (1):" in capsys.readouterr().out
