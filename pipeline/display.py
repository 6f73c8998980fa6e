"""The two ways results are shown: a markdown table and a line plot (log-2 x axis)."""

from __future__ import annotations

import math
from pathlib import Path


def fmt(x, digits: int = 2) -> str:
    """A table cell: floats to ``digits`` places, None and NaN as n/a."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(header: list[str], rows: list[list], digits: int = 2) -> str:
    """Cells that are not strings go through :func:`fmt`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cell = lambda c: c if isinstance(c, str) else fmt(c, digits)  # noqa: E731
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def line_plot(path: Path, curves: dict[str, dict], xlabel: str, ylabel: str, title: str,
              logy: bool = False, fontsize: int = 8) -> None:  # fmt: skip
    """One line per name from ``{x: y}`` points, log-2 x axis; NaN and None left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        pts = sorted((x, y) for x, y in points.items() if y is not None and not math.isnan(y))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=fontsize, wrap=True)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=fontsize - 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
