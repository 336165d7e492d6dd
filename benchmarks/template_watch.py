"""What ``MetaTemplate``'s meta watch costs on the calls it is entered for.

A factory template whose module keeps a plain tensor attribute (a
LightningModule's ``example_input_array``) holds it on meta, and every strict
call with real tensors then runs under the watch (a ``TorchFunctionMode``
that refuses an op making a real tensor from a meta one). Measured: one
training step (forward + backward) of the same 16-block residual MLP through
a factory template with and without such an attribute, interleaved in one
process, 1 thread, CPU time; ratio = median over rounds of watched / unwatched.

Prints a Markdown table; ``--json PATH`` also writes the raw numbers.

    python benchmarks/template_watch.py [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import lightning_meta as lm


class _Net(nn.Module):
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


def _step(example: bool) -> tuple[object, dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    net = _Net(example)
    template = lm.MetaTemplate(lambda: _Net(example))
    return template, dict(net.named_parameters()), torch.randn(8, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cases = {"unwatched": _step(False), "watched": _step(True)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(3):  # warm-up
        for template, params, x in cases.values():
            template(params, x).sum().backward()  # type: ignore[operator]
    for _ in range(args.rounds):
        for name, (template, params, x) in cases.items():
            start = time.thread_time()
            for _ in range(args.calls):
                template(params, x).sum().backward()  # type: ignore[operator]
            times[name].append((time.thread_time() - start) / args.calls)
    ratios = [w / u for w, u in zip(times["watched"], times["unwatched"], strict=True)]
    row = {
        "unwatched_ms": statistics.median(times["unwatched"]) * 1e3,
        "watched_ms": statistics.median(times["watched"]) * 1e3,
        "ratio": statistics.median(ratios),
    }
    print("| model | unwatched (ms) | watched (ms) | watched / unwatched |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| 16-block residual MLP, batch 8x32, train step | {row['unwatched_ms']:.2f} | "
        f"{row['watched_ms']:.2f} | {row['ratio']:.2f} |"
    )
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
