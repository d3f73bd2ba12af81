"""Reduce the learning rate when the monitored metric stops improving.

``method=trend`` (default). ``window``, ``history`` and ``every`` count rows of the log, so a
metric logged on some rows only (a validation loss every 25 steps) is handled like one logged
on every row: the policy keeps the observations of the last ``history`` rows (default 1500; at
least ``window``) and "the last window" is the observations of the last ``window`` rows
(default 100), at least ``min_window`` of them (default 20; at most ``window``). Every
``every`` rows, once ``window`` rows have passed since the start or the last reduction and the
last window holds its observations, three questions are asked; a "yes" to any means
lr <- max(lr · factor, min_lr), and the kept observations are dropped (data taken at the old
LR says nothing about the new one). With one observation per row, rows are observations. On
an epoch-level log (no step: Keras's CSVLogger), where 100 rows would be 100 epochs, the run is
decided as if ``window`` = ``epoch_window`` (10), ``min_window`` at most that, ``history`` =
``epoch_history`` (100) and ``every`` = 1, all in epochs.

1. No significant improvement over everything kept? (:func:`autolr.trend.improvement_test`:
   AR(1)-corrected one-sided slope test at ``confidence``, faster than ``min_improvement`` ·
   |level| over the observations tested.) Until the kept observations span ``history`` rows,
   a non-significant slope is not enough: the reduction needs the predictive power of the
   test over ``history`` rows to be below Phi(``FUTILITY_Z``) = 20%, i.e. the slope's t
   statistic below t_confidence·sqrt(tau) + z_0.2·sqrt(1 - tau), with tau = (r/history)^3 the
   share of the slope's information in r of ``history`` rows (at r = 100 of 1500: t below
   -0.81, where the rule before, conditional power at the rate seen so far, cut at t below
   0.03, i.e. whenever the first 100 rows did not happen to show the decline), and at least
   ``MIN_EFFECTIVE`` effectively independent observations, n·(1 - phi)/(1 + phi). A slow but
   steady decline is not cut after ``window`` rows just because ``window`` rows cannot see it.
2. Did the decline fade? (when ``slowdown``; :func:`autolr.trend.faded_test`) The last m
   observations (m = the last window's count, then about 19% apart) show no significant
   improvement although they had the power (1 - 1e-5) to see half the pace of all the kept
   observations before them (its lower 95% bound). A decay that died out gradually, and the
   shape that follows a warmup or a reduction (a short drop, then a long flat stretch), which
   test 1 takes for improvement for thousands of rows: the least-squares slope of everything
   kept still shows the old drop.
3. Did a clear decline stop? (when ``slowdown``; :func:`autolr.trend.slowdown_test`) The last
   k observations show no significant improvement although, at the rate the 3k before them
   had reached (a parabola's end slope, so a decelerating loss is not taken for a stopped
   one), they would have shown one with probability above 1 - 1e-5; k runs over 10, 12, 14,
   17, ... up to n/4, so a steep decline that stops is seen within a few dozen observations
   and a slow one within as many as it takes to see it at all.
4. Did the recent observations leave the curve the whole history was following? (when
   ``slowdown`` and ``departure``; :func:`autolr.trend.departure_test`) A parabola through
   all kept observations plus a change of slope before the last m (m = 10, 12, 14, ... up to
   n/2), fitted by generalised least squares (AR(1)-prewhitened, residuals clipped at 2.5
   robust sigmas): stopped when the last m show no significant improvement and the rate
   worsened at the break by more than ``DEPARTURE_Z`` = 4.5 standard errors (which hold the
   extrapolation's uncertainty), with the AR(1) phi and by plain least squares alike. Test 3
   estimates the continued curve from the 3k observations before a break and asks for the
   power to see it; this one estimates it from everything kept and compares levels, so it
   sees a stop sooner. By least squares a parabola through a decelerating (exponential,
   power-law) loss expects less decline than the loss delivers: conservative.

With ``history == window`` and ``slowdown=false`` (which also turns 4 off) this is the plain test over the last
``window`` rows (the method before 2 and 3 and the long history existed).

``cooldown`` counts observations after a reduction (as PyTorch counts epochs). Cost: one
decision at 1500 kept observations takes about 0.9 ms (0.6 ms with ``departure=false``, same
machine and load; tests 2-4 share one winsorised series and its phi), 42-114 µs per row at
``every=10`` on a metric logged every row (38-86 µs with ``departure=false``, same run; 16-31
µs at ``every=50``; ``benchmarks/bench_policy_cost.py``); the times and rows of the kept
observations are stored as arithmetic runs, so the state holds little more than the kept values.

``method=threshold``: PyTorch's ReduceLROnPlateau exactly: an observation is better when
below best · (1 - threshold) (rel) or best - threshold (abs), mirrored for max; after more
than ``patience`` observations without one, reduce; then wait ``cooldown`` observations.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, fields
from typing import Literal

from ..hookspecs import hookimpl
from ..policy import Note, Observation, Policy, State, check, default_mode
from .kept import count_after, drop_through, push, times as times_of

THRESHOLD_ONLY = ("patience", "threshold", "threshold_mode")
#: Before the history is full, a plateau needs at least this many effectively independent
#: observations, n·(1 - phi)/(1 + phi): with fewer, under strong autocorrelation, even the sign
#: of the slope is a coin toss.
MIN_EFFECTIVE = 20
#: Before the history is full, a reduction needs the predictive power of the full-history test
#: below Phi(FUTILITY_Z) = 20%: t < t_confidence·sqrt(tau) + FUTILITY_Z·sqrt(1 - tau), with
#: tau = (covered/history)^3 the information fraction of a slope (0 would be conditional power
#: at the rate seen so far, i.e. cut whenever that rate is not improving, wrong 28% of the time
#: for a decline of 0.2 sigma per 100 rows at the first test).
FUTILITY_Z = -0.8416212335729143
#: A decline "faded" when the last ``window`` observations show no significant improvement
#: although they had the power (1 - 1e-5) to see this fraction of the pace over all kept.
FADED_FRACTION = 0.5
#: ... with at least this many observations before the last window, and MIN_EFFECTIVE
#: effectively independent ones (the pace's standard error and t quantile carry the rest).
MIN_BEFORE = 10
TREND_ONLY = ("window", "min_window", "history", "slowdown", "departure", "confidence", "min_improvement", "every", "log",
              "epoch_window", "epoch_history")
#: The kept observations, emptied after every reduction: ``values``; ``runs`` their times and
#: rows (counted since the reduction) as arithmetic runs (:mod:`.kept`); ``rows`` the rows
#: seen, ``tested`` the rows at the last test.
_EMPTY_HISTORY = {"values": [], "runs": [], "rows": 0, "tested": 0}


@dataclass(frozen=True, kw_only=True)
class Plateau(Policy):
    """Reduce by `factor` when the metric stops improving (trend test, or PyTorch's threshold rule)."""

    name = "plateau"
    stateful = True

    method: Literal["trend", "threshold"] = "trend"
    metric: str | None = None
    mode: Literal["min", "max"] | None = None
    factor: float = 0.1
    cooldown: int = 0
    min_lr: float = 0.0
    eps: float = 1e-8
    # method=threshold
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    # method=trend
    window: int = 100
    min_window: int = 20
    history: int = 1500
    slowdown: bool = True
    departure: bool = True
    confidence: float = 0.95
    min_improvement: float = 0.0
    every: int = 10
    log: bool = False
    epoch_window: int = 10
    epoch_history: int = 100

    def __post_init__(self) -> None:
        check(0 < self.factor < 1, self.name, "factor must be in (0, 1)")
        check(self.patience >= 0, self.name, "patience must be >= 0")
        check(self.threshold >= 0, self.name, "threshold must be >= 0")
        check(self.cooldown >= 0, self.name, "cooldown must be >= 0")
        check(self.min_lr >= 0, self.name, "min_lr must be >= 0")
        check(self.eps >= 0, self.name, "eps must be >= 0")
        check(self.window >= 8, self.name, "window must be >= 8")
        check(self.min_window >= 8, self.name, "min_window must be >= 8")
        check(self.history >= 8, self.name, "history must be >= 8")
        check(0.5 <= self.confidence < 1, self.name, "confidence must be in [0.5, 1)")
        check(self.min_improvement >= 0, self.name, "min_improvement must be >= 0")
        check(self.every >= 1, self.name, "every must be >= 1")
        check(self.epoch_window >= 8, self.name, "epoch_window must be >= 8")
        check(self.epoch_history >= 8, self.name, "epoch_history must be >= 8")
        defaults = {f.name: f.default for f in fields(self)}
        other = THRESHOLD_ONLY if self.method == "trend" else TREND_ONLY
        for key in other:
            check(getattr(self, key) == defaults[key], self.name,
                  f"{key} applies to method={'threshold' if self.method == 'trend' else 'trend'}, not method={self.method}")

    def init(self, base_lr: float = 1.0) -> State:
        if self.method == "trend":
            return {"factor": 1.0, **_EMPTY_HISTORY, "cooldown_counter": 0, "seen": 0}
        return {"factor": 1.0, "best": None, "num_bad": 0, "cooldown_counter": 0, "seen": 0}

    def value(self, state: State) -> float:
        return state["factor"]

    def monitor_changed(self, state: State) -> State:
        if self.metric is not None:
            return state  # this policy watches a metric of its own
        if self.method == "trend":
            return dict(state, **_EMPTY_HISTORY)
        return dict(state, best=None, num_bad=0)

    def update(self, state: State, obs: Observation) -> tuple[State, Note | None]:
        if self.method == "trend" and "runs" not in state:
            # saved by an earlier version (a list of times, counts in observations): keep the
            # factor and counters, restart the statistics
            state = {**{k: v for k, v in state.items() if k not in ("times", "since")}, **_EMPTY_HISTORY}
        metric = self.metric or obs.monitor
        if metric is None or metric not in obs.metrics:
            if self.method == "trend":  # windows count rows: a sparse metric still ages
                return dict(state, rows=state["rows"] + 1), None
            return state, None  # this row lacks the metric: wait for one that has it
        current = float(obs.metrics[metric])
        mode = self.mode or default_mode(metric)
        if self.method == "trend":
            sizes = self.in_epochs if obs.per_epoch("auto") else self
            return sizes._update_trend(state, obs, metric, current, mode)
        return self._update_threshold(state, obs, metric, current, mode)

    @functools.cached_property
    def in_epochs(self) -> "Plateau":
        """This policy with the row counts of an epoch-level log: ``epoch_window``,
        ``epoch_history``, a test every epoch."""
        return dataclasses.replace(self, window=self.epoch_window, min_window=min(self.min_window, self.epoch_window),
                                   history=self.epoch_history, every=1)

    def _reduce(self, state: State, lr: float) -> float | None:
        """The new factor after a reduction, or None when the change would be below eps or the
        factor would no longer be a positive number (``eps=0``: the LR underflows to 0)."""
        target = max(lr * self.factor, self.min_lr)
        if lr - target <= self.eps:
            return None
        factor = state["factor"] * (target / lr)
        return factor if 0 < factor < math.inf else None

    # ---- method=trend ------------------------------------------------------------------
    @property
    def kept(self) -> int:
        """Rows kept and tested: ``history``, at least ``window``."""
        return max(self.history, self.window)

    def recent_count(self, runs: list, rows: int) -> int:
        """Observations that make up "the last window": those of the last ``window`` rows, at
        least ``min_window`` (at most ``window``)."""
        return min(max(count_after(runs, rows - self.window), self.min_window), self.window)

    def trend_decision(self, values, times, mode: str, *, recent: int | None = None,
                       covered: int | None = None) -> tuple[str, object, float] | None:
        """Why the kept ``values`` (at ``times``) call for a reduction, or None.

        ``recent`` is the number of observations in the last window (default ``window``) and
        ``covered`` the rows since the first kept observation (default: one per observation).
        Returns ("trend", :class:`autolr.trend.TrendTest`, the p-value threshold), ("faded" or
        "slowdown", :class:`autolr.trend.Slowdown`, miss) or ("departure",
        :class:`autolr.trend.Departure`, its z threshold). Pure: the policy calls it every
        ``every`` rows once ``window`` rows and ``recent`` observations are kept.
        """
        import numpy as np

        from .. import trend  # numpy/scipy only when this method is used

        y = np.asarray(values, dtype=float)
        x = np.asarray(times, dtype=float)
        if self.log:
            y = np.log(y)
        n = len(y)
        recent = self.window if recent is None else recent
        covered = n if covered is None else covered
        min_rate = 0.0
        if self.min_improvement:
            level = abs(float(np.partition(y, n // 2)[n // 2])) or 1.0
            min_rate = self.min_improvement * level / max(float(x[-1] - x[0]), 1e-12)
        result = trend.improvement_test(y, x, mode=mode, confidence=self.confidence, min_rate=min_rate)
        alpha = 1 - self.confidence
        if covered < self.kept:
            if n * (1 - result.phi) < MIN_EFFECTIVE * (1 + result.phi):
                alpha = math.inf  # too few effectively independent observations to stop early
            else:
                # Predictive power: would the rate seen so far be significant over the full history?
                special = trend.special  # scipy.special's ufuncs (see trend._load_special)

                dof = n - 3
                t_c = float(special.stdtrit(dof, self.confidence))
                tau = (covered / self.kept) ** 3
                bar = t_c * math.sqrt(tau) + FUTILITY_Z * math.sqrt(max(1.0 - tau, 0.0))
                alpha = float(special.stdtr(dof, -bar))
                if not result.t < bar:
                    alpha = math.inf
        if result.p >= alpha:
            return "trend", result, alpha
        if not self.slowdown:
            return None
        prepared = trend._normalised(y, x, 3.0)  # winsorised once for the three tests
        faded = trend.faded_test(y, x, mode=mode, min_rate=min_rate, confidence=self.confidence,
                                 min_recent=recent, min_before=MIN_BEFORE, min_effective=MIN_BEFORE,
                                 fraction=FADED_FRACTION,
                                 prepared=prepared)
        if faded is not None and faded.stopped:
            return "faded", faded, trend.SLOWDOWN_MISS
        phi = trend.block_ar1(prepared[0]) if prepared is not None else None  # slowdown_test's default
        slow = trend.slowdown_test(y, x, mode=mode, confidence=self.confidence, min_rate=min_rate,
                                   phi=phi, prepared=prepared)
        if slow is not None and slow.stopped:
            return "slowdown", slow, trend.SLOWDOWN_MISS
        if self.departure:
            left = trend.departure_test(y, x, mode=mode, phi=phi, min_rate=min_rate, confidence=self.confidence,
                                        prepared=prepared)
            if left is not None and left.stopped:
                return "departure", left, trend.DEPARTURE_Z
        return None

    def _update_trend(self, state, obs, metric, current, mode):
        rows = state["rows"] + 1
        if not math.isfinite(current) or (self.log and current <= 0):
            return dict(state, rows=rows, seen=state["seen"] + 1), None
        t = obs.time("auto")
        t = obs.row if t is None else t
        runs, drop = drop_through(state["runs"], rows - self.kept)  # older than the kept rows
        runs = push(runs, t, rows)
        values = state["values"][drop:]  # a copy: states stay immutable
        values.append(current)
        new = dict(state, seen=state["seen"] + 1, rows=rows, values=values, runs=runs)
        if new["cooldown_counter"] > 0:
            new["cooldown_counter"] -= 1
            return new, None
        recent = self.recent_count(runs, rows)
        if rows < self.window or len(values) < recent or rows - new["tested"] < self.every:
            return new, None
        new["tested"] = rows
        times = times_of(runs)
        first_row = runs[0][2] + runs[0][3] * runs[0][4]
        verdict = self.trend_decision(values, times, mode, recent=recent, covered=rows - first_row + 1)
        if verdict is None:
            return new, None
        factor = self._reduce(new, obs.lr)
        if factor is None:
            return new, None
        from .. import trend

        values = [math.log(v) for v in values] if self.log else values
        gain = trend.forecast_gain(values, times, mode=mode)
        new.update(factor=factor, **_EMPTY_HISTORY, cooldown_counter=self.cooldown)
        kind, result, threshold = verdict
        forecast = f", forecast gain {gain:.3g} over the window" if gain is not None else ""
        if kind == "faded":
            reason = (
                f"{metric} stopped improving: over the last {result.recent} observations the rate is "
                f"{result.after:.3g}/unit (se {result.after_se:.3g}), not significant at {self.confidence:.0%}, "
                f"though they would have seen {FADED_FRACTION:g} x the pace {result.before:.3g}/unit "
                f"(se {result.before_se:.3g}) of the {result.n - result.recent} before them with probability "
                f"> {1 - threshold:.6g} (AR(1) phi={result.phi:.2f}"
                f"{forecast}): lr x{factor / state['factor']:.6g}"
            )
        elif kind == "slowdown":
            reason = (
                f"{metric} stopped improving: over the last {result.recent} observations the rate is "
                f"{result.after:.3g}/unit (se {result.after_se:.3g}), not significant at {self.confidence:.0%}, "
                f"after {result.before:.3g}/unit (se {result.before_se:.3g}) over the {result.n - result.recent} "
                f"before, at which a continuing decline would have shown with probability > {1 - threshold:.6g} "
                f"(AR(1) phi={result.phi:.2f}"
                f"{forecast}): lr x{factor / state['factor']:.6g}"
            )
        elif kind == "departure":
            reason = (
                f"{metric} stopped improving: over the last {result.recent} observations it left the curve of "
                f"the {result.n - result.recent} before them (a parabola through all {result.n}, at a rate of "
                f"{result.before:.3g}/unit at the break): the rate changed by {result.departure:.3g}/unit "
                f"(se {result.se:.3g}, z = {result.z:.2f} > {threshold:g}; AR(1) phi={result.phi:.2f}"
                f"{forecast}): lr x{factor / state['factor']:.6g}"
            )
        else:
            reason = (
                f"{metric} shows no significant improvement over the last {result.n} observations "
                f"(slope {result.slope:.3g}/unit, {self.confidence:.0%} CI [{result.lo:.3g}, {result.hi:.3g}], "
                f"p={result.p:.3g} >= {threshold:.3g}, AR(1) phi={result.phi:.2f}{forecast}): "
                f"lr x{factor / state['factor']:.6g}"
            )
        note = {"reason": reason, "method": "trend", "test": kind, "metric": metric, "value": current,
                "window": result.n, "forecast_gain": gain, **result.as_dict()}
        return new, note

    # ---- method=threshold (PyTorch's rule) ------------------------------------------------
    def _update_threshold(self, state, obs, metric, current, mode):
        new = dict(state, seen=state["seen"] + 1)
        if self._is_better(current, state["best"], mode):
            new["best"], new["num_bad"] = current, 0
        else:
            new["num_bad"] += 1
        if new["cooldown_counter"] > 0:
            new["cooldown_counter"] -= 1
            new["num_bad"] = 0
        if new["num_bad"] <= self.patience:
            return new, None
        bad = new["num_bad"]
        new["cooldown_counter"], new["num_bad"] = self.cooldown, 0
        factor = self._reduce(new, obs.lr)
        if factor is None:
            return new, None
        new["factor"] = factor
        best = new["best"]
        note = {
            "reason": (
                f"{metric} {current:.6g} has not improved on best "
                f"{'none' if best is None else format(best, '.6g')} "
                f"({self.threshold_mode} threshold {self.threshold:g}, mode {mode}) "
                f"for {bad} observations > patience {self.patience}: lr x{factor / state['factor']:.6g}"
            ),
            "method": "threshold", "metric": metric, "value": current, "best": best,
            "num_bad": bad, "patience": self.patience,
        }
        return new, note

    def _is_better(self, current: float, best: float | None, mode: str) -> bool:
        if best is None:  # PyTorch starts best at +inf (min) / -inf (max)
            best = math.inf if mode == "min" else -math.inf
        if mode == "min":
            if self.threshold_mode == "rel":
                return current < best * (1.0 - self.threshold)
            return current < best - self.threshold
        if self.threshold_mode == "rel":
            return current > best * (self.threshold + 1.0)
        return current > best + self.threshold


@hookimpl
def register_policies(register) -> None:
    register(Plateau)
