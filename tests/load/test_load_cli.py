"""``lightning-meta load-check``: progress on stderr, the report on stdout, exit statuses."""

from __future__ import annotations

import json
import sys
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


def test_load_check_prints_report(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The progress bar is drawn on a terminal only (see tests/cli/test_exit_codes.py).
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
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


EXITS = """
import sys
from torch import nn

class ExitsInConstructor(nn.Module):
    def __init__(self):
        super().__init__()
        sys.exit(0)
"""


def _damaged(checkpoint: Path, tmp_path: Path) -> Path:
    """A torch copy of the checkpoint with one bit flipped inside its largest tensor record."""
    import struct
    import zipfile

    from safetensors.torch import load_file

    path = tmp_path / "flipped.pt"
    torch.save(load_file(str(checkpoint)), path)
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with path.open("r+b") as f:
        f.seek(info.header_offset + 26)
        n, m = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + n + m + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 1]))
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dtype", "int8"], "--dtype 'int8' is not a floating point dtype"),
        (["--dtype", "floaty"], "--dtype 'floaty' is not a torch dtype"),
        (["--prefix", "nope"], "--prefix 'nope.' matches no checkpoint key"),
        (["--trust", "fractions:Nope"], "'fractions' has no attribute 'Nope'"),
        pytest.param(
            ["--device", "cuda"],
            "Fix: pass --device cpu",  # the option, not Python's device='cpu'
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs no CUDA"),
        ),
    ],
)
def test_load_check_bad_command_line_exits_2(
    extra: list[str], message: str, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["load-check", TARGET, str(checkpoint), "--json", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("init", ["deferred", "meta"])
def test_load_check_target_calling_sys_exit_exits_2(
    init: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # one module name per case: a module imported once stays imported
    (tmp_path / f"exits_at_import_{init}.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / f"exits_in_init_{init}.py").write_text(EXITS)
    for target in (f"exits_at_import_{init}.py:Net", f"exits_in_init_{init}.py:ExitsInConstructor"):
        spec = str(tmp_path / target)
        assert main(["load-check", spec, str(checkpoint), "--init", init, "--json"]) == 2, target
        out, err = capsys.readouterr()
        assert out == ""
        assert "sys.exit(0)" in err


def test_load_check_file_problems_exit_1(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    assert main(["load-check", TARGET, str(cut), "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "truncated" in err
    flipped = _damaged(checkpoint, tmp_path)
    assert main(["load-check", TARGET, str(flipped), "--verify"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "CRC-32" in err
    # without --verify only structure and sizes are checked
    assert main(["load-check", TARGET, str(flipped), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "torch"


def test_load_check_process_exit_status_and_streams(checkpoint: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    (tmp_path / "exits_in_init.py").write_text(EXITS)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "lightning_meta", "load-check"]
    bad = subprocess.run(
        [*cmd, str(tmp_path / "exits_in_init.py:ExitsInConstructor"), str(checkpoint), "--json"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert bad.stdout == ""
    assert [line for line in bad.stderr.splitlines() if line.strip()][-1].startswith(
        "lightning-meta load-check: error:"
    )
    good = subprocess.run(
        [*cmd, TARGET, str(checkpoint), "--json", "--verify"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["format"] == "safetensors"


HOLES = """
import torch
from torch import nn

class Holes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("scratch", torch.empty(3), persistent=False)
"""


def test_load_check_fixes_name_the_options_to_type(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refusal read on the command line names the option that fixes it, not the keyword."""
    import fractions

    state = {**ml.eager().state_dict(), "ratio": fractions.Fraction(1, 3)}
    torch.save(state, tmp_path / "untrusted.pt")
    assert main(["load-check", TARGET, str(tmp_path / "untrusted.pt")]) == 1
    err = capsys.readouterr().err
    assert "--trust module:Name" in err and "safe_globals" not in err, err
    (tmp_path / "holes.py").write_text(HOLES)
    torch.save(
        {f"lin.{k}": v for k, v in torch.nn.Linear(2, 2).state_dict().items()}, tmp_path / "lin.pt"
    )
    assert main(["load-check", f"{tmp_path / 'holes.py'}:Holes", str(tmp_path / "lin.pt")]) == 1
    err = capsys.readouterr().err
    assert "--allow-uninitialized" in err and "allow_uninitialized=True" not in err, err
    args = [f"{tmp_path / 'holes.py'}:Holes", str(tmp_path / "lin.pt"), "--allow-uninitialized"]
    assert main(["load-check", *args]) == 0
