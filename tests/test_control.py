"""The control-file protocol: atomic writes, the journal, the ``Control`` client, ``autolr set``.

The multi-process tests run this very file as a script (``python test_control.py writer ...``)
so that writers and readers are real, separate processes.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest

from autolr import control
from autolr.control import (
    CONTROL_NAME, JOURNAL_NAME, LOCK_NAME, MAX_CONTROL_BYTES, Control, ControlError, ControlWriter,
    read_journal,
)

THIS = Path(__file__).resolve()
FIELDS = ("schema", "seq", "scale", "lr", "step", "policy", "reason", "updated_at")


# ---------------------------------------------------------------------------------------------
# Worker processes (run as ``python test_control.py <role> ...``)
# ---------------------------------------------------------------------------------------------
def _check_record(obj) -> str | None:
    """Why ``obj`` is not a whole record written by ``_writer``, or None."""
    if not isinstance(obj, dict):
        return f"not an object: {obj!r}"
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        return f"missing {missing}"
    seq = obj["seq"]
    # Each write carries its own seq in several fields: a mix of two writes would disagree.
    if obj["reason"] != f"write {seq}" or obj["scale"] != 1.0 / seq or obj["step"] != seq:
        return f"fields disagree with seq {seq}: {obj}"
    if not obj["updated_at"].endswith("Z"):
        return f"updated_at not UTC: {obj['updated_at']}"
    return None


def _writer(run: str, first: str, n_fast: str, n_fsync: str) -> None:
    writer = ControlWriter(run, fsync=False)
    i = int(first)
    for fsync, n in ((False, int(n_fast)), (True, int(n_fsync))):
        writer.fsync = fsync
        for _ in range(n):
            rec = writer.publish(scale=1.0 / i, lr=None, step=i, policy="hammer", reason=f"write {i}",
                                 evidence={"i": i, "fsync": fsync})
            assert rec["seq"] == i, (rec["seq"], i)
            i += 1


def _reader(run: str, stop: str, ready: str, mode: str) -> None:
    path = os.path.join(run, CONTROL_NAME)
    ctl = Control(run)
    reads, errors, regressions, seen = 0, [], 0, set()
    last = 0
    Path(ready).touch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while True:
            stopping = os.path.exists(stop)  # one more read after the writer has finished
            if mode == "raw":
                with open(path) as f:
                    text = f.read()
                try:
                    obj = json.loads(text)
                except ValueError as exc:
                    errors.append(f"unparsable ({exc}): {text!r}")
                    obj = None
            else:
                value = ctl.lr(2.0)  # 2.0 * scale of write k, where scale is 1/k
                obj = ctl.record()  # read after: the same write or a later one
                k = round(2.0 / value)
                if value != 2.0 * (1.0 / k) or obj is None or obj["seq"] < k:
                    errors.append(f"lr {value} is no write's, or newer than the record {obj}")
            if obj is not None:
                problem = _check_record(obj)
                if problem:
                    errors.append(problem)
                else:
                    regressions += obj["seq"] < last
                    last = obj["seq"]
                    seen.add(last)
            reads += 1
            if stopping or len(errors) > 20:
                break
    print(json.dumps({"mode": mode, "reads": reads, "errors": errors[:20], "regressions": regressions,
                      "distinct": len(seen), "last": last, "warnings": [str(w.message) for w in caught]}))


def _racer(run: str, writer_id: str, n: str, ready: str, go: str, nolock: str) -> None:
    writer = ControlWriter(run, fsync=False)
    if nolock == "1":  # the negative control: what the lock prevents
        import contextlib
        writer.locked = contextlib.nullcontext
    Path(ready).touch()
    while not os.path.exists(go):
        time.sleep(0.0005)
    seqs = []
    for k in range(int(n)):
        seqs.append(writer.publish(scale=0.5, lr=None, step=k, policy=f"w{writer_id}", reason="race",
                                   evidence={"writer": writer_id})["seq"])
    print(json.dumps(seqs))


def _forever(run: str) -> None:
    writer = ControlWriter(run, fsync=False)
    k = 0
    while True:
        k += 1
        writer.publish(scale=1.0 / (1 + k % 7), lr=None, step=k, policy="crash", reason="until killed")


def _spawn(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(THIS), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker {proc.args[2:]} failed ({proc.returncode}):\n{out}\n{err}"
    return out


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def good(seq=1, scale=0.5, lr=None, **kw) -> dict:
    return {"schema": 1, "seq": seq, "scale": scale, "lr": lr, "step": 10 * seq, "policy": "test",
            "reason": "test", "updated_at": "2026-01-01T00:00:00.000000Z", **kw}


def write_raw(run: Path, content: str | bytes | dict | list, *, age: float | None = None) -> Path:
    """Write the control file by hand (atomically), optionally with an mtime ``age`` seconds old."""
    path = run / CONTROL_NAME
    if isinstance(content, (dict, list)):
        content = json.dumps(content)
    data = content.encode() if isinstance(content, str) else content
    tmp = run / ".hand.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    if age is not None:
        past = time.time() - age
        os.utime(path, (past, past))
    return path


class Warnings:
    """Every warning raised inside, repeats included (the default filter would hide repeats)."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self.list = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

    @property
    def messages(self) -> list[str]:
        return [str(w.message) for w in self.list if issubclass(w.category, RuntimeWarning)]


@pytest.fixture
def run(tmp_path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    return folder


# ---------------------------------------------------------------------------------------------
# Atomicity and the journal, under real concurrent processes
# ---------------------------------------------------------------------------------------------
def test_readers_never_see_a_partial_file_while_thousands_of_writes_happen(run, tmp_path):
    n_fast, n_fsync = 3000, 300
    ControlWriter(run, fsync=False).publish(scale=1.0, lr=None, step=1, policy="hammer", reason="write 1")
    stop = tmp_path / "stop"
    readers = []
    for k, mode in enumerate(("raw", "control")):
        ready = tmp_path / f"ready{k}"
        readers.append((_spawn("reader", run, stop, ready, mode), ready))
    deadline = time.monotonic() + 60
    while not all(ready.exists() for _, ready in readers):
        assert time.monotonic() < deadline, "readers did not start"
        time.sleep(0.01)
    try:
        _finish(_spawn("writer", run, 2, n_fast, n_fsync))
    finally:
        stop.touch()
    n = 1 + n_fast + n_fsync
    summaries = [json.loads(_finish(proc)) for proc, _ in readers]
    for s in summaries:
        assert s["errors"] == [], s
        assert s["regressions"] == 0, s
        assert s["last"] == n, s  # the last write is seen once the writer is done
        assert s["warnings"] == [], s
        # The readers really ran during the writes (else this test would prove nothing).
        assert s["reads"] > 500 and s["distinct"] > 50, s

    entries = read_journal(run)
    assert [e["seq"] for e in entries] == list(range(1, n + 1))
    for e in entries[1:]:
        assert _check_record(e) is None and e["kind"] == "decision" and e["evidence"]["i"] == e["seq"]
    on_disk = json.loads((run / CONTROL_NAME).read_text())
    assert on_disk == {k: entries[-1][k] for k in on_disk}
    assert set(on_disk) == set(FIELDS)
    dt.datetime.strptime(on_disk["updated_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert not list(run.glob(".autolr-*")), "temporary files left behind"


def _race(run: Path, tmp_path: Path, n: int, nolock: bool) -> tuple[list[int], list[int]]:
    go = tmp_path / "go"
    ready = [tmp_path / f"racer{wid}" for wid in (1, 2)]
    for path in [go, *ready]:
        path.unlink(missing_ok=True)
    procs = [_spawn("racer", run, wid, n, ready[wid - 1], go, int(nolock)) for wid in (1, 2)]
    deadline = time.monotonic() + 60
    while not all(path.exists() for path in ready):  # both started, spinning on the go file
        assert time.monotonic() < deadline, "racers did not start"
        time.sleep(0.005)
    go.touch()
    seqs = [json.loads(_finish(p)) for p in procs]
    return seqs[0], seqs[1]


def test_two_concurrent_writers_never_share_a_seq(run, tmp_path):
    n = 300
    a, b = _race(run, tmp_path, n, nolock=False)
    assert sorted(a + b) == list(range(1, 2 * n + 1))
    entries = read_journal(run)
    assert [e["seq"] for e in entries] == list(range(1, 2 * n + 1))  # journal order == seq order
    writers = [e["evidence"]["writer"] for e in entries]
    switches = sum(x != y for x, y in zip(writers, writers[1:]))
    assert switches > 2, "the writers did not overlap, so the lock was not exercised"
    assert json.loads((run / CONTROL_NAME).read_text())["seq"] == 2 * n


def test_the_race_test_detects_duplicates_without_the_lock(run, tmp_path):
    """Negative control: with the lock disabled, the same race produces duplicate seqs."""
    for _ in range(3):  # a race: give it a few chances
        a, b = _race(run, tmp_path, 300, nolock=True)
        if len(set(a + b)) < len(a + b):
            return
    pytest.fail("no duplicate seq without the lock: the race test would not catch a missing lock")


# ---------------------------------------------------------------------------------------------
# Control client
# ---------------------------------------------------------------------------------------------
def test_no_control_file_gives_the_defaults(run):
    ctl = Control(run)
    with Warnings() as w:
        assert ctl.scale() == 1.0
        assert ctl.lr(0.3) == 0.3
        assert ctl.seq == 0 and ctl.record() is None
    assert w.messages == []
    assert not (run / CONTROL_NAME).exists()


def test_lr_null_gives_default_times_scale_and_absolute_lr_wins(run):
    ctl = Control(run)
    write_raw(run, good(seq=1, scale=0.25, lr=None))
    assert ctl.lr(0.4) == pytest.approx(0.1) and ctl.scale() == 0.25 and ctl.seq == 1
    write_raw(run, good(seq=2, scale=0.5, lr=0.007))
    assert ctl.lr(0.4) == 0.007 and ctl.lr(123.0) == 0.007 and ctl.scale() == 0.5 and ctl.seq == 2


def test_accepts_the_run_folder_or_the_file_itself(run):
    ControlWriter(run).publish(scale=0.5, lr=None, step=1, policy="p", reason="r")
    assert Control(run).lr(1.0) == 0.5
    assert Control(str(run)).lr(1.0) == 0.5
    assert Control(run / CONTROL_NAME).lr(1.0) == 0.5
    other = run / "elsewhere.json"  # any .json file path names the control file itself
    other.write_text(json.dumps(good(scale=0.125)))
    assert Control(other).lr(1.0) == 0.125


BAD = {
    "malformed JSON": '{"schema": 1, "seq": 2, "scale": ',
    "empty file": "",
    "raw NaN scale": '{"schema": 1, "seq": 2, "scale": NaN, "lr": null}',
    "raw Infinity scale": '{"schema": 1, "seq": 2, "scale": Infinity, "lr": null}',
    "raw NaN lr": '{"schema": 1, "seq": 2, "scale": 1.0, "lr": NaN}',
    "raw -Infinity lr": '{"schema": 1, "seq": 2, "scale": 1.0, "lr": -Infinity}',
    "huge float is inf": '{"schema": 1, "seq": 2, "scale": 1e999, "lr": null}',
    "zero scale": good(seq=2, scale=0),
    "negative scale": good(seq=2, scale=-0.5),
    "zero lr": good(seq=2, lr=0.0),
    "negative lr": good(seq=2, lr=-0.01),
    "zero max_lr": good(seq=2, max_lr=0),
    "string min_lr": good(seq=2, min_lr="0.01"),
    "string scale": good(seq=2, scale="0.5"),
    "bool scale": good(seq=2, scale=True),
    "wrong schema": good(seq=2, schema=2),
    "schema as string": good(seq=2, schema="1"),
    "missing seq": {k: v for k, v in good(seq=2).items() if k != "seq"},
    "missing scale": {k: v for k, v in good(seq=2).items() if k != "scale"},
    "missing lr": {k: v for k, v in good(seq=2).items() if k != "lr"},
    "missing schema": {k: v for k, v in good(seq=2).items() if k != "schema"},
    "a JSON list": [good(seq=2)],
    "a JSON number": "0.5",
    "oversized": json.dumps(good(seq=2, reason="x" * MAX_CONTROL_BYTES)),
    "not UTF-8": b'{"schema": 1, "seq": 2, "scale": 0.5, "lr": null, "reason": "\xff"}',
    "ahead not a list": good(seq=2, ahead={"10": 0.5}),
    "ahead entry of two": good(seq=2, ahead=[[10, 0.5]]),
    "ahead zero scale": good(seq=2, ahead=[[10, 0.0, None]]),
    "ahead negative lr": good(seq=2, ahead=[[10, 0.5, -1.0]]),
    "ahead step not an integer": good(seq=2, ahead=[[10.5, 0.5, None]]),
    "ahead steps going back": good(seq=2, ahead=[[10, 0.5, None], [10, 0.25, None]]),
    "ahead too long": good(seq=2, ahead=[[i, 0.5, None] for i in range(control.MAX_AHEAD + 1)]),
}


@pytest.mark.parametrize("age", [None, 60], ids=["fresh-file", "old-file"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_is_ignored_with_one_warning_and_the_last_good_value_kept(run, case, age):
    ctl = Control(run)
    write_raw(run, good(seq=1, scale=0.5, lr=None), age=age)
    with Warnings() as w:
        assert ctl.lr(0.2) == 0.1
    assert w.messages == []

    write_raw(run, BAD[case], age=age)
    with Warnings() as w:
        for _ in range(5):
            assert ctl.lr(0.2) == 0.1 and ctl.scale() == 0.5 and ctl.seq == 1
    assert len(w.messages) == 1, w.messages
    assert "keeping the last good value" in w.messages[0]

    write_raw(run, good(seq=3, scale=0.25, lr=None), age=age)  # a later good file is picked up
    with Warnings() as w:
        assert ctl.lr(0.2) == pytest.approx(0.05) and ctl.seq == 3
    assert w.messages == []


def test_bad_file_before_any_good_one_keeps_the_defaults(run):
    write_raw(run, "not json")
    ctl = Control(run)
    with Warnings() as w:
        assert ctl.lr(0.3) == 0.3 and ctl.scale() == 1.0 and ctl.record() is None
    assert len(w.messages) == 1


def test_the_same_bad_content_rewritten_does_not_warn_again_but_new_bad_content_does(run):
    ctl = Control(run)
    write_raw(run, good(seq=1))
    ctl.lr(1.0)
    with Warnings() as w:
        write_raw(run, "garbage")
        ctl.lr(1.0)
        write_raw(run, "garbage")  # a new inode and mtime, the same bytes
        ctl.lr(1.0)
        write_raw(run, "other garbage")
        ctl.lr(1.0)
    assert len(w.messages) == 2


def test_deleted_file_keeps_the_last_value_silently_and_a_new_file_is_picked_up(run):
    ctl = Control(run)
    write_raw(run, good(seq=4, scale=0.5))
    assert ctl.lr(1.0) == 0.5
    (run / CONTROL_NAME).unlink()
    with Warnings() as w:
        for _ in range(3):
            assert ctl.lr(1.0) == 0.5 and ctl.seq == 4
    assert w.messages == []
    write_raw(run, good(seq=5, scale=0.125))
    assert ctl.lr(1.0) == 0.125


class CountingStat:
    """Stands in for ``os.stat`` and counts the calls on the control file."""

    def __init__(self, target: Path, fake=None):
        self.real, self.target, self.calls, self.fake = os.stat, str(target), 0, fake

    def __call__(self, path, *args, **kw):
        st = self.real(path, *args, **kw)
        if os.fspath(path) == self.target:
            self.calls += 1
            if self.fake:
                return self.fake(st)
        return st


def test_unchanged_old_file_costs_one_stat_and_no_read(run, monkeypatch):
    path = write_raw(run, good(seq=1), age=60)
    ctl = Control(run)
    assert ctl.lr(1.0) == 0.5
    reads = []
    real_read = control._read_limited
    monkeypatch.setattr(control, "_read_limited", lambda *a: reads.append(a) or real_read(*a))
    counter = CountingStat(path)
    monkeypatch.setattr(os, "stat", counter)
    for _ in range(100):
        assert ctl.lr(1.0) == 0.5
    assert counter.calls == 100 and reads == []


def test_min_interval_suppresses_stats_and_changes_are_seen_after_it(run, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(control, "time", types.SimpleNamespace(monotonic=lambda: clock[0],
                                                                time_ns=time.time_ns))
    path = write_raw(run, good(seq=1, scale=0.5))
    counter = CountingStat(path)
    monkeypatch.setattr(os, "stat", counter)
    ctl = Control(run, min_interval=0.5)
    assert ctl.lr(1.0) == 0.5 and counter.calls == 1
    for _ in range(1000):
        ctl.lr(1.0)
        ctl.scale()
    assert counter.calls == 1

    write_raw(run, good(seq=2, scale=0.25))
    clock[0] += 0.49
    assert ctl.lr(1.0) == 0.5 and counter.calls == 1  # within the interval: not looked at yet
    clock[0] += 0.02
    assert ctl.lr(1.0) == 0.25 and counter.calls == 2  # after it: one stat, change seen
    assert ctl.lr(1.0) == 0.25 and counter.calls == 2


def test_min_interval_with_the_real_clock(run):
    write_raw(run, good(seq=1, scale=0.5))
    ctl = Control(run, min_interval=0.05)
    assert ctl.lr(1.0) == 0.5
    write_raw(run, good(seq=2, scale=0.25))
    deadline = time.monotonic() + 5
    while ctl.lr(1.0) != 0.25:
        assert time.monotonic() < deadline, "change never seen"
    time.sleep(0.06)
    assert ctl.lr(1.0) == 0.25


def test_a_rewrite_within_one_coarse_timestamp_tick_is_not_missed(run, monkeypatch):
    """On 1 s filesystem clocks, with recycled inode numbers, (inode, mtime, size) can repeat.

    ``os.replace`` frees the old inode and the next temp file often gets its number back, so
    a writer publishing twice within one tick leaves a file whose stat key equals the one the
    client cached. The client must still see the new content.
    """
    tick = time.time_ns() // 10**9 * 10**9

    def coarse(st):  # both writes fall in one clock tick and get the same inode number
        return types.SimpleNamespace(st_ino=42, st_size=st.st_size, st_mtime_ns=tick)

    monkeypatch.setattr(os, "stat", CountingStat(run / CONTROL_NAME, fake=coarse))
    ctl = Control(run)
    first, second = good(seq=1, scale=0.5), good(seq=2, scale=0.1)
    assert len(json.dumps(first)) == len(json.dumps(second))  # the same size, too
    write_raw(run, first)
    assert ctl.lr(1.0) == 0.5
    write_raw(run, second)
    assert ctl.lr(1.0) == 0.1 and ctl.seq == 2


def test_publish_then_client_round_trip(run):
    writer = ControlWriter(run)
    ctl = Control(run)
    assert ctl.lr(0.1) == 0.1
    writer.publish(scale=0.5, lr=None, step=100, policy="plateau", reason="flat")
    assert ctl.lr(0.1) == 0.05 and ctl.seq == 1
    writer.publish(scale=0.25, lr=0.025, step=200, policy="plateau", reason="flat again")
    assert ctl.lr(0.1) == 0.025 and ctl.scale() == 0.25 and ctl.seq == 2
    assert ctl.record()["step"] == 200


def test_the_changes_ahead_apply_from_their_steps_and_are_not_journaled(run):
    writer = ControlWriter(run)
    ctl = Control(run)
    writer.publish_many([dict(scale=0.1, lr=0.01, step=49, policy="warmup", reason="ramp")],
                        ahead=[(51, 0.2, 0.02), (60, 0.5, 0.05), (100, 1.0, 0.1)])
    assert [ctl.lr(1.0, step) for step in (40, 50, 51, 59, 60, 99, 100, 10_000)] == \
        [0.01, 0.01, 0.02, 0.02, 0.05, 0.05, 0.1, 0.1]
    assert [ctl.scale(step) for step in (50, 60)] == [0.1, 0.5]
    assert ctl.entry(75) == {"seq": 1, "scale": 0.5, "lr": 0.05, "ahead": 60}
    assert ctl.lr(1.0) == 0.01 and ctl.scale() == 0.1  # without a step: the record itself
    assert "ahead" not in read_journal(run)[-1]
    # The next record replaces them: its own, or none.
    writer.publish(scale=0.05, lr=0.005, step=120, policy="plateau", reason="flat")
    assert ctl.lr(1.0, 130) == 0.005 and ctl.seq == 2
    # A record whose changes come with apply_at_step (--apply-margin) lists them in its schedule.
    write_raw(run, good(seq=3, scale=0.5, lr=None, apply_at_step=200, ahead=[[150, 0.25, None]],
                        schedule=[{"at": 200, "seq": 3, "scale": 0.5, "lr": None}]))
    assert ctl.scale(160) == 0.05 and ctl.entry(160)["seq"] == 2  # its ahead is not taken
    assert ctl.scale(200) == 0.5


def test_publishing_an_unusable_change_ahead_raises_and_writes_nothing(run):
    writer = ControlWriter(run)
    with pytest.raises(ControlError):
        writer.publish_many([dict(scale=0.1, lr=None, step=1, policy="p", reason="r")], ahead=[(5, math.inf, None)])
    assert not (run / CONTROL_NAME).exists() and not (run / JOURNAL_NAME).exists()


# ---------------------------------------------------------------------------------------------
# Writer validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    {"scale": math.nan}, {"scale": math.inf}, {"scale": -math.inf}, {"scale": 0.0}, {"scale": -1.0},
    {"lr": math.nan}, {"lr": math.inf}, {"lr": 0.0}, {"lr": -0.1},
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_publishing_an_unusable_value_raises_and_writes_nothing(tmp_path, kw):
    fresh = tmp_path / "fresh"
    with pytest.raises(ControlError):
        ControlWriter(fresh).publish(**{"scale": 1.0, "lr": None, **kw}, step=1, policy="p", reason="r")
    assert not fresh.exists()

    used = tmp_path / "used"
    writer = ControlWriter(used)
    writer.publish(scale=0.5, lr=None, step=1, policy="p", reason="r")
    before = ((used / CONTROL_NAME).read_bytes(), (used / JOURNAL_NAME).read_bytes())
    with pytest.raises(ControlError):
        writer.publish(**{"scale": 1.0, "lr": None, **kw}, step=2, policy="p", reason="r")
    assert ((used / CONTROL_NAME).read_bytes(), (used / JOURNAL_NAME).read_bytes()) == before


def test_nan_or_inf_evidence_and_numpy_values_are_published_as_strict_json(run):
    """A diverging run's evidence holds NaN/inf metrics; that must not block the decision."""
    np = pytest.importorskip("numpy")
    rec = ControlWriter(run).publish(
        scale=np.float64(0.5), lr=None, step=np.int64(7), policy="plateau", reason="diverged",
        evidence={"plateau": {"value": math.nan, "best": math.inf, "low": -math.inf,
                              "np": np.float32("nan"), "arr": np.array([1.5, np.inf]), "n": np.int64(3)}},
    )
    assert rec["seq"] == 1 and rec["step"] == 7

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))

    on_disk = strict((run / CONTROL_NAME).read_text())
    assert on_disk["step"] == 7 and on_disk["scale"] == 0.5
    (line,) = (run / JOURNAL_NAME).read_text().splitlines()
    ev = strict(line)["evidence"]["plateau"]
    assert ev == {"value": "NaN", "best": "Infinity", "low": "-Infinity", "np": "NaN",
                  "arr": [1.5, "Infinity"], "n": 3}
    assert Control(run).lr(1.0) == 0.5


# ---------------------------------------------------------------------------------------------
# Crash consistency
# ---------------------------------------------------------------------------------------------
def test_journal_ahead_of_the_control_file_is_used_by_current_and_repair(run):
    writer = ControlWriter(run)
    writer.publish(scale=0.5, lr=None, step=1, policy="p", reason="one")
    writer.publish(scale=0.25, lr=None, step=2, policy="p", reason="two")
    # A crash after the journal append and before the replace: the journal holds seq 3.
    ahead = dict(good(seq=3, scale=0.125, lr=None, reason="three"), kind="decision", evidence={"x": 1})
    with open(run / JOURNAL_NAME, "a") as f:
        f.write(json.dumps(ahead) + "\n")
    assert json.loads((run / CONTROL_NAME).read_text())["seq"] == 2

    cur = writer.current()
    assert cur["seq"] == 3 and cur["scale"] == 0.125 and cur["reason"] == "three"
    assert "kind" not in cur and "evidence" not in cur  # a control record, not the journal entry
    ctl = Control(run)
    assert ctl.seq == 2  # the client only reads the control file

    assert writer.repair()["seq"] == 3
    on_disk = json.loads((run / CONTROL_NAME).read_text())
    assert on_disk["seq"] == 3 and on_disk["scale"] == 0.125
    assert ctl.lr(1.0) == 0.125 and ctl.seq == 3
    assert writer.publish(scale=0.5, lr=None, step=4, policy="p", reason="four")["seq"] == 4
    assert [e["seq"] for e in read_journal(run)] == [1, 2, 3, 4]


def test_crash_between_journal_and_replace_is_repaired(run, monkeypatch):
    writer = ControlWriter(run)
    writer.publish(scale=0.5, lr=None, step=1, policy="p", reason="one")

    def crash(*a, **kw):
        raise OSError("simulated crash before os.replace")

    monkeypatch.setattr(control, "atomic_write_json", crash)
    with pytest.raises(OSError):
        writer.publish(scale=0.25, lr=None, step=2, policy="p", reason="two")
    monkeypatch.undo()
    assert json.loads((run / CONTROL_NAME).read_text())["seq"] == 1
    assert writer.current()["seq"] == 2
    # A new writer (a restarted daemon) continues after the journal, not after the file.
    assert ControlWriter(run).publish(scale=0.125, lr=None, step=3, policy="p", reason="three")["seq"] == 3
    assert [e["seq"] for e in read_journal(run)] == [1, 2, 3]


def test_repair_does_nothing_when_the_file_is_current(run):
    writer = ControlWriter(run)
    assert writer.repair() is None and not (run / CONTROL_NAME).exists()
    writer.publish(scale=0.5, lr=None, step=1, policy="p", reason="one")
    before = os.stat(run / CONTROL_NAME)
    assert writer.repair()["seq"] == 1
    after = os.stat(run / CONTROL_NAME)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_torn_last_journal_line_is_ignored_and_the_next_entry_starts_a_fresh_line(run):
    writer = ControlWriter(run)
    writer.publish(scale=0.5, lr=None, step=1, policy="p", reason="one")
    writer.publish(scale=0.25, lr=None, step=2, policy="p", reason="two")
    with open(run / JOURNAL_NAME, "ab") as f:
        f.write(b'{"schema": 1, "seq": 3, "scale": 0.1')  # power loss mid-append
    assert writer.current()["seq"] == 2
    assert [e["seq"] for e in read_journal(run)] == [1, 2]

    assert writer.publish(scale=0.125, lr=None, step=3, policy="p", reason="three")["seq"] == 3
    lines = (run / JOURNAL_NAME).read_bytes().split(b"\n")
    assert lines[2] == b'{"schema": 1, "seq": 3, "scale": 0.1'
    assert json.loads(lines[3])["reason"] == "three" and lines[4] == b""
    assert [e["seq"] for e in read_journal(run)] == [1, 2, 3]
    assert writer.current()["seq"] == 3


def test_killed_writer_leaves_a_consistent_journal_and_control_file(run):
    rng = __import__("random").Random(7)
    total = 0
    for _ in range(4):
        journal = run / JOURNAL_NAME
        size = journal.stat().st_size if journal.exists() else 0
        proc = _spawn("forever", run)
        deadline = time.monotonic() + 60
        while not (journal.exists() and journal.stat().st_size > size):  # it is publishing
            assert time.monotonic() < deadline and proc.poll() is None, "the writer never published"
            time.sleep(0.005)
        time.sleep(rng.random() * 0.1)  # then kill it at some point mid-stream
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        seqs = [e["seq"] for e in read_journal(run)]
        assert seqs == list(range(1, len(seqs) + 1)), "gap or duplicate in the journal"
        assert len(seqs) > total, "the writer did not get to publish"
        total = len(seqs)
        with Warnings() as w:
            file_seq = Control(run).seq
        assert w.messages == []
        assert file_seq in (total - 1, total)  # journal first, so the file is at most one behind
        writer = ControlWriter(run)
        assert writer.current()["seq"] == total
        assert writer.repair()["seq"] == total
        assert json.loads((run / CONTROL_NAME).read_text())["seq"] == total
    assert ControlWriter(run).publish(scale=0.5, lr=None, step=0, policy="p", reason="after")["seq"] == total + 1


# ---------------------------------------------------------------------------------------------
# Permissions
# ---------------------------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("fsync", [True, False])
def test_files_are_not_group_or_world_writable_even_with_umask_0(tmp_path, fsync):
    from autolr.manual import set_manual

    old = os.umask(0)
    try:
        run = tmp_path / "new" / "run"  # created by the writer
        writer = ControlWriter(run, fsync=fsync)
        writer.publish(scale=0.5, lr=None, step=1, policy="p", reason="r")
        set_manual(run, scale=0.25)
        writer.publish(scale=0.125, lr=None, step=2, policy="p", reason="r")
        (run / CONTROL_NAME).unlink()
        writer.repair()  # the control file re-created from the journal
    finally:
        os.umask(old)
    for path in (run / CONTROL_NAME, run / JOURNAL_NAME, run / LOCK_NAME, run):
        mode = _mode(path)
        assert mode & 0o022 == 0, f"{path.name}: {oct(mode)}"
    assert _mode(run / CONTROL_NAME) & 0o444 == 0o444  # still readable by the training job's user


# ---------------------------------------------------------------------------------------------
# autolr set
# ---------------------------------------------------------------------------------------------
def invoke(*args: str):
    from click.testing import CliRunner

    from autolr.cli import main

    return CliRunner().invoke(main, ["set", *map(str, args)])


def test_set_lr_through_the_real_command_line(run, cli):
    proc = cli("set", str(run), "--lr", "0.01", "--reason", "too hot")
    printed = json.loads(proc.stdout)
    assert printed["lr"] == 0.01 and printed["policy"] == "manual" and printed["seq"] == 1
    on_disk = json.loads((run / CONTROL_NAME).read_text())
    assert on_disk == printed
    (entry,) = read_journal(run)
    assert entry["kind"] == "manual" and entry["seq"] == 1 and entry["reason"] == "too hot"
    assert entry["evidence"]["requested_lr"] == 0.01
    assert Control(run).lr(0.5) == 0.01

    bad = cli("set", str(run), "--lr", "0", check=False)
    assert bad.returncode != 0 and "finite number > 0" in bad.stderr
    assert len(read_journal(run)) == 1


def test_set_scale_on_a_fresh_run(run):
    res = invoke(run, "--scale", "0.5")
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["scale"] == 0.5 and rec["lr"] is None
    assert "no daemon has published for" in res.stderr  # (is it the job's run folder?)
    assert Control(run).lr(0.2) == 0.1
    (entry,) = read_journal(run)
    assert entry["kind"] == "manual" and entry["policy"] == "manual" and entry["evidence"]["requested_scale"] == 0.5


def test_set_continues_from_a_decision_with_a_known_base_lr(run):
    ControlWriter(run).publish(scale=0.5, lr=0.1, step=40, policy="plateau", reason="flat")  # base 0.2
    res = invoke(run / CONTROL_NAME, "--lr", "0.05")  # the control file path works too
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["seq"] == 2 and rec["lr"] == 0.05 and rec["scale"] == pytest.approx(0.25) and rec["step"] == 40
    res = invoke(run, "--scale", "0.1")
    rec = json.loads(res.stdout)
    assert rec["seq"] == 3 and rec["scale"] == 0.1 and rec["lr"] == pytest.approx(0.02)
    entries = read_journal(run)
    assert [e["kind"] for e in entries] == ["decision", "manual", "manual"]
    assert entries[1]["evidence"]["previous"] == {"seq": 1, "lr": 0.1, "scale": 0.5}


@pytest.mark.parametrize("args,message", [
    (["--lr", "0.1", "--scale", "0.5"], "exactly one"),
    ([], "exactly one"),
    (["--lr", "0"], "finite number > 0"),
    (["--lr=-0.1"], "finite number > 0"),
    (["--scale", "-2"], "finite number > 0"),
    (["--lr", "nan"], "finite number > 0"),
    (["--scale", "inf"], "finite number > 0"),
    (["--lr", "abc"], "abc"),
])
def test_set_rejects_bad_arguments_and_writes_nothing(run, args, message):
    res = invoke(run, *args)
    assert res.exit_code != 0
    assert message in res.output
    assert sorted(p.name for p in run.iterdir()) == []


def test_set_on_a_missing_folder_fails_and_creates_nothing(tmp_path):
    missing = tmp_path / "no-such-run"
    res = invoke(missing, "--lr", "0.1")
    assert res.exit_code != 0 and "no such run folder" in res.output
    assert not missing.exists()


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    {"writer": _writer, "reader": _reader, "racer": _racer, "forever": _forever}[role](*rest)


# ---------------------------------------------------------------------------------------------
# JournalCursor: the journal read lazily at a restart
# ---------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from autolr.control import JournalCursor  # noqa: E402

_LINE = st.one_of(
    st.builds(lambda seq, kind: json.dumps({"seq": seq, "kind": kind, "reason": "x" * (seq % 7)}),
              st.integers(0, 50), st.sampled_from(["decision", "manual", "initial"])),
    st.sampled_from(["", "   ", "{torn", '{"seq": "3"}', "[1, 2]", '{"no": 1}', '{"seq": true}', "\x00\xff"]),
)


def _cursor_entries(cursor: JournalCursor) -> list[dict]:
    out = []
    while cursor:
        out.append(cursor.pop())
    return out


def _entries_of(text: bytes) -> list[dict]:
    """The reference: every line that parses as an object with an integer seq."""
    out = []
    for line in text.split(b"\n"):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and type(obj.get("seq")) is int:
            out.append(obj)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=30), block=st.sampled_from([1, 5, 17, 64, 4096]),
       newline_at_end=st.booleans())
def test_journal_cursor_reads_every_entry(tmp_path, monkeypatch, lines, block, newline_at_end):
    """In any block size, torn, blank and foreign lines skipped, an unterminated end included."""
    monkeypatch.setattr(JournalCursor, "BLOCK", block)
    text = ("\n".join(lines) + ("\n" if newline_at_end and lines else "")).encode("utf-8", "surrogateescape")
    (tmp_path / JOURNAL_NAME).write_bytes(text)
    expected = _entries_of(text)
    assert _cursor_entries(JournalCursor(tmp_path / JOURNAL_NAME)) == expected
    assert read_journal(tmp_path) == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.integers(1, 3), max_size=25), noise=st.lists(st.integers(0, 24), max_size=4),
       block=st.sampled_from([1, 7, 40, 4096]), saved=st.integers(-1, 60))
def test_journal_cursor_after_a_saved_seq(tmp_path, monkeypatch, steps, noise, block, saved):
    """``after(seq)``, read back from the end, gives every entry beyond the saved seq, in order."""
    monkeypatch.setattr(JournalCursor, "BLOCK", block)
    seqs = [sum(steps[: i + 1]) for i in range(len(steps))]  # increasing, as a journal's are
    lines = [json.dumps({"seq": s, "kind": "decision"}) for s in seqs]
    for at in sorted(noise, reverse=True):
        lines.insert(min(at, len(lines)), "{torn")
    (tmp_path / JOURNAL_NAME).write_text("\n".join(lines) + "\n")
    got = _cursor_entries(JournalCursor.after(tmp_path / JOURNAL_NAME, saved))
    assert [e["seq"] for e in got] == [s for s in seqs if s > saved]


def test_journal_cursor_after_reads_only_the_tail(tmp_path, monkeypatch):
    """A restart with a recent saved state parses the entries after it, not the whole journal
    (200,000 entries here: a per-row schedule on a long log)."""
    path = tmp_path / JOURNAL_NAME
    path.write_text("".join(json.dumps({"seq": s, "kind": "decision", "reason": "r"}) + "\n"
                            for s in range(1, 200_001)))
    parsed = []
    real = control._journal_entry
    monkeypatch.setattr(control, "_journal_entry", lambda line: parsed.append(1) or real(line))
    cursor = JournalCursor.after(path, 199_990)
    assert [e["seq"] for e in _cursor_entries(cursor)] == list(range(199_991, 200_001))
    assert len(parsed) < 100  # 10 entries after the saved seq, the one at it, the cursor's reads
    assert _cursor_entries(JournalCursor.after(path, 200_000)) == []
    assert JournalCursor.after(tmp_path / "missing.jsonl", 3).peek() is None


def test_journal_cursor_stops_at_the_size_it_was_made_with(tmp_path):
    """Entries appended after the restart read the journal (our own publishes) are not pending."""
    path = tmp_path / JOURNAL_NAME
    path.write_text(json.dumps({"seq": 1}) + "\n")
    cursor = JournalCursor(path)
    with open(path, "a") as f:
        f.write(json.dumps({"seq": 2}) + "\n")
    assert [e["seq"] for e in _cursor_entries(cursor)] == [1]
    cursor = JournalCursor(path)
    cursor.clear()
    assert not cursor and cursor.peek() is None


def test_journal_cursor_long_line_and_vanished_file(tmp_path, monkeypatch):
    monkeypatch.setattr(JournalCursor, "BLOCK", 16)
    path = tmp_path / JOURNAL_NAME
    long = json.dumps({"seq": 1, "reason": "y" * 1000})
    path.write_text(long + "\n" + json.dumps({"seq": 2}) + "\n")
    assert [e["seq"] for e in _cursor_entries(JournalCursor(path))] == [1, 2]
    assert [e["seq"] for e in _cursor_entries(JournalCursor.after(path, 1))] == [2]
    cursor = JournalCursor(path)
    path.unlink()
    assert _cursor_entries(cursor) == []


def test_set_lr_warns_when_no_base_lr_is_known(tmp_path):
    """With no base LR the scale stays: loops that read the scale would silently keep their LR."""
    from .conftest import run_cli

    run = tmp_path / "run"
    run.mkdir()
    first = run_cli("set", str(run), "--lr", "0.01")
    assert json.loads(first.stdout)["scale"] == 1.0 and "no base LR is known" in first.stderr
    assert "no base LR" not in run_cli("set", str(run), "--scale", "0.5").stderr
    based = tmp_path / "based"
    based.mkdir()
    from autolr.control import ControlWriter

    ControlWriter(based).publish(scale=1.0, lr=0.1, step=None, policy="step", reason="initial", kind="initial")
    second = run_cli("set", str(based), "--lr", "0.05")
    assert json.loads(second.stdout)["scale"] == 0.5 and second.stderr == ""


def test_the_schedule_lists_every_change_ahead_then_the_latest_due(monkeypatch):
    """At most MAX_SCHEDULE entries: those not yet due at the last logged step (the soonest
    when there are more), then the most recent ones already due; a manual override applies
    at once (at None); an entry already in is not added again."""
    monkeypatch.setattr(control, "MAX_SCHEDULE", 5)
    schedule: list = []
    for seq in range(1, 11):  # changes due at 10, 20, ..., 100
        schedule = control.scheduled_with(schedule, {"seq": seq, "apply_at_step": 10 * seq, "scale": 1.0 / seq},
                                          now=55)
    assert [e["at"] for e in schedule] == [50, 60, 70, 80, 90]  # the one in force at 55, the 4 soonest ahead
    schedule = control.scheduled_with(schedule, {"seq": 11, "kind": "manual", "scale": 0.5}, now=95)
    assert [(e["seq"], e["at"]) for e in schedule] == [(6, 60), (7, 70), (8, 80), (9, 90), (11, None)]
    assert control.scheduled_with(schedule, {"seq": 11, "kind": "manual", "scale": 0.5}, now=95) is schedule


def test_a_client_says_once_when_no_control_file_comes(tmp_path, monkeypatch):
    """Regression (a helper's audit): ``Control("runs/exp01")`` while the daemon writes
    ``runs/exp1`` gave the job its own LR forever, without a word. After NO_FILE_WARNING
    seconds without a file the client warns, once; a file seen first silences it."""
    monkeypatch.setattr(control, "NO_FILE_WARNING", 0.0)
    monkeypatch.setattr(control, "NO_CONTROL_WARNING", 0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = Control(tmp_path / "exp01")
        assert [client.lr(0.1) for _ in range(3)] == [0.1] * 3
        (tmp_path / "slow").mkdir()  # a job whose logger writes its first row late: later
        slow = Control(tmp_path / "slow")
        slow.lr(0.1)
        slow.lr(0.1)
        assert len(caught) == 1
        time.sleep(0.35)
        slow.lr(0.1)
        ControlWriter(tmp_path / "exp1").publish(scale=0.5, lr=None, step=None, policy="", reason="initial")
        seen = Control(tmp_path / "exp1")
        seen.lr(0.1)
        (tmp_path / "exp1" / CONTROL_NAME).unlink()
        assert seen.lr(0.1) == 0.05
    said = [str(w.message) for w in caught if "no control file" in str(w.message)]
    assert len(said) == 2 and "exp01" in said[0] and "does not exist" in said[0], said
    assert "slow" in said[1] and "autolr watch" in said[1]
