"""load_checkpoint, hostile sweep of 2026-12-05 (evening): a checkpoint value that is
not a tensor (a nested list) was listed as both missing and unexpected, 'closest' to
itself, with a fix (a prefix, strict=False) that does not apply; with strict=False the
weight was skipped without an error, where load_state_dict refuses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_meta as lm
from support.processes import run_cli


@pytest.mark.parametrize("strict", [True, False])
def test_a_value_that_is_not_a_tensor_is_refused_as_malformed(tmp_path: Path, strict: bool) -> None:
    path = tmp_path / "listval.pt"
    torch.save({"0.weight": [[1.0] * 4] * 4, "0.bias": torch.zeros(4)}, path)
    with pytest.raises(RuntimeError, match="expected torch.Tensor"):  # as torch does
        nn.Sequential(nn.Linear(4, 4)).load_state_dict(torch.load(path), strict=strict)
    model = nn.Sequential(nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lm.MetaTensorError, match=r"not a tensor in the checkpoint \(1\)") as e:
        lm.load_checkpoint(model, path, strict=strict)
    assert e.value.paths == ("0.weight",)
    assert "missing" not in str(e.value) and "unexpected" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_check_names_the_malformed_key(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(
        "from torch import nn\n\n\nclass Net(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.lin = nn.Linear(4, 4)\n"
    )
    torch.save({"lin.weight": [[1.0] * 4] * 4, "lin.bias": torch.zeros(4)}, tmp_path / "l.pt")
    proc = run_cli("load-check", "net.py:Net", "l.pt", "--no-strict", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not a tensor in the checkpoint (1):\n    'lin.weight'" in proc.stderr
    assert "closest" not in proc.stderr


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)
        self.b.weight = self.a.weight


def test_a_tied_name_holding_a_value_that_is_not_a_tensor_is_refused(tmp_path: Path) -> None:
    # Another name of the group held a tensor: the list was only "unexpected", and
    # strict=False loaded without an error.
    state = _Tied().state_dict()
    state["b.weight"] = [[0.0, 0.0], [0.0, 0.0]]
    path = tmp_path / "tied.pt"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="expected torch.Tensor"):
        _Tied().load_state_dict(torch.load(path), strict=False)
    for strict in (True, False):
        with lm.deferred_init():
            model = _Tied()
        with pytest.raises(lm.MetaTensorError, match=r"not a tensor in the checkpoint") as e:
            lm.load_checkpoint(model, path, strict=strict)
        assert e.value.paths == ("b.weight",)
