"""One step of ``lm.Ensemble`` against its baselines, measured side by side in one process.

Baselines:
  (a) a Python loop over N ``nn.Module``s,
  (b) hand-written ``torch.func.stack_module_state`` + ``vmap`` + ``functional_call``.

Reported as ratios ``Ensemble / min(a, b)`` (median of repetitions, the
variants interleaved so drift on a noisy machine hits all of them alike). A
training step is forward + backward from gradients set to None (as
``optimizer.zero_grad()`` leaves them); an eval step is ``eval()`` and a
forward under ``torch.no_grad()``, every member's output kept until the step
ends (the loop collects them in a list, as a caller would; it no longer drops
each one before the next member runs, which let the allocator reuse one
block). The ensemble's first call of each kind, where ``execution="auto"``
times its plans, and its ``RETIME_CALL``-th call, where it times them again
and settles on a plan, are reported apart (``first_call_s``,
``retime_call_s``) and not in the ratio: the measured steps come after both.
Between those two calls each ensemble step is followed by the baselines' steps,
as in the measured rounds: the second timing then runs with the caches the
measured steps see (back to back, the ensemble's own calls keep its stacked
weights in cache, and a transformer layer's vmap plan timed level with its
loop plan, then ran 5-10 % slower in the measured rounds).

    python benchmarks/ensemble.py [--json out.json] [--repeats 5]   # MLPs, 1 thread
    python benchmarks/ensemble.py --zoo [--json zoo.json]           # every architecture
    python benchmarks/ensemble.py --zoo --device cuda --threads 1   # the same table on a GPU

``--zoo`` covers an MLP (small, large, and small with dropout), a CNN with
BatchNorm (ResNet basic blocks), a transformer encoder layer and an LSTM, at N in {4, 16, 32}, on 1
and 2 threads, float32 and bfloat16, training and eval; ``--models``,
``--members``, ``--threads``, ``--dtypes`` and ``--modes`` narrow it.

On glibc, every allocation above 32 MiB is a fresh mmap, page-faulted anew
each step; a stacked gradient of 32 members of 1024x1024 is 128 MiB, the
loop's per-member ones are 4 MiB. The ensemble reuses its own gradient
buffers across steps, so the default allocator is what this measures; run
with MALLOC_MMAP_THRESHOLD_=2000000000 (or jemalloc / tcmalloc) to compare,
or with --no-grad-reuse to see the gap the reuse closes.

A cell over 1.05x is measured again (--recheck times, fresh ensemble and
plan) and every figure is printed, so noise from other processes on a shared
machine can be told from a plan that picks wrong. ``--control`` also times
the loop a second time, as a variant of its own in the same rounds, and
reports that loop over the first (``[A/A 1.02]``): the spread of a ratio
between two identical steps, which a cell's ratio must exceed to say that
the ensemble differs from the loop at all.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

import lightning_meta as lm
from lightning_meta._ensemble import _grads
from lightning_meta._ensemble._plan import RETIME_CALL


# ------------------------------------------------------------------ the zoo
def mlp(d_in: int, hidden: int, d_out: int, dropout: float | None = None) -> nn.Module:
    """Three Linear layers with ReLUs (and, given ``dropout``, a Dropout after each ReLU)."""
    drop = [] if dropout is None else [nn.Dropout(dropout)]
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        *drop,
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        *[nn.Dropout(dropout) for _ in drop],
        nn.Linear(hidden, d_out),
    )


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with BatchNorm and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


def resnet(channels: int, blocks: int = 2, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        *[BasicBlock(channels) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, classes),
    )


class LastStep(nn.Module):
    """An LSTM whose output is its last hidden state, projected."""

    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out)


@dataclass(frozen=True)
class Model:
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


ZOO: dict[str, Model] = {
    "mlp small (64-128-128-10), batch 64": Model(lambda: mlp(64, 128, 10), (64, 64)),
    "mlp large (512-1024-1024-10), batch 64": Model(lambda: mlp(512, 1024, 10), (64, 512)),
    "mlp dropout (64-128-128-10, p=0.1), batch 64": Model(
        lambda: mlp(64, 128, 10, dropout=0.1), (64, 64)
    ),
    "cnn 2x BasicBlock(16) + BN, batch 8x3x16x16": Model(lambda: resnet(16), (8, 3, 16, 16)),
    "transformer layer (64, 4, 128), batch 16x32": Model(
        lambda: nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), (16, 32, 64)
    ),
    "lstm (32 -> 64) + linear, batch 16x32": Model(lambda: LastStep(32, 64), (16, 32, 32)),
}
SHORT = {name: name.split(" (")[0].split(" 2x")[0].split(",")[0] for name in ZOO}


# ----------------------------------------------------------------- timing
DEVICE = torch.device("cpu")  # --device


def clock() -> float:
    """The calling thread's CPU time on one CPU thread (immune to other processes), else wall time.

    On an accelerator the clock waits for the queued kernels first: CPU time
    would count only their launches.
    """
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        return time.perf_counter()
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def timed(step: Callable[[], None], inner: int) -> float:
    start = clock()
    for _ in range(inner):
        step()
    return (clock() - start) / inner


def runs(step: Callable[[], None]) -> bool:
    try:
        step()
    except RuntimeError:  # torch.vmap has no batching rule for an op (LSTM)
        return False
    return True


def cell(
    model: Model,
    n: int,
    dtype: torch.dtype,
    train: bool,
    rounds: int,
    seconds: float,
    control: bool = False,
) -> dict[str, Any]:
    """Time one cell: at least ``rounds`` rounds and ``seconds`` of timing.

    Every round runs each variant once (``inner`` steps), in alternating
    order; the ratio is the median over rounds of Ensemble / baseline, for the
    faster baseline (the larger of the two ratios). With ``control`` the loop
    runs twice per round, and ``control`` is the median of the second over the
    first: what a ratio of two identical steps gives here.
    """
    torch.manual_seed(0)
    members = [model.make().to(DEVICE, dtype).train(train) for _ in range(n)]
    x = torch.randn(model.input_shape, dtype=dtype).to(DEVICE)

    def loss_of(out: torch.Tensor) -> torch.Tensor:  # per member: mean of squares, summed
        return out.float().square().flatten(1).mean(1).sum()

    def loop_step() -> None:
        if train:
            for m in members:
                m.zero_grad()
            sum(m(x).float().square().mean() for m in members).backward()  # type: ignore[union-attr]
        else:
            # Keep the outputs, as Ensemble returns them all: a loop that drops
            # each one lets the allocator hand the next member the same block.
            with torch.no_grad():
                outs = [m(x) for m in members]
            del outs

    params, buffers = stack_module_state(members)  # type: ignore[arg-type]
    base = copy.deepcopy(members[0]).to("meta")

    def call(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
        return functional_call(base, (p, b), (x,))

    batched = vmap(call, in_dims=(0, 0, None), randomness="different")

    def vmap_step() -> None:
        if train:
            for p in params.values():
                p.grad = None
            loss_of(batched(params, buffers, x)).backward()
        else:
            with torch.no_grad():
                batched(params, buffers, x)

    ensemble = lm.Ensemble(members).train(train)

    def ensemble_step() -> None:
        if train:
            ensemble.zero_grad()
            loss_of(ensemble(x)).backward()
        else:
            with torch.no_grad():
                ensemble(x)

    baselines = {"loop": loop_step, "vmap": vmap_step}
    if not runs(vmap_step):
        del baselines["vmap"]
    start = clock()
    ensemble_step()  # the first call of this kind: auto times its plans here
    first_call = clock() - start
    first_plan = ensemble.plan
    for _ in range(RETIME_CALL - 2):
        # The baselines run between the ensemble's calls, as in the measured
        # rounds, so that the second timing sees the caches those rounds see.
        ensemble_step()
        for fn in baselines.values():
            fn()
    start = clock()
    ensemble_step()  # auto times the plans again and keeps this choice
    retime_call = clock() - start
    steps = {**baselines, "ensemble": ensemble_step}
    if control:
        steps["loop again"] = loop_step
    for fn in steps.values():
        fn()
    inner = max(1, round(2e-3 / max(timed(loop_step, 1), 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in steps}
    began = time.perf_counter()
    while len(times["loop"]) < rounds or time.perf_counter() - began < seconds:
        order = list(steps.items())
        if len(times["loop"]) % 2:
            order.reverse()
        for k, fn in order:
            times[k].append(timed(fn, inner))
        if len(times["loop"]) >= 20 * rounds:
            break
    med = {k: statistics.median(v) for k, v in times.items()}
    per_baseline = {
        b: statistics.median(e / t for e, t in zip(times["ensemble"], times[b], strict=True))
        for b in ("loop", "vmap")
        if b in times
    }
    record = ensemble.plans[-1] if ensemble.plans else None
    return {
        "vmap_ms": None,
        **{f"{k}_ms": v * 1e3 for k, v in med.items()},
        "ratio": max(per_baseline.values()),
        "ratio_of_medians": med["ensemble"] / min(med["loop"], med.get("vmap", math.inf)),
        "control": statistics.median(
            a / b for a, b in zip(times["loop again"], times["loop"], strict=True)
        )
        if control
        else None,
        "rounds": len(times["loop"]),
        "plan": ensemble.plan,
        "plan_timings_ms": dict(record.timings_ms) if record else {},
        "first_call_s": first_call,
        "retime_call_s": retime_call,
        "first_plan": first_plan,
    }


# ------------------------------------------------------------------ tables
def mlp_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    rows = []
    for label in list(ZOO)[:2]:
        for n in (4, 32):
            r = cell(ZOO[label], n, torch.float32, True, args.repeats, args.seconds)
            rows.append({"model": label, "members": n, **r})
    print(
        f"torch {torch.__version__}, 1 thread, training step, >= {args.repeats} rounds, "
        f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'glibc default')}, "
        f"gradient buffer reuse {'off' if _grads.REUSE_BYTES > 1 << 40 else 'on'}\n"
    )
    print("| model | N | loop (a) ms | vmap (b) ms | Ensemble ms | plan | Ensemble / min(a,b) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['members']} | {r['loop_ms']:.3f} | {r['vmap_ms']:.3f} | "
            f"{r['ensemble_ms']:.3f} | {r['plan']} | **{r['ratio']:.2f}x** |"
        )
    return rows


def describe(r: dict[str, Any]) -> str:
    """``ratio plan``, bold over 1.05x, then every recheck of the cell."""

    def one(ratio: float, plan: str) -> str:
        mark = "**" if ratio > 1.05 else ""
        return f"{mark}{ratio:.2f}{mark} {plan}"

    text = one(r["ratio"], r["plan"])
    if r.get("control") is not None:
        text += f" [A/A {r['control']:.2f}]"
    for again in r.get("rechecks", []):
        text += f" (again: {one(again['ratio'], again['plan'])}"
        if again.get("control") is not None:
            text += f" [A/A {again['control']:.2f}]"
        text += ")"
    return text


def zoo_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    models = [m for m in ZOO if not args.models or any(k in m for k in args.models.split(","))]
    rows = []
    # Models innermost but one: a run stopped early has every model for the
    # settings it reached.
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for dtype_name in args.dtypes.split(","):
            for mode in args.modes.split(","):
                for label in models:
                    for n in (int(m) for m in args.members.split(",")):
                        r = cell(
                            ZOO[label],
                            n,
                            getattr(torch, dtype_name),
                            mode == "train",
                            args.repeats,
                            args.seconds,
                            args.control,
                        )
                        # Over target: noise (a burst of load from elsewhere)
                        # or real? Measure again; every figure is kept.
                        r["rechecks"] = []
                        for _ in range(args.recheck if r["ratio"] > 1.05 else 0):
                            again = cell(
                                ZOO[label],
                                n,
                                getattr(torch, dtype_name),
                                mode == "train",
                                args.repeats,
                                args.seconds,
                                args.control,
                            )
                            r["rechecks"].append(
                                {
                                    k: again[k]
                                    for k in ("ratio", "plan", "plan_timings_ms", "control")
                                }
                            )
                            if again["ratio"] <= 1.05:
                                break
                        row = {
                            "model": label,
                            "device": str(DEVICE),
                            "threads": threads,
                            "dtype": dtype_name,
                            "mode": mode,
                            "members": n,
                            **r,
                        }
                        rows.append(row)
                        if args.json:  # after every cell: a long run stopped early keeps its cells
                            write(args.json, rows)
                        print(
                            f"{SHORT[label]:12s} t={threads} {dtype_name:8s} {mode:5s} N={n:2d} "
                            f"{describe(r)}",
                            flush=True,
                        )
    print(
        f"\ntorch {torch.__version__} on {device_name()}, >= {args.repeats} rounds and {args.seconds} s per cell; "
        "ratio = median over rounds of Ensemble / the faster of (loop, hand vmap); "
        "plan = what execution='auto' chose; (again: ...) = the cell measured anew "
        "because it was over 1.05x; [A/A r] = the loop timed twice, the second over the first "
        f"(--control); gradient buffer reuse "
        f"{'off' if _grads.REUSE_BYTES > 1 << 40 else 'on'}\n"
    )
    print_table(rows)
    return rows


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return "the CPU"


def print_table(rows: list[dict[str, Any]]) -> None:
    """The Markdown table of zoo ``rows``: one line per model, threads, dtype and mode."""
    members = sorted({r["members"] for r in rows})
    print("| model | threads | dtype | mode | " + " | ".join(f"N={n}" for n in members) + " |")
    print("|---|---|---|---|" + "---|" * len(members))
    lines: dict[tuple[str, int, str, str], dict[int, dict[str, Any]]] = {}
    for r in rows:
        lines.setdefault((r["model"], r["threads"], r["dtype"], r["mode"]), {})[r["members"]] = r
    order = list(ZOO)
    for (label, threads, dtype_name, mode), cells in sorted(
        lines.items(), key=lambda kv: (order.index(kv[0][0]), *kv[0][1:])
    ):
        text = " | ".join(describe(cells[n]) if n in cells else "" for n in members)
        print(f"| {SHORT[label]} | {threads} | {dtype_name} | {mode} | {text} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--repeats", type=int, default=7, help="at least this many rounds")
    parser.add_argument("--seconds", type=float, default=3.0, help="and at least this long")
    parser.add_argument("--zoo", action="store_true", help="every architecture and setting")
    parser.add_argument("--models", default="", help="comma-separated substrings of model names")
    parser.add_argument("--members", default="4,16,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--modes", default="train,eval")
    parser.add_argument(
        "--recheck",
        type=int,
        default=1,
        help="measure a cell over 1.05x again this many times (fresh ensemble, fresh plan)",
    )
    parser.add_argument(
        "--no-grad-reuse",
        action="store_true",
        help="turn off the ensemble's reuse of large gradient buffers (the 'before' of the "
        "allocator gap)",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also time the loop a second time in every round and report it over the first "
        "([A/A r]): the noise floor of the cell's ratio",
    )
    parser.add_argument("--table", help="print the table of a --zoo JSON file and exit")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where members, inputs and the stacked weights live (cuda: timings wait for "
        "the kernels; --threads 1 then sets only the host's threads)",
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    # The hand-written vmap baseline runs TransformerEncoderLayer's fast path
    # per member in eval, and torch says so once; the table counts that cost.
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not")
    if args.table:
        with open(args.table) as f:
            print_table(json.load(f))
        return
    if args.no_grad_reuse:
        _grads.REUSE_BYTES = 1 << 62
    rows = zoo_table(args) if args.zoo else mlp_table(args)
    if args.json:
        write(args.json, rows)


def write(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
