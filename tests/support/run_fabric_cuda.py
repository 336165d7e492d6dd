"""`lm.fabric_setup` on one CUDA device under FSDP1 and ModelParallel (FSDP2), in a fresh process.

    python -m support.run_fabric_cuda WORKDIR   (with tests/ on PYTHONPATH; needs CUDA)

Fabric's FSDPStrategy runs only on GPUs, so the FSDP1 `param_init_fn` path
is checked here (by `scripts/gpu-check.sh`, through the `cuda` marker). Writes
WORKDIR/result.json: for each strategy, the names whose full tensors differ
from eager construction with the same seed on the CPU (empty lists pass).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.strategies import FSDPStrategy, ModelParallelStrategy

import lightning_meta as lm
from support.mesh_models import Block, Llama, full, parallelize, unequal
from support.processes import end_without_finalizing, run_main

end_without_finalizing()


def deferred() -> Llama:
    torch.manual_seed(0)
    with lm.deferred_init():
        return Llama()


def main() -> None:
    workdir = Path(sys.argv[1])
    torch.manual_seed(0)
    expected = full(Llama())
    result: dict[str, Any] = {}

    fsdp1 = L.Fabric(
        accelerator="cuda",
        devices=1,
        strategy=FSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True),
    )
    fsdp1.launch()
    model = lm.fabric_setup(fsdp1, deferred())
    inner: Any = model._forward_module
    with type(inner).summon_full_params(inner):
        result["fsdp1"] = unequal(full(model), expected)

    fsdp2 = L.Fabric(accelerator="cuda", devices=1, strategy=ModelParallelStrategy(parallelize))
    fsdp2.launch()
    result["fsdp2"] = unequal(full(lm.fabric_setup(fsdp2, deferred())), expected)
    (workdir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
