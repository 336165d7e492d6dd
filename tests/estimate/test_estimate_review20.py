"""``estimate``'s ``broadcast_buffers`` (2026-12-07, fifth session): DDP's option, so that
``DDPStrategy(broadcast_buffers=False)`` is not estimated with the buffers' flat copy (12.6 %
over on a model with two 2 MiB buffers; the real ranks are in
``test_estimate_ranks_measured.py``). Its refusals, as ``gradient_as_bucket_view``'s."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_meta import ArgumentTypeError, ArgumentValueError, estimate
from support.processes import run_cli


class Tabled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.register_buffer("table", torch.zeros(256, 16))
        self.register_buffer("other", torch.zeros(256, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.table[:1] + self.other[:1]


def test_the_flat_copy_is_left_out_without_the_broadcast() -> None:
    on = estimate(Tabled, "4,16", strategy="ddp", world_size=2)
    off = estimate(Tabled, "4,16", strategy="ddp", world_size=2, broadcast_buffers=False)
    # the buffers' one flat copy, momentary before the forward: the peak moves there
    assert 0 < on.peak_bytes - off.peak_bytes <= 2 * 256 * 16 * 4


def test_broadcast_buffers_is_refused_where_it_does_not_apply() -> None:
    with pytest.raises(ArgumentTypeError, match="broadcast_buffers must be True or False"):
        estimate(Tabled, "4,16", strategy="ddp", world_size=2, broadcast_buffers="no")
    with pytest.raises(ArgumentValueError, match="broadcast_buffers is a DDP option"):
        estimate(Tabled, "4,16", strategy="fsdp", world_size=2, broadcast_buffers=False)
    with pytest.raises(ArgumentValueError, match="broadcast_buffers given without a strategy"):
        estimate(Tabled, "4,16", broadcast_buffers=False)


def test_the_command_line_names_its_flag(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("from torch import nn\ndef f(): return nn.Linear(16, 16)\n")
    done = run_cli("estimate", "m.py:f", "--input", "4,16", "--no-broadcast-buffers", cwd=tmp_path)
    assert done.returncode == 2
    assert "--no-broadcast-buffers given without a strategy" in done.stderr
