"""``auto``: the adaptive default policy.

factor = warmup(t) · decay · guard · boost, where

- warmup(t) = warmup_start + (1 - warmup_start) · min(t, warmup) / warmup, as ``warmup``;
- decay ← decay · factor when the monitored metric shows no significant improvement over the
  last ``window`` observations (:func:`autolr.trend.improvement_test`, tested every
  ``every``); never below ``min_factor``;
- guard ← guard · guard_factor at once on a non-finite value, a jump of ``spike_sigmas``
  robust sigmas that also doubles the loss, or a sustained rise (p < 1e-3 and more than
  ``rise`` · |level| over the window); then
  ``guard_cooldown`` observations before the guard may fire again;
- boost ← boost · increase_factor (at most ``max_boost``) when ``increase`` is on and the
  improvement is strongly significant (p < ``increase_p``) with no guard event in the window.

The guard watches the training ``loss`` when rows carry it (it reacts per step), else the
monitored metric. After any change the decision window starts empty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..hookspecs import hookimpl
from ..policy import Note, Observation, Policy, State, check, default_mode


@dataclass(frozen=True, kw_only=True)
class Auto(Policy):
    """Adaptive default: warmup, trend-based decay on stalls, divergence guard, optional increases."""

    name = "auto"
    stateful = True

    metric: str | None = None
    mode: Literal["min", "max"] | None = None
    unit: Literal["auto", "step", "epoch", "row"] = "auto"
    warmup: int = 100
    warmup_start: float = 0.1
    window: int = 100
    every: int = 10
    confidence: float = 0.95
    factor: float = 0.5
    min_factor: float = 1e-3
    guard_metric: str | None = None
    guard_factor: float = 0.5
    guard_cooldown: int = 50
    spike_sigmas: float = 8.0
    rise: float = 0.1
    increase: bool = False
    increase_factor: float = 1.25
    increase_p: float = 1e-4
    max_boost: float = 2.0

    def __post_init__(self) -> None:
        check(self.warmup >= 0, self.name, "warmup must be >= 0")
        check(0 < self.warmup_start <= 1, self.name, "warmup_start must be in (0, 1]")
        check(self.window >= 8, self.name, "window must be >= 8")
        check(self.every >= 1, self.name, "every must be >= 1")
        check(0.5 <= self.confidence < 1, self.name, "confidence must be in [0.5, 1)")
        check(0 < self.factor < 1, self.name, "factor must be in (0, 1)")
        check(0 < self.min_factor <= 1, self.name, "min_factor must be in (0, 1]")
        check(0 < self.guard_factor < 1, self.name, "guard_factor must be in (0, 1)")
        check(self.guard_cooldown >= 0, self.name, "guard_cooldown must be >= 0")
        check(self.spike_sigmas > 0, self.name, "spike_sigmas must be > 0")
        check(self.rise > 0, self.name, "rise must be > 0")
        check(self.increase_factor > 1, self.name, "increase_factor must be > 1")
        check(0 < self.increase_p < 1, self.name, "increase_p must be in (0, 1)")
        check(self.max_boost >= 1, self.name, "max_boost must be >= 1")

    # ---- state -------------------------------------------------------------------------
    def init(self, base_lr: float = 1.0) -> State:
        return {"t": None, "decay": 1.0, "guard": 1.0, "boost": 1.0, "values": [], "times": [],
                "since": 0, "guard_values": [], "guard_ref": None, "cooldown": 0, "quiet": 0,
                "seen": 0, "warm": self.warmup == 0}

    def _warmup_factor(self, t: float) -> float:
        if self.warmup == 0:
            return 1.0
        return self.warmup_start + (1.0 - self.warmup_start) * min(t, self.warmup) / self.warmup

    def value(self, state: State) -> float:
        t = state["t"]
        w = self._warmup_factor(0.0 if t is None else t + 1)
        return w * state["decay"] * state["guard"] * state["boost"]

    def holds(self, obs: Observation) -> bool:
        t = obs.time(self.unit)
        return self.warmup > 0 and t is not None and t < self.warmup

    def monitor_changed(self, state: State) -> State:
        return state if self.metric else dict(state, values=[], times=[], since=0)

    # ---- update ------------------------------------------------------------------------
    def update(self, state: State, obs: Observation) -> tuple[State, Note | None]:
        new = dict(state)
        t = obs.time(self.unit)
        if t is not None and (new["t"] is None or t > new["t"]):
            new["t"] = t
        metric = self.metric or obs.monitor
        guard_metric = self.guard_metric or ("loss" if "loss" in obs.metrics else metric)
        note = None
        if guard_metric in obs.metrics:
            new, note = self._guard(new, obs, guard_metric, float(obs.metrics[guard_metric]))
        if note is not None or metric is None or metric not in obs.metrics:
            return new, note
        if not new["warm"]:
            if t is None or t < self.warmup:
                return new, None
            new.update(warm=True, values=[], times=[], since=0)  # decisions use post-warmup data
        current = float(obs.metrics[metric])
        if not math.isfinite(current):
            return new, None
        new["seen"] += 1
        new["since"] += 1
        time = t if t is not None else obs.row
        new["values"] = (new["values"] + [current])[-self.window:]
        new["times"] = (new["times"] + [time])[-self.window:]
        if len(new["values"]) < self.window or new["since"] % self.every:
            return new, None
        return self._decide(new, obs, metric, self.mode or default_mode(metric))

    def _guard(self, state: State, obs: Observation, metric: str, value: float) -> tuple[State, Note | None]:
        """O(1) per row: compare with a robust (median, sigma) refreshed every ``every`` values."""
        from .. import trend

        state["quiet"] += 1
        why = None
        if state["cooldown"] > 0:
            state["cooldown"] -= 1
        else:
            ref = state["guard_ref"]
            why = trend.divergent(value, tuple(ref) if ref else None, mode=self.mode or default_mode(metric),
                                  k=self.spike_sigmas)
        if why is None:
            if math.isfinite(value):
                window = (state["guard_values"] + [value])[-self.window:]
                state["guard_values"] = window
                if state["guard_ref"] is None or state["quiet"] % self.every == 0:
                    ref = trend.robust_reference(window)
                    state["guard_ref"] = list(ref) if ref else None
            return state, None
        cut = self.guard_factor
        state.update(guard=state["guard"] * cut, cooldown=self.guard_cooldown, quiet=0,
                     values=[], times=[], since=0)
        return state, {
            "reason": f"divergence guard: {metric} {why}: lr x{cut:g} at once, then {self.guard_cooldown} "
                      f"observations of cooldown",
            "kind": "guard", "metric": metric, "value": value if math.isfinite(value) else str(value),
            "reference": state["guard_ref"],
        }

    def _decide(self, state: State, obs: Observation, metric: str, mode: str) -> tuple[State, Note | None]:
        from .. import trend

        result = trend.improvement_test(state["values"], state["times"], mode=mode, confidence=self.confidence)
        stats = result.as_dict()
        sign = 1.0 if mode == "min" else -1.0
        if sign * result.slope > 0 and state["cooldown"] == 0:  # heading the wrong way: diverging?
            worse = trend.improvement_test(state["values"], state["times"], mode="max" if mode == "min" else "min",
                                           confidence=self.confidence)
            level = abs(sorted(state["values"])[len(state["values"]) // 2]) or 1.0
            rise = abs(worse.slope) * (state["times"][-1] - state["times"][0])
            if worse.p < 1e-3 and rise > self.rise * level:
                # Significantly getting worse over a whole window: a slow divergence.
                state.update(guard=state["guard"] * self.guard_factor, cooldown=self.guard_cooldown, quiet=0,
                             values=[], times=[], since=0)
                return state, {
                    "reason": f"divergence guard: {metric} rises significantly over {worse.n} observations "
                              f"(slope {worse.slope:.3g}, p={worse.p:.2g}, +{rise / level:.0%} of its level): "
                              f"lr x{self.guard_factor:g}",
                    "kind": "guard", "metric": metric, **worse.as_dict(),
                }
        if result.p >= 1 - self.confidence:
            floor = self.min_factor / state["decay"]
            step = max(self.factor, min(floor, 1.0))
            if step >= 1.0:
                return state, None  # already at min_factor
            gain = trend.forecast_gain(state["values"], state["times"], mode=mode)
            state.update(decay=state["decay"] * step, values=[], times=[], since=0)
            return state, {
                "reason": (
                    f"{metric} stalled: no significant improvement over {result.n} observations "
                    f"(slope {result.slope:.3g}/unit, {self.confidence:.0%} CI [{result.lo:.3g}, {result.hi:.3g}], "
                    f"p={result.p:.3g}, AR(1) phi={result.phi:.2f}"
                    + (f", forecast gain {gain:.3g}" if gain is not None else "")
                    + f"): lr x{step:.6g}"
                ),
                "kind": "decay", "metric": metric, "forecast_gain": gain, **stats,
            }
        if (self.increase and result.p < self.increase_p and state["quiet"] >= 2 * self.window
                and state["boost"] * self.increase_factor <= self.max_boost):
            state.update(boost=state["boost"] * self.increase_factor, values=[], times=[], since=0)
            return state, {
                "reason": f"{metric} improves steadily (p={result.p:.2g} < {self.increase_p:g} over "
                          f"{result.n} observations, slope {result.slope:.3g}): lr x{self.increase_factor:g}",
                "kind": "increase", "metric": metric, **stats,
            }
        return state, None


@hookimpl
def register_policies(register) -> None:
    register(Auto)
