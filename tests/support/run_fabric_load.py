"""``lm.load_checkpoint`` into the module ``lm.fabric_setup`` returns, under DDP (2 gloo ranks).

    python -m support.run_fabric_load WORKDIR     (with tests/ on PYTHONPATH)

Fabric launches the second rank by re-running this module. Rank 0 saves a
state dict of the model (a tied embedding and head), every rank builds the
model under ``deferred_init``, sets it up with ``fabric_setup`` (which returns
Fabric's wrapper around ``DistributedDataParallel``) and loads the file into
that wrapper, with ``strict=True`` and with ``strict=False``. Every rank writes
WORKDIR/result-RANK.json: per case, the names whose values differ from the
file, whether the tie holds, and the report's loaded names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

import lightning_meta as lm
from support.processes import end_without_finalizing, run_main

end_without_finalizing()


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.lin(self.emb(ids))))
        return out


def main() -> None:
    workdir = Path(sys.argv[1])
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    path = workdir / "tied.pt"
    if fabric.global_rank == 0:
        torch.manual_seed(1)
        torch.save(Tied().state_dict(), path)
    fabric.barrier()
    saved = torch.load(path, weights_only=True)
    result: dict[str, Any] = {}
    for strict in (True, False):
        torch.manual_seed(0)
        with lm.deferred_init():
            model = Tied()
        wrapper = lm.fabric_setup(fabric, model)
        report = lm.load_checkpoint(wrapper, path, strict=strict)
        state = wrapper.state_dict()
        result[f"strict={strict}"] = {
            "differ": sorted(k for k, v in saved.items() if not torch.equal(state[k], v)),
            "tied": model.head.weight is model.emb.weight,
            "loaded": sorted(report.loaded),
        }
    (workdir / f"result-{fabric.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
