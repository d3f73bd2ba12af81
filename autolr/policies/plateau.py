"""Reduce the learning rate when the monitored metric stops improving.

``method=trend`` (default): keep a window of the last ``window`` observations; every
``every`` observations, test whether the metric still improves significantly
(:func:`autolr.trend.improvement_test`: an AR(1)-corrected one-sided slope test at
``confidence``, faster than ``min_improvement`` · |level| over the window). If it does not,
lr ← max(lr · factor, min_lr). After a reduction the window starts empty: data taken at the
old LR says nothing about the new one.

``method=threshold``: PyTorch's ReduceLROnPlateau exactly: an observation is better when
below best · (1 - threshold) (rel) or best - threshold (abs), mirrored for max; after more
than ``patience`` observations without one, reduce; then wait ``cooldown`` observations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from ..hookspecs import hookimpl
from ..policy import Note, Observation, Policy, State, check, default_mode

THRESHOLD_ONLY = ("patience", "threshold", "threshold_mode")
TREND_ONLY = ("window", "confidence", "min_improvement", "every", "log")


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
    confidence: float = 0.95
    min_improvement: float = 0.0
    every: int = 10
    log: bool = False

    def __post_init__(self) -> None:
        check(0 < self.factor < 1, self.name, "factor must be in (0, 1)")
        check(self.patience >= 0, self.name, "patience must be >= 0")
        check(self.threshold >= 0, self.name, "threshold must be >= 0")
        check(self.cooldown >= 0, self.name, "cooldown must be >= 0")
        check(self.min_lr >= 0, self.name, "min_lr must be >= 0")
        check(self.eps >= 0, self.name, "eps must be >= 0")
        check(self.window >= 8, self.name, "window must be >= 8")
        check(0.5 <= self.confidence < 1, self.name, "confidence must be in [0.5, 1)")
        check(self.min_improvement >= 0, self.name, "min_improvement must be >= 0")
        check(self.every >= 1, self.name, "every must be >= 1")
        defaults = {f.name: f.default for f in fields(self)}
        other = THRESHOLD_ONLY if self.method == "trend" else TREND_ONLY
        for key in other:
            check(getattr(self, key) == defaults[key], self.name,
                  f"{key} applies to method={'threshold' if self.method == 'trend' else 'trend'}, not method={self.method}")

    def init(self, base_lr: float = 1.0) -> State:
        if self.method == "trend":
            return {"factor": 1.0, "values": [], "times": [], "since": 0, "cooldown_counter": 0, "seen": 0}
        return {"factor": 1.0, "best": None, "num_bad": 0, "cooldown_counter": 0, "seen": 0}

    def value(self, state: State) -> float:
        return state["factor"]

    def monitor_changed(self, state: State) -> State:
        if self.metric is not None:
            return state  # this policy watches a metric of its own
        if self.method == "trend":
            return dict(state, values=[], times=[], since=0)
        return dict(state, best=None, num_bad=0)

    def update(self, state: State, obs: Observation) -> tuple[State, Note | None]:
        metric = self.metric or obs.monitor
        if metric is None or metric not in obs.metrics:
            return state, None  # this row lacks the metric: wait for one that has it
        current = float(obs.metrics[metric])
        mode = self.mode or default_mode(metric)
        if self.method == "trend":
            return self._update_trend(state, obs, metric, current, mode)
        return self._update_threshold(state, obs, metric, current, mode)

    def _reduce(self, state: State, lr: float) -> float | None:
        """The new factor after a reduction, or None when the change would be below eps."""
        target = max(lr * self.factor, self.min_lr)
        if lr - target <= self.eps:
            return None
        return state["factor"] * (target / lr)

    # ---- method=trend ------------------------------------------------------------------
    def _update_trend(self, state, obs, metric, current, mode):
        from .. import trend  # numpy/scipy only when this method is used

        if not math.isfinite(current) or (self.log and current <= 0):
            return dict(state, seen=state["seen"] + 1), None
        t = obs.time("auto")
        t = obs.row if t is None else t
        new = dict(state, seen=state["seen"] + 1, since=state["since"] + 1,
                   values=(state["values"] + [current])[-self.window:],
                   times=(state["times"] + [t])[-self.window:])
        if new["cooldown_counter"] > 0:
            new["cooldown_counter"] -= 1
            return new, None
        if len(new["values"]) < self.window or new["since"] % self.every:
            return new, None
        values = [math.log(v) for v in new["values"]] if self.log else new["values"]
        level = abs(sorted(values)[len(values) // 2]) or 1.0
        span = max(new["times"][-1] - new["times"][0], 1e-12)
        result = trend.improvement_test(values, new["times"], mode=mode, confidence=self.confidence,
                                        min_rate=self.min_improvement * level / span)
        if result.p < 1 - self.confidence:
            return new, None
        factor = self._reduce(new, obs.lr)
        if factor is None:
            return new, None
        gain = trend.forecast_gain(values, new["times"], mode=mode)
        new.update(factor=factor, values=[], times=[], since=0, cooldown_counter=self.cooldown)
        stats = result.as_dict()
        note = {
            "reason": (
                f"{metric} shows no significant improvement over the last {result.n} observations "
                f"(slope {result.slope:.3g}/unit, {self.confidence:.0%} CI [{result.lo:.3g}, {result.hi:.3g}], "
                f"p={result.p:.3g} >= {1 - self.confidence:.3g}, AR(1) phi={result.phi:.2f}"
                + (f", forecast gain {gain:.3g} over the window" if gain is not None else "")
                + f"): lr x{factor / state['factor']:.6g}"
            ),
            "method": "trend", "metric": metric, "value": current, "window": result.n,
            "forecast_gain": gain, **stats,
        }
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
