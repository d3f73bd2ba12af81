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


@pytest.mark.parametrize("seed", range(6))
def test_improvement_tests_is_both_directions_from_one_fit(seed):
    rng = np.random.default_rng(seed)
    n = [5, 40, 100, 300, 1500, 60][seed]
    y = 2 + np.linspace(0, rng.normal(), n) + 0.1 * rng.standard_normal(n)
    x = np.cumsum(rng.uniform(0.5, 2.0, n))
    falling, rising = trend.improvement_tests(y, x, min_rate=0.001 * seed, confidence=0.9)
    assert falling == trend.improvement_test(y, x, mode="min", min_rate=0.001 * seed, confidence=0.9)
    assert rising == trend.improvement_test(y, x, mode="max", min_rate=0.001 * seed, confidence=0.9)
    if n >= 6:
        assert falling.slope == rising.slope and falling.se == rising.se


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


def _fit_cases():
    """(func, x, y, p0) as fit_curve makes them, over a few windows: clean and noisy curves, noise, flat."""
    rng = np.random.default_rng(3)
    x = np.sort(rng.choice(np.arange(3000), 150, replace=False)).astype(float)
    x -= x[0]
    windows = [0.3 + 2.0 * np.exp(-x / 500), 0.1 + 3.0 * (x + 1) ** -0.7,
               1 / (1 + 0.01 * x) * (1 + 0.05 * rng.standard_normal(len(x))),
               rng.standard_normal(len(x)), np.full(len(x), 0.5)]
    for y in windows:
        lo, hi = float(np.min(y)), float(np.max(y))
        yield lambda t, a, b, c: a + b * np.exp(-c * t), x, y, (lo, hi - lo, 3.0 / float(x[-1]))
        yield lambda t, a, b, c: a + b * np.power(t + 1.0, -c), x, y, (lo, hi - lo, 0.5)


def _outcome(fit, *args):
    try:
        return fit(*args, maxfev=400).tobytes()  # bit-exact
    except (RuntimeError, ValueError) as exc:
        return type(exc).__name__


def test_light_curve_fit_is_scipy_curve_fit_bit_for_bit():
    outcomes = [(_outcome(trend._curve_fit, *case), _outcome(trend._curve_fit_public, *case)) for case in _fit_cases()]
    assert callable(trend._lmdif), "scipy's _lmdif not usable: fits fall back to scipy.optimize (+24 MB RSS)"
    assert all(light == public for light, public in outcomes)
    assert sum(isinstance(light, bytes) for light, _ in outcomes) >= 6  # most of them converge


def test_curve_fit_falls_back_to_scipy_when_lmdif_misbehaves(monkeypatch):
    cases = list(_fit_cases())
    expected = [_outcome(trend._curve_fit_public, *case) for case in cases]
    truth = trend.fit_curve(cases[0][2], cases[0][1])
    monkeypatch.setattr(trend, "_lmdif", trend._lmdif)  # restored after the test

    def model_error(t, a, b, c):  # the model's own error propagates as from curve_fit: no fallback
        raise FloatingPointError("overflow")

    with pytest.raises(FloatingPointError):
        trend._curve_fit(model_error, *cases[0][1:], maxfev=400)
    assert callable(trend._lmdif)

    def changed_signature(*args):
        raise TypeError("_lmdif() takes 10 positional arguments but 11 were given")

    for broken in (changed_signature, lambda *args: None, lambda *args: (np.zeros(3), {}, 0)):
        monkeypatch.setattr(trend, "_lmdif", broken)
        assert _outcome(trend._curve_fit, *cases[0]) == expected[0]
        assert trend._lmdif is False  # and later calls go straight to curve_fit
        assert [_outcome(trend._curve_fit, *case) for case in cases] == expected
    monkeypatch.setattr(trend, "_lmdif", changed_signature)
    assert trend.fit_curve(cases[0][2], cases[0][1]) == truth


def test_scipy_imports_normally_after_the_light_load():
    import os
    import subprocess
    import sys

    code = """if True:
        import sys
        import numpy as np, scipy
        before = set(sys.modules)
        from autolr import trend
        fit = trend.fit_curve(0.3 + 2.0 * np.exp(-np.arange(100.0) / 20))
        assert fit.kind == "exponential" and callable(trend._lmdif), fit
        assert float(trend.special.stdtr(3, 1.0)) > 0.5
        added = set(sys.modules) - before
        assert not [m for m in added if m.startswith(("scipy.special", "scipy.optimize"))], added
        assert "special" not in vars(scipy) and "optimize" not in vars(scipy)

        import scipy.special, scipy.optimize, scipy.stats
        assert scipy.special.stdtr is trend.special.stdtr and scipy.special.ndtri is trend.special.ndtri
        assert scipy.optimize._minpack._lmdif is trend._lmdif and scipy.special._special_ufuncs
        assert scipy.special.gamma(5.0) == 24.0 and abs(scipy.stats.norm.cdf(0.0) - 0.5) < 1e-15
        x = np.arange(10.0)
        popt, _ = scipy.optimize.curve_fit(lambda t, a, b: a * t + b, x, 2 * x + 1, p0=(1.0, 0.0))
        assert np.allclose(popt, [2.0, 1.0]), popt
        print("ok")
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(trend.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---- slowdown test: has a clear decline stopped? ---------------------------------------------

def _hinge_direct(y, x, k, phi, ratio=trend.SLOWDOWN_RATIO):
    """The slowdown model fitted by plain least squares (no winsorising): before / after rates and SEs."""
    n = (ratio + 1) * k
    y, x = np.asarray(y[-n:], float), np.asarray(x[-n:], float)
    c = x[n - k - 1]
    design = np.column_stack([np.ones(n), x - c, np.maximum(x - c, 0), np.where(x <= c, (x - c) ** 2, 0)])
    dp, yp = design[1:] - phi * design[:-1], y[1:] - phi * y[:-1]
    beta, *_ = np.linalg.lstsq(dp, yp, rcond=None)
    resid = yp - dp @ beta
    cov = float(resid @ resid) / (n - 5) * np.linalg.inv(dp.T @ dp)
    return -beta[1], math.sqrt(cov[1, 1]), -(beta[1] + beta[2]), math.sqrt(cov[1, 1] + cov[2, 2] + 2 * cov[1, 2])


@pytest.mark.parametrize("k", [10, 17, 40, 113])
def test_slowdown_sums_match_a_direct_least_squares_fit(k):
    rng = np.random.default_rng(k)
    n = (trend.SLOWDOWN_RATIO + 1) * k
    x = np.cumsum(rng.integers(1, 30, n)).astype(float) + 5e5  # uneven steps far from 0
    y = 3.0 + 0.002 * np.maximum(x[-k - 20] - x, 0) + 0.05 * rng.standard_normal(n)
    got = trend.slowdown_test(y, x, phi=0.4, clip=0, min_recent=k)
    assert got.recent == k and got.n == n
    assert (got.before, got.before_se, got.after, got.after_se) == pytest.approx(_hinge_direct(y, x, k, 0.4), rel=1e-7)


def test_slowdown_sees_a_decline_that_stops():
    rng = np.random.default_rng(7)
    x = np.arange(900.0)
    y = 1 + 1e-3 * np.maximum(850 - x, 0) + 0.01 * rng.standard_normal(900)  # flat for the last 50
    res = trend.slowdown_test(y, x)
    assert res.stopped and res.recent <= 50 and abs(res.after) < 3 * res.after_se
    assert res.before == pytest.approx(1e-3, rel=0.3)
    assert not trend.slowdown_test(y[:850], x[:850]).stopped  # before the stop: still declining
    assert trend.slowdown_test(-y, x, mode="max").stopped  # mirrored for accuracy-like metrics


@pytest.mark.parametrize("tau", [100.0, 300.0, 1000.0, 3000.0])
@pytest.mark.parametrize("noise", [0.0, 0.002])
def test_slowdown_is_not_fooled_by_a_loss_that_only_decelerates(tau, noise):
    """Exponential decay: the slope keeps falling but never stops. A straight line before the
    break would call it stopped once the time constant is about twice the window."""
    x = np.arange(1200.0)
    y = 1 + np.exp(-x / tau) + noise * np.random.default_rng(int(tau)).standard_normal(1200)
    for end in range(400, 1201, 100):
        res = trend.slowdown_test(y[:end], x[:end])
        decline = np.exp(-(end - 100) / tau) - np.exp(-end / tau)  # over the last 100 rows
        if decline > 20 * max(noise, 1e-6):  # clearly still improving
            assert not res.stopped, (end, res)


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("df", [None, 3])
def test_slowdown_rarely_stops_a_continuing_decline(phi, df):
    """A steady decline in AR(1) noise (Gaussian or Student t): 'stopped' in at most 1% of 300
    windows of 600 at each of three rates (nominal: 1e-5 per candidate and evaluation)."""
    rng = np.random.default_rng(int(phi * 10) + (df or 0))
    x = np.arange(600.0)
    for rate in (0.01, 0.05, 0.2):
        stops = sum(trend.slowdown_test(-rate * x + ar1(rng, 600, phi, math.sqrt(1 - phi * phi), df), x).stopped
                    for _ in range(300))
        assert stops <= 3, (rate, stops)


def test_slowdown_is_shift_and_scale_invariant():
    rng = np.random.default_rng(11)
    x = np.arange(700.0)
    y = 2 + 1e-3 * np.maximum(640 - x, 0) + 0.01 * ar1(rng, 700, 0.3)
    ref = trend.slowdown_test(y, x)
    for shift, scale in [(100.0, 1.0), (-3.0, 1e-4), (7.0, 1e3)]:
        got = trend.slowdown_test(shift + scale * y, x * 50.0 + 1000)
        assert (got.stopped, got.recent) == (ref.stopped, ref.recent)
        assert got.phi == pytest.approx(ref.phi, rel=1e-9)
        assert got.after / got.after_se == pytest.approx(ref.after / ref.after_se, rel=1e-6)


def test_slowdown_short_flat_or_broken_input():
    assert trend.slowdown_test(np.arange(30.0)) is None  # fewer than (ratio + 1) * 10
    assert not trend.slowdown_test(np.full(200, 3.0)).stopped
    assert trend.slowdown_test([1.0, math.nan] * 50) is None


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_block_ar1_is_conservative_and_ignores_a_kink(phi):
    rng = np.random.default_rng(int(phi * 10) + 40)
    x = np.arange(1000.0)
    trend_line = 0.05 * np.maximum(900 - x, 0)  # a kink: one block of five sees it
    est = [trend.block_ar1(trend_line + ar1(rng, 1000, phi)) for _ in range(100)]
    assert np.mean(np.array(est) < phi) <= 0.15
    assert np.median(est) < phi + 0.1



# ---- departure test: did the recent rows leave the curve of the whole history? ---------------

def _departure_direct(y, x, m, phi):
    """The departure model by plain least squares (no winsorising or clipping): parabola over
    all rows plus a ramp after row n-1-m, prewhitened; the ramp's coefficient / se."""
    n = len(y)
    xn = (x - x[-1]) / (x[-1] - x[0])
    c = n - 1 - m
    design = np.column_stack([np.ones(n), xn, xn * xn, np.maximum(xn - xn[c], 0)])
    dp, yp = design[1:] - phi * design[:-1], y[1:] - phi * y[:-1]
    beta, *_ = np.linalg.lstsq(dp, yp, rcond=None)
    resid = yp - dp @ beta
    cov = float(resid @ resid) / (n - 5) * np.linalg.inv(dp.T @ dp)
    span = x[-1] - x[0]
    return beta[3] / span, math.sqrt(cov[3, 3]) / span, -(beta[1] + 2 * beta[2] * xn[c]) / span


@pytest.mark.parametrize("n", [60, 333, 1500])
def test_departure_sums_match_a_direct_least_squares_fit(n):
    rng = np.random.default_rng(n)
    x = np.cumsum(rng.integers(1, 30, n)).astype(float) + 5e5  # uneven steps far from 0
    y = 3.0 + 0.002 * np.maximum(x[-n // 5] - x, 0) + 0.05 * rng.standard_normal(n)
    got = trend.departure_test(y, x, phi=0.4, clip=0, rclip=0, z=math.inf)  # the largest z
    dep, se, before = _departure_direct(y, x, got.recent, 0.4)
    assert (got.departure, got.se, got.before) == pytest.approx((dep, se, before), rel=1e-7)
    assert got.z == pytest.approx(dep / se, rel=1e-7)
    assert not got.stopped


def test_departure_exact_curves_do_not_depart():
    x = np.arange(1500.0)
    for y in (2.0 - 1e-3 * x, 1 + (1 + x / 50) ** -0.5, 1 + np.exp(-x / 300), np.full(1500, 3.0)):
        for end in (100, 700, 1500):
            res = trend.departure_test(y[:end], x[:end])
            assert not res.stopped, (end, res)


@pytest.mark.parametrize("noise", [1e-4, 1e-3, 1e-2])
def test_departure_is_not_fooled_by_a_power_law_or_exponential_decay(noise):
    """Losses that only decelerate, from their start (the steepest curvature), low noise
    included. block_ar1 takes the curvature for autocorrelation (0.98); whitened that hard
    alone, without the plain least-squares check, the test stopped 0.5 + 1/(1 + x/20) at noise
    1e-4 from 100 rows on when this was written."""
    x = np.arange(2000.0)
    rng = np.random.default_rng(int(noise * 1e5))
    for y in ((1 + x / 5) ** -0.3, 0.5 + (1 + x / 20) ** -1.0, 1 + (1 + x / 50) ** -0.5, 1 + np.exp(-x / 300)):
        yy = y + noise * rng.standard_normal(2000)
        for end in range(100, 2001, 50):
            lo = max(0, end - 1500)
            res = trend.departure_test(yy[lo:end], x[lo:end])
            assert not res.stopped, (end, res)


def test_departure_sees_a_line_that_stops_after_a_known_lag():
    """1e-3 per row in white noise of 0.01 (10 sigmas per 100 rows), stopping at row 1000:
    z grows with the lag (expected about 4.9 at 15 rows, 7.4 at 20), so the alarm comes within
    a few dozen rows, and not before the stop."""
    rng = np.random.default_rng(21)
    x = np.arange(1300.0)
    y = 1 + 1e-3 * np.maximum(1000 - x, 0) + 0.01 * rng.standard_normal(1300)
    first = next(end for end in range(900, 1300) if trend.departure_test(y[:end], x[:end]).stopped)
    assert 1005 <= first <= 1035
    res = trend.departure_test(y[:first + 30], x[:first + 30])
    assert res.stopped and res.before == pytest.approx(1e-3, rel=0.2) and res.departure > 3 * res.se
    assert trend.departure_test(-y[:first + 30], x[:first + 30], mode="max").stopped  # accuracy-like


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("df", [None, 3])
def test_departure_rarely_stops_a_continuing_decline(phi, df):
    """A steady decline (the worst case: the parabola is exact) in AR(1) noise, Gaussian or
    Student t: 'stopped' in at most 1% of 300 windows of 600 at each of two rates (per
    window about 90 correlated candidates at z = 4.5)."""
    rng = np.random.default_rng(int(phi * 10) + (df or 0) + 50)
    x = np.arange(600.0)
    for rate in (0.01, 0.2):
        stops = sum(trend.departure_test(-rate * x + ar1(rng, 600, phi, math.sqrt(1 - phi * phi), df), x).stopped
                    for _ in range(300))
        assert stops <= 3, (rate, stops)


def test_departure_ignores_a_spike_at_the_end():
    """One spike of 5 to 100 sigmas on the last row, or 5 to 10 on the last two, is no departure
    (residuals are clipped at 2.5 robust sigmas); two rows at 100 sigmas may be one (a jump)."""
    rng = np.random.default_rng(4)
    x = np.arange(800.0)
    y = 1 + 1e-4 * (800 - x) + 0.01 * rng.standard_normal(800)
    assert not trend.departure_test(y, x).stopped
    for size in (0.05, 0.1, 1.0):
        spiked = y.copy()
        spiked[-1] += size
        assert not trend.departure_test(spiked, x).stopped, size
        spiked[-2] += size
        assert size > 0.1 or not trend.departure_test(spiked, x).stopped, size


def test_departure_is_shift_and_scale_invariant():
    rng = np.random.default_rng(12)
    x = np.arange(900.0)
    y = 2 + 1e-3 * np.maximum(860 - x, 0) + 0.01 * ar1(rng, 900, 0.3)
    ref = trend.departure_test(y, x)
    assert ref.stopped
    for shift, scale in [(100.0, 1.0), (-3.0, 1e-4), (7.0, 1e3)]:
        got = trend.departure_test(shift + scale * y, x * 50.0 + 1000)
        assert (got.stopped, got.recent) == (ref.stopped, ref.recent)
        assert got.phi == pytest.approx(ref.phi, rel=1e-9)
        assert got.z == pytest.approx(ref.z, rel=1e-6)
        assert got.departure * 50 / scale == pytest.approx(ref.departure, rel=1e-6)


def test_departure_short_flat_or_broken_input():
    assert trend.departure_test(np.arange(20.0)) is None  # fewer than 2 * 10 + 4
    assert not trend.departure_test(np.full(200, 3.0)).stopped
    assert trend.departure_test([1.0, math.nan] * 50) is None
    two_times = np.repeat([0.0, 1.0], 50)  # no parabola through two distinct times
    assert not trend.departure_test(np.arange(100.0), two_times).stopped

# ---- plateau method=trend: the policy around both tests --------------------------------------

def _first_cut(values, **params):
    from autolr.chain import build_chain
    from autolr.plugins import policy_classes
    from autolr.records import Record

    chain = build_chain([("plateau", params)], policy_classes(), base_lr=1.0)
    state = chain.init()
    for t, v in enumerate(values):
        state, d = chain.update(state, Record(metrics={"loss": float(v)}, step=t))
        if d is not None:
            return t, d
    return None, None


def test_plateau_cuts_soon_after_a_steep_decline_stops():
    rng = np.random.default_rng(3)
    x = np.arange(2000)
    y = 1 + 1e-3 * np.maximum(1500 - x, 0) + 0.01 * rng.standard_normal(2000)
    t, d = _first_cut(y)
    assert 1500 <= t <= 1560
    assert d.evidence["plateau"]["test"] == "departure" and "stopped improving" in d.reason
    t_slow, d_slow = _first_cut(y, departure=False)  # the slowdown test alone comes later
    assert t <= t_slow <= 1560 and d_slow.evidence["plateau"]["test"] == "slowdown"
    t_old, _ = _first_cut(y, history=100, slowdown=False)
    assert t_old > t  # the plain 100-row test waits until the window is mostly flat


def test_plateau_waits_on_a_slow_steady_decline():
    """0.6 noise sigmas per 100 rows: the plain 100-row test cuts at once, the default does not."""
    rng = np.random.default_rng(5)
    y = 1 + 3e-4 * (3000 - np.arange(3000)) + 0.05 * rng.standard_normal(3000)
    assert _first_cut(y)[0] is None
    t_old, d = _first_cut(y, history=100, slowdown=False)
    assert t_old is not None and t_old < 300 and d.evidence["plateau"]["test"] == "trend"


def test_plateau_cuts_a_flat_series_without_waiting_for_the_whole_history():
    rng = np.random.default_rng(6)
    t, d = _first_cut(1 + 0.05 * rng.standard_normal(3000))
    assert t is not None and t < 400
    assert d.evidence["plateau"]["window"] < 1500


def test_plateau_history_equal_to_window_is_the_plain_test():
    """history == window and slowdown off: exactly the improvement test over the last window."""
    rng = np.random.default_rng(8)
    y = 1 + 2e-4 * (2000 - np.arange(2000)) + 0.02 * rng.standard_normal(2000)
    t, _ = _first_cut(y, history=100, slowdown=False)
    x = np.arange(2000.0)
    expect = next(i for i in range(99, 2000, 10) if trend.improvement_test(y[i - 99:i + 1], x[i - 99:i + 1]).p >= 0.05)
    assert t == expect


def test_plateau_cuts_a_decay_that_dies_out_gradually():
    """An exponential approach to the floor: cut about when the plain 100-row test would
    (the long history alone would wait until its 1500 rows showed no decline)."""
    rng = np.random.default_rng(9)
    x = np.arange(3000)
    y = 1 + np.exp(-x / 100) + 0.01 * rng.standard_normal(3000)
    t, d = _first_cut(y)
    t_old, _ = _first_cut(y, history=100, slowdown=False)
    assert d.evidence["plateau"]["test"] == "faded" and "stopped improving" in d.reason
    assert abs(t - t_old) <= 50 and t < 700


# ---- the t statistic behind p, and the early (predictive-power) rule of plateau ---------------

@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_t_statistic_matches_p_and_is_invariant(phi):
    from scipy import special

    rng = np.random.default_rng(int(phi * 10) + 60)
    for rate in (0.0, 0.002, 0.01, -0.005):
        y = 1 - rate * np.arange(150.0) + 0.05 * ar1(rng, 150, phi)
        res = trend.improvement_test(y)
        if 0 < res.p < 1:
            assert res.p == pytest.approx(float(special.stdtr(res.n - 3, -res.t)), rel=1e-9)
        else:
            assert res.p == 1.0 and res.t <= 0 or res.p == 0.0 and res.t == math.inf
        if res.slope >= 0:  # the least-squares slope shows no improvement: t is at most 0
            assert res.t <= 0
        got = trend.improvement_test(5.0 + 1e-3 * y, np.arange(150.0) * 20 + 7)
        assert got.t == pytest.approx(res.t, rel=1e-6, abs=1e-9)
        assert trend.improvement_test(-y, mode="max").t == pytest.approx(res.t, rel=1e-9, abs=1e-12)
    assert "t" not in res.as_dict()  # journal fields unchanged


def test_t_statistic_of_exact_and_degenerate_windows():
    assert trend.improvement_test(10 - 0.5 * np.arange(40.0)).t == math.inf  # an exact decline
    assert trend.improvement_test(np.full(40, 3.0)).t == -math.inf  # flat: not improving at all
    assert trend.improvement_test([3.0, 2.0, 1.0]).t == -math.inf  # too short
    assert trend.improvement_test(10 + 0.5 * np.arange(40.0)).t <= 0


def _early_cuts(series, futility_z, monkeypatch, last=300):
    """How many of ``series`` plateau's trend test cuts at a decision before row ``last``."""
    from autolr.policies import plateau

    monkeypatch.setattr(plateau, "FUTILITY_Z", futility_z)
    pol = plateau.Plateau(slowdown=False)
    cuts = 0
    for y in series:
        x = np.arange(len(y), dtype=float)
        cuts += any(pol.trend_decision(y[:i + 1], x[:i + 1], "min") is not None for i in range(99, last, 10))
    return cuts


@pytest.mark.parametrize("phi", [0.0, 0.5])
def test_early_cuts_of_a_slow_decline_are_rare(phi, monkeypatch):
    """A decline of 0.2 marginal sigma per 100 rows (significant over the 1500-row history, not
    over the first 100), white or AR(0.5) noise: decisions at rows 100..300, before the history
    is full. Conditional power at the rate seen so far (FUTILITY_Z = 0: cut whenever that rate
    does not improve) cuts 44% / 63% of these 150 curves; predictive power below 20% cuts
    15% / 27% (measured), at most half as many."""
    from autolr.policies import plateau

    rng = np.random.default_rng(70 + int(10 * phi))
    series = [1 - 0.002 * np.arange(300.0) + ar1(rng, 300, phi, math.sqrt(1 - phi * phi)) for _ in range(150)]
    new = _early_cuts(series, plateau.FUTILITY_Z, monkeypatch)
    naive = _early_cuts(series, 0.0, monkeypatch)
    assert naive / 150 >= 0.35
    assert new <= 0.5 * naive


def test_early_rule_still_cuts_a_flat_series(monkeypatch):
    """A flat series (white or AR(0.5) noise) is still cut well before the history is full."""
    from autolr.policies import plateau

    rng = np.random.default_rng(80)
    series = [1 + 0.05 * ar1(rng, 700, phi) for phi in (0.0, 0.5) for _ in range(20)]
    assert _early_cuts(series, plateau.FUTILITY_Z, monkeypatch, last=700) >= 30


def test_early_rule_at_a_full_history_is_the_plain_test():
    """Once the kept rows span the history, the rule is p >= 1 - confidence again."""
    from autolr.policies.plateau import Plateau

    rng = np.random.default_rng(81)
    pol = Plateau(history=200, slowdown=False)
    for _ in range(30):
        y = 1 - 2e-4 * np.arange(200.0) + 0.02 * rng.standard_normal(200)
        verdict = pol.trend_decision(y, np.arange(200.0), "min")
        assert (verdict is not None) == (trend.improvement_test(y).p >= 0.05)
