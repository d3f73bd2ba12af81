"""Lightning + autolr: a tiny regression whose LR the ``autolr watch`` daemon steers live.

    python examples/lightning/train.py            # starts the daemon itself, on a temp folder

Two-terminal form (the daemon runs on its own, as it would for real jobs)::

    autolr watch runs/ --policy step:step_size=40,gamma=0.5        # terminal 1
    python examples/lightning/train.py --dir runs/ --no-daemon       # terminal 2

What it shows: ``AutolrCallback()`` takes the logger's folder as its run folder; the daemon
reads the Lightning CSVLogger's ``metrics.csv`` there; every optimizer step uses the LR of
``configure_optimizers`` (and its scheduler) × the control file's scale. Each change the
training applied is printed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import lightning.pytorch as L
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from autolr.integrations.lightning import AutolrCallback
from autolr.spawn import say, start_watch, stop_watch

DEFAULT_POLICY = ["step:step_size=40,gamma=0.5"]


class Regression(L.LightningModule):
    def __init__(self, lr: float):
        super().__init__()
        self.lin = torch.nn.Linear(16, 1)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.lin(x), y)
        self.log("loss", loss)  # what the daemon reads, from metrics.csv
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        # Your own schedule stays: autolr's scale multiplies it.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.002 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class PrintChanges(L.Callback):
    """Prints each change of autolr's scale, as the optimizer step applied it."""

    def __init__(self, autolr_cb):
        self.autolr_cb, self.scale, self.changes = autolr_cb, 1.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        handle = self.autolr_cb.handles[0]  # what the step just taken used
        if handle.scale != self.scale:
            self.scale = handle.scale
            self.changes += 1
            lr = handle.last_lrs[0]
            say(f"step {handle.step - 1:4d}: LR {lr:.6g} = your {lr / handle.scale:.6g} x autolr scale "
                  f"{handle.scale:g} (control file #{handle.seq})")



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="folder the daemon watches (default: a new temporary folder)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--policy", action="append", help=f"daemon policy SPEC, repeatable (default {DEFAULT_POLICY})")
    ap.add_argument("--no-daemon", action="store_true", help="an `autolr watch` on --dir is already running")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="autolr-lightning-"))
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    daemon = None if args.no_daemon else start_watch(root, "--no-fsync", *[a for spec in args.policy or DEFAULT_POLICY for a in ("--policy", spec)])
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4096, 16, generator=g)
        y = x @ torch.randn(16, 1, generator=g) + 0.1 * torch.randn(4096, 1, generator=g)
        loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)
        autolr_cb = AutolrCallback()  # run folder: the logger's log_dir
        printer = PrintChanges(autolr_cb)
        trainer = L.Trainer(max_steps=args.steps, callbacks=[autolr_cb, printer],
                            logger=CSVLogger(root, name="lightning", flush_logs_every_n_steps=1),
                            log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, accelerator="cpu", devices=1)
        trainer.fit(Regression(args.lr), loader)
        print(f"run folder {autolr_cb.run_path}: {printer.changes} LR changes applied; "
              f"control file {autolr_cb.run_path / 'autolr.json'}")
    finally:
        if daemon is not None:
            stop_watch(daemon)
    return 0


if __name__ == "__main__":
    sys.exit(main())
