"""Deferred models at 1, 2 and 4 ranks, on every mesh: real processes, gloo, CPU.

`tests/support/run_mesh.py` checks all meshes of one world size in one launch
(FSDP2 at 1, 2, 4 ranks and with dim-1 sharding; tensor parallel size 2 with
the Llama plan and a 2x2 data x tensor mesh, under Fabric and under the
Trainer with MetaGuard; DDP with the optimizer built on the deferred
parameters; tied weights with uneven and empty FSDP2 shards at every world
size; the refusals at 1 rank). The 2-rank run is two node processes
(`num_nodes=2`). Each rank reports the parameter and buffer names whose
`full_tensor()` differs from single-process eager construction with the same
seed, and the losses of three SGD steps, deferred and eager-built under the
same strategy.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support import SUPPORT
from support.capabilities import FSDP2_ON_CPU, FSDP2_ON_CPU_REASON
from support.processes import run_module

EXPECTED = {
    1: ["dp1_tp1", "init_module", "own_parallelize_fn", "refusals", "tied"],
    2: ["ddp", "dp1_tp2", "dp2_shard1", "dp2_tp1", "tied", "trainer_dp1_tp2"],
    4: ["dp2_tp2", "dp4_tp1", "tied", "trainer_dp2_tp2"],
}


REFUSED = {
    "dtype": "cannot cast the sharded parameters",
    "stray": "not built under deferred_init",
    "stray_fallback": "cannot initialise the sharded meta tensors",
    "meta_context": "was entered inside a torch.device('meta') context",
    "optimizer_first": "create the optimizer from model.parameters()",
    "partial": "placements include Partial",
    "standalone_package": "ModelParallelStrategy replaces every parameter",
    "written_after_fully_shard": "['layers.0.attention.wq.weight']: these deferred tensors "
    "were modified in place after fully_shard",
    "written_in_parallelize_fn": "['output.weight']: these deferred tensors were modified "
    "in place after fully_shard / parallelize_module",
    "written_to_local": "['layers.0.attention.wq.weight']: these deferred tensors were "
    "modified in place after fully_shard",
    "written_by_foreach": "['output.weight']: these deferred tensors were modified in place "
    "after fully_shard",
    "plain_setup": "Cannot copy out of meta tensor: .to_empty() of FSDPLlama's 'jitter'",
    "after_plain_setup": "Module.to_empty() ran on it and was refused at a deferred tensor, "
    "after it had emptied ['tok_embeddings.weight'",
}


# Refused in parallelize_fn: fabric_setup made the buffers real before
# fabric.setup (Fabric casts the model first, see its docstring).
BUFFERS_MADE = {"written_in_parallelize_fn"}
# Refused when Lightning's to_empty() reached the root's deferred buffer, after the
# sharded parameters it emptied first (Module._apply visits the children first).
EMPTIED_FIRST = {"plain_setup", "after_plain_setup"}


def run(world: int, workdir: Path) -> dict[str, dict[str, Any]]:
    proc = run_module("run_mesh", str(world), str(workdir), cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {p.stem[7:]: json.loads(p.read_text()) for p in workdir.glob("result-*.json")}


@pytest.mark.slow
@pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_ON_CPU_REASON)
@pytest.mark.parametrize("world", [1, 4])
def test_every_shard_equals_eager_and_training_matches(world: int, tmp_path: Path) -> None:
    check(world, run(world, tmp_path))


def check(world: int, results: dict[str, dict[str, Any]]) -> None:
    assert sorted(results) == [str(r) for r in range(world)]
    for rank, meshes in results.items():
        assert sorted(meshes) == EXPECTED[world], rank
        for mesh, r in meshes.items():
            if mesh == "refusals":
                continue
            assert r["setup_vs_eager"] == [], (rank, mesh)
            assert r.get("meta_left", []) == [], (rank, mesh)
            if "deferred_losses" in r:
                assert len(r["deferred_losses"]) == 3
                assert r["deferred_losses"] == r["eager_losses"], (rank, mesh)
                assert r["trained_vs_eager_trained"] == [], (rank, mesh)
    if world == 1:
        check_refusals(results["0"]["refusals"])


def check_refusals(refusals: dict[str, dict[str, Any]]) -> None:
    """Public materialize and fabric_setup on sharded models: refused, named, nothing changed."""
    assert sorted(refusals) == sorted(REFUSED)
    for case, words in REFUSED.items():
        r = refusals[case]
        assert r["error"] in ("MaterializationError", "MetaTensorError", "DeferredCopyError"), case
        assert words in r["message"], (case, r["message"])
        assert "Fix:" in r["message"], case
        if case in BUFFERS_MADE:
            assert r["parameters_meta"], case
        elif case in EMPTIED_FIRST:
            assert not r["parameters_meta"], case
        else:
            assert r["unchanged"], case


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_ON_CPU_REASON)
def test_two_ranks_as_two_nodes_on_one_machine(tmp_path: Path) -> None:
    """World size 2 as `num_nodes=2`: two node processes, started with Lightning's variables."""
    tests = str(SUPPORT.parent)
    base = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    command = [sys.executable, "-m", "support.run_mesh", "2", str(tmp_path), "--nodes"]
    nodes = [
        subprocess.Popen(
            command,
            env={**base, "NODE_RANK": str(rank)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-4000:] for o in outputs)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    check(2, {p.stem[7:]: json.loads(p.read_text()) for p in tmp_path.glob("result-*.json")})
