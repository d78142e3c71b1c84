"""Plotting plumbing: a headless pyplot, PNGs written atomically, readable log axes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from project.io import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Render the figure as a PNG and write it atomically to `path`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def log_x(ax: Any, base: float = 10) -> None:
    """Log x axis whose tick labels stay readable when it spans less than a decade."""
    ax.set_xscale("log", base=base)
    ax.tick_params(axis="x", which="both", labelsize=7, labelrotation=30)
