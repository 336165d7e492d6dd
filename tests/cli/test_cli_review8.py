"""The command line, hostile sweep of 2026-12-05 (evening): with ``--json``, what the
model writes below Python (a subprocess it starts, C's ``printf``) went to standard
output ahead of the JSON document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_meta as lm
from support.processes import run_cli

NOISY = """
import ctypes
import subprocess
import sys

from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # a model that records its git revision, and a C library that prints
        subprocess.run([sys.executable, "-c", "print('from a subprocess')"], check=True)
        ctypes.CDLL(None).printf(b"from C's printf\\n")  # left in C's buffer
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)
"""


@pytest.mark.parametrize("command", ["check", "estimate"])
def test_json_output_is_one_document_whatever_the_model_prints(
    tmp_path: Path, command: str
) -> None:
    (tmp_path / "noisy.py").write_text(NOISY)
    extra = ["--input", "2,4:float32"] if command == "estimate" else []
    proc = run_cli(command, "noisy.py:Net", *extra, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
    assert "from a subprocess" in proc.stderr
    assert "from C's printf" in proc.stderr


def test_a_file_name_with_a_dot_is_refused_with_a_rename(tmp_path: Path) -> None:
    # 'No module named model' and "fix the error in that file", which has none.
    (tmp_path / "model.v2.py").write_text(NOISY.replace("ctypes.CDLL", "# "))
    proc = run_cli("check", "model.v2.py:Net", cwd=tmp_path)
    assert proc.returncode == 2
    assert "has a dot before '.py'" in proc.stderr
    assert "rename it (e.g. model_v2.py)" in proc.stderr
    (tmp_path / "model.v2.py").rename(tmp_path / "model_v2.py")
    proc = run_cli("check", "model_v2.py:Net", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_no_standard_output_stream_is_no_error(tmp_path: Path) -> None:
    # sys.stdout is None under pythonw or with descriptor 1 closed (`>&-`): the
    # redirection's flush raised, blamed on the target ("fix the error in that module").
    (tmp_path / "clean.py").write_text(NOISY.replace("ctypes.CDLL", "# "))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.stdout = None; from lightning_meta._cli import "
            "main; sys.exit(main(['check', 'clean.py:Net']))",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(lm.__file__).parent.parent)},
    )
    assert proc.returncode == 0, proc.stderr
