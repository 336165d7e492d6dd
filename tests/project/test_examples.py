"""The README's main job runs end to end (shortened)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def _demo(workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO), "--epochs", "2", "--members", "3", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=600,
    )


# What the demo printed before it was told apart from what a reader needs:
# torch's deprecation of pytree LeafSpec (called by Lightning 2.6), Lightning's
# cloud tips, and the non-empty checkpoint directory of a second run.
_NOISE = ("deprecated", "Warning", "💡", "is not empty")


@pytest.mark.slow
def test_demo_trains_saves_and_reloads(tmp_path: Path) -> None:
    proc = _demo(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = _demo(tmp_path)  # a rerun into the same directory
    assert again.returncode == 0, again.stderr[-4000:]
    for out in (proc, again):
        noise = [
            line
            for line in (out.stdout + out.stderr).splitlines()
            if any(n in line for n in _NOISE)
        ]
        assert not noise, noise
    assert "members: 3" in proc.stdout and "template on meta: True" in proc.stdout
    assert "hypernetwork reloaded from" in proc.stdout
    ckpts = [*tmp_path.glob("ensemble/checkpoints/*.ckpt")]
    ckpts += tmp_path.glob("hypernetwork/checkpoints/*.ckpt")
    assert len(ckpts) == 2
    # Each path is printed whole on one line (rich wrapped them at 80 columns
    # inside a table title, which a reader could not copy), e.g. under pytest's
    # long tmp_path.
    lines = proc.stdout.splitlines()
    for ckpt in ckpts:
        assert any(str(ckpt) in line for line in lines), (ckpt, proc.stdout)
