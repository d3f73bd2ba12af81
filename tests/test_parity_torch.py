"""Parity of the built-in policies with torch.optim.lr_scheduler, to 1e-9 relative.

Time convention under test: the chain's LR before any row equals ``get_last_lr()`` right after
the scheduler is constructed; after the row at time t (0-based) it equals ``get_last_lr()``
after t + 1 calls of ``scheduler.step()``.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.optim import lr_scheduler as L  # noqa: E402

from autolr.chain import build_chain  # noqa: E402
from autolr.engine import RunEngine  # noqa: E402
from autolr.plugins import policy_classes  # noqa: E402
from autolr.records import Record  # noqa: E402

# The schedulers are stepped without optimizer.step(): the optimizer has nothing to train.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of")

REGISTRY = policy_classes()
RTOL = 1e-9
DRAWS = 40


# ---- drivers ---------------------------------------------------------------------------------
def optimizer(base_lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)


def torch_lrs(make, base_lr: float, n: int) -> list[float]:
    """``get_last_lr()`` after construction and after each of n ``step()`` calls."""
    sched = make(optimizer(base_lr))
    out = [sched.get_last_lr()[0]]
    for _ in range(n):
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


def torch_plateau_lrs(base_lr: float, values, **kw) -> list[float]:
    sched = L.ReduceLROnPlateau(optimizer(base_lr), **kw)
    out = [sched.get_last_lr()[0]]
    for v in values:
        sched.step(v)
        out.append(sched.get_last_lr()[0])
    return out


def chain_lrs(specs, base_lr: float, records, **kw) -> list[float]:
    """The chain's LR before any row and after each record."""
    chain = build_chain(specs, REGISTRY, base_lr=base_lr, **kw)
    state = chain.init()
    out = [chain.lr(state)]
    for rec in records:
        state, _ = chain.update(state, rec)
        out.append(chain.lr(state))
    return out


def step_rows(n: int, metric: str = "loss", values=None) -> list[Record]:
    values = [1.0] * n if values is None else values
    return [Record(metrics={metric: float(v)}, step=t) for t, v in enumerate(values)]


def assert_lrs_close(actual, expected, what, upto=None):
    """Element-wise relative comparison; the message names the first index that differs."""
    upto = len(expected) if upto is None else upto
    assert len(actual) >= upto and len(expected) >= upto
    for i in range(upto):
        a, e = actual[i], expected[i]
        if not math.isclose(a, e, rel_tol=RTOL, abs_tol=0.0):
            pytest.fail(f"{what}: after {i} scheduler steps autolr gives {a!r}, torch {e!r}")


def log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


# ---- closed-form schedules: randomised parameters -------------------------------------------
def draw_constant(rng):
    f = log_uniform(rng, 0.01, 10.0)
    return ("constant", {"factor": f}), lambda o: L.LambdaLR(o, lambda _t: f)


def draw_step(rng):
    k, g = rng.randint(1, 40), rng.uniform(0.3, 0.99)
    return ("step", {"step_size": k, "gamma": g}), lambda o: L.StepLR(o, step_size=k, gamma=g)


def draw_multistep(rng):
    # Unsorted, with repeats: torch counts a repeated milestone once per occurrence.
    ms = [rng.randint(1, 300) for _ in range(rng.randint(1, 6))]
    if rng.random() < 0.5:
        ms.append(ms[0])
    g = rng.uniform(0.2, 0.99)
    return ("multistep", {"milestones": ms, "gamma": g}), lambda o: L.MultiStepLR(o, ms, gamma=g)


def draw_exponential(rng):
    g = rng.uniform(0.9, 1.0)
    return ("exponential", {"gamma": g}), lambda o: L.ExponentialLR(o, gamma=g)


def draw_linear(rng):
    s, e, n = rng.uniform(0.01, 1.0), rng.uniform(0.01, 1.0), rng.randint(1, 300)
    return (
        ("linear", {"start_factor": s, "end_factor": e, "total_iters": n}),
        lambda o: L.LinearLR(o, start_factor=s, end_factor=e, total_iters=n),
    )


def draw_warmup(rng):
    s, n = rng.uniform(0.001, 1.0), rng.randint(1, 300)
    return (
        ("warmup", {"steps": n, "start_factor": s, "shape": "linear"}),
        lambda o: L.LinearLR(o, start_factor=s, end_factor=1.0, total_iters=n),
    )


DRAWERS = {
    "constant": draw_constant,
    "step": draw_step,
    "multistep": draw_multistep,
    "exponential": draw_exponential,
    "linear": draw_linear,
    "warmup": draw_warmup,
}


@pytest.mark.parametrize("name", sorted(DRAWERS))
def test_schedule_matches_torch(name):
    rng = random.Random(f"schedule-{name}")
    for _ in range(DRAWS):
        spec, make = DRAWERS[name](rng)
        base, n = log_uniform(rng, 1e-5, 1.0), rng.randint(300, 500)
        expected = torch_lrs(make, base, n)
        actual = chain_lrs([spec], base, step_rows(n))
        assert_lrs_close(actual, expected, f"{spec} base_lr={base}")


def test_cosine_matches_torch_up_to_and_beyond_t_max():
    # torch computes CosineAnnealingLR recursively; autolr uses the closed form. For t <= T_max
    # they agree to rounding. Beyond T_max torch's recursion (with its special step at
    # t = T_max + 1 mod 2*T_max) continues the same periodic curve as the closed form: the LR
    # climbs back to base over the next T_max steps. Rounding error in the recursion grows
    # roughly linearly (about 1e-12 relative after 3000 steps with T_max=2), so the two still
    # agree to 1e-9 over the few periods tested here. Where eta_min = 0 the LR is exactly 0 at
    # odd multiples of T_max; autolr keeps its previous LR there (tested separately), so those
    # points are left out.
    rng = random.Random("cosine")
    for _ in range(DRAWS):
        T = rng.randint(1, 150)
        base = log_uniform(rng, 1e-5, 1.0)
        eta = 0.0 if rng.random() < 0.4 else base * rng.uniform(0.0, 0.5)
        n = max(300, 4 * T)
        expected = torch_lrs(lambda o: L.CosineAnnealingLR(o, T_max=T, eta_min=eta), base, n)
        actual = chain_lrs([("cosine", {"T_max": T, "eta_min": eta})], base, step_rows(n))
        what = f"cosine T_max={T} eta_min={eta} base_lr={base}"
        assert_lrs_close(actual, expected, what + " (t <= T_max)", upto=T if eta == 0 else T + 1)
        keep = [i for i in range(n + 1) if expected[i] > 0]
        assert_lrs_close([actual[i] for i in keep], [expected[i] for i in keep], what + " (beyond T_max)")


def test_polynomial_matches_torch_until_zero():
    rng = random.Random("polynomial")
    for _ in range(DRAWS):
        T, p = rng.randint(1, 300), rng.uniform(0.1, 3.0)
        base, n = log_uniform(rng, 1e-5, 1.0), 400
        expected = torch_lrs(lambda o: L.PolynomialLR(o, total_iters=T, power=p), base, n)
        actual = chain_lrs([("polynomial", {"total_iters": T, "power": p})], base, step_rows(n))
        what = f"polynomial total_iters={T} power={p} base_lr={base}"
        assert_lrs_close(actual, expected, what, upto=T)  # indices 0 .. T-1: LR still > 0
        # torch reaches exactly 0 at total_iters and stays there; autolr never writes a
        # non-positive LR and keeps the last good value.
        assert expected[T] == 0.0 and expected[-1] == 0.0
        assert all(lr == actual[T - 1] for lr in actual[T:]), what


def test_cosine_eta_min_zero_keeps_last_good_lr_at_the_bottom():
    base, T = 0.1, 20
    expected = torch_lrs(lambda o: L.CosineAnnealingLR(o, T_max=T), base, T + 2)
    chain = build_chain([("cosine", {"T_max": T})], REGISTRY, base_lr=base)
    state, decisions = chain.init(), []
    for rec in step_rows(T + 2):
        state, d = chain.update(state, rec)
        decisions.append(d)
        if rec.step == T - 2:
            last_good = chain.lr(state)
        if rec.step == T - 1:  # torch is at exactly 0 here; autolr stays put, silently
            assert expected[T] == 0.0
            assert chain.lr(state) == last_good > 0
            assert decisions[-1] is None
        if rec.step == T:  # symmetric about the bottom: back at the kept value, no decision
            assert math.isclose(chain.lr(state), expected[T + 1], rel_tol=RTOL)
    # after the bottom the closed form rises again, as torch does
    assert math.isclose(chain.lr(state), expected[T + 2], rel_tol=RTOL)
    assert decisions[-1] is not None and decisions[-1].lr == chain.lr(state) > last_good


# ---- units ----------------------------------------------------------------------------------
def test_epoch_unit_uses_the_epoch_counter():
    rng = random.Random("epoch")
    for _ in range(10):
        spec, make = draw_step(rng)
        n, base = 300, log_uniform(rng, 1e-4, 1.0)
        expected = torch_lrs(make, base, n)
        # rows carry only an epoch: auto picks it
        epochs_only = [Record(metrics={"loss": 1.0}, epoch=float(t)) for t in range(n)]
        assert_lrs_close(chain_lrs([spec], base, epochs_only), expected, f"{spec} epoch-only")
        # rows carry a step too; unit=epoch must ignore it
        both = [Record(metrics={"loss": 1.0}, step=97 * t + 5, epoch=float(t)) for t in range(n)]
        spec_epoch = (spec[0], dict(spec[1], unit="epoch"))
        assert_lrs_close(chain_lrs([spec_epoch], base, both), expected, f"{spec} unit=epoch")
        assert_lrs_close(chain_lrs([spec], base, both, unit="epoch"), expected, f"{spec} run unit=epoch")


def test_row_unit_counts_rows():
    rng = random.Random("row")
    for _ in range(10):
        spec, make = draw_exponential(rng)
        n, base = 300, log_uniform(rng, 1e-4, 1.0)
        expected = torch_lrs(make, base, n)
        no_counters = [Record(metrics={"loss": 1.0}) for _ in range(n)]
        assert_lrs_close(chain_lrs([spec], base, no_counters), expected, f"{spec} no counters")
        sparse_steps = [Record(metrics={"loss": 1.0}, step=10 * t + 3) for t in range(n)]
        spec_row = (spec[0], dict(spec[1], unit="row"))
        assert_lrs_close(chain_lrs([spec_row], base, sparse_steps), expected, f"{spec} unit=row")


# ---- plateau --------------------------------------------------------------------------------
def metric_sequence(rng: random.Random, nrng: np.random.Generator, n: int, mode: str) -> list[float]:
    kind = rng.choice(["walk", "noisy_decay", "plateaus", "ties", "spiky"])
    t = np.arange(n)
    if kind == "walk":
        x = 1.0 + np.cumsum(nrng.normal(0.0, 0.02, n))
    elif kind == "noisy_decay":
        x = np.exp(-t / rng.uniform(20, 200)) + nrng.normal(0.0, rng.uniform(0.001, 0.05), n)
    elif kind == "plateaus":
        levels = np.cumsum(nrng.exponential(0.1, n // 10 + 1))
        x = 5.0 - np.repeat(levels, 10)[:n]
    elif kind == "ties":  # exact repeats: a few distinct values, often equal to the best
        x = nrng.choice(np.round(nrng.uniform(0.5, 1.5, 4), 3), size=n)
    else:
        x = np.exp(-t / 100.0) + np.where(nrng.random(n) < 0.05, 3.0, 0.0)
    if mode == "max":  # accuracy-like, sometimes negative (a reward): rel mode sees the sign
        x = -x if rng.random() < 0.5 else 2.0 - x
    x = x.tolist()
    if rng.random() < 0.5:  # NaN losses are never "better": they count as bad rows
        for i in range(n):
            if rng.random() < 0.05:
                x[i] = math.nan
    return x


def draw_plateau_params(rng: random.Random, base: float) -> dict:
    return {
        "mode": rng.choice(["min", "max"]),
        "factor": rng.uniform(0.05, 0.95),
        "patience": rng.randint(0, 8),
        "threshold": rng.choice([0.0, 1e-4, 1e-3, 1e-2, 0.1]),
        "threshold_mode": rng.choice(["rel", "abs"]),
        "cooldown": rng.choice([0, 0, 1, 2, 5]),
        "min_lr": rng.choice([0.0, base * 1e-3, base * 0.1, base * 0.5]),
        "eps": rng.choice([1e-8, 0.0, base * 1e-2, base * 0.1]),
    }


def test_plateau_matches_torch_on_noisy_metrics():
    rng, nrng = random.Random("plateau"), np.random.default_rng(1234)
    reductions = 0
    for _ in range(200):
        base = log_uniform(rng, 1e-5, 1.0)
        kw = draw_plateau_params(rng, base)
        n = rng.randint(200, 400)
        values = metric_sequence(rng, nrng, n, kw["mode"])
        expected = torch_plateau_lrs(base, values, **kw)
        actual = chain_lrs([("plateau", dict(kw, metric="val_loss", method="threshold"))], base,
                           step_rows(n, "val_loss", values))
        assert_lrs_close(actual, expected, f"plateau {kw} base_lr={base} values={values}")
        reductions += sum(b < a for a, b in zip(expected, expected[1:]))
    assert reductions > 200  # the draws exercise reductions, not just flat LRs


@pytest.mark.parametrize("threshold_mode", ["rel", "abs"])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_plateau_cooldown_min_lr_and_eps(mode, threshold_mode):
    # A flat metric forces a reduction every patience+1+cooldown rows until min_lr or eps stops it.
    rng = random.Random(f"plateau-{mode}-{threshold_mode}")
    for _ in range(DRAWS):
        base = log_uniform(rng, 1e-4, 1.0)
        kw = dict(mode=mode, threshold_mode=threshold_mode, factor=rng.uniform(0.1, 0.7),
                  patience=rng.randint(0, 4), cooldown=rng.randint(1, 6), threshold=1e-4,
                  min_lr=base * rng.choice([1e-2, 0.2]), eps=rng.choice([1e-8, base * 0.05]))
        values = [0.5] * 400
        expected = torch_plateau_lrs(base, values, **kw)
        actual = chain_lrs([("plateau", dict(kw, metric="val_loss", method="threshold"))], base,
                           step_rows(400, "val_loss", values))
        assert_lrs_close(actual, expected, f"plateau {kw} base_lr={base}")
        # the draw reaches the end state: pinned at min_lr, or where a further cut is <= eps
        assert expected[-1] == expected[-100] < base
        end = expected[-1]
        assert end == kw["min_lr"] or end - max(end * kw["factor"], kw["min_lr"]) <= kw["eps"]


def test_plateau_ignores_rows_without_its_metric():
    rng, nrng = random.Random("plateau-sparse"), np.random.default_rng(7)
    for _ in range(20):
        base = log_uniform(rng, 1e-4, 1.0)
        kw = draw_plateau_params(rng, base)
        values = metric_sequence(rng, nrng, 200, kw["mode"])
        rows = []
        step = 0
        for v in values:  # a few train-only rows between evaluations
            for _ in range(rng.randint(0, 3)):
                rows.append(Record(metrics={"loss": rng.random()}, step=step))
                step += 1
            rows.append(Record(metrics={"loss": rng.random(), "val_loss": v}, step=step))
            step += 1
        expected = torch_plateau_lrs(base, values, **kw)
        actual = chain_lrs([("plateau", dict(kw, metric="val_loss", method="threshold"))], base, rows)
        eval_positions = [0] + [i + 1 for i, r in enumerate(rows) if "val_loss" in r.metrics]
        assert_lrs_close([actual[i] for i in eval_positions], expected, f"plateau {kw}")


# ---- composition ----------------------------------------------------------------------------
def test_warmup_then_plateau():
    rng, nrng = random.Random("warmup-plateau"), np.random.default_rng(99)
    for _ in range(DRAWS):
        base = log_uniform(rng, 1e-4, 1.0)
        W, s = rng.randint(1, 60), rng.uniform(0.01, 0.5)
        kw = draw_plateau_params(rng, base)
        kw["mode"] = "min"
        n = W + rng.randint(200, 300)
        # during warmup the loss only rises: any plateau counting there would fire at once
        values = [1.0 + 0.1 * t for t in range(W)] + metric_sequence(rng, nrng, n - W, "min")
        warm = torch_lrs(lambda o: L.LinearLR(o, start_factor=s, end_factor=1.0, total_iters=W), base, n)
        plateau = torch_plateau_lrs(base, values[W:], **kw)  # starts after the warmup
        expected = [warm[k] * plateau[max(0, k - W)] / base for k in range(n + 1)]

        specs = [("warmup", {"steps": W, "start_factor": s}), ("plateau", dict(kw, method="threshold"))]
        engine = RunEngine(build_chain(specs, REGISTRY, base_lr=base))
        actual = [engine.lr]
        for rec in step_rows(n, "val_loss", values):
            for d in engine.feed(rec):
                assert not (rec.step < W and "plateau" in d.policy), (d, W)
            actual.append(engine.lr)
        assert_lrs_close(actual, expected, f"warmup steps={W} start={s} + plateau {kw} base={base}")


CHAIN_DRAWERS = [draw_step, draw_multistep, draw_exponential, draw_linear, draw_warmup]


def test_chained_schedules_multiply_like_chained_scheduler():
    rng = random.Random("chained")
    for _ in range(DRAWS):
        parts = [rng.choice(CHAIN_DRAWERS)(rng) for _ in range(rng.randint(2, 3))]
        base, n = log_uniform(rng, 1e-4, 1.0), 400
        expected = torch_lrs(lambda o: L.ChainedScheduler([make(o) for _, make in parts]), base, n)
        actual = chain_lrs([spec for spec, _ in parts], base, step_rows(n))
        assert_lrs_close(actual, expected, f"chain {[spec for spec, _ in parts]} base={base}")


def test_step_times_exponential_is_the_product_of_factors():
    base, n = 0.05, 400
    step = torch_lrs(lambda o: L.StepLR(o, step_size=30, gamma=0.5), base, n)
    expo = torch_lrs(lambda o: L.ExponentialLR(o, gamma=0.995), base, n)
    actual = chain_lrs([("step", {"step_size": 30, "gamma": 0.5}), ("exponential", {"gamma": 0.995})],
                       base, step_rows(n))
    assert_lrs_close(actual, [a * b / base for a, b in zip(step, expo)], "step x exponential")


def test_warmup_times_cosine_within_t_max():
    # ChainedScheduler([LinearLR, CosineAnnealingLR(eta_min=0)]) is the product up to T_max
    # (beyond it torch's cosine takes an additive step, which is no longer a product).
    rng = random.Random("warmup-cosine")
    for _ in range(DRAWS):
        base, W, T = log_uniform(rng, 1e-4, 1.0), rng.randint(1, 50), rng.randint(100, 400)
        s = rng.uniform(0.01, 1.0)
        expected = torch_lrs(lambda o: L.ChainedScheduler([
            L.LinearLR(o, start_factor=s, end_factor=1.0, total_iters=W),
            L.CosineAnnealingLR(o, T_max=T)]), base, T - 1)
        actual = chain_lrs([("warmup", {"steps": W, "start_factor": s}), ("cosine", {"T_max": T})],
                           base, step_rows(T - 1))
        assert_lrs_close(actual, expected, f"warmup {W} {s} x cosine {T}")


# ---- state: save, restore, replay -----------------------------------------------------------
def mixed_chain(rng: random.Random, base: float):
    specs = [("warmup", {"steps": rng.randint(1, 30), "start_factor": 0.1}),
             ("multistep", {"milestones": [100, 200], "gamma": 0.5}),
             ("plateau", draw_plateau_params(rng, base) | {"mode": "min", "method": "threshold"})]
    return build_chain(specs, REGISTRY, base_lr=base)


def test_state_json_round_trip_and_resume_are_exact():
    rng, nrng = random.Random("state"), np.random.default_rng(5)
    for _ in range(20):
        base = log_uniform(rng, 1e-4, 1.0)
        chain = mixed_chain(rng, base)
        rows = step_rows(300, "val_loss", metric_sequence(rng, nrng, 300, "min"))
        cut = rng.randint(1, 299)
        state = chain.init()
        for rec in rows[:cut]:
            state, _ = chain.update(state, rec)
        restored = json.loads(json.dumps(state))
        assert restored == state
        a, b = state, restored
        for rec in rows[cut:]:
            a, da = chain.update(a, rec)
            b, db = chain.update(b, rec)
            assert chain.lr(a) == chain.lr(b)  # bit-identical, not merely close
            assert da == db


def test_torch_parity_survives_save_and_restore_mid_run():
    rng, nrng = random.Random("state-torch"), np.random.default_rng(6)
    for _ in range(20):
        base = log_uniform(rng, 1e-4, 1.0)
        kw = draw_plateau_params(rng, base)
        values = metric_sequence(rng, nrng, 300, kw["mode"])
        expected = torch_plateau_lrs(base, values, **kw)
        chain = build_chain([("plateau", dict(kw, method="threshold"))], REGISTRY, base_lr=base)
        state, actual = chain.init(), []
        actual.append(chain.lr(state))
        for rec in step_rows(300, "val_loss", values):
            state, _ = chain.update(json.loads(json.dumps(state)), rec)  # restart before every row
            actual.append(chain.lr(state))
        assert_lrs_close(actual, expected, f"plateau {kw} with restarts")


def test_engine_state_and_rewind_replay_are_exact():
    rng, nrng = random.Random("engine"), np.random.default_rng(8)
    for _ in range(10):
        base = log_uniform(rng, 1e-4, 1.0)
        chain = mixed_chain(rng, base)
        rows = step_rows(400, "val_loss", metric_sequence(rng, nrng, 400, "min"))
        ref = RunEngine(chain, checkpoint_every=64)
        ref_lrs = []
        for rec in rows:
            ref.feed(rec)
            ref_lrs.append(ref.lr)
        # (1) persist the engine mid-run, restore into a fresh one, continue
        cut = rng.randint(1, 399)
        first = RunEngine(chain, checkpoint_every=64)
        for rec in rows[:cut]:
            first.feed(rec)
        second = RunEngine(chain, checkpoint_every=64)
        second.set_state(json.loads(json.dumps(first.get_state())))
        resumed = [*ref_lrs[:cut]]
        for rec in rows[cut:]:
            second.feed(rec)
            resumed.append(second.lr)
        assert resumed == ref_lrs
        # (2) resume the job from an earlier step: the engine rewinds and replays exactly
        back = rng.randint(0, 398)
        replayed = []
        for rec in rows[back:]:
            ref.feed(rec)
            replayed.append(ref.lr)
        assert ref.rewinds == 1
        assert replayed == ref_lrs[back:]


# ---- TensorFlow forms against Keras 3, if installed ------------------------------------------
def test_tf_forms_match_keras_schedules():
    if "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    old = keras.config.floatx()
    keras.config.set_floatx("float64")  # keras computes in float32 by default
    try:
        rng = random.Random("keras")
        for _ in range(10):
            base, rate = log_uniform(rng, 1e-4, 1.0), rng.uniform(0.05, 0.99)
            steps, stair, n = rng.randint(1, 50), rng.random() < 0.5, 300
            inv_rate = rng.uniform(0.0, 2.0)
            for name, params, sched in [
                ("exponential", {"decay_rate": rate},
                 keras.optimizers.schedules.ExponentialDecay(base, steps, rate, staircase=stair)),
                ("inverse_time", {"decay_rate": inv_rate},
                 keras.optimizers.schedules.InverseTimeDecay(base, steps, inv_rate, staircase=stair)),
            ]:
                expected = [float(sched(t)) for t in range(n + 1)]
                spec = (name, dict(params, decay_steps=steps, staircase=stair))
                assert_lrs_close(chain_lrs([spec], base, step_rows(n)), expected, f"{spec} base={base}")
    finally:
        keras.config.set_floatx(old)
