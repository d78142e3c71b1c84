"""Statistics and fits for the research report: pure functions over numbers (no files, no plots).

- seeds: `summarize`, `welch_delta` (Welch's t interval of a difference of means), `verdict`
- resampling: `bootstrap` (percentile interval over user-defined resamples, undefined replicates counted)
- learning curves: `mean_curve` (seed mean / std on a shared grid), `first_crossing`, `crossing_saving`
- scaling: `fit_loglinear` (loss vs log2 params: slope per doubling, R^2, slope interval), `fit_neff`
  (docs/METHOD.md's N_eff = N_c (1 + eta * gamma(rho)) with gamma(rho) = c * rho^p)
- iso-FLOP: `fit_parabola` (loss vs log10 N per budget), `fit_frontier`, `compute_saving`

Every interval is returned together with a note when it cannot be computed (n=1, zero variance,
no residual degrees of freedom, ...): callers print the note instead of a number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

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


# ---------------------------------------------------------------- scaling in token-indexed parameters


@dataclass(frozen=True)
class LinearFit:
    """y = intercept + slope * log_base(x): the slope per doubling (base 2) with its interval and R^2."""

    slope: float
    intercept: float
    r2: float | None
    n: int
    n_x: int
    slope_ci: Interval
    base: float = 2.0

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        return self.intercept + self.slope * np.log(x) / np.log(self.base)


def fit_loglinear(x: Sequence[float], y: Sequence[float], base: float = 2.0,
                  confidence: float = CONFIDENCE) -> LinearFit:  # fmt: skip
    """Least squares of y on log_base(x) (scipy.stats.linregress); the slope's t interval needs n >= 3
    points and at least 2 distinct x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n, n_x = int(x.size), int(np.unique(x).size)
    if n_x < 2:
        raise ValueError("fit_loglinear needs at least two distinct x values")
    u = np.log(x) / np.log(base)
    res = stats.linregress(u, y)
    if n < 3:
        ci = Interval(float(res.slope), method="t", note="2 points: exact line, no interval")
    elif res.stderr == 0:
        ci = Interval(float(res.slope), method="t", note="perfect fit: zero residual, no interval")
    else:
        t = stats.t.ppf(0.5 + confidence / 2, n - 2)
        ci = Interval(float(res.slope), float(res.slope - t * res.stderr), float(res.slope + t * res.stderr),
                      confidence, "t", float(res.pvalue))  # fmt: skip
    r2 = float(res.rvalue**2) if n >= 3 else None
    return LinearFit(float(res.slope), float(res.intercept), r2, n, n_x, ci, base)


@dataclass(frozen=True)
class NeffFit:
    """L = L_c + s * log2(1 + eta * gamma(rho)), gamma(rho) = c * rho^p (or a constant c for one rho).

    `params` maps name -> Interval (estimate and CI); `identified` is False with a `note` when the data
    cannot determine the parameters (too few points or degrees of freedom, a singular covariance)."""

    form: str
    params: dict[str, Interval]
    n: int
    dof: int
    rmse: float
    identified: bool
    note: str | None = None

    def gamma(self, rho: np.ndarray | float) -> np.ndarray:
        c = self.params["c"].estimate
        p = self.params["p"].estimate if "p" in self.params else 0.0
        return c * np.power(rho, p)

    def predict(self, eta: np.ndarray | float, rho: np.ndarray | float) -> np.ndarray:
        L_c, s = self.params["L_c"].estimate, self.params["s"].estimate
        return L_c + s * np.log2(1 + np.asarray(eta) * self.gamma(rho))


def _neff_model(with_p: bool) -> Callable:
    def model(X: np.ndarray, L_c: float, s: float, log_c: float, p: float = 0.0) -> np.ndarray:
        eta, rho = X
        return L_c + s * np.log2(1 + eta * np.exp(log_c) * np.power(rho, p))

    if with_p:
        return model
    return lambda X, L_c, s, log_c: model(X, L_c, s, log_c)


def fit_neff(eta: Sequence[float], rho: Sequence[float], loss: Sequence[float],
             confidence: float = CONFIDENCE) -> NeffFit:  # fmt: skip
    """Fit docs/METHOD.md's effective-parameter form at a fixed backbone and token count.

    At fixed N_c and D the loss is a function of N_eff alone; locally L = L_c + s * log2(N_eff / N_c) with
    N_eff / N_c = 1 + eta * gamma(rho), eta = N_tokenindexed / N_backbone, rho = K / n_e. gamma(rho) =
    c * rho^p when the points span at least two values of rho, else the single value gamma(rho0) = c.
    Points with eta = 0 (the backbone alone) anchor L_c. Parameters: L_c, s (loss per doubling of N_eff),
    c > 0 (fitted as log c), p. Intervals from the fit's covariance (t with n - k degrees of freedom).
    """
    eta, rho, loss = (np.asarray(v, dtype=float) for v in (eta, rho, loss))
    rhos = np.unique(rho[eta > 0])
    with_p = rhos.size >= 2
    if with_p:
        form = "gamma(rho) = c * rho^p"
    elif rhos.size:
        form = f"gamma(rho={rhos[0]:.3g}) = c (a single rho: the exponent p is not identifiable)"
    else:
        form = "no token-indexed points"
    names = ["L_c", "s", "log_c"] + (["p"] if with_p else [])
    n, k = int(loss.size), len(names)
    dof = n - k
    if rhos.size == 0 or np.unique(eta).size < 2:
        return NeffFit(form, {}, n, dof, float("nan"), False, "needs points at two or more eta values")
    base = loss[eta == 0].mean() if (eta == 0).any() else loss.max()
    p0 = [base, -0.05, 0.0] + ([0.5] if with_p else [])
    lower, upper = [-np.inf, -np.inf, -12.0], [np.inf, np.inf, 12.0]  # log c within e^-12 .. e^12
    bounds = (lower + [-4.0], upper + [4.0]) if with_p else (lower, upper)
    try:
        with warnings.catch_warnings():  # a singular covariance is reported below, not warned about
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            coef, cov = optimize.curve_fit(_neff_model(with_p), np.vstack([eta, rho]), loss, p0=p0, bounds=bounds,
                                           maxfev=20000)  # fmt: skip
    except (RuntimeError, ValueError) as exc:
        return NeffFit(form, {}, n, dof, float("nan"), False, f"fit failed: {exc}")
    resid = loss - _neff_model(with_p)(np.vstack([eta, rho]), *coef)
    rmse = float(np.sqrt(np.mean(resid**2)))
    note = None
    identified = True
    if dof < 1:
        identified, note = False, f"{n} points for {k} parameters: no degrees of freedom, not identified"
    elif not np.all(np.isfinite(np.diag(cov))):
        identified, note = False, "singular covariance: the points cannot separate the parameters"
    params: dict[str, Interval] = {}
    t = stats.t.ppf(0.5 + confidence / 2, dof) if dof >= 1 else float("nan")
    for i, name in enumerate(names):
        est, se = float(coef[i]), float(np.sqrt(cov[i, i])) if np.isfinite(cov[i, i]) else float("nan")
        low = high = None
        if identified and math.isfinite(se):
            low, high = float(est - t * se), float(est + t * se)
        if name == "log_c":  # report c itself; its interval maps through exp
            name, est = "c", math.exp(est)
            low, high = (math.exp(low), math.exp(high)) if low is not None else (None, None)
        params[name] = Interval(est, low, high, confidence, "fit covariance", note=None if low is not None else note)
    at_bound = [name.removeprefix("log_") for name, value, lo, hi in zip(names, coef, *bounds)
                if math.isfinite(hi - lo) and min(value - lo, hi - value) < 0.01 * (hi - lo)]  # fmt: skip
    if at_bound:
        identified = False
        note = f"{', '.join(at_bound)} at the bound of its search range: not identified by these points"
        params = {k: Interval(v.estimate, confidence=confidence, method=v.method, note=note) for k, v in params.items()}
    elif identified and params["s"].contains_zero:
        note = "the interval of s contains 0: these points do not establish that loss falls with N_eff"
    return NeffFit(form, params, n, dof, rmse, identified, note)


# ---------------------------------------------------------------- iso-FLOP


@dataclass(frozen=True)
class Parabola:
    """loss = a u^2 + b u + c in u = log10(N); the optimum u* = -b / 2a when a > 0."""

    coef: tuple[float, float, float]
    cov: np.ndarray | None
    n: int
    u_range: tuple[float, float]
    note: str | None = None

    @property
    def convex(self) -> bool:
        return self.coef[0] > 0

    @property
    def u_opt(self) -> float | None:
        a, b, _ = self.coef
        return -b / (2 * a) if a > 0 else None

    @property
    def n_opt(self) -> float | None:
        return 10**self.u_opt if self.u_opt is not None else None

    @property
    def loss_opt(self) -> float | None:
        u = self.u_opt
        return float(np.polyval(self.coef, u)) if u is not None else None

    @property
    def extrapolated(self) -> bool:
        u = self.u_opt
        return u is not None and not (self.u_range[0] <= u <= self.u_range[1])

    def predict(self, n: np.ndarray | float) -> np.ndarray:
        return np.polyval(self.coef, np.log10(n))


def fit_parabola(n_params: Sequence[float], loss: Sequence[float]) -> Parabola:
    """Least-squares parabola of loss in log10(N) (numpy.polyfit); covariance when > 3 distinct sizes."""
    u, y = np.log10(np.asarray(n_params, dtype=float)), np.asarray(loss, dtype=float)
    if np.unique(u).size < 3:
        raise ValueError("fit_parabola needs at least three distinct sizes")
    cov = None
    if u.size > 3:
        coef, cov = np.polyfit(u, y, 2, cov=True)
    else:
        coef = np.polyfit(u, y, 2)
    par = Parabola(tuple(float(c) for c in coef), cov, int(u.size), (float(u.min()), float(u.max())))
    note = None
    if not par.convex:
        note = "not convex: no minimum"
    elif par.extrapolated:
        note = "optimum outside the sampled sizes (extrapolated)"
    return Parabola(par.coef, par.cov, par.n, par.u_range, note)


def perturbed(par: Parabola, rng: np.random.Generator) -> Parabola:
    """A parabola drawn from the fit's covariance (parametric bootstrap); the fit itself without one."""
    if par.cov is None or not np.all(np.isfinite(par.cov)):
        return par
    coef = rng.multivariate_normal(np.asarray(par.coef), par.cov)
    return Parabola(tuple(float(c) for c in coef), None, par.n, par.u_range)


def fit_frontier(budgets: Sequence[float], best_loss: Sequence[float]) -> LinearFit:
    """The compute frontier L* = intercept + slope * log10(C) through each budget's optimum."""
    return fit_loglinear(budgets, best_loss, base=10.0)


def compute_saving(ref: LinearFit, budgets: Sequence[float], best_loss: Sequence[float]) -> float | None:
    """1 - C / C_ref(L*): compute saved at equal loss, averaged in log over the budgets, where
    C_ref(L) = 10^((L - intercept) / slope) inverts the reference frontier. None if the reference's
    frontier does not fall with compute (slope >= 0)."""
    if ref.slope >= 0:
        return None
    c, y = np.asarray(budgets, dtype=float), np.asarray(best_loss, dtype=float)
    log_ratio = np.log10(c) - (y - ref.intercept) / ref.slope
    return float(1 - 10 ** np.mean(log_ratio))
