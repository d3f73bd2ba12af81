"""Closed-form schedules: the factor is a pure function of time.

After the row at time t the factor is ``factor_at(t + 1)``; before any row it is
``factor_at(0)``. That is what PyTorch's ``get_last_lr()`` reports after t+1 calls of
``scheduler.step()``, and what Keras's LearningRateScheduler gives at epoch t+1.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Literal

from ..hookspecs import hookimpl
from ..policy import Note, Observation, Policy, State, check

Unit = Literal["auto", "step", "epoch", "row"]


@dataclass(frozen=True, kw_only=True)
class Schedule(Policy):
    """Base for schedules; ``unit`` picks the counter (auto: step, else epoch, else row)."""

    unit: Unit = "auto"

    def factor_at(self, t: float, base_lr: float) -> float:
        raise NotImplementedError

    def init(self, base_lr: float = 1.0) -> State:
        return {"t": None, "base_lr": base_lr}

    def update(self, state: State, obs: Observation) -> tuple[State, Note | None]:
        t = obs.time(self.unit)
        if t is None:  # this row lacks the counter: time stands still
            return state, None
        if state["t"] is not None and t < state["t"]:
            return state, None  # rows of several files interleave; time never runs back
        return {**state, "t": t}, None

    def value(self, state: State) -> float:
        t = state["t"]
        return self.factor_at(0.0 if t is None else t + 1, state["base_lr"])

    def ahead(self, state: State, t: int, unit: str) -> float:
        """``factor_at(t)`` when the schedule counts steps (never before the time it is at)."""
        if (unit if self.unit == "auto" else self.unit) != "step":
            return self.value(state)
        last = state["t"]
        return self.factor_at(t if last is None else max(t, last + 1), state["base_lr"])

    def restart_time(self, state: State) -> State:
        return self.init(state["base_lr"])


@dataclass(frozen=True, kw_only=True)
class Constant(Schedule):
    """A constant factor (1.0 keeps the base LR): lr = base · factor."""

    name = "constant"
    factor: float = 1.0

    def __post_init__(self) -> None:
        check(self.factor > 0, self.name, "factor must be > 0")

    def factor_at(self, t: float, base_lr: float) -> float:
        return self.factor


@dataclass(frozen=True, kw_only=True)
class Step(Schedule):
    """StepLR: lr = base · gamma^floor(t / step_size)."""

    name = "step"
    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        check(self.step_size > 0, self.name, "step_size must be > 0")
        check(self.gamma > 0, self.name, "gamma must be > 0")

    def factor_at(self, t: float, base_lr: float) -> float:
        return self.gamma ** math.floor(t / self.step_size)


@dataclass(frozen=True, kw_only=True)
class MultiStep(Schedule):
    """MultiStepLR: lr = base · gamma^(number of milestones <= t)."""

    name = "multistep"
    milestones: tuple[int, ...]
    gamma: float = 0.1

    def __post_init__(self) -> None:
        check(len(self.milestones) > 0, self.name, "milestones must not be empty")
        check(all(m >= 0 for m in self.milestones), self.name, "milestones must be >= 0")
        check(self.gamma > 0, self.name, "gamma must be > 0")
        object.__setattr__(self, "milestones", tuple(sorted(self.milestones)))

    def factor_at(self, t: float, base_lr: float) -> float:
        return self.gamma ** bisect.bisect_right(self.milestones, t)


@dataclass(frozen=True, kw_only=True)
class Exponential(Schedule):
    """ExponentialLR (gamma^t) or TensorFlow's ExponentialDecay (decay_rate^(t/decay_steps))."""

    name = "exponential"
    gamma: float | None = None
    decay_rate: float | None = None
    decay_steps: float = 1.0
    staircase: bool = False

    def __post_init__(self) -> None:
        check(
            (self.gamma is None) != (self.decay_rate is None),
            self.name,
            "give either gamma (PyTorch form) or decay_rate with decay_steps (TensorFlow form)",
        )
        check((self.gamma or self.decay_rate or 0) > 0, self.name, "gamma/decay_rate must be > 0")
        check(self.decay_steps > 0, self.name, "decay_steps must be > 0")
        check(self.gamma is None or (self.decay_steps == 1.0 and not self.staircase), self.name,
              "decay_steps and staircase apply to decay_rate (TensorFlow form), not gamma")

    def factor_at(self, t: float, base_lr: float) -> float:
        if self.gamma is not None:
            return self.gamma**t
        exponent = t / self.decay_steps
        return self.decay_rate ** (math.floor(exponent) if self.staircase else exponent)


@dataclass(frozen=True, kw_only=True)
class InverseTime(Schedule):
    """TensorFlow's InverseTimeDecay: lr = base / (1 + decay_rate · t / decay_steps)."""

    name = "inverse_time"
    decay_rate: float
    decay_steps: float = 1.0
    staircase: bool = False

    def __post_init__(self) -> None:
        check(self.decay_rate >= 0, self.name, "decay_rate must be >= 0")
        check(self.decay_steps > 0, self.name, "decay_steps must be > 0")

    def factor_at(self, t: float, base_lr: float) -> float:
        p = t / self.decay_steps
        return 1.0 / (1.0 + self.decay_rate * (math.floor(p) if self.staircase else p))


@dataclass(frozen=True, kw_only=True)
class Cosine(Schedule):
    """CosineAnnealingLR: lr = eta_min + (base - eta_min) · (1 + cos(pi · t / T_max)) / 2."""

    name = "cosine"
    T_max: float
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        check(self.T_max > 0, self.name, "T_max must be > 0")
        check(self.eta_min >= 0, self.name, "eta_min must be >= 0")

    def factor_at(self, t: float, base_lr: float) -> float:
        floor = self.eta_min / base_lr
        return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * t / self.T_max)) / 2.0


@dataclass(frozen=True, kw_only=True)
class Linear(Schedule):
    """LinearLR: lr = base · (start_factor + (end_factor - start_factor) · min(t, total_iters) / total_iters)."""

    name = "linear"
    start_factor: float = 1.0 / 3.0
    end_factor: float = 1.0
    total_iters: int = 5

    def __post_init__(self) -> None:
        check(self.start_factor > 0, self.name, "start_factor must be > 0")
        check(self.end_factor >= 0, self.name, "end_factor must be >= 0")
        check(self.total_iters > 0, self.name, "total_iters must be > 0")

    def factor_at(self, t: float, base_lr: float) -> float:
        frac = min(t, self.total_iters) / self.total_iters
        return self.start_factor + (self.end_factor - self.start_factor) * frac


@dataclass(frozen=True, kw_only=True)
class Polynomial(Schedule):
    """PolynomialLR: lr = base · (1 - min(t, total_iters) / total_iters)^power."""

    name = "polynomial"
    total_iters: int = 5
    power: float = 1.0

    def __post_init__(self) -> None:
        check(self.total_iters > 0, self.name, "total_iters must be > 0")
        check(self.power > 0, self.name, "power must be > 0")

    def factor_at(self, t: float, base_lr: float) -> float:
        return (1.0 - min(t, self.total_iters) / self.total_iters) ** self.power


@dataclass(frozen=True, kw_only=True)
class Warmup(Schedule):
    """Warmup from start_factor to 1 over `steps`: linear, or cosine (1 - cos(pi · t / steps)) / 2."""

    name = "warmup"
    steps: int = 100
    start_factor: float = 0.01
    shape: Literal["linear", "cosine"] = "linear"

    def __post_init__(self) -> None:
        check(self.steps > 0, self.name, "steps must be > 0")
        check(0 < self.start_factor <= 1, self.name, "start_factor must be in (0, 1]")

    def factor_at(self, t: float, base_lr: float) -> float:
        frac = min(t, self.steps) / self.steps
        if self.shape == "cosine":
            frac = (1.0 - math.cos(math.pi * frac)) / 2.0
        return self.start_factor + (1.0 - self.start_factor) * frac

    def holds(self, obs: Observation) -> bool:
        """Whether the row was trained during the warmup: its counter < steps (a progress epoch
        e is trained at e, an index epoch or step t at t)."""
        c = obs.counter(self.unit)
        return c is not None and c < self.steps


SCHEDULES = (Constant, Step, MultiStep, Exponential, InverseTime, Cosine, Linear, Polynomial, Warmup)


@hookimpl
def register_policies(register) -> None:
    for cls in SCHEDULES:
        register(cls)
