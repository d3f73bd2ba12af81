"""``auto``: the adaptive default policy.

factor = warmup(t) · decay · guard · boost, where

- warmup(t) = warmup_start + (1 - warmup_start) · min(t, warmup) / warmup, as ``warmup``,
  applied row by row; the guard watches the warmup too, and a guard event during it ends the
  warmup at the factor reached (an LR range test: the LR has climbed past what the model
  takes), times ``guard_factor``;
- decay ← decay · factor when the monitored metric shows no significant improvement over the
  window (:func:`autolr.trend.improvement_test`, tested every ``every`` rows) and the median of
  the window's later half is no better than that of its earlier half; never below
  ``min_factor``. The window holds the last ``window`` observations of the metric, or, for a
  metric logged on fewer rows (a validation loss every N steps), the observations of the last
  ``window`` rows and at least ``min_window`` of them. On an epoch-level log (no step: Keras's
  CSVLogger) the counter is the epoch: the warmup is the first epoch (the LR can only change
  when a row arrives) and the window is ``epoch_window`` epochs (default 10), tested every
  epoch; epochs logged as progress (fractional: many rows an epoch) warm up over the first
  epoch too, with the window in rows;
- guard ← guard · guard_factor at once on a non-finite value; on a jump of ``spike_sigmas``
  robust sigmas that also doubles the largest value of the guard window (a spike of the size
  the window already holds is noise, not divergence; sigmas and standard errors are at least
  :data:`RESOLUTION` = 1e-4 of the largest block median of the run, so a loss printed as 0.0000
  that reads 0.0001 is not a jump); on a level shift: the median of the last
  ``every`` values doubles the lowest such median in the window, by ``spike_sigmas`` standard
  errors of such a median, autocorrelation included (autocorrelated noise wanders, so its
  block medians vary far more than white noise of the same row-to-row jitter): the spread of
  the steps between the run's past block medians (:func:`_step_se`), or early in a run an
  AR(1) model of the window (:func:`_median_se`); or on a sustained rise of the monitored
  metric (p < ``rise_p``, and more than ``rise`` · |level| over the window both by the fitted
  slope and from the median of its earlier half to that of its later half: a smoothed loss, a
  running mean over the epoch or a moving average, makes any drift significant, and an
  epoch's restart bump is not a divergence; tested every ``every`` rows, thousands of times
  in a long run, hence the small default). Then
  ``guard_cooldown`` observations in which only an escalation fires again (a non-finite value,
  or double the value that fired); never below ``min_factor`` together with decay;
- boost ← boost · increase_factor (at most ``max_boost``) when ``increase`` is on and the
  improvement is strongly significant (p < ``increase_p``) with no guard event in the window.

The guard watches ``guard_metric`` if given, else the run's per-step training loss: the first
name of :data:`TRAINING_LOSSES` (``loss``, ``train_loss``, ``train/loss``, Lightning's
``train_loss_step``, ...) a row carries, kept from then on, so that rows holding only a
validation loss (Lightning's validation rows, Hugging Face's eval entries) never enter its
window; until one is seen, the monitored metric. After any change the decision window starts
empty.
"""
from __future__ import annotations

import importlib
import math
import operator
import statistics
import sys
from dataclasses import dataclass
from typing import Literal

from ..hookspecs import hookimpl
from ..policy import TRAINING_LOSSES, Note, Observation, Policy, State, check, default_mode
from . import kept


#: The decision window, emptied after every change: data taken at the old LR says nothing about the new.
#: ``runs`` holds each observation's time and row count as arithmetic runs (:mod:`.kept`), ``rows``
#: the rows seen, ``tested`` the rows at the last test.
_EMPTY_WINDOW = {"values": [], "runs": [], "since": 0, "rows": 0, "tested": 0}


#: The guard's statistics, restarted when it moves from the monitored metric to a training loss.
_EMPTY_GUARD = {"guard_values": [], "guard_ref": None, "levels": [], "guard_steps": []}
#: The guard's robust sigma and standard error are at least this fraction of the largest block
#: median the run has shown (``guard_scale``): a loss printed with 4 decimals that reads 0.0000
#: for a while and then 0.0001 is not a divergence, though no spread of exact zeros can say so.
RESOLUTION = 1e-4


def _slide(items: list, item, limit: int) -> list:
    """A new list: ``items`` with ``item`` appended, keeping the last ``limit`` (one copy)."""
    keep = len(items) + 1 - limit
    out = items[keep:] if keep > 0 else items[:]
    out.append(item)
    return out


def _trend():
    """``autolr.trend``, imported on first use (it loads scipy); one dict lookup after that."""
    return sys.modules.get("autolr.trend") or importlib.import_module("autolr.trend")


@dataclass(frozen=True, kw_only=True)
class Auto(Policy):
    """Adaptive default: warmup, trend-based decay on stalls, divergence guard, optional increases."""

    name = "auto"
    # Fed on every row, its own warmup included: the warmup ramps per row and the guard is live
    # from the first one. Its decisions still use post-warmup data only, and ``holds`` keeps other
    # stateful policies of the chain waiting until the warmup is over.
    stateful = False

    metric: str | None = None
    mode: Literal["min", "max"] | None = None
    unit: Literal["auto", "step", "epoch", "row"] = "auto"
    warmup: int = 100
    warmup_start: float = 0.1
    window: int = 100
    min_window: int = 20
    every: int = 10
    epoch_window: int = 10
    confidence: float = 0.95
    factor: float = 0.5
    min_factor: float = 1e-3
    guard_metric: str | None = None
    guard_factor: float = 0.5
    guard_cooldown: int = 50
    spike_sigmas: float = 8.0
    rise: float = 0.1
    rise_p: float = 1e-6
    increase: bool = False
    increase_factor: float = 1.25
    increase_p: float = 1e-4
    max_boost: float = 2.0

    def __post_init__(self) -> None:
        check(self.warmup >= 0, self.name, "warmup must be >= 0")
        check(0 < self.warmup_start <= 1, self.name, "warmup_start must be in (0, 1]")
        check(self.window >= 8, self.name, "window must be >= 8")
        check(self.min_window >= 8, self.name, "min_window must be >= 8")
        check(self.every >= 1, self.name, "every must be >= 1")
        check(self.epoch_window >= 8, self.name, "epoch_window must be >= 8")
        check(0.5 <= self.confidence < 1, self.name, "confidence must be in [0.5, 1)")
        check(0 < self.factor < 1, self.name, "factor must be in (0, 1)")
        check(0 < self.min_factor <= 1, self.name, "min_factor must be in (0, 1]")
        check(0 < self.guard_factor < 1, self.name, "guard_factor must be in (0, 1)")
        check(self.guard_cooldown >= 0, self.name, "guard_cooldown must be >= 0")
        check(self.spike_sigmas > 0, self.name, "spike_sigmas must be > 0")
        check(self.rise > 0, self.name, "rise must be > 0")
        check(0 < self.rise_p < 1, self.name, "rise_p must be in (0, 1)")
        check(self.increase_factor > 1, self.name, "increase_factor must be > 1")
        check(0 < self.increase_p < 1, self.name, "increase_p must be in (0, 1)")
        check(self.max_boost >= 1, self.name, "max_boost must be >= 1")

    # ---- state -------------------------------------------------------------------------
    def init(self, base_lr: float = 1.0) -> State:
        return {"t": None, "decay": 1.0, "guard": 1.0, "boost": 1.0, **_EMPTY_WINDOW, **_EMPTY_GUARD,
                "guard_on": None, "guard_scale": 0.0, "cooldown": 0, "trigger": None, "quiet": 0,
                "seen": 0, "warm": self.warmup == 0, "ramp_done": self.warmup == 0}

    def _warmup_factor(self, state: State, t: float | None) -> float:
        """warmup_start + (1 − warmup_start) · min(t, L) / L over the warmup's length L in the
        run's unit (``ramp_len`` in the state when it is not ``warmup``: one epoch)."""
        length = state.get("ramp_len", self.warmup)
        if length == 0:
            return 1.0
        return self.warmup_start + (1.0 - self.warmup_start) * min(0.0 if t is None else t, length) / length

    def value(self, state: State) -> float:
        t = state["t"]
        w = 1.0 if state.get("ramp_done") else self._warmup_factor(state, None if t is None else t + 1)
        return w * state["decay"] * state["guard"] * state["boost"]

    def ahead(self, state: State, t: int, unit: str) -> float:
        """During a warmup counted in steps: its factor at step ``t`` times the others."""
        if state["ramp_done"] or (unit if self.unit == "auto" else self.unit) != "step":
            return self.value(state)
        last = state["t"]
        w = self._warmup_factor(state, t if last is None else max(t, last + 1))
        return w * state["decay"] * state["guard"] * state["boost"]

    def restart_time(self, state: State) -> State:
        """The warmup's time starts over (it is read from the next row); a guard event that
        ended it early keeps it ended."""
        ramp_done = self.warmup == 0 or (state["ramp_done"] and state["guard"] < 1.0)
        return dict(state, t=None, ramp_done=ramp_done, warm=ramp_done and state["warm"])

    def holds(self, obs: Observation) -> bool:
        c = obs.counter(self.unit)  # where the row was trained (see Warmup.holds)
        return self.warmup > 0 and c is not None and c < self._warmup_length(obs)

    def _per_epoch(self, obs: Observation) -> bool:
        """Whether this run's rows are epochs (a log without steps: Keras's CSVLogger)."""
        return obs.per_epoch(self.unit)

    def _warmup_length(self, obs: Observation) -> int:
        """``warmup`` in the run's unit; counted in epochs, the warmup is the first epoch (on a
        log of one row an epoch the daemon can change the LR only once an epoch)."""
        in_epochs = (obs.unit if self.unit == "auto" else self.unit) == "epoch"
        return 1 if self.warmup > 0 and in_epochs else self.warmup

    def _sizes(self, per_epoch: bool) -> tuple[int, int, int]:
        """(window, min_window, every) in rows: ``epoch_window`` epochs tested every epoch on
        an epoch-level log (``window`` = 100 epochs would outlast most trainings)."""
        if per_epoch:
            return self.epoch_window, min(self.min_window, self.epoch_window), 1
        return self.window, self.min_window, self.every

    def monitor_changed(self, state: State) -> State:
        return state if self.metric else dict(state, **_EMPTY_WINDOW)

    # ---- update ------------------------------------------------------------------------
    def update(self, state: State, obs: Observation) -> tuple[State, Note | None]:
        new = dict(state)
        if "at" in new:  # a state saved before the window's times and rows became runs
            n, times, at = len(new["values"]), new.pop("times"), new.pop("at")
            new["runs"] = kept.from_lists(times[max(len(times) - n, 0):], at[max(len(at) - n, 0):])
        # The warmup's factor that produced this row (set after the row before); 1 once it is done.
        ramp = 1.0 if new["ramp_done"] else self._warmup_factor(new, None if new["t"] is None else new["t"] + 1)
        t = obs.time(self.unit)
        if t is not None and (new["t"] is None or t > new["t"]):
            new["t"] = t
        if not new["ramp_done"]:
            warmup = self._warmup_length(obs)
            if warmup != new.get("ramp_len", self.warmup):
                new["ramp_len"] = warmup
            if t is not None and t + 1 >= warmup:
                new["ramp_done"] = True
        metric = self.metric or obs.monitor
        guard_metric = self.guard_metric or new.get("guard_on") or self._training_loss(new, obs.metrics) or metric
        note = None
        if guard_metric in obs.metrics:
            new, note = self._guard(new, obs, guard_metric, float(obs.metrics[guard_metric]), ramp)
        if note is not None or metric is None:
            return new, note
        if not new["warm"]:
            c = obs.counter(self.unit)
            if c is None or c < self._warmup_length(obs):  # trained during the warmup
                return new, None
            new.update(warm=True, **_EMPTY_WINDOW)  # post-warmup data only
        new["rows"] += 1
        if metric not in obs.metrics:
            return new, None
        current = float(obs.metrics[metric])
        if not math.isfinite(current):
            return new, None
        new["seen"] += 1
        new["since"] += 1
        time = t if t is not None else obs.row
        window, min_window, every = self._sizes(self._per_epoch(obs))
        values = new["values"]
        new["runs"] = runs = kept.slide(new["runs"], time, new["rows"], len(values) + 1 - window)
        new["values"] = _slide(values, current, window)
        # The window: the last `window` observations or, for a metric logged on fewer rows (a
        # validation loss every N steps), those of the last `window` rows, and at least
        # `min_window` of them. Tested every `every` rows.
        recent = kept.count_after(runs, new["rows"] - window)
        n = min(max(recent, min_window), window)  # min_window above window: window
        if len(new["values"]) < n or new["rows"] < window or new["rows"] - new["tested"] < every:
            return new, None
        new["tested"] = new["rows"]
        return self._decide(new, obs, metric, self.mode or default_mode(metric), n)

    @staticmethod
    def _training_loss(state: State, metrics) -> str | None:
        """The first of TRAINING_LOSSES in this row, adopted for the rest of the run (``state``,
        a copy, records it); the guard's statistics restart if they watched the monitor."""
        for name in TRAINING_LOSSES:
            if name in metrics:
                if state["guard_values"]:
                    state.update(_EMPTY_GUARD)
                state["guard_on"] = name
                return name
        return None

    def _guard(self, state: State, obs: Observation, metric: str, value: float,
               ramp: float = 1.0) -> tuple[State, Note | None]:
        """O(window) per row at most: robust (median, sigma, extreme) refreshed every ``every`` values."""
        mode = self.mode or default_mode(metric)
        worse = operator.gt if mode == "min" else operator.lt
        state["quiet"] += 1
        why = None
        if state["cooldown"] > 0:
            state["cooldown"] -= 1
            trigger = state["trigger"]
            if trigger is not None and not math.isfinite(value):
                why = f"non-finite value {value} during the cooldown"
            elif trigger is not None and worse(value, 2.0 * trigger if mode == "min" else trigger / 2.0):
                why = f"escalates to {value:.6g} during the cooldown (fired at {trigger:.6g})"
        else:
            ref = state["guard_ref"]  # [median, sigma, extreme]
            why = _trend().divergent(value, ref, mode=mode, k=self.spike_sigmas)
            if why is not None and math.isfinite(value) and ref is not None:
                extreme = ref[2]  # the worst value of the window: a jump must double it
                if not worse(value, 2.0 * extreme if mode == "min" else extreme / 2.0):
                    why = None
            if why is None and math.isfinite(value):
                why = self._level_shift(state, value, mode, worse)
        if why is None:
            if math.isfinite(value):
                window = _slide(state["guard_values"], value, self.window)
                state["guard_values"] = window
                if state["guard_ref"] is None or state["quiet"] % self.every == 0:
                    ref = _trend().robust_reference(window)
                    state["guard_ref"] = [ref[0], max(ref[1], self._resolution(state)),
                                          max(window) if mode == "min" else min(window)] if ref else None
                if len(window) >= self.every and state["quiet"] % self.every == 0:
                    level = statistics.median(window[-self.every:])
                    state["guard_scale"] = max(state.get("guard_scale", 0.0), abs(level))
                    levels = state["levels"] = _slide(state["levels"], level, max(self.window // self.every, 1))
                    if len(levels) > _LAG:  # the step between block medians _LAG blocks apart
                        steps = state.get("guard_steps") or []
                        state["guard_steps"] = _slide(steps, level - levels[-1 - _LAG], self._history())
            return state, None
        return self._fire(state, metric, value, why, ramp)

    def _history(self) -> int:
        """Steps between block medians kept for the level-shift standard error: ``10 · window`` rows."""
        return max(10 * self.window // self.every, 1)

    def _level_shift(self, state: State, value: float, mode: str, worse) -> str | None:
        """The median of the last ``every`` values against the best such median of the window."""
        levels = state["levels"]
        if not levels or state["guard_ref"] is None:
            return None
        recent = state["guard_values"][-(self.every - 1):] + [value] if self.every > 1 else [value]
        if len(recent) < self.every:
            return None
        best = min(levels) if mode == "min" else max(levels)
        bound = 2.0 * best if mode == "min" else best / 2.0
        # The median is no worse than the worst value: most rows end here without sorting.
        if not worse(max(recent) if mode == "min" else min(recent), bound):
            return None
        level = statistics.median(recent)
        if not worse(level, bound):
            return None
        se, how = self._level_se(state)  # only now, a doubling seen: the O(window) part
        se = max(se, self._resolution(state))
        excess = level - best if mode == "min" else best - level
        if excess > self.spike_sigmas * se:
            return (f"level shift: median of the last {self.every} values {level:.6g} vs the window's best "
                    f"{best:.6g} ({excess / se if se > 0 else math.inf:.0f} standard errors, {how})")
        return None

    @staticmethod
    def _resolution(state: State) -> float:
        """The floor of the guard's sigma and standard error: RESOLUTION of the run's scale."""
        return RESOLUTION * state.get("guard_scale", 0.0)

    def _level_se(self, state: State) -> tuple[float, str]:
        """The standard error of a median of ``every`` values, the noise's autocorrelation in it,
        and how it was found. From the run's past block medians once it has enough of them, at
        least a window old (the shift under test must not widen its own yardstick); until then
        from the window's values under an AR(1) model."""
        steps = state.get("guard_steps") or []
        past = steps[:max(len(steps) - self.window // self.every, 0)]
        if len(past) >= _MIN_STEPS:
            white = 1.2533 * _trend().noise_level(state["guard_values"]) / math.sqrt(self.every)  # the former SE
            return max(_step_se(past), white), f"from {len(past)} steps between past medians"
        se, phi = _median_se(state["guard_values"], self.every)
        return se, f"AR(1) phi={phi:.2f} of the window"

    def _fire(self, state: State, metric: str, value: float, why: str,
              w: float = 1.0) -> tuple[State, Note | None]:
        """Cut by ``guard_factor``; during the warmup, stop it at ``w``, the warmup's factor that
        produced this row (set after the row before), and cut from there."""
        cut = self.guard_factor
        ramp = ""
        if not state["ramp_done"]:
            cut *= w
            ramp = f" (warmup ended at factor {w:.3g})"
            state["ramp_done"] = True
        floor = self.min_factor / (state["decay"] * state["guard"])
        cut = max(cut, min(floor, 1.0))
        # The guard window and its levels are kept: until they slide past, a loss that does not come
        # back within twice its best level fires again once the cooldown is over.
        state.update(cooldown=self.guard_cooldown, quiet=0, **_EMPTY_WINDOW,
                     trigger=value if math.isfinite(value) else None)
        if cut >= 1.0:
            return state, None  # already at min_factor
        state["guard"] *= cut
        return state, {
            "reason": f"divergence guard: {metric} {why}: lr x{cut:.6g} at once{ramp}, then "
                      f"{self.guard_cooldown} observations of cooldown",
            "kind": "guard", "metric": metric, "value": value if math.isfinite(value) else str(value),
            "reference": state["guard_ref"],
        }

    def _decide(self, state: State, obs: Observation, metric: str, mode: str, n: int) -> tuple[State, Note | None]:
        trend = _trend()
        values, times = state["values"][-n:], kept.times_list(state["runs"], n)
        half = len(values) // 2
        early, late = statistics.median(values[:half]), statistics.median(values[-half:])
        better = late < early if mode == "min" else late > early
        if better and not self.increase:
            # The later half is better than the earlier one: neither a stall nor a slow
            # divergence (both need it no better), and no increase to test for. The test, the
            # costly part of a row, is skipped: most rows of a run that is still improving.
            return state, None
        falling, rising = trend.improvement_tests(values, times, confidence=self.confidence)  # one fit
        result, worse = (falling, rising) if mode == "min" else (rising, falling)
        sign = 1.0 if mode == "min" else -1.0
        if sign * result.slope > 0 and state["cooldown"] == 0 and not better:  # heading the wrong way: diverging?
            level = abs(sorted(values)[len(values) // 2]) or 1.0
            rise = abs(worse.slope) * (times[-1] - times[0])
            shift = abs(late - early)  # the later half's median above the earlier's (not better)
            if worse.p < self.rise_p and rise > self.rise * level and shift > self.rise * level:
                # Significantly getting worse over a whole window: a slow divergence.
                state.update(guard=state["guard"] * self.guard_factor, cooldown=self.guard_cooldown, quiet=0,
                             **_EMPTY_WINDOW, trigger=None)
                return state, {
                    "reason": f"divergence guard: {metric} rises significantly over {worse.n} observations "
                              f"(slope {worse.slope:.3g}, p={worse.p:.2g}, +{rise / level:.0%} of its level): "
                              f"lr x{self.guard_factor:g}",
                    "kind": "guard", "metric": metric, **worse.as_dict(),
                }
        if result.p >= 1 - self.confidence and better:
            # Not significant, yet the later half of the window is better than the earlier one. On
            # few observations the test cannot tell the knee of a saturating curve from AR(1)
            # noise (it fits the curvature as autocorrelation): only call it a stall when this
            # direct, autocorrelation-free comparison agrees.
            return state, None
        if result.p >= 1 - self.confidence:
            floor = self.min_factor / state["decay"]
            step = max(self.factor, min(floor, 1.0))
            if step >= 1.0:
                return state, None  # already at min_factor
            gain = trend.forecast_gain(values, times, mode=mode)
            state.update(decay=state["decay"] * step, **_EMPTY_WINDOW)
            return state, {
                "reason": (
                    f"{metric} stalled: no significant improvement over {result.n} observations "
                    f"(slope {result.slope:.3g}/unit, {self.confidence:.0%} CI [{result.lo:.3g}, {result.hi:.3g}], "
                    f"p={result.p:.3g}, AR(1) phi={result.phi:.2f}"
                    + (f", forecast gain {gain:.3g}" if gain is not None else "")
                    + f"; median of the later half {late:.6g} vs the earlier {early:.6g}): lr x{step:.6g}"
                ),
                "kind": "decay", "metric": metric, "forecast_gain": gain, **result.as_dict(),
            }
        if (self.increase and result.p < self.increase_p and state["quiet"] >= 2 * self.window
                and state["boost"] * self.increase_factor <= self.max_boost):
            state.update(boost=state["boost"] * self.increase_factor, **_EMPTY_WINDOW)
            return state, {
                "reason": f"{metric} improves steadily (p={result.p:.2g} < {self.increase_p:g} over "
                          f"{result.n} observations, slope {result.slope:.3g}): lr x{self.increase_factor:g}",
                "kind": "increase", "metric": metric, **result.as_dict(),
            }
        return state, None


def _median_se(window, m: int) -> tuple[float, float]:
    """(standard error of the median of ``m`` consecutive values, AR(1) phi), from ``window``.

    The noise is taken as AR(1) around a smooth trend, and both its scale and phi come from
    first differences d_t, so that a trend (the fast fall of an early training loss) does not
    count as noise: sigma_d = 1.4826 · MAD(d) / sqrt(2) of the window (the former
    :func:`autolr.trend.noise_level`; sigma · sqrt(1 - phi) for AR(1) noise of marginal
    deviation sigma) and phi = 1 + 2·rho_d, rho_d the lag-1 autocorrelation of the differences
    (-(1 - phi) / 2 for AR(1)) with Kendall's small-sample correction (1 + 3·rho_d) / n,
    clipped to [0, 0.98] (the differences winsorised at 3 robust sigmas). The
    variance of a mean of m consecutive values is sigma² · f / m with
    f = 1 + 2 · sum_{k<m} (1 - k/m) · phi^k, and a median's is about 1.2533² times that, so

        SE = 1.2533 · sigma_d · sqrt(f / (m · (1 - phi))),

    the former white-noise 1.2533 · sigma_d / sqrt(m) at phi = 0, x2.3 at phi = 0.5 and x8.5
    at phi = 0.9 (m = 10). The last ``m - 1`` values of ``window`` (the block being tested)
    are left out when at least 8 remain. O(len(window) + m).

    About 90 differences pin phi near 0.9 down to +-0.2 only, and near 1 the standard error is
    steep in phi, so this is the early-run estimate: :meth:`Auto._level_shift` switches to
    :func:`_step_se` once the run has the history for it.
    """
    import numpy as np  # loaded with autolr.trend already; imported here to keep this module light

    y = np.asarray(window, dtype=float)
    if len(y) - (m - 1) >= 8:
        y = y[:len(y) - (m - 1)]
    n = len(y) - 1  # differences
    if n < 2:
        return 0.0, 0.0
    d = np.diff(y)
    d = d - float(np.median(d))  # a linear trend is a constant difference
    s = float(np.median(np.abs(d)))
    if not s > 0:
        return 0.0, 0.0
    sigma_d = 1.4826 * s / math.sqrt(2.0)
    dc = np.clip(d, -3 * 1.4826 * s, 3 * 1.4826 * s)
    den = float(dc @ dc)
    rho = float(dc[1:] @ dc[:-1]) / den if den > 0 else 0.0
    rho += (1 + 3 * rho) / n
    phi = min(max(1.0 + 2.0 * rho, 0.0), 0.98)
    k = np.arange(1, m)
    f = 1.0 + 2.0 * float(np.sum((1.0 - k / m) * phi ** k))
    return 1.2533 * sigma_d * math.sqrt(f / (m * (1.0 - phi))), phi


#: The level-shift yardstick: steps between block medians this many blocks apart (30 rows at
#: every=10: far enough apart that, under AR(1) noise with phi = 0.9, the step's spread is 98%
#: of what two independent medians give; adjacent blocks, still correlated, give 70%).
_LAG = 3
#: Steps at least a window old needed before they replace the window's AR(1) estimate.
_MIN_STEPS = 20


def _step_se(steps) -> float:
    """The standard error of a block median from steps L_i - L_{i-_LAG} between past block medians.

    1.4826 · MAD(steps) / sqrt(2): the robust spread of a difference of two block medians, over
    sqrt(2). Direct and model-free: whatever the noise's autocorrelation within a block, it is
    in the spread of the medians; a linear trend is a constant step and drops out with the
    median, and a few steep steps (the fall of an early training loss) do not move a MAD.
    """
    med = statistics.median(steps)
    return 1.4826 * statistics.median([abs(x - med) for x in steps]) / math.sqrt(2.0)


@hookimpl
def register_policies(register) -> None:
    register(Auto)
