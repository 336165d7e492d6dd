"""Render an :class:`~lightning_meta._estimate.Estimate` as rich tables with human units."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_meta._estimate._track import CATEGORIES

if TYPE_CHECKING:
    from rich.console import Console

    from lightning_meta._estimate._result import Estimate

__all__ = ["human_bytes", "human_count", "render"]


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

    summary = Table(
        title=f"estimate: {title}".rstrip(": "), show_header=False, title_justify="left"
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
    for key, value in rows:
        summary.add_row(key, value)
    console.print(summary)

    peak = Table(title="peak memory by use", title_justify="left")
    peak.add_column("held for")
    peak.add_column("bytes", justify="right")
    peak.add_column("share", justify="right")
    for cat in CATEGORIES:
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
