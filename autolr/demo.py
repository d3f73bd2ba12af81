"""``autolr demo``: a simulated training run tuned live by the real ``autolr watch`` daemon.

The "model" is a linear regression trained by minibatch SGD on noisy data: the loss falls,
then levels off at a floor that grows with the learning rate, so every cut of the LR after a
plateau buys a lower validation loss. At the end the same training (same data, same seed) is
run at a constant base LR and at a constant ``min_lr``, in process, for comparison: too high a
constant LR stays above the floor, too low a one has not converged. The loop writes ``metrics.jsonl`` and reads its LR from
``autolr.json`` at every step, exactly as a real training loop would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .control import Control
from .spawn import stop_watch

DEMO_CONFIG = """\
# autolr demo settings: the default policy, auto: a warmup, then a cut when the noisy
# per-step training loss shows no significant improvement (AR(1)-corrected trend test),
# and a divergence guard.
base_lr = {base_lr}
min_lr = {min_lr}
metric = "loss"
policy = ["auto"]
"""


def train(lr_at: Callable[[int, list[dict]], float], *, steps: int, seed: int) -> Iterator[dict]:
    """The demo's training: linear regression by minibatch SGD; yields one log row per step.

    ``lr_at(step, rows)`` gives the LR of each step from the rows logged so far (the loss every
    step, ``val_loss`` every 25), so a chain can drive it in-process (tests) or through a control
    file (the demo).
    """
    rng = np.random.default_rng(seed)
    dim, noise, batch = 40, 1.0, 16
    w_true = rng.normal(size=dim)
    x_val = rng.normal(size=(2000, dim))
    y_val = x_val @ w_true + noise * rng.normal(size=2000)
    w = np.zeros(dim)
    rows: list[dict] = []
    for step in range(steps):
        lr = lr_at(step, rows)
        x = rng.normal(size=(batch, dim))
        y = x @ w_true + noise * rng.normal(size=batch)
        err = x @ w - y
        w -= lr * (x.T @ err) / batch
        row = {"step": step, "loss": round(float(np.mean(err**2) / 2), 6), "lr": lr}
        if step % 25 == 24:
            row["val_loss"] = round(float(np.mean((x_val @ w - y_val) ** 2) / 2), 6)
        rows.append(row)
        yield row


def simulate(run_dir: Path, ctl: Control, *, steps: int, base_lr: float, seed: int,
             echo: Callable[[str], None], step_seconds: float = 0.01) -> tuple[list[tuple[int, float]], float | None]:
    """Train, logging to ``run_dir/metrics.jsonl``; return the (step, lr) changes applied and
    the last validation loss."""
    applied = [(0, ctl.lr(base_lr))]
    seq = ctl.seq

    def lr_at(step: int, rows: list[dict]) -> float:
        nonlocal seq
        lr = ctl.lr(base_lr)
        if ctl.seq != seq:
            seq = ctl.seq
            rec = ctl.record() or {}
            quiet = "warmup" in (rec.get("reason") or "") or (
                "factor" in (rec.get("reason") or "") and lr < base_lr and 1 < len(applied) and step <= 101)
            if not quiet:  # warmup moves every step: show its first and last change
                val = _last_val_loss(rows)
                seen = f", val_loss {val:.4f}" if val is not None else ""
                echo(f"  step {step:5d}: lr {applied[-1][1]:.4g} -> {lr:.4g}{seen}   ({rec.get('reason')})")
            applied.append((step, lr))
        return lr

    val = None
    with open(run_dir / "metrics.jsonl", "a", buffering=1) as log:
        for row in train(lr_at, steps=steps, seed=seed):
            log.write(json.dumps(row) + "\n")
            val = row.get("val_loss", val)
            time.sleep(step_seconds)
    return applied, val


def _last_val_loss(rows: list[dict]) -> float | None:
    """The latest ``val_loss`` logged (one every 25 rows)."""
    for row in reversed(rows[-25:]):
        if "val_loss" in row:
            return row["val_loss"]
    return None


def constant_val_loss(lr: float, *, steps: int, seed: int) -> float | None:
    """The last validation loss of the same training (same data, same seed) at a constant LR."""
    val = None
    for row in train(lambda step, rows: lr, steps=steps, seed=seed):
        val = row.get("val_loss", val)
    return val


def run_demo(folder: Path, *, steps: int = 1500, seed: int = 0, base_lr: float = 0.05,
             echo: Callable[[str], None] = print) -> list[tuple[int, float]]:
    """Start the daemon on ``folder``, run the simulated training, stop the daemon."""
    folder = folder.resolve()
    run_dir = folder / "run-1"
    if run_dir.exists():
        for name in ("metrics.jsonl", "autolr.json", "autolr.decisions.jsonl", "autolr.state.json"):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (folder / "autolr.toml").write_text(DEMO_CONFIG.format(base_lr=base_lr, min_lr=base_lr / 100))
    (run_dir / "metrics.jsonl").touch()
    daemon_log = open(folder / "autolr.daemon.log", "w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "autolr.cli", "watch", str(folder), "--no-fsync"],
        stdout=daemon_log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        _wait_for(lambda: "catching up" in (folder / "autolr.daemon.log").read_text() or daemon.poll() is not None)
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited early:\n{(folder / 'autolr.daemon.log').read_text()}")
        echo(f"autolr demo: daemon watching {folder} (pid {daemon.pid}); simulated training in {run_dir}")
        echo(f"  policy: auto (warmup 100 steps, trend-test decay, divergence guard) on the training loss; "
             f"base lr {base_lr}, min lr {base_lr / 100}")
        applied, val = simulate(run_dir, Control(run_dir), steps=steps, base_lr=base_lr, seed=seed, echo=echo)
    finally:
        stop_watch(daemon)
        daemon_log.close()
    echo(f"done: {len(applied) - 1} LR changes applied.")
    if val is not None:
        fixed = "; ".join(f"at a constant lr {lr:g}: {constant_val_loss(lr, steps=steps, seed=seed):.4f}"
                          for lr in (base_lr, base_lr / 100))
        echo(f"  final val_loss {val:.4f} (the noise floor is 0.5); the same data and seed {fixed}")
    echo(f"Look at {run_dir}:")
    echo("  metrics.jsonl (the log), autolr.json (control file), autolr.decisions.jsonl (journal)")
    echo(f"  autolr status {folder}    autolr replay {run_dir / 'metrics.jsonl'} --config {folder / 'autolr.toml'}")
    return applied


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError("timed out waiting for the daemon")
