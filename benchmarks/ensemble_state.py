"""What watching a forward's plain attributes costs an ``lm.Ensemble`` call under ``vmap``.

``execution="vmap"`` runs one template for every member, so each call notes the
template's plain attributes before the forward and compares them after (a
forward that stores a tensor of its own there is refused: see
``docs/guarantees.md``). Modules of torch's own classes without hooks are not
watched. This measures, in one process, an eval call (``torch.no_grad()``) of
the same ensemble with the watch on and with it switched off (the template's
watch list emptied for the "off" calls), interleaved, median of per-round
ratios; and the watch alone (note + compare) in microseconds.

Prints a Markdown table; ``--json PATH`` also writes the raw numbers.

    python benchmarks/ensemble_state.py [--rounds 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lightning_meta as lm
from lightning_meta._forward_state import AttributeState

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _models() -> list[tuple[str, Callable[[], nn.Module], int, Callable[[], Any]]]:
    out: list[tuple[str, Callable[[], nn.Module], int, Callable[[], Any]]] = [
        (
            "nn.TransformerEncoderLayer(64, 4, 128), batch 16x32",
            lambda: nn.TransformerEncoderLayer(64, 4, 128, batch_first=True),
            16,
            lambda: (torch.randn(16, 32, 64),),
        ),
        (
            "60 x (Linear 8, GELU, LayerNorm), batch 4",
            lambda: nn.Sequential(
                *[nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8)) for _ in range(60)]
            ),
            4,
            lambda: (torch.randn(4, 8),),
        ),
    ]
    try:
        from support.zoo_models import ZOO, available

        entry = ZOO["bert"]
        if available(entry):
            out.append(
                (
                    "transformers BERT (tiny), 6 tokens",
                    entry.build,
                    4,
                    lambda: (entry.inputs()["input_ids"],),
                )
            )
    except ImportError:
        pass
    return out


def _cell(name: str, make: Callable[[], nn.Module], n: int, inputs: Any, rounds: int) -> dict:
    torch.manual_seed(0)
    ensemble = lm.Ensemble([make().eval() for _ in range(n)], execution="vmap").eval()
    xs = inputs()
    watched = ensemble._watched_template()
    cache = ensemble._watch_cache

    def call() -> None:
        with torch.no_grad():
            ensemble(*xs)

    def watch_on() -> None:
        ensemble._watch_cache = cache

    def watch_off() -> None:
        assert cache is not None
        ensemble._watch_cache = (cache[0], cache[1], [])

    call()
    inner = max(1, round(5e-3 / max(timeit.timeit(call, number=1), 1e-6)))
    ratios, on_times, off_times = [], [], []
    for r in range(rounds):
        order = [(watch_on, on_times), (watch_off, off_times)]
        for switch, times in order if r % 2 else order[::-1]:
            switch()
            start = time.perf_counter()
            for _ in range(inner):
                call()
            times.append((time.perf_counter() - start) / inner)
        ratios.append(on_times[-1] / off_times[-1])
    watch_on()

    def note_and_compare() -> None:
        AttributeState(watched).written(lambda t: True)

    watch_us = min(timeit.repeat(note_and_compare, number=200, repeat=5)) / 200 * 1e6
    return {
        "model": name,
        "members": n,
        "modules": len(ensemble._template_modules()),
        "watched": len(watched),
        "watch_us": watch_us,
        "call_ms": statistics.median(off_times) * 1e3,
        "ratio": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows = [_cell(name, make, n, xs, args.rounds) for name, make, n, xs in _models()]
    print(f"torch {torch.__version__}, 1 thread, eval, {args.rounds} rounds\n")
    print("| template | N | modules | watched | watch (us) | call, watch off (ms) | on / off |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['model']} | {row['members']} | {row['modules']} | {row['watched']} | "
            f"{row['watch_us']:.0f} | {row['call_ms']:.2f} | {row['ratio']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
