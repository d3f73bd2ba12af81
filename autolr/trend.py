"""Trend statistics over a window of a metric: pure functions over numpy arrays.

The question every decision asks is "is the metric still improving?". Per-step losses are
noisy, heavy-tailed and autocorrelated, so the answer comes from a test that keeps its
false-positive rate under AR(1) noise:

1. Winsorise: residuals from the least-squares line beyond ``clip`` robust standard
   deviations (1.4826 · MAD) are pulled in, so spikes and heavy tails do not steer the fit.
2. Prewhiten (Cochrane–Orcutt): phi is the lag-1 autocorrelation of the residuals of a
   quadratic fit (so a curved but clean loss is not mistaken for autocorrelated noise),
   bias-corrected (phi + (1 + 3·phi)/n + 3/n) plus one standard error sqrt((1 - phi²)/n), a
   conservative margin; then y_t - phi·y_{t-1} is regressed on x_t - phi·x_{t-1}.
3. One-sided t test (n - 3 degrees of freedom) of H0 "improvement rate <= min_rate".
4. A decline over the window larger than ``DECLINE_SIGMAS`` times the first-difference noise
   sigma_d counts as improving whatever the t test says: AR(1) noise with phi <= 0.95 never
   wanders that far (at most 18 sigma_d in 400 simulations per case, n = 50..400), while a
   nearly noiseless decaying curve, where step 2 sees its curvature as autocorrelation, does.

Simulated under the null (AR(1) with phi up to 0.9, Gaussian or Student-t noise) the
rejection rate stays at or below the nominal level: see tests/test_trend.py.

"Did the recent rows leave the curve the whole history was following?" is
:func:`departure_test`: a parabola through everything kept plus a change of slope before the
last m rows, by generalised least squares, z > 4.5 with the AR(1) phi and by plain least
squares alike.

"Did a clear decline just stop?" is :func:`slowdown_test`: a continuous fit with a break
before the last k observations (a parabola before it, a line after it), for k on a ladder;
stopped when the line after the break is not significantly improving although, at the rate
the parabola had reached at the break, it would have been with probability 1 - ``miss``. Its
AR(1) coefficient comes from :func:`block_ar1` (blocks detrended separately, so a kink or a
curve does not pass for autocorrelation).
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import sys
import threading
import types
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

_SCIPY_LOCK = threading.RLock()


def _scipy_extension(package: str, name: str) -> types.ModuleType | None:
    """The compiled module ``scipy.<package>.<name>`` without running ``scipy/<package>/__init__.py``.

    ``from scipy import special`` costs ~20 MB of RSS beyond the ufunc module (scipy's
    array-API layer imports numpy.testing, numpy.f2py, ...) and ``from scipy import optimize``
    ~24 MB more (linalg, sparse, ...); this module needs three ufuncs and MINPACK's ``lmdif``.
    While the extension loads, an empty stand-in package is registered as ``scipy.<package>``
    so that it and the sibling extensions it imports resolve; then every ``sys.modules`` entry
    the load added under ``scipy.<package>`` is removed again, so a later real
    ``import scipy.<package>`` runs the package normally (it gets the same extension functions).
    The lock serialises loads from this module; another thread importing ``scipy.<package>``
    during the few milliseconds of a load could still see the stand-in.

    Returns the normally imported submodule when ``scipy.<package>`` is already imported, and
    None when the light load fails for any reason (the caller then imports the public package).
    """
    full = f"scipy.{package}"
    with _SCIPY_LOCK:
        try:
            if full in sys.modules:
                return importlib.import_module(f"{full}.{name}")
            import scipy

            before = set(sys.modules)
            stand_in = types.ModuleType(full)
            stand_in.__path__ = [os.path.join(p, package) for p in scipy.__path__]
            sys.modules[full] = stand_in
            try:
                return importlib.import_module(f"{full}.{name}")
            finally:
                for key in list(sys.modules):
                    if key.startswith(f"{full}.") and key not in before:
                        del sys.modules[key]
                if sys.modules.get(full) is stand_in:
                    del sys.modules[full]
                if vars(scipy).get(package) is stand_in:
                    delattr(scipy, package)
        except Exception:
            return None


def _load_special():
    """stdtr, stdtrit and ndtri: scipy.special's ufunc module (the same objects), or the package."""
    ufuncs = _scipy_extension("special", "_ufuncs")
    if ufuncs is None or not all(callable(getattr(ufuncs, f, None)) for f in ("stdtr", "stdtrit", "ndtri")):
        from scipy import special as ufuncs
    return ufuncs


#: the scipy.special functions trend and the plateau policy use: ``special.stdtr`` etc.
special = _load_special()

MAD_SCALE = 1.4826
DECLINE_SIGMAS = 25.0


@dataclass(frozen=True)
class Slope:
    """A robust slope with its confidence interval (Theil–Sen)."""

    slope: float
    lo: float
    hi: float
    intercept: float


@dataclass(frozen=True)
class TrendTest:
    """Result of :func:`improvement_test`. ``p`` small means "significantly improving"."""

    p: float
    slope: float
    lo: float
    hi: float
    phi: float
    n: int
    noise: float
    decline_sigmas: float = 0.0
    se: float = math.nan  # standard error of the prewhitened slope (the t test's denominator)
    #: t statistic of the improvement beyond min_rate (prewhitened slope / se); at most 0 when
    #: the least-squares slope shows none; -inf for a flat or unusable window, +inf for a
    #: decline beyond DECLINE_SIGMAS. p = P(T_dof > t) whenever 0 < p < 1.
    t: float = math.nan

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()
                if k != "t"}


def _xy(y, x=None) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=float)
    x = np.arange(len(y), dtype=float) if x is None else np.asarray(x, dtype=float)
    if y.shape != x.shape or y.ndim != 1:
        raise ValueError("x and y must be 1-D arrays of the same length")
    return x, y


def _median(a: np.ndarray) -> float:
    """np.median of a 1-D float array without NaNs, by partition (several times faster)."""
    return _median_of(a.copy())


def _median_of(b: np.ndarray) -> float:
    """:func:`_median` of ``b``, partitioning ``b`` in place (a scratch array).

    An odd size above 256 is partitioned at two positions too: numpy's selection for one
    position is then several times slower (12 vs 4 µs at n = 1499); b[k] is the same.
    """
    n = b.size
    k = n // 2
    if n % 2:
        b.partition(k if n < 256 else (k - 1, k))
        return float(b[k])
    b.partition((k - 1, k))
    return 0.5 * (float(b[k - 1]) + float(b[k]))


def _mad(r: np.ndarray) -> float:
    """Median absolute deviation from the median."""
    d = r - _median(r)
    return _median_of(np.abs(d, out=d))


def _clip(r: np.ndarray, bound: float) -> np.ndarray:
    """``r`` clipped to [-bound, bound] in place (np.clip's result, without its overhead)."""
    np.maximum(r, -bound, out=r)
    return np.minimum(r, bound, out=r)


def _all_finite(a: np.ndarray) -> bool:
    """Whether every element of ``a`` is finite, by one reduction.

    A sum is finite only when every term is; a sum that overflows (terms near 1e308) says
    False for a finite array, so use it only where that merely takes a slower, equal path.
    """
    return math.isfinite(float(np.add.reduce(a)))


def _diff_noise(y: np.ndarray) -> float:
    """:func:`noise_level` of a 1-D float array of at least 3 values."""
    d = y[1:] - y[:-1]
    if not _all_finite(d):
        return float(MAD_SCALE * np.median(np.abs(d - np.median(d))) / _SQRT2)
    return MAD_SCALE * _mad(d) / _SQRT2


_SQRT2 = math.sqrt(2)


def robust_slope(y, x=None, confidence: float = 0.95) -> Slope:
    """Theil–Sen slope (median of pairwise slopes) with its ``confidence`` interval."""
    x, y = _xy(y, x)
    if len(y) < 2:
        return Slope(0.0, -math.inf, math.inf, float(y[0]) if len(y) else 0.0)
    from scipy import stats  # slow to import; only this function needs it

    res = stats.theilslopes(y, x, alpha=confidence)
    return Slope(float(res.slope), float(res.low_slope), float(res.high_slope), float(res.intercept))


def noise_level(y) -> float:
    """Robust noise sigma: 1.4826 · MAD of first differences / sqrt(2) (insensitive to trends)."""
    y = np.asarray(y, dtype=float)
    if len(y) < 3:
        return 0.0
    return _diff_noise(y)


def winsorise(x: np.ndarray, y: np.ndarray, clip: float = 3.0) -> np.ndarray:
    """``y`` with residuals from the least-squares line clipped to ``clip`` robust sigmas."""
    line = np.polyval(np.polyfit(x, y, 1), x)
    r = y - line
    s = MAD_SCALE * float(np.median(np.abs(r - np.median(r))))
    if s <= 0:
        return y
    return line + np.clip(r, -clip * s, clip * s)


def ar1(residuals: np.ndarray, conservative: bool = True, fitted: int = 3) -> float:
    """Lag-1 autocorrelation of regression residuals, bias-corrected, clipped to [0, 0.98].

    Kendall's correction (1 + 3·phi)/n plus ``fitted``/n for the fitted trend's parameters;
    ``conservative`` adds one standard error sqrt((1 - phi²)/n).
    """
    n = len(residuals)
    if n < 4:
        return 0.0
    r = residuals - np.add.reduce(residuals) / n
    den = float(r @ r)
    if den <= 0:
        return 0.0
    phi = float(r[1:] @ r[:-1]) / den
    phi += (1 + 3 * phi) / n + fitted / n
    if conservative:
        phi += math.sqrt(max(1 - phi * phi, 0.0) / n)
    return min(max(phi, 0.0), 0.98)


def improvement_test(y, x=None, *, mode: str = "min", min_rate: float = 0.0, clip: float = 3.0,
                     confidence: float = 0.95) -> TrendTest:
    """One-sided test that the metric improves faster than ``min_rate`` per unit of x.

    Improving means decreasing for ``mode="min"``, increasing for ``"max"``. Returns the
    p-value of H0 "improvement rate <= min_rate" (small p: significantly improving), the
    prewhitened slope with its two-sided ``confidence`` interval, phi and the noise level.
    """
    return _improvement_tests(y, x, (mode,), min_rate, clip, confidence)[0]


def improvement_tests(y, x=None, *, min_rate: float = 0.0, clip: float = 3.0,
                      confidence: float = 0.95) -> tuple[TrendTest, TrendTest]:
    """:func:`improvement_test` with ``mode="min"`` and with ``mode="max"``, from one fit.

    "Is it falling?" and "is it rising?" share everything but the sign of the last step:
    the second answer costs nothing once the first is computed.
    """
    return _improvement_tests(y, x, ("min", "max"), min_rate, clip, confidence)


def _improvement_tests(y, x, modes: tuple[str, ...], min_rate: float, clip: float,
                       confidence: float) -> tuple[TrendTest, ...]:
    x, y = _xy(y, x)
    n = len(y)
    if n < 6:
        return (_no_trend(n),) * len(modes)
    top = float(np.maximum.reduce(np.abs(y)))  # NaN or inf when some y is
    if not (math.isfinite(top) and np.isfinite(x).all()):
        return (_no_trend(n),) * len(modes)
    # The test is shift and scale invariant: work on y in [-1, 1] around its median and x in
    # [0, 1], so no value (1e300 losses included) can overflow the fits; rescale the results.
    y1 = y / top if top > 0 else y
    yn = y1 - _median(y1)
    spread = float(np.maximum.reduce(np.abs(yn)))
    span = float(x[-1] - x[0])
    if not (spread > 0 and span > 0):
        return (TrendTest(1.0, 0.0, 0.0, 0.0, 0.0, n, 0.0, t=-math.inf),) * len(modes)  # flat: not improving
    yscale = spread * top if top > 0 else spread
    try:
        with np.errstate(all="ignore"):
            np.divide(yn, spread, out=yn)
            results = _improvement(yn, (x - x[0]) / span, modes=modes, min_rate=min_rate * span / yscale,
                                   clip=clip, confidence=confidence)
    except (np.linalg.LinAlgError, ValueError, FloatingPointError, ZeroDivisionError):
        return (_no_trend(n),) * len(modes)
    k = yscale / span
    return tuple(TrendTest(p, slope * k, lo * k, hi * k, phi, n, noise * yscale, sigmas, se * k, t)
                 for p, slope, lo, hi, phi, noise, sigmas, se, t in results)


def _no_trend(n: int) -> TrendTest:
    """The result of :func:`improvement_test` for a window it cannot test."""
    return TrendTest(1.0, 0.0, -math.inf, math.inf, 0.0, n, math.nan, t=-math.inf)


@functools.lru_cache(maxsize=1024)
def _t_quantile(dof: int, q: float) -> float:
    return float(special.stdtrit(dof, q))


def _improvement(y: np.ndarray, x: np.ndarray, *, modes: tuple[str, ...], min_rate: float, clip: float,
                 confidence: float) -> list[tuple[float, ...]]:
    """:func:`improvement_test` on a normalised window (y in [-1, 1], x in [0, 1]), per mode.

    Returns, for each of ``modes``, the fields p, slope, lo, hi, phi, noise, decline_sigmas,
    se, t of its :class:`TrendTest` in normalised units. The least-squares fits are closed forms over
    centred / orthogonalised columns (the same fitted values as a Vandermonde least-squares
    solve, several times faster).
    """
    n = len(y)
    xc = x - np.add.reduce(x) / n
    sxx = float(xc @ xc)
    # Line: mean + slope · xc.
    line = (float(xc @ y) / sxx) * xc
    line += float(np.add.reduce(y)) / n
    yw = y
    if clip:  # winsorise around the least-squares line
        r = y - line
        s = MAD_SCALE * _mad(r)
        if s > 0:
            yw = np.add(line, _clip(r, clip * s), out=r)
    # Quadratic: add xc² orthogonalised against 1 and xc.
    q = xc * xc
    q -= np.add.reduce(q) / n
    q -= (float(q @ xc) / sxx) * xc
    qq = float(q @ q)
    slope_w = float(xc @ yw) / sxx
    quad = slope_w * xc
    quad += float(np.add.reduce(yw)) / n
    if qq > 0:
        quad += (float(q @ yw) / qq) * q
    phi = ar1(np.subtract(yw, quad, out=quad))
    yp = yw[1:] - phi * yw[:-1]
    xp = x[1:] - phi * x[:-1]
    # Prewhitened regression of yp on (1 - phi, xp): slope from centred sums.
    xpc = xp - np.add.reduce(xp) / (n - 1)
    sxp = float(xpc @ xpc)
    dof = n - 3
    noise = _diff_noise(y)
    if sxp <= 0:
        return [(1.0, 0.0, -math.inf, math.inf, phi, noise, 0.0, math.nan, -math.inf)] * len(modes)
    beta1 = float(xpc @ yp) / sxp
    resid = yp - np.add.reduce(yp) / (n - 1)
    resid -= beta1 * xpc
    s2 = float(resid @ resid) / dof
    se = math.sqrt(max(s2 / sxp, 0.0))
    # The plain least-squares slope is what is reported: with phi near 1 the prewhitened
    # estimate of a curved series can even flip sign. Improvement needs both to agree.
    slope = slope_w
    half = _t_quantile(dof, 0.5 + confidence / 2) * se
    span = float(x[-1] - x[0])
    out = []
    for mode in modes:
        sign = 1.0 if mode == "min" else -1.0
        rate = -sign * slope - min_rate
        gain = -sign * beta1 - min_rate
        if se == 0:  # an exact line: improving exactly when the least-squares slope says so
            t = math.inf if rate > 0 else -math.inf
        else:
            t = gain / se if rate > 0 else min(gain / se, 0.0)
        if se == 0 or rate <= 0 or gain <= 0:
            p = 0.0 if (se == 0 and rate > 0) else 1.0
        else:
            p = float(special.stdtr(dof, -t))
        sigmas = rate * span / noise if noise > 0 else (math.inf if rate > 0 else 0.0)
        if sigmas > DECLINE_SIGMAS:
            p, t = 0.0, math.inf
        out.append((p, slope, slope - half, slope + half, phi, noise, float(min(sigmas, 1e9)), se, t))
    return out


@dataclass(frozen=True)
class Verdict:
    """A stop test's answer: ``stopped``, over the last ``recent`` of ``n`` observations."""

    stopped: bool
    recent: int
    n: int

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Slowdown(Verdict):
    """Result of :func:`slowdown_test` for one candidate change point.

    Rates are improvement per unit of x (positive: improving). ``stopped`` is True when the
    last ``recent`` observations show no significant improvement although, at the rate of the
    ``ratio``·``recent`` observations before them, they would have shown one with probability
    at least 1 - ``miss``.
    """

    before: float
    before_se: float
    after: float
    after_se: float
    phi: float


def block_ar1(y: np.ndarray, block: int = 200) -> float:
    """AR(1) phi of ``y`` around a trend that may bend or break: detrended block by block.

    ``y`` is cut into blocks of ``block`` to 2·``block`` - 1 observations (one block when
    shorter), each detrended by its own least-squares line; the median over blocks of the
    residuals' lag-1 autocorrelation gets the corrections of :func:`ar1` for the block length
    (2 fitted parameters) plus two standard errors over all observations (x 1.25 for the
    median), so that standard errors built on phi are seldom too small (an underestimated
    phi is what makes a test overconfident; simulated at phi = 0.9, n = 1000 the estimate
    falls below phi in about 5% of series). A curve or a kink only disturbs the block that
    holds it, and then upwards (a conservative error).
    """
    y = np.asarray(y, dtype=float)
    n = len(y)
    if n < 8:
        return 0.0
    nb = max(n // block, 1)
    length = n // nb
    blocks = y[n - nb * length:].reshape(nb, length)
    t, tt = _centred_steps(length)
    centred = blocks - np.add.reduce(blocks, axis=1, keepdims=True) / length
    resid = centred - (centred @ t / tt)[:, None] * t
    den = np.add.reduce(resid * resid, axis=1)
    if not (den > 0).all():
        return 0.0
    rhos = np.add.reduce(resid[:, 1:] * resid[:, :-1], axis=1) / den
    rho = _median_of(rhos)
    phi = rho + (1 + 3 * rho) / length + 2 / length
    phi += 2.0 * (1.0 if nb < 3 else 1.25) * math.sqrt(max(1 - phi * phi, 0.0) / (nb * length))
    return min(max(phi, 0.0), 0.98)


@functools.lru_cache(maxsize=64)
def _centred_steps(length: int) -> tuple[np.ndarray, float]:
    """0..length-1 minus its mean, and its sum of squares."""
    t = np.arange(length) - (length - 1) / 2.0
    t.flags.writeable = False
    return t, float(t @ t)


SLOWDOWN_MISS = 1e-5
SLOWDOWN_MIN_RECENT = 10
SLOWDOWN_RATIO = 3
SLOWDOWN_MEDIAN = 9


@functools.lru_cache(maxsize=4096)
def slowdown_ladder(n: int, min_recent: int = SLOWDOWN_MIN_RECENT, ratio: int = SLOWDOWN_RATIO) -> tuple[int, ...]:
    """Candidate recent lengths k (about 19% apart: 10, 12, 14, 17, 20, 24, ...) with (ratio + 1)·k <= n."""
    out: list[int] = []
    j = 0
    while True:
        k = int(round(min_recent * 2 ** (j / 4)))
        if (ratio + 1) * k > n:
            return tuple(out)
        if not out or k > out[-1]:
            out.append(k)
        j += 1


#: One-sided t quantiles are tabulated up to this many degrees of freedom (computed beyond).
T_TABLE = 4096


@functools.lru_cache(maxsize=16)
def _t_table(confidence: float) -> np.ndarray:
    """special.stdtrit(dof, confidence) for dof = 0..T_TABLE (dof 0 as 1), computed once."""
    return special.stdtrit(np.maximum(np.arange(T_TABLE + 1), 1), confidence)


def _critical(dofs, confidence: float, miss: float) -> tuple[np.ndarray, float]:
    """One-sided t critical values for the integer ``dofs`` (below 1: as 1) and the normal
    quantile of 1 - ``miss``; the same numbers as ``special.stdtrit``, from a table."""
    d = np.maximum(np.asarray(dofs, dtype=np.int64), 1)
    table = _t_table(confidence)
    if d.size and int(d.max()) > T_TABLE:
        return special.stdtrit(d, confidence), _ndtri(1.0 - miss)
    return table[d], _ndtri(1.0 - miss)


@functools.lru_cache(maxsize=16)
def _ndtri(p: float) -> float:
    return float(special.ndtri(p))


def slowdown_test(y, x=None, *, mode: str = "min", min_rate: float = 0.0, confidence: float = 0.95,
                  phi: float | None = None, miss: float = SLOWDOWN_MISS, min_recent: int = SLOWDOWN_MIN_RECENT,
                  ratio: int = SLOWDOWN_RATIO, clip: float = 3.0, prepared=None) -> Slowdown | None:
    """Has the metric stopped improving recently, after improving clearly before?

    For each candidate k in :func:`slowdown_ladder` (10, 12, 14, 17, 20, ...) the last
    (ratio + 1)·k observations are fitted by a continuous curve with a break before the last
    k: a parabola before it (a decline that may be slowing down, as losses do), a straight
    line after it. ``before`` is the rate at the break from the left (the parabola's end
    slope), ``after`` the rate of the line. The candidate says "stopped" when

    * ``after`` is not significantly better than ``min_rate`` (one-sided t test at
      ``confidence``), and
    * it had the power to be: the lower confidence bound of ``before`` is at least
      (t_confidence + z_(1-miss)) standard errors of ``after``, so a decline continuing at
      the rate it had reached looks flat with probability below ``miss``.

    Short candidates react within a few dozen observations to the end of a steep decline;
    long ones are needed when the decline is slow against the noise. Fitting the slope at
    the break, not the mean slope before it, keeps a loss that merely decelerates from
    looking stopped (a straight line before the break would, on an exponential decay whose
    time constant is about twice the window). The series is winsorised around its running
    median (width 9), so spikes and heavy tails do not steer the fits; AR(1) noise is handled
    as in :func:`improvement_test` (Cochrane–Orcutt with ``phi``, by default
    :func:`block_ar1` of the winsorised series). All candidates come from one set of suffix
    sums: O(n) in total. ``prepared`` is :func:`_normalised` of (y, x) when already computed.

    Returns the stopped candidate with the fewest recent observations, else the longest
    candidate (stopped False); None when fewer than (ratio + 1)·min_recent observations.
    """
    x, y = _xy(y, x)
    n = len(y)
    ks = slowdown_ladder(n, min_recent, ratio)
    if not ks or not (np.isfinite(y).all() and np.isfinite(x).all()):
        return None
    inputs = _stop_inputs(y, x, clip, prepared, phi)
    if inputs is None:
        return Slowdown(False, ks[-1], (ratio + 1) * ks[-1], 0.0, 0.0, 0.0, 0.0, 0.0)
    (yw, xn, yscale, span), phi = inputs
    sign = 1.0 if mode == "min" else -1.0
    with np.errstate(all="ignore"):
        u = 1.0 - phi
        # Prewhitened rows t = 1..n-1: z_t = y_t - phi·y_{t-1} regressed on the prewhitened
        # columns 1 -> u, x -> v_t = x_t - phi·x_{t-1}, the hinge (x - x_c)·[t > c] -> w_t =
        # (v_t - u·x_c)·[t > c] and the parabola (x - x_c)²·[t <= c] -> g_t = (a_t - 2·x_c·v_t
        # + u·x_c²)·[t <= c] with a_t = x_t² - phi·x_{t-1}² (row c is the last before the
        # break). Window sums come from suffix sums, which stay small near the end.
        base = np.empty((3, n - 1))  # prewhitened rows 1..n-1 at index 0..n-2: v, z, a
        np.subtract(xn[1:], phi * xn[:-1], out=base[0])
        np.subtract(yw[1:], phi * yw[:-1], out=base[1])
        sq = xn * xn
        np.subtract(sq[1:], phi * sq[:-1], out=base[2])
        c, s0, starts, ia, iw, kf, m, ma, dof = _slowdown_plan(n, min_recent, ratio)
        # Sums over rows >= j for j in {c+1, s0+1}: segment sums (reduceat) between those
        # starts, accumulated from the end.
        singles = np.add.reduceat(base, starts, axis=1)[:, ::-1].cumsum(axis=1)[:, ::-1]
        pairs = np.add.reduceat(base[:, None, :] * base[None, :, :], starts, axis=2)
        pairs = pairs[:, :, ::-1].cumsum(axis=2)[:, :, ::-1]
        (sv, sz, sa), (ssv, ssz, ssa) = singles[:, iw], singles[:, ia]
        pw, pa = pairs[:, :, iw], pairs[:, :, ia]
        wv, wz = sv, sz  # the whole window
        wvv, wvz, wzz = pw[0, 0], pw[0, 1], pw[1, 1]
        bv, bz, bvv, bvz = ssv, ssz, pa[0, 0], pa[0, 1]  # after the break
        av, az, aa = sv - ssv, sz - ssz, sa - ssa  # before it
        avv, avz = wvv - bvv, wvz - bvz
        aaa, aav, aaz = pw[2, 2] - pa[2, 2], pw[2, 0] - pa[2, 0], pw[2, 1] - pa[2, 1]
        xb = xn[c]
        xb2 = xb * xb
        il = -1.0 / xn[s0]  # columns rescaled by the window's length (x/L, parabola/L²)
        il2 = il * il
        uu = u * u
        g = np.empty((len(ks), 4, 4))
        g[:, 0, 0] = m * uu
        g[:, 0, 1] = g[:, 1, 0] = u * wv * il
        g[:, 0, 2] = g[:, 2, 0] = u * (bv - kf * u * xb) * il
        g[:, 0, 3] = g[:, 3, 0] = u * (aa - 2 * xb * av + ma * u * xb2) * il2
        g[:, 1, 1] = wvv * il2
        g[:, 1, 2] = g[:, 2, 1] = (bvv - u * xb * bv) * il2
        g[:, 1, 3] = g[:, 3, 1] = (aav - 2 * xb * avv + u * xb2 * av) * il * il2
        g[:, 2, 2] = (bvv - 2 * u * xb * bv + kf * uu * xb2) * il2
        g[:, 2, 3] = g[:, 3, 2] = 0.0
        g[:, 3, 3] = (aaa - 4 * xb * aav + 2 * u * xb2 * aa + 4 * xb2 * avv - 4 * u * xb2 * xb * av
                      + ma * uu * xb2 * xb2) * il2 * il2
        rhs = np.stack([u * wz, wvz * il, (bvz - u * xb * bz) * il, (aaz - 2 * xb * avz + u * xb2 * az) * il2], axis=1)
        ok = np.linalg.det(g) > 0
        g[~ok] = np.eye(4)
        inv = np.linalg.inv(g)
        beta = np.einsum("kij,kj->ki", inv, rhs)
        s2 = np.maximum(wzz - np.einsum("ki,ki->k", beta, rhs), 0.0) / np.maximum(dof, 1.0)
        v11, v22, v12 = inv[:, 1, 1], inv[:, 2, 2], inv[:, 1, 2]
        scale = yscale / span
        b1, b2 = beta[:, 1] * il, beta[:, 2] * il
        before = -sign * b1 * scale
        after = -sign * (b1 + b2) * scale
        se_b = np.sqrt(np.maximum(s2 * v11, 0.0)) * il * scale
        se_a = np.sqrt(np.maximum(s2 * (v11 + v22 + 2 * v12), 0.0)) * il * scale
        tc, zq = _slowdown_critical(n, min_recent, ratio, float(confidence), float(miss))
        stopped = (ok & (dof >= 1) & (v11 > 0) & (after - min_rate < tc * se_a)
                   & (before - tc * se_b >= (tc + zq) * se_a) & (before > 0))
    i = int(np.argmax(stopped)) if stopped.any() else len(ks) - 1
    return Slowdown(bool(stopped[i]), int(ks[i]), int((ratio + 1) * ks[i]), float(before[i]), float(se_b[i]),
                    float(after[i]), float(se_a[i]), phi)


def _stop_inputs(y: np.ndarray, x: np.ndarray, clip: float, prepared, phi: float | None):
    """The stop tests' series: winsorised and normalised (:func:`_normalised`, or ``prepared``),
    and the AR(1) phi (default :func:`block_ar1` of it) clipped to [0, 0.98]; None when flat."""
    norm = _normalised(y, x, clip) if prepared is None else prepared
    if norm is None:
        return None
    if phi is None:
        with np.errstate(all="ignore"):
            phi = block_ar1(norm[0])
    return norm, float(min(max(phi, 0.0), 0.98))


@functools.lru_cache(maxsize=256)
def _slowdown_plan(n: int, min_recent: int, ratio: int) -> tuple:
    """What :func:`slowdown_test` needs of its ladder ks (which depends on n only), computed once.

    c (last row before each break), s0 (first row of each window), the sorted distinct
    segment starts of c and s0 and where c and s0 are among them, k, (ratio + 1)·k - 1 (rows
    of the window), ratio·k - 1 (rows before the break) as floats, and the fit's dof.
    """
    k = np.asarray(slowdown_ladder(n, min_recent, ratio))
    c = n - 1 - k  # last row before the break
    s0 = n - (ratio + 1) * k  # first row of the window; prewhitened rows s0+1..n-1
    starts = np.unique(np.concatenate([c, s0]))  # row j - 1 = index of row j in base
    ia = np.searchsorted(starts, c)  # rows c+1..n-1
    iw = np.searchsorted(starts, s0)  # rows s0+1..n-1
    kf = k.astype(float)
    m = (ratio + 1) * kf - 1.0
    ma = ratio * kf - 1.0
    plan = (c, s0, starts, ia, iw, kf, m, ma, m - 4.0)
    for a in plan:
        a.flags.writeable = False
    return plan


@functools.lru_cache(maxsize=256)
def _slowdown_critical(n: int, min_recent: int, ratio: int, confidence: float, miss: float) -> tuple[np.ndarray, float]:
    """:func:`_critical` for the dof of :func:`_slowdown_plan`, computed once."""
    tc, zq = _critical(_slowdown_plan(n, min_recent, ratio)[-1].astype(np.int64), confidence, miss)
    tc.flags.writeable = False
    return tc, zq


def faded_test(y, x=None, *, mode: str = "min", min_rate: float = 0.0, confidence: float = 0.95,
               min_recent: int = 100, min_before: int = 100, fraction: float = 0.5,
               miss: float = SLOWDOWN_MISS, phi: float | None = None, clip: float = 3.0,
               block: int = 50, min_effective: float = 0.0, prepared=None) -> Slowdown | None:
    """Did an improvement die out: the last m observations flat where the pace before them would show?

    For each candidate m (``min_recent``, then about 19% apart, with at least ``min_before``
    observations before them) a line is fitted to the last m observations and another to all
    the observations before them (no continuity: a drop after a warmup or a reduction is a
    level change, not a slope). The candidate says "stopped" when

    * ``after``, the rate of the last m, is not significantly better than ``min_rate``
      (one-sided t test at ``confidence``), and
    * ``fraction`` · (``before`` - t·se_before), the lower confidence bound of the earlier
      pace, is at least (t + z_(1-miss)) standard errors of ``after``: a decline that kept up
      ``fraction`` of that pace would have shown with probability above 1 - ``miss``.

    Unlike :func:`slowdown_test` (a break before the last k with 3k observations before it)
    the earlier part is everything kept, so a short decline followed by a long flat stretch,
    the shape right after a warmup or a reduction, is recognised once the flat stretch is long
    enough to have seen the decline continue, however long ago the decline was. Winsorising
    as in :func:`slowdown_test`; phi is :func:`block_ar1` with blocks of ``block``, or n/4
    when shorter (the median over at least four blocks ignores the one that holds a steep
    start or the kink); each segment's first
    row is dropped from the prewhitened fit. All candidates from one set of prefix sums: O(n);
    ``prepared`` as in :func:`slowdown_test`.

    Candidates whose earlier part holds fewer than ``min_effective`` effectively independent
    observations, n_before·(1 - phi)/(1 + phi), are skipped: under strong autocorrelation a
    short stretch's slope and standard error are not to be trusted.

    Returns the stopped candidate with the fewest recent observations, else the longest
    candidate (stopped False); None when fewer than ``min_recent`` + ``min_before``
    observations.
    """
    x, y = _xy(y, x)
    n = len(y)
    ms = slowdown_ladder(n - max(min_before, 4), max(min_recent, 4), 0)
    if not ms or not (np.isfinite(y).all() and np.isfinite(x).all()):
        return None
    sign = 1.0 if mode == "min" else -1.0
    norm = _normalised(y, x, clip) if prepared is None else prepared
    if norm is None:
        return Slowdown(False, ms[-1], n, 0.0, 0.0, 0.0, 0.0, 0.0)
    yw, xn, yscale, span = norm
    with np.errstate(all="ignore"):
        if phi is None:
            phi = block_ar1(yw, min(block, max(n // 4, 10)))  # >= 4 blocks: a kink disturbs one
        phi = float(min(max(phi, 0.0), 0.98))
        v = xn[1:] - phi * xn[:-1]  # prewhitened row t at index t - 1
        z = yw[1:] - phi * yw[:-1]
        cum = np.zeros((5, n))
        np.cumsum(np.stack([np.ones(n - 1), v, z, v * v, v * z]), axis=1, out=cum[:, 1:])
        zz = np.zeros(n)
        np.cumsum(z * z, out=zz[1:])
        m = np.asarray(ms)
        c = n - m  # first recent row

        def segment(a, b):
            """Slope and its standard error over prewhitened rows a+1..b-1 (indices a..b-2)."""
            cnt, sv, sz, svv, svz = cum[:, b - 1] - cum[:, a]
            szz = zz[b - 1] - zz[a]
            sxx = svv - sv * sv / cnt
            sxz = svz - sv * sz / cnt
            beta = sxz / sxx
            rss = np.maximum(szz - sz * sz / cnt - beta * sxz, 0.0)
            dof = cnt - 2.0
            se = np.sqrt(rss / np.maximum(dof, 1.0) / sxx)
            return beta, se, dof

        b_r, se_r, dof_r = segment(c, np.full_like(c, n))
        b_b, se_b, dof_b = segment(np.zeros_like(c), c)
        scale = yscale / span
        after, before = -sign * b_r * scale, -sign * b_b * scale
        se_a, se_bf = se_r * scale, se_b * scale
        tr, tb, zq = _faded_critical(n, min_recent, min_before, float(confidence), float(miss))
        enough = c * (1.0 - phi) >= min_effective * (1.0 + phi)
        stopped = (enough & (dof_r >= 1) & (dof_b >= 1) & (after - min_rate < tr * se_a)
                   & (fraction * (before - tb * se_bf) >= (tr + zq) * se_a) & (before > 0))
    i = int(np.argmax(stopped)) if stopped.any() else len(ms) - 1
    return Slowdown(bool(stopped[i]), int(ms[i]), n, float(before[i]), float(se_bf[i]),
                    float(after[i]), float(se_a[i]), phi)


@functools.lru_cache(maxsize=256)
def _faded_critical(n: int, min_recent: int, min_before: int, confidence: float,
                    miss: float) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`_critical` for :func:`faded_test`'s candidates m (which depend on n only), computed
    once: for the last m rows (m - 3 dof: the first row is dropped, a line is fitted) and for
    the n - m before them (n - m - 3 dof), and the normal quantile."""
    m = np.asarray(slowdown_ladder(n - max(min_before, 4), max(min_recent, 4), 0))
    tr, zq = _critical(m - 3, confidence, miss)
    tb, _ = _critical(n - m - 3, confidence, miss)
    tr.flags.writeable = tb.flags.writeable = False
    return tr, tb, zq


def _normalised(y: np.ndarray, x: np.ndarray, clip: float):
    """(winsorised y in [-1, 1], x in [-1, 0] ending at 0, y scale, x span), None when flat.

    Winsorised around the running median (width ``SLOWDOWN_MEDIAN``) at ``clip`` robust sigmas.
    """
    top = float(np.maximum.reduce(np.abs(y)))
    y1 = y / top if top > 0 else y
    yn = y1 - float(np.add.reduce(y1)) / len(y1)  # around the mean
    spread = float(np.maximum.reduce(np.abs(yn)))
    span = float(x[-1] - x[0])
    if not (spread > 0 and span > 0):
        return None
    with np.errstate(all="ignore"):
        np.divide(yn, spread, out=yn)
        xn = (x - x[-1]) / span
        yw = yn
        if clip:
            med = _running_median(yn)
            r = yn - med
            s = MAD_SCALE * _mad(r)
            if s > 0:
                yw = np.add(med, _clip(r, clip * s), out=r)
    return yw, xn, (spread * top if top > 0 else spread), span


#: Up to this length the running median gathers every window and partitions it (faster than
#: scipy.ndimage.median_filter there, slower beyond).
_GATHER_MEDIAN = 400


def _running_median(y: np.ndarray) -> np.ndarray:
    """ndimage.median_filter(y, size=SLOWDOWN_MEDIAN, mode="nearest") of a 1-D float array."""
    if len(y) > _GATHER_MEDIAN:
        from scipy import ndimage

        return ndimage.median_filter(y, size=SLOWDOWN_MEDIAN, mode="nearest")
    windows = y[_median_windows(len(y))]
    half = SLOWDOWN_MEDIAN // 2
    windows.partition(half, axis=1)
    return windows[:, half]


@functools.lru_cache(maxsize=64)
def _median_windows(n: int) -> np.ndarray:
    """Indices (n, SLOWDOWN_MEDIAN) of the window around each position, clamped to [0, n - 1]."""
    half = SLOWDOWN_MEDIAN // 2
    idx = np.clip(np.arange(n)[:, None] + np.arange(-half, half + 1), 0, n - 1)
    idx.flags.writeable = False
    return idx


@dataclass(frozen=True)
class CurveFit:
    """A saturating fit y ≈ asymptote + scale · g(x) and what it forecasts."""

    kind: str  # "exponential" or "power"
    asymptote: float
    params: tuple[float, ...]
    rmse: float

    def predict(self, x) -> np.ndarray:
        a, b, c = self.params
        x = np.asarray(x, dtype=float)
        if self.kind == "exponential":
            return a + b * np.exp(-c * x)
        return a + b * np.power(x + 1.0, -c)


def fit_curve(y, x=None) -> CurveFit | None:
    """Fit exponential (a + b·e^(-c·x)) and power law (a + b·(x+1)^(-c)); keep the better one.

    x is shifted to start at 0. Returns None when neither converges.
    """
    x, y = _xy(y, x)
    if len(y) < 8 or not np.all(np.isfinite(y)):
        return None
    x = x - x[0]
    span = max(float(x[-1]), 1.0)
    lo, hi = float(np.min(y)), float(np.max(y))
    best: CurveFit | None = None
    guesses = {
        "exponential": (lambda t, a, b, c: a + b * np.exp(-c * t), (lo, hi - lo, 3.0 / span)),
        "power": (lambda t, a, b, c: a + b * np.power(t + 1.0, -c), (lo, hi - lo, 0.5)),
    }
    for kind, (func, p0) in guesses.items():
        try:
            params = _curve_fit(func, x, y, p0, maxfev=400)
        except (RuntimeError, ValueError):
            continue
        if not np.all(np.isfinite(params)):
            continue
        rmse = float(np.sqrt(np.mean((func(x, *params) - y) ** 2)))
        if best is None or rmse < best.rmse:
            best = CurveFit(kind, float(params[0]), tuple(float(p) for p in params), rmse)
    return best


#: scipy's MINPACK ``_lmdif`` for :func:`_curve_fit`: None before the first fit, False when
#: it could not be loaded or its interface is not the one expected (public curve_fit then)
_lmdif = None
_LMDIF_DOC = "_lmdif(fun, x0, args, full_output, ftol, xtol, gtol, maxfev, epsfcn, factor, diag)"


class _LmdifBroken(Exception):
    """scipy's private ``_lmdif`` did not behave as this module expects."""


def _curve_fit(func, x: np.ndarray, y: np.ndarray, p0: tuple[float, ...], maxfev: int) -> np.ndarray:
    """The parameters ``scipy.optimize.curve_fit(func, x, y, p0=p0, maxfev=maxfev)`` returns.

    Without bounds, sigma or jac, curve_fit is ``leastsq``, which calls MINPACK's ``lmdif``
    with fixed defaults; calling scipy's ``_lmdif`` directly with the same arguments gives
    bit-identical parameters without importing ``scipy.optimize`` (see _scipy_extension).
    RuntimeError when the fit does not converge, ValueError for non-finite data (as curve_fit).
    Anything unexpected from ``_lmdif`` (it is private: a changed signature, a missing
    function, an odd return value) switches this and later calls to the public curve_fit.
    """
    global _lmdif
    x = np.asarray_chkfinite(x, float)
    y = np.asarray_chkfinite(y, float)
    start = np.array(p0, dtype=float)
    if _lmdif is None:
        with _SCIPY_LOCK:
            if _lmdif is None:
                lmdif = getattr(_scipy_extension("optimize", "_minpack"), "_lmdif", None)
                # its docstring states the signature: a reordered one is not called blindly
                _lmdif = lmdif if callable(lmdif) and _LMDIF_DOC in (lmdif.__doc__ or "") else False
    lmdif = _lmdif
    if lmdif is not False and start.ndim == 1 and y.ndim == 1 and len(y) >= len(start):
        try:
            return _curve_fit_lmdif(lmdif, func, x, y, start, maxfev)
        except _LmdifBroken:
            _lmdif = False
    return _curve_fit_public(func, x, y, p0, maxfev)


def _curve_fit_lmdif(lmdif, func, x: np.ndarray, y: np.ndarray, start: np.ndarray, maxfev: int) -> np.ndarray:
    """:func:`_curve_fit` through ``lmdif``; _LmdifBroken when it misbehaves.

    The arguments are leastsq's for curve_fit's call: full output, ftol = xtol = 1.49012e-8,
    gtol = 0, epsfcn = the float64 machine epsilon (the residuals are float64), factor = 100,
    no diag. curve_fit evaluates the residuals once at p0 beforehand to check their shape, and
    afterwards estimates a covariance: neither changes the parameters, both are skipped.
    """
    raised = []

    def residuals(params):
        try:
            return func(x, *params) - y
        except BaseException as exc:  # the model's own error: propagates as from curve_fit
            raised.append(exc)
            raise

    eps = float(np.finfo(float).eps)
    try:
        out = lmdif(residuals, start, (), 1, 1.49012e-8, 1.49012e-8, 0.0, maxfev, eps, 100, None)
    except Exception as exc:  # TypeError for a changed signature, ...
        if raised and exc is raised[-1]:
            raise
        raise _LmdifBroken from exc
    try:
        params, info = out[0], out[-1]
    except (TypeError, IndexError, KeyError) as exc:
        raise _LmdifBroken from exc
    if not (isinstance(params, np.ndarray) and params.shape == start.shape and isinstance(info, int)):
        raise _LmdifBroken
    if info == 0:  # "improper input parameters": never for these arguments with this interface
        raise _LmdifBroken
    if info not in (1, 2, 3, 4):
        raise RuntimeError(f"Optimal parameters not found (MINPACK lmdif info = {info})")
    return params


def _curve_fit_public(func, x: np.ndarray, y: np.ndarray, p0: tuple[float, ...], maxfev: int) -> np.ndarray:
    """:func:`_curve_fit` through ``scipy.optimize.curve_fit``."""
    from scipy import optimize

    try:
        with warnings.catch_warnings():  # a flat window leaves the covariance undefined: fine
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            params, _ = optimize.curve_fit(func, x, y, p0=p0, maxfev=maxfev)
    except optimize.OptimizeWarning as exc:
        raise RuntimeError(str(exc)) from exc
    return params


def forecast_gain(y, x=None, horizon: float | None = None, mode: str = "min") -> float | None:
    """Improvement the fitted curve still expects over ``horizon`` (default: the window's span).

    Positive means better to come; None when no curve fits.
    """
    x, y = _xy(y, x)
    fit = fit_curve(y, x)
    if fit is None:
        return None
    x0 = x - x[0]
    h = float(x0[-1]) if horizon is None else horizon
    now, later = fit.predict([x0[-1], x0[-1] + h])
    gain = float(now - later)
    return gain if mode == "min" else -gain


def robust_reference(window) -> tuple[float, float] | None:
    """(median, robust sigma) of the finite values of ``window``; None below 8 values.

    sigma = max(1.4826 · MAD, first-difference noise, 1e-12 · |median|), so a window that is
    smooth but trending still has a usable scale.
    """
    w = np.asarray(window, dtype=float)
    if not _all_finite(w):
        w = w[np.isfinite(w)]
    if len(w) < 8:
        return None
    d = w.copy()
    med = _median_of(d)
    np.subtract(d, med, out=d)
    s = MAD_SCALE * _median_of(np.abs(d, out=d))
    return med, max(s, _diff_noise(w), 1e-12 * max(abs(med), 1.0))


def divergent(value: float, reference: Sequence[float] | None, *, mode: str = "min",
              k: float = 8.0, ratio: float = 2.0) -> str | None:
    """Why ``value`` looks like divergence against a :func:`robust_reference`, or None. O(1).

    Non-finite values always; otherwise a move in the worse direction of ``mode`` by more than
    ``k`` robust sigmas that also multiplies the median by ``ratio`` (min: a loss doubling) or
    divides it by ``ratio`` (max: an accuracy halving).
    """
    if not math.isfinite(value):
        return f"non-finite value {value}"
    if reference is None:
        return None
    med, sigma = reference[0], reference[1]  # (a longer sequence's other items are ignored)
    excess = value - med if mode == "min" else med - value
    relative = (ratio - 1.0) if mode == "min" else (1.0 - 1.0 / ratio)
    if excess > k * sigma and excess > relative * abs(med):
        return f"jump to {value:.6g}, {excess / sigma:.0f} robust sigmas from the median {med:.6g}"
    return None


def divergence(window, value: float, *, mode: str = "min", k: float = 8.0, ratio: float = 2.0) -> str | None:
    """:func:`divergent` against the reference of ``window``."""
    return divergent(value, robust_reference(window), mode=mode, k=k, ratio=ratio)


@dataclass(frozen=True)
class Departure(Verdict):
    """Result of :func:`departure_test` for one candidate break (the first that says stopped,
    else the one with the largest ``z``).

    ``departure`` is the estimated change of the improvement rate at the break, per unit of x
    (positive: the metric improves more slowly than the continued curve, or worsens); ``se``
    its standard error, ``z`` = departure / se; ``before`` the improvement rate of the
    continued curve at the break (positive: improving).
    """

    departure: float
    se: float
    z: float
    before: float
    phi: float


#: :func:`departure_test` says stopped beyond this many standard errors: one-sided p 3.4e-6 per
#: candidate under Gaussian noise, since z is tested at every evaluation for every candidate.
#: On continuing declines (a line, two power laws, an exponential; Gaussian, t3, AR(1) 0.5 and
#: 0.9 noise; 3000 rows tested every 10 over the last 1500) it is exceeded somewhere in at most
#: 1 run of 100 (AR(0.9) line); at 4.0 in up to 2 (``benchmarks/bench_departure_null.py``).
DEPARTURE_Z = 4.5
DEPARTURE_MIN_RECENT = 10
#: Prewhitened residuals are clipped at this many robust sigmas, so one spike or a heavy tail
#: in the last rows (where the ramp weighs most) cannot make a departure alone.
DEPARTURE_CLIP = 2.5


def departure_test(y, x=None, *, mode: str = "min", z: float = DEPARTURE_Z, phi: float | None = None,
                   min_rate: float = 0.0, confidence: float = 0.95, min_recent: int = DEPARTURE_MIN_RECENT,
                   clip: float = 3.0, rclip: float = DEPARTURE_CLIP, prepared=None) -> Departure | None:
    """Did the recent observations leave the curve that the whole history was following?

    The null model is one smooth curve through everything kept: a parabola a + b·x + c·x²
    over all n observations. For each candidate m on a ladder (``min_recent``, then about 19%
    apart, up to n/2) a column (x - x_c)·[x > x_c] is added for the last m observations: a
    change of slope at the break, the curve staying continuous (a decline that stops there).
    Its coefficient, the departure from the extrapolated parabola, is estimated by generalised
    least squares: rows prewhitened with the AR(1) ``phi`` (default :func:`block_ar1` of the
    winsorised series), so its standard error holds both the noise of the last m observations
    and the uncertainty of the extrapolation (the parabola is fitted to everything kept, not
    to a window). A candidate says stopped when

    * departure / se > ``z`` (worse in the direction of ``mode``), both with ``phi`` and with
      phi = 0 (plain least squares): an underestimated phi is what the first guards against,
      an overestimated one the second. A strongly curved, nearly noiseless loss (the start of
      a power law) passes for autocorrelated noise (:func:`block_ar1` says up to 0.98), and
      whitened that hard the fit follows its local slopes, which break away from a parabola's;
      by plain least squares a parabola through a loss that decelerates as losses do (third
      derivative of the sign of the first: exponential, power law) extrapolates too high, so
      it expects less decline than the loss delivers and the error is on the safe side;
    * the last m observations are not significantly improving (the prewhitened line over them,
      one-sided t test at ``confidence`` against ``min_rate``).

    ``z`` is large because the test runs at every evaluation for every m. Winsorised as in
    :func:`slowdown_test` (``clip``; ``prepared`` likewise); the prewhitened residuals of the
    parabola are clipped at ``rclip`` robust sigmas (and made orthogonal to it again), so one
    spike or a heavy tail in the last rows, where the ramp weighs most, does not make a
    departure. O(n) for all m (suffix sums).

    Returns the first stopped candidate (fewest recent observations), else the one with the
    largest z (-inf where the last m are improving; the smaller of the two z when some
    candidate passes with ``phi``, the plain least-squares fit being computed only then); None
    when fewer than 2·``min_recent`` + 4 observations.
    """
    x, y = _xy(y, x)
    n = len(y)
    ms = slowdown_ladder(n - 4, min_recent, 1)
    if not ms or not (np.isfinite(y).all() and np.isfinite(x).all()):
        return None
    inputs = _stop_inputs(y, x, clip, prepared, phi)
    if inputs is None:
        return Departure(False, ms[-1], n, 0.0, 0.0, 0.0, 0.0, 0.0)
    (yw, xn, yscale, span), phi = inputs
    sign = 1.0 if mode == "min" else -1.0
    with np.errstate(all="ignore"):
        m = np.asarray(ms)
        try:
            zs, delta, se, slope_c, flat = _departure(yw, xn, phi, m, sign, rclip, min_rate * span / yscale,
                                                      confidence)
            zs = np.where(flat, zs, -np.inf)
            if phi > 0 and (zs > z).any():  # the plain least-squares check, only when it can matter
                zs = np.minimum(zs, _departure(yw, xn, 0.0, m, sign, rclip, 0.0, confidence, full=False)[0])
        except np.linalg.LinAlgError:  # x takes fewer than three distinct values: no parabola
            return Departure(False, ms[-1], n, 0.0, 0.0, 0.0, 0.0, phi)
        zs = np.where(np.isnan(zs), -np.inf, zs)
        stopped = zs > z
    i = int(np.argmax(stopped)) if stopped.any() else int(np.argmax(zs))
    scale = yscale / span
    return Departure(bool(stopped[i]), int(ms[i]), n, float(sign * delta[i] * scale), float(se[i] * scale),
                     float(zs[i]), float(-sign * slope_c[i] * scale), phi)


def _departure(yw: np.ndarray, xn: np.ndarray, phi: float, m: np.ndarray, sign: float, rclip: float,
               min_rate: float, confidence: float, full: bool = True):
    """:func:`departure_test`'s fit for one phi, on normalised data: per candidate m, z (worse
    positive), the departure and its se, the parabola's slope at the break (normalised units)
    and whether the last m are not significantly improving (z alone unless ``full``)."""
    n = len(yw)
    u = 1.0 - phi
    # Prewhitened rows t = 1..n-1 at index t - 1: columns u (1), v (x), a (x²); z (y).
    v = xn[1:] - phi * xn[:-1]
    sq = xn * xn
    a = sq[1:] - phi * sq[:-1]
    zw = yw[1:] - phi * yw[:-1]
    cols = np.stack([np.full(n - 1, u), v, a])
    ginv = np.linalg.inv(cols @ cols.T)
    beta0 = ginv @ (cols @ zw)
    r = zw - beta0 @ cols  # residuals of the parabola
    if rclip:
        s = MAD_SCALE * _mad(r)
        if s > 0:
            r = _clip(r, rclip * s)
            r -= (ginv @ (cols @ r)) @ cols  # orthogonal to the parabola again
    rss0 = float(r @ r)
    c = n - 1 - m  # last row before the break: rows c+1..n-1 after it, at index c..n-2
    # Suffix sums of 1, v, a, v·v, v·a, r, v·r (and z, v·z, z·z for the line after the break)
    # from index c and c + 1; the ramp's prewhitened column is w_t = v_t - u·x_c after the
    # break (0 before). Segment sums between the (ascending) starts, accumulated from the end.
    terms = [np.ones(n - 1), v, a, v * v, v * a, r, v * r]
    if full:
        terms += [zw, v * zw, zw * zw]
    starts, inverse = _departure_starts(n, tuple(m))
    seg = np.add.reduceat(np.stack(terms), starts, axis=1)
    suf = np.cumsum(seg[:, ::-1], axis=1)[:, ::-1]
    at = suf[:, inverse[0]]
    cnt, sv, sa, svv, sva, sr, svr = at[:7]
    xc = xn[c]
    vw = np.stack([u * (sv - cnt * u * xc), svv - u * xc * sv, sva - u * xc * sa])  # columns · w
    ww = svv - 2 * u * xc * sv + cnt * u * u * xc * xc
    wr = svr - u * xc * sr
    q = ww - np.einsum("ik,ij,jk->k", vw, ginv, vw)  # w's sum of squares beyond the parabola
    delta = wr / q
    # y is in [-1, 1]: a residual variance below 1e-18 is the rounding of an exact curve
    s2 = np.maximum(np.maximum(rss0 - delta * wr, 0.0) / max(n - 5, 1), 1e-18)
    se = np.sqrt(s2 / q)
    zs = np.where(q > 0, sign * delta / se, -np.inf)
    if not full:
        return zs, None, None, None, None
    beta = beta0[:, None] - (ginv @ vw) * delta  # the joint fit's parabola
    slope_c = beta[1] + 2 * beta[2] * xc
    flat = _not_improving(suf[:, inverse[1]], sign, min_rate, m - 3, confidence)  # first row after dropped
    return zs, delta, se, slope_c, flat


@functools.lru_cache(maxsize=256)
def _departure_starts(n: int, m: tuple) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The sorted distinct indices c and c + 1 (c = n - 1 - m) and where each is among them."""
    c = n - 1 - np.asarray(m)
    starts = np.unique(np.concatenate([c, c + 1]))
    inverse = (np.searchsorted(starts, c), np.searchsorted(starts, c + 1))
    for a in (starts, *inverse):
        a.flags.writeable = False
    return starts, inverse


def _not_improving(sums, sign, min_rate, dofs, confidence) -> np.ndarray:
    """Per candidate: the prewhitened line over the rows of ``sums`` (suffix sums of 1, v, a,
    v·v, v·a, r, v·r, z, v·z, z·z) is not significantly improving at ``confidence``."""
    cnt, sv, svv, sz, svz, szz = sums[0], sums[1], sums[3], sums[7], sums[8], sums[9]
    sxx = svv - sv * sv / cnt
    sxz = svz - sv * sz / cnt
    beta = sxz / sxx
    rss = np.maximum(szz - sz * sz / cnt - beta * sxz, 0.0)
    se = np.sqrt(rss / np.maximum(cnt - 2.0, 1.0) / sxx)
    tc, _ = _critical(dofs, confidence, 0.5)
    return (sxx > 0) & (-sign * beta - min_rate < tc * se)
