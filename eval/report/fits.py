"""Curve fits for the research report: loss against parameters and compute (pure functions over numbers).

- scaling: `fit_loglinear` (loss vs log2 params: slope per doubling, R^2, slope interval), `fit_neff`
  (docs/METHOD.md's N_eff = N_c (1 + eta * gamma(rho)) with gamma(rho) = c * rho^p)
- iso-FLOP: `fit_parabola` (loss vs log10 N per budget), `perturbed`, `fit_frontier`, `compute_saving`

Intervals (eval/report/stats.py's `Interval`) come with a note when they cannot be computed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from eval.report.stats import CONFIDENCE, Interval

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
