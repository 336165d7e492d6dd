"""What the package's watches cost on the calls they are entered for, against their baselines.

- ``template``: ``MetaTemplate``'s meta watch (a ``TorchFunctionMode`` refusing an op that
  makes a real tensor from a meta one). A factory template whose module keeps a plain
  tensor attribute (a LightningModule's ``example_input_array``) holds it on meta, and
  every strict call with real tensors runs under the watch. One training step of a
  16-block residual MLP through a factory template with such an attribute (watched)
  against one without (unwatched).
- ``ensemble``: ``Ensemble``'s watch for embedding lookups with a padding index under vmap
  (``_ensemble/_lookups.py``), entered for templates of custom modules, once per kind of
  call since 2026-12-05. One training step of 4 members of a 24-block Linear + LayerNorm
  model, ``Ensemble(execution="vmap")`` against ``torch.func.stack_module_state`` +
  ``torch.vmap(functional_call)``.

Interleaved in one process, 1 thread, CPU time; ratio = median over rounds. Prints a
Markdown table; ``--json PATH`` also writes the raw numbers.

    python benchmarks/watches.py [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import lightning_meta as lm


class _Residual(nn.Module):
    def __init__(self, example: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.LayerNorm(32)) for _ in range(16)
        )
        if example:  # never read by forward, as Lightning's example_input_array
            self.example_input_array = torch.zeros(8, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 8)
        self.n = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.n(self.l(x))) * 0.5


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _template_steps() -> tuple[Callable[[], None], Callable[[], None]]:
    def step(example: bool) -> Callable[[], None]:
        torch.manual_seed(0)
        params = dict(_Residual(example).named_parameters())
        template = lm.MetaTemplate(lambda: _Residual(example))
        x = torch.randn(8, 32)
        return lambda: template(params, x).sum().backward()

    return step(False), step(True)


def _ensemble_steps() -> tuple[Callable[[], None], Callable[[], None]]:
    torch.manual_seed(0)
    members = [_Stack() for _ in range(4)]
    ensemble = lm.Ensemble(copy.deepcopy(members), execution="vmap")
    params, buffers = torch.func.stack_module_state(members)  # type: ignore[arg-type]
    base = copy.deepcopy(members[0]).to("meta")
    x = torch.randn(4, 8)

    def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(base, (p, b), (x,))
        return out

    def hand() -> None:
        torch.vmap(one)(params, buffers).sum().backward()
        for p in params.values():
            p.grad = None

    def ours() -> None:
        ensemble(x).sum().backward()
        ensemble.zero_grad(set_to_none=True)

    return hand, ours


CASES = {
    "template": (
        "MetaTemplate factory, 16-block residual MLP, batch 8x32, train step",
        "unwatched",
        "watched",
        _template_steps,
    ),
    "ensemble": (
        "Ensemble vmap, 4 x 24 custom blocks (Linear 8, LayerNorm), batch 4x8, train step",
        "hand vmap",
        "Ensemble vmap",
        _ensemble_steps,
    ),
}


def _measure(
    baseline: Callable[[], None], ours: Callable[[], None], rounds: int, calls: int
) -> dict[str, float]:
    steps = (baseline, ours)
    for _ in range(5):
        for step in steps:
            step()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for step, out in zip(steps, times, strict=True):
            start = time.thread_time()
            for _ in range(calls):
                step()
            out.append((time.thread_time() - start) / calls)
    return {
        "baseline_ms": statistics.median(times[0]) * 1e3,
        "ours_ms": statistics.median(times[1]) * 1e3,
        "ratio": statistics.median(o / b for o, b in zip(times[1], times[0], strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--cases", default="template,ensemble")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = {}
    print("| case | baseline | baseline (ms) | measured | measured (ms) | measured / baseline |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for name in args.cases.split(","):
        label, base_name, our_name, make = CASES[name]
        row = _measure(*make(), args.rounds, args.calls)
        rows[name] = row
        print(
            f"| {label} | {base_name} | {row['baseline_ms']:.2f} | {our_name} | "
            f"{row['ours_ms']:.2f} | {row['ratio']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
