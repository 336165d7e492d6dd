"""FSDP2 on what lightning_meta holds, in real processes (gloo, CPU): the fourteenth review.

    python -m support.run_review14_shards WORLD WORKDIR   (with tests/ on PYTHONPATH)

Started without ``RANK`` in its environment, it writes a litgpt checkpoint and
starts WORLD copies of itself. Each rank:

- builds the litgpt model under ``lm.deferred_init()``, shards each block and
  the model with ``fully_shard``, and calls ``lm.load_checkpoint``: litgpt's
  attention has load code of its own, which the loader follows on a copy of
  the model, and FSDP2 refuses copies. It records the refusal, then does what
  its fix says (the ``load_state_dict`` argument evaluated as the message
  writes it) on a new deferred model, and records the names whose
  ``full_tensor()`` differs from eager's load and where litgpt's load code ran;
- the same with a model of two modules whose load code renames legacy keys
  (``old.*`` to ``proj.*``), from a legacy checkpoint: torch's
  ``set_model_state_dict``, the fix given before, fails there;
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
import re
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


class _Renaming(nn.Module):
    """Legacy checkpoints hold ``old.*``; the load code renames the keys to ``proj.*``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def _load_from_state_dict(self, sd: Any, prefix: str, *args: Any, **kw: Any) -> None:
        for attr in ("weight", "bias"):
            if prefix + "old." + attr in sd:
                sd[prefix + "proj." + attr] = sd.pop(prefix + "old." + attr)
        super()._load_from_state_dict(sd, prefix, *args, **kw)


def _renaming() -> nn.Module:
    return nn.Sequential(_Renaming(), _Renaming(), nn.Linear(8, 4))


def _shard(model: nn.Module, blocks: list[nn.Module]) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def _load_case(build: Any, blocks: Any, path: Path) -> dict[str, Any]:
    """Refused on the sharded deferred model; then the fix, its code as the message gives it."""
    model = lm.deferred_init(build)
    _shard(model, blocks(model))
    out: dict[str, Any] = {}
    try:
        lm.load_checkpoint(model, path)
        out["error"] = None
        return out
    except Exception as e:
        out["error"], out["message"] = type(e).__name__, str(e)
    out["unchanged"] = all(t.is_meta for t in model.state_dict().values())
    found = re.search(r"then model\.load_state_dict\((.*)\), which runs that code", out["message"])
    if found is None:
        return out

    # The fix: materialize, load_state_dict (the message's own code), then shard.
    ran: list[str] = []
    model = lm.deferred_init(build)
    for module in model.modules():
        own = type(module)._load_from_state_dict
        if own is not nn.Module._load_from_state_dict:

            def counted(
                sd: Any, prefix: str, *args: Any, _own: Any = own, _m: Any = module, **kw: Any
            ) -> None:
                ran.append(prefix)
                _own(_m, sd, prefix, *args, **kw)

            module._load_from_state_dict = counted  # type: ignore[method-assign]
    lm.materialize(model)
    model.load_state_dict(eval(found.group(1), {"torch": torch}))
    _shard(model, blocks(model))
    torch.manual_seed(0)
    expected = build()
    expected.load_state_dict(torch.load(path, weights_only=True))
    state, want = model.state_dict(), expected.state_dict()
    out["keys_equal"] = sorted(state) == sorted(want)
    out["unequal"] = sorted(
        k for k, v in state.items() if not torch.equal(v.full_tensor(), want[k])
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


def _tensor_parallel(
    placements: dict[str, Any], execution: str
) -> tuple[lm.Ensemble, list[nn.Module]]:
    """An ensemble whose stacked tensors ``placements`` names are DTensors on a 1-D mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    members = _members()
    ensemble = lm.Ensemble(members, execution=execution)  # type: ignore[arg-type]
    for name, placed in placements.items():
        path, _, leaf = name.rpartition(".")
        holder = ensemble.stacked.get_submodule(path)
        tensor = getattr(holder, leaf).detach()
        setattr(holder, leaf, nn.Parameter(distribute_tensor(tensor, mesh, placed)))
    return ensemble, members


def _tensor_parallel_case(how: str) -> dict[str, Any]:
    """Calls of an ensemble on tensor-parallel stacked tensors: ``"auto"`` timed the plans
    on each rank apart (their collectives stopped pairing: a hang); the loop over tensors
    sharded over the members raised torch's unbind error."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if how == "layers":  # column-wise, then row-wise
        placements = {
            "0.weight": [Shard(1)],
            "0.bias": [Shard(1)],
            "2.weight": [Shard(2)],
            "2.bias": [Replicate()],
        }
    else:  # each rank holds half the members
        placements = {n: [Shard(0)] for n in ("0.weight", "0.bias", "2.weight", "2.bias")}
    ensemble, members = _tensor_parallel(placements, "loop" if how == "members_loop" else "auto")
    mesh = next(t for t in ensemble.parameters() if type(t).__name__ == "DTensor").device_mesh
    generator = torch.Generator().manual_seed(1)
    out: dict[str, Any] = {"error": None, "worst": 0.0}
    for _ in range(8):  # past the first timing and the one after
        x = distribute_tensor(torch.randn(16, 8, generator=generator), mesh, [Replicate()])
        try:
            with torch.no_grad():
                y = ensemble(x).full_tensor()
        except Exception as e:
            out["error"], out["message"] = type(e).__name__, str(e)
            out["paths"] = list(getattr(e, "paths", []))
            return out
        with torch.no_grad():
            expected = torch.stack([m(x.full_tensor()) for m in members])
        out["worst"] = max(out["worst"], float((y - expected).abs().max()))
    out["plan"] = ensemble.plan
    return out


def _late_unit_case() -> dict[str, Any]:
    """A unit added under a holder after the first forward, without changing any class
    there (a second parametrization of a parametrized holder), then sharded: refused as
    before that forward (the check once went by the classes it had seen)."""
    import torch.nn.utils.parametrize as parametrize
    from torch.distributed.fsdp import fully_shard

    class Same(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t.view_as(t)

    ensemble = lm.Ensemble(_members())
    holder = ensemble.stacked.get_submodule("0")
    parametrize.register_parametrization(holder, "weight", Same())
    x = torch.randn(3, 8)
    ensemble(x)
    parametrize.register_parametrization(holder, "bias", Same())
    fully_shard(holder.parametrizations.bias)
    fully_shard(ensemble)
    try:
        ensemble(x)
    except Exception as e:
        return {
            "error": type(e).__name__,
            "message": str(e),
            "paths": list(getattr(e, "paths", [])),
        }
    return {"error": None}


def main() -> None:
    world, workdir = int(sys.argv[1]), Path(sys.argv[2])
    path = workdir / "litgpt.pt"
    if "RANK" not in os.environ:
        torch.manual_seed(0)
        torch.save(litgpt_pythia().state_dict(), path)
        legacy = {k.replace(".proj.", ".old."): v for k, v in _renaming().state_dict().items()}
        torch.save(legacy, workdir / "legacy.pt")
        sys.exit(launch_ranks("support.run_review14_shards", world, str(workdir)))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict[str, Any] = {
        "load": _load_case(litgpt_pythia, lambda m: list(m.transformer.h), path),
        "legacy": _load_case(_renaming, lambda m: list(m)[:2], workdir / "legacy.pt"),
    }
    for how in ("holders", "stacked", "holders_then_ensemble", "ensemble"):
        result[how] = _ensemble_case(how)
    result["late_unit"] = _late_unit_case()
    for how in ("layers", "members", "members_loop"):
        result[f"tp_{how}"] = _tensor_parallel_case(how)
    (workdir / f"result-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
