"""The changes ahead (``Chain.ahead``): what the chain would publish at the next steps if no
row came first, so that a job whose log is written every N steps (or flushed late) still
follows a warmup or a schedule step by step."""
from __future__ import annotations

import math
import random

import pytest

from autolr.chain import build_chain
from autolr.plugins import policy_classes
from autolr.control import read_journal
from autolr.records import Record

CHAINS = [
    ([("warmup", {"steps": 100, "start_factor": 0.1})], {}),
    ([("warmup", {"steps": 40, "shape": "cosine"}), ("cosine", {"T_max": 500, "eta_min": 1e-4})], {"base_lr": 0.1}),
    ([("step", {"step_size": 30, "gamma": 0.5})], {}),
    ([("multistep", {"milestones": [25, 60, 61], "gamma": 0.3})], {}),
    ([("exponential", {"gamma": 0.99})], {"base_lr": 1.0, "min_lr": 0.2}),
    ([("cosine", {"T_max": 300})], {"min_change": 0.01}),
    ([("auto", {})], {}),
    ([("auto", {"warmup": 50, "warmup_start": 0.01})], {"base_lr": 0.5, "max_lr": 0.3}),
    ([("warmup", {"steps": 20}), ("plateau", {"method": "threshold", "patience": 3})], {}),
    ([("plateau", {"method": "threshold"})], {}),
]


def _feed(chain, state, step, loss=None):
    state, _ = chain.update(state, Record({} if loss is None else {"loss": loss}, step=step))
    return state


def _in_force(plan, t, scale):
    """The scale a client applies at step t: the last entry at or before t, else ``scale``."""
    for at, s in plan:
        if at <= t:
            scale = s
    return scale


@pytest.mark.parametrize("specs, options", CHAINS)
@pytest.mark.parametrize("logged_every", [1, 7, 50])
def test_the_plan_is_what_the_chain_publishes_when_rows_bring_only_the_time(specs, options, logged_every):
    chain = build_chain(specs, policy_classes(), **options)
    rng = random.Random(0)
    state = chain.init()
    step = -1
    for _ in range(8):
        step += logged_every
        state = _feed(chain, state, step, 1.0 + 0.1 * rng.random())
        plan = chain.ahead(state, step + 1, step + 200, limit=1000)
        assert all(b[0] > a[0] for a, b in zip(plan, plan[1:]))
        planned_from = state
        probe = state
        for t in range(step + 1, step + 200):
            assert math.isclose(chain.scale(probe), _in_force(plan, t, chain.scale(planned_from)), rel_tol=1e-12), t
            probe = _feed(chain, probe, t)  # a row that brings only the time: the LR for t + 1 on


def test_a_warmup_logged_every_50_steps_is_planned_step_by_step():
    chain = build_chain([("warmup", {"steps": 100, "start_factor": 0.1})], policy_classes())
    state = _feed(chain, chain.init(), 0, 1.0)
    plan = chain.ahead(state, 1, 400, limit=128)
    assert [at for at, _ in plan] == list(range(2, 101))  # step 1's value is the record's own
    assert plan[-1] == (100, 1.0)
    assert plan[0][1] == pytest.approx(0.1 + 0.9 * 2 / 100)


def test_auto_plans_its_warmup_and_nothing_once_it_is_done():
    chain = build_chain([("auto", {})], policy_classes())
    state = _feed(chain, chain.init(), 9, 2.0)
    plan = chain.ahead(state, 10, 1000, limit=128)
    assert plan[0] == (11, pytest.approx(0.1 + 0.9 * 11 / 100)) and plan[-1] == (100, 1.0)
    for step in range(19, 400, 10):
        state = _feed(chain, state, step, 2.0 - step / 1000)
    assert chain.ahead(state, 400, 1000, limit=128) == []


def test_no_plan_without_a_policy_that_moves_alone_or_before_the_run_counts_steps():
    plateau = build_chain([("plateau", {})], policy_classes())
    assert plateau.ahead(_feed(plateau, plateau.init(), 5, 1.0), 6, 500, 128) == []
    cosine = build_chain([("cosine", {"T_max": 100})], policy_classes())
    assert cosine.ahead(cosine.init(), 0, 100, 128) == []  # no row yet: steps or epochs?
    by_epoch, _ = cosine.update(cosine.init(), Record({"loss": 1.0}, epoch=0.0))
    assert cosine.ahead(by_epoch, 1, 100, 128) == []  # a Keras-style log: the job's steps are not its counter


def test_a_manual_factor_carries_into_the_plan():
    chain = build_chain([("step", {"step_size": 10, "gamma": 0.5})], policy_classes())
    state = chain.override(_feed(chain, chain.init(), 3, 1.0), scale=0.2)
    assert chain.ahead(state, 4, 30, 128) == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05))]


@pytest.mark.parametrize("limit, worst", [(256, 0.025), (1024, 0.005)])
def test_more_changes_than_the_limit_keep_those_that_move_the_lr_most_each_exact(limit, worst):
    chain = build_chain([("cosine", {"T_max": 4000, "eta_min": 0.01})], policy_classes(), base_lr=1.0)
    state = _feed(chain, chain.init(), 0, 1.0)
    plan = chain.ahead(state, 1, 4001, limit=limit)

    def exact(t):
        return 0.01 + 0.99 * (1 + math.cos(math.pi * t / 4000)) / 2

    assert len(plan) <= limit and plan[-1][0] == 4000
    assert all(scale == pytest.approx(exact(at), rel=1e-12) for at, scale in plan)
    error = max(abs(_in_force(plan, t, chain.scale(state)) - exact(t)) / exact(t) for t in range(1, 4001))
    assert error <= worst


def test_thinning_keeps_a_step_schedules_jump_among_a_warmups_small_changes():
    chain = build_chain([("warmup", {"steps": 1000}), ("multistep", {"milestones": [500], "gamma": 0.1})],
                        policy_classes())
    state = _feed(chain, chain.init(), 0, 1.0)
    plan = chain.ahead(state, 1, 1001, limit=50)
    assert len(plan) <= 50 and dict(plan)[500] == pytest.approx(0.1 * (0.01 + 0.99 * 500 / 1000))


def test_the_plan_leaves_out_values_that_are_not_finite_and_positive():
    chain = build_chain([("exponential", {"gamma": 1e-100})], policy_classes())
    state = _feed(chain, chain.init(), 0, 1.0)
    plan = chain.ahead(state, 1, 20, 128)
    assert plan and all(scale > 0 and math.isfinite(scale) for _, scale in plan)
    assert len(plan) < 19


# ---- the run: what its control file lists ------------------------------------------------
class _Source:
    """What ``Run.feed`` asks of a reader."""

    def __init__(self, path):
        self.path, self.skipped = path, {}

    def columns(self):
        return ("loss",)


def _run(tmp_path, spec, **settings):
    from autolr.config import Settings
    from autolr.run import Run
    from autolr.spec import parse_spec

    run = Run(tmp_path, Settings(policies=(parse_spec(spec),), **settings), policy_classes(), fsync=False)
    return run, _Source(tmp_path / "m.jsonl")


def _control(tmp_path):
    import json
    return json.loads((tmp_path / "autolr.json").read_text())


def test_a_run_lists_as_far_ahead_as_twice_what_a_read_brings(tmp_path):
    run, source = _run(tmp_path, "warmup:steps=1000")
    run.feed(source, [Record({"loss": 1.0}, step=s) for s in range(0, 100, 10)])  # rows every 10 steps
    ahead = _control(tmp_path)["ahead"]
    # from step 92 (the record itself is the factor for 91) to twice the 91 steps the read brought
    # (from its first row's) plus the stride of 10 after the last row
    assert ahead[0][0] == 92 and ahead[-1][0] == 90 + 2 * 91 + 10 and len(ahead) == 191
    assert ahead[-1][1] == pytest.approx(0.01 + 0.99 * 282 / 1000) and ahead[-1][2] is None
    run.feed(source, [Record({"loss": 1.0}, step=100)])  # then one row a read: as far as before
    ahead = _control(tmp_path)["ahead"]
    assert (ahead[0][0], ahead[-1][0]) == (102, 282)
    for s in range(110, 400, 10):
        run.feed(source, [Record({"loss": 1.0}, step=s)])
    ahead = _control(tmp_path)["ahead"]  # and once the rows pass it, twice the 10 steps a read brings, + 10
    assert (ahead[0][0], ahead[-1][0]) == (392, 390 + 2 * 10 + 10)


def test_a_step_schedule_lists_its_next_step_however_far(tmp_path):
    run, source = _run(tmp_path, "step:step_size=1000,gamma=0.1", base_lr=0.5)
    for s in range(5):
        run.feed(source, [Record({"loss": 1.0}, step=s)])
    assert not (tmp_path / "autolr.json").exists()  # no change yet (the daemon publishes the start value)
    run.feed(source, [Record({"loss": 1.0}, step=999)])
    control = _control(tmp_path)
    assert control["scale"] == pytest.approx(0.1) and control["lr"] == pytest.approx(0.05)
    # (as far as the first row's list, 4096 steps: no cadence was known then)
    assert control["ahead"] == [[at, pytest.approx(0.1 ** (at // 1000)), pytest.approx(0.5 * 0.1 ** (at // 1000))]
                                for at in (2000, 3000, 4000)]
    for s in range(4999, 12000, 100):  # a row every 100 steps, one a read: 300 steps ahead, or the next step
        run.feed(source, [Record({"loss": 1.0}, step=s)])
    assert _control(tmp_path)["step"] == 11999 and _control(tmp_path)["scale"] == pytest.approx(1e-12)
    assert _control(tmp_path)["ahead"] == [[13000, pytest.approx(1e-13), pytest.approx(5e-14)]]


def test_no_changes_ahead_with_an_apply_margin_or_a_policy_that_waits_for_rows(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run, source = _run(tmp_path / "a", "warmup:steps=1000", apply_margin=10)
    run.feed(source, [Record({"loss": 1.0}, step=s) for s in range(10)])
    assert "ahead" not in _control(tmp_path / "a") and "apply_at_step" in _control(tmp_path / "a")
    run, source = _run(tmp_path / "b", "plateau:method=threshold,patience=2")
    run.feed(source, [Record({"loss": 1.0}, step=s) for s in range(10)])
    assert _control(tmp_path / "b")["policy"] == "plateau" and "ahead" not in _control(tmp_path / "b")


@pytest.mark.parametrize("spec, length, start", [("warmup:steps=100", 100, 0.01), ("auto", 100, 0.1)])
def test_a_start_row_lists_the_warmup_from_the_first_step_in_the_initial_record(tmp_path, spec, length, start):
    """The Lightning and Hugging Face callbacks write ``{"step": global_step - 1}`` when a fit
    starts: the run then counts steps, and its initial record (the same seq: no new decision)
    lists the warmup from step 1 on, before the logger's first rows."""
    run, source = _run(tmp_path, spec)
    run.start()
    assert _control(tmp_path)["seq"] == 1 and "ahead" not in _control(tmp_path)
    run.feed(source, [Record({}, step=-1)])
    control = _control(tmp_path)
    assert control["seq"] == 1 and control["scale"] == pytest.approx(start)
    assert [at for at, _, _ in control["ahead"]] == list(range(1, length + 1))
    assert control["ahead"][-1][1] == 1.0
    assert len(read_journal(tmp_path)) == 1  # nothing journaled
    run.feed(source, [Record({"loss": 2.0}, step=s) for s in range(49, 100, 50)])  # the first flush
    control = _control(tmp_path)
    assert control["seq"] == 3 and control["scale"] == 1.0 and "ahead" not in control  # the warmup is over


def test_the_changes_ahead_are_not_listed_over_another_writers_record(tmp_path):
    from autolr.control import ControlWriter

    run, source = _run(tmp_path, "warmup:steps=100")
    run.start()
    ControlWriter(tmp_path).publish(scale=0.3, lr=None, step=None, policy="manual", reason="set", kind="manual")
    assert not run.writer.relist(1, [(5, 0.5, None)])
    assert _control(tmp_path)["seq"] == 2 and "ahead" not in _control(tmp_path)
    run.feed(source, [Record({}, step=-1)])  # adopts the set, then lists from it: manual x warmup
    control = _control(tmp_path)
    assert control["seq"] == 2 and control["scale"] == 0.3
    # (a set is relative: the warmup's own rise, x100 from here, follows it, as the daemon's
    # decisions would)
    assert control["ahead"][-1] == [100, pytest.approx(0.3 / 0.01), None]


def test_a_list_reaches_at_least_as_far_as_the_one_before(tmp_path):
    """A daemon catching up publishes a long list, then shorter reads: the job may already be at
    the far end, and a shorter list would take its LR back to an earlier step's factor."""
    from autolr.control import Control

    run, source = _run(tmp_path, "warmup:steps=2000")
    run.feed(source, [Record({"loss": 1.0}, step=s) for s in range(0, 1000, 10)])  # a long first read
    far = _control(tmp_path)["ahead"][-1][0]
    assert far > 1500
    job = Control(tmp_path)
    before = job.scale(far)
    for s in range(1000, 1100, 10):  # then a row a read
        run.feed(source, [Record({"loss": 1.0}, step=s)])
        assert _control(tmp_path)["ahead"][-1][0] >= far
        assert job.scale(far) >= before  # never back to an earlier step's factor


@pytest.mark.parametrize("spec", ["warmup:steps=100", "auto"])
def test_a_first_row_after_the_warmup_is_reported_once(tmp_path, caplog, spec):
    (tmp_path / "late").mkdir()
    (tmp_path / "early").mkdir()
    run, source = _run(tmp_path / "late", spec)
    run.feed(source, [Record({"loss": 1.0}, step=499)])  # a Trainer logging every 500 steps
    run.feed(source, [Record({"loss": 1.0}, step=999)])
    said = [r.getMessage() for r in caplog.records if "was over" in r.getMessage()]
    assert len(said) == 1 and "first row came at step 499" in said[0]
    caplog.clear()
    run, source = _run(tmp_path / "early", spec)
    run.feed(source, [Record({}, step=-1)])  # a callback's start row
    run.feed(source, [Record({"loss": 1.0}, step=499)])
    assert not [r for r in caplog.records if "was over" in r.getMessage()]


def test_a_start_row_lists_as_far_as_a_trainer_logging_every_500_steps_needs(tmp_path):
    """Regression (a helper's audit): the first row's list reached 256 steps (the entry limit
    taken for steps), so with ``logging_steps=500`` a StepLR's changes at 300 and 400, and a
    500-step warmup's second half, were not listed: steps 300-499 ran at 2-4x the factor."""
    run, source = _run(tmp_path, "step:step_size=100,gamma=0.5")
    run.start()
    run.feed(source, [Record({}, step=-1)])
    assert [at for at, _, _ in _control(tmp_path)["ahead"]][:5] == [100, 200, 300, 400, 500]
    (tmp_path / "w").mkdir()
    run, source = _run(tmp_path / "w", "warmup:steps=500")
    run.start()
    run.feed(source, [Record({}, step=-1)])
    assert [at for at, _, _ in _control(tmp_path / "w")["ahead"]] == list(range(1, 501))


def test_a_rewind_ends_the_reach_of_the_lists_before(tmp_path):
    """Regression (a helper's audit): after a resume from an earlier checkpoint the lists kept
    reaching as far as before the rewind, thinned, until the job passed that point again."""
    run, source = _run(tmp_path, "cosine:T_max=100000")
    run.feed(source, [Record({"loss": 1.0}, step=s) for s in range(0, 3000, 10)])  # a long first read
    assert _control(tmp_path)["ahead"][-1][0] > 5000
    run.feed(source, [Record({"loss": 1.0}, step=1000)])  # resumed from step 1000
    run.feed(source, [Record({"loss": 1.0}, step=1010)])
    ahead = _control(tmp_path)["ahead"]
    assert ahead[-1][0] < 1100 and [at for at, _, _ in ahead] == list(range(1012, ahead[-1][0] + 1))
