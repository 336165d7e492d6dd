"""Tests for lightning_meta._cli._target: resolving a CLI TARGET and its JSON arguments."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
from torch import nn

from lightning_meta import MetaTensorError
from lightning_meta._cli._target import import_file, load_target, parse_arguments, target_factory

MODEL_FILE = """
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(4, hidden)

    def forward(self, x):
        return self.fc(x)


def make(hidden=8):
    return Net(hidden)


instance = Net(3)
not_module = 3
"""


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    name = f"lm_target_models_{tmp_path.name.replace('-', '_')}"
    path = tmp_path / f"{name}.py"
    path.write_text(MODEL_FILE)
    yield path
    sys.modules.pop(name, None)


def test_dotted_target() -> None:
    assert load_target("torch.nn:Linear") is nn.Linear
    assert load_target("torch:nn.Linear") is nn.Linear


def test_file_target_is_a_real_module_and_pickles(model_file: Path) -> None:
    cls = load_target(f"{model_file}:Net")
    assert cls.__module__ == model_file.stem
    assert sys.modules[model_file.stem].__file__ == str(model_file)
    net = cls(hidden=5)
    clone = pickle.loads(pickle.dumps(net))
    assert type(clone) is cls
    assert str(model_file.parent) not in sys.path  # sys.path restored
    assert import_file(model_file) is sys.modules[model_file.stem]  # imported once


def test_target_factory_with_arguments(model_file: Path) -> None:
    build = target_factory(f"{model_file}:Net", '{"hidden": 6}')
    assert build().fc.out_features == 6
    assert target_factory(f"{model_file}:make", "[7]")().fc.out_features == 7
    assert target_factory(f"{model_file}:instance")().fc.out_features == 3


def test_parse_arguments(tmp_path: Path) -> None:
    assert parse_arguments(None) == ([], {})
    assert parse_arguments("[1, 2]") == ([1, 2], {})
    assert parse_arguments('{"a": 1}') == ([], {"a": 1})
    assert parse_arguments("5") == ([5], {})
    args = tmp_path / "args.json"
    args.write_text('{"hidden": 2}')
    assert parse_arguments(f"@{args}") == ([], {"hidden": 2})


def test_bad_targets(model_file: Path) -> None:
    with pytest.raises(
        MetaTensorError,
        match=r"target 'torch.nn.Linear': expected MODULE:NAME.*package.module:Name",
    ):
        load_target("torch.nn.Linear")
    with pytest.raises(
        MetaTensorError, match=r"target 'no_such_pkg.models:Net': no module named 'no_such_pkg'"
    ):
        load_target("no_such_pkg.models:Net")
    with pytest.raises(
        MetaTensorError, match=r"'torch.nn' has no attribute 'Linaer'. Fix: use 'Linear'"
    ):
        load_target("torch.nn:Linaer")
    with pytest.raises(MetaTensorError, match=r"no Python file at 'missing/model.py'"):
        load_target("missing/model.py:Net")
    with pytest.raises(MetaTensorError, match=r"not valid JSON"):
        target_factory(f"{model_file}:Net", "{hidden: 3}")
    with pytest.raises(MetaTensorError, match=r"instance, which takes no arguments"):
        target_factory(f"{model_file}:instance", "[1]")


def test_a_target_that_is_no_model_is_named_with_a_fix_that_applies(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_meta._cli import main

    spec = f"{model_file}:not_module"
    with pytest.raises(MetaTensorError) as info:
        target_factory(spec)
    assert str(info.value) == (
        f"target {spec!r}: it is 3, of type int, not a model. Fix: point TARGET at an "
        "nn.Module (or LightningModule) class, a function that returns one, or a module "
        "instance."
    )
    for command in (["estimate", spec, "--input", "8,4"], ["check", spec]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"target {spec!r}: it is 3" in err and "<lambda>" not in err
    # a module instance is named as the target too
    assert target_factory(f"{model_file}:instance").__qualname__ == f"{model_file}:instance"


def test_file_that_fails_to_import(tmp_path: Path) -> None:
    bad = tmp_path / "lm_target_broken.py"
    bad.write_text("raise ImportError('needs a GPU library')\n")
    with pytest.raises(
        MetaTensorError,
        match=r"importing .*lm_target_broken.py' raised ImportError: needs a GPU library",
    ):
        load_target(f"{bad}:Net")
    assert "lm_target_broken" not in sys.modules


def test_module_name_conflict(tmp_path: Path) -> None:
    clash = tmp_path / "json.py"  # the name of a module already imported
    clash.write_text("X = 1\n")
    with pytest.raises(
        MetaTensorError, match=r"module name 'json' is already taken.*rename json.py"
    ):
        load_target(f"{clash}:X")
