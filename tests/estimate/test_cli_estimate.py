"""Tests for the ``lightning-meta estimate`` sub-command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_meta
from lightning_meta._cli import main
from support.zoo_models import LLAMA_HF_CONFIG as LLAMA

NET = """
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, hidden)
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())
"""


@pytest.fixture
def net_file(tmp_path: Path) -> Path:
    path = tmp_path / f"lm_cli_net_{tmp_path.name.replace('-', '_')}.py"
    path.write_text(NET)
    yield path
    sys.modules.pop(path.stem, None)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    src = str(Path(lightning_meta.__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "lightning_meta", "estimate", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_json_subprocess_stdout_is_only_json(net_file: Path) -> None:
    proc = _run(f"{net_file}:Net", "--args", '{"hidden": 8}', "--input", "8,16:float32", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["parameters"] == 16 * 8 + 8 + 8 * 4 + 4
    assert doc["forward_flops"] == 2 * 8 * 16 * 8 + 2 * 8 * 8 * 4
    assert doc["optimizer"] == "adamw"


def test_lstm_subprocess_survives_the_real_kernel_check() -> None:
    # the kernel check ran mkldnn_rnn_layer on tensors shrunk to 2 per dimension
    # with hidden_size=128 kept: the real kernel read past them and the process died
    proc = _run("torch.nn:LSTM", "--args", "[64, 128, 2]", "--input", "20,8,64:float32", "--json")
    assert proc.returncode == 0, proc.stderr
    expected = sum(p.numel() for p in torch.nn.LSTM(64, 128, 2).parameters())
    assert json.loads(proc.stdout)["parameters"] == expected


def test_bad_target_exits_2_subprocess() -> None:
    proc = _run("no_such_module:Net", "--input", "8,16")
    assert proc.returncode == 2
    assert "no module named 'no_such_module'" in proc.stderr
    assert proc.stdout == ""


def test_table(net_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        [
            "estimate",
            f"{net_file}:Net",
            "--input",
            "8,16:float32",
            "--optimizer",
            "sgd",
            "--depth",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "peak training-step memory" in out
    assert "input values read as zeros" not in out
    assert "fc1" in out
    assert "KiB" in out


BRANCHING = """
from torch import nn


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.extra = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return h if bool((x == 0).all()) else self.extra(h)
"""


def test_inputs_read_as_zeros_are_shown_in_the_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"lm_cli_branching_{tmp_path.name.replace('-', '_')}.py"
    path.write_text(BRANCHING)
    try:
        argv = ["estimate", f"{path}:Branching", "--input", "8,16:float32", "--optimizer", "sgd"]
        assert main([*argv, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["inputs_read_as_zeros"] == ["aten._local_scalar_dense in Branching, reading x"]
        assert main(argv) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "input values read as zeros" in out
        # the table wraps the cell at the comma
        assert "aten._local_scalar_dense in Branching," in out and "reading x" in out
    finally:
        sys.modules.pop(path.stem, None)


def test_hf_config_json_text_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = json.dumps(LLAMA)
    assert main(["estimate", "--hf-config", text, "--input", "1,16:int64", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (tmp_path / "config.json").write_text(text)
    assert (
        main(
            [
                "estimate",
                "LlamaForCausalLM",
                "--hf-config",
                str(tmp_path),
                "--input",
                "1,16:int64",
                "--json",
                "--precision",
                "bf16-mixed",
            ]
        )
        == 0
    )
    doc2 = json.loads(capsys.readouterr().out)
    assert doc["parameters"] == doc2["parameters"] > 0
    assert doc2["precision"] == "bf16-mixed"


def test_errors(net_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", f"{net_file}:Nett", "--input", "8,16"]) == 2
    assert "use 'Net'" in capsys.readouterr().err
    assert main(["estimate", f"{net_file}:Net", "--input", "8,15:float32"]) == 1
    assert "in module 'fc1'" in capsys.readouterr().err
    assert main(["estimate", f"{net_file}:Net", "--input", "8,16", "--optimizer", "lion"]) == 2
    assert "unknown optimizer 'lion'" in capsys.readouterr().err
    assert main(["estimate", f"{net_file}:Net", "--input", "8,16", "--precision", "8-true"]) == 2
    assert "unknown precision '8-true'" in capsys.readouterr().err
    assert main(["estimate", "--hf-config", "{}", "--input", "1,4:int64"]) == 2
    assert "has no 'model_type'" in capsys.readouterr().err
    assert main(["estimate", "--input", "1,4:int64"]) == 2
    assert "no TARGET" in capsys.readouterr().err


def test_optimizer_class_target(net_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "estimate",
                f"{net_file}:Net",
                "--input",
                "8,16",
                "--optimizer",
                "torch.optim:Adagrad",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["optimizer"] == "Adagrad"
    assert (
        main(["estimate", f"{net_file}:Net", "--input", "8,16", "--optimizer", "none", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["optimizer_state_bytes"] == 0


def test_deep_stack_extrapolated_unless_asked(capsys: pytest.CaptureFixture[str]) -> None:
    text = json.dumps({**LLAMA, "num_hidden_layers": 10})
    assert main(["estimate", "--hf-config", text, "--input", "1,16:int64", "--json"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert (
        main(
            ["estimate", "--hf-config", text, "--input", "1,16:int64", "--json", "--no-extrapolate"]
        )
        == 0
    )
    full = json.loads(capsys.readouterr().out)
    assert "extrapolated exactly" in fast.pop("method")
    assert full.pop("method") == "full step"
    assert fast == full


def test_bad_device_exits_2(net_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a bad command line, like any other unknown option value
    assert main(["estimate", f"{net_file}:Net", "--input", "8,16", "--device", "bogus"]) == 2
    assert "device='bogus', which torch does not recognise" in capsys.readouterr().err


def test_fit_that_reaches_the_search_limit_says_at_least(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["estimate", "torch.nn:Linear", "--args", "[16, 4]", "--input", "8,16:float32",
            "--optimizer", "sgd", "--memory", "4GiB", "--fit", "batch"]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["value"] == doc["limit"] == 2**20 and doc["at_limit"] is True
    assert doc["fits_peak_bytes"] < 4 * 2**30 and doc["beyond_peak_bytes"] is None
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "largest batch within 4.00 GiB per device: at least 1048576 (the search limit)" in out


@pytest.mark.parametrize(
    ("optimizer", "why"),
    [
        ("torch.optim:ASGD", "its step\\(\\) reads the values of its own state"),
        ("torch.optim:LBFGS", "its step\\(\\) needs a closure"),
    ],
)
def test_an_optimizer_that_cannot_be_simulated_is_a_bad_option_exit_2(
    net_file: Path, capsys: pytest.CaptureFixture[str], optimizer: str, why: str
) -> None:
    # the optimizer is an option: status 2, not 1 ("a problem found in the model")
    argv = ["estimate", f"{net_file}:Net", "--input", "8,16:float32", "--optimizer", optimizer]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(f"the optimizer {optimizer.partition(':')[2]} of Net cannot be simulated", err)
    assert re.search(why, err)
    assert "Fix: pass an optimizer whose step" in err
    assert "the model reads tensor values" not in err


def test_fit_sequence_on_a_model_without_a_sequence_says_what_it_varied(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["estimate", "torch.nn:Linear", "--args", "[32, 8]", "--input", "4,32:float32",
            "--memory", "80GiB", "--fit", "sequence"]  # fmt: skip
    assert main(argv) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "vary='sequence' (--fit sequence) varies dim 1 of the inputs, given as 32" in err
    assert "search the batch instead: vary='batch' (--fit batch)" in err
    assert "Fix: pass example_inputs" not in err  # the inputs as given are fine


def test_hf_config_path_that_does_not_exist_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "config.json"
    assert main(["estimate", "--hf-config", str(missing), "--input", "1,4:int64"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no such file" in err
    assert "Expecting value" not in err


def test_a_lazy_module_target_is_a_problem_of_the_model_with_a_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"lm_cli_lazy_{tmp_path.name.replace('-', '_')}.py"
    path.write_text(
        "from torch import nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.LazyLinear(64), nn.ReLU(), nn.LazyLinear(4))\n"
    )
    try:
        assert main(["estimate", f"{path}:net", "--input", "8,16"]) == 1
    finally:
        sys.modules.pop(path.stem, None)
    err = capsys.readouterr().err
    assert "unexpected" not in err
    assert "'0.weight'" in err and "Fix:" in err and "model(torch.empty(8, 16))" in err


def test_a_warning_is_one_line_of_the_command(tmp_path: Path) -> None:
    # Before: Python's format, naming the CLI's own source line and repeating it
    # (".../_cli/_estimate.py:392: MetaTensorWarning: estimate: ... result = estimate(...)").
    path = tmp_path / f"lm_cli_conv_{tmp_path.name.replace('-', '_')}.py"
    path.write_text("from torch import nn\n\ndef net():\n    return nn.Conv2d(3, 32, 3)\n")
    proc = _run(f"{path}:net", "--input", "4,3,16,16", "--json")
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lightning-meta estimate: warning: peak_bytes of Conv2d may be")
    assert "oneDNN convolution" in lines[0] and "_cli" not in lines[0]


def test_a_warning_made_an_error_by_the_process_filters_says_so(tmp_path: Path) -> None:
    path = tmp_path / f"lm_cli_conv_w_{tmp_path.name.replace('-', '_')}.py"
    path.write_text("from torch import nn\n\ndef net():\n    return nn.Conv2d(3, 32, 3)\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(lightning_meta.__file__).parent.parent), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [
            sys.executable,
            *("-W", "error:estimate"),  # the package's warnings, whose text starts so
            *("-m", "lightning_meta", "estimate", f"{path}:net", "--input", "4,3,16,16"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("lightning-meta estimate: error: peak_bytes of Conv2d")
    assert "raised as an error by this process's warning filters" in proc.stderr
    assert "unexpected" not in proc.stderr
