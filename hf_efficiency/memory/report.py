"""Readable output of memory estimates: byte formatting, a breakdown table, a side-by-side
table of scenarios, and a stacked-bar PNG (matplotlib, imported only when plotting)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .estimator import MemoryBreakdown

_BINARY = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_DECIMAL = (("GB", 10**9), ("MB", 10**6), ("kB", 10**3))


def format_bytes(n: float, decimal: bool = False) -> str:
    """``1536 -> '1.50 KiB'``; ``decimal=True`` uses powers of 1000 (the talk's GB)."""
    for unit, size in _DECIMAL if decimal else _BINARY:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _scenario(b: "MemoryBreakdown") -> str:
    what = b.label or f"{b.mode} {b.dtype}"
    parallel = b.details.get("parallel")
    where = b.device
    if parallel is not None:
        from .parallel import ParallelPlan

        where = f"{b.device}, per device of {ParallelPlan.from_dict(parallel).describe()}"
    return (
        f"{what}: {b.mode} on {where}, {b.dtype}, batch {b.batch_size} x {b.sequence_length} tokens, "
        f"{b.parameters:,} parameters ({b.trainable_parameters:,} trainable)"
    )


def breakdown_table(b: "MemoryBreakdown", decimal: bool = False) -> str:
    """One scenario, one row per non-zero term, then the total."""
    from .estimator import TERMS

    rows = [(title, getattr(b, name)) for name, title in TERMS if getattr(b, name)]
    width = max(len(t) for t, _ in rows + [("total", 0)])
    lines = [_scenario(b), "-" * (width + 16)]
    lines += [f"{t:<{width}}  {format_bytes(v, decimal):>13}" for t, v in rows]
    lines.append("-" * (width + 16))
    lines.append(f"{'total':<{width}}  {format_bytes(b.total, decimal):>13}")
    if b.host:
        lines.append(f"{'host (offloaded)':<{width}}  {format_bytes(b.host, decimal):>13}  (CPU memory, not in total)")
    lines += [f"note: {n}" for n in b.notes]
    return "\n".join(lines)


def comparison_markdown(breakdowns: Sequence["MemoryBreakdown"], decimal: bool = False) -> str:
    """Markdown table: one column per scenario, one row per term."""
    from .estimator import TERMS

    used = [(n, t) for n, t in TERMS if any(getattr(b, n) for b in breakdowns)]
    head = "| term | " + " | ".join(b.label or f"{b.mode} {b.dtype}" for b in breakdowns) + " |"
    sep = "|---|" + "---:|" * len(breakdowns)
    rows = [f"| {t} | " + " | ".join(format_bytes(getattr(b, n), decimal) for b in breakdowns) + " |" for n, t in used]
    total = "| **total** | " + " | ".join(f"**{format_bytes(b.total, decimal)}**" for b in breakdowns) + " |"
    return "\n".join([head, sep, *rows, total])


def plot_breakdowns(breakdowns: Sequence["MemoryBreakdown"], path: str, title: str | None = None) -> str:
    """Stacked bars, one per scenario, one colour per term (``overlap`` is drawn as the gap
    between the stack and the peak marker). Writes a PNG to ``path`` and returns it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'hf-efficiency[plot]'") from err
    from .estimator import TERMS

    terms = [(n, t) for n, t in TERMS if n != "overlap" and any(getattr(b, n) for b in breakdowns)]
    labels = [b.label or f"{b.mode} {b.dtype}" for b in breakdowns]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(breakdowns) + 3), 5))
    bottoms = [0.0] * len(breakdowns)
    for name, title_ in terms:
        values = [getattr(b, name) / 2**30 for b in breakdowns]
        ax.bar(labels, values, bottom=bottoms, label=title_)
        bottoms = [x + v for x, v in zip(bottoms, values)]
    peaks = [b.total / 2**30 for b in breakdowns]
    ax.scatter(labels, peaks, marker="_", s=900, color="black", zorder=3, label="predicted peak")
    for x, p in zip(labels, peaks):
        ax.annotate(f"{p:.2f}", (x, p), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.set_ylabel("GiB")
    ax.set_title(title or "hf-efficiency memory estimate")
    ax.legend(fontsize=8, loc="upper left")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
