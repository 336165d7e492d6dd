"""Bytes each rank reads when `lm.load_checkpoint` fills a sharded (FSDP2) deferred model.

    python benchmarks/load_sharded.py [--json PATH] [--worlds 2,4]

Runs `tests/support/run_sharded_load.py` (plain torch.distributed, gloo, CPU)
at each world size: the `Wide` test model (about 1.5 MB of float32) built under
`lm.deferred_init()`, sharded with FSDP2 on dim 0 or dim 1, or tensor parallel
(2 ranks) / a 2x2 data x tensor mesh (4 ranks), loaded from a
sharded safetensors directory (Hugging Face `save_torch_state_dict`, six
shards), a distributed checkpoint written by one process, one written by
every rank, and a torch file (`torch.save` of the state dict). Bytes read are `rchar` of `/proc/self/io` across the
`load_checkpoint` call (every read/pread of the process). The baseline, side
by side: the same files loaded into the unsharded deferred model, where every
rank reads everything. Prints a Markdown table (the largest figure over ranks).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1] / "tests"

CASES = {
    "safetensors_dim0": ("sharded safetensors", "FSDP2 dim 0", "unsharded_safetensors"),
    "safetensors_dim1": ("sharded safetensors", "FSDP2 dim 1", "unsharded_safetensors"),
    "dcp_one_dim1": ("DCP, 1 writer", "FSDP2 dim 1", "unsharded_dcp_one"),
    "dcp_ranks_dim0": ("DCP, every rank wrote", "FSDP2 dim 0", "unsharded_dcp_ranks"),
    "dcp_ranks_dim1": ("DCP, every rank wrote", "FSDP2 dim 1", "unsharded_dcp_ranks"),
    "safetensors_tp": ("sharded safetensors", "TP", "unsharded_safetensors"),
    "dcp_ranks_tp": ("DCP, every rank wrote", "TP", "unsharded_dcp_ranks"),
    "torch_dim0": ("torch file", "FSDP2 dim 0", "unsharded_torch"),
    "torch_dim1": ("torch file", "FSDP2 dim 1", "unsharded_torch"),
}


def run(world: int) -> dict[str, dict[str, Any]]:
    sys.path.insert(0, str(TESTS))
    from support.processes import run_module

    with tempfile.TemporaryDirectory(prefix="lm-load-sharded-") as tmp:
        proc = run_module("run_sharded_load", str(world), tmp, cwd=Path(tmp))
        if proc.returncode != 0:
            raise SystemExit(f"world {world} failed:\n{proc.stderr[-3000:]}")
        return {p.stem[7:]: json.loads(p.read_text()) for p in Path(tmp).glob("result-*.json")}


def rows(world: int, ranks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for case, (fmt, layout, baseline) in CASES.items():
        per_rank = [r[case] for r in ranks.values()]
        out.append(
            {
                "world": world,
                "case": case,
                "format": fmt,
                "layout": layout if layout != "TP" else ("TP 2" if world == 2 else "2x2 dp x TP"),
                "read_max": max(r["rchar"] for r in per_rank),
                "read_per_rank": {k: r[case]["rchar"] for k, r in sorted(ranks.items())},
                "need": max(r["need"] for r in per_rank),
                "bound": max(r["bound"] for r in per_rank),
                "baseline": max(r[baseline]["rchar"] for r in ranks.values()),
                "exact": all(not r["unequal"] for r in per_rank),
            }
        )
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| ranks | checkpoint | layout | read per rank (KB) | its shards (KB) | bound (KB) "
        "| unsharded load (KB) | x unsharded | exact |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['world']} | {r['format']} | {r['layout']} | {r['read_max'] / 1e3:.1f} | "
            f"{r['need'] / 1e3:.1f} | {r['bound'] / 1e3:.1f} | {r['baseline'] / 1e3:.1f} | "
            f"{r['read_max'] / r['baseline']:.2f} | {'yes' if r['exact'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    parser.add_argument("--worlds", default="2,4", help="comma-separated world sizes")
    args = parser.parse_args()
    results = []
    for world in (int(w) for w in args.worlds.split(",")):
        results += rows(world, run(world))
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
