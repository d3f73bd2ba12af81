"""Keras 3 + autolr: a tiny regression whose LR the ``autolr watch`` daemon steers live.

    python examples/keras/train.py                # torch backend; starts the daemon itself

Two-terminal form (the daemon runs on its own, as it would for real jobs)::

    autolr watch runs/ --policy step:step_size=40,gamma=0.5        # terminal 1
    python examples/keras/train.py --dir runs/ --no-daemon           # terminal 2

What it shows: ``AutolrCallback(run_dir, log_metrics=True)`` writes each batch's logs to
``run_dir/metrics.jsonl`` (Keras's CSVLogger writes only one row per epoch) and runs every
batch with the optimizer's own LR (here stepped per epoch by your LearningRateScheduler) ×
the control file's scale. Each change the training applied is printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # also works with tensorflow; not with jax

import numpy as np  # noqa: E402
import keras  # noqa: E402

from autolr.integrations.keras import AutolrCallback  # noqa: E402
from autolr.spawn import say, start_watch, stop_watch

DEFAULT_POLICY = ["step:step_size=40,gamma=0.5"]


class PrintChanges(keras.callbacks.Callback):
    """Prints each change of autolr's scale, as the batch applied it."""

    def __init__(self, autolr_cb):
        super().__init__()
        self.autolr_cb, self.scale, self.changes = autolr_cb, 1.0, 0

    def on_train_batch_end(self, batch, logs=None):
        cb = self.autolr_cb
        if cb.scale != self.scale:
            self.scale = cb.scale
            self.changes += 1
            # cb.applied: the LR this batch ran with (None at scale 1: then it was your LR)
            lr = cb.applied if cb.applied is not None else float(self.model.optimizer.learning_rate.numpy())
            say(f"step {cb.step:4d}: LR {lr:.6g} = your {lr / cb.scale:.6g} x autolr scale "
                f"{cb.scale:g} (control file #{cb.seq})")



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="folder the daemon watches (default: a new temporary folder)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps-per-epoch", type=int, default=25)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--policy", action="append", help=f"daemon policy SPEC, repeatable (default {DEFAULT_POLICY})")
    ap.add_argument("--no-daemon", action="store_true", help="an `autolr watch` on --dir is already running")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="autolr-keras-"))
    run = root / "keras"
    run.mkdir(parents=True, exist_ok=True)
    if keras.backend.backend() == "torch":
        import torch
        torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    daemon = None if args.no_daemon else start_watch(root, "--no-fsync", *[a for spec in args.policy or DEFAULT_POLICY for a in ("--policy", spec)])
    try:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(args.steps_per_epoch * 32, 16)).astype("float32")
        y = (x @ rng.normal(size=(16, 1)) + 0.1 * rng.normal(size=(len(x), 1))).astype("float32")
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(args.lr, momentum=0.9), loss="mse")
        autolr_cb = AutolrCallback(run, log_metrics=True)
        printer = PrintChanges(autolr_cb)
        your_schedule = keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.95 if epoch else lr)
        model.fit(x, y, batch_size=32, epochs=args.epochs, verbose=0,
                  callbacks=[your_schedule, autolr_cb, printer])
        print(f"run folder {run}: {printer.changes} LR changes applied; control file {run / 'autolr.json'}")
    finally:
        if daemon is not None:
            stop_watch(daemon)
    return 0


if __name__ == "__main__":
    sys.exit(main())
