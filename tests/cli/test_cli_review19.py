"""The command line under a hostile review (the nineteenth round, 2026-12-07, fourth session).

- ``estimate --strategy fsdp --precision 16-mixed`` (or ``64-true``) printed a figure,
  exit 0, for a run Lightning's ``ModelParallelStrategy`` refuses to start;
- ``check`` of a LightningModule with a lazy layer, or without ``configure_optimizers``,
  left Lightning's warnings on standard error (exit 0), and its round-trip note was
  torch's general advice with terminal escape codes, cut before the cause;
- ``estimate``'s fixes named ``example_inputs``, ``world_size`` and a Python tuple where
  the command line has ``--input``, ``--world-size`` and ``bf16,bf16``; a model's
  refusal of a sequence length was blamed on its code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.processes import run_cli

_MODELS = """
import torch
from torch import nn
import lightning as L


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


class Lazy(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.l = nn.LazyLinear(4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoOptimizer(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)


class Short(nn.Module):
    \"\"\"Refuses sequences longer than 64, as litgpt's GPT does.\"\"\"

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8)

    def forward(self, ids):
        if ids.size(1) > 64:
            raise ValueError(f"Cannot forward sequence of length {ids.size(1)}, max seq length is only 64.")
        return self.emb(ids)
"""


@pytest.fixture
def models(tmp_path: Path) -> Path:
    (tmp_path / "models.py").write_text(_MODELS)
    return tmp_path


@pytest.mark.parametrize("precision", ["16-mixed", "64-true"])
def test_a_precision_model_parallel_refuses_is_refused(models: Path, precision: str) -> None:
    proc = run_cli(
        "estimate", "models.py:MLP", "--input", "2,16:float32", "--strategy", "fsdp",
        "--world-size", "2", "--precision", precision, cwd=models,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert f"precision {precision!r} does not run under --strategy fsdp" in proc.stderr
    assert "Fix: pass --precision one of those, or --strategy ddp." in proc.stderr


@pytest.mark.parametrize("target", ["Lazy", "NoOptimizer"])
def test_check_leaves_nothing_on_standard_error(models: Path, target: str) -> None:
    proc = run_cli("check", f"models.py:{target}", cwd=models)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    assert "No meta problem found." in proc.stdout
    assert "\x1b[" not in proc.stdout
    if target == "Lazy":
        assert "Unsupported global: GLOBAL torch.nn.parameter.UninitializedParameter" in " ".join(
            proc.stdout.replace("│", " ").split()
        )


def test_estimates_fixes_name_the_command_lines_options(models: Path) -> None:
    wrong_shape = run_cli("estimate", "models.py:MLP", "--input", "2,15:float32", cwd=models)
    assert wrong_shape.returncode == 1
    assert "Fix: pass --input of the shapes" in wrong_shape.stderr
    assert "example_inputs" not in wrong_shape.stderr
    too_long = run_cli("estimate", "models.py:Short", "--input", "2,128:int64", cwd=models)
    assert too_long.returncode == 1
    assert "Fix: pass --input of the shapes" in too_long.stderr  # not "fix that code"
    pair = run_cli(
        "estimate", "models.py:MLP", "--input", "2,16:float32", "--strategy", "fsdp",
        "--world-size", "2", "--mixed-precision", "int8", cwd=models,
    )  # fmt: skip
    assert pair.returncode == 2
    assert "such as bf16,bf16" in pair.stderr
    ranks = run_cli(
        "estimate", "models.py:MLP", "--input", "2,16:float32", "--strategy", "ddp",
        "--world-size", "0", cwd=models,
    )  # fmt: skip
    assert ranks.returncode == 2
    assert "--world-size must be >= 1" in ranks.stderr


def test_a_closed_standard_output_leaves_the_exit_status_as_the_answer(models: Path) -> None:
    # `>&-`: estimate and load-check failed at their end with "unexpected AttributeError
    # ... raised by the model's code"; check's table (rich) already went nowhere, exit 0
    import os
    import subprocess
    import sys

    import torch

    import lightning_meta

    torch.save({"net.0.weight": torch.zeros(32, 16)}, models / "partial.pt")
    src = str(Path(lightning_meta.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    for argv, status in (
        (["check", "models.py:MLP", "--json"], 0),
        (["estimate", "models.py:MLP", "--input", "2,16", "--json"], 0),
        (["load-check", "models.py:MLP", "partial.pt", "--no-strict", "--json"], 0),
        (["load-check", "models.py:MLP", "partial.pt", "--json"], 1),  # missing keys
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "lightning_meta", *argv],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=models,
            timeout=300,
            check=False,
            preexec_fn=lambda: os.close(1),
        )
        assert proc.returncode == status, (argv, proc.stderr)
        assert "unexpected" not in proc.stderr, (argv, proc.stderr)
