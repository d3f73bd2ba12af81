"""The trend engine: known answers, the test's size under AR(1) noise, invariances."""
from __future__ import annotations

import math

import numpy as np
import pytest

from autolr import trend


def ar1(rng, n, phi, scale=1.0, df=None):
    e = rng.standard_t(df, n + 200) if df else rng.standard_normal(n + 200)
    y = np.empty_like(e)
    y[0] = e[0]
    for i in range(1, len(e)):
        y[i] = phi * y[i - 1] + e[i]
    return scale * y[200:]


def test_robust_slope_of_an_exact_line():
    fit = trend.robust_slope(3.0 + 2.0 * np.arange(20))
    assert (fit.slope, fit.lo, fit.hi, fit.intercept) == pytest.approx((2.0, 2.0, 2.0, 3.0))


def test_robust_slope_ignores_a_few_outliers():
    y = 1.0 - 0.5 * np.arange(30.0)
    y[[3, 17]] += 1000
    assert trend.robust_slope(y).slope == pytest.approx(-0.5)


def test_noise_level_of_white_noise_and_of_a_line():
    rng = np.random.default_rng(0)
    assert trend.noise_level(0.3 * rng.standard_normal(20000)) == pytest.approx(0.3, rel=0.03)
    assert trend.noise_level(5 - 2 * np.arange(50.0)) == 0.0


@pytest.mark.parametrize("mode, y, improving", [
    ("min", 10 - 0.5 * np.arange(40.0), True),
    ("min", 10 + 0.5 * np.arange(40.0), False),
    ("max", 10 + 0.5 * np.arange(40.0), True),
    ("max", 10 - 0.5 * np.arange(40.0), False),
    ("min", np.full(40, 3.0), False),
    ("min", np.exp(-np.arange(100) / 30), True),   # clean curve: curvature is not noise
    ("max", np.exp(-np.arange(100) / 30), False),
])
def test_improvement_test_on_exact_curves(mode, y, improving):
    assert (trend.improvement_test(y, mode=mode).p < 0.05) == improving


def test_min_rate_raises_the_bar():
    y = 10 - 0.01 * np.arange(100.0) + 0.001 * np.random.default_rng(1).standard_normal(100)
    assert trend.improvement_test(y, min_rate=0.005).p < 0.05
    assert trend.improvement_test(y, min_rate=0.02).p > 0.5


def test_non_finite_or_short_windows_are_not_improving():
    assert trend.improvement_test([1.0, 0.5, float("nan")] * 4).p == 1.0
    assert trend.improvement_test([3.0, 2.0, 1.0]).p == 1.0


@pytest.mark.parametrize("phi, limit", [(0.0, 0.05), (0.5, 0.05), (0.8, 0.05), (0.9, 0.08)])
@pytest.mark.parametrize("df", [None, 3])
def test_false_positive_rate_holds_under_ar1_noise(phi, limit, df):
    """No trend, AR(1) noise: 'significantly improving' at 5% must stay near 5%.

    600 windows of 100; the binomial standard error at 5% is 0.9%, so the bound is the
    nominal level plus two standard errors (phi 0.9 is the documented hard case).
    """
    rng = np.random.default_rng(int(phi * 100) + (df or 0))
    hits = sum(trend.improvement_test(ar1(rng, 100, phi, df=df)).p < 0.05 for _ in range(600))
    assert hits / 600 <= limit + 2 * math.sqrt(0.05 * 0.95 / 600)


def test_a_naive_ols_test_would_fail_the_same_simulation():
    """Negative control: ignoring autocorrelation rejects far too often at phi = 0.8."""
    from scipy import stats

    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(300):
        res = stats.linregress(np.arange(100), ar1(rng, 100, 0.8))
        hits += res.slope < 0 and res.pvalue / 2 < 0.05
    assert hits / 300 > 0.15


def test_power_on_noisy_decaying_curves():
    rng = np.random.default_rng(2)
    x = np.arange(100)
    hits = sum(trend.improvement_test(np.exp(-x / 33) + 0.05 * ar1(rng, 100, 0.5)).p < 0.05 for _ in range(100))
    assert hits >= 95


@pytest.mark.parametrize("shift, scale", [(0.0, 1.0), (100.0, 1.0), (-3.0, 1e-4), (7.0, 1e3)])
def test_shift_and_scale_invariance(shift, scale):
    rng = np.random.default_rng(3)
    y = np.exp(-np.arange(120) / 80) + 0.2 * ar1(rng, 120, 0.4)
    ref = trend.improvement_test(y)
    got = trend.improvement_test(shift + scale * y)
    assert got.p == pytest.approx(ref.p, rel=1e-6, abs=1e-12)
    assert got.slope == pytest.approx(scale * ref.slope, rel=1e-6)
    assert got.phi == pytest.approx(ref.phi, rel=1e-9)
    x = np.arange(120) * 50.0 + 1000  # steps logged every 50 from step 1000: same p
    assert trend.improvement_test(y, x).p == pytest.approx(ref.p, rel=1e-6, abs=1e-12)


def test_divergence_detection():
    rng = np.random.default_rng(4)
    window = 1.0 + 0.01 * rng.standard_normal(50)
    ref = trend.robust_reference(window)
    assert trend.divergent(float("nan"), ref) and trend.divergent(float("inf"), None)
    assert trend.divergent(5.0, ref)
    assert trend.divergent(1.05, ref) is None  # many sigmas but not a doubling
    assert trend.divergent(0.2, ref) is None  # better, not worse
    assert trend.divergent(0.2, ref, mode="max")  # for accuracy, a collapse
    assert trend.robust_reference([1.0] * 5) is None


def test_curve_fit_recovers_an_asymptote_and_forecasts_the_gain():
    x = np.arange(200.0)
    y = 0.3 + 2.0 * np.exp(-x / 50)
    fit = trend.fit_curve(y)
    assert fit.kind == "exponential" and fit.asymptote == pytest.approx(0.3, rel=1e-3)
    gain = trend.forecast_gain(y, horizon=100)
    assert gain == pytest.approx(2.0 * (np.exp(-199 / 50) - np.exp(-299 / 50)), rel=1e-3)
    power = 0.1 + 3.0 * (x + 1) ** -0.7
    assert trend.fit_curve(power).kind == "power"
    assert trend.fit_curve([1.0, float("nan")] * 10) is None
