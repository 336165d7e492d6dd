"""Benchmark loading into a model with load code of its own (litgpt's GPT).

litgpt's ``CausalSelfAttention`` overrides ``_load_from_state_dict`` (a legacy
key conversion), so ``lm.load_checkpoint`` follows what ``load_state_dict``
would do on a meta skeleton of the model before it loads (see
``lightning_meta/_load/_hooks.py``). This measures what that costs: a litgpt
GPT (``--layers`` blocks of width ``--width``) is saved once as a torch
``.pt``; then, alternating ``--repeat`` times in one process, the model is
built under ``deferred_init`` and loaded with ``lm.load_checkpoint``, and built
on meta and loaded with torch's floor, ``load_state_dict(torch.load(path),
assign=True)`` (which, like ``load_checkpoint``, reads every tensor into memory
the process owns). Prints a Markdown table of the median wall times
and their ratio; ``--json`` also writes the raw numbers. Run it with another
tree's ``src`` on ``PYTHONPATH`` to compare trees.

    python benchmarks/load_code.py --layers 12 --width 768
    python benchmarks/load_code.py --profile --repeat 5   # where the trace's time goes
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead, cProfile load_checkpoint and print the time in the load-code trace",
    )
    args = parser.parse_args()

    import torch
    from litgpt import GPT, Config

    import lightning_meta as lm

    torch.set_num_threads(1)
    cfg = Config.from_name(
        "pythia-160m", n_layer=args.layers, n_embd=args.width, n_head=args.width // 64
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(GPT(cfg).state_dict(), path)
        if args.profile:
            _profile(GPT, cfg, path, args.repeat)
            return
        times: dict[str, list[float]] = {"load_checkpoint": [], "floor": []}
        for _ in range(args.repeat):
            with lm.deferred_init():
                model = GPT(cfg)
            t0 = time.perf_counter()
            lm.load_checkpoint(model, path)
            times["load_checkpoint"].append(time.perf_counter() - t0)
            with torch.device("meta"):
                model = GPT(cfg)
            t0 = time.perf_counter()
            model.load_state_dict(torch.load(path, weights_only=True), assign=True)
            times["floor"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters())
    print(
        f"litgpt GPT, {args.layers} layers x {args.width}: {params:,} parameters, "
        f"median of {args.repeat}, 1 thread\n"
    )
    print("| load_checkpoint (ms) | floor: load_state_dict(torch.load, assign) (ms) | ratio |")
    print("| ---: | ---: | ---: |")
    print(
        f"| {med['load_checkpoint'] * 1e3:.1f} | {med['floor'] * 1e3:.1f} | "
        f"{med['load_checkpoint'] / med['floor']:.2f} |"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "times": times}, indent=1))


def _profile(gpt: Any, cfg: Any, path: Path, repeat: int) -> None:
    """Print load_checkpoint's time per call under cProfile and that of the trace's steps."""
    import cProfile
    import pstats

    import lightning_meta as lm

    steps = ("skeleton_of", "trace_load", "load_code", "run_post_hooks")
    profile, total = cProfile.Profile(), 0.0
    for i in range(repeat + 2):  # two warm-up loads
        with lm.deferred_init():
            model = gpt(cfg)
        t0 = time.perf_counter()
        if i >= 2:
            profile.enable()
        lm.load_checkpoint(model, path)
        if i >= 2:
            profile.disable()
            total += time.perf_counter() - t0
    stats: Any = pstats.Stats(profile).stats
    spent = {
        fn: sum(v[3] for k, v in stats.items() if k[0].endswith("_hooks.py") and k[2] == fn)
        for fn in steps
    }
    print(f"cProfile, {repeat} loads, ms per load\n")
    print("| load_checkpoint | " + " | ".join(steps) + " |")
    print("| ---: |" + " ---: |" * len(steps))
    print(
        f"| {total / repeat * 1e3:.1f} | "
        + " | ".join(f"{spent[fn] / repeat * 1e3:.1f}" for fn in steps)
        + " |"
    )


if __name__ == "__main__":
    main()
