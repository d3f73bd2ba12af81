"""JAX/optax: the control file's scale goes into the optimizer state while the real daemon runs."""
from __future__ import annotations

import time

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import autolr  # noqa: E402
from autolr.integrations import optax as autolr_optax  # noqa: E402

from .framework_util import check_applied, daemon, daemon_log, journal_summary, late_warnings, wait_control  # noqa: E402

STEPS = 140
SCHEDULE = optax.linear_schedule(0.05, 0.02, STEPS)  # the user's own schedule


def loss_fn(w, x, y):
    return jnp.mean((x @ w - y) ** 2) / 2


def train(run, tx, *, base_lr=None, delay=0.008):
    """A jitted SGD loop; returns {step: LR really applied}, measured as -update / gradient."""
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=4).astype(np.float32)
    w = jnp.zeros(4)
    opt_state = tx.init(w)
    traces = []

    @jax.jit
    def step_fn(w, opt_state, x, y):
        traces.append(1)
        loss, g = jax.value_and_grad(loss_fn)(w, x, y)
        updates, opt_state = tx.update(g, opt_state, w)
        return optax.apply_updates(w, updates), opt_state, loss, updates, g

    control = autolr.Control(run)
    applied = {}
    with autolr.Logger(run / "metrics.jsonl") as log:
        for step in range(STEPS):
            opt_state = autolr_optax.apply_control(opt_state, control, step, base_lr=base_lr)
            x = rng.normal(size=(32, 4)).astype(np.float32)
            y = x @ w_true
            w, opt_state, loss, updates, g = step_fn(w, opt_state, x, y)
            g, u = np.asarray(g, np.float64), np.asarray(updates, np.float64)
            k = int(np.argmax(np.abs(g)))
            applied[step] = -u[k] / g[k]
            log(step, loss=float(loss))
            time.sleep(delay)
    assert len(traces) == 1, "setting the scale must not retrace the jitted step"
    return applied


@pytest.mark.parametrize("mode", ["scaled", "inject"])
def test_optax_follows_the_daemon(tmp_path, mode):
    root = tmp_path / "runs"
    run = root / "exp"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").touch()
    if mode == "scaled":  # the user's optimizer with its schedule, unchanged, then autolr's multiplier
        tx, base_lr = autolr_optax.scaled(optax.sgd(SCHEDULE)), None
    else:  # the LR hyperparameter itself, the schedule evaluated on the host
        tx, base_lr = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05), SCHEDULE
    with daemon(root):
        wait_control(run)
        with late_warnings() as late:
            applied = train(run, tx, base_lr=base_lr)
    user = {s: float(SCHEDULE(s)) for s in range(STEPS)}
    try:
        check_applied(run, applied, user, late=late, rel=1e-4)
    except AssertionError:
        print(daemon_log(root), journal_summary(run))
        raise


def test_set_hyperparam_is_pure_and_keeps_dtype():
    tx = autolr_optax.scaled(optax.adam(1e-3))
    state = tx.init({"w": jnp.ones(3, dtype=jnp.bfloat16)})
    new = autolr_optax.set_scale(state, 0.25)
    assert autolr_optax.get_hyperparam(state, autolr_optax.SCALE) == 1.0  # the old state is untouched
    assert autolr_optax.get_hyperparam(new, autolr_optax.SCALE) == 0.25
    old_leaf = state[1].hyperparams[autolr_optax.SCALE]
    new_leaf = new[1].hyperparams[autolr_optax.SCALE]
    assert new_leaf.dtype == old_leaf.dtype and new_leaf.shape == old_leaf.shape
    with pytest.raises(KeyError, match="inject_hyperparams"):
        autolr_optax.set_lr(state, 0.1)
    # Nested states (gradient accumulation) are found too.
    multi = optax.MultiSteps(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), every_k_schedule=2)
    mstate = autolr_optax.set_lr(multi.init(jnp.ones(2)), 0.03)
    assert autolr_optax.get_hyperparam(mstate, "learning_rate") == pytest.approx(0.03)
