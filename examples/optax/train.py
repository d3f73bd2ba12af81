"""JAX/optax + autolr: a tiny jitted regression whose LR the ``autolr watch`` daemon steers live.

    python examples/optax/train.py                # starts the daemon itself, on a temp folder

Two-terminal form (the daemon runs on its own, as it would for real jobs)::

    autolr watch runs/ --policy step:step_size=40,gamma=0.5        # terminal 1
    python examples/optax/train.py --dir runs/ --no-daemon           # terminal 2

What it shows: ``autolr_optax.scaled(tx)`` keeps your optimizer and its schedule as they are
and adds a multiplier held in the optimizer state; ``apply_control`` sets it from the control
file before each step, outside ``jit`` (a new state, same dtype: the step is never retraced).
The loop logs with ``autolr.log`` to ``metrics.jsonl``. Each change applied is printed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import autolr
from autolr.integrations import optax as autolr_optax
from autolr.spawn import say, start_watch, stop_watch

DEFAULT_POLICY = ["step:step_size=40,gamma=0.5"]



def train(run: Path, steps: int, lr: float) -> int:
    schedule = optax.cosine_decay_schedule(lr, decay_steps=steps, alpha=0.1)  # your own schedule
    tx = autolr_optax.scaled(optax.sgd(schedule, momentum=0.9))               # line 1 of 3
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(16,)).astype("float32")
    params = jnp.zeros(16)
    opt_state = tx.init(params)
    control = autolr.Control(run)                                              # line 2 of 3

    @jax.jit
    def step_fn(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((x @ p - y) ** 2) / 2)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    autolr.init(run)  # autolr.log writes run/metrics.jsonl
    scale, changes = 1.0, 0
    for step in range(steps):
        opt_state = autolr_optax.apply_control(opt_state, control, step)      # line 3 of 3
        x = rng.normal(size=(32, 16)).astype("float32")
        y = x @ w_true + 0.1 * rng.normal(size=32).astype("float32")
        params, opt_state, loss = step_fn(params, opt_state, x, y)
        autolr.log(step, loss=float(loss))
        new = autolr_optax.get_hyperparam(opt_state, autolr_optax.SCALE)
        if new != scale:
            scale, changes = new, changes + 1
            yours = float(schedule(step))
            say(f"step {step:4d}: LR {yours * scale:.6g} = your {yours:.6g} x autolr scale {scale:g} "
                f"(control file #{control.seq})")
    return changes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="folder the daemon watches (default: a new temporary folder)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--policy", action="append", help=f"daemon policy SPEC, repeatable (default {DEFAULT_POLICY})")
    ap.add_argument("--no-daemon", action="store_true", help="an `autolr watch` on --dir is already running")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="autolr-optax-"))
    run = root / "optax"
    run.mkdir(parents=True, exist_ok=True)
    daemon = None if args.no_daemon else start_watch(root, "--no-fsync", *[a for spec in args.policy or DEFAULT_POLICY for a in ("--policy", spec)])
    try:
        changes = train(run, args.steps, args.lr)
        say(f"run folder {run}: {changes} LR changes applied; control file {run / 'autolr.json'}")
    finally:
        if daemon is not None:
            stop_watch(daemon)
    return 0


if __name__ == "__main__":
    sys.exit(main())
