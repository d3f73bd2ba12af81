"""Known answers for the built-in policies, without torch.

Values are checked through a chain: ``lrs[0]`` is the LR before any row, ``lrs[k]`` the LR
after k rows (the value of the formula at t = k).
"""
from __future__ import annotations

import json
import math
import random

import pytest

from autolr.chain import build_chain
from autolr.engine import RunEngine
from autolr.plugins import policy_classes
from autolr.policy import PolicyError
from autolr.records import Record

REGISTRY = policy_classes()


def lrs(specs, n, base=1.0, values=None, metric="loss", **kw):
    chain = build_chain(specs, REGISTRY, base_lr=base, **kw)
    state = chain.init()
    out = [chain.lr(state)]
    values = [1.0] * n if values is None else values
    for t, v in enumerate(values):
        state, _ = chain.update(state, Record(metrics={metric: v}, step=t))
        out.append(chain.lr(state))
    return out


def approx(values):
    return pytest.approx(values, rel=1e-12, abs=0.0)


# ---- TensorFlow forms ---------------------------------------------------------------------
def test_tf_exponential_known_answer():
    spec = ("exponential", {"decay_rate": 1 / (1 + 0.1), "decay_steps": 10})
    out = lrs([spec], 5, base=0.001)
    assert out[5] == pytest.approx(0.000953462589245592, rel=1e-12)
    assert str(out[5]).startswith("0.00095346")
    assert out[0] == 0.001


def test_tf_exponential_staircase():
    spec = ("exponential", {"decay_rate": 0.5, "decay_steps": 10, "staircase": True})
    out = lrs([spec], 30, base=0.1)
    assert out[:10] == approx([0.1] * 10)
    assert out[10:20] == approx([0.05] * 10)
    assert out[20:30] == approx([0.025] * 10)
    assert out[30] == approx(0.0125)


def test_inverse_time_known_answers():
    smooth = lrs([("inverse_time", {"decay_rate": 0.5, "decay_steps": 10})], 25, base=0.1)
    assert smooth[5] == approx(0.08)  # 0.1 / (1 + 0.5 * 0.5)
    assert smooth[25] == approx(0.1 / 2.25)
    stair = lrs([("inverse_time", {"decay_rate": 0.5, "decay_steps": 10, "staircase": True})], 25, base=0.1)
    assert stair[9] == approx(0.1)
    assert stair[10] == stair[19] == approx(0.1 / 1.5)
    assert stair[25] == approx(0.05)


@pytest.mark.parametrize("staircase", [False, True])
def test_tf_forms_match_formula_on_random_parameters(staircase):
    rng = random.Random(f"tf-{staircase}")
    for _ in range(50):
        base, rate, steps = rng.uniform(1e-4, 1.0), rng.uniform(0.3, 0.99), rng.uniform(2.0, 50)
        inv = rng.uniform(0.0, 3.0)
        p = (lambda t: math.floor(t / steps)) if staircase else (lambda t: t / steps)
        exp_out = lrs([("exponential", {"decay_rate": rate, "decay_steps": steps, "staircase": staircase})],
                      300, base=base)
        inv_out = lrs([("inverse_time", {"decay_rate": inv, "decay_steps": steps, "staircase": staircase})],
                      300, base=base)
        assert exp_out == approx([base * rate ** p(t) for t in range(301)])
        assert inv_out == approx([base / (1 + inv * p(t)) for t in range(301)])


# ---- PyTorch-form schedules, small tables -------------------------------------------------
def test_step_table():
    assert lrs([("step", {"step_size": 3, "gamma": 0.5})], 7) == approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25])


def test_multistep_sorts_and_counts_repeated_milestones():
    out = lrs([("multistep", {"milestones": [5, 2, 5], "gamma": 0.1})], 7)
    assert out == approx([1, 1, 0.1, 0.1, 0.1, 0.001, 0.001, 0.001])


def test_exponential_pytorch_form():
    assert lrs([("exponential", {"gamma": 0.9})], 3, base=2.0) == approx([2.0, 1.8, 1.62, 1.458])


def test_cosine_known_points():
    out = lrs([("cosine", {"T_max": 10, "eta_min": 0.01})], 10, base=0.1)
    assert out[0] == approx(0.1)
    assert out[5] == approx(0.055)
    assert out[10] == approx(0.01)


def test_linear_and_polynomial_tables():
    lin = lrs([("linear", {"start_factor": 0.25, "end_factor": 1.0, "total_iters": 4})], 6)
    assert lin == approx([0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0, 1.0])
    down = lrs([("linear", {"start_factor": 1.0, "end_factor": 0.5, "total_iters": 2})], 3)
    assert down == approx([1.0, 0.75, 0.5, 0.5])
    poly = lrs([("polynomial", {"total_iters": 4, "power": 2.0})], 3)
    assert poly == approx([1.0, 0.5625, 0.25, 0.0625])


def test_constant():
    assert lrs([("constant", {"factor": 2.5})], 3, base=0.1) == approx([0.25] * 4)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_warmup_shapes(shape):
    out = lrs([("warmup", {"steps": 10, "start_factor": 0.1, "shape": shape})], 15)
    assert out[0] == approx(0.1)
    assert out[5] == approx(0.55)  # both shapes are half-way at half time
    assert out[10:] == approx([1.0] * 6)
    frac = 0.2 if shape == "linear" else (1 - math.cos(math.pi * 0.2)) / 2
    assert out[2] == approx(0.1 + 0.9 * frac)
    assert all(a < b for a, b in zip(out[:10], out[1:11]))


def test_warmup_holds_only_during_warmup():
    chain = build_chain([("warmup", {"steps": 3})], REGISTRY, base_lr=1.0)
    policy = chain.policies[0]
    from autolr.policy import Observation

    held = [policy.holds(Observation(row=t, step=t, epoch=None, metrics={}, lr=1.0, unit="step"))
            for t in range(5)]
    assert held == [True, True, True, False, False]


# ---- time --------------------------------------------------------------------------------
def test_rows_without_the_counter_and_backward_time_do_not_move_a_schedule():
    chain = build_chain([("step", {"step_size": 2, "gamma": 0.5})], REGISTRY, base_lr=1.0)
    state = chain.init()
    out = []
    for rec in [Record({"loss": 1}, step=0), Record({"loss": 1}), Record({"loss": 1}, step=1),
                Record({"loss": 1}, epoch=7.0), Record({"loss": 1}, step=0), Record({"loss": 1}, step=3)]:
        state, _ = chain.update(state, rec)
        out.append(chain.lr(state))
    assert out == approx([1.0, 1.0, 0.5, 0.5, 0.5, 0.25])


@pytest.mark.parametrize("layout", ["keras", "lightning", "lightning per epoch"])
def test_epoch_unit(layout):
    """Keras's CSVLogger: one row an epoch, the index of the epoch just done (0 after the
    first): the LR after it is the next epoch's. Lightning: the current epoch on every step
    row: the LR after a row of epoch e is epoch e's (StepLR stepped at each epoch's end).
    Lightning logging only at epoch ends: its validation and training rows share one step, so
    they are one moment, the epoch just done, as in Keras."""
    if layout == "keras":
        rows = [Record({"loss": 1.0}, epoch=float(e)) for e in range(5)]
    elif layout == "lightning":
        rows = [Record({"loss": 1.0}, step=s, epoch=float(s // 3)) for s in range(15)]
    else:
        rows = [Record({name: 1.0}, step=100 * e + 99, epoch=float(e))
                for e in range(5) for name in ("val_loss", "train_loss_epoch")]
    chain = build_chain([("step", {"step_size": 2, "gamma": 0.5, "unit": "epoch"})], REGISTRY, base_lr=1.0)
    state, out = chain.init(), []
    for rec in rows:
        state, _ = chain.update(state, rec)
        out.append(chain.lr(state))
    if layout == "keras":
        assert out == approx([1.0, 0.5, 0.5, 0.25, 0.25])
    elif layout == "lightning per epoch":
        assert out == approx([1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25])
    else:  # during epochs 0, 1: 1.0; 2, 3: 0.5; 4: 0.25 (before, each came one epoch early)
        assert out == approx([1.0] * 6 + [0.5] * 6 + [0.25] * 3)


# ---- plateau --------------------------------------------------------------------------------
def plateau(values, base=1.0, metric="val_loss", **params):
    params.setdefault("metric", metric)
    return lrs([("plateau", {"method": "threshold", **params})], len(values), base=base, values=values, metric=metric)


def test_plateau_trace_with_cooldown():
    values = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8]
    out = plateau(values, factor=0.5, patience=2, threshold=0.0, threshold_mode="abs", cooldown=1)
    # reduce once num_bad > patience (row 4); the cooldown row resets the count; 0.8 improves
    assert out[1:] == approx([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25])


def test_plateau_relative_threshold():
    # best 1.0, threshold 1e-4 rel: better means < 0.9999
    assert plateau([1.0, 0.99995], patience=0, threshold=1e-4)[-1] == approx(0.1)
    assert plateau([1.0, 0.99989], patience=0, threshold=1e-4)[-1] == approx(1.0)
    # abs threshold 0.01: 0.995 is not better than 1.0, 0.989 is
    assert plateau([1.0, 0.995], patience=0, threshold=0.01, threshold_mode="abs")[-1] == approx(0.1)
    assert plateau([1.0, 0.989], patience=0, threshold=0.01, threshold_mode="abs")[-1] == approx(1.0)


def test_plateau_exact_repeat_is_not_an_improvement():
    assert plateau([0.5, 0.5], patience=0, threshold=0.0)[-1] == approx(0.1)


def test_plateau_max_mode_is_default_for_accuracy():
    assert plateau([0.5, 0.6, 0.7], metric="val_acc", patience=0) == approx([1.0] * 4)
    assert plateau([0.5, 0.6, 0.6], metric="val_acc", patience=0)[-1] == approx(0.1)
    assert plateau([0.5, 0.4], metric="val_acc", patience=0, mode="min") == approx([1.0] * 3)


def test_plateau_nan_counts_as_bad():
    assert plateau([1.0, math.nan], patience=0)[-1] == approx(0.1)
    assert plateau([1.0, math.nan, 0.5], patience=1) == approx([1.0] * 4)


def test_plateau_min_lr_and_eps():
    out = plateau([1.0] * 5, factor=0.1, patience=0, min_lr=0.05)
    assert out == approx([1.0, 1.0, 0.1, 0.05, 0.05, 0.05])
    # eps 1e-8: a cut smaller than 1e-8 is not applied
    out = plateau([1.0] * 6, base=1e-7, factor=0.5, patience=0)
    assert out == approx([1e-7, 1e-7, 5e-8, 2.5e-8, 1.25e-8, 1.25e-8, 1.25e-8])


def test_plateau_decision_explains_itself():
    chain = build_chain([("plateau", {"method": "threshold", "patience": 1, "factor": 0.5})], REGISTRY, base_lr=0.2)
    engine = RunEngine(chain)
    decisions = [d for t, v in enumerate([1.0, 1.0, 1.0]) for d in engine.feed(Record({"val_loss": v}, step=t))]
    assert len(decisions) == 1
    d = decisions[0]
    assert (d.policy, d.step, d.lr) == ("plateau", 2, pytest.approx(0.1))
    assert d.evidence["plateau"]["num_bad"] == 2 and d.evidence["plateau"]["patience"] == 1
    assert "patience 1" in d.reason


def test_plateau_does_not_count_during_warmup():
    specs = [("warmup", {"steps": 5, "start_factor": 0.1}), ("plateau", {"method": "threshold", "patience": 0, "factor": 0.5})]
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0]  # rising all through the warmup
    out = lrs(specs, 7, values=values, metric="val_loss")
    # row 5 is the plateau's first observation (an improvement on +inf), row 6 its first bad one
    assert out[5:] == approx([1.0, 1.0, 0.5])


# ---- chains ------------------------------------------------------------------------------
def test_factors_multiply():
    out = lrs([("step", {"step_size": 2, "gamma": 0.5}), ("exponential", {"gamma": 0.9})], 3, base=2.0)
    assert out == approx([2.0, 2 * 0.9, 2 * 0.5 * 0.81, 2 * 0.5 * 0.729])


def test_zero_lr_is_never_written():
    chain = build_chain([("polynomial", {"total_iters": 3})], REGISTRY, base_lr=1.0)
    state, out, decisions = chain.init(), [], []
    for t in range(6):
        state, d = chain.update(state, Record({"loss": 1.0}, step=t))
        out.append(chain.lr(state))
        decisions.append(d)
    assert out == approx([2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert decisions[2:] == [None] * 4
    assert json.loads(json.dumps(state))["scale"] == approx(1 / 3)


# ---- parameters --------------------------------------------------------------------------
@pytest.mark.parametrize("name, params, message", [
    ("exponential", {"gamma": 0.9, "decay_rate": 0.5}, "either gamma"),
    ("exponential", {}, "either gamma"),
    ("step", {"step_size": 0}, "step_size"),
    ("plateau", {"factor": 1.0}, "factor"),
    ("plateau", {"patience": -1}, "patience"),
    ("warmup", {"start_factor": 0.0}, "start_factor"),
    ("cosine", {"T_max": 10, "etamin": 0.1}, "etamin"),
    ("plateau", {"mode": "up"}, "'min'"),
    # used to be accepted with decay_steps and staircase silently ignored:
    ("exponential", {"gamma": 0.5, "decay_steps": 10, "staircase": True}, "apply to decay_rate"),
    ("exponential", {"gamma": 0.5, "staircase": True}, "apply to decay_rate"),
    ("multistep", {"milestones": (-5, 3)}, "milestones must be >= 0"),  # was: an initial cut
])
def test_invalid_parameters_are_clear_errors(name, params, message):
    with pytest.raises(PolicyError, match=message):
        build_chain([(name, params)], REGISTRY, base_lr=1.0)


def test_linear_may_end_at_zero_like_torch_and_the_last_good_lr_stays():
    """LinearLR accepts end_factor=0 (was "end_factor must be > 0"); the 0 at the end is never
    written (the last good LR stays), as with PolynomialLR."""
    chain = build_chain([("linear", {"start_factor": 1.0, "end_factor": 0.0, "total_iters": 4})], REGISTRY,
                        base_lr=1.0)
    state, out = chain.init(), []
    for t in range(6):
        state, _ = chain.update(state, Record({"loss": 1.0}, step=t))
        out.append(chain.lr(state))
    assert out == approx([0.75, 0.5, 0.25, 0.25, 0.25, 0.25])


MINIMAL = {"step": {"step_size": 7}, "multistep": {"milestones": (5, 40)}, "warmup": {"steps": 20},
           "cosine": {"T_max": 50}, "exponential": {"gamma": 0.99}, "inverse_time": {"decay_rate": 0.1}}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_update_never_modifies_the_state_it_is_given(name):
    """The chain reads the old state after update() (the factors before a decision): every
    built-in policy returns a new state and leaves the one it got as it was."""
    from autolr.policy import Observation

    policy = REGISTRY[name](**MINIMAL.get(name, {}))
    state = policy.init(0.1)
    rnd = random.Random(1)
    for i in range(1500):
        loss = 1 / (1 + 0.01 * i) + rnd.gauss(0, 0.02) if i % 400 != 350 else float("nan")
        obs = Observation(row=i, step=i, epoch=i / 100, metrics={"loss": loss}, lr=0.1, monitor="loss", unit="step")
        before = json.dumps(state, sort_keys=True, default=repr)
        new, _ = policy.update(state, obs)
        assert json.dumps(state, sort_keys=True, default=repr) == before, f"row {i}"
        state = new


@pytest.mark.parametrize("method", ["threshold", "trend"])
def test_plateau_with_eps_0_never_divides_by_a_vanished_factor(method):
    """Regression: eps=0 (valid in torch) let the factor underflow to 0.0 after ~330 cuts by
    0.1, and the next reason divided by it (ZeroDivisionError at every later row)."""
    params = {"method": method, "eps": 0.0, "factor": 0.1}
    params.update(patience=0) if method == "threshold" else params.update(window=8, min_window=8, history=8)
    chain = build_chain([("plateau", params)], REGISTRY, base_lr=1.0)
    state = chain.init()
    for s in range(800 if method == "threshold" else 4000):
        state, _ = chain.update(state, Record({"val_loss": 1.0 + s}, step=s))
    assert 0 < chain.lr(state) < 1e-300 and state["policies"][0]["factor"] > 0
