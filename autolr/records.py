"""The record: one row of a training log, as every reader returns it."""
from __future__ import annotations

from dataclasses import dataclass, field

#: Keys that readers map to the step counter, in order of preference.
STEP_KEYS = ("step", "global_step", "trainer/global_step", "train/global_step", "iter", "iteration", "num_updates",
             "_step")
#: Keys that readers map to the epoch counter.
EPOCH_KEYS = ("epoch", "train/epoch")


@dataclass(frozen=True, slots=True, init=False)
class Record:
    """One log row: numeric metrics plus the step and epoch counters when the log has them.

    ``run`` names a run inside a source that holds several (an MLflow database); None means
    the run of the file's folder. ``restart`` marks the first record of a resumed segment
    (TensorBoard's ``purge_step``): the run's history is cut at its step.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    step: int | None = None
    epoch: float | None = None
    run: str | None = None
    restart: bool = False

    def __init__(self, metrics: dict[str, float] | None = None, step: int | None = None,
                 epoch: float | None = None, run: str | None = None, restart: bool = False):
        # The slot setters directly: a frozen dataclass's own __init__ goes through
        # object.__setattr__ five times, about a third slower.
        _metrics(self, {} if metrics is None else metrics)
        _step(self, step)
        _epoch(self, epoch)
        _run(self, run)
        _restart(self, restart)


_metrics, _step, _epoch, _run, _restart = (
    Record.__dict__[name].__set__ for name in ("metrics", "step", "epoch", "run", "restart"))


def split_counters(values: dict[str, float], copy: bool = True) -> Record:
    """Move the step/epoch counters out of a flat dict of numbers into a Record.

    ``copy=False``: ``values`` is the caller's to give away; the Record keeps it as its
    metrics (with the counters taken out) instead of a copy."""
    metrics = dict(values) if copy else values
    step = epoch = None
    for key in STEP_KEYS:
        if key in metrics:
            v = metrics.pop(key)
            if step is None and v == v and abs(v) < 2**63:
                step = int(v)
    for key in EPOCH_KEYS:
        if key in metrics:
            v = metrics.pop(key)
            if epoch is None and v == v:
                epoch = float(v)
    return Record(metrics, step, epoch)
