"""Hugging Face transformers: ``AutolrCallback``, a ``transformers.TrainerCallback``.

Rule (the PyTorch one, :mod:`autolr.integrations.torch`): every optimizer step uses
``group["lr"] × scale``, where ``group["lr"]`` is what the Trainer's own ``lr_scheduler``
(linear or cosine with warmup, ...) set and ``scale`` is the control file's multiplier in
force at step ``state.global_step``. The hooks go on the Trainer's optimizer at train begin
(inside Accelerate's wrapper, so they run only on real, synchronised steps) and restore the
LR right after each step: the scheduler never sees the factor and both compose by
multiplication. The clock is re-synced to ``state.global_step`` before every optimizer step,
so a resumed ``train(resume_from_checkpoint=...)`` lands ``apply_at_step`` changes on time.

Run folder: ``args.output_dir`` unless ``run_dir`` is given.

What the daemon reads. The Trainer itself writes ``trainer_state.json`` only at checkpoints,
which is too late to steer a run. So by default (``log_metrics=True``) the callback appends
every log the Trainer emits (``on_log``: ``loss``, ``grad_norm``, ``learning_rate``, ``epoch``,
eval metrics) to ``run_dir/metrics.jsonl`` as ``{"step": global_step - 1, ...}``, on the main
process only, after a row ``{"step": global_step - 1}`` at train begin (where the fit starts:
the daemon then lists a warmup's or a schedule's changes ahead from the first step, and a
resumed fit's rewind is seen at once). Its rate is the Trainer's ``logging_steps`` (default
500): a warmup and a schedule move at every step between logs all the same (the control
file's ``ahead``), but the plateau tests and the divergence guard see only the logged rows:
set it to 1-10 for a timely daemon. The ``learning_rate`` logged by the Trainer is its
scheduler's, without autolr's factor. (The daemon keeps one log kind per run folder, the first it sees: the
JSONL, before any checkpoint's ``trainer_state.json``. ``report_to="tensorboard"`` writes
``output_dir/runs/...``, which the daemon treats as a run folder of its own.)

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[AutolrCallback()])
    # beside it:  autolr watch <output_dir's parent>
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..control import Control
from ..logger import Logger
from . import torch as _torch_integration

__all__ = ["AutolrCallback"]


class AutolrCallback(TrainerCallback):
    """Scale the Trainer's optimizer LRs by the control file of ``run_dir`` (default ``args.output_dir``).

    ``run_dir``: a run folder, its ``autolr.json`` or a ``Control``. ``log_metrics``: append
    the Trainer's logs to ``run_dir/metrics.jsonl`` for the daemon (main process only).
    ``handle`` is the attached :class:`autolr.integrations.torch.AttachedControl` during training.
    """

    def __init__(self, run_dir: str | os.PathLike | Control | None = None, *, log_metrics: bool = True,
                 min_interval: float = 0.0):
        self.run_dir = run_dir
        self.log_metrics = log_metrics
        self.min_interval = min_interval
        self.control: Control | None = None
        self.handle: _torch_integration.AttachedControl | None = None
        self._logger: Logger | None = None

    @property
    def run_path(self) -> Path | None:
        return None if self.control is None else self.control.path.parent

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._detach()
        run = self.run_dir if self.run_dir is not None else args.output_dir
        self.control = run if isinstance(run, Control) else Control(run, min_interval=self.min_interval)
        optimizer = _unwrap(kwargs.get("optimizer"))
        if optimizer is None or not hasattr(optimizer, "register_step_pre_hook"):
            warnings.warn(f"autolr: cannot attach to the Trainer's optimizer {type(optimizer).__name__}; "
                          "the LR is not controlled", RuntimeWarning, stacklevel=2)
        else:
            self.handle = _torch_integration.attach(optimizer, self.control, start_step=int(state.global_step))
        if self.log_metrics and state.is_world_process_zero and self._logger is None:
            self._logger = Logger(self.run_path / "metrics.jsonl")
            # Where the fit starts, before the first log: the daemon then counts this run in
            # steps and lists a warmup's changes ahead from the first step (see the module doc).
            self._logger(int(state.global_step) - 1)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.step = int(state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self._logger is not None and logs:
            # global_step counts the steps done; a row's step is the (0-based) index of the last
            # one, as in a PyTorch loop and Lightning's logs: a change decided after step s then
            # comes in at step s + 1, where torch's own schedulers change it
            self._logger(max(int(state.global_step) - 1, 0), **{k: v for k, v in logs.items()
                                                    if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._detach()

    def _detach(self) -> None:
        if self.handle is not None:
            self.handle.detach()
            self.handle = None
        if self._logger is not None:
            self._logger.close()
            self._logger = None


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            return optimizer
        optimizer = inner
    return optimizer
