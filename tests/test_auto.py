"""The ``auto`` policy: per-row warmup, guard (spikes, level shifts, cooldown escalation), sparse metrics."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from autolr.config import Settings
from autolr.engine import RunEngine
from autolr.plugins import policy_classes
from autolr.policy import PolicyError
from autolr.records import Record


def engine(*specs):
    from autolr.spec import parse_spec

    return RunEngine(Settings(policies=tuple(parse_spec(s) for s in specs) or ()).chain(policy_classes()))


def feed(eng, rows):
    """Feed (step, metrics) rows; return [(step, scale, reason)] of the decisions after warmup rows."""
    out = []
    for step, metrics in rows:
        for d in eng.feed(Record(metrics=metrics, step=step)):
            out.append((step, d.scale, d.reason))
    return out


def guards(decisions):
    return [d for d in decisions if "divergence guard" in d[2]]


def test_default_chain_is_auto():
    assert Settings().chain(policy_classes()).names == "auto"


def test_warmup_ramps_every_row():
    eng = engine("auto")
    scales = []
    for step in range(150):
        eng.feed(Record(metrics={"loss": 1.0}, step=step))
        scales.append(eng.scale)
    # after the row at step t the factor is that of t + 1, as the `warmup` policy gives
    assert scales[0] == pytest.approx(0.1 + 0.9 * 1 / 100)
    assert scales[49] == pytest.approx(0.1 + 0.9 * 50 / 100)
    assert all(b > a for a, b in zip(scales[:99], scales[1:99]))
    assert scales[99:] == [1.0] * 51


def test_guard_is_live_during_warmup_and_ends_it():
    eng = engine("auto")
    rng = np.random.default_rng(0)
    rows = [(s, {"loss": 2.0 + 0.05 * rng.standard_normal()}) for s in range(40)]
    rows.append((40, {"loss": math.nan}))
    decisions = feed(eng, rows)
    fired = guards(decisions)
    assert len(fired) == 1 and fired[0][0] == 40 and "warmup ended" in fired[0][2]
    w = 0.1 + 0.9 * 40 / 100  # the factor reached before the row at step 40
    assert eng.scale == pytest.approx(w * 0.5)
    # the warmup does not resume
    feed(eng, [(s, {"loss": 2.0 + 0.05 * rng.standard_normal()}) for s in range(41, 120)])
    assert eng.scale <= w * 0.5 + 1e-12


def test_heavy_tailed_minibatch_noise_near_zero_is_not_divergence():
    """A memorised training set: losses ~1e-3 with occasional hard batches 10-40x larger."""
    eng = engine("auto")
    rng = np.random.default_rng(1)
    rows = []
    for s in range(3000):
        base = 2.3 * math.exp(-s / 60) + 0.0015 * math.exp(0.4 * rng.standard_normal())
        spike = rng.random() < 0.05
        rows.append((s, {"loss": base + (rng.uniform(0.01, 0.06) if spike else 0.0)}))
    assert [d for d in guards(feed(eng, rows)) if "jump" in d[2] or "level shift" in d[2]] == []


def test_explosion_fires_at_once():
    eng = engine("auto:warmup=0")
    rng = np.random.default_rng(2)
    rows = [(s, {"loss": 0.5 + 0.05 * rng.standard_normal()}) for s in range(300)]
    rows += [(300, {"loss": 5.0})]
    fired = guards(feed(eng, rows))
    assert [f[0] for f in fired] == [300] and "jump" in fired[0][2]
    assert eng.state["policies"][0]["guard"] == pytest.approx(0.5)


def test_spike_of_the_size_the_window_holds_does_not_fire():
    eng = engine("auto:warmup=0")
    rng = np.random.default_rng(3)
    rows = [(s, {"loss": (3.0 if s % 37 == 0 else 0.5) + 0.02 * rng.standard_normal()}) for s in range(400)]
    assert guards(feed(eng, rows)) == []


def test_level_shift_fires():
    """Edge of stability: the loss climbs back from 0.4 to 2 over a few dozen noisy rows."""
    eng = engine("auto:warmup=0")
    rng = np.random.default_rng(4)
    rows = [(s, {"loss": 2.3 * math.exp(-s / 30) + 0.4 + 0.15 * rng.standard_normal()}) for s in range(200)]
    rows += [(200 + i, {"loss": min(0.4 + 0.06 * i, 2.2) + 0.15 * rng.standard_normal()}) for i in range(60)]
    fired = guards(feed(eng, rows))
    assert fired and 200 < fired[0][0] < 240 and "level shift" in fired[0][2]


def test_cooldown_fires_again_only_on_escalation():
    eng = engine("auto:warmup=0")
    rows = [(s, {"loss": 0.5 + 0.01 * math.sin(s)}) for s in range(200)]
    rows += [(200, {"loss": 3.0}), (201, {"loss": 2.5}), (202, {"loss": 2.9}), (203, {"loss": 7.0}),
             (204, {"loss": 6.0})]
    fired = guards(feed(eng, rows))
    assert [f[0] for f in fired] == [200, 203] and "escalates" in fired[1][2]
    assert eng.state["policies"][0]["guard"] == pytest.approx(0.25)


def test_guard_respects_min_factor():
    eng = engine("auto:warmup=0,min_factor=0.1,guard_cooldown=0")
    feed(eng, [(s, {"loss": 1.0 + 0.01 * math.sin(s)}) for s in range(50)])
    feed(eng, [(50 + s, {"loss": math.nan}) for s in range(20)])
    assert eng.scale == pytest.approx(0.1)


def test_sparse_validation_metric_decides_within_min_window():
    """val_loss every 25 steps: the window is the last `window` rows with >= min_window values."""
    eng = engine("auto")
    rng = np.random.default_rng(5)
    rows = []
    for s in range(1, 2001):
        m = {"loss": 0.3 + 2 * math.exp(-s / 100) + 0.05 * rng.standard_normal()}
        if s % 25 == 0:
            m["val_loss"] = 0.4 + 2 * math.exp(-s / 100) + 0.005 * rng.standard_normal()
        rows.append((s, m))
    decays = [d for d in feed(eng, rows) if "stalled" in d[2]]
    assert decays, "a flat validation loss must be decided on"
    first = decays[0]
    assert first[0] % 25 == 0 and 100 + 20 * 25 <= first[0] <= 1300 and "val_loss" in first[2]
    assert "over 20 observations" in first[2]


def test_dense_metric_still_needs_the_full_window():
    eng = engine("auto")
    rng = np.random.default_rng(6)
    rows = [(s, {"loss": 1.0 + 0.05 * rng.standard_normal()}) for s in range(400)]
    decays = [d for d in feed(eng, rows) if "stalled" in d[2]]
    assert decays and decays[0][0] >= 100 + 99 and "over 100 observations" in decays[0][2]


def test_other_stateful_policies_wait_for_autos_warmup():
    eng = engine("auto", "plateau:method=threshold,patience=0")
    feed(eng, [(s, {"loss": 1.0}) for s in range(100)])
    plateau_state = eng.state["policies"][1]
    assert plateau_state["seen"] == 0


def test_state_round_trips_through_json_and_replays_identically():
    rng = np.random.default_rng(7)
    rows = [(s, {"loss": 2 * math.exp(-s / 200) + 0.1 + 0.02 * rng.standard_normal()}) for s in range(600)]
    rows[300] = (300, {"loss": 50.0})
    a = engine("auto")
    da = feed(a, rows)
    b = engine("auto")
    db = feed(b, rows[:250])
    b.state = json.loads(json.dumps(b.state))
    db += feed(b, rows[250:])
    assert da == db and guards(da)


def test_state_saved_with_window_lists_continues_identically():
    """A state from before the window's times and rows were kept as runs (two parallel lists
    ``times`` and ``at``) loads and goes on to the very decisions of one never saved."""
    rng = np.random.default_rng(11)
    rows = [(5 * s, {"loss": 2 / (1 + s / 300) + 0.05 * rng.standard_normal()}) for s in range(4000)]
    a, b = engine("auto"), engine("auto")
    assert feed(a, rows[:1500]) == feed(b, rows[:1500])
    old = json.loads(json.dumps(b.state))
    policy = old["policies"][0]
    runs = policy.pop("runs")
    assert runs and len(runs) < len(policy["values"])  # kept compactly
    policy["times"] = [t0 + dt * k for t0, dt, _, _, start, stop in runs for k in range(start, stop)]
    policy["at"] = [r0 + dr * k for _, _, r0, dr, start, stop in runs for k in range(start, stop)]
    assert len(policy["at"]) == len(policy["values"])
    b.state = old
    later = feed(a, rows[1500:])
    assert feed(b, rows[1500:]) == later and any("stalled" in d[2] for d in later)
    assert "at" not in b.state["policies"][0]


def test_min_window_is_checked():
    with pytest.raises(PolicyError):
        engine("auto:min_window=4")
    engine("auto:window=8")  # the default min_window (20) is capped by a smaller window
    engine("auto:window=50,min_window=60")


def test_slow_sustained_rise_fires_the_guard():
    """A loss that turns and climbs steadily (no spike, no doubling) is a slow divergence."""
    eng = engine("auto:warmup=0")
    rng = np.random.default_rng(1)
    down = [(s, {"loss": 1.0 - 0.001 * s + 0.01 * rng.standard_normal()}) for s in range(300)]
    up = [(s, {"loss": 0.7 + 0.003 * (s - 300) + 0.01 * rng.standard_normal()}) for s in range(300, 500)]
    decisions = feed(eng, down + up)
    assert 300 < decisions[0][0] <= 350  # the turn stalls the window first: a decay
    fired = guards(decisions)
    assert fired and "rises significantly" in fired[0][2] and fired[0][0] <= 450


def test_improving_window_skips_the_test(monkeypatch):
    """When the window's later half is better than its earlier half, neither a stall nor a slow
    rise can fire, so the test (the costly part of a row) is not run; with ``increase`` it is."""
    from autolr import trend

    calls = []
    real = trend.improvement_tests
    monkeypatch.setattr(trend, "improvement_tests", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(5)
    rows = [(s, {"loss": 2.0 * math.exp(-s / 400) + 0.01 * rng.standard_normal()}) for s in range(600)]
    assert feed(engine("auto:warmup=0"), rows) == []
    assert calls == []
    decisions = feed(engine("auto:warmup=0,increase=true"), rows)
    assert len(calls) >= 20 and decisions  # tested every 10 rows once the window is full; boosted


def test_loss_printed_at_zero_is_not_divergence():
    """A memorised training set, its loss printed with 4 decimals: 0.0000, now and then 0.0001.
    Exact zeros have no spread, so 0.0001 was 'a jump of 1e8 robust sigmas' (8-16 false cuts in
    these 4500 rows before); the guard's sigma is now at least 1e-4 of the run's largest level.
    A real divergence (to 3.0) still fires at once."""
    rng = np.random.default_rng(1)
    rows = []
    for s in range(4600):
        if s < 300:
            loss = round(2.0 * math.exp(-s / 60), 4)
        else:
            loss = 3.0 if s >= 4500 else (0.0001 if rng.random() < 0.02 else 0.0)
        rows.append((s, {"loss": loss}))
    fired = guards(feed(engine("auto:min_factor=1e-300"), rows))  # no floor: every cut shows
    assert fired and fired[0][0] == 4500 and "jump to 3" in fired[0][2]


@pytest.mark.parametrize("shape", ["plateau from epoch 25", "still declining"])
def test_epoch_level_log_warms_up_one_epoch_and_decides_in_epochs(shape):
    """One row per epoch and no step (Keras's CSVLogger): the warmup is the first epoch, the
    window ``epoch_window`` epochs. Before, the warmup took 100 epochs and no test ran before
    100 rows: a 60-epoch run never left its warmup."""
    rng = np.random.default_rng(0)
    eng = engine("auto")
    scales, cuts = [], []
    for ep in range(60):
        if shape == "still declining":
            v = 2.0 * math.exp(-ep / 40) + 0.3
        else:
            v = 2.0 * math.exp(-min(ep, 25) / 5) + 0.4
        v += 0.002 * rng.standard_normal()
        cuts += [ep for d in eng.feed(Record(metrics={"loss": 0.8 * v, "val_loss": v}, epoch=float(ep)))
                 if "stalled" in d.reason]
        scales.append(eng.scale)
    assert eng.state["unit"] == "epoch" and scales[0] == 1.0
    if shape == "still declining":
        assert cuts == []
    else:
        assert cuts and 30 <= cuts[0] <= 36  # ReduceLROnPlateau (patience 10) would cut at 36


def lightning_rows(train_name, jump_at=None, n=1500):
    """Lightning's CSV layout: training rows with the per-step loss, and every 25 steps a separate
    validation row (same step) holding only val_loss, here three times the training loss."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n):
        loss = (5.0 if jump_at is not None and s >= jump_at else 0.5) + 0.02 * rng.standard_normal()
        rows.append((s, {train_name: loss}))
        if s % 25 == 24:
            rows.append((s, {"val_loss": 1.6 + 0.02 * rng.standard_normal()}))
    return rows


@pytest.mark.parametrize("train_name", ["loss", "train_loss", "train_loss_step"])
def test_guard_watches_the_training_loss_not_validation_rows(train_name):
    """The guard keeps to the per-step training loss: validation rows (val_loss only, higher
    than the training loss) never enter its window; before, with ``loss`` they did (a false
    "jump" at the first validation, step 24), and with ``train_loss`` the guard watched
    val_loss alone and missed a training divergence between validations."""
    eng = engine("auto")
    assert guards(feed(eng, lightning_rows(train_name))) == []
    assert eng.state["policies"][0]["guard_on"] == train_name
    fired = guards(feed(engine("auto"), lightning_rows(train_name, jump_at=600)))
    assert fired and fired[0][0] == 600 and train_name in fired[0][2]


@pytest.mark.parametrize("smoothing", ["epoch running mean", "ema"])
def test_smoothed_loss_does_not_fire_the_sustained_rise_guard(smoothing):
    """A loss logged smoothed: the running mean over the epoch so far (Keras's batch logs, its
    progress bar) or an exponential moving average. Smooth, so any drift looks significant;
    at an epoch's start the running mean restarts from one noisy batch and climbs back. The
    sustained-rise rule also needs the later half's median above the earlier's by ``rise`` of
    the level; without that (the rule before) the running mean fired it 3 times here."""
    rng = np.random.default_rng(0)
    eng = engine("auto")
    rows, step, ema = [], 0, None
    for _ in range(30):  # epochs of 200 batches, a decaying loss with 30 % batch-to-batch noise
        total = 0.0
        for b in range(200):
            x = (0.3 + 2.0 * math.exp(-step / 1500)) * (1 + 0.3 * rng.standard_normal())
            total += x
            ema = x if ema is None else 0.98 * ema + 0.02 * x
            rows.append((step, {"loss": total / (b + 1) if smoothing != "ema" else ema}))
            step += 1
    assert [d for d in guards(feed(eng, rows)) if "rises" in d[2]] == []


@pytest.mark.parametrize("noise", ["gauss", "t3", "ar0.5"])
def test_long_flat_noise_never_fires_the_guard(noise):
    """Thousands of tests on a stationary noisy loss: the sustained-rise rule (p < rise_p) stays quiet.

    With the former p < 1e-3 this fired 0.2-0.4 times per 10,000 rows on these series, each
    time halving the LR of a run that was not diverging.
    """
    rng = np.random.default_rng(7)
    n = 20_000
    e = rng.standard_t(3, n) / math.sqrt(3) if noise == "t3" else rng.standard_normal(n)
    if noise == "ar0.5":
        x = np.empty(n)
        x[0] = e[0]
        for i in range(1, n):
            x[i] = 0.5 * x[i - 1] + math.sqrt(0.75) * e[i]
        e = x
    eng = engine("auto")
    fired = guards(feed(eng, [(s, {"loss": 1.0 + 0.15 * v}) for s, v in enumerate(e)]))
    assert fired == []


def test_rise_p_is_validated():
    with pytest.raises(PolicyError):
        engine("auto:rise_p=0")


def ar1_noise(phi, n, seed):
    """Stationary AR(1) noise of unit marginal deviation."""
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(n) * math.sqrt(1 - phi * phi)
    x = np.empty(n)
    x[0] = rng.standard_normal()
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    return x


# Seeds of AR(0.9) series (15% of the level, 3000 rows) on which the former level-shift rule
# (standard error from first differences only, 1.2533 · noise_level / sqrt(every)) cut the LR of
# a run that was not diverging.
_OLD_RULE_FIRED = (1, 4, 5, 6)


@pytest.mark.parametrize("seed", _OLD_RULE_FIRED)
def test_autocorrelated_noise_does_not_fire_the_level_shift(seed):
    """Negative control: AR(0.9) noise wanders for dozens of rows, so the median of 10 values can
    double the window's lowest one without any divergence. The old standard error, blind to the
    autocorrelation, called that 30-43 standard errors; the new one counts the autocorrelation."""
    e = ar1_noise(0.9, 3000, seed)
    eng = engine("auto:min_factor=1e-300")  # the open-loop flat loss is decayed every ~100 rows
    fired = guards(feed(eng, [(s, {"loss": 1.0 + 0.15 * v}) for s, v in enumerate(e)]))
    assert fired == []


@pytest.mark.parametrize("noise", ["gauss", "ar0.9"])
@pytest.mark.parametrize("top", [3.0, 5.0])
@pytest.mark.parametrize("shape", ["jump", "ramp"])
def test_real_level_shift_still_fires_on_autocorrelated_noise(noise, top, shape):
    """The loss level goes to x3 / x5 and stays, at once (the spike rule's case, mostly) or
    climbing over 30 rows (no single jump: the level-shift rule's case): caught within a few
    blocks of `every` rows, under AR(0.9) noise too."""
    n, t0 = 1600, 1200
    e = ar1_noise(0.9, n, 11) if noise == "ar0.9" else np.random.default_rng(11).standard_normal(n)
    t = np.arange(n)
    ramp = 1.0 if shape == "jump" else 30.0
    level = np.where(t < t0, 1.0, np.minimum(1.0 + (top - 1.0) * (t - t0 + 1) / ramp, top))
    eng = engine("auto:min_factor=1e-300")
    fired = guards(feed(eng, [(s, {"loss": level[s] * (1.0 + 0.15 * e[s])}) for s in range(n)]))
    assert fired and t0 <= fired[0][0] <= t0 + (10 if shape == "jump" else 50), fired[:1]
    if shape == "ramp":
        assert "level shift" in fired[0][2]


def test_median_se_counts_autocorrelation():
    from autolr.policies.auto import _median_se

    white = np.random.default_rng(12).standard_normal(2000)
    se, phi = _median_se(white, 10)
    assert phi < 0.1
    assert se == pytest.approx(1.2533 / math.sqrt(10), rel=0.15)  # the white-noise formula
    ar = ar1_noise(0.9, 20_000, 13)
    se, phi = _median_se(ar, 10)
    assert 0.8 < phi < 0.96
    block_medians = np.median(ar[: len(ar) // 10 * 10].reshape(-1, 10), axis=1)
    assert 0.8 < se / np.std(block_medians) < 1.6  # the honest spread of a block median
    # shift and scale invariant; a linear trend changes nothing
    t = np.arange(2000)
    assert _median_se(3.0 + 2.0 * ar[:2000], 10)[0] == pytest.approx(2.0 * _median_se(ar[:2000], 10)[0])
    assert _median_se(ar[:2000] + 0.01 * t, 10)[0] == pytest.approx(_median_se(ar[:2000], 10)[0])


def test_step_se_is_the_spread_of_a_block_median():
    """Steps between block medians 3 blocks apart: the autocorrelation-honest yardstick, trend-free."""
    from autolr.policies.auto import _step_se

    for phi in (0.0, 0.5, 0.9):
        x = ar1_noise(phi, 100_000, 14) if phi else np.random.default_rng(14).standard_normal(100_000)
        medians = np.median(x.reshape(-1, 10), axis=1)
        steps = medians[3:] - medians[:-3]
        assert 0.85 < _step_se(steps[:2000]) / np.std(medians) < 1.15, phi
        # a linear trend (0.02 per block) adds a constant 0.06 to every step: no change
        assert _step_se(steps[:2000] + 0.06) == pytest.approx(_step_se(steps[:2000]))


def test_progress_epochs_warm_up_over_the_first_epoch_and_decide_in_rows():
    """A log of fractional epochs and no step (Hugging Face's printed logs, 100 rows an epoch):
    the warmup ramps over the first epoch and the window counts rows. Before, epochs were read
    as an index of one row each: the warmup ended after the first row (epoch 0.01) and 10-row
    windows cut the LR five times while the loss was still falling (first at epoch 2.45)."""
    rng = np.random.default_rng(0)
    eng = engine("auto")
    scales, cuts = {}, []
    for i in range(1, 1001):
        e = i / 100
        v = 2.0 * math.exp(-min(e, 6) / 1.5) + 0.4 + 0.01 * rng.standard_normal()
        cuts += [e for d in eng.feed(Record(metrics={"loss": v}, epoch=e)) if "stalled" in d.reason]
        scales[e] = eng.scale
    assert eng.state["progress"] and scales[0.5] == pytest.approx(0.1 + 0.9 * 0.5) and scales[1.0] == 1.0
    assert cuts and 6.0 < cuts[0] <= 7.5  # the loss stops falling at epoch 6


def test_a_guard_fire_during_a_progress_warmup_stops_it_at_the_factor_that_produced_the_row():
    eng = engine("auto")
    for i in range(1, 51):
        eng.feed(Record(metrics={"loss": 1.0 + 0.01 * (i % 3)}, epoch=i / 100))
    [d] = eng.feed(Record(metrics={"loss": float("nan")}, epoch=0.51))
    assert "warmup ended at factor 0.55" in d.reason and d.scale == pytest.approx(0.55 * 0.5)


def test_the_warmup_restarts_when_the_runs_time_is_read_anew():
    """Three rows of hyperparameters before step 0 (they count as rows until the first step):
    the warmup is exact from step 0, not three steps ahead. Lightning's current epoch on every
    step row with unit=epoch: the warmup is epoch 0, not ended by the first row read as an
    epoch just done."""
    eng = engine("auto")
    for _ in range(3):
        eng.feed(Record(metrics={"batch_size": 32.0}))
    eng.feed(Record(metrics={"loss": 1.0}, step=0))
    assert eng.scale == pytest.approx(0.1 + 0.9 * 1 / 100)  # was 3 / 100
    eng = engine("auto:unit=epoch")
    scales = {}
    for s in range(0, 300, 10):
        eng.feed(Record(metrics={"loss": 1.0}, step=s, epoch=float(s // 100)))
        scales[s] = eng.scale
    assert scales[10] == scales[90] == pytest.approx(0.1) and scales[100] == scales[290] == 1.0
