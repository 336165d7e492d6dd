"""Deep copies made inside a ``deferred_init`` block (``nn.TransformerEncoder`` clones its
layer, transformers' OneFormer clones decoder layers) are the eager program's copies."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_deferred import assert_same_as_eager, build_deferred, build_eager
from torch import nn

import lightning_meta as lm
from support.processes import run_module


@pytest.mark.parametrize("case", ["encoder", "oneformer"])
def test_layers_copied_after_a_constant_leave_the_process_sound(case: str, tmp_path: Path) -> None:
    # Before: torch's deep copy of a fake tensor copied its fake mode; with a
    # constant made in the block (torch.tensor(1.0)) the copied mode's weak
    # storage references were freed twice: a segmentation fault at the end
    # of a later block, or other values than eager's without an error
    # (transformers' OneFormer, found by a sweep of 411 architectures).
    if case == "oneformer":
        pytest.importorskip("transformers")
    proc = run_module("run_deepcopy_in_block", case, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("same")


class _Tagged(nn.Parameter):
    """A Parameter subclass (its class must survive a deep copy, as in eager)."""


def _with_copies() -> nn.Module:
    model = nn.Module()
    model.constant = nn.Parameter(torch.tensor([1.0, 2.0]))
    first = nn.Linear(4, 4)
    first.register_buffer("table", torch.randn(3))
    first.table.note = "kept"  # a buffer's attribute: torch.Tensor.__deepcopy__ copies it
    first.weight.no_decay = True  # a Parameter's: nn.Parameter.__deepcopy__ does not
    first.tagged = _Tagged(torch.randn(2))
    model.copies = nn.ModuleList(copy.deepcopy(first) for _ in range(2))
    model.first = first
    return model


def test_deep_copies_in_the_block_are_eagers() -> None:
    eager, after = build_eager(_with_copies)
    model = build_deferred(_with_copies)
    for copied in model.copies:
        # The copies belong to the block: materialize reproduces them.
        assert lm.is_deferred(copied)
    lm.materialize(model)
    assert torch.equal(torch.rand(4), after)
    assert_same_as_eager(eager, model)
    for mine, theirs in zip(model.copies, eager.copies, strict=True):
        assert type(mine.tagged) is type(theirs.tagged) is _Tagged
        assert mine.table.note == theirs.table.note == "kept"
        assert hasattr(mine.weight, "no_decay") == hasattr(theirs.weight, "no_decay")
