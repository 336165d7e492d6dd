"""One training step (forward + backward) of ``lm.Ensemble`` against its baselines.

Baselines, measured side by side in one process:
  (a) a Python loop over N ``nn.Module``s,
  (b) hand-written ``torch.func.stack_module_state`` + ``vmap`` + ``functional_call``.

Reported as ratios ``Ensemble / min(a, b)`` (median of repetitions, 1 thread).
Each step starts from gradients set to None, as in a training loop.

    python benchmarks/ensemble.py [--json out.json] [--repeats 5]

On glibc, every allocation above 32 MiB is a fresh mmap, page-faulted anew
each step; a stacked gradient of 32 members of 1024x1024 is 128 MiB, the
loop's per-member ones are 4 MiB. Run it a second time with
MALLOC_MMAP_THRESHOLD_=2000000000 (or under jemalloc / tcmalloc) to see the
computation alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

import lightning_meta as lm

SIZES = {
    "small (64-128-128-10)": (64, 128, 10),
    "large (512-1024-1024-10)": (512, 1024, 10),
}


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, d_out),
    )


def timed(step: Callable[[], None], repeats: int, inner: int) -> float:
    """Median seconds per step over ``repeats`` blocks of ``inner`` steps."""
    for _ in range(3):
        step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            step()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def cell(n: int, dims: tuple[int, int, int], batch: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    members = [mlp(*dims) for _ in range(n)]
    x = torch.randn(batch, dims[0])

    # Every step starts with the gradients set to None, as optimizer.zero_grad()
    # leaves them in a training loop (and Lightning calls it every step).
    def loop_step() -> None:
        for m in members:
            m.zero_grad()
        loss = sum(m(x).square().mean() for m in members)
        assert isinstance(loss, torch.Tensor)
        loss.backward()

    params, buffers = stack_module_state(members)  # type: ignore[arg-type]
    base = copy.deepcopy(members[0]).to("meta")

    def call(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    batched = vmap(call, in_dims=(0, 0, None))

    def vmap_step() -> None:
        for p in params.values():
            p.grad = None
        batched(params, buffers, x).square().mean(dim=(1, 2)).sum().backward()

    ensembles = {ex: lm.Ensemble(members, execution=ex) for ex in ("auto", "vmap")}

    def ens_step(ex: str) -> Callable[[], None]:
        def step() -> None:
            ensembles[ex].zero_grad()
            ensembles[ex](x).square().mean(dim=(1, 2)).sum().backward()
        return step

    inner = max(1, int(2e7 // (n * batch * dims[1] * dims[1])))
    steps = {
        "loop": loop_step,
        "vmap": vmap_step,
        "ensemble": ens_step("auto"),
        "ensemble_vmap": ens_step("vmap"),
    }
    # Interleave the variants so drift on a noisy machine hits all of them alike.
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            times[k].append(timed(fn, 1, inner))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for label, dims in SIZES.items():
        for n in (4, 32):
            t = cell(n, dims, args.batch, args.repeats)
            best = min(t["loop"], t["vmap"])
            rows.append({
                "model": label, "members": n, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                "ratio": t["ensemble"] / best, "ratio_vmap_path": t["ensemble_vmap"] / best,
            })
    malloc = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default")
    print(f"torch {torch.__version__}, 1 thread, batch {args.batch}, median of {args.repeats}, "
          f"MALLOC_MMAP_THRESHOLD_={malloc}\n")
    print("| model | N | loop (a) ms | vmap (b) ms | Ensemble ms | Ensemble / min(a,b) "
          "| Ensemble(execution='vmap') / min(a,b) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['members']} | {r['loop_ms']:.3f} | {r['vmap_ms']:.3f} | "
              f"{r['ensemble_ms']:.3f} | **{r['ratio']:.2f}x** | {r['ratio_vmap_path']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
