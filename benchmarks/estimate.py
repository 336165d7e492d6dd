"""Benchmark ``lightning_meta.estimate``: speed and memory on large configs, accuracy on small ones.

For the Llama 70B and 270M configurations (transformers ``LlamaConfig``,
batch 1 x 4096 tokens), each in a fresh subprocess: wall time and peak RSS of
building the model on meta and estimating one AdamW training step, next to
the weights-only arithmetic of ``accelerate estimate-memory`` (its
``calculate_maximum_sizes``, training = 4x the weights). Then the
estimate-vs-measured peak-memory error for small models, measured on real
tensors on the CPU.

Per rank (``--ranks``): Llama 3 8B and 70B under FSDP2 (bf16 parameters,
float32 reductions, AdamW, 1 x 4096 tokens per rank), with and without
tensor parallelism and activation checkpointing, next to DeepSpeed's ZeRO-3
estimate (``estimate_zero3_model_states_mem_needs``, no offload: parameters,
gradients and optimizer states only; DeepSpeed's own function when
``deepspeed`` imports, which it does on a CPU-only machine when built with
``DS_BUILD_OPS=0``, else its formula, and the table says which) and accelerate's
(``estimate-memory``: weights x 4 for Adam training, on one device). The
headline configuration (70B, 64 ranks, tensor parallel 8, activation
checkpointing) is timed in a fresh process, with its peak RSS.

Per rank against real runs (``--measured``): TinyLM (tests/support) trained
by real CPU processes (gloo) under DDP, FSDP2 and FSDP2 + tensor parallel,
each rank measured with the CPU allocator's own events (no package code),
next to the estimate of the same configuration (``backend="gloo"``).

Kernel scratch (``--scratch``): convolution models whose oneDNN or slow
kernels allocate inside the call, which no shape-only run sees: the
estimate's ``peak_bytes``, the bound its warning gives, and the real step's
peak from torch.profiler's allocator events (model, optimizer and a first
step inside the profile, the second step measured).

Run::

    python benchmarks/estimate.py [--json PATH] [--skip-large] [--no-full]
    python benchmarks/estimate.py --ranks [--json PATH]
    python benchmarks/estimate.py --measured [--json PATH]
    python benchmarks/estimate.py --scratch [--json PATH]
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

CONFIGS["llama-3-8b"] = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
#: (config, world size, tensor parallel, activation checkpointing); the first is the headline
RANK_CASES: list[tuple[str, int, int, bool]] = [
    ("llama-70b", 64, 8, True),
    ("llama-70b", 64, 1, True),
    ("llama-70b", 64, 8, False),
    ("llama-70b", 256, 8, True),
    ("llama-70b", 16, 8, True),
    ("llama-3-8b", 8, 1, True),
    ("llama-3-8b", 8, 1, False),
    ("llama-3-8b", 64, 1, True),
    ("llama-3-8b", 16, 2, True),
]
#: transformers' plan for Llama, plus the embedding (vocabulary rows) and the
#: head (output gathered), as torchtitan splits them (no sequence or loss parallel)
TP_EXTRA = {"model.embed_tokens": "rowwise", "lm_head": "colwise_rep"}


def zero3_formula_bytes(total_params: int, largest_layer_params: int, gpus: int) -> int:
    """DeepSpeed's ``estimate_zero3_model_states_mem_needs`` without offload, per GPU.

    ``4 * largest_layer_params + 18 * total_params / gpus``: the largest layer
    gathered in fp32, and 18 bytes per parameter (fp16 parameters and
    gradients, fp32 master weights and Adam moments) sharded over the GPUs.
    """
    return 4 * largest_layer_params + int(18 * total_params / gpus)


def zero3_gpu_bytes(total_params: int, largest_layer_params: int, gpus: int) -> tuple[int, str]:
    """DeepSpeed's own ZeRO-3 estimate per GPU (no offload), and where it came from.

    DeepSpeed's function when ``deepspeed`` imports (it builds without CUDA
    with ``DS_BUILD_OPS=0``; ``DS_ACCELERATOR=cpu``), checked against the
    formula; else the formula, and the source says so.
    """
    formula = zero3_formula_bytes(total_params, largest_layer_params, gpus)
    try:
        import deepspeed
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except ImportError:
        return formula, "formula (deepspeed not installed)"
    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params,
        largest_layer_params,
        num_gpus_per_node=gpus,
        num_nodes=1,
        cpu_offload=False,
        cpu_offload_params=False,
    )
    if int(gpu) != formula:
        raise RuntimeError(f"deepspeed's ZeRO-3 estimate {gpu} differs from the formula {formula}")
    return int(gpu), f"deepspeed {deepspeed.__version__} estimate_zero3_model_states_mem_needs"


def _rank_child(cases: list[tuple[str, int, int, bool]]) -> None:
    """Estimate per-rank cases in this process; print one JSON line per case."""
    start = time.perf_counter()
    import torch
    from accelerate.utils import calculate_maximum_sizes
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_meta import estimate

    imported = time.perf_counter() - start
    for i, (name, world, tp, ac) in enumerate(cases):
        config = LlamaConfig(**CONFIGS[name])
        plan = {**{f"model.{k}": v for k, v in config.base_model_tp_plan.items()}, **TP_EXTRA}
        begin, cpu = time.perf_counter(), time.process_time()
        est = estimate(
            lambda config=config: LlamaForCausalLM(config),
            TOKENS,
            optimizer="adamw",
            strategy="fsdp",
            world_size=world,
            tensor_parallel=tp,
            tensor_parallel_plan=plan if tp > 1 else None,
            activation_checkpointing=ac,
            mixed_precision="bf16",
        )
        seconds = time.perf_counter() - begin
        cpu_seconds = time.process_time() - cpu
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        total = sum(p.numel() for p in model.parameters())
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        weights, _ = calculate_maximum_sizes(model)
        zero3 = zero3_gpu_bytes(total, largest, world)
        assert est.rank is not None
        print(json.dumps({
            "config": name, "world_size": world, "tensor_parallel": tp, "checkpointing": ac,
            "estimate_s": seconds, "estimate_cpu_s": cpu_seconds, "import_s": imported, "peak_rss_mb": rss if i == 0 else None,
            "method": est.method, "peak_bytes": est.peak_bytes, "peak_phase": est.peak_phase,
            "breakdown": est.peak_breakdown, "rank_parameter_bytes": est.rank.parameter_bytes,
            "rank_flops": est.rank.forward_flops + est.rank.backward_flops,
            "zero3_bytes": zero3[0], "zero3_source": zero3[1],
            "accelerate_training_bytes": int(weights) * 4,
        }), flush=True)  # fmt: skip


def _ranks() -> list[dict[str, Any]]:
    """The headline case in a fresh process (time, RSS), then the others in another."""
    rows = []
    for cases in (RANK_CASES[:1], RANK_CASES[1:]):
        command = [sys.executable, __file__, "--child-ranks", json.dumps(cases)]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"per-rank cases failed:\n{proc.stderr}")
        rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return rows


#: (world size, configs of support.run_estimate_ranks)
MEASURED: list[tuple[int, list[dict[str, Any]]]] = [
    (
        2,
        [
            {"strategy": "ddp"},
            {"strategy": "ddp", "bucket_view": True},
            {"strategy": "fsdp"},
            {"strategy": "fsdp", "ac": True},
            {"strategy": "fsdp", "mp": "bf16"},
            {"strategy": "fsdp", "reshard": False},
        ],
    ),
    (
        4,
        [
            {"strategy": "ddp"},
            {"strategy": "fsdp"},
            {"strategy": "fsdp", "mp": "bf16", "ac": True},
            {"strategy": "fsdp", "tp": 2},
            {"strategy": "fsdp", "tp": 2, "ac": True},
            {"strategy": "fsdp", "tp": 2, "mp": "bf16"},
        ],
    ),
]


def _measured() -> list[dict[str, Any]]:
    """Run the real multi-process cases and estimate each; one row per config and rank."""
    import os
    import tempfile

    from lightning_meta import estimate

    tests = Path(__file__).resolve().parents[1] / "tests"
    sys.path.insert(0, str(tests))
    from support.measure_estimate_ranks import PLAN, TinyLM, first_loss

    rows = []
    for world, configs in MEASURED:
        with tempfile.TemporaryDirectory() as workdir:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                   "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
            command = [sys.executable, "-m", "support.run_estimate_ranks", str(world), workdir]
            command += [json.dumps(c) for c in configs]
            proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            ranks = [
                json.loads(Path(workdir, f"result-{r}.json").read_text()) for r in range(world)
            ]
        for i, config in enumerate(configs):
            options: dict[str, Any] = {"strategy": config["strategy"], "world_size": world}
            if config.get("tp", 1) > 1:
                options.update(tensor_parallel=config["tp"], tensor_parallel_plan=PLAN)
            for key, option in (
                ("ac", "activation_checkpointing"),
                ("bucket_view", "gradient_as_bucket_view"),
            ):
                if config.get(key):
                    options[option] = True
            if config.get("mp"):
                options["mixed_precision"] = config["mp"]
            if "reshard" in config:
                options["reshard_after_forward"] = config["reshard"]
            est = estimate(TinyLM, "4,64:int64", loss_fn=first_loss, backend="gloo", **options)
            for rank, results in enumerate(ranks):
                measured = results[i]["peak_bytes"]
                rows.append({
                    "world_size": world, "config": config, "rank": rank,
                    "estimated_bytes": est.peak_bytes, "measured_bytes": measured,
                    "error_pct": 100 * (est.peak_bytes - measured) / measured,
                    "flops_equal": (est.forward_flops, est.backward_flops)
                    == (results[i]["forward_flops"], results[i]["backward_flops"]),
                })  # fmt: skip
    return rows


def _print_measured(rows: list[dict[str, Any]]) -> None:
    print("## per rank vs real CPU runs (gloo), TinyLM, AdamW, 4 x 64 tokens per rank\n")
    print("| ranks | strategy | rank | estimated | measured | error | FLOPs equal |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        c = r["config"]
        words = [c["strategy"]] + [
            k if v is True else f"{k}={v}" for k, v in c.items() if k != "strategy"
        ]
        print(f"| {r['world_size']} | {', '.join(words)} | {r['rank']} | {r['estimated_bytes']:,} | "
              f"{r['measured_bytes']:,} | {r['error_pct']:+.2f}% | {r['flops_equal']} |")  # fmt: skip


def _print_ranks(rows: list[dict[str, Any]]) -> None:
    gib = 2**30
    print(
        "## per rank: FSDP2, bf16 parameters / fp32 reductions, AdamW, 1 x 4096 tokens per rank\n"
    )
    print(
        "| model | ranks | TP | AC | this estimate, peak per rank | of which params+grads+optim "
        "| DeepSpeed ZeRO-3 (model states) | accelerate (4x weights, 1 device) | estimate call (s) |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        b = r["breakdown"]
        states = b["parameters"] + b["gradients"] + b["optimizer_state"]
        print(f"| {r['config']} | {r['world_size']} | {r['tensor_parallel']} | "
              f"{'yes' if r['checkpointing'] else 'no'} | {r['peak_bytes'] / gib:,.1f} GiB "
              f"({r['peak_phase']}) | {states / gib:,.1f} GiB | {r['zero3_bytes'] / gib:,.1f} GiB | "
              f"{r['accelerate_training_bytes'] / gib:,.1f} GiB | {r['estimate_s']:.1f} |")  # fmt: skip
    head = rows[0]
    print(f"\nheadline ({head['config']}, {head['world_size']} ranks, TP {head['tensor_parallel']}, "
          f"checkpointing): estimate call {head['estimate_s']:.2f} s "
          f"({head['estimate_cpu_s']:.2f} s of CPU), peak RSS "
          f"{head['peak_rss_mb']:.0f} MB; {head['method']}")  # fmt: skip
    print(f"ZeRO-3 column: {head['zero3_source']}; accelerate column: weights from "
          "accelerate.utils.calculate_maximum_sizes (fp32) x 4, its estimate-memory rule for "
          "Adam training")  # fmt: skip


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


def _allocator_peak(factory: Any, x: Any, loss_fn: Any, dtype: Any) -> int:
    """The real SGD step's peak, from the CPU allocator's events (no package code)."""
    import torch

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        torch.manual_seed(0)
        model = factory().to(dtype)
        xx = x.to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step() -> None:
            out = model(xx)
            loss = loss_fn(out)
            for p in model.parameters():
                p.grad = None
            loss.backward()
            del out, loss
            opt.step()

        step()
        with torch.profiler.record_function("measured"):
            step()
    events = list(prof.profiler.kineto_results.events())  # type: ignore[union-attr]
    measured = next(e for e in events if e.name() == "measured")
    begin, end = measured.start_ns(), measured.start_ns() + measured.duration_ns()
    live = peak = 0
    for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        if begin <= t <= end:
            peak = max(peak, live)
    return peak


def _scratch_models() -> list[tuple[str, Any, tuple[int, ...], Any]]:
    from torch import nn

    def total(o: Any) -> Any:
        return o.sum()

    def mse(o: Any) -> Any:
        return o.float().pow(2).mean()

    def cnn() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        )

    def deep() -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1)]
        for _ in range(4):
            layers += [nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
        return nn.Sequential(*layers, nn.Conv2d(16, 3, 1))

    return [
        (
            "Conv2d(3, 32, 3), sum",
            lambda: nn.Sequential(nn.Conv2d(3, 32, 3)),
            (16, 3, 64, 64),
            total,
        ),
        ("Conv2d(3, 32, 3), mse", lambda: nn.Sequential(nn.Conv2d(3, 32, 3)), (16, 3, 64, 64), mse),
        ("Conv-BN CNN", cnn, (16, 3, 64, 64), total),
        ("10 convs, 16 channels", deep, (8, 3, 32, 32), total),
        (
            "ConvTranspose2d",
            lambda: nn.Sequential(nn.ConvTranspose2d(16, 8, 3, stride=2), nn.ReLU()),
            (8, 16, 16, 16),
            total,
        ),
        (
            "Conv3d x2",
            lambda: nn.Sequential(nn.Conv3d(4, 16, 3), nn.ReLU(), nn.Conv3d(16, 8, 3)),
            (4, 4, 12, 12, 12),
            total,
        ),
        (
            "Conv2d(6, 10, 11, groups=2)",
            lambda: nn.Sequential(nn.Conv2d(6, 10, 11, groups=2)),
            (2, 6, 64, 64),
            total,
        ),
        (
            "Conv1d, grouped",
            lambda: nn.Sequential(nn.Conv1d(8, 32, 5), nn.GELU(), nn.Conv1d(32, 32, 3, groups=4)),
            (8, 8, 512),
            total,
        ),
    ]


def _scratch() -> list[dict[str, Any]]:
    import re
    import warnings

    import torch

    import lightning_meta as lm

    rows = []
    for dtype, precision in ((torch.float32, "32-true"), (torch.bfloat16, "bf16-true")):
        for name, factory, shape, loss_fn in _scratch_models():
            x = torch.randn(*shape)
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always")
                est = lm.estimate(
                    factory, x.to(dtype), loss_fn=loss_fn, optimizer="sgd", precision=precision
                )
            found = [re.search(r"by up to (\d+) bytes", str(w.message)) for w in got]
            bound = next((int(m.group(1)) for m in found if m), 0)
            real = _allocator_peak(factory, x, loss_fn, dtype)
            rows.append(
                {
                    "model": name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "peak_bytes": est.peak_bytes,
                    "warned_bound_bytes": bound,
                    "real_bytes": real,
                    "within": real <= est.peak_bytes + bound
                    and (bound > 0 or real <= 1.05 * est.peak_bytes),
                }
            )
    return rows


def _print_scratch(rows: list[dict[str, Any]]) -> None:
    print("## estimate: convolutions' kernel scratch against the real allocator peak\n")
    print(
        "| model | dtype | peak_bytes | warned: up to + | real peak | real / peak_bytes | "
        "(peak_bytes + bound) / real | within |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        up = r["peak_bytes"] + r["warned_bound_bytes"]
        print(
            f"| {r['model']} | {r['dtype']} | {r['peak_bytes']:,} | {r['warned_bound_bytes']:,} | "
            f"{r['real_bytes']:,} | {r['real_bytes'] / r['peak_bytes']:.2f} | "
            f"{up / r['real_bytes']:.2f} | {r['within']} |"
        )


def _branches() -> list[dict[str, Any]]:
    """transformers models whose code branches on a tensor being fake (``is_tracing``):
    the estimate against one real CPU step, and ``find_fit`` against a search of real
    steps, with an all-ones ``attention_mask`` (an unpadded collator's)."""
    import torch
    import transformers as tf
    from torch import nn

    from lightning_meta import estimate, find_fit

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.measure import measure_training_step

    torch.set_num_threads(1)
    vocab = 128

    def llama() -> nn.Module:
        torch.manual_seed(0)
        config = tf.LlamaConfig(
            vocab_size=vocab, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, num_hidden_layers=2, max_position_embeddings=4096,
        )  # fmt: skip
        return tf.LlamaForCausalLM(config).train()

    def bert() -> nn.Module:
        torch.manual_seed(0)
        config = tf.BertConfig(
            vocab_size=vocab, hidden_size=64, num_attention_heads=4, intermediate_size=128,
            num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return tf.BertForMaskedLM(config).train()

    def mamba() -> nn.Module:
        torch.manual_seed(0)
        config = tf.MambaConfig(
            vocab_size=vocab, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
            conv_kernel=4,
        )  # fmt: skip
        return tf.MambaForCausalLM(config).train()

    def inputs(batch: int, n: int, mask: bool) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(n))
        out = {"input_ids": ids, "labels": ids}
        if mask:
            out["attention_mask"] = torch.ones_like(ids)
        return out

    cases = [
        ("Llama, no mask", llama, inputs(1, 256, False)),
        ("Llama, all-ones mask", llama, inputs(1, 256, True)),
        ("Llama, all-ones mask", llama, inputs(1, 1024, True)),
        ("BERT, all-ones mask", bert, inputs(2, 256, True)),
        ("Mamba, default config", mamba, inputs(2, 64, False)),
    ]
    rows: list[dict[str, Any]] = []
    for name, factory, kwargs in cases:
        est = estimate(factory, kwargs).peak_bytes
        real = measure_training_step(factory(), (), kwargs).peak_bytes
        shape = "x".join(map(str, kwargs["input_ids"].shape))
        rows.append({"case": f"{name} ({shape})", "estimated": est, "measured": real})

    budget = 12 * 2**20

    def fits(n: int) -> bool:
        return measure_training_step(llama(), (), inputs(1, n, True)).peak_bytes <= budget

    lo, hi = 16, 4096  # the largest sequence whose real step fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    fit = find_fit(llama, inputs(1, 16, True), memory=budget, vary="sequence")
    rows.append({"case": "Llama, all-ones mask: find_fit sequence in 12 MiB",
                 "estimated": fit.value, "measured": lo})  # fmt: skip
    return rows


def _print_branches(rows: list[dict[str, Any]]) -> None:
    print("## estimate: transformers code that branches on fake tensors, against real steps\n")
    print("| case | estimated | measured | estimated / measured |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['estimated']:,} | {r['measured']:,} | "
            f"{r['estimated'] / r['measured']:.3f} |"
        )


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--skip-large", action="store_true", help="skip the 70B and 270M runs")
    parser.add_argument(
        "--no-full", action="store_true", help="skip the reference run without block extrapolation"
    )
    parser.add_argument(
        "--ranks", action="store_true", help="only the per-rank table (Llama 8B and 70B, FSDP2)"
    )
    parser.add_argument(
        "--measured", action="store_true", help="only per-rank estimates vs real CPU runs"
    )
    parser.add_argument(
        "--scratch",
        action="store_true",
        help="only convolutions' kernel scratch: peak_bytes, the warned bound, the real peak",
    )
    parser.add_argument(
        "--branches",
        action="store_true",
        help="only transformers code that branches on fake tensors (masks, Mamba), and "
        "find_fit with a mask, against real steps",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-ranks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, not args.no_full)
        return
    if args.child_ranks:
        _rank_child([tuple(c) for c in json.loads(args.child_ranks)])  # type: ignore[misc]
        return
    # The single-table modes: run, print, and write the rows under the mode's name.
    modes: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
        "scratch": (_scratch, _print_scratch),
        "measured": (_measured, _print_measured),
        "ranks": (_ranks, _print_ranks),
        "branches": (_branches, _print_branches),
    }
    for mode, (run, show) in modes.items():
        if getattr(args, mode):
            rows = run()
            show(rows)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({mode: rows}, f, indent=2)
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
