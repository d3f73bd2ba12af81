"""plateau method=trend through the real chain: sparse metrics, warmup, windows in rows."""
import json

import numpy as np
import pytest
from scipy import special

from autolr import trend
from autolr.chain import build_chain
from autolr.demo import train
from autolr.plugins import policy_classes
from autolr.policy import PolicyError
from autolr.records import Record
from autolr.spec import parse_spec

REGISTRY = policy_classes()


def sparse_first_cut(val, steps=3000, every=25, seed=0, **params):
    """Feed a training loss every step and ``val(step)`` as val_loss every ``every`` steps."""
    rng = np.random.default_rng(seed)
    chain = build_chain([("plateau", params)], REGISTRY, base_lr=0.1)
    state = chain.init()
    for s in range(steps):
        metrics = {"loss": float(1 + 0.3 * rng.standard_normal())}
        if s % every == every - 1:
            metrics["val_loss"] = float(val(s))
        state, d = chain.update(state, Record(metrics=metrics, step=s))
        if d is not None:
            return s, d, state
    return None, None, state


NOISE = 0.005 * np.random.default_rng(1).standard_normal(10_000)


@pytest.mark.parametrize("shape", ["exponential", "linear"])
def test_sparse_validation_loss_is_cut_after_it_levels_off(shape):
    """val_loss every 25 steps: 120 observations in 3000 rows, far fewer than window + history
    in observations. Windows count rows, with at least min_window observations."""
    onset = 1000
    if shape == "exponential":
        def val(s):
            return 0.5 + 0.5 * np.exp(-min(s, onset) / 300) + NOISE[s]
    else:
        def val(s):
            return 1 - 2e-4 * min(s, onset) + NOISE[s]
    s, d, _ = sparse_first_cut(val)
    assert s is not None and onset <= s <= onset + 600, s
    assert d.evidence["plateau"]["metric"] == "val_loss" and "val_loss" in d.reason


def epoch_first_cut(val, epochs=60, **params):
    """One row per epoch and no step (Keras's CSVLogger): loss and val_loss."""
    chain = build_chain([("plateau", params)], REGISTRY, base_lr=0.1)
    state = chain.init()
    for ep in range(epochs):
        state, d = chain.update(state, Record(metrics={"loss": 0.8 * val(ep), "val_loss": val(ep)}, epoch=float(ep)))
        if d is not None:
            return ep, d, state
    return None, None, state


def test_epoch_level_log_is_decided_in_epochs():
    """An epoch-level log is decided over epoch_window epochs with epoch_history kept, tested
    every epoch. Before, 100 rows were 100 epochs: no test ran in a 60-epoch run."""
    noise = 0.02 * np.random.default_rng(0).standard_normal(60)
    ep, d, state = epoch_first_cut(lambda e: 2.0 * np.exp(-min(e, 25) / 5) + 0.4 + 0.4 * noise[e])
    assert ep is not None and 30 <= ep <= 55 and "val_loss" in d.reason
    assert state["unit"] == "epoch"
    ep, _, _ = epoch_first_cut(lambda e: 2.0 * np.exp(-e / 40) + 0.3 + 0.002 * noise[e])  # still declining
    assert ep is None
    with pytest.raises(PolicyError):
        build_chain([("plateau", {"epoch_window": 4})], REGISTRY)
    with pytest.raises(PolicyError):  # a trend parameter
        build_chain([("plateau", {"method": "threshold", "epoch_history": 50})], REGISTRY)


def test_progress_epochs_are_decided_in_rows():
    """Fractional epochs (Hugging Face's printed logs, 100 rows an epoch) keep ``history`` rows
    and test over ``window`` rows: epoch_window/epoch_history are for one row an epoch."""
    chain = build_chain([("plateau", {})], REGISTRY, base_lr=0.1)
    state = chain.init()
    for i in range(1, 301):
        state, _ = chain.update(state, Record(metrics={"loss": 2.0 - i / 1000}, epoch=i / 100))
    assert state["progress"] and len(state["policies"][0]["values"]) == 300  # not epoch_history (100)


def test_sparse_steady_decline_is_not_cut():
    s, _, state = sparse_first_cut(lambda s: 1 - 2e-4 * s + NOISE[s])
    assert s is None
    pstate = state["policies"][0]
    assert pstate["rows"] == 3000 - 24  # rows since the monitor moved to val_loss (step 24)
    assert len(pstate["values"]) == 1500 // 25  # the observations of the last `history` rows
    assert len(pstate["runs"]) == 1  # times and rows at a fixed stride: one run


def test_sparse_flat_metric_waits_for_min_window_observations():
    s, d, _ = sparse_first_cut(lambda s: 1 + NOISE[s])
    assert s is not None and s >= 24 + 20 * 25 - 1  # 20 observations after the switch to val_loss
    assert d.evidence["plateau"]["n"] >= 20


def test_min_window_is_checked_and_capped_by_window():
    with pytest.raises(PolicyError, match="min_window"):
        build_chain([("plateau", {"min_window": 4})], REGISTRY)
    with pytest.raises(PolicyError, match="method=trend"):
        build_chain([("plateau", {"method": "threshold", "min_window": 30})], REGISTRY)
    p = REGISTRY["plateau"](window=10, min_window=50)
    assert p.recent_count([[0, 1, 1, 1, 0, 3]], 3) == 10


def test_dense_metric_tests_every_row_count_as_before():
    """One observation per row: windows in rows are windows in observations."""
    rng = np.random.default_rng(8)
    y = 1 + 2e-4 * (2000 - np.arange(2000)) + 0.02 * rng.standard_normal(2000)
    chain = build_chain([("plateau", {"history": 100, "slowdown": False})], REGISTRY, base_lr=1.0)
    state, cut = chain.init(), None
    for t, v in enumerate(y):
        state, d = chain.update(state, Record(metrics={"loss": float(v)}, step=t))
        if d is not None:
            cut = t
            break
    x = np.arange(2000.0)
    expect = next(i for i in range(99, 2000, 10) if trend.improvement_test(y[i - 99:i + 1], x[i - 99:i + 1]).p >= 0.05)
    assert cut == expect


def closed_loop(specs, steps=1500, seed=0):
    """The demo's training driven in-process by a chain: first step of each plateau cut."""
    chain = build_chain([parse_spec(s) for s in specs], REGISTRY, base_lr=0.05, min_lr=0.0005, metric="loss")
    box = {"state": chain.init()}
    cuts = []

    def lr_at(step, rows):
        if rows:
            r = rows[-1]
            metrics = {k: v for k, v in r.items() if k not in ("step", "lr")}
            box["state"], d = chain.update(box["state"], Record(metrics=metrics, step=r["step"]))
            if d is not None and d.policy.startswith("plateau"):
                cuts.append(r["step"])
        return chain.lr(box["state"])

    for _ in train(lr_at, steps=steps, seed=seed):
        pass
    return cuts


def test_warmup_then_plateau_on_the_demo_curve():
    """Regression: with a warmup first, plateau's history starts after the steep part of the
    curve: a short drop (about 20 rows) and then a long flat stretch with a faint residual
    decline. The least-squares slope over everything kept showed that drop as improvement for
    over a thousand rows, and the faded test measured the pace over everything kept (the flat
    stretch included) against the last 100 rows only: the first cut came at step 1189 (auto:
    249). The faded test now compares a flat stretch of any length with the pace of the
    observations before it."""
    with_warmup = closed_loop(["warmup:steps=100,start_factor=0.1", "plateau"])
    assert with_warmup and 250 <= with_warmup[0] <= 600, with_warmup
    alone = closed_loop(["plateau"])
    assert alone and alone[0] < 300, alone


def test_faded_sees_a_short_decline_then_a_long_flat_stretch():
    rng = np.random.default_rng(4)
    x = np.arange(800.0)
    flat_after = 1.0 + 0.2 * np.maximum(100 - x, 0) / 100 + 0.05 * rng.standard_normal(800)
    f = trend.faded_test(flat_after, x)
    assert f.stopped and f.recent >= 100 and f.n - f.recent >= 100
    steady = 1.0 + 0.2 * (800 - x) / 100 + 0.05 * rng.standard_normal(800)
    assert not trend.faded_test(steady, x).stopped
    # scale, shift and mode invariance
    g = trend.faded_test(-(3 * flat_after + 7), x, mode="max")
    assert (g.stopped, g.recent) == (f.stopped, f.recent)


def test_faded_short_or_flat_input():
    assert trend.faded_test(np.ones(150)) is None  # fewer than min_recent + min_before
    assert not trend.faded_test(np.ones(300)).stopped


def test_critical_values_come_from_a_table_of_stdtrit():
    dofs = np.array([-3, 0, 1, 2, 50, 4096, 5000])
    t, z = trend._critical(dofs, 0.95, 1e-5)
    assert np.array_equal(t, special.stdtrit(np.maximum(dofs, 1), 0.95))
    assert z == special.ndtri(1 - 1e-5)


def test_trend_state_round_trips_through_json():
    rng = np.random.default_rng(2)
    chain = build_chain([("plateau", {})], REGISTRY, base_lr=1.0)
    a = b = chain.init()
    for t in range(400):
        rec = Record(metrics={"loss": float(1 + 0.05 * rng.standard_normal())}, step=t)
        a, da = chain.update(a, rec)
        b, db = chain.update(json.loads(json.dumps(b)), rec)
        assert (da is None) == (db is None)
    assert a == b


def test_a_state_saved_by_the_previous_version_restarts_its_statistics():
    chain = build_chain([("plateau", {})], REGISTRY, base_lr=1.0)
    state = chain.init()
    state["policies"][0] = {"factor": 0.1, "values": [1.0] * 50, "times": list(range(50)), "since": 50,
                            "cooldown_counter": 0, "seen": 50}
    state, _ = chain.update(state, Record(metrics={"loss": 1.0}, step=50))
    p = state["policies"][0]
    assert p["factor"] == 0.1 and p["values"] == [1.0] and p["rows"] == 1 and "times" not in p
