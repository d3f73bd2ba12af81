"""Reduce the learning rate when the monitored metric stops improving."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..hookspecs import hookimpl
from ..policy import Note, Observation, Policy, State, check, default_mode


@dataclass(frozen=True, kw_only=True)
class Plateau(Policy):
    """Reduce by `factor` when the metric stops improving (method=threshold: ReduceLROnPlateau's rule)."""

    name = "plateau"
    stateful = True

    method: Literal["threshold"] = "threshold"
    metric: str | None = None
    mode: Literal["min", "max"] | None = None
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: int = 0
    min_lr: float = 0.0
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check(0 < self.factor < 1, self.name, "factor must be in (0, 1)")
        check(self.patience >= 0, self.name, "patience must be >= 0")
        check(self.threshold >= 0, self.name, "threshold must be >= 0")
        check(self.cooldown >= 0, self.name, "cooldown must be >= 0")
        check(self.min_lr >= 0, self.name, "min_lr must be >= 0")
        check(self.eps >= 0, self.name, "eps must be >= 0")

    def init(self, base_lr: float = 1.0) -> State:
        return {"factor": 1.0, "best": None, "num_bad": 0, "cooldown_counter": 0, "seen": 0}

    def value(self, state: State) -> float:
        return state["factor"]

    def monitor_changed(self, state: State) -> State:
        if self.metric is not None:
            return state  # this policy watches a metric of its own
        return dict(state, best=None, num_bad=0)

    def update(self, state: State, obs: Observation) -> tuple[State, Note | None]:
        metric = self.metric or obs.monitor
        if metric is None or metric not in obs.metrics:
            return state, None  # this row lacks the metric: wait for one that has it
        current = float(obs.metrics[metric])
        mode = self.mode or default_mode(metric)
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
        target = max(obs.lr * self.factor, self.min_lr)
        if obs.lr - target <= self.eps:
            return new, None
        new["factor"] = state["factor"] * (target / obs.lr)
        best = new["best"]
        note = {
            "reason": (
                f"{metric} {current:.6g} has not improved on best "
                f"{'none' if best is None else format(best, '.6g')} "
                f"({self.threshold_mode} threshold {self.threshold:g}, mode {mode}) "
                f"for {bad} observations > patience {self.patience}: lr x{target / obs.lr:.6g}"
            ),
            "method": self.method,
            "metric": metric,
            "value": current,
            "best": best,
            "num_bad": bad,
            "patience": self.patience,
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
