"""`lightning-meta check`: exit codes, printed paths, notes that do not count."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_meta._cli import main
from support import SUPPORT

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

MODELS = SUPPORT / "guard_models.py"


def test_clean_module_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", f"{MODELS}:Clean"]) == 0
    out = capsys.readouterr().out
    assert "No meta problem found." in out
    assert "MetaTemplate" in out and "teacher" in out  # the template is listed, as ok


def test_deferred_module_exits_0_and_lists_deferred(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", f"{MODELS}:Seeded", '{"mode": "init"}', "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["step"], r["path"]): r["status"] for r in report["findings"]}
    assert rows[("find meta tensors", "model.0.fc.weight")] == "info"
    assert rows[("materialize deferred", "")] == "ok"
    assert rows[("pickle", "")] == "ok"


def test_stray_meta_module_exits_1_with_paths(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", f"{MODELS}:Stray"]) == 1
    out = capsys.readouterr().out
    for path in ("teacher.0.weight", "teacher.0.bias", "teacher.2.weight", "teacher.2.bias"):
        assert path in out
    assert "problem" in out and "MetaTemplate" in out and "deferred_init" in out


def test_layers_built_in_setup_are_checked_as_the_trainer_sees_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # check called configure_model but not setup(stage), which the Trainer calls
    # first: "No meta problem found." for a module MetaGuard refuses.
    assert main(["check", f"{MODELS}:BuiltInSetup", "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)["findings"]
    assert [r["step"] for r in rows][:2] == ["setup('fit')", "configure_model"]
    problems = {r["path"] for r in rows if r["step"] == "find meta tensors"}
    assert {"teacher.0.weight", "teacher.2.bias"} <= problems


def test_json_lists_every_failed_step(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", f"{MODELS}:Stray", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    problems = {r["step"] for r in report["findings"] if r["status"] == "problem"}
    assert problems == {
        "find meta tensors",
        "device transfer (.to('cpu'))",
        "state_dict round trip",
    }


def test_unpicklable_attribute_is_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "lm_check_target.py").write_text(
        "import lightning as L, torch, threading\n"
        "class Locked(L.LightningModule):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.layer = torch.nn.Linear(2, 2)\n"
        "        self.lock = threading.Lock()\n"
    )
    assert main(["check", f"{tmp_path / 'lm_check_target.py'}:Locked", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["findings"]
    assert [r["status"] for r in rows if r["step"] == "pickle"] == ["note"]


def test_a_failed_materialize_is_one_problem_with_its_own_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An uninitialised buffer made materialize fail, and the steps after it
    # failed on the tensors it left deferred: 4 problems for one cause, and
    # a closing fix telling the user to use deferred_init, which they did.
    (tmp_path / "lm_check_uninit.py").write_text(
        "import lightning as L, torch, lightning_meta as lm\n"
        "class Uninit(L.LightningModule):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        with lm.deferred_init():\n"
        "            self.net = torch.nn.Linear(4, 4)\n"
        "            self.register_buffer('cache', torch.empty(3), persistent=False)\n"
        "    def configure_optimizers(self):\n"
        "        return torch.optim.SGD(self.parameters(), lr=0.1)\n"
    )
    target = f"{tmp_path / 'lm_check_uninit.py'}:Uninit"
    assert main(["check", target, "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)["findings"]
    problems = [r for r in rows if r["status"] == "problem"]
    assert [(r["step"], r["path"]) for r in problems] == [("materialize deferred", "cache")]
    assert "Fix:" in problems[0]["detail"] and "allow_uninitialized=True" in problems[0]["detail"]
    skipped = [r["step"] for r in rows if r["detail"].startswith("not run")]
    assert skipped == [
        "device transfer (.to('cpu'))",
        "state_dict round trip",
        "optimizer construction",
    ]
    assert main(["check", target]) == 1
    out = capsys.readouterr().out
    assert "1 meta problem(s) found: the fix of each is in its row." in out
    assert "build the module inside" not in out


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module_xyz:Model", "no module named"),
        (f"{MODELS}:Strayy", "has no attribute"),
        ("torch.nn:Linear", "missing"),
    ],
)
def test_bad_target_exits_2(target: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", target]) == 2
    assert message in capsys.readouterr().err


HIDDEN = """
import lightning as L
import torch
from torch import nn


class Listed(L.LightningModule):
    # the classic workaround: a meta teacher in a plain list, outside the module tree
    def __init__(self):
        super().__init__()
        self.student = nn.Linear(4, 4)
        self.templates = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)).to("meta")]


class Keyed(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.student = nn.Linear(4, 4)
        self.bag = {"teacher": nn.Linear(4, 4, device="meta")}
"""


@pytest.fixture
def hidden_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / f"lm_check_hidden_{tmp_path.name.replace('-', '_')}.py"
    path.write_text(HIDDEN)
    yield path
    sys.modules.pop(path.stem, None)


def test_module_in_a_plain_list_is_a_note_that_names_metatemplate(
    hidden_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", f"{hidden_file}:Listed"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the table's line wrapping
    assert "No meta problem found." in out
    # one row for the module, not one per tensor
    assert "meta Sequential (4 meta tensors) held outside the module tree" in out
    assert "templates.0.weight" not in out
    assert "Note: 1 meta module(s) held in a plain attribute or container (templates.0)" in out
    assert "lightning_meta.MetaTemplate(module) is the supported form" in out
    assert "Fix: hold lightning_meta.MetaTemplate(module) there instead of the module." in out


def test_json_lists_hidden_modules_with_the_fix(
    hidden_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", f"{hidden_file}:Keyed", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["hidden_modules"] == [
        {
            "path": "bag.teacher",
            "type": "Linear",
            "tensors": ["bag.teacher.weight", "bag.teacher.bias"],
            "detail": report["hidden_modules"][0]["detail"],
            "fix": "Hold lightning_meta.MetaTemplate(module) there instead of the module.",
        }
    ]
    assert "MetaTemplate(module) is the supported form" in report["hidden_modules"][0]["detail"]
    notes = {r["path"] for r in report["findings"] if r["status"] == "note"}
    assert notes == {"bag.teacher.weight", "bag.teacher.bias"}  # every tensor, for machines
    assert main(["check", f"{MODELS}:Clean", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hidden_modules"] == []


def test_target_that_exits_while_built_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "lm_check_exits.py").write_text(
        "import sys\nfrom torch import nn\n"
        "class Exits(nn.Module):\n"
        "    def __init__(self):\n"
        "        sys.exit(0)\n"
    )
    try:
        assert main(["check", f"{tmp_path / 'lm_check_exits.py'}:Exits", "--json"]) == 2
    finally:
        sys.modules.pop("lm_check_exits", None)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "building it called sys.exit(0)" in captured.err and "Traceback" not in captured.err
