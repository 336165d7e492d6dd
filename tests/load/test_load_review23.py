"""Loading, eighth session (2026-12-08).

A LightningModule that sets ``strict_loading = True`` was refused a partial file with
``strict=False`` (``--no-strict``) as the fix, which its own ``strict_loading`` then
refuses as a contradiction: the fix names ``strict_loading = False`` for such a module,
and the contradiction speaks the command line's name. A plain state dict loaded into a
module with its own ``on_load_checkpoint`` skipped the hook without a word. Each test failed on 15fb339, the
tree before it, except the control named in its docstring.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_meta as lm
from lightning_meta._cli import main


class LitHead(L.LightningModule):
    def __init__(self, head: bool = True) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        if head:
            self.head = nn.Linear(4, 2)

    def training_step(self, batch: Any, i: int) -> torch.Tensor:
        out: torch.Tensor = self.body(batch[0]).pow(2).mean()
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LitStrictHead(LitHead):
    def __init__(self) -> None:
        super().__init__()
        self.strict_loading = True


class LitLooseHead(LitHead):
    def __init__(self) -> None:
        super().__init__()
        self.strict_loading = False


def _body_only_checkpoint(tmp_path: Path) -> Path:
    """A file Lightning wrote from the model without its head."""
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LitHead(head=False), DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=4))
    path = tmp_path / "body.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_a_partial_file_names_strict_loading_where_the_module_set_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _body_only_checkpoint(tmp_path)
    with pytest.raises(lm.MetaTensorError, match=r"'head.weight'") as refused:
        lm.load_checkpoint(LitStrictHead(), path)
    said = " ".join(str(refused.value).split())
    assert "set LitStrictHead.strict_loading = False" in said
    # the fix the message gave before is refused by the module's own strict_loading
    with pytest.raises(lm.ArgumentValueError, match=r"contradicts LitStrictHead.strict_loading"):
        lm.load_checkpoint(LitStrictHead(), path, strict=False)
    # followed, the fix loads the body and lists the head, as load_from_checkpoint does
    expected = LitLooseHead.load_from_checkpoint(path)
    model = LitLooseHead()
    report = lm.load_checkpoint(model, path)
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert torch.equal(model.body.weight, expected.body.weight)

    target = f"{__name__}:LitStrictHead"
    assert main(["load-check", target, str(path)]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert "set LitStrictHead.strict_loading = False (its True refuses --no-strict)" in said
    assert main(["load-check", target, str(path), "--no-strict"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "error: --no-strict contradicts LitStrictHead.strict_loading=True" in said
    assert "load_checkpoint" not in said


def test_a_module_leaving_strict_loading_unset_is_still_told_strict_false(
    tmp_path: Path,
) -> None:
    """Control (passes on 15fb339): strict=False is the fix where the module left it unset."""
    path = _body_only_checkpoint(tmp_path)
    with pytest.raises(lm.MetaTensorError, match=r"or strict=False to load what matches"):
        lm.load_checkpoint(LitHead(), path)
    assert sorted(lm.load_checkpoint(LitHead(), path, strict=False).missing) == [
        "head.bias",
        "head.weight",
    ]


class LitDoubling(LitHead):
    """Its hook converts an old format; Lightning fails on a file that is no checkpoint."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        state["body.weight"] = state["body.weight"] * 2


def test_a_plain_state_dict_says_the_modules_hook_did_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # read as a state dict (load_from_checkpoint fails on it), loaded without a word
    # before: a hook converting the file's values was skipped silently
    torch.manual_seed(0)
    saved = LitDoubling()
    path = tmp_path / "plain.pt"
    torch.save(saved.state_dict(), path)
    model = LitDoubling()
    with pytest.warns(lm.MetaTensorWarning, match=r"LitDoubling.on_load_checkpoint did not run"):
        lm.load_checkpoint(model, path)
    assert torch.equal(model.body.weight, saved.body.weight)  # as stored: the hook did not run
    with warnings.catch_warnings():  # shown as the command line shows it
        warnings.simplefilter("always", lm.MetaTensorWarning)
        assert main(["load-check", f"{__name__}:LitDoubling", str(path)]) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "load-check: warning: LitDoubling.on_load_checkpoint did not run" in said
    # a module without its own hook loads the same file without a warning (the
    # suite turns MetaTensorWarning into an error)
    lm.load_checkpoint(LitHead(), path)


class LitLooseLater(LitHead):
    """Sets strict_loading in configure_model, which load_from_checkpoint calls after it
    resolved strict from it."""

    def configure_model(self) -> None:
        self.strict_loading = False


def test_strict_loading_set_in_configure_model_does_not_decide_as_in_lightning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _body_only_checkpoint(tmp_path)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"head.weight\""):
        LitLooseLater.load_from_checkpoint(path)  # strict: read before configure_model
    # exit 0 before, the head left as initialised
    assert main(["load-check", f"{__name__}:LitLooseLater", str(path)]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert "missing from the checkpoint (2)" in said
    assert main(["load-check", f"{__name__}:LitLooseLater", str(path), "--no-strict"]) == 0
