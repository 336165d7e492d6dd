"""``load-check --trust`` for a class of the script that saved the checkpoint.

A Lightning checkpoint's hyper-parameters pickle the training script's own classes as
``__main__.Name``. The refusal told the user to allow ``'__main__:Color'`` with
``--trust``, which can never import (``__main__`` is the command line's own module).
Found by the hostile review of loading, 2026-12-05.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.processes import run_cli

TRAIN = """
import enum
import torch
from torch import nn


class Color(enum.Enum):
    RED = 1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)


if __name__ == "__main__":
    net = Net()
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
         "hyper_parameters": {"color": Color.RED}},
        "last.ckpt",
    )
    torch.save(net.state_dict(), "plain.pt")
"""

MODEL = """
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
"""


def test_a_class_of_the_saving_script_is_trusted_by_the_scripts_path(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "model.py").write_text(MODEL)
    subprocess.run([sys.executable, "train.py"], cwd=tmp_path, check=True, timeout=120)
    proc = run_cli("load-check", "model.py:Net", "last.ckpt", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "'__main__:Color'" in proc.stderr
    assert "trust them by that script's path (--trust path/to/script.py:TheClass)" in (proc.stderr)
    # The script's path: allowed under __main__.Color too.
    proc = run_cli(
        "load-check", "model.py:Net", "last.ckpt", "--trust", "train.py:Color", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    # __main__:Color, with the saving script as TARGET: looked up there.
    proc = run_cli(
        "load-check", "train.py:Net", "last.ckpt", "--trust", "__main__:Color", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    # ... and with a TARGET that does not define it: the fix names the script's path.
    proc = run_cli(
        "load-check", "model.py:Net", "last.ckpt", "--trust", "__main__:Color", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "Fix: --trust path/to/that_script.py:Color." in proc.stderr
    # A module name keeps its plain meaning (no __main__ alias for an importable module).
    proc = run_cli("load-check", "model.py:Net", "plain.pt", "--trust", "enum:Enum", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
