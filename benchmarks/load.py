"""Benchmark checkpoint loading: naive, the mmap+assign floor, accelerate, lm.load_checkpoint.

A Llama-style transformers model (hidden 1024, 16 layers, vocab 32000: about
271M parameters, 1.08 GB in float32) is saved once as a Lightning-layout
``.ckpt``, a torch ``.pt``, a ``.safetensors`` file, a sharded Hugging Face
directory (``save_pretrained``) and a ``torch.distributed.checkpoint``
directory. Each variant then runs in a fresh subprocess: the model is
constructed (eager, meta or ``deferred_init``, as the variant does it), the
page cache of the files it reads is dropped (``posix_fadvise(DONTNEED)``, so
reads are cold-ish), then the checkpoint is loaded and every tensor is
touched (summed). The variants run in ``--repeat`` rounds, each round every variant
once, in fresh subprocesses, the order reversed every other round so that a
loader and its floor see the machine in the same state. Reported per
variant: the median construction and load+touch wall time, the median CPU time
(user + system) of the load+touch, the largest peak RSS above the
interpreter's baseline (after imports), and GB/s of checkpoint bytes over the
load+touch time; per loader, the median over rounds of its wall and CPU time
divided by its floor's in the same round. ``cat > /dev/null`` of the files
gives the disk floor.

``lm.load_checkpoint`` reads every tensor into memory the process owns (one
copy; the file can change afterwards), so next to the mapped floors it pays
one copy of the weights in CPU time; ``lm_pt_mmap`` is its zero-copy
``mmap=True`` option, comparable with the floors as they are (coupled to the
file).

    python benchmarks/load.py                       # full size, fp32 and bf16
    python benchmarks/load.py --small               # quick check
    python benchmarks/load.py --json /tmp/load.json --keep /tmp/load-files --repeat 3

The files are deleted at the end unless ``--keep DIR`` names where to keep them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _llama import llama_config

# variant -> (description, file it reads)
VARIANTS: dict[str, tuple[str, str]] = {
    "cat": ("cat model.pt > /dev/null (disk floor)", "model.pt"),
    "naive": ("eager + load_state_dict(torch.load(.pt))", "model.pt"),
    "floor": ("meta + torch.load(mmap) + assign (.pt floor)", "model.pt"),
    "floor_ckpt": ("meta + torch.load(mmap) + assign (.ckpt floor)", "model.ckpt"),
    "floor_safetensors": ("meta + safetensors mmap + assign (floor)", "model.safetensors"),
    "floor_shards": ("meta + per-shard safetensors mmap + assign (floor)", "sharded"),
    # What owning the memory costs by any means: the floor, each tensor cloned.
    "copy_safetensors": ("meta + safetensors mmap + clone + assign", "model.safetensors"),
    "dcp_load": ("torch.distributed.checkpoint.load into fresh tensors", "dcp"),
    "accelerate": (
        "accelerate init_empty_weights + load_checkpoint_and_dispatch",
        "model.safetensors",
    ),
    "lm_ckpt": ("lm.load_checkpoint .ckpt (deferred)", "model.ckpt"),
    "lm_pt": ("lm.load_checkpoint .pt (deferred)", "model.pt"),
    "lm_safetensors": ("lm.load_checkpoint .safetensors (deferred)", "model.safetensors"),
    "lm_sharded": ("lm.load_checkpoint sharded HF dir (deferred)", "sharded"),
    "lm_dcp": ("lm.load_checkpoint DCP dir (deferred)", "dcp"),
    "lm_pt_mmap": ("lm.load_checkpoint .pt mmap=True (deferred, zero-copy)", "model.pt"),
}
# lm variant -> the floor it is compared with
FLOORS = {
    "lm_ckpt": "floor_ckpt",
    "lm_pt": "floor",
    "lm_safetensors": "floor_safetensors",
    "lm_sharded": "floor_shards",
    "lm_dcp": "dcp_load",
    "lm_pt_mmap": "floor",
    "copy_safetensors": "floor_safetensors",
}


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in _files(path))


def _drop_cache(path: Path) -> None:
    for p in _files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_s() -> float:
    # this process and its waited-for children (cat)
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _reset_peak() -> None:
    # ru_maxrss is the high-water mark of the process's whole life: import-time
    # memory the kernel reclaimed before ``base`` was read (library pages under
    # memory pressure) would count as load memory. Linux resets the mark here.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # KiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def write_files(root: Path, small: bool) -> None:
    """Save one model in every format under ``root``."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import save
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(small))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, root / "model.pt")
    # The layout Lightning's save_checkpoint writes: weights under "state_dict" with
    # the LightningModule attribute prefix, next to trainer state.
    ckpt = {
        "epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": [],
    }  # fmt: skip
    torch.save(ckpt, root / "model.ckpt")
    save_file(state, str(root / "model.safetensors"))
    model.save_pretrained(root / "sharded", max_shard_size="200MB" if not small else "5MB")
    save(state, checkpoint_id=root / "dcp")


def _touch(tensors: Any) -> None:
    import torch

    with torch.no_grad():
        for t in tensors:
            t.sum()


def run_variant(variant: str, root: Path, small: bool, dtype_name: str) -> dict[str, Any]:
    """Run one variant in this process and return its measurements."""
    import warnings

    import torch
    from transformers import LlamaForCausalLM

    import lightning_meta as lm
    from lightning_meta._load._checkpoint import load_checkpoint

    warnings.filterwarnings("ignore")
    dtype = torch.bfloat16 if dtype_name == "bf16" else None
    cfg = llama_config(small)
    path = root / VARIANTS[variant][1]
    with torch.device("meta"):  # warm-up of lazy imports and first-call costs
        LlamaForCausalLM(llama_config(True))
    _reset_peak()
    base = _rss_mb()

    def start() -> tuple[float, float]:
        # Drop the files' pages right before the timed load, not before the
        # construction: on this project's VM, dropping them before a 3 s
        # deferred_init made the same load 1.5-2.5x slower (all kernel time)
        # than dropping them right before it, a state the floors, built in
        # 20 ms, never met.
        _drop_cache(path)
        return time.perf_counter(), _cpu_s()

    t0 = time.perf_counter()
    model: Any = None
    if variant == "cat":
        t1 = t0
        tl, c1 = start()
        subprocess.run(["cat", *map(str, _files(path))], stdout=subprocess.DEVNULL, check=True)
    elif variant == "naive":
        model = LlamaForCausalLM(cfg)
        t1 = time.perf_counter()
        tl, c1 = start()
        model.load_state_dict(torch.load(path, weights_only=True))
        if dtype is not None:
            model.to(dtype)
    elif variant.startswith(("floor", "copy")) or variant == "dcp_load":
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        t1 = time.perf_counter()
        tl, c1 = start()
        if variant == "dcp_load":
            from torch.distributed.checkpoint import FileSystemReader, load

            sd = {k: torch.empty_like(v, device="cpu") for k, v in model.state_dict().items()}
            load(sd, storage_reader=FileSystemReader(str(path)), no_dist=True)
            parts = [sd]
        elif variant == "floor":
            parts = [torch.load(path, mmap=True, weights_only=True)]
        elif variant == "floor_ckpt":
            weights = torch.load(path, mmap=True, weights_only=True)["state_dict"]
            parts = [{k.removeprefix("model."): v for k, v in weights.items()}]
        else:
            from safetensors.torch import load_file

            parts = [load_file(str(p)) for p in _files(path) if p.suffix == ".safetensors"]
            if variant == "copy_safetensors":
                parts = [{k: v.clone() for k, v in sd.items()} for sd in parts]
        for sd in parts:
            if dtype is not None:
                sd = {k: v.to(dtype) for k, v in sd.items()}
            model.load_state_dict(sd, assign=True, strict=False)
    elif variant == "accelerate":
        from accelerate import init_empty_weights, load_checkpoint_and_dispatch

        with init_empty_weights():
            model = LlamaForCausalLM(cfg)
        t1 = time.perf_counter()
        tl, c1 = start()
        model = load_checkpoint_and_dispatch(model, str(path), device_map={"": "cpu"}, dtype=dtype)
    else:
        model = lm.deferred_init(LlamaForCausalLM, cfg)
        t1 = time.perf_counter()
        tl, c1 = start()
        load_checkpoint(model, path, dtype=dtype, mmap=variant.endswith("_mmap"))
    if model is not None:
        _touch([*model.parameters(), *model.buffers()])
        assert not any(t.is_meta for t in model.state_dict().values()), variant
    t2, c2 = time.perf_counter(), _cpu_s()
    return {
        "variant": variant, "dtype": dtype_name, "construct_s": t1 - t0, "load_s": t2 - tl,
        "load_cpu_s": c2 - c1, "peak_mb": _peak_mb() - base, "file_bytes": _size(path),
    }  # fmt: skip


def _rounds(
    variants: list[str], root: Path, small: bool, dtype: str, repeat: int
) -> list[dict[str, Any]]:
    """Run every variant once per round, in fresh subprocesses, alternating the order.

    Returns one result per variant: median times, largest peak, every run,
    and for a loader the median over rounds of its time over its floor's.
    """
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for i in range(repeat):
        for variant in variants if i % 2 == 0 else variants[::-1]:
            runs[variant].append(_one(variant, root, small, dtype))
            print(json.dumps(runs[variant][-1]), file=sys.stderr)
    results = []
    for variant in variants:
        mine = runs[variant]
        result = dict(mine[0])
        for key in ("construct_s", "load_s", "load_cpu_s"):
            result[key] = statistics.median(r[key] for r in mine)
        result["peak_mb"] = max(r["peak_mb"] for r in mine)
        result["load_runs_s"] = [r["load_s"] for r in mine]
        result["load_cpu_runs_s"] = [r["load_cpu_s"] for r in mine]
        floor = FLOORS.get(variant)
        if floor in runs:
            for key, out in (("load_s", "x_floor"), ("load_cpu_s", "x_floor_cpu")):
                ratios = [r[key] / f[key] for r, f in zip(mine, runs[floor], strict=True)]
                result[out] = statistics.median(ratios)
                result[f"{out}_runs"] = ratios
        results.append(result)
    return results


def _one(variant: str, root: Path, small: bool, dtype: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_variant", variant, "--_dir", str(root), "--dtype", dtype]
    if small:
        cmd.append("--small")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"variant {variant} ({dtype}) failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | dtype | construct (s) | load + touch (s) | load CPU (s) | GB/s "
        "| peak RSS above baseline (MB) | x file size | x its floor (wall) | x its floor (CPU) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        ratio = f"{r['x_floor']:.2f}" if "x_floor" in r else ""
        cpu_ratio = f"{r['x_floor_cpu']:.2f}" if "x_floor_cpu" in r else ""
        gbs = r["file_bytes"] / 1e9 / r["load_s"] if r["load_s"] > 0 else 0.0
        # cat runs in its own process; this process's peak says nothing about it
        peak = "" if r["variant"] == "cat" else f"{r['peak_mb']:.0f}"
        share = "" if r["variant"] == "cat" else f"{r['peak_mb'] * 2**20 / r['file_bytes']:.2f}"
        lines.append(
            f"| {VARIANTS[r['variant']][0]} | {r['dtype']} | {r['construct_s']:.2f} | "
            f"{r['load_s']:.2f} | {r['load_cpu_s']:.2f} | {gbs:.2f} | {peak} | {share} | "
            f"{ratio} | {cpu_ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a ~7M-parameter config")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    parser.add_argument(
        "--keep", metavar="DIR", help="write (or reuse) the files here and keep them"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds; each runs every variant once in a fresh subprocess (median)",
    )
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--_variant", help=argparse.SUPPRESS)
    parser.add_argument("--_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._variant:
        print(json.dumps(run_variant(args._variant, Path(args._dir), args.small, args.dtype)))
        return
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lm-load-bench-"))
    try:
        if not (root / "dcp").is_dir():
            root.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            write_files(root, args.small)
            print(
                f"wrote the checkpoints to {root} in {time.perf_counter() - t:.1f} s",
                file=sys.stderr,
            )
        dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
        results = []
        for dtype in dtypes:
            variants = [
                v
                for v in args.variants.split(",")
                # the .pt floor stands for all casts
                if not (
                    dtype == "bf16"
                    and v in ("cat", "copy_safetensors", *FLOORS.values())
                    and v != "floor"
                )
            ]
            results.extend(_rounds(variants, root, args.small, dtype, args.repeat))
        print(table(results))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
