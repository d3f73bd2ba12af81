"""Example third-party autolr plugin: cyclic learning rates, as PyTorch's CyclicLR.

With c = floor(1 + t / (up + down)) and x = 1 + t / (up + down) - c, the position in the
cycle is s = x / r when x <= r, else (x - 1) / (r - 1), where r = up / (up + down). Then
factor = 1 + (max_factor - 1) · s · g, with g = 1 (triangular), 1 / 2^(c-1) (triangular2)
or gamma^t (exp_range). CyclicLR(base_lr=b, max_lr=b·max_factor) gives b · factor.

Installed, it registers through the ``autolr`` entry-point group; or load this file with
``autolr --plugins-dir plugins/autolr-cyclic``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from autolr import hookimpl
from autolr.policies.schedules import Schedule
from autolr.policy import check


@dataclass(frozen=True, kw_only=True)
class Cyclic(Schedule):
    """CyclicLR: triangular waves between base and base · max_factor."""

    name = "cyclic"
    max_factor: float = 10.0
    step_size_up: int = 2000
    step_size_down: int | None = None
    mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"
    gamma: float = 1.0

    def __post_init__(self) -> None:
        check(self.max_factor > 0, self.name, "max_factor must be > 0")
        check(self.step_size_up > 0, self.name, "step_size_up must be > 0")
        check(self.step_size_down is None or self.step_size_down > 0, self.name, "step_size_down must be > 0")
        check(self.gamma > 0, self.name, "gamma must be > 0")

    def factor_at(self, t: float, base_lr: float) -> float:
        up = float(self.step_size_up)
        total = up + float(self.step_size_down if self.step_size_down is not None else self.step_size_up)
        ratio = up / total
        cycle = math.floor(1 + t / total)
        x = 1.0 + t / total - cycle
        pos = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
        if self.mode == "triangular":
            g = 1.0
        elif self.mode == "triangular2":
            g = 1 / (2.0 ** (cycle - 1))
        else:
            g = self.gamma**t
        return 1.0 + (self.max_factor - 1.0) * pos * g


@hookimpl
def register_policies(register) -> None:
    register(Cyclic)
