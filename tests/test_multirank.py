"""Multi-rank consistency: every rank changes the LR at the same optimizer step.

Real ``autolr watch`` subprocess with ``--apply-margin``, 2 and 4 gloo ranks on the CPU (rank
processes forked by tests/_ddp_worker.py), each training three tiny models inside one DDP
module, one optimizer each: a plain loop with ``Control(run).lr(base, step=step)`` and
``attach(optimizer, Control(run))`` (mode 1: every rank reads the file, changes apply at
``apply_at_step``), and ``attach(optimizer, DistributedControl(run))`` (mode 2: rank 0 polls
and broadcasts).

Rank 0 logs with ``autolr.log``. Every rank records the LR each ``optimizer.step()`` used; all
sequences must be identical, and equal to what the journal's ``apply_at_step`` entries say.
Plus unit tests of ``Control.entry(step)``: late arrival, initial and manual records.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from autolr import Control
from autolr.control import ControlWriter, read_journal

from .test_e2e import start_daemon, stop, wait_until

torch = pytest.importorskip("torch")

STEPS = 160
STEP_SIZE = 15
MARGIN = 30
BASE_LR = 0.05
STEP_SLEEP = 0.005  # at most 200 steps/s: the margin is >= 150 ms of headroom for the daemon
WORKER = Path(__file__).with_name("_ddp_worker.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_scales(journal: list[dict], steps: int) -> list[float]:
    """The scale in force at each step by the journal: the newest entry whose step has come."""
    out = []
    for step in range(steps):
        due = [e for e in journal if e.get("apply_at_step") is None or e["apply_at_step"] <= step]
        out.append(max(due, key=lambda e: e["seq"])["scale"])
    return out


def run_ranks(world: int, run: Path, out: Path, timeout: float = 120) -> None:
    """Run ``world`` gloo ranks (tests/_ddp_worker.py forks them) and wait for all of them."""
    log = out / "ranks.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(world), str(free_port()), str(run), str(out),
                                 str(STEPS), str(BASE_LR), str(STEP_SLEEP)],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{world} ranks did not finish within {timeout} s:\n" + log.read_text()[-3000:]) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its forked ranks
            proc.wait()
    assert code == 0, f"the ranks failed ({code}):\n" + log.read_text()[-3000:]


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_changes_the_lr_at_the_same_step(tmp_path, world):
    root = tmp_path / "runs"
    run = root / "ddp"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").touch()
    out = tmp_path / "out"
    out.mkdir()
    daemon = start_daemon(root, "--policy", f"step:step_size={STEP_SIZE},gamma=0.7", "--apply-margin", str(MARGIN),
                          "--no-fsync")
    try:
        run_ranks(world, run, out)  # started at once: rows the daemon reads late are caught up on
        last = STEPS // STEP_SIZE * STEP_SIZE - 1  # the last logged step that triggers a decision
        wait_until(lambda: any(e.get("step") == last for e in read_journal(run)), what="the last decision")
    finally:
        stop(daemon)

    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    journal = read_journal(run)
    decisions = [e for e in journal if e["kind"] == "decision"]
    assert decisions and all(e["apply_at_step"] >= e["step"] + MARGIN for e in decisions)
    assert all(not r["late"] for r in results), [r["late"] for r in results]
    expected = [BASE_LR * s for s in expected_scales(journal, STEPS)]
    reference = results[0]["used"][0]
    assert len(set(reference)) >= 5, "the LR did not change several times during training"
    for rank, r in enumerate(results):
        for mode, seq in zip(("plain Control.lr(step=)", "attach(Control)", "attach(DistributedControl)"), r["used"]):
            assert seq == reference, f"rank {rank}, {mode}: LR sequence differs from rank 0's plain loop"
    assert reference == pytest.approx(expected, rel=1e-12)
    # changes land exactly at their apply_at_step
    changes = [s for s in range(1, STEPS) if reference[s] != reference[s - 1]]
    assert changes == [e["apply_at_step"] for e in decisions if e["apply_at_step"] < STEPS]
    disagree = sum(len({r["naive"][s] for r in results}) > 1 for s in range(STEPS))
    print(f"\n{world} ranks: {len(changes)} changes at steps {changes}; without step=, ranks "
          f"disagreed at {disagree} of {STEPS} steps (informative only)")


# ---- Control.entry(step) unit tests ---------------------------------------------------------

def _publish(run: Path, scale: float, at: int | None, step: int | None = None, **kw) -> dict:
    writer = ControlWriter(run, fsync=False)
    current = writer.current()
    schedule = (current or {}).get("schedule") or []
    fields = dict(scale=scale, lr=None, step=step, policy="test", reason="r", **kw)
    if "kind" not in kw or kw["kind"] != "manual":
        fields["apply_at_step"] = at
    rec = writer.publish_many([fields], schedule=schedule)[-1]
    os.utime(run / "autolr.json", ns=(time.time_ns(), time.time_ns() - 10**10))  # old: no racy re-read
    return rec


def _entry(ctl: Control, step: int) -> tuple[float, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scale = ctl.scale(step=step)
    return scale, [str(w.message) for w in caught]


def test_a_change_applies_at_its_step_and_a_late_one_at_the_next_call_with_a_warning(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _publish(run, 1.0, None, kind="initial")
    ctl = Control(run)
    for step in range(10):
        assert _entry(ctl, step) == (1.0, [])
    _publish(run, 0.5, at=15, step=5)  # on time: announced at step 10 for step 15
    assert [_entry(ctl, s)[0] for s in range(10, 20)] == [1.0] * 5 + [0.5] * 5
    _publish(run, 0.25, at=18, step=8)  # late: this process already ran step 18 and 19
    scale, warned = _entry(ctl, 20)
    assert scale == 0.25 and len(warned) == 1
    assert "due at step 18" in warned[0] and "at step 20" in warned[0]
    assert _entry(ctl, 21) == (0.25, [])  # warned once


def test_the_first_decision_after_the_initial_value_also_warns_when_late(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _publish(run, 1.0, None, kind="initial")
    ctl = Control(run)
    assert [_entry(ctl, s) for s in range(30)] == [(1.0, [])] * 30
    _publish(run, 0.5, at=25, step=5)
    scale, warned = _entry(ctl, 30)
    assert scale == 0.5 and len(warned) == 1


def test_a_fresh_process_past_the_step_picks_the_due_entry_silently(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _publish(run, 1.0, None, kind="initial")
    _publish(run, 0.5, at=15)
    _publish(run, 0.25, at=40)
    ctl = Control(run)  # e.g. a resumed job at step 30: the schedule says 0.5, no warning
    assert _entry(ctl, 30) == (0.5, [])
    assert _entry(ctl, 39) == (0.5, [])
    assert _entry(ctl, 40) == (0.25, [])


def test_a_manual_override_applies_at_once_and_is_not_undone_by_an_older_scheduled_change(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _publish(run, 1.0, None, kind="initial")
    _publish(run, 0.5, at=15)
    ctl = Control(run)
    assert _entry(ctl, 16)[0] == 0.5
    # `autolr set` writes no apply_at_step and no schedule: in force at once
    _publish(run, 0.1, None, kind="manual")
    assert _entry(ctl, 17)[0] == 0.1
    # the daemon's next change lists the older scheduled entries but not the manual one
    _publish(run, 0.05, at=30)
    assert [_entry(ctl, s)[0] for s in (18, 29, 30)] == [0.1, 0.1, 0.05]


def test_without_step_the_latest_record_applies_at_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _publish(run, 1.0, None, kind="initial")
    _publish(run, 0.5, at=1000)
    ctl = Control(run)
    assert ctl.scale() == 0.5 and ctl.lr(2.0) == 1.0
    assert ctl.scale(step=10) == 1.0 and ctl.lr(2.0, step=10) == 2.0
