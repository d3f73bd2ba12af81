"""Faults: a failing disk, logs that misbehave, bad values. The daemon never crashes on them."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading

import pytest

import autolr.control as control_mod
from autolr.chain import Decision
from autolr.control import read_journal

from .conftest import run_cli
from .test_daemon import make_daemon, write_jsonl


def rows(steps, loss=1.0):
    return [{"step": s, "loss": loss} for s in steps]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_failing_disk_keeps_the_last_good_control_file_and_retries(tmp_path, monkeypatch, err):
    run = tmp_path / "run"
    log = run / "m.jsonl"
    write_jsonl(log, rows(range(10)))
    daemon, _ = make_daemon(tmp_path, policy=("step:step_size=5,gamma=0.5",), base_lr=1.0)
    daemon.run()
    good = (run / "autolr.json").read_text()
    seq_before = json.loads(good)["seq"]

    real_replace = os.replace

    def failing_replace(src, dst, *a, **k):
        if str(dst).endswith("autolr.json"):
            raise OSError(err, os.strerror(err))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(control_mod.os, "replace", failing_replace)
    write_jsonl(log, rows(range(10, 30)))
    daemon.catch_up()
    daemon.flush()
    assert (run / "autolr.json").read_text() == good  # untouched, still parses
    assert daemon.runs[run].errors["control write failed"] >= 1
    assert daemon.runs[run].needs_repair  # journaled; the control file waits for the disk
    assert not any(f.name.startswith(".autolr-") for f in run.iterdir())  # no temp files left

    monkeypatch.setattr(control_mod.os, "replace", real_replace)  # the disk recovers
    daemon.flush()
    journal = read_journal(run)
    assert [e["seq"] for e in journal] == list(range(1, len(journal) + 1))
    control = json.loads((run / "autolr.json").read_text())
    assert control["seq"] > seq_before and control["lr"] == pytest.approx(0.5 ** 6)
    # a fresh daemon over the same logs agrees (nothing lost, nothing repeated)
    steps = [e["step"] for e in journal if e["kind"] == "decision"]
    assert steps == [4, 9, 14, 19, 24, 29]


def test_failing_journal_write_is_not_fatal(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_jsonl(run / "m.jsonl", rows(range(10)))
    real_write = os.write

    def failing_write(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    daemon, _ = make_daemon(tmp_path, policy=("step:step_size=3",))
    monkeypatch.setattr(control_mod.os, "write", failing_write)
    daemon.run()  # must not raise
    assert daemon.runs[run].unpublished  # nothing reached the disk: queued, in order
    assert not (run / "autolr.decisions.jsonl").exists() or not read_journal(run)
    monkeypatch.setattr(control_mod.os, "write", real_write)
    daemon.flush()
    assert [e["step"] for e in read_journal(run) if e["kind"] == "decision"] == [2, 5, 8]


def test_deleted_and_recreated_log(tmp_path):
    run = tmp_path / "run"
    log = run / "m.jsonl"
    write_jsonl(log, rows(range(20)))
    daemon, events = make_daemon(tmp_path, policy=("step:step_size=8",))
    daemon.run()
    log.unlink()
    daemon.handle(log)
    assert run not in daemon.runs
    write_jsonl(log, rows(range(12)))  # a new job in the same folder
    daemon.handle(log)
    assert daemon.runs[run].engine.state["rows"] == 12
    assert json.loads((run / "autolr.json").read_text())["scale"] == pytest.approx(0.1)


def test_moved_log_and_moved_run_folder(tmp_path):
    run = tmp_path / "run"
    write_jsonl(run / "m.jsonl", rows(range(5)))
    daemon, _ = make_daemon(tmp_path)
    daemon.run()
    (run / "m.jsonl").rename(run / "n.jsonl")
    daemon.handle(run / "m.jsonl")
    daemon.handle(run / "n.jsonl")
    assert list(daemon.runs[run].sources) == [run / "n.jsonl"]
    run.rename(tmp_path / "moved")
    daemon.handle(run)
    daemon.handle(tmp_path / "moved")
    assert set(daemon.runs) == {tmp_path / "moved"}


def test_truncated_to_zero_then_regrown(tmp_path):
    run = tmp_path / "run"
    log = run / "m.jsonl"
    write_jsonl(log, rows(range(30)))
    daemon, _ = make_daemon(tmp_path, policy=("step:step_size=10",))
    daemon.run()
    log.write_text("")
    daemon.handle(log)
    write_jsonl(log, rows(range(5)))
    daemon.handle(log)
    engine = daemon.runs[run].engine
    assert engine.rewinds == 1 and engine.state["rows"] == 5
    assert json.loads((run / "autolr.json").read_text())["scale"] == 1.0


def test_log_replaced_by_a_different_run(tmp_path):
    run = tmp_path / "run"
    log = run / "m.jsonl"
    write_jsonl(log, rows(range(40)))
    daemon, _ = make_daemon(tmp_path, policy=("step:step_size=10",))
    daemon.run()
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"step": s, "loss": 5.0, "acc": 0.1} for s in range(15)])
    os.replace(other, log)  # new inode, new content
    daemon.handle(log)
    assert daemon.runs[run].engine.state["rows"] == 15
    assert json.loads((run / "autolr.json").read_text())["scale"] == pytest.approx(0.1)


def test_two_writers_appending_at_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    log = run / "m.jsonl"
    log.touch()

    def writer(offset):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        for s in range(500):
            os.write(fd, (json.dumps({"step": s, "loss": 1.0, "w": offset}) + "\n").encode())
        os.close(fd)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    daemon, _ = make_daemon(tmp_path, policy=("constant",))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    daemon.run()
    run_state = daemon.runs[run]
    assert run_state.rows == 1000 and sum(run_state.skipped().values()) == 0


def test_log_growing_by_megabytes_at_a_time(tmp_path):
    run = tmp_path / "run"
    log = run / "m.jsonl"
    daemon, _ = make_daemon(tmp_path, policy=("step:step_size=50000",))
    write_jsonl(log, rows(range(10)))
    daemon.run()
    n = 10
    for _ in range(3):
        chunk = "".join(json.dumps({"step": s, "loss": 0.5, "pad": "x" * 20}) + "\n" for s in range(n, n + 150_000))
        with open(log, "a") as f:
            f.write(chunk)  # ~7 MB at once
        n += 150_000
        daemon.handle(log)
        while daemon.pending:  # the rest, in the slices the daemon's loop reads it in
            daemon.drain()
    assert daemon.runs[run].rows == n
    assert json.loads((run / "autolr.json").read_text())["step"] == 449999


def test_bad_values_are_counted_and_reported_by_status(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    big = b'{"step": 5, "loss": "' + b"9" * (3 << 20) + b'"}\n'
    (run / "m.jsonl").write_bytes(
        b'{"step": 0, "loss": 1}\n\x00\x01\xfe\xff\n' + big +
        b'{"step": "x", "loss": [1]}\n{"step": 1, "loss": NaN}\n{"step": 2, "loss": Infinity}\n'
        b'{"step": 0.5, "loss": -1e308}\n["list"]\n{"step": 3, "loss": 1}\n')
    daemon, _ = make_daemon(tmp_path)
    daemon.run()
    status = json.loads(run_cli("status", str(tmp_path), "--json").stdout)[0]
    assert status["skipped"].get("over-long line") == 1
    assert sum(status["skipped"].values()) >= 3
    control = json.loads((run / "autolr.json").read_text())
    assert math.isfinite(control["lr"]) and control["lr"] > 0


@pytest.mark.parametrize("damage", [
    {"engine": [], "skipped": {"x": "many"}, "sources": 3},
    {"engine": {"chain": "plateau"}, "last_metric": "low", "last_step": {}, "rows": "ten"},
    {"engine": {"chain": {"monitor": 7}}, "skipped": ["a"], "sources": ["m.jsonl"]},
])
def test_status_shows_a_damaged_state_instead_of_failing(tmp_path, damage):
    """Regression: ``autolr status`` raised (AttributeError, TypeError) on a state file of
    valid JSON with fields of the wrong type; the run shows with those fields unknown."""
    run = tmp_path / "run"
    write_jsonl(run / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(5)])
    make_daemon(tmp_path)[0].run()
    state = json.loads((run / "autolr.state.json").read_text())
    (run / "autolr.state.json").write_text(json.dumps({**state, **damage}))
    for args in (("--json",), ()):
        out = run_cli("status", str(tmp_path), *args)
        assert out.returncode == 0 and str(run) in out.stdout, out.stderr


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path):
    run = tmp_path / "run"
    write_jsonl(run / "m.jsonl", rows(range(3)))
    stale, fresh = run / ".autolr-abc.tmp", run / ".autolr-def.tmp"
    stale.write_text("{")
    fresh.write_text("{")
    os.utime(stale, (1, 1))
    make_daemon(tmp_path)[0].run()
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a live writer


def test_damaged_state_unreadable_control_and_a_changed_chain_are_one_runs_problem(tmp_path, caplog):
    """Regressions: valid JSON with wrong types in autolr.state.json ("seq": null) stopped the
    daemon at start for every run; a control file it cannot read (here a folder) killed it at
    the next rescan; a state saved under another policy chain made every row fail ("policy
    error on a record: 'seen'") and froze the LR."""
    from .test_daemon import flat_then_flat

    runs = [tmp_path / name for name in ("a", "b", "c")]
    for run in runs:
        write_jsonl(run / "m.jsonl", flat_then_flat(range(30)))
    daemon, _ = make_daemon(tmp_path, policy=("step:step_size=10,gamma=0.5",), base_lr=1.0)
    daemon.run()
    state = json.loads((runs[0] / "autolr.state.json").read_text())
    (runs[0] / "autolr.state.json").write_text(json.dumps(dict(state, seq=None, schedule=5)))
    for run in runs:
        write_jsonl(run / "m.jsonl", flat_then_flat(range(30, 40)))
    daemon, _ = make_daemon(tmp_path, policy=("step:step_size=10,gamma=0.5",), base_lr=1.0)
    daemon.run()  # the damaged run starts over; the others go on
    assert all(json.loads((r / "autolr.json").read_text())["lr"] == 0.5 ** 4 for r in runs)
    (runs[1] / "autolr.json").unlink()
    (runs[1] / "autolr.json").mkdir()
    daemon.rescan()  # no exception: read as no control file
    for run in (runs[0], runs[2]):
        write_jsonl(run / "m.jsonl", flat_then_flat(range(40, 50)))
    caplog.clear()
    daemon, _ = make_daemon(tmp_path, policy=("plateau:method=threshold,patience=3,factor=0.5",), base_lr=1.0)
    daemon.run()
    assert "policy chain changed from step to plateau" in caplog.text and "policy error" not in caplog.text
    assert daemon.runs[runs[2]].engine.state["rows"] == 50  # the new chain read the whole log


@pytest.mark.parametrize("damage", [
    lambda s: json.dumps({**s, "engine": {**s["engine"], "history": 5}}),  # half applied before
    lambda s: json.dumps({**s, "engine": {**s["engine"], "lanes": [1]}}),  # AttributeError: no start
    lambda s: json.dumps({**s, "sources": {"m.jsonl": 5}}),  # AttributeError too
    lambda s: json.dumps(s)[:-1] + ', "deep": ' + "[" * 100_000 + "}",  # too deep for the parser
    lambda s: json.dumps({**s, "max_step": "x"}),  # TypeError on every later row (a helper's hunt)
    lambda s: json.dumps({**s, "last_step": [1]}),
])
def test_a_damaged_state_starts_its_run_over_and_the_journal_gets_nothing_twice(tmp_path, damage):
    """Regressions (a helper's bug hunt): a state of valid JSON with a wrong shape in some
    places was half restored (the chain's state, then a TypeError), and the run "started over"
    from that engine: decisions journaled again and a final LR 10⁴ times too low; others raised
    AttributeError out of the daemon's start, for every run of the tree; a state or journal
    line nested 100,000 deep raised RecursionError out of ``watch`` and ``status``."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        write_jsonl(run / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(60)])
    policy = ("plateau:method=threshold,patience=3,factor=0.7",)
    make_daemon(tmp_path, policy=policy)[0].run()
    journal = read_journal(runs[0])
    path = runs[0] / "autolr.state.json"
    path.write_text(damage(json.loads(path.read_text())))
    for run in runs:
        write_jsonl(run / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(60, 80)])
    make_daemon(tmp_path, policy=policy)[0].run()
    def entries(run):
        return [{k: v for k, v in e.items() if k != "updated_at"} for e in read_journal(run)]
    assert entries(runs[0]) == entries(runs[1])  # re-derived and matched: nothing twice
    assert len(entries(runs[0])) > len(journal)
    out = run_cli("status", str(tmp_path))
    assert out.returncode == 0, out.stderr


def test_a_journal_line_nested_too_deep_is_read_as_torn(tmp_path):
    run = tmp_path / "run"
    write_jsonl(run / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(5)])
    make_daemon(tmp_path)[0].run()
    with open(run / "autolr.decisions.jsonl", "a") as f:
        f.write("[" * 100_000 + "\n")
    out = run_cli("status", str(tmp_path))
    assert out.returncode == 0 and str(run) in out.stdout, out.stderr
    make_daemon(tmp_path)[0].run()


def test_a_deleted_control_file_is_written_again_from_the_journal(tmp_path):
    """Regression: a deleted autolr.json stayed missing until the next decision: the training
    loop fell back to its own LR meanwhile. The delete event (or the rescan) writes it again."""
    run = tmp_path / "run"
    write_jsonl(run / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(10)])
    daemon, _ = make_daemon(tmp_path)
    daemon.run()
    before = json.loads((run / "autolr.json").read_text())
    (run / "autolr.json").unlink()
    daemon.handle(run / "autolr.json")
    daemon.settle(math.inf)  # (after a short wait: see the deleted run folder below)
    assert json.loads((run / "autolr.json").read_text()) == before
    (run / "autolr.json").unlink()
    daemon.rescan()
    daemon.settle(math.inf)
    assert json.loads((run / "autolr.json").read_text()) == before


def test_caught_up_is_not_announced_when_stopped_during_the_catch_up(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "run" / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(10)])
    daemon, events = make_daemon(tmp_path)
    catch_up = daemon.catch_up
    monkeypatch.setattr(daemon, "catch_up", lambda: (daemon.stop(), catch_up()))  # SIGTERM meanwhile
    daemon.run()
    kinds = [k for k, _ in events]
    assert "caught_up" not in kinds and kinds[-1] == "stopped"


def test_a_failure_on_every_row_logs_a_bounded_number_of_lines(tmp_path, monkeypatch, caplog):
    """Regression: a policy failing on every row logged a traceback per row, and a failing disk
    an error per retry (4 a second) without bound. Each is counted; the first three are logged,
    then the 10th, 100th, 1000th..."""
    write_jsonl(tmp_path / "run" / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(1200)])
    daemon, _ = make_daemon(tmp_path)
    daemon.discover()
    (run,) = daemon.runs.values()
    monkeypatch.setattr(run.engine, "feed", lambda *a: 1 / 0)
    with caplog.at_level("ERROR", logger="autolr.run"):
        daemon.catch_up()
    assert run.errors["policy error"] == 1200
    assert len(caplog.records) == 6  # 1, 2, 3, 10, 100, 1000
    assert "1000 times so far" in caplog.records[-1].getMessage()


def test_a_large_log_read_live_takes_turns_with_the_others(tmp_path, monkeypatch):
    """Regression: a log growing by a large block was read to its end before any other log
    of the batch: a live decision of another run waited 25-36 s behind a copied-in log. Live
    reads of one log now stop after a time slice and the log goes back in the queue."""
    import autolr.daemon as daemon_mod
    from autolr.readers import base

    monkeypatch.setattr(daemon_mod, "READ_SLICE", 0.0)  # one read a turn
    monkeypatch.setattr(base, "READ_BLOCK", 4096)
    big, small = tmp_path / "big" / "m.jsonl", tmp_path / "small" / "m.jsonl"
    for path in (big, small):
        write_jsonl(path, [{"step": 0, "loss": 1.0}])
    daemon, _ = make_daemon(tmp_path)
    daemon.discover(), daemon.catch_up()
    write_jsonl(big, [{"step": s, "loss": 1.0} for s in range(1, 2000)])
    write_jsonl(small, [{"step": s, "loss": 1.0} for s in range(1, 3)])
    for path in (big, small):
        daemon.enqueue(str(path))
    daemon.drain()
    assert daemon.runs[small.parent].rows == 3  # read in the first turn
    assert 1 < daemon.runs[big.parent].rows < 2000 and str(big) in daemon.pending
    for _ in range(1000):
        if not daemon.pending:
            break
        daemon.drain()
    assert daemon.runs[big.parent].rows == 2000


def test_the_state_is_saved_during_a_long_catch_up(tmp_path, monkeypatch):
    """Regression: nothing was saved until the whole catch-up ended: a stop or crash in a long
    one started it over. Runs are now saved every ``flush`` seconds between reads."""
    from autolr.readers import base
    from autolr.run import Run

    monkeypatch.setattr(base, "READ_BLOCK", 4096)
    write_jsonl(tmp_path / "run" / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(3000)])
    saved_rows = []
    save = Run.save
    monkeypatch.setattr(Run, "save", lambda self: (saved_rows.append(self.rows), save(self)))
    daemon, _ = make_daemon(tmp_path, flush=0.0)
    daemon.run()
    assert len([n for n in saved_rows if 0 < n < 3000]) >= 5 and saved_rows[-1] == 3000


def test_more_logs_than_the_descriptor_limit(tmp_path):
    """Regression: every log kept a descriptor open for ever; with more logs than ``ulimit -n``
    allows, the journal could not be opened, decisions were lost and the daemon exited. The
    logs kept open are capped at half the limit; the others are opened at each read."""
    import resource

    root = tmp_path / "logs"
    for i in range(150):
        write_jsonl(root / f"r{i:03d}" / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(8)])
        (root / f"c{i:03d}").mkdir()
        (root / f"c{i:03d}" / "log.csv").write_text("step,loss\n" + "".join(f"{s},1.0\n" for s in range(8)))
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    proc = subprocess.run([sys.executable, "-m", "autolr.cli", "watch", str(root), "--once", "--policy",
                           "step:step_size=3"], capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        assert json.loads((run / "autolr.json").read_text())["step"] == 5, run  # cuts at steps 2 and 5


def test_kept_descriptors_are_capped_and_reads_go_on_beyond_the_cap(tmp_path, monkeypatch):
    from autolr.readers import base

    monkeypatch.setattr(base, "MAX_KEPT", base._kept[0] + 3)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"r{i}" / "m.csv")
        paths[-1].parent.mkdir()
        paths[-1].write_text("step,loss\n0,1.0\n")
    daemon, _ = make_daemon(tmp_path)
    daemon.discover(), daemon.catch_up()
    kept = [p for p in paths if daemon.sources[p].tailer.fd is not None]
    assert len(kept) == 3
    for p in paths:
        with open(p, "a") as f:
            f.write("1,0.5\n2,0.5\n")
        daemon.handle(p)
        assert daemon.runs[p.parent].rows == 3
    for p in kept:
        daemon.drop_source(p)
    assert base._kept[0] == base.MAX_KEPT - 3


def test_a_deleted_run_folder_stays_deleted(tmp_path, caplog):
    """Regression: ``rm -rf`` of a run folder failed ("Directory not empty") or the folder came
    back: while rm deleted the files one by one, the daemon wrote the control file back from
    the journal (its delete event) and saved the state of the run that lost its log. Both now
    wait SETTLE seconds and happen only if the folder is still there. A folder the daemon
    created itself (an MLflow run kept in a database) is still created again when needed."""
    run, kept = tmp_path / "run", tmp_path / "kept"
    for folder in (run, kept):
        write_jsonl(folder / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(10)])
    daemon, events = make_daemon(tmp_path)
    daemon.run()
    (run / "autolr.json").unlink()  # rm -rf, with the daemon's events between its unlinks
    daemon.handle(run / "autolr.json")
    (run / "m.jsonl").unlink()
    daemon.handle(run / "m.jsonl")
    (kept / "m.jsonl").unlink()  # a log deleted, its folder kept
    daemon.handle(kept / "m.jsonl")
    daemon.rescan()
    assert sorted(p.name for p in run.iterdir()) == ["autolr.decisions.jsonl", "autolr.lock", "autolr.state.json"]
    shutil.rmtree(run)
    daemon.handle(run)
    daemon.settle(math.inf)
    daemon.rescan()
    assert not run.exists() and run not in daemon.runs
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert kept.is_dir() and json.loads((kept / "autolr.state.json").read_text())["rows"] == 10

    made = daemon.open_run(tmp_path / "made")  # no folder of its own: the daemon makes it
    shutil.rmtree(made.folder)
    made.publish([Decision(scale=0.5, lr=None, step=1, policy="manual", reason="test", kind="change")])
    assert json.loads((made.folder / "autolr.json").read_text())["scale"] == 0.5


def test_a_run_that_fails_to_open_is_counted_and_the_others_go_on(tmp_path, monkeypatch):
    from autolr.run import Run

    for name in ("a", "b"):
        write_jsonl(tmp_path / name / "m.jsonl", rows(range(5)))
    load = Run.load

    def failing_load(self):
        if self.folder.name == "a":
            raise OSError(errno.EIO, "I/O error")
        return load(self)
    monkeypatch.setattr(Run, "load", failing_load)
    daemon, _ = make_daemon(tmp_path)
    daemon.run()
    assert set(daemon.runs) == {tmp_path / "b"} and daemon.errors["run failed to open"] == 1


def test_a_run_folder_deleted_and_made_again_at_once_is_a_new_run(tmp_path):
    """Regression (a helper's hunt): ``rm -rf runs/exp`` and a new job in a new ``runs/exp``
    within SETTLE: the dropped run's state was saved into the new folder (its folder "still
    there"), and the new job continued the deleted run's: no control file, its rows counted on
    top of the old ones. A folder is known by its inode."""
    run = tmp_path / "exp"
    write_jsonl(run / "m.jsonl", [{"loss": 1.0} for _ in range(30)])
    daemon, _ = make_daemon(tmp_path, policy=("step:step_size=10,gamma=0.5",))
    daemon.run()
    shutil.rmtree(run)
    daemon.handle(run / "m.jsonl")
    write_jsonl(run / "m.jsonl", [{"loss": 1.0} for _ in range(12)])  # before SETTLE is over
    daemon.handle(run / "m.jsonl")
    daemon.settle(math.inf)
    daemon.flush()
    assert daemon.runs[run].rows == 12 and json.loads((run / "autolr.state.json").read_text())["rows"] == 12
    assert [e["kind"] for e in read_journal(run)] == ["initial", "decision"]
