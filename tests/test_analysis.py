"""The report's statistics and fits on synthetic data with known answers (eval/report/stats.py, fits.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from eval.report import fits, stats


def test_summary_and_welch_interval_match_scipy():
    a, b = [3.0, 3.2, 3.1, 2.9], [3.4, 3.5, 3.3]
    s = stats.summarize(a)
    assert (s.n, s.mean, s.values) == (4, pytest.approx(3.05), (3.0, 3.2, 3.1, 2.9))
    assert s.std == pytest.approx(np.std(a, ddof=1))
    iv = stats.welch_delta(a, b)
    # Welch by hand: Satterthwaite degrees of freedom and the t quantile
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    dof = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    half = scipy_stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    assert iv.estimate == pytest.approx(3.05 - 3.4)
    assert (iv.low, iv.high) == (pytest.approx(iv.estimate - half), pytest.approx(iv.estimate + half))
    assert iv.p_value == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert stats.verdict(iv, lower_is_better=True) == "better"
    assert stats.verdict(iv, lower_is_better=False) == "worse"


def test_an_interval_containing_zero_is_within_noise_and_n1_gets_no_interval():
    noisy = stats.welch_delta([1.0, 2.0, 3.0], [1.5, 2.5, 1.0])
    assert noisy.contains_zero and stats.verdict(noisy, lower_is_better=True) == "within noise"
    single = stats.welch_delta([1.0], [1.5, 2.5])
    assert single.estimate == pytest.approx(-1.0) and single.low is None and not single.ok
    assert stats.verdict(single, lower_is_better=True) == "n=1: no interval"
    flat = stats.welch_delta([1.0, 1.0], [2.0, 2.0])
    assert not flat.ok and "zero variance" in flat.note


def test_bootstrap_interval_covers_the_mean_and_refuses_fragile_statistics():
    data = np.random.default_rng(0).normal(5.0, 1.0, 50)
    boot = stats.bootstrap(lambda rng: float(stats.resample(data, rng).mean()), n_boot=500)
    se = data.std(ddof=1) / math.sqrt(data.size)
    assert boot.low < data.mean() < boot.high
    assert boot.high - boot.low == pytest.approx(2 * 1.96 * se, rel=0.25)
    coin = lambda rng: None if rng.random() < 0.5 else 1.0  # noqa: E731
    fragile = stats.bootstrap(coin, n_boot=200, undefined_as="not reached")
    assert fragile.low is None and fragile.note.startswith("not reached in ") and fragile.undefined > 50
    assert f"in {fragile.undefined} of 200 resamples: no interval" in fragile.note


def test_mean_curve_on_shared_and_interpolated_grids():
    # Small integers and their halves are exact in float64: the mean, min and grid are compared exactly.
    c = stats.mean_curve([([1, 2, 3], [3.0, 2.0, 1.0]), ([1, 2, 3], [5.0, 4.0, 3.0])])
    assert list(c.x) == [1, 2, 3] and list(c.mean) == [4.0, 3.0, 2.0] and c.n == 2
    assert c.std == pytest.approx([math.sqrt(2)] * 3) and list(c.low) == [3.0, 2.0, 1.0]
    shifted = stats.mean_curve([([0, 2, 4], [4.0, 2.0, 0.0]), ([1, 3, 5], [4.0, 2.0, 0.0])])
    assert list(shifted.x) == [1, 2, 3, 4]  # the common range, both curves interpolated
    assert shifted.mean[0] == pytest.approx((3.0 + 4.0) / 2)
    single = stats.mean_curve([([1, 2], [1.0, 0.5])])
    assert single.std is None and single.n == 1
    assert stats.mean_curve([([1, 2], [1, 2]), ([3, 4], [1, 2])]) is None  # no overlap


def test_first_crossing_interpolates_in_log_x_and_reports_savings():
    x, y = [100, 200, 400, 800], [4.0, 3.0, 2.0, 1.5]
    cross = stats.first_crossing(x, y, 2.5)
    assert cross.x == pytest.approx(math.sqrt(200 * 400)) and not cross.at_first_point  # halfway in log x
    saving, _ = stats.crossing_saving(x, y, ref_x_final=800, target=2.5)
    assert saving == pytest.approx(1 - math.sqrt(200 * 400) / 800)
    assert stats.first_crossing(x, y, 1.0).x is None
    assert stats.first_crossing(x, y, 5.0).at_first_point
    acc = stats.first_crossing([1, 2, 4], [0.2, 0.4, 0.8], 0.6, decreasing=False)
    assert acc.x == pytest.approx(math.sqrt(8))


def test_loglinear_fit_recovers_a_known_slope_per_doubling():
    rng = np.random.default_rng(1)
    n_ti = np.repeat(2.0 ** np.arange(16, 22), 3)  # 6 sizes x 3 seeds
    loss = 3.0 - 0.012 * np.log2(n_ti / 2**16) + rng.normal(0, 0.002, n_ti.size)
    fit = fits.fit_loglinear(n_ti, loss)
    assert fit.slope == pytest.approx(-0.012, abs=0.002)
    assert fit.slope_ci.low < -0.012 < fit.slope_ci.high and fit.slope_ci.high < 0
    assert fit.r2 > 0.9 and fit.n == 18 and fit.n_x == 6
    assert fit.predict(2.0**17) == pytest.approx(fit.intercept + 17 * fit.slope)
    two = fits.fit_loglinear([1, 2], [1.0, 0.9])
    assert two.slope == pytest.approx(-0.1) and not two.slope_ci.ok and "no interval" in two.slope_ci.note
    with pytest.raises(ValueError):
        fits.fit_loglinear([4, 4, 4], [1.0, 1.1, 0.9])


def _neff_design(seeds: int = 2):
    eta, rho = [], []
    for _ in range(seeds):
        eta.append(0.0), rho.append(1.0)  # the backbone alone
        for n_e in (2, 4, 8, 16):
            for k in (1, 2):
                eta.append(1.0 * n_e), rho.append(k / n_e)
    return np.array(eta), np.array(rho)


def test_neff_fit_recovers_known_parameters():
    eta, rho = _neff_design()
    truth = dict(L_c=2.0, s=-0.02, c=0.8, p=0.7)
    loss = truth["L_c"] + truth["s"] * np.log2(1 + eta * truth["c"] * rho ** truth["p"])
    loss = loss + np.random.default_rng(2).normal(0, 0.0005, loss.size)
    fit = fits.fit_neff(eta, rho, loss)
    assert fit.identified and fit.form == "gamma(rho) = c * rho^p" and fit.dof == loss.size - 4
    for name, value in truth.items():
        iv = fit.params[name]
        assert iv.low < value < iv.high, (name, iv)
    assert fit.params["p"].estimate == pytest.approx(0.7, abs=0.05)
    assert fit.predict(4.0, 0.25) == pytest.approx(2.0 - 0.02 * np.log2(1 + 4 * 0.8 * 0.25**0.7), abs=0.002)


def test_neff_fit_says_when_the_data_cannot_identify_it():
    one_rho = fits.fit_neff([0, 2, 4, 8, 0, 2, 4, 8], [1, 0.5, 0.5, 0.5] * 2,
                                [2.0, 1.98, 1.97, 1.96, 2.01, 1.985, 1.975, 1.95])  # fmt: skip
    assert "p" not in one_rho.params and "not identifiable" in one_rho.form
    too_few = fits.fit_neff([0, 2, 4], [1, 0.5, 0.25], [2.0, 1.9, 1.85])
    assert not too_few.identified and "degrees of freedom" in too_few.note
    assert all(not iv.ok for iv in too_few.params.values())
    flat = fits.fit_neff([0, 0, 2, 2, 4, 4, 8, 8], [1, 1, 0.5, 0.5, 0.25, 0.25, 0.5, 0.5],
                             [2.0, 2.01, 2.0, 2.01, 2.005, 1.995, 2.0, 2.01])  # fmt: skip
    assert not flat.identified and "not identified" in flat.note  # no signal: a parameter runs to its bound
    nothing = fits.fit_neff([0, 0], [1, 1], [2.0, 2.1])
    assert not nothing.identified and not nothing.params


def test_parabola_recovers_a_known_optimum_and_its_covariance():
    n = np.logspace(5, 7, 5)
    loss = 0.3 * (np.log10(n) - 6.2) ** 2 + 2.5
    par = fits.fit_parabola(n, loss + np.random.default_rng(3).normal(0, 1e-3, n.size))
    assert par.convex and par.n_opt == pytest.approx(10**6.2, rel=0.05) and par.loss_opt == pytest.approx(2.5, abs=0.01)
    assert par.cov is not None and par.cov.shape == (3, 3) and not par.extrapolated and par.note is None
    exact = fits.fit_parabola(n[:3], loss[:3])
    assert exact.cov is None and exact.extrapolated and "outside" in exact.note  # optimum beyond 10^6
    concave = fits.fit_parabola(n[:4], -loss[:4])
    assert not concave.convex and concave.n_opt is None and "not convex" in concave.note
    draws = [fits.perturbed(par, np.random.default_rng(i)).u_opt for i in range(200)]
    assert np.std(draws) > 0 and np.mean(draws) == pytest.approx(6.2, abs=0.05)
    with pytest.raises(ValueError):
        fits.fit_parabola([1e5, 1e5, 1e6], [1.0, 1.1, 0.9])


def test_frontier_and_compute_saving_at_equal_loss():
    budgets = np.array([1e12, 1e13, 1e14])
    ref = 4.0 - 0.3 * np.log10(budgets / 1e12)
    # the variant reaches the reference's loss with half the compute: L_v(C) = L_ref(2C)
    var = 4.0 - 0.3 * np.log10(2 * budgets / 1e12)
    frontier = fits.fit_frontier(budgets, ref)
    assert frontier.slope == pytest.approx(-0.3) and frontier.base == 10.0
    assert fits.compute_saving(frontier, budgets, var) == pytest.approx(0.5)
    assert fits.compute_saving(frontier, budgets, ref) == pytest.approx(0.0, abs=1e-12)
    rising = fits.fit_frontier(budgets, -ref)
    assert fits.compute_saving(rising, budgets, var) is None
