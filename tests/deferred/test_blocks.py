"""Any number of blocks, in any order: every value and every draw is eager's (issue #11, items 4-5).

Random numbers are drawn for real while a block records, so the generator
stands where eager construction leaves it from the moment the block ends:
between blocks, before and after materialize, whatever is loaded, discarded
or materialized first.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_deferred import assert_same_as_eager
from torch import nn

import lightning_meta as lm
from lightning_meta import deferred_init, materialize
from support import deferred_models as md
from support import program_models as pm


def test_a_draw_between_the_block_and_materialize_sees_eager_state() -> None:
    torch.manual_seed(0)
    eager = md.NanoGPT()
    between_eager = torch.rand(5)
    after_eager = torch.rand(5)
    torch.manual_seed(0)
    module = deferred_init(md.NanoGPT)
    assert torch.equal(torch.rand(5), between_eager)
    materialize(module)  # does not move the generator
    assert torch.equal(torch.rand(5), after_eager)
    assert_same_as_eager(eager, module)


def test_a_discarded_block_changes_nothing_of_the_next_one() -> None:
    torch.manual_seed(0)
    nn.Linear(3, 3)
    eager = md.NanoGPT()
    torch.manual_seed(0)
    deferred_init(nn.Linear, 3, 3)  # built, never materialized
    module = deferred_init(md.NanoGPT)
    assert_same_as_eager(eager, materialize(module))


def test_the_second_of_two_blocks_after_the_first_was_loaded(tmp_path: Path) -> None:
    # Teacher then student, without reseeding in between; the teacher is filled from a file.
    torch.manual_seed(0)
    teacher_eager, student_eager = pm.teacher(), pm.student()
    path = tmp_path / "teacher.pt"
    torch.save({k: v + 1 for k, v in teacher_eager.state_dict().items()}, path)
    torch.manual_seed(0)
    teacher = deferred_init(pm.teacher)
    student = deferred_init(pm.student)
    lm.load_checkpoint(teacher, path)
    materialize(student)
    assert_same_as_eager(student_eager, student)


@pytest.mark.parametrize("order", ["forward", "backward", "middle_first"])
def test_three_blocks_loaded_partly_loaded_discarded_in_any_order(
    order: str, tmp_path: Path
) -> None:
    torch.manual_seed(3)
    a_eager, _, c_eager, d_eager = md.NanoGPT(), md.Custom(), pm.WithContainers(), md.NanoGPT()
    after = torch.rand(4)
    path = tmp_path / "a.pt"
    state = {k: v * 2 for k, v in a_eager.state_dict().items() if "wpe" not in k}
    torch.save(state, path)
    torch.manual_seed(3)
    a = deferred_init(md.NanoGPT)
    deferred_init(md.Custom)  # discarded
    c = deferred_init(pm.WithContainers)
    d = deferred_init(md.NanoGPT)
    assert torch.equal(torch.rand(4), after)
    steps = {
        "a": lambda: lm.load_checkpoint(a, path, strict=False) and materialize(a),
        "c": lambda: materialize(c),
        "d": lambda: materialize(d.transformer) and materialize(d),
    }
    sequence = {"forward": "acd", "backward": "dca", "middle_first": "cad"}[order]
    for key in sequence:
        steps[key]()
    assert torch.equal(a.transformer["wpe"].weight, a_eager.transformer["wpe"].weight)
    assert torch.equal(a.lm_head.weight, a_eager.lm_head.weight * 2)
    assert_same_as_eager(c_eager, c)
    assert_same_as_eager(d_eager, d)


def test_a_checkpoint_loaded_teacher_and_a_deferred_student_under_metaguard(
    tmp_path: Path,
) -> None:
    torch.manual_seed(5)
    path = tmp_path / "teacher.pt"
    torch.save(pm.teacher().state_dict(), path)
    eager = pm.Distill(str(path), deferred=False)
    pm.trainer(steps=2).fit(eager, pm.loader())
    model = pm.Distill(str(path), deferred=True)
    pm.trainer(steps=2).fit(model, pm.loader())
    for (name, got), want in zip(
        model.state_dict().items(), eager.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
