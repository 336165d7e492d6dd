"""Render an :class:`~lightning_meta._estimate.Estimate` as rich tables with human units."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_meta._estimate._track import CATEGORIES

if TYPE_CHECKING:
    from rich.console import Console

    from lightning_meta._estimate._fit import Fit
    from lightning_meta._estimate._result import Estimate

__all__ = ["human_bytes", "human_count", "render", "render_fit"]


def human_bytes(n: int) -> str:
    """Return ``n`` bytes in binary units: ``human_bytes(3 * 2**30) == '3.00 GiB'``."""
    if abs(n) < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def human_count(n: int, unit: str = "") -> str:
    """Return ``n`` in decimal units: ``human_count(1_500_000, 'FLOP') == '1.50 MFLOP'``."""
    if abs(n) < 1000:
        return f"{n} {unit}".rstrip()
    value = n / 1000
    for prefix in ("K", "M", "G", "T", "P"):
        if abs(value) < 1000:
            return f"{value:.2f} {prefix}{unit}"
        value /= 1000
    return f"{value:.2f} E{unit}"


def render(est: Estimate, console: Console, *, title: str = "") -> None:
    """Print the summary, the peak-memory breakdown and the per-module table of ``est``."""
    from rich.table import Table

    per = " (per rank)" if est.rank is not None else ""
    summary = Table(
        title=f"estimate{per}: {title}".rstrip(": "), show_header=False, title_justify="left"
    )
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    dtypes = ", ".join(f"{k} {human_count(v)}" for k, v in est.parameters_by_dtype.items())
    rows = [
        ("parameters", f"{human_count(est.parameters)} ({est.parameters:,}; {dtypes})"),
        ("trainable parameters", human_count(est.trainable_parameters)),
        ("parameter bytes", human_bytes(est.parameter_bytes)),
        ("buffer bytes", human_bytes(est.buffer_bytes)),
        ("forward FLOPs", human_count(est.forward_flops, "FLOP")),
        ("backward FLOPs", human_count(est.backward_flops, "FLOP")),
        (
            "uncounted FLOPs (fwd + bwd)",
            human_count(est.uncounted_forward_flops + est.uncounted_backward_flops, "FLOP"),
        ),
        ("activations kept for backward", human_bytes(est.activation_bytes)),
        (
            "peak training-step memory",
            f"[bold]{human_bytes(est.peak_bytes)}[/] (during {est.peak_phase})",
        ),
        ("optimizer / precision / device", f"{est.optimizer} / {est.precision} / {est.device}"),
        ("simulated", est.method),
    ]
    rank = est.rank
    if rank is not None:
        mesh = (
            f"{rank.world_size} ranks = data {rank.data_parallel_size} x tensor "
            f"{rank.tensor_parallel_size}"
        )
        extras = [
            "activation checkpointing" if rank.activation_checkpointing else "",
            "no reshard after forward" if rank.reshard_after_forward is False else "",
            f"params {rank.param_dtype} / reduce {rank.reduce_dtype}" if rank.param_dtype else "",
        ]
        rows[:0] = [
            ("strategy (one rank)", ", ".join([f"{rank.strategy}: {mesh}", *filter(None, extras)])),
            (
                "parameters held by the rank",
                f"{human_count(rank.parameters)} ({human_bytes(rank.parameter_bytes)})",
            ),
        ]
        rows += [
            ("FLOPs the rank computes (fwd + bwd)",
             human_count(rank.forward_flops + rank.backward_flops, "FLOP")),
            ("blocks", f"{rank.blocks} ({rank.blocks_found})"),
        ]  # fmt: skip
    if est.inputs_read_as_zeros:
        # the model branched on an input given by shape: it took the branch zeros take
        rows.append(
            ("input values read as zeros", "; ".join(est.inputs_read_as_zeros)),
        )
    for key, value in rows:
        summary.add_row(key, value)
    console.print(summary)

    peak = Table(title="peak memory by use", title_justify="left")
    peak.add_column("held for")
    peak.add_column("bytes", justify="right")
    peak.add_column("share", justify="right")
    for cat in [*CATEGORIES, *(c for c in est.peak_breakdown if c not in CATEGORIES)]:
        held = est.peak_breakdown.get(cat, 0)
        share = f"{100 * held / est.peak_bytes:.1f}%" if est.peak_bytes else "-"
        peak.add_row(cat.replace("_", " "), human_bytes(held), share)
    console.print(peak)

    modules = Table(
        title="per module (forward; FLOPs and bytes include children)", title_justify="left"
    )
    for name, justify in (
        ("module", "left"),
        ("type", "left"),
        ("parameters", "right"),
        ("forward FLOPs", "right"),
        ("backward FLOPs", "right"),
        ("activations", "right"),
    ):
        modules.add_column(name, justify=justify)  # type: ignore[arg-type]
    for m in est.modules:
        label = "  " * m.depth + (m.name.rsplit(".", 1)[-1] if m.name else "(root)")
        modules.add_row(
            label,
            m.type,
            human_count(m.parameters),
            human_count(m.forward_flops, "FLOP"),
            human_count(m.backward_flops, "FLOP"),
            human_bytes(m.activation_bytes),
        )
    console.print(modules)


def render_fit(answer: Fit, console: Console) -> None:
    """Print the answer of :func:`~lightning_meta._estimate._fit.find_fit` in one line."""
    what = {"batch": "largest batch", "sequence": "largest sequence length"}.get(
        answer.vary, "smallest world size"
    )
    budget = human_bytes(answer.memory)
    if answer.value is None:
        # a batch or sequence search stops at 1; a world-size one at the limit
        none = (
            f"none up to {answer.limit} ranks"
            if answer.vary == "world_size"
            else f"none: even {answer.smallest} does not fit in {budget}"
            + (" (the model refuses smaller sizes)" if answer.smallest > 1 else "")
        )
        peak = (
            f"peak {human_bytes(answer.beyond.peak_bytes)}; " if answer.beyond is not None else ""
        )
        console.print(
            f"[bold]{what}[/] within {budget} per device: {none} ({peak}{answer.estimates} "
            "estimates)"
        )
        return
    peak = human_bytes(answer.fits.peak_bytes) if answer.fits is not None else "-"
    beyond = (
        f"; the next candidate needs {human_bytes(answer.beyond.peak_bytes)}"
        if answer.beyond is not None
        else ""
    )
    value = f"at least {answer.value} (the search limit)" if answer.at_limit else str(answer.value)
    if answer.refused:
        beyond = f"; {answer.value + 1} is refused by the model: {answer.refused}"
    console.print(
        f"[bold]{what}[/] within {budget} per device: [bold]{value}[/] "
        f"(peak {peak}{beyond}; {answer.estimates} estimates)"
    )
