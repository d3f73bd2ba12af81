"""PyTorch: scale every param group of any ``torch.optim`` optimizer by the control file.

Rule: the LR used by ``optimizer.step()`` is ``group["lr"] × scale``, where ``group["lr"]``
is whatever your own code and in-process scheduler set, and ``scale`` is the control file's
multiplier in force at this optimizer step. A step pre-hook multiplies, a post-hook restores,
so a scheduler you keep (StepLR, OneCycleLR, a warmup lambda...), ``get_last_lr()`` and
``optimizer.state_dict()`` never see autolr's factor, and both compose by multiplication.
Per-group LRs keep their ratios. The absolute ``lr`` of the control file is not used here:
with several groups only the scale is meaningful.

    handle = autolr.integrations.torch.attach(optimizer, "runs/exp1")

The step clock is the number of ``optimizer.step()`` calls that ran (from ``start_step``);
log the same counter as ``step`` so a change published with ``apply_at_step`` lands on it.

``DistributedControl`` is for data-parallel jobs: rank 0 reads the file and broadcasts, so
every rank applies the same scale at the same step.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable

from ..control import Control


class AttachedControl:
    """Hooks installed on an optimizer; ``detach()`` removes them.

    After each ``optimizer.step()``: ``scale`` and ``seq`` are those of the control entry that
    step used, ``last_lrs`` the LR of each group it used, and ``step`` the next step's index.
    """

    def __init__(self, optimizer, control: Control | "DistributedControl", start_step: int = 0):
        self.optimizer = optimizer
        self.control = control
        self.step = start_step  # optimizer steps taken (the apply_at_step clock)
        #: When set, the step clock is read from it before every step instead of counted (the
        #: Lightning callback's: the logged step, with several optimizers or manual optimization).
        self.clock: Callable[[], int] | None = None
        self.scale = 1.0
        self.seq = 0
        self.last_lrs: list[Any] = []
        self._saved: list[Any] | None = None  # the user's LRs while a step runs
        self._handles = [optimizer.register_step_pre_hook(self._pre),
                         optimizer.register_step_post_hook(self._post)]

    def _pre(self, optimizer, args, kwargs) -> None:
        if self._saved is not None:
            self._restore(optimizer)  # the previous step raised before the post-hook ran
        if self.clock is not None:
            self.step = int(self.clock())
        entry = self.control.entry(step=self.step)
        self.scale, self.seq = (entry["scale"], entry["seq"]) if entry is not None else (1.0, 0)
        self._saved = [group["lr"] for group in optimizer.param_groups]
        if self.scale != 1.0:
            for group, lr in zip(optimizer.param_groups, self._saved):
                group["lr"] = _mul(lr, self.scale)
        self.last_lrs = [group["lr"] for group in optimizer.param_groups]

    def _post(self, optimizer, args, kwargs) -> None:
        self._restore(optimizer)
        self.step += 1

    def _restore(self, optimizer) -> None:
        for group, lr in zip(optimizer.param_groups, self._saved or ()):
            group["lr"] = lr
        self._saved = None

    def effective_lrs(self) -> list[float]:
        """Each group's LR as the next step will use it (your LR × autolr's scale).

        With a ``DistributedControl`` this uses the scale of the last step instead: polling
        there is a collective, which one rank alone must not call.
        """
        if isinstance(self.control, DistributedControl):
            scale = self.scale
        else:
            entry = self.control.entry(step=self.step)
            scale = entry["scale"] if entry is not None else 1.0
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
    so changes with an ``apply_at_step`` land at the right step. Pass a ``DistributedControl``
    as ``run`` in data-parallel jobs (on every rank).
    """
    control = run if isinstance(run, (Control, DistributedControl)) else Control(run, min_interval=min_interval)
    return AttachedControl(optimizer, control, start_step)


class DistributedControl:
    """Rank ``src`` reads the control file; every rank gets its entry by broadcast.

    The same interface as ``Control`` (``entry``, ``scale``, ``lr``, ``seq``). ``entry``,
    ``scale`` and ``lr`` are collectives: every rank must call them at the same steps.
    ``every`` broadcasts only every N calls (the others reuse the last value), for very fast
    loops; a change then lands at the first broadcast at or after its ``apply_at_step``, on
    every rank alike.
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
        self._entry: dict[str, Any] | None = None
        self._calls = 0

    def entry(self, step: int | None = None) -> dict[str, Any] | None:
        """Rank ``src``'s ``Control.entry(step)``, as ``{"seq", "scale", "lr"}`` on every rank."""
        if self._calls % self.every == 0:
            # [has an entry, scale, seq, lr (0: none)]; float64 holds seq exactly up to 2**53
            payload = self._torch.zeros(4, dtype=self._torch.float64, device=self.device)
            if self.control is not None:
                entry = self.control.entry(step)
                if entry is not None:
                    payload[0], payload[1], payload[2] = 1.0, float(entry["scale"]), float(entry["seq"])
                    payload[3] = float(entry["lr"] or 0.0)
            self._dist.broadcast(payload, src=self.src, group=self.group)
            has, scale, seq, lr = payload.tolist()
            if has and scale > 0:
                self._entry = {"seq": int(seq), "scale": scale, "lr": lr if lr > 0 else None}
            elif has:
                warnings.warn("autolr: broadcast scale not positive; keeping the last one", RuntimeWarning)
        self._calls += 1
        return self._entry

    def scale(self, step: int | None = None) -> float:
        """The multiplier in force at ``step`` (1.0 before any decision)."""
        entry = self.entry(step)
        return entry["scale"] if entry is not None else 1.0

    def lr(self, default: float, step: int | None = None) -> float:
        """As ``Control.lr``: the file's ``lr``, else ``default · scale``; ``default`` before any."""
        entry = self.entry(step)
        if entry is None:
            return default
        return entry["lr"] if entry["lr"] is not None else default * entry["scale"]

    @property
    def seq(self) -> int:
        """The seq of the last broadcast entry (0 before any); not a collective."""
        return self._entry["seq"] if self._entry is not None else 0
