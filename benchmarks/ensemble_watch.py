"""What ``Ensemble``'s vmap plan costs over hand-written vmap for a model of custom modules.

A template of custom modules (not torch's own) is watched for embedding lookups
with a padding index under vmap (``_ensemble/_lookups.py``), once per kind of
call since 2026-12-05 (every call before, about 15-20 % of a step of small
layers). Measured: a training step (forward + backward) of 4 members of a
24-block Linear + LayerNorm model, ``Ensemble(execution="vmap")`` against
``torch.func.stack_module_state`` + ``torch.vmap(functional_call)``, interleaved in
one process, 1 thread, CPU time; ratio = median over rounds of Ensemble / hand vmap.

Prints a Markdown table; ``--json PATH`` also writes the raw numbers.

    python benchmarks/ensemble_watch.py [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import lightning_meta as lm


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 8)
        self.n = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.n(self.l(x))) * 0.5


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    members = [_Net() for _ in range(4)]
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

    steps = {"hand vmap": hand, "Ensemble vmap": ours}
    for _ in range(5):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.thread_time()
            for _ in range(args.calls):
                step()
            times[name].append((time.thread_time() - start) / args.calls)
    ratios = [e / h for e, h in zip(times["Ensemble vmap"], times["hand vmap"], strict=True)]
    row = {
        "hand_ms": statistics.median(times["hand vmap"]) * 1e3,
        "ensemble_ms": statistics.median(times["Ensemble vmap"]) * 1e3,
        "ratio": statistics.median(ratios),
    }
    print("| model | hand vmap (ms) | Ensemble vmap (ms) | Ensemble / hand |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| 4 x 24 custom blocks (Linear 8, LayerNorm), batch 4x8, train step | "
        f"{row['hand_ms']:.2f} | {row['ensemble_ms']:.2f} | {row['ratio']:.2f} |"
    )
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
