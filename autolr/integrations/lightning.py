"""Lightning: ``AutolrCallback``, a ``lightning.pytorch.Callback``.

Rule (the PyTorch one, :mod:`autolr.integrations.torch`): every optimizer step uses
``group["lr"] × scale``, where ``group["lr"]`` is what your ``configure_optimizers`` and its
LR schedulers set and ``scale`` is the control file's multiplier in force at that step. Hooks
on each optimizer multiply before ``optimizer.step()`` and restore right after, so Lightning's
schedulers never see the factor and both compose by multiplication.

    trainer = L.Trainer(callbacks=[AutolrCallback()], logger=CSVLogger("logs"))
    # run beside it:  autolr watch logs/

The run folder defaults to ``trainer.log_dir``: the logger's folder (``CSVLogger`` and
``TensorBoardLogger``: ``save_dir/name/version_N``, where the metrics file the daemon reads
is), else ``default_root_dir``. The hooks go on at ``on_train_start``, after a checkpoint has
been restored, with the step clock at ``trainer.global_step``, so a resumed fit lands
``apply_at_step`` changes at the right steps; the clock is re-synced to ``global_step`` at
every batch when there is one optimizer (automatic optimization), so steps skipped by AMP or
accumulated batches do not shift it. With several optimizers or manual optimization (where
``global_step`` counts every optimizer's steps, and an optimizer may step several times a
batch) every step reads the step the loggers write on the batch's rows. They come off at the
end of the fit.

At the first batch of each fit the callback (on global rank 0) appends ``{"step": s - 1}``,
where ``s`` is the step the fit starts at, to ``autolr-fit.jsonl`` in the run folder
(``mark_start=False``: not). The CSVLogger writes its first rows at its first flush (every 100
steps by default); from this row the daemon knows the run counts steps and lists a warmup's or
a schedule's changes ahead from the first step (a resumed fit's rewind comes with its
first logged rows: the daemon reads this file apart from the log).

``AutolrCallback`` subclasses ``lightning.pytorch.Callback`` (the ``lightning`` package, else
``pytorch_lightning``); ``PLAutolrCallback`` is the same for the ``pytorch_lightning`` package.
Importing this module imports neither until one of the two names is used.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ..control import Control
from ..logger import Logger
from ..readers import FIT_START_FILE
from . import torch as _torch_integration

__all__ = ["AutolrCallback", "PLAutolrCallback"]


class _AutolrCallbackMixin:
    """The callback's behaviour; mixed with the Callback base of the installed Lightning."""

    def __init__(self, run_dir: str | os.PathLike | Control | None = None, *, min_interval: float = 0.0,
                 mark_start: bool = True):
        super().__init__()
        self.run_dir = run_dir
        self.min_interval = min_interval
        self.mark_start = mark_start
        self._start_to_mark = False  # the fit's start is noted at its first batch
        self.handles: list[_torch_integration.AttachedControl] = []
        self.control: Control | None = None

    @property
    def run_path(self) -> Path | None:
        """The control file's folder in use (None before the fit starts)."""
        return None if self.control is None else self.control.path.parent

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._detach()
        run = self.run_dir
        if run is None:
            run = _default_run_dir(trainer)
        control = run if isinstance(run, Control) else Control(run, min_interval=self.min_interval)
        self.control = control
        if getattr(trainer, "ckpt_path", None) and self.run_dir is None and control.seq == 0:
            warnings.warn(f"autolr: this fit resumes from a checkpoint but logs into {control.path.parent}, "
                          "which has no control file yet: the daemon takes it for a new run and starts its "
                          "policies over. Give the logger the first fit's version (CSVLogger(..., version=0)) "
                          "or pass AutolrCallback(run_dir=...).", RuntimeWarning, stacklevel=2)
        start = int(trainer.global_step)
        self.handles = [_torch_integration.attach(_unwrap(opt), control, start_step=start)
                        for opt in trainer.optimizers]
        if len(self.handles) != 1 or not getattr(pl_module, "automatic_optimization", True):
            # global_step counts every optimizer's steps (two optimizers: 2 a batch), and an
            # optimizer may step several times a batch (a GAN's critic); the rows carry the
            # logged step, one a batch: every step takes its change by that clock.
            for handle in self.handles:
                handle.clock = lambda: _logged_step(trainer)
        self._start_to_mark = self.mark_start and getattr(trainer, "is_global_zero", True)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        one = len(self.handles) == 1 and self.handles[0].clock is None
        if one:
            self.handles[0].step = int(trainer.global_step)
        if self._start_to_mark and self.control is not None:
            # at the first batch, not at train start: a resumed fit's logged step (batches that
            # stepped) is set right only by then
            self._start_to_mark = False
            _mark_start(self.control.path.parent, (int(trainer.global_step) if one else _logged_step(trainer)) - 1)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._detach()

    def effective_lrs(self) -> list[list[float]]:
        """For each optimizer, each group's LR as its next step will use it."""
        return [h.effective_lrs() for h in self.handles]

    def _detach(self) -> None:
        for handle in self.handles:
            handle.detach()
        self.handles = []


def _default_run_dir(trainer: Any) -> str | os.PathLike:
    """The folder where the daemon writes the control file of the first logger's log:
    ``trainer.log_dir`` for the CSV and TensorBoard loggers; for MLFlowLogger the run's folder
    (``<save_dir>/<experiment id>/<run id>`` in a file store, ``<db folder>/autolr-runs/<run
    id>`` with a SQLite tracking URI); for WandbLogger the ``run-*`` folder above its files."""
    loggers = getattr(trainer, "loggers", None) or []
    logger = loggers[0] if loggers else None
    kind = type(logger).__name__
    if kind == "MLFlowLogger":
        uri = str(getattr(logger, "_tracking_uri", None) or "")
        if uri.startswith("sqlite:///"):
            from ..readers.mlflow import sqlite_run_folder

            return sqlite_run_folder(Path(uri[len("sqlite:///"):]), logger.run_id)
        if logger.save_dir:
            return Path(logger.save_dir) / logger.experiment_id / logger.run_id
    elif kind == "WandbLogger":
        return Path(logger.experiment.dir).parent
    return trainer.log_dir or trainer.default_root_dir


def _mark_start(folder: Path, step: int) -> None:
    """Append ``{"step": step}`` (the last step done; -1 for a new fit) to FIT_START_FILE: the
    logger writes its first rows only at its first flush (100 steps for the CSVLogger), and
    this row lets the daemon list a warmup's or a schedule's changes ahead from the first
    step. A folder that cannot be written is warned
    about, never fatal."""
    try:
        with Logger(folder / FIT_START_FILE) as log:
            log(step)
    except OSError as exc:
        warnings.warn(f"autolr: cannot write {folder / FIT_START_FILE}: {exc}; the daemon sees this fit "
                      "at its logger's first flush", RuntimeWarning, stacklevel=3)


def _logged_step(trainer: Any) -> int:
    """The step Lightning's loggers write on the current batch's rows (batches that stepped)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    return int(step) if isinstance(step, int) else int(trainer.global_step)


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside a LightningOptimizer (``trainer.optimizers`` holds plain ones)."""
    return getattr(optimizer, "_optimizer", optimizer)


_DOC = """Scale every optimizer's LR by the control file of ``run_dir`` (default: ``trainer.log_dir``).

``run_dir``: a run folder, its ``autolr.json``, or a ``Control`` (``DistributedControl`` from
:mod:`autolr.integrations.torch` too). ``min_interval``: stat the file at most every so many
seconds. ``effective_lrs()`` gives each group's LR as the next step uses it.
"""

_classes: dict[str, type] = {}


def _build(name: str) -> type:
    if name not in _classes:
        if name == "AutolrCallback":
            try:
                from lightning.pytorch import Callback
            except ImportError:
                from pytorch_lightning import Callback
        else:
            from pytorch_lightning import Callback
        _classes[name] = type(name, (_AutolrCallbackMixin, Callback),
                              {"__module__": __name__, "__qualname__": name, "__doc__": _DOC})
    return _classes[name]


def __getattr__(name: str) -> Any:
    if name in ("AutolrCallback", "PLAutolrCallback"):
        return _build(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
