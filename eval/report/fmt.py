"""Formatting shared by the report's Markdown: numbers in human units, table headers, estimates with intervals."""

from __future__ import annotations

import math
from typing import Any


def si(x: Any) -> str:
    """A number in human units: 1.23M, 4.5K ( for None)."""
    if x is None:
        return ""
    x = float(x)
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def fixed(x: Any, digits: int, signed: bool = False) -> str:
    """A number with fixed digits, signed if asked ( for None or NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def md_head(*cols: str) -> list[str]:
    """A Markdown table's header and separator lines."""
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def interval_cell(estimate: float | None, low: float | None, high: float | None, fmt: str,
                  note: str | None = None, unit: str = "") -> str:  # fmt: skip
    """'+0.0123 [-0.0100, +0.0346]' (or the estimate and the note when there is no interval)."""
    if estimate is None:
        return ""
    cell = format(estimate, fmt) + unit
    if low is not None and high is not None:
        return f"{cell} [{format(low, fmt)}{unit}, {format(high, fmt)}{unit}]"
    return f"{cell} ({note})" if note else cell
