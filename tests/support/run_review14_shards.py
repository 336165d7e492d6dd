"""FSDP2 on what lightning_meta holds, in real processes (gloo, CPU): the fourteenth review.

    python -m support.run_review14_shards WORLD WORKDIR   (with tests/ on PYTHONPATH)

Started without ``RANK`` in its environment, it writes a litgpt checkpoint and
starts WORLD copies of itself. Each rank:

- builds the litgpt model under ``lm.deferred_init()``, shards each block and
  the model with ``fully_shard``, and calls ``lm.load_checkpoint``: litgpt's
  attention has load code of its own, which the loader follows on a copy of
  the model, and FSDP2 refuses copies. It records the refusal, then does what
  its fix says, word for word, and records the names whose ``full_tensor()``
  differs from the file and whether litgpt's load code ran;
- builds an ``Ensemble`` of 4 MLPs and shards it four ways: the holders of its
  stacked tensors (``ensemble.stacked``'s children), ``ensemble.stacked``, the
  holders and then the ensemble, and the ensemble as a whole (the fix). It
  records each forward's error, or whether the output and the gradients
  (gathered) equal those of the unsharded ensemble on the same inputs.

Every rank writes WORKDIR/result-RANK.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import lightning_meta as lm
from support.deferred_models import litgpt_pythia
from support.processes import end_without_finalizing, launch_ranks, run_main

end_without_finalizing()


def _load_case(path: Path) -> dict[str, Any]:
    from litgpt.model import CausalSelfAttention
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    model = lm.deferred_init(litgpt_pythia)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    out: dict[str, Any] = {}
    try:
        lm.load_checkpoint(model, path)
        out["error"] = None
    except Exception as e:
        out["error"], out["message"] = type(e).__name__, str(e)
    out["unchanged"] = all(t.is_meta for t in model.state_dict().values())

    # The fix, as the message gives it.
    ran: list[str] = []
    original = CausalSelfAttention._load_from_state_dict

    def counted(self: nn.Module, state_dict: Any, prefix: str, *args: Any, **kw: Any) -> None:
        ran.append(prefix)
        original(self, state_dict, prefix, *args, **kw)

    CausalSelfAttention._load_from_state_dict = counted  # type: ignore[method-assign]
    try:
        lm.materialize(model)
        set_model_state_dict(
            model,
            torch.load(path, mmap=True, weights_only=True),
            options=StateDictOptions(full_state_dict=True),
        )
    finally:
        CausalSelfAttention._load_from_state_dict = original  # type: ignore[method-assign]
    saved = torch.load(path, weights_only=True)
    state = model.state_dict()
    out["keys_equal"] = sorted(state) == sorted(saved)
    out["unequal"] = sorted(
        k for k, v in state.items() if k in saved and not torch.equal(v.full_tensor(), saved[k])
    )
    out["load_code_ran"] = sorted(set(ran))
    return out


def _members() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)) for _ in range(4)]


def _ensemble_case(how: str) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    reference = lm.Ensemble(_members())
    expected = reference(x)
    expected.square().sum().backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}

    ensemble = lm.Ensemble(_members())
    if how in ("holders", "holders_then_ensemble"):
        for holder in list(ensemble.stacked.children()):
            fully_shard(holder)
    if how == "stacked":
        fully_shard(ensemble.stacked)
    if how in ("holders_then_ensemble", "ensemble"):
        fully_shard(ensemble)
    out: dict[str, Any] = {}
    try:
        y = ensemble(x)
        y.square().sum().backward()
    except Exception as e:
        out["error"], out["message"] = type(e).__name__, str(e)
        out["paths"] = list(getattr(e, "paths", []))
        return out
    out["error"] = None
    out["output_equal"] = torch.allclose(y, expected, rtol=1e-5, atol=1e-6)
    out["grads_equal"] = all(
        torch.allclose(p.grad.full_tensor(), grads[n]) for n, p in ensemble.named_parameters()
    )
    return out


def main() -> None:
    world, workdir = int(sys.argv[1]), Path(sys.argv[2])
    path = workdir / "litgpt.pt"
    if "RANK" not in os.environ:
        torch.manual_seed(0)
        torch.save(litgpt_pythia().state_dict(), path)
        sys.exit(launch_ranks("support.run_review14_shards", world, str(workdir)))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict[str, Any] = {"load": _load_case(path)}
    for how in ("holders", "stacked", "holders_then_ensemble", "ensemble"):
        result[how] = _ensemble_case(how)
    (workdir / f"result-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
