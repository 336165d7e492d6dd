"""`lightning-meta check`: exit codes, printed paths, notes that do not count."""

from __future__ import annotations

import json
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
