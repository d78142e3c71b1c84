"""Statistics for the research report: pure functions over numbers (no files, no plots).

- seeds: `summarize`, `welch_delta` (Welch's t interval of a difference of means), `verdict`
- resampling: `bootstrap` (percentile interval over user-defined resamples, undefined replicates counted)
- learning curves: `mean_curve` (seed mean / std on a shared grid), `first_crossing`, `crossing_saving`

Curve fits (scaling, iso-FLOP) are in eval/report/fits.py. Every interval is returned together with a note when
it cannot be computed (n=1, zero variance, no residual degrees of freedom, ...): callers print the note instead
of a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


# ---------------------------------------------------------------- seeds


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (None for n < 2), n and the values themselves."""

    n: int
    mean: float
    std: float | None
    values: tuple[float, ...]


def summarize(values: Sequence[float]) -> Summary:
    """Summary of a non-empty sample (std with ddof=1)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("summarize needs at least one value")
    std = float(a.std(ddof=1)) if a.size > 1 else None
    return Summary(int(a.size), float(a.mean()), std, tuple(float(v) for v in a))


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval; `low`/`high` are None when `note` says why not."""

    estimate: float
    low: float | None = None
    high: float | None = None
    confidence: float = CONFIDENCE
    method: str = ""
    p_value: float | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def contains_zero(self) -> bool | None:
        return (self.low <= 0.0 <= self.high) if self.ok else None


def welch_delta(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """mean(a) - mean(b) with Welch's t interval (unequal variances, scipy.stats.ttest_ind)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    delta = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return Interval(delta, confidence=confidence, method="welch", note=f"n={min(a.size, b.size)}: no interval")
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:
        return Interval(delta, confidence=confidence, method="welch", note="zero variance: no interval")
    res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(confidence_level=confidence)
    return Interval(delta, float(ci.low), float(ci.high), confidence, "welch", float(res.pvalue))


def verdict(interval: Interval, lower_is_better: bool) -> str:
    """'within noise' when the interval contains 0, else 'better' / 'worse'; the note without an interval."""
    if not interval.ok:
        return interval.note or "no interval"
    if interval.contains_zero:
        return "within noise"
    improved = interval.high < 0 if lower_is_better else interval.low > 0
    return "better" if improved else "worse"


# ---------------------------------------------------------------- resampling


@dataclass(frozen=True)
class Bootstrap:
    """Percentile bootstrap interval; `undefined` counts replicates whose statistic was None/NaN."""

    low: float | None
    high: float | None
    n_boot: int
    undefined: int
    note: str | None = None


MIN_BOOTSTRAP_N = 3  # with 2 seeds a resample has only 3 distinct outcomes: no meaningful percentile interval
N_BOOT = 1000  # resamples behind each of the report's bootstrap intervals


def bootstrap(replicate: Callable[[np.random.Generator], float | None], n_boot: int = 1000, seed: int = 0,
              confidence: float = CONFIDENCE, undefined_as: str = "undefined") -> Bootstrap:  # fmt: skip
    """Percentile interval of `replicate(rng)` over `n_boot` resamples drawn by the caller's function.

    The interval is reported only when at least 90% of the replicates are defined (a curve that is not
    reached, a parabola without a minimum...), so a fragile statistic is not given a falsely tight interval;
    `undefined_as` names the reason in the note. Callers resample groups of at least MIN_BOOTSTRAP_N values;
    with few seeds the interval is optimistic.
    """
    rng = np.random.default_rng(seed)
    values = [replicate(rng) for _ in range(n_boot)]
    good = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    undefined = n_boot - good.size
    share = f"{undefined} of {n_boot} resamples"
    if good.size < 0.9 * n_boot:
        return Bootstrap(None, None, n_boot, undefined, f"{undefined_as} in {share}: no interval")
    alpha = (1 - confidence) / 2
    low, high = np.quantile(good, [alpha, 1 - alpha])
    note = f"{undefined_as} in {share} (interval over the others)" if undefined else None
    return Bootstrap(float(low), float(high), n_boot, undefined, note)


def resample(values: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """A with-replacement resample of the same size."""
    a = np.asarray(values, dtype=float)
    return a[rng.integers(0, a.size, a.size)]


# ---------------------------------------------------------------- learning curves


@dataclass(frozen=True)
class Curve:
    """Seed-aggregated curve on a shared x grid: mean, std (None for n < 2), min and max across seeds."""

    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray | None
    low: np.ndarray
    high: np.ndarray
    n: int


def mean_curve(curves: Sequence[tuple[Sequence[float], Sequence[float]]]) -> Curve | None:
    """Average (x, y) curves of several seeds. The grid is the x values all curves share (up to 1e-9
    relative); otherwise the union of x values inside the common range, each curve interpolated
    linearly. None when the curves do not overlap."""
    curves = [(np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in curves if len(x)]
    if not curves:
        return None
    curves = [(x[order], y[order]) for x, y in curves for order in [np.argsort(x)]]
    shared = curves[0][0]
    for x, _ in curves[1:]:
        shared = shared[np.isclose(shared[:, None], x[None, :], rtol=1e-9, atol=0).any(axis=1)]
    if shared.size >= min(len(x) for x, _ in curves):
        grid = shared
    else:
        lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
        if lo > hi:
            return None
        grid = np.unique(np.concatenate([x[(x >= lo) & (x <= hi)] for x, _ in curves]))
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    std = ys.std(axis=0, ddof=1) if len(curves) > 1 else None
    return Curve(grid, ys.mean(axis=0), std, ys.min(axis=0), ys.max(axis=0), len(curves))


@dataclass(frozen=True)
class Crossing:
    """Where a curve first reaches a target: x (None if never), and whether it was already there at x[0]."""

    x: float | None
    at_first_point: bool = False


def first_crossing(x: Sequence[float], y: Sequence[float], target: float, decreasing: bool = True) -> Crossing:
    """First x at which y reaches `target` (y <= target if decreasing, else y >= target), interpolating
    linearly in log x between the two bracketing points."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    reached = y <= target if decreasing else y >= target
    if not reached.any():
        return Crossing(None)
    i = int(np.argmax(reached))
    if i == 0:
        return Crossing(float(x[0]), at_first_point=True)
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    frac = (target - y0) / (y1 - y0)
    if x0 > 0:
        return Crossing(float(np.exp(np.log(x0) + frac * (np.log(x1) - np.log(x0)))))
    return Crossing(float(x0 + frac * (x1 - x0)))


def crossing_saving(x: Sequence[float], y: Sequence[float], ref_x_final: float, target: float,
                    decreasing: bool = True) -> tuple[float | None, Crossing]:  # fmt: skip
    """1 - x_cross / ref_x_final: the fraction of the reference's tokens (or FLOPs) saved to reach the
    reference's final value `target`; None when the curve never reaches it."""
    cross = first_crossing(x, y, target, decreasing)
    if cross.x is None:
        return None, cross
    return 1.0 - cross.x / ref_x_final, cross
