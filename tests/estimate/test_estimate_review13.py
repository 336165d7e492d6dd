"""estimate and its command line under a hostile review (thirteenth round): the caller's grad
mode, submodules in eval mode, layers built in ``configure_model``, sizes that must be refused,
fixes in command-line spelling, and standard output closed by its reader."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta as lm
from lightning_meta._cli import main
from lightning_meta._cli._main import EXIT_BROKEN_PIPE


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 1024), nn.Dropout(0.5), nn.ReLU(), nn.Linear(1024, 4))


@pytest.mark.parametrize("ambient", [torch.no_grad, torch.inference_mode, contextlib.nullcontext])
def test_the_callers_grad_mode_does_not_reach_the_step(ambient: Callable[[], object]) -> None:
    # Before, under no_grad the loss was blamed for not requiring grad (a fix that did
    # not apply), and under inference_mode the optimizer could not be stepped.
    expected = lm.estimate(_mlp, "8,16:float32")
    with ambient():  # type: ignore[attr-defined]
        got = lm.estimate(_mlp, "8,16:float32")
    assert got.peak_bytes == expected.peak_bytes
    assert got.backward_flops == expected.backward_flops


def test_submodules_train_in_the_mode_they_are_in_as_under_lightning() -> None:
    # Lightning >= 2.2 calls no .train(): a model left in eval mode (as from_pretrained
    # returns it) trains with dropout off. Before, estimate put every submodule in
    # train mode and counted dropout masks the real step does not make.
    model = _mlp()
    trained = lm.estimate(model, "256,16:float32").peak_bytes
    model.eval()
    evaluated = lm.estimate(model, "256,16:float32").peak_bytes
    assert evaluated < trained
    assert not any(m.training for m in model.modules())  # left as it was


class _Configured(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = torch.randn(8, 16)
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        return self.net(x)


def test_layers_built_in_configure_model_are_estimated() -> None:
    # Before, configure_model was never called: "no attribute 'net'", blamed on the model.
    reference = lm.estimate(
        lambda: nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)), "8,16"
    )
    assert lm.estimate(_Configured).parameters == reference.parameters == 16 * 64 + 64 + 64 * 4 + 4
    user = _Configured()
    assert lm.estimate(user).parameters == reference.parameters
    assert user.net is None  # configured on a copy: the Trainer still builds it


@pytest.mark.parametrize("memory", [10**400, 0.5, 0])
def test_find_fit_refuses_a_budget_that_is_not_a_size(memory: object) -> None:
    with pytest.raises(lm.ArgumentValueError, match="not a positive size"):
        lm.find_fit(_mlp, "8,16", memory=memory)  # type: ignore[arg-type]


def test_a_bool_is_not_a_size_of_an_input_spec() -> None:
    with pytest.raises(lm.ArgumentTypeError, match="sequence of integers"):
        lm.estimate(_mlp, lm.InputSpec((True, 16)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("extra", "fix"),
    [
        (["--world-size", "4"], "--strategy ddp or --strategy fsdp"),
        (["--strategy", "ddp"], "--world-size 8"),
        (["--strategy", "fsdp", "--world-size", "2", "--blocks", "nope"], "--blocks nope"),
        (
            ["--strategy", "fsdp", "--world-size", "4", "--tensor-parallel", "3"],
            "--tensor-parallel",
        ),
    ],
)
def test_command_line_fixes_name_options(
    extra: list[str], fix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / f"est13_{abs(hash(tuple(extra)))}.py"  # a module name of its own
    target.write_text(
        "from torch import nn\n"
        "def mlp():\n"
        "    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))\n"
    )
    assert main(["estimate", f"{target}:mlp", "--input", "8,16", *extra]) == 2
    err = capsys.readouterr().err
    assert fix in err
    assert "world_size=" not in err and "strategy='" not in err and "blocks=" not in err


def test_output_closed_by_its_reader_is_not_blamed_on_the_model(tmp_path: Path) -> None:
    # Before: "the model's code called sys.exit(1)" (rich's answer to a broken pipe), exit 1.
    (tmp_path / "m.py").write_text(
        "from torch import nn\n"
        "def mlp():\n"
        "    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(40)])\n"
    )
    import lightning_meta

    src = str(Path(lightning_meta.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": src}
    env.pop("LIGHTNING_META_TRACEBACK", None)
    command = f"{sys.executable} -m lightning_meta estimate m.py:mlp --input 8,16 --depth 2"
    done = subprocess.run(
        ["bash", "-c", f"{command} | head -c 1 >/dev/null; echo ${{PIPESTATUS[0]}} >&2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.stderr.strip().splitlines()[-1] == str(EXIT_BROKEN_PIPE), done.stderr
    assert "sys.exit" not in done.stderr


_CACHE: dict[int, torch.Tensor] = {}


class _Cached(nn.Module):
    """Keeps a tensor its forward computes in a process-wide cache, as transformers' DINOv3
    ViT does with its patch coordinates (functools.lru_cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] not in _CACHE:
            _CACHE[x.shape[0]] = torch.linspace(0, 1, 4)
        return self.lin(x) * _CACHE[x.shape[0]]


def test_a_tensor_of_the_step_kept_outside_the_model_raises_when_used_later() -> None:
    # Before, a real model run after the estimate computed on the cached fake tensor: a
    # fake loss, fake gradients, and an optimizer step that changed nothing, no error.
    _CACHE.clear()
    lm.estimate(_Cached, "8,16")
    real = _Cached()
    with pytest.raises(lm.MetaTensorError, match="after the estimate ended"):
        real(torch.randn(8, 16))
    _CACHE.clear()
    assert real(torch.randn(8, 16)).shape == (8, 4)  # what the fix says works
