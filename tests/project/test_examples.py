"""The README's main job runs end to end (shortened)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


@pytest.mark.slow
def test_demo_trains_saves_and_reloads(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--epochs", "2", "--members", "3", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "members: 3" in proc.stdout and "template on meta: True" in proc.stdout
    assert "hypernetwork reloaded from" in proc.stdout
    assert list(tmp_path.glob("ensemble/checkpoints/*.ckpt"))
    assert list(tmp_path.glob("hypernetwork/checkpoints/*.ckpt"))
