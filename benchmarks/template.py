"""What a ``MetaTemplate`` call costs over calling ``torch.func.functional_call`` by hand.

The baseline is what the template replaces: a meta copy of the module
(``copy.deepcopy(net).to("meta")``) called with
``torch.func.functional_call(meta, params, x)``. The template's call adds its
checks (``strict``: names, shapes, ties), puts the source's modes in place
(``state_from``), and, since 2026-12-04, notes the plain attributes of the
modules whose forward may store something and puts them back after the call.
Measured for a plain dict (``template(params, x)``) and for a
``template.state_from(net)`` mapping, each against the hand-written call with
the same tensors, interleaved in one process (median of per-round ratios), in
eval mode under ``torch.no_grad()`` (the call overhead, not autograd). Since
2026-12-06 also the pattern of a training step, ``template(template.state_from(net), x)``
(the mapping made on every call), against the hand-written call that gathers
``net``'s parameters and buffers on every call.

Prints a Markdown table; ``--json PATH`` also writes the raw numbers.

    python benchmarks/template.py [--rounds 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lightning_meta as lm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

Model = tuple[str, Callable[[], nn.Module], Callable[[], Any]]


def _models() -> list[Model]:
    out: list[Model] = [
        (
            "MLP 3 x Linear(64), batch 32 (a hypernetwork's target)",
            lambda: nn.Sequential(
                nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
            ),
            lambda: torch.randn(32, 64),
        ),
        (
            "nn.TransformerEncoderLayer(64, 4, 128), batch 16x32",
            lambda: nn.TransformerEncoderLayer(64, 4, 128, batch_first=True),
            lambda: torch.randn(16, 32, 64),
        ),
    ]
    try:
        from support.zoo_models import ZOO, available

        for name in ("gpt2", "litgpt"):
            entry = ZOO[name]
            if available(entry):
                ids = entry.inputs()
                out.append((f"{name} (tiny zoo config)", entry.build, lambda ids=ids: ids))
    except ImportError:
        pass
    return out


def _call(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def _inputs(x: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return ((), x) if isinstance(x, dict) else ((x,), {})


def measure(model: Model, rounds: int) -> dict[str, Any]:
    """Time the template's calls and the hand-written ones, interleaved."""
    name, build, make_input = model
    torch.manual_seed(0)
    net = build().eval()
    template = lm.MetaTemplate(net)
    meta = copy.deepcopy(net).to("meta")
    params = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    state = template.state_from(net)
    args, kwargs = _inputs(make_input())

    def hand() -> Any:
        return torch.func.functional_call(meta, params, args, kwargs)

    def plain() -> Any:
        return template(params, *args, **kwargs)

    def from_net() -> Any:
        return template(state, *args, **kwargs)

    def hand_gather() -> Any:
        tensors = {**dict(net.named_parameters()), **dict(net.named_buffers())}
        return torch.func.functional_call(meta, tensors, args, kwargs)

    def per_step() -> Any:
        return template(template.state_from(net), *args, **kwargs)

    with torch.no_grad():
        variants = {
            "hand": hand,
            "plain": plain,
            "state_from": from_net,
            "hand_gather": hand_gather,
            "per_step": per_step,
        }
        for fn in variants.values():
            _call(fn, 5)
        n = max(3, int(0.02 / max(_call(hand, 3), 1e-6)))
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for k, fn in variants.items():
                times[k].append(_call(fn, n))
    ratio = {
        k: statistics.median(t / h for t, h in zip(times[k], times[base], strict=True))
        for k, base in (("plain", "hand"), ("state_from", "hand"), ("per_step", "hand_gather"))
    }
    return {
        "model": name,
        "hand_us": statistics.median(times["hand"]) * 1e6,
        "plain_us": statistics.median(times["plain"]) * 1e6,
        "state_from_us": statistics.median(times["state_from"]) * 1e6,
        "plain_ratio": ratio["plain"],
        "state_from_ratio": ratio["state_from"],
        "hand_gather_us": statistics.median(times["hand_gather"]) * 1e6,
        "per_step_us": statistics.median(times["per_step"]) * 1e6,
        "per_step_ratio": ratio["per_step"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rows = [measure(m, args.rounds) for m in _models()]
    print(
        "| model | hand functional_call (us) | template(dict) (us) | x hand | "
        "template(state_from) (us) | x hand | hand, gathering per call (us) | "
        "template(template.state_from(net)) (us) | x hand gathering |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']} | {r['hand_us']:.0f} | {r['plain_us']:.0f} | "
            f"{r['plain_ratio']:.2f} | {r['state_from_us']:.0f} | {r['state_from_ratio']:.2f} | "
            f"{r['hand_gather_us']:.0f} | {r['per_step_us']:.0f} | {r['per_step_ratio']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
