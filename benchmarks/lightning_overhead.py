"""Benchmark what MetaGuard costs inside ``Trainer.fit``.

1. ``trainer.fit`` wall time for a small eager model with and without
   ``MetaGuard`` (repetitions interleaved in one process, after a warm-up),
   as a ratio of medians; target <= 1.02x.
2. Time from the start of model construction to the first training step for a
   Llama-style transformers model (hidden 1024, 16 layers, vocab 32000: about
   270M parameters): built under ``lm.deferred_init`` + ``MetaGuard``
   (materialized inside ``fit``) vs built eagerly in ``__init__``; each variant
   in fresh subprocesses, median reported; target deferred <= eager.

Prints a Markdown table; ``--json PATH`` also writes the raw numbers.

    python benchmarks/lightning_overhead.py            # full size
    python benchmarks/lightning_overhead.py --small    # quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch

from _llama import llama_config


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _trainer(callbacks: list[Any], **kwargs: Any) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks, **kwargs,
    )  # fmt: skip


def small_fit(reps: int) -> dict[str, Any]:
    """Median ``fit`` time of a small MLP with and without MetaGuard, interleaved."""
    import lightning as L
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_meta._guard._callback import MetaGuard

    class Small(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = TensorDataset(torch.randn(2048, 32), torch.randn(2048, 1))

    def once(guard: bool) -> float:
        torch.manual_seed(0)
        model = Small()
        trainer = _trainer([MetaGuard()] if guard else [], max_epochs=2)
        start = time.perf_counter()
        trainer.fit(model, DataLoader(data, batch_size=64))
        return time.perf_counter() - start

    once(False), once(True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(reps):
        for guard in (i % 2 == 0, i % 2 != 0):  # alternate which one goes first
            times[guard].append(once(guard))
    plain, guarded = statistics.median(times[False]), statistics.median(times[True])
    return {
        "plain_s": plain,
        "guard_s": guarded,
        "ratio": guarded / plain,
        "reps": reps,
        "raw": {"plain": times[False], "guard": times[True]},
    }


def first_step(variant: str, small: bool) -> dict[str, Any]:
    """In this (fresh) process: seconds from construction start to the first training step."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaForCausalLM

    import lightning_meta as lm
    from lightning_meta._guard._callback import MetaGuard

    config = llama_config(small)
    vocab = config.vocab_size

    class Llama(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            if variant == "deferred":
                with lm.deferred_init():
                    self.model = LlamaForCausalLM(config)
            else:
                self.model = LlamaForCausalLM(config)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (ids,) = batch
            loss: torch.Tensor = self.model(input_ids=ids, labels=ids).loss
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Stamp(Callback):
        at: float = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            if not self.at:
                self.at = time.perf_counter()

    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(ids), batch_size=2)
    stamp = Stamp()
    callbacks: list[Callback] = [stamp, MetaGuard()] if variant == "deferred" else [stamp]
    trainer = _trainer(callbacks, max_steps=1, num_sanity_val_steps=0)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = Llama()
    built = time.perf_counter()
    trainer.fit(model, data)
    params = sum(p.numel() for p in model.parameters())
    return {
        "variant": variant,
        "construct_s": built - start,
        "to_first_step_s": stamp.at - start,
        "parameters": params,
    }


def _subprocess(variant: str, small: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", variant] + (["--small"] if small else [])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a ~7M-parameter Llama config")
    parser.add_argument("--reps", type=int, default=7, help="fit repetitions per variant")
    parser.add_argument("--repeat", type=int, default=3, help="subprocesses per Llama variant")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _quiet()
    if args.child:
        print(json.dumps(first_step(args.child, args.small)))
        return

    fit = small_fit(args.reps)
    runs: dict[str, list[dict[str, Any]]] = {"eager": [], "deferred": []}
    for _ in range(args.repeat):
        for variant in runs:  # interleaved: eager, deferred, eager, ...
            runs[variant].append(_subprocess(variant, args.small))
    llama = {
        v: {
            "to_first_step_s": statistics.median(r["to_first_step_s"] for r in rs),
            "construct_s": statistics.median(r["construct_s"] for r in rs),
            "parameters": rs[0]["parameters"],
            "raw": rs,
        }
        for v, rs in runs.items()
    }
    ratio = llama["deferred"]["to_first_step_s"] / llama["eager"]["to_first_step_s"]
    n = llama["eager"]["parameters"]
    lines = [
        "| measurement | eager / without MetaGuard (s) | deferred / with MetaGuard (s) | ratio | target |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| small MLP `trainer.fit`, eager model, median of {fit['reps']} interleaved | "
        f"{fit['plain_s']:.3f} | {fit['guard_s']:.3f} | {fit['ratio']:.3f}x | <= 1.02x |",
        f"| Llama {n / 1e6:.0f}M: construction start -> first training step, median of "
        f"{args.repeat} subprocesses | {llama['eager']['to_first_step_s']:.2f} | "
        f"{llama['deferred']['to_first_step_s']:.2f} | {ratio:.3f}x | <= 1.00x |",
        f"| (of which: construction only) | {llama['eager']['construct_s']:.2f} | "
        f"{llama['deferred']['construct_s']:.2f} | | |",
    ]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"small_fit": fit, "llama": llama, "ratio_first_step": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
