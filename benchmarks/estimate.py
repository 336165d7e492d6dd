"""Benchmark ``lightning_meta.estimate``: speed and memory on large configs, accuracy on small ones.

For the Llama 70B and 270M configurations (transformers ``LlamaConfig``,
batch 1 x 4096 tokens), each in a fresh subprocess: wall time and peak RSS of
building the model on meta and estimating one AdamW training step, next to
the weights-only arithmetic of ``accelerate estimate-memory`` (its
``calculate_maximum_sizes``, training = 4x the weights). Then the
estimate-vs-measured peak-memory error for small models, measured on real
tensors on the CPU.

Run::

    python benchmarks/estimate.py [--json PATH] [--skip-large] [--no-full]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "llama-70b": {
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "vocab_size": 128256,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
    "llama-270m": {
        "hidden_size": 1024,
        "num_hidden_layers": 16,
        "vocab_size": 32000,
        "intermediate_size": 2816,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
    },
}
TOKENS = "1,4096:int64"


def _child(name: str, full: bool) -> None:
    """Estimate one configuration; print one JSON line with timings and results.

    ``estimate_s`` times the ``estimate(...)`` call alone (it builds the model
    on meta through the factory), the first in a fresh process; imports are
    timed apart. With ``full``, the same step is then simulated without block
    extrapolation, timed, and compared field by field.
    """
    start = time.perf_counter()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_meta import estimate

    imported = time.perf_counter()
    config = LlamaConfig(**CONFIGS[name])
    begin = time.perf_counter()
    est = estimate(lambda: LlamaForCausalLM(config), TOKENS, optimizer="adamw", depth=3)
    done = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    full_s = same = None
    if full:
        begin_full = time.perf_counter()
        reference = estimate(
            lambda: LlamaForCausalLM(config), TOKENS, optimizer="adamw", depth=3, extrapolate=False
        )
        full_s = time.perf_counter() - begin_full
        a, b = est.to_dict(), reference.to_dict()
        a.pop("method"), b.pop("method")
        same = a == b

    from accelerate.utils import calculate_maximum_sizes

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    weights, _ = calculate_maximum_sizes(model)
    out = {
        "config": name,
        "import_s": imported - start,
        "estimate_s": done - begin,
        "peak_rss_mb": rss,
        "method": est.method,
        "full_step_s": full_s,
        "same_as_full_step": same,
        "parameters": est.parameters,
        "forward_flops": est.forward_flops,
        "backward_flops": est.backward_flops,
        "uncounted_flops": est.uncounted_forward_flops + est.uncounted_backward_flops,
        "peak_bytes": est.peak_bytes,
        "peak_phase": est.peak_phase,
        "activation_bytes": est.activation_bytes,
        "accelerate_weights_bytes": int(weights),
        "accelerate_training_bytes": int(weights) * 4,
    }
    print(json.dumps(out))


def _large(name: str, full: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", name] + ([] if full else ["--no-full"])
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _accuracy() -> list[dict[str, Any]]:
    import torch
    from torch import nn

    from lightning_meta import estimate

    # The independent measurement is test code, not part of the package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.measure import measure_training_step

    def mlp() -> nn.Module:
        return nn.Sequential(
            nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10)
        )

    def cnn() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )

    def llama() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(
            LlamaConfig(
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=1024,
            )
        )

    models: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
        "MLP": (mlp, lambda: torch.randn(64, 256)),
        "CNN+BatchNorm": (cnn, lambda: torch.randn(16, 3, 32, 32)),
        "tiny Llama": (llama, lambda: torch.randint(0, 1024, (4, 64))),
    }
    rows = []
    for model_name, (factory, make_input) in models.items():
        for optimizer in ("adamw", "sgd"):
            for precision in ("32-true", "bf16-mixed", "bf16-true"):
                torch.manual_seed(0)
                x = make_input()
                est = estimate(factory, x, optimizer=optimizer, precision=precision)
                real = measure_training_step(
                    factory(), (x,), optimizer=optimizer, precision=precision
                )
                rows.append(
                    {
                        "model": model_name,
                        "optimizer": optimizer,
                        "precision": precision,
                        "estimated_bytes": est.peak_bytes,
                        "measured_bytes": real.peak_bytes,
                        "error_pct": 100 * (est.peak_bytes - real.peak_bytes) / real.peak_bytes,
                        "flops_equal": est.forward_flops == real.forward_flops
                        and est.backward_flops == real.backward_flops,
                    }
                )
    return rows


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--skip-large", action="store_true", help="skip the 70B and 270M runs")
    parser.add_argument(
        "--no-full", action="store_true", help="skip the reference run without block extrapolation"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, not args.no_full)
        return

    large = [] if args.skip_large else [_large(name, not args.no_full) for name in CONFIGS]
    accuracy = _accuracy()
    print(f"## estimate: large configurations (batch {TOKENS}, AdamW, 32-true, CPU)\n")
    print(
        "| config | parameters | estimate call (s) | import (s) | peak RSS (MB) | "
        "full step (s) | same as full step | "
        "estimated peak | accelerate weights | accelerate training (4x) | fwd+bwd FLOPs |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in large:
        full_s = "-" if r["full_step_s"] is None else f"{r['full_step_s']:.2f}"
        same = "-" if r["same_as_full_step"] is None else str(r["same_as_full_step"])
        print(
            f"| {r['config']} | {r['parameters']:,} | {r['estimate_s']:.2f} | {r['import_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {full_s} | {same} | "
            f"{_gb(r['peak_bytes'])} ({r['peak_phase']}) | "
            f"{_gb(r['accelerate_weights_bytes'])} | {_gb(r['accelerate_training_bytes'])} | "
            f"{(r['forward_flops'] + r['backward_flops']) / 1e12:,.1f} T |"
        )
    for r in large:
        print(f"\n{r['config']}: {r['method']}")
    print("\n## estimate vs measured peak (real CPU step, live-storage tracker)\n")
    print("| model | optimizer | precision | estimated | measured | error | FLOPs equal |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in accuracy:
        print(
            f"| {r['model']} | {r['optimizer']} | {r['precision']} | {r['estimated_bytes']:,} | "
            f"{r['measured_bytes']:,} | {r['error_pct']:+.2f}% | {r['flops_equal']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"large": large, "accuracy": accuracy}, f, indent=2)


if __name__ == "__main__":
    main()
