"""PyTorch: scale every param group of any ``torch.optim`` optimizer by the control file.

Rule: the LR used by ``optimizer.step()`` is ``group["lr"] × scale``, where ``group["lr"]``
is whatever your own code and in-process scheduler set, and ``scale`` is the control file's
multiplier in force at this optimizer step. A step pre-hook multiplies, a post-hook restores,
so a scheduler you keep (StepLR, OneCycleLR, a warmup lambda...) never sees autolr's factor
and both compose by multiplication. Per-group LRs keep their ratios. The absolute ``lr`` of
the control file is not used here: with several groups only the scale is meaningful.

    handle = autolr.integrations.torch.attach(optimizer, "runs/exp1")

``DistributedControl`` is for data-parallel jobs: rank 0 reads the file and broadcasts, so
every rank applies the same scale at the same step.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

from ..control import Control


class AttachedControl:
    """Hooks installed on an optimizer; ``detach()`` removes them."""

    def __init__(self, optimizer, control: Control | "DistributedControl", start_step: int = 0):
        self.optimizer = optimizer
        self.control = control
        self.step = start_step  # optimizer steps taken (the apply_at_step clock)
        self.scale = 1.0
        self._saved: list[float] = []
        self._handles = [optimizer.register_step_pre_hook(self._pre),
                         optimizer.register_step_post_hook(self._post)]

    def _pre(self, optimizer, args, kwargs) -> None:
        self.scale = self.control.scale(step=self.step)
        self._saved = [group["lr"] for group in optimizer.param_groups]
        if self.scale != 1.0:
            for group, lr in zip(optimizer.param_groups, self._saved):
                group["lr"] = _mul(lr, self.scale)

    def _post(self, optimizer, args, kwargs) -> None:
        for group, lr in zip(optimizer.param_groups, self._saved):
            group["lr"] = lr
        self.step += 1

    def effective_lrs(self) -> list[float]:
        """The LR of each group as the next step will use it (your LR × autolr's scale)."""
        scale = self.control.scale(step=self.step)
        return [float(group["lr"]) * scale for group in self.optimizer.param_groups]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _mul(lr: Any, scale: float) -> Any:
    try:
        return lr * scale  # float, or a tensor LR (capturable optimizers)
    except TypeError:
        return lr


def attach(optimizer, run: str | os.PathLike | Control | "DistributedControl", *, start_step: int = 0,
           min_interval: float = 0.0) -> AttachedControl:
    """Scale ``optimizer``'s LRs by the control file of ``run`` (a run folder, file or Control).

    ``start_step``: the optimizer step this process starts at (a resumed job's global step),
    so changes with an ``apply_at_step`` land at the right step.
    """
    control = run if isinstance(run, (Control, DistributedControl)) else Control(run, min_interval=min_interval)
    return AttachedControl(optimizer, control, start_step)


class DistributedControl:
    """Rank ``src`` reads the control file; every rank gets its (scale, seq) by broadcast.

    Every rank must call ``scale(step)`` at the same steps (it is a collective). ``every``
    broadcasts only every N steps (the others reuse the last value), for very fast loops.
    """

    def __init__(self, run: str | os.PathLike | Control, *, src: int = 0, group=None, every: int = 1,
                 device: str | None = None):
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedControl needs torch.distributed to be initialised")
        self._torch, self._dist = torch, dist
        self.src, self.group, self.every = src, group, max(1, int(every))
        self.rank = dist.get_rank(group)
        self.control = (run if isinstance(run, Control) else Control(run)) if self.rank == src else None
        backend = dist.get_backend(group)
        self.device = device or ("cuda" if backend == "nccl" else "cpu")
        self._value = (1.0, 0)
        self._calls = 0

    def scale(self, step: int | None = None) -> float:
        if self._calls % self.every == 0:
            payload = self._torch.zeros(2, dtype=self._torch.float64, device=self.device)
            if self.control is not None:
                entry = self.control.entry(step)
                if entry is not None:
                    payload[0], payload[1] = float(entry["scale"]), float(entry.get("seq") or 0)
                else:
                    payload[0] = 1.0
            self._dist.broadcast(payload, src=self.src, group=self.group)
            scale, seq = float(payload[0]), int(payload[1])
            if scale > 0:
                self._value = (scale, seq)
            else:
                warnings.warn("autolr: broadcast scale not positive; keeping the last one", RuntimeWarning)
        self._calls += 1
        return self._value[0]

    def lr(self, default: float, step: int | None = None) -> float:
        return default * self.scale(step)

    @property
    def seq(self) -> int:
        return self._value[1]
