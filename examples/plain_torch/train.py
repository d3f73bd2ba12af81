"""A plain PyTorch loop tuned live by autolr: ``python examples/plain_torch/train.py``.

It starts ``autolr watch`` on the run folder as a subprocess, trains a tiny MLP (synthetic
regression, SGD with momentum and the user's own cosine schedule), logs with ``autolr.log``,
lets ``autolr.integrations.torch.attach`` scale the optimizer's LRs by the control file, prints
each LR change the optimizer applied, and stops the daemon.

Two-terminal form (the same loop, your own daemon)::

    autolr watch runs/exp1 --policy step:step_size=60,gamma=0.5     # terminal 1
    python examples/plain_torch/train.py --run runs/exp1 --no-daemon  # terminal 2

Options: ``--run DIR`` (default: a temporary folder), ``--steps N``, ``--policy SPEC``
(repeatable; default ``step:step_size=60,gamma=0.5``), ``--apply-margin N`` (multi-rank style
step-exact changes), ``--no-daemon``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import autolr
from autolr.integrations.torch import attach
from autolr.spawn import stop_watch


def start_daemon(run: Path, policies: list[str], margin: int | None, log: Path) -> subprocess.Popen:
    """``autolr watch RUN`` in the background; its output goes to ``log`` (outside the run:
    a ``.log`` file inside would be taken for a training log)."""
    cmd = [sys.executable, "-m", "autolr.cli", "watch", str(run), "--no-fsync"]
    for spec in policies:
        cmd += ["--policy", spec]
    if margin is not None:
        cmd += ["--apply-margin", str(margin)]
    with open(log, "a") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)



def wait_for(path: Path, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise SystemExit(f"autolr watch did not write {path} within {timeout:.0f} s")
        time.sleep(0.02)


def train(run: Path, steps: int, step_time: float) -> list[tuple[int, float, int]]:
    """Train; return the (step, lr, decision seq) of every LR change the optimizer applied."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.01)  # your own schedule
    handle = attach(opt, run)  # used LR = your LR (scheduler included) x the control file's scale
    w_true = torch.randn(16, 1)
    changes, last_seq = [], None
    for step in range(steps):
        x = torch.randn(64, 16)
        y = x @ w_true + 0.1 * torch.randn(64, 1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()  # the pre-hook applies the scale in force at this step
        sched.step()
        autolr.log(step, loss=loss.detach())  # one JSON line, in the file when this returns
        if handle.seq != last_seq:
            record = handle.control.record() or {}
            why = record.get("reason", "no decision yet") if record.get("seq") == handle.seq else ""
            print(f"step {step:4d}: lr {handle.last_lrs[0]:.5f} = yours {handle.last_lrs[0] / handle.scale:.5f} "
                  f"x scale {handle.scale:.4g} (decision #{handle.seq}) {why}", flush=True)
            changes.append((step, handle.last_lrs[0], handle.seq))
            last_seq = handle.seq
        time.sleep(step_time)  # stands in for real work; the daemon reacts within milliseconds
    print(f"done: {steps} steps, final loss {loss.item():.4f}, {len(changes) - 1} LR changes applied "
          f"by autolr; run folder {run}", flush=True)
    return changes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="run folder (default: a new temporary folder)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--step-time", type=float, default=0.01, help="seconds of simulated work per step")
    ap.add_argument("--policy", action="append", help="autolr policy SPEC (repeatable)")
    ap.add_argument("--apply-margin", type=int)
    ap.add_argument("--no-daemon", action="store_true", help="use a daemon you started yourself")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = args.run or Path(tempfile.mkdtemp(prefix="autolr-example-"))
    autolr.init(run)  # autolr.log writes run/metrics.jsonl (the folder is created)
    daemon_log = Path(tempfile.gettempdir()) / f"autolr-watch-{os.getpid()}.log"
    daemon = None if args.no_daemon else start_daemon(run, args.policy or ["step:step_size=60,gamma=0.5"],
                                                      args.apply_margin, daemon_log)
    try:
        wait_for(run / "autolr.json")  # the daemon has picked the run up
        train(run, args.steps, args.step_time)
    finally:
        if daemon is not None:
            stop_watch(daemon)  # SIGTERM: the daemon saves its state and exits
            print(f"daemon output: {daemon_log}")


if __name__ == "__main__":
    main()
