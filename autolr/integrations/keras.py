"""Keras 3: ``AutolrCallback``, a ``keras.callbacks.Callback``.

Rule: each training batch runs with ``LR = base × scale``, ``scale`` being the control file's
multiplier in force at optimizer step ``optimizer.iterations``.

* A float LR (a variable): ``base`` is the optimizer's LR as it stands when the batch begins,
  so whatever else sets it (``LearningRateScheduler``, ``ReduceLROnPlateau``, your code) keeps
  working. The callback sets ``base × scale`` at batch begin and puts ``base`` back at batch
  end, so other callbacks and a saved model see your LR, never autolr's factor: in-process
  schedules and autolr compose by multiplication. ``base_lr=`` fixes the base instead.
* A ``LearningRateSchedule``: it cannot be assigned, so at train begin the callback wraps it,
  ``optimizer.learning_rate = ScaledSchedule(schedule, scale)``, a schedule returning
  ``schedule(step) × scale`` where ``scale`` is a variable the callback sets each batch; the
  original schedule is put back at train end. ``base_lr`` is refused with a schedule. A model
  saved during the fit stores the wrapper (registered as ``autolr>ScaledSchedule``; loading
  it needs this module imported) with the scale reset to 1.

Backends: torch and TensorFlow, where the train step reads the optimizer's variables live.
JAX is refused with an error: its trainer keeps the optimizer state outside the variables
between epochs, so a per-batch change would be lost (use :mod:`autolr.integrations.optax`).
With ``steps_per_execution > 1`` callbacks run once per execution: a change lands at the
next one.

Keras's ``CSVLogger`` writes one row per epoch. ``log_metrics=True`` also appends each
batch's logs to ``run_dir/metrics.jsonl`` (``{"step": ..., "loss": ...}``; epoch-end logs such
as ``val_loss`` too, with ``epoch``) so the daemon sees the run step by step. Keras's batch
``loss`` is the running mean over the epoch so far (what the progress bar shows): smooth within
an epoch, reset at its start, which a trend test or a divergence guard would misread. The
callback logs each batch's own loss instead, recovered from consecutive running means
(:func:`batch_loss`); the other metrics are logged as Keras reports them.

    model.fit(x, y, callbacks=[AutolrCallback("runs/exp1", log_metrics=True)])
    # beside it:  autolr watch runs/
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras

from ..control import Control
from ..logger import Logger

__all__ = ["AutolrCallback", "ScaledSchedule"]


@keras.saving.register_keras_serializable(package="autolr")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """``schedule(step) × scale``: a wrapped schedule and a scalar variable set from outside."""

    def __init__(self, schedule: Any, scale: Any = None):
        self.schedule = schedule
        self.scale = scale if scale is not None else keras.Variable(1.0, trainable=False, dtype="float32",
                                                                    name="autolr_scale")

    def __call__(self, step: Any) -> Any:
        lr = keras.ops.convert_to_tensor(self.schedule(step))
        return keras.ops.multiply(lr, keras.ops.cast(self.scale, lr.dtype))

    def get_config(self) -> dict[str, Any]:
        return {"schedule": keras.saving.serialize_keras_object(self.schedule)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ScaledSchedule":
        return cls(keras.saving.deserialize_keras_object(config["schedule"]))


class AutolrCallback(keras.callbacks.Callback):
    """Scale the optimizer's LR by the control file of ``run_dir`` at every training batch.

    ``run_dir``: a run folder, its ``autolr.json`` or a ``Control``. ``base_lr``: a fixed
    base instead of the optimizer's own LR (float LRs only). ``log_metrics``: append each
    batch's logs to ``run_dir/metrics.jsonl`` for the daemon. After a batch: ``step`` is its
    optimizer step, ``scale`` and ``seq`` the control entry it used, ``applied`` its LR (float
    LRs; None while the scale is 1 or with a schedule).
    """

    def __init__(self, run_dir: str | os.PathLike | Control, base_lr: float | None = None, *,
                 log_metrics: bool = False, min_interval: float = 0.0):
        super().__init__()
        self.control = run_dir if isinstance(run_dir, Control) else Control(run_dir, min_interval=min_interval)
        self.base_lr = base_lr
        self.log_metrics = log_metrics
        self.applied: float | None = None
        self._logger: Logger | None = None
        self._wrapped: ScaledSchedule | None = None
        self._original: Any = None
        self._restore: float | None = None  # the base LR to put back at batch end
        self.step = 0  # the optimizer step of the current (or last) batch
        self.scale = 1.0
        self.seq = 0
        self._mean: tuple[int, float] | None = None  # (batch, Keras's running loss) last logged

    @property
    def run_path(self) -> Path:
        return self.control.path.parent

    # ---- training ------------------------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        if keras.backend.backend() == "jax":
            raise RuntimeError("autolr's Keras callback needs the torch or tensorflow backend: the JAX trainer "
                               "does not read optimizer variables set by callbacks during an epoch; "
                               "use autolr.integrations.optax for JAX")
        optimizer = self.model.optimizer
        lr = getattr(optimizer, "_learning_rate", None)
        if isinstance(lr, ScaledSchedule):  # left by an interrupted fit
            lr = lr.schedule
            optimizer.learning_rate = lr
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            if self.base_lr is not None:
                raise ValueError("AutolrCallback: base_lr cannot be combined with a LearningRateSchedule: "
                                 "the schedule is the base, autolr's scale multiplies it")
            self._original = lr
            self._wrapped = ScaledSchedule(lr)
            optimizer.learning_rate = self._wrapped
        elif callable(lr) and not isinstance(lr, keras.Variable):
            raise TypeError("AutolrCallback: a callable learning_rate is not supported; "
                            "use a float or a keras LearningRateSchedule")
        if self.log_metrics and self._logger is None:
            self._logger = Logger(self.run_path / "metrics.jsonl")

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        optimizer = self.model.optimizer
        if self._restore is not None:  # a batch that never ended (an interrupted fit)
            optimizer.learning_rate, self._restore = self._restore, None
        self.step = int(_number(optimizer.iterations))
        entry = self.control.entry(step=self.step)
        scale, self.seq = (entry["scale"], entry["seq"]) if entry is not None else (1.0, 0)
        if self._wrapped is not None:
            if scale != self.scale:
                self._wrapped.scale.assign(scale)
            self.scale = scale
            self.applied = None
            return
        if scale == 1.0 and self.base_lr is None:
            self.scale, self.applied = scale, None  # nothing to change, nothing to read
            return
        base = self.base_lr if self.base_lr is not None else float(_number(optimizer.learning_rate))
        self._restore = base
        self.scale = scale
        self.applied = base * scale
        optimizer.learning_rate = self.applied

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._mean = None  # Keras restarts its running means with the epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._restore is not None:
            self.model.optimizer.learning_rate = self._restore
            self._restore = None
        if self._logger is not None and logs:
            numbers = _numbers(logs)
            if "loss" in numbers:
                numbers["loss"], self._mean = batch_loss(numbers["loss"], batch, self._mean)
            self._logger(self.step, **numbers)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._logger is not None and logs:
            epoch_logs = {k: v for k, v in _numbers(logs).items() if k.startswith("val_")}
            if epoch_logs:
                self._logger(self.step, epoch=epoch, **epoch_logs)  # Keras's index, as its CSVLogger

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._restore is not None:
            self.model.optimizer.learning_rate, self._restore = self._restore, None
        if self._wrapped is not None:
            self.model.optimizer.learning_rate = self._original
            self._wrapped = self._original = None
        self.scale = 1.0
        if self._logger is not None:
            self._logger.close()
            self._logger = None


def batch_loss(mean: float, batch: int, last: tuple[int, float] | None) -> tuple[float, tuple[int, float]]:
    """The mean loss of the batches since ``last``, from Keras's running mean over the epoch.

    ``mean`` is the mean over the epoch's batches 0..``batch``; ``last`` = (a, m_a) the batch
    index and running mean of the previous call in this epoch (None at its start: a = -1,
    m = 0). Batches a+1..b have the mean ((b + 1)·m_b - (a + 1)·m_a) / (b - a): exact for
    batches of equal size (Keras weights by samples, so an epoch's smaller last batch comes
    out between its own loss and the running mean), one batch's loss when callbacks run every
    batch, a block's with ``steps_per_execution``. Float32 running means cancel to a relative
    error of about (b + 1)·6e-8. Returns the value and the new ``last``.
    """
    a, m_a = last if last is not None and last[0] < batch else (-1, 0.0)
    value = ((batch + 1) * mean - (a + 1) * m_a) / (batch - a)
    return value, (batch, mean)


def _number(x: Any) -> Any:
    return x.numpy() if hasattr(x, "numpy") else keras.ops.convert_to_numpy(x)


def _numbers(logs: dict) -> dict[str, float]:
    out = {}
    for key, value in logs.items():
        try:
            value = float(_number(value)) if not isinstance(value, (int, float)) else float(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out
