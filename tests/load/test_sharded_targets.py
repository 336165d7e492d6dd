"""`load_checkpoint` into sharded deferred models at 2 and 4 ranks: exact, and each rank reads its shards.

`tests/support/run_sharded_load.py` runs every case of one world size in one
launch (plain `torch.distributed`, gloo, CPU): a `Wide` model built under
`lm.deferred_init()` and sharded with FSDP2 (dim 0, or 2-D weights on dim 1)
is loaded from a sharded safetensors directory (Hugging Face's
`save_torch_state_dict`), from a distributed checkpoint written by one process
and from one written by every rank (dim-0 chunks, so a dim-1 load crosses
them), with tensor parallelism (2 ranks) and a 2x2 data x tensor mesh (4
ranks, FSDP2 over the TP shards), from a float64 file lacking `head.weight`
(`strict=False`: cast, and the missing shard replayed), from a torch file
(dim 0 and dim 1), and into real shards. Each rank
reports the names whose `full_tensor()` differs from single-process eager
construction with the same seed, and the bytes it read during each load
(`rchar` of `/proc/self/io`).

The bound each load must stay under: the bytes of its own shards (and of the
unsharded buffer), plus the structure of the files it parses (the index and
every shard's header; a distributed checkpoint's `.metadata`, and 16 KiB per
item it opens: the item's zip directory, `data.pkl` and the reader's 8 KiB
read-ahead; a torch file's bytes other than its storages' data, and 16 KiB),
plus 16 KiB. Every bound is below the bytes of the whole
checkpoint, so a rank reading whole tensors fails.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from support.capabilities import FSDP2_ON_CPU, FSDP2_ON_CPU_REASON
from support.processes import run_module

MEASURED = [
    "dcp_one_dim1",
    "dcp_ranks_dim0",
    "dcp_ranks_dim1",
    "dcp_ranks_tp",
    "float64_no_head",
    "safetensors_dim0",
    "safetensors_dim1",
    "safetensors_tp",
    "torch_dim0",
    "torch_dim1",
]
EXACT = [*MEASURED, "real_shards", "dcp_ranks_wrapped"]


def run(world: int, workdir: Path) -> dict[str, dict[str, Any]]:
    proc = run_module("run_sharded_load", str(world), str(workdir), cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {p.stem[7:]: json.loads(p.read_text()) for p in workdir.glob("result-*.json")}


@pytest.mark.slow
@pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_ON_CPU_REASON)
@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_loads_exactly_and_reads_only_its_shards(world: int, tmp_path: Path) -> None:
    results = run(world, tmp_path)
    assert sorted(results) == [str(r) for r in range(world)]
    for rank, cases in results.items():
        total = cases["total_bytes"]
        for case in EXACT:
            assert cases[case]["unequal"] == [], (rank, case)
            assert cases[case]["meta_left"] == [], (rank, case)
        for case in MEASURED:
            r = cases[case]
            # reading whole tensors would break the bound: the check can fail
            assert r["bound"] < total * (2 if case == "float64_no_head" else 1), (rank, case)
            assert r["need"] <= r["rchar"] <= r["bound"], (rank, case, r)
            assert r["report_bytes"] == r["need"], (rank, case)
        assert cases["float64_no_head"]["replayed"] == ["head.weight", "jitter"], rank
        assert cases["float64_no_head"]["cast"] > 0, rank
        assert cases["views_of_loaded"] == {
            "sharded": "DTensor",
            "table": True,
            "first": True,
            "row": True,
            "row_is_view": True,
            "replayed": ["first", "row"],
        }, rank
        refused = cases["refused_dtype"]
        assert refused["error"] == "MetaTensorError", rank
        assert "cannot cast it" in refused["message"] and "Fix:" in refused["message"]
        assert refused["unchanged"], rank
        refused = cases["refused_written"]
        assert refused["error"] == "MaterializationError", rank
        assert (
            "['head.weight']: these deferred tensors were modified in place after "
            in (refused["message"])
        )
        assert refused["unchanged"], rank
        # module.to(dtype) before sharding replaced the deferred jitter: it was left on
        # meta without an error (review of 2026-12-05, fifth session)
        refused = cases["cast_before_sharding"]
        assert refused["error"] == "MaterializationError", (rank, refused)
        assert "load_checkpoint cannot fill ['jitter (Tensor in torch.float64" in refused["message"]
        assert "build the model in that dtype inside the block" in refused["message"]
        assert refused["unchanged"], rank
        undo = cases["undo"]
        assert undo["raised"] and undo["all_meta"] and undo["unequal"] == [], (rank, undo)


@pytest.mark.parametrize(
    ("shape", "box"),
    [
        ((8, 6), ((2, 0), (4, 6))),  # rows: one run
        ((8, 6), ((0, 3), (8, 3))),  # columns: a run per row
        ((4, 3, 5), ((1, 1, 0), (2, 2, 5))),  # whole last dim: a run per (i, j)
        ((4, 3, 5), ((0, 0, 2), (4, 3, 1))),  # one column of every row
        ((7,), ((5,), (2,))),
        ((), ((), ())),  # a scalar
        ((4, 0), ((0, 0), (4, 0))),  # empty
    ],
)
def test_box_runs_are_exactly_the_bytes_of_the_box(
    shape: tuple[int, ...], box: tuple[tuple[int, ...], tuple[int, ...]]
) -> None:
    import torch

    from lightning_meta._load._shards import box_runs

    full = torch.arange(max(1, torch.Size(shape).numel()), dtype=torch.int32)[
        : torch.Size(shape).numel()
    ].reshape(shape)
    raw = full.flatten().view(torch.uint8)
    runs = box_runs(shape, box, 4)
    got = torch.cat([raw[a:b] for a, b in runs]) if runs else raw[:0]
    expected = full
    for d, (o, n) in enumerate(zip(*box, strict=True)):
        expected = expected.narrow(d, o, n)
    assert torch.equal(got.view(torch.int32).reshape(box[1]), expected.contiguous())
    # no byte twice, none outside the box, runs in order and merged
    assert sum(b - a for a, b in runs) == expected.numel() * 4
    assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(runs))
