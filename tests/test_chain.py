"""The chain's automatic metric: a validation loss under any framework's name, in any order."""
from __future__ import annotations

import itertools
import math

import pytest

from autolr.chain import UNIT_ROWS, build_chain, choose_metric, metric_rank
from autolr.plugins import policy_classes
from autolr.records import Record


@pytest.mark.parametrize("names, expected", [
    (["loss", "eval_loss", "learning_rate", "grad_norm"], "eval_loss"),  # Hugging Face trainer_state.json
    (["train/loss", "eval/loss", "train/learning_rate"], "eval/loss"),  # its TensorBoard and W&B logs
    (["train_loss", "val_loss", "epoch"], "val_loss"),  # Lightning's CSVLogger
    (["train_loss_step", "val/loss"], "val/loss"),
    (["loss", "val_loss", "eval_loss"], "val_loss"),
    (["train_loss", "loss"], "loss"),
    (["my_loss", "acc"], "my_loss"),
    (["Loss/train", "Loss/val"], "Loss/val"),  # PyTorch's TensorBoard tutorial's names
    (["Loss/train", "Loss/test", "my_loss"], "Loss/train"),  # a test loss is not a validation loss
    (["loss/split/train", "loss/split/val"], "loss/split/val"),  # add_scalars
    (["train_loss_step", "val_loss_step", "train_loss_epoch"], "val_loss_step"),
    (["loss", "Loss/val"], "Loss/val"),
    (["train-loss", "my_loss"], "train-loss"),
    (["acc", "lr"], None),
])
def test_choose_metric_prefers_a_validation_loss_whatever_the_order(names, expected):
    for order in itertools.permutations(names):
        assert choose_metric(order) == expected


def test_ranks():
    assert metric_rank("val_loss") < metric_rank("eval_loss") < metric_rank("Loss/val") < metric_rank("loss")
    assert metric_rank("loss") < metric_rank("train/loss") < metric_rank("Loss/train") < metric_rank("my_loss")
    assert metric_rank("my_loss") < metric_rank(None) == metric_rank("accuracy") == metric_rank("val_acc")


def monitor_after(rows) -> str | None:
    chain = build_chain([("plateau", {"method": "threshold"})], policy_classes(), base_lr=0.1)
    state = chain.init()
    for r in rows:
        state, _ = chain.update(state, r)
    return state["monitor"]


@pytest.mark.parametrize("train, val", [("loss", "eval_loss"), ("train/loss", "eval/loss"),
                                        ("train_loss", "val/loss"), ("loss", "val_loss"),
                                        ("Loss/train", "Loss/val")])
def test_monitor_moves_to_the_validation_loss_when_it_appears(train, val):
    """Training rows first, an evaluation row every 5 (Hugging Face's layout)."""
    rows = [Record({train: 1.0}, s) if s % 5 else Record({val: 1.0}, s) for s in range(1, 12)]
    assert monitor_after(rows[:4]) == train
    assert monitor_after(rows) == val
    # and it stays: later training rows do not move it back
    assert monitor_after(rows + [Record({train: 0.5}, 12)]) == val


def test_an_explicit_metric_is_kept():
    chain = build_chain([("plateau", {"method": "threshold"})], policy_classes(), base_lr=0.1, metric="loss")
    state = chain.init()
    for s in range(5):
        state, _ = chain.update(state, Record({"loss": 1.0, "eval_loss": 1.0}, s))
    assert state["monitor"] == "loss"


def test_a_row_name_cache_that_cannot_grow_without_bound():
    """A log whose rows keep inventing names: the per-name-set cache is cleared, not grown."""
    from autolr import chain as chain_mod

    chain = build_chain([("plateau", {"method": "threshold"})], policy_classes(), base_lr=0.1)
    state = chain.init()
    for s in range(6000):
        state, _ = chain.update(state, Record({f"m{s}": 1.0, "x_loss": 1.0}, s))
    assert state["monitor"] == "x_loss" and len(chain_mod._ROW_BEST) <= 4096


# ---- min_change: a schedule's small steps published once they add up --------------------------

def _cosine_run(min_change: float, rows: int = 20_000):
    chain = build_chain([("cosine", {"T_max": 100_000})], policy_classes(), base_lr=0.1, min_change=min_change)
    state = chain.init()
    published, seen = [], []
    for s in range(rows):
        state, d = chain.update(state, Record({"loss": 1.0}, s))
        if d is not None:
            published.append((s, d.lr))
        seen.append((state["scale"], 0.5 * (1 + math.cos(math.pi * (s + 1) / 100_000))))
    return published, seen


def test_min_change_publishes_a_schedule_once_its_steps_add_up():
    every, _ = _cosine_run(0.0)
    assert len(every) == 20_000  # the exact schedule: a change on every row
    fewer, seen = _cosine_run(1e-3)
    assert 50 <= len(fewer) <= 150  # ln(1 / 0.9045) / 0.001 = 100 steps of 0.1 %
    for published, exact in seen:  # the LR in force never strays min_change from the exact one (relative to it)
        assert abs(exact - published) < 1e-3 * published
    # each published value is the exact schedule at its row
    exact_at = dict(every)
    assert all(lr == exact_at[s] for s, lr in fewer)
    assert _cosine_run(1e-3) == (fewer, seen)  # deterministic: replay and restart give the same


def test_min_change_never_holds_back_a_policy_decision():
    """A plateau reduction is a decision with a reason: published even when smaller than min_change."""
    chain = build_chain([("plateau", {"method": "threshold", "patience": 2, "factor": 0.9999})],
                        policy_classes(), base_lr=0.1, min_change=0.01)
    state = chain.init()
    decisions = []
    for s in range(10):
        state, d = chain.update(state, Record({"loss": 1.0}, s))
        if d is not None:
            decisions.append(d)
    assert decisions and decisions[0].lr == pytest.approx(0.1 * 0.9999)
    with pytest.raises(Exception, match="min_change"):
        build_chain([("cosine", {"T_max": 10})], policy_classes(), min_change=1.0)


# ---- manual override -----------------------------------------------------------------------
def _chain(*specs, **kw):
    from autolr.config import parse_policy_options

    return build_chain(parse_policy_options(list(specs)), policy_classes(), **kw)


def _feed(chain, state, steps):
    decisions = []
    for s in steps:
        state, d = chain.update(state, Record({"loss": 1.0}, s))
        decisions.append(d)
    return state, decisions


@pytest.mark.parametrize("specs, kw, set_lr", [
    (("multistep:milestones=[2],gamma=0.01",), {"base_lr": 1.0, "min_lr": 0.1}, 0.5),  # factor under min_lr
    (("constant:factor=2",), {"base_lr": 1.0, "max_lr": 1.0}, 0.5),  # factor over max_lr
    (("constant:factor=2",), {"base_lr": 1.0, "max_lr": 1.0}, 0.2),
])
def test_a_manual_lr_survives_the_clamp_on_the_next_rows(specs, kw, set_lr):
    """Regression: manual was target / the clamped LR, so the clamp recomputed on the next row
    undid it (min_lr gave 0.1, max_lr 1.0 back)."""
    chain = _chain(*specs, **kw)
    state, _ = _feed(chain, chain.init(), range(5))
    state = chain.override(state, lr=set_lr)
    assert chain.lr(state) == pytest.approx(set_lr)
    state, ds = _feed(chain, state, range(5, 10))
    assert ds == [None] * 5 and chain.lr(state) == pytest.approx(set_lr)


@pytest.mark.parametrize("set_lr, bound, later", [(0.5, 0.2, 0.1), (0.001, 0.01, 0.01)])
def test_a_manual_lr_beyond_the_bounds_is_taken_at_the_bound_and_later_cuts_still_cut(set_lr, bound, later):
    """Regression (a helper's audit): ``autolr set --lr 0.5`` with max_lr 0.2 kept a factor of
    5, so the next cut (x0.5) still gave 2.5 x base, clamped to 0.2: the LR never moved."""
    chain = _chain("step:step_size=10,gamma=0.5", base_lr=0.1, min_lr=0.01, max_lr=0.2)
    state, _ = _feed(chain, chain.init(), range(5))
    state = chain.override(state, lr=set_lr)
    assert chain.lr(state) == pytest.approx(set_lr)  # what the control file says until the next row
    state, ds = _feed(chain, state, range(5, 10))
    assert ds[0] is not None and ds[0].lr == pytest.approx(bound)  # published at once (a helper's
    assert chain.lr(state) == pytest.approx(later)  # hunt: it stayed at the value set) and the cut
    # after step 9 acts from the bound: bound x 0.5, within the bounds


def test_a_manual_lr_while_the_factors_are_zero_holds_until_a_policy_moves():
    """Regression: a polynomial decay at total_iters (or a cosine to eta_min=0) multiplies to 0,
    and the override divided by it: ZeroDivisionError, and the daemon failed on every start."""
    chain = _chain("polynomial:total_iters=10", base_lr=0.1)
    state, _ = _feed(chain, chain.init(), range(12))
    assert chain._raw(state) == 0 and chain.lr(state) > 0  # the last good LR stays
    state = chain.override(state, lr=0.05)
    assert chain.lr(state) == pytest.approx(0.05)
    state, ds = _feed(chain, state, range(12, 20))
    assert ds == [None] * 8 and chain.lr(state) == pytest.approx(0.05)


def test_a_manual_lr_without_a_base_lr_teaches_the_base():
    """``autolr set --lr`` with no base LR known keeps the scale; later decisions continue
    from the manual LR in absolute terms (they published lr null and lost it)."""
    chain = _chain("step:step_size=5,gamma=0.5")
    state, _ = _feed(chain, chain.init(), range(3))
    assert chain.lr(state) is None
    state = chain.override(state, lr=0.003, scale=chain.scale(state))
    assert chain.scale(state) == 1.0 and chain.lr(state) == pytest.approx(0.003)
    state, ds = _feed(chain, state, range(3, 7))
    assert [d.scale for d in ds if d] == [0.5] and chain.lr(state) == pytest.approx(0.0015)
    assert chain.override(state, lr=0.01)["scale"] == state["scale"]  # lr alone: the scale stays
    # with a base LR the LR decides, whatever scale the record carried
    based = _chain("step:step_size=5,gamma=0.5", base_lr=0.1)
    s2 = based.override(based.init(), lr=0.5, scale=1.0)
    assert based.scale(s2) == pytest.approx(5.0) and based.lr(s2) == pytest.approx(0.5)


@pytest.mark.parametrize("lr, scale", [(None, None), (0.0, None), (None, -1.0), (math.nan, None), (None, math.inf)])
def test_override_refuses_unusable_values(lr, scale):
    chain = _chain("constant", base_lr=0.1)
    with pytest.raises(ValueError):
        chain.override(chain.init(), lr=lr, scale=scale)


def test_run_level_mode_fills_only_a_mode_of_that_meaning():
    """Regression: --mode max went into every policy with a `mode` field, the example cyclic
    plugin's too (CyclicLR's triangular/exp_range): "'max' is not one of ..."."""
    from pathlib import Path

    from autolr.config import parse_policy_options
    from autolr.plugins import get_plugin_manager

    folder = Path(__file__).resolve().parents[1] / "plugins" / "autolr-cyclic"
    registry = policy_classes(get_plugin_manager(str(folder), entry_points=False))
    specs = parse_policy_options(["cyclic:max_factor=4,step_size_up=3", "plateau:method=threshold,metric=acc"])
    chain = build_chain(specs, registry, mode="max")
    cyclic, plateau = chain.policies
    assert cyclic.mode == "triangular" and plateau.mode == "max"


def test_the_unit_is_the_first_counter_seen_not_the_first_rows():
    """Regression: a JSONL whose first line holds hyperparameters (no step) counted rows for
    the whole run, and step:step_size=50 on steps logged every 10 never decided."""
    chain = _chain("step:step_size=50,gamma=0.5")
    state, _ = chain.update(chain.init(), Record({"batch_size": 32.0, "lr": 0.001}))
    assert state["unit"] is None
    decided = []
    for s in range(0, 200, 10):
        state, d = chain.update(state, Record({"loss": 1.0}, s))
        decided += [d.step] if d else []
    assert state["unit"] == "step" and decided == [50, 100, 150]
    rows = chain.init()
    for _ in range(UNIT_ROWS):  # a log without counters: rows, settled after UNIT_ROWS of them
        assert rows["unit"] is None
        rows, _ = chain.update(rows, Record({"loss": 1.0}))
    assert rows["unit"] == "row"
    rows, _ = chain.update(rows, Record({"loss": 1.0}, 500))
    assert rows["unit"] == "row"


@pytest.mark.parametrize("clamp", [{"min_lr": 1e-4}, {"max_lr": 0.01}])
def test_an_lr_clamp_needs_the_base_lr(clamp):
    """Regression: without a base LR the clamp applied to the scale: --max-lr 0.01 cut the
    loop's own LR 100x, silently."""
    from autolr.policy import PolicyError

    with pytest.raises(PolicyError, match="give base_lr"):
        _chain("constant", **clamp)
    assert _chain("constant", base_lr=0.1, **clamp).lr(_chain("constant", base_lr=0.1, **clamp).init()) > 0


def _scales_by_epoch(chain, epochs, loss=lambda e: 1.0):
    state, scales, reasons = chain.init(), {}, []
    for e in epochs:
        state, d = chain.update(state, Record({"loss": loss(e)}, epoch=e))
        scales[e] = state["scale"]
        reasons += [d.reason] if d else []
    return state, scales, reasons


def test_fractional_epochs_are_progress_so_a_per_epoch_schedule_moves_at_whole_epochs():
    """Regression: epochs logged as progress (Hugging Face's printed logs: 'epoch': 0.25 and no
    step) were read as an index, so step_size=1 cut after the row at epoch 0.25, an epoch early."""
    state, scales, reasons = _scales_by_epoch(_chain("step:step_size=1,gamma=0.5"), [i / 4 for i in range(1, 13)])
    assert state["unit"] == "epoch" and state["progress"] is True
    assert scales[0.25] == scales[0.75] == 1.0
    assert scales[1.0] == scales[1.75] == 0.5 and scales[2.0] == 0.25 and scales[3.0] == 0.125
    assert [r.rsplit(" ", 1)[1] for r in reasons] == ["1", "2", "3"]  # the epoch as logged
    # Index epochs (Keras: 0 after the first epoch) are unchanged: the cut follows epoch 0.
    state, scales, _ = _scales_by_epoch(_chain("step:step_size=1,gamma=0.5"), [0.0, 1.0, 2.0])
    assert state["progress"] is False and scales == {0.0: 0.5, 1.0: 0.25, 2.0: 0.125}


def test_a_cosine_over_progress_epochs_is_continuous():
    """cosine:T_max=2 (epochs) on epochs logged every 0.1: the factor at progress e, so it
    reaches eta_min at e = 2 and is half-way at e = 1."""
    state, scales, _ = _scales_by_epoch(_chain("cosine:T_max=2,unit=epoch"), [i / 10 for i in range(1, 21)])
    assert scales[1.0] == pytest.approx(0.5) and scales[0.5] == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert scales[1.9] > 0 and state["policies"][0]["t"] == pytest.approx(1.0)


def test_progress_survives_a_restart_and_whole_epochs_after_it_stay_progress():
    import json

    chain = _chain("step:step_size=1,gamma=0.5")
    state, _, _ = _scales_by_epoch(chain, [0.5])
    state = json.loads(json.dumps(state))  # as the daemon saves and loads it
    state, _ = chain.update(state, Record({"loss": 1.0}, epoch=1.0))
    assert state["scale"] == 0.5  # progress: the first epoch is done; an index would say 0.25


def test_a_warmup_in_progress_epochs_holds_plateau_until_the_first_epoch_is_done():
    """warmup:steps=1 (epochs) before plateau: rows before epoch 1.0 were trained during the
    warmup and are not fed to plateau (a progress epoch e is read as trained at e, as
    Lightning's current epoch is); before, the rows up to 1.75 were held back as well."""
    chain = _chain("warmup:steps=1,unit=epoch", "plateau:method=threshold,patience=1000")
    state, scales, _ = _scales_by_epoch(chain, [i / 4 for i in range(1, 13)])
    assert scales[0.5] == pytest.approx(0.01 + 0.99 * 0.5) and scales[1.0] == 1.0  # start_factor 0.01
    assert state["policies"][1]["seen"] == 9  # rows 1.0 .. 3.0


def test_a_schedule_starts_over_at_the_first_counter():
    """Regression: three lines of hyperparameters before step 0 counted as rows 0-2, and time
    never runs back, so step_size=1 stood at 0.125 until step 3 (torch: 0.5 after step 0).
    Rows before the first counter count as rows (a log without counters is exact from its
    first row); the first step restarts the schedules."""
    chain = _chain("step:step_size=1,gamma=0.5")
    state, out = chain.init(), []
    for record in [Record({"batch_size": 32.0})] * 3 + [Record({"loss": 1.0}, s) for s in range(4)]:
        state, _ = chain.update(state, record)
        out.append(state["scale"])
    assert out[3:] == [0.5, 0.25, 0.125, 0.0625]
    rows = chain.init()  # a log without any counter: the row index, once decided
    for _ in range(UNIT_ROWS + 2):
        rows, _ = chain.update(rows, Record({"loss": 1.0}))
    assert rows["scale"] == 0.5 ** (UNIT_ROWS + 2)


def test_a_warmup_holds_plateau_on_rows_without_a_step():
    """Regression: validation rows without a step (val_loss alone) were fed to plateau during
    the warmup, which cut three times before step 49; a decision on such a row reports the last
    step, not the row index."""
    chain = _chain("warmup:steps=50,start_factor=0.1", "plateau:method=threshold,patience=1,factor=0.5")
    state, cuts = chain.init(), []
    for s in range(80):
        state, d = chain.update(state, Record({"loss": 1.0}, s))
        if s % 4 == 3:
            state, d = chain.update(state, Record({"val_loss": 1.0 + s}))  # worse every time
            if d is not None and "plateau" in d.policy:
                cuts.append(d.step)
    assert cuts and min(cuts) >= 50 and all(c % 4 == 3 for c in cuts)  # the step before the row


def test_a_cut_while_max_lr_holds_the_lr_acts_on_the_lr_in_force():
    """Regression: base 1 with --max-lr 0.01: plateau's cuts by 0.1 went into the product's
    excess over the clamp (1 -> 0.1 -> 0.01), so the LR stayed 0.01 for two cuts; and auto's
    guard "x0.5" moved an LR held at max_lr by its boosts by 2 %. ReduceLROnPlateau cuts the
    LR in force: 1e-3, then 1e-4."""
    chain = _chain("plateau:method=threshold,patience=0,factor=0.1", base_lr=1.0, max_lr=0.01)
    state, lrs = chain.init(), []
    for s in range(4):
        state, _ = chain.update(state, Record({"val_loss": 1.0 + s}, s))
        lrs.append(chain.lr(state))
    assert lrs == pytest.approx([0.01, 1e-3, 1e-4, 1e-5])
    # min_lr: a cut while the clamp holds the LR up folds the held ratio into manual (the raw
    # product stood at 0.01, held at 0.05: x5), so that a later raise acts at once
    chain = _chain("plateau:method=threshold,patience=0,factor=0.1", base_lr=1.0, min_lr=0.05)
    state, _ = chain.update(chain.init(), Record({"val_loss": 1.0}, 0))
    for s in range(1, 4):
        state, _ = chain.update(state, Record({"val_loss": 1.0 + s}, s))
    assert chain.lr(state) == pytest.approx(0.05) and state["manual"] == pytest.approx(5.0)
    # a schedule under the clamp keeps min(max_lr, schedule): no fold without a decision note
    chain = _chain("step:step_size=1,gamma=0.5", base_lr=1.0, max_lr=0.3)
    state, lrs = chain.init(), []
    for s in range(3):
        state, _ = chain.update(state, Record({"loss": 1.0}, s))
        lrs.append(chain.lr(state))
    assert lrs == pytest.approx([0.3, 0.25, 0.125]) and state["manual"] == 1.0
