"""What ``lm.Ensemble`` spends on a call outside its members' forwards, with warm and cold caches.

The zoo (``benchmarks/ensemble.py --zoo``) puts the loop plan's eval cells at N=4
a few percent over the members' own loop. This splits such a call: every member's
``forward`` (the members' own, and those of the ensemble's per-member copies) is
timed apart, so what is left of a call is the caller's loop and the ensemble's own
work (choosing the plan, checking that nothing changed, taking the views, stacking the
outputs).

- ``cold``: the zoo's eval cell as it runs, one call after another, each after the
  members' kernels (an LSTM's, a transformer layer's) have filled the caches;
- ``warm``: the same ensemble and members on a 1-row input, so that the kernels
  touch little memory and the bookkeeping runs from warm caches.

Variants, interleaved in rounds: the members' loop (collecting the outputs, as in the
zoo), the same loop over the ensemble's copies, and ``Ensemble(execution="loop")``
and ``"auto"``. ``extra`` = the variant's time outside the forwards minus the
loop's, per call (median over rounds); 1 thread, the thread's CPU time. Prints a
Markdown table; ``--json PATH`` also writes the rows.

    python benchmarks/ensemble_overhead.py [--models lstm,transformer] [--seconds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lightning_meta as lm
from ensemble import SHORT, ZOO


def _timed_forwards(modules: list[nn.Module], spent: list[int]) -> None:
    """Make each module's ``forward`` add the thread CPU time it takes to ``spent[0]``."""
    for module in modules:
        forward = module.forward

        def timed(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            start = time.thread_time_ns()
            try:
                return _forward(*args, **kwargs)
            finally:
                spent[0] += time.thread_time_ns() - start

        module.forward = timed  # type: ignore[method-assign]


def measure(label: str, n: int, rows: int | None, seconds: float) -> dict[str, Any]:
    """One model: per-call time outside the forwards of each variant, minus the loop's."""
    model = ZOO[label]
    torch.manual_seed(0)
    members = [model.make().eval() for _ in range(n)]
    shape = model.input_shape if rows is None else (rows, *model.input_shape[1:])
    x = torch.randn(shape)
    forced = lm.Ensemble(members, execution="loop").eval()
    auto = lm.Ensemble(members).eval()
    with torch.no_grad():
        for _ in range(40):  # past the timing and the retiming of "auto"
            forced(x)
            auto(x)
    copies = [member.module for member in forced._shells.copies]
    spent = [0]
    _timed_forwards(members, spent)
    _timed_forwards(copies, spent)
    _timed_forwards([member.module for member in auto._shells.copies], spent)

    def members_loop() -> None:
        outs = [m(x) for m in members]
        del outs

    def copies_loop() -> None:
        outs = [m(x) for m in copies]
        del outs

    variants: dict[str, Callable[[], Any]] = {
        "loop": members_loop,
        "copies": copies_loop,
        "Ensemble loop": lambda: forced(x),
        "Ensemble auto": lambda: auto(x),
    }
    total: dict[str, list[float]] = {k: [] for k in variants}
    outside: dict[str, list[float]] = {k: [] for k in variants}
    inner = 4 if rows is None else 200
    began = time.perf_counter()
    with torch.no_grad():
        while len(total["loop"]) < 10 or time.perf_counter() - began < seconds:
            order = list(variants.items())
            if len(total["loop"]) % 2:
                order.reverse()
            for key, fn in order:
                spent[0] = 0
                start = time.thread_time_ns()
                for _ in range(inner):
                    fn()
                took = (time.thread_time_ns() - start) / inner
                total[key].append(took)
                outside[key].append(took - spent[0] / inner)
    row: dict[str, Any] = {
        "model": SHORT[label],
        "members": n,
        "caches": "cold" if rows is None else "warm",
        "input": list(shape),
        "plan": auto.plan,
        "rounds": len(total["loop"]),
        "loop_us": statistics.median(total["loop"]) / 1e3,
    }
    for key in variants:
        extra = [a - b for a, b in zip(outside[key], outside["loop"], strict=True)]
        row[f"{key} extra_us"] = statistics.median(extra) / 1e3
        row[f"{key} ratio"] = statistics.median(
            a / b for a, b in zip(total[key], total["loop"], strict=True)
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lstm,transformer")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="per model and caches")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not")
    labels = [m for m in ZOO if any(k in m for k in args.models.split(","))]
    rows = [
        measure(label, args.members, rows, args.seconds) for label in labels for rows in (None, 1)
    ]
    print(
        "| model | N | caches | plan (auto) | loop (us) | copies: extra (us) | "
        "Ensemble loop: extra (us) | ratio | Ensemble auto: extra (us) | ratio |"
    )
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']} | {r['members']} | {r['caches']} | {r['plan']} | {r['loop_us']:.1f} "
            f"| {r['copies extra_us']:.1f} | {r['Ensemble loop extra_us']:.1f} "
            f"| {r['Ensemble loop ratio']:.3f} | {r['Ensemble auto extra_us']:.1f} "
            f"| {r['Ensemble auto ratio']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
