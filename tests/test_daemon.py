"""The watch daemon, in process: discovery, settings, resume, rewind, truncation, vanishing logs."""
from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from autolr.config import load_config, parse_policy_options
from autolr.control import MAX_SCHEDULE, Control, read_journal, scheduled_with
from autolr.daemon import Daemon, Options
from autolr.plugins import get_plugin_manager, policy_classes, reader_classes
from autolr.replay import replay_log
from autolr.config import Settings

from .framework_util import in_force

PM = get_plugin_manager(entry_points=False)
POLICIES, READERS = policy_classes(PM), reader_classes(PM)


def make_daemon(root: Path, *, policy=("plateau:method=threshold,patience=3",), base_lr=0.1, config=None, metric=None,
                **opts) -> tuple[Daemon, list]:
    events: list = []
    overrides = {"policies": parse_policy_options(policy), "base_lr": base_lr, **({"metric": metric} if metric else {})}
    daemon = Daemon(root, load_config(config), overrides, POLICIES, READERS,
                    Options(once=True, fsync=False, **opts), on_event=lambda k, d: events.append((k, d)))
    return daemon, events


def write_jsonl(path: Path, rows, mode="a") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def flat_then_flat(steps, level=1.0):
    return [{"step": s, "loss": level} for s in steps]


def decisions(run: Path) -> list[tuple]:
    return [(e["step"], round(e["scale"], 12), e["policy"]) for e in read_journal(run)
            if e["kind"] in ("decision", "initial")]


def replay_changes(log: Path, policy=("plateau:method=threshold,patience=3",), base_lr=0.1) -> list[tuple]:
    settings = Settings(policies=parse_policy_options(policy), base_lr=base_lr)
    lines = list(replay_log(log, settings, POLICIES, READERS))
    return [(x["step"], round(x["scale"], 12), x["policy"]) for x in lines]


def test_discovers_runs_and_writes_control_journal_state(tmp_path):
    write_jsonl(tmp_path / "a" / "metrics.jsonl", flat_then_flat(range(20)))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "log.csv").write_text("epoch,loss\n" + "".join(f"{e},1.0\n" for e in range(10)))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.md").write_text("not a log")
    daemon, events = make_daemon(tmp_path)
    daemon.run()
    assert set(daemon.runs) == {tmp_path / "a", tmp_path / "b"}
    for run in ("a", "b"):
        control = json.loads((tmp_path / run / "autolr.json").read_text())
        assert control["schema"] == 1 and control["seq"] >= 2
        assert (tmp_path / run / "autolr.state.json").is_file()
    # what was printed names each run's control file
    printed = [d for k, d in events if k == "run"]
    assert {d["control"] for d in printed} == {str(tmp_path / r / "autolr.json") for r in "ab"}
    # the journal equals an offline replay of the same log (initial + every change)
    assert decisions(tmp_path / "a") == replay_changes(tmp_path / "a" / "metrics.jsonl")


def test_own_files_are_never_read_as_logs(tmp_path):
    write_jsonl(tmp_path / "a" / "metrics.jsonl", flat_then_flat(range(20)))
    for _ in range(2):
        daemon, _ = make_daemon(tmp_path)
        daemon.run()
        assert set(daemon.sources) == {tmp_path / "a" / "metrics.jsonl"}


def test_restart_resumes_without_repeating_or_skipping(tmp_path):
    log = tmp_path / "run" / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / (1 + s) if s < 30 else 0.03} for s in range(120)]
    write_jsonl(log, rows[:50])
    make_daemon(tmp_path)[0].run()
    first = decisions(tmp_path / "run")
    write_jsonl(log, rows[50:])
    daemon, _ = make_daemon(tmp_path)
    daemon.run()
    journal = read_journal(tmp_path / "run")
    assert [e["seq"] for e in journal] == list(range(1, len(journal) + 1))
    assert decisions(tmp_path / "run")[: len(first)] == first
    assert decisions(tmp_path / "run") == replay_changes(log)
    assert daemon.runs[tmp_path / "run"].rows == 120  # a re-read from the start would give 170


def test_lost_state_is_rebuilt_from_the_log_without_duplicating_the_journal(tmp_path):
    log = tmp_path / "run" / "metrics.jsonl"
    write_jsonl(log, flat_then_flat(range(40)))
    make_daemon(tmp_path)[0].run()
    before = read_journal(tmp_path / "run")
    (tmp_path / "run" / "autolr.state.json").unlink()
    make_daemon(tmp_path)[0].run()
    assert read_journal(tmp_path / "run") == before


def test_lost_state_with_a_long_journal_is_matched_block_by_block(tmp_path, monkeypatch):
    """A decision on every row (a per-step schedule): 3000 journal entries, read back a small
    block at a time when the state is lost, and at most a few blocks in memory (the whole
    journal was a list before: a 10M-row log would have held gigabytes)."""
    import tracemalloc

    from autolr.control import JournalCursor
    from autolr.run import Run

    monkeypatch.setattr(JournalCursor, "BLOCK", 4096)  # about 15 entries a block
    log = tmp_path / "run" / "metrics.jsonl"
    write_jsonl(log, [{"step": s, "loss": 1.0} for s in range(3000)])
    policy = ("step:step_size=1,gamma=0.999",)
    make_daemon(tmp_path, policy=policy)[0].run()
    before = read_journal(tmp_path / "run")
    assert len(before) == 3001  # the initial value and one decision a row
    (tmp_path / "run" / "autolr.state.json").unlink()
    daemon, _ = make_daemon(tmp_path, policy=policy)
    peaks = []
    real_load = Run.load

    def load(run):
        tracemalloc.start()
        try:
            return real_load(run)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(Run, "load", load)
    daemon.run()
    assert read_journal(tmp_path / "run") == before  # every entry matched, none published twice
    assert peaks and max(peaks) < 200_000  # the list of 3001 entries alone took ~2.5 MB


def test_decisions_of_one_read_are_published_in_bounded_chunks(tmp_path, monkeypatch):
    """One read of 1000 rows that each decide: published 100 at a time (PUBLISH_CHUNK), with
    the same journal as in one piece."""
    from autolr import run as run_mod
    from autolr.control import ControlWriter

    policy = ("step:step_size=1,gamma=0.999",)
    write_jsonl(tmp_path / "whole" / "metrics.jsonl", [{"step": s, "loss": 1.0} for s in range(1000)])
    make_daemon(tmp_path / "whole", policy=policy)[0].run()
    monkeypatch.setattr(run_mod, "PUBLISH_CHUNK", 100)
    sizes = []
    real = ControlWriter.publish_many
    monkeypatch.setattr(ControlWriter, "publish_many", lambda w, batch, **kw: sizes.append(len(batch)) or real(w, batch, **kw))
    write_jsonl(tmp_path / "chunked" / "metrics.jsonl", [{"step": s, "loss": 1.0} for s in range(1000)])
    make_daemon(tmp_path / "chunked", policy=policy)[0].run()
    assert max(sizes) <= 100 and sum(sizes) == 1001
    strip = lambda j: [{k: v for k, v in e.items() if k != "updated_at"} for e in j]  # noqa: E731
    assert strip(read_journal(tmp_path / "chunked")) == strip(read_journal(tmp_path / "whole"))


def test_per_row_schedule_hint_and_min_change(tmp_path, caplog):
    """A decision on every row: the daemon says once that --min-change exists; with it (the real
    CLI) the journal holds one entry per 0.1 % of LR change instead of one per row."""
    from .conftest import run_cli

    rows = [{"step": s, "loss": 1.0} for s in range(3000)]
    write_jsonl(tmp_path / "a" / "run" / "metrics.jsonl", rows)
    with caplog.at_level("WARNING", logger="autolr.run"):
        make_daemon(tmp_path / "a", policy=("cosine:T_max=20000",))[0].run()
    hints = [r for r in caplog.records if "--min-change" in r.getMessage()]
    assert len(hints) == 1 and "decisions in" in hints[0].getMessage()
    every = read_journal(tmp_path / "a" / "run")
    assert len(every) == 3001
    write_jsonl(tmp_path / "b" / "run" / "metrics.jsonl", rows)
    out = run_cli("watch", str(tmp_path / "b"), "--once", "--no-fsync", "--policy", "cosine:T_max=20000",
                  "--base-lr", "0.1", "--min-change", "0.001")
    fewer = read_journal(tmp_path / "b" / "run")
    assert 30 <= len(fewer) <= 80  # ln(1 / cos-factor at 3000 of 20000: 0.946) / 0.001 = 56, plus the initial
    assert "--min-change 0.001" not in out.stderr
    assert fewer[-1]["lr"] == pytest.approx(every[-1]["lr"], rel=1e-3)
    replayed = [json.loads(x) for x in run_cli("replay", str(tmp_path / "b" / "run" / "metrics.jsonl"), "--policy",
                                               "cosine:T_max=20000", "--base-lr", "0.1", "--min-change",
                                               "0.001").stdout.splitlines()]
    assert [x["lr"] for x in replayed] == [e["lr"] for e in fewer]  # replay decides as the daemon did


def test_crash_between_journal_and_state_does_not_repeat_a_decision(tmp_path):
    """Simulate a kill after publishing but before the state save: restore an older state."""
    log = tmp_path / "run" / "metrics.jsonl"
    write_jsonl(log, flat_then_flat(range(10)))
    make_daemon(tmp_path)[0].run()
    old_state = (tmp_path / "run" / "autolr.state.json").read_bytes()
    write_jsonl(log, flat_then_flat(range(10, 30)))
    make_daemon(tmp_path)[0].run()
    after = read_journal(tmp_path / "run")
    (tmp_path / "run" / "autolr.state.json").write_bytes(old_state)  # the save never happened
    make_daemon(tmp_path)[0].run()
    assert read_journal(tmp_path / "run") == after


def test_steps_going_back_rewind_to_exactly_the_uninterrupted_decisions(tmp_path):
    """A job resumed from a checkpoint at step 40 rewrites steps 40.. with new values."""
    noisy = [{"step": s, "loss": 1.0 / (1 + s) + (0.5 if s % 7 == 0 else 0)} for s in range(80)]
    resumed = [{"step": s, "loss": 0.02 if s < 60 else 0.01} for s in range(40, 120)]
    log = tmp_path / "run" / "metrics.jsonl"
    write_jsonl(log, noisy + resumed)
    clean = tmp_path / "clean" / "metrics.jsonl"
    write_jsonl(clean, noisy[:40] + resumed)
    daemon, _ = make_daemon(tmp_path)
    daemon.run()
    ctl = json.loads((tmp_path / "run" / "autolr.json").read_text())
    ctl_clean = json.loads((tmp_path / "clean" / "autolr.json").read_text())
    assert ctl["scale"] == pytest.approx(ctl_clean["scale"], rel=1e-12)
    journal = read_journal(tmp_path / "run")
    rewinds = [e for e in journal if e["kind"] == "rewind"]
    assert len(rewinds) == 1 and rewinds[0]["evidence"]["to"] == 40
    # after the rewind, the decisions are exactly the clean run's from step 40 on
    after = [(e["step"], round(e["scale"], 12)) for e in journal[journal.index(rewinds[0]) + 1:]]
    clean_after = [(s, sc) for s, sc, _ in decisions(tmp_path / "clean") if s is not None and s >= 40]
    assert after == clean_after
    assert daemon.runs[tmp_path / "run"].engine.rewinds == 1


def test_rewind_state_survives_a_restart(tmp_path):
    rows = [{"step": s, "loss": 1.0} for s in range(30)] + [{"step": s, "loss": 0.5} for s in range(10, 40)]
    log = tmp_path / "run" / "metrics.jsonl"
    write_jsonl(log, rows[:35])
    make_daemon(tmp_path)[0].run()
    write_jsonl(log, rows[35:])
    make_daemon(tmp_path)[0].run()
    whole = tmp_path / "whole" / "metrics.jsonl"
    write_jsonl(whole, rows)
    make_daemon(tmp_path)[0].run()
    strip = lambda run: [(e["step"], round(e["scale"], 12), e["kind"]) for e in read_journal(run)]
    assert strip(tmp_path / "run") == strip(tmp_path / "whole")


def test_truncated_log_is_read_again_and_rewinds(tmp_path):
    """Keras CSVLogger truncates at each fit(): epochs restart at 0."""
    run = tmp_path / "run"
    run.mkdir()
    log = run / "training.csv"
    log.write_text("epoch,loss\n" + "".join(f"{e},1.0\n" for e in range(12)))
    make_daemon(tmp_path)[0].run()
    log.write_text("epoch,loss\n" + "".join(f"{e},{1 / (e + 1)}\n" for e in range(3)))
    daemon, _ = make_daemon(tmp_path)
    daemon.run()
    kinds = [e["kind"] for e in read_journal(run)]
    assert "rewind" in kinds
    assert daemon.runs[run].engine.state["rows"] == 3  # history cut back to the new file's rows


def test_lightning_style_header_rewrite_does_not_duplicate(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    log = run / "metrics.csv"
    log.write_text("epoch,step,train_loss\r\n0,49,2.31\r\n0,99,2.1\r\n")
    daemon, _ = make_daemon(tmp_path, policy=("constant",))
    daemon.run()
    with open(log, "r+") as f:  # in place: same inode, larger file
        f.write("epoch,step,train_loss,val_loss\r\n0,49,2.31,\r\n0,99,2.1,\r\n0,99,,1.95\r\n0,149,1.9,\r\n")
    daemon, _ = make_daemon(tmp_path, policy=("constant",))
    daemon.run()
    assert daemon.runs[run].rows == 4  # 2 before + 2 new; a duplicating re-read would give 6
    assert daemon.runs[run].engine.state["rows"] == 4
    assert daemon.runs[run].engine.rewinds == 0


def test_vanished_logs_drop_the_run(tmp_path):
    write_jsonl(tmp_path / "a" / "metrics.jsonl", flat_then_flat(range(5)))
    daemon, events = make_daemon(tmp_path)
    daemon.run()
    (tmp_path / "a" / "metrics.jsonl").unlink()
    daemon.catch_up()
    assert tmp_path / "a" not in daemon.runs
    assert ("dropped", {"run": str(tmp_path / "a")}) in events


def _open_fds_to(path) -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) in (str(path), f"{path} (deleted)"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_kept_descriptors_are_released_when_a_log_vanishes_and_at_stop(tmp_path):
    kept, gone = tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl"
    for log in (kept, gone):
        write_jsonl(log, flat_then_flat(range(5)))
    daemon, _ = make_daemon(tmp_path)
    for log in (kept, gone):
        daemon.consider(log)
    daemon.catch_up()
    assert _open_fds_to(kept) == 1 and _open_fds_to(gone) == 1  # read through kept descriptors
    gone.unlink()
    daemon.catch_up()
    assert _open_fds_to(gone) == 0  # a deleted log's descriptor does not pin its disk space
    daemon.run()  # --once: processes, flushes, stops
    assert _open_fds_to(kept) == 0
    assert daemon.runs[tmp_path / "a"].rows == 5


def test_only_paths_written_in_place_skip_the_stat(tmp_path, monkeypatch):
    """The in-place hint reaches the reader only for paths inotify did not report as moved, and
    never from watchdog's events; a log replaced meanwhile is read from its new file."""
    log = tmp_path / "a" / "metrics.jsonl"
    write_jsonl(log, flat_then_flat(range(5)))
    daemon, _ = make_daemon(tmp_path)
    daemon.run()
    hinted: list = []
    reader = daemon.sources[log]
    real = reader.assume_in_place
    monkeypatch.setattr(reader, "assume_in_place", lambda: hinted.append(True) or real())
    run = daemon.runs[tmp_path / "a"]

    write_jsonl(log, flat_then_flat([5]))
    daemon.enqueue_many({str(log)}, False, set())
    daemon.drain()
    assert hinted == [True] and run.last_step == 5
    write_jsonl(log, flat_then_flat([6]))
    daemon.enqueue_many({str(log)}, False, {str(log)})  # moved in this batch
    daemon.enqueue_many({str(log)}, False, set())  # then written: still moved since the last drain
    daemon.drain()
    assert hinted == [True] and run.last_step == 6
    write_jsonl(log, flat_then_flat([7]))
    daemon.enqueue(str(log))  # watchdog's path
    daemon.drain()
    assert hinted == [True] and run.last_step == 7
    daemon.enqueue_many({str(log)})  # no moved set given: all moved
    daemon.drain()
    assert hinted == [True]
    new = log.with_name("new.tmp")  # replaced by a rename and reported as such: read from the start
    write_jsonl(new, flat_then_flat(range(3)), mode="w")
    os.replace(new, log)
    daemon.enqueue_many({str(log)}, False, {str(log)})
    daemon.drain()
    assert reader.restarted and run.last_step == 2


def test_config_file_with_per_run_globs_and_cli_override(tmp_path):
    (tmp_path / "autolr.toml").write_text(
        'base_lr = 0.5\npolicy = ["step:step_size=5"]\n\n[runs."fast-*"]\npolicy = ["step:step_size=2"]\nbase_lr = 0.2\n')
    for name in ("fast-1", "slow-1"):
        write_jsonl(tmp_path / name / "m.jsonl", flat_then_flat(range(6)))
    events: list = []
    daemon = Daemon(tmp_path, load_config(tmp_path / "autolr.toml"), {}, POLICIES, READERS,
                    Options(once=True, fsync=False), on_event=lambda k, d: events.append((k, d)))
    daemon.run()
    fast = json.loads((tmp_path / "fast-1" / "autolr.json").read_text())
    slow = json.loads((tmp_path / "slow-1" / "autolr.json").read_text())
    assert fast["lr"] == pytest.approx(0.2 * 0.1**3)  # after step 5: t=6 -> floor(6/2)=3
    assert slow["lr"] == pytest.approx(0.5 * 0.1)
    daemon = Daemon(tmp_path / "x" if False else tmp_path, load_config(tmp_path / "autolr.toml"),
                    {"base_lr": 1.0}, POLICIES, READERS, Options(once=True, fsync=False))
    assert daemon.config.for_run("fast-1").merged({"base_lr": 1.0}).base_lr == 1.0


def test_symlinks_out_of_the_root_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    write_jsonl(outside / "m.jsonl", flat_then_flat(range(5)))
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    os.symlink(outside, root / "link")
    os.symlink(outside / "m.jsonl", root / "run" / "m.jsonl")
    daemon, _ = make_daemon(root)
    daemon.run()
    assert daemon.runs == {}
    daemon, _ = make_daemon(root, follow_symlinks=True)
    daemon.run()
    assert daemon.runs


def test_hidden_folders_are_not_runs(tmp_path):
    """Regression: a project folder watched whole made runs (and wrote control files) inside
    .venv's dist-info folders (entry_points.txt) and its packages' sample data (*.csv)."""
    write_jsonl(tmp_path / "runs" / "exp1" / "m.jsonl", flat_then_flat(range(3)))
    hidden = tmp_path / ".venv" / "lib" / "x.dist-info"
    hidden.mkdir(parents=True)
    (hidden / "entry_points.txt").write_text("[console_scripts]\nx = x:main\n")
    (hidden / "sample.csv").write_text("step,loss\n0,1\n")
    daemon, _ = make_daemon(tmp_path)
    daemon.run()
    assert list(daemon.runs) == [tmp_path / "runs" / "exp1"]
    assert not list((tmp_path / ".venv").rglob("autolr*"))
    daemon.handle(hidden / "sample.csv")  # an event from inside it (watchdog watches every folder)
    assert list(daemon.runs) == [tmp_path / "runs" / "exp1"]


def test_a_folders_logs_are_caught_up_oldest_first(tmp_path):
    """Regression: a requeued Slurm job's log (slurm-100012.out, steps 26-45) sorts before the
    first job's (slurm-99876.out, steps 0-25) by name; read first, the older one then rewound
    the run to step 25. Caught up by age, the run ends at step 45."""
    run = tmp_path / "run"
    write_jsonl(run / "b-99876.jsonl", flat_then_flat(range(26)))
    write_jsonl(run / "a-100012.jsonl", flat_then_flat(range(26, 46)))
    os.utime(run / "b-99876.jsonl", (1e9, 1e9))
    daemon, _ = make_daemon(run.parent, policy=("step:step_size=10",))
    daemon.run()
    assert [e["kind"] for e in read_journal(run)].count("rewind") == 0
    assert daemon.runs[run].summary()["step"] == 45


def test_a_followed_symlink_to_a_folder_inside_the_root_is_read_where_it_lies(tmp_path):
    """Regression: with --follow-symlinks, wandb/latest-run (a link to the offline-run folder)
    was walked first and its target then skipped as seen; the W&B reader leaves latest-run
    paths out, so the run was never found."""
    real = tmp_path / "wandb" / "offline-run-20260101_000000-abc"
    write_jsonl(real / "m.jsonl", flat_then_flat(range(3)))
    os.symlink(real.name, tmp_path / "wandb" / "latest-run")
    daemon, _ = make_daemon(tmp_path, follow_symlinks=True)
    daemon.run()
    assert list(daemon.runs) == [real]


def test_bad_lines_are_counted_not_fatal(tmp_path):
    log = tmp_path / "run" / "m.jsonl"
    log.parent.mkdir()
    log.write_bytes(b'{"step": 0, "loss": 1}\n\x00\xff garbage\n[1,2]\n{"step": 1, "loss": "nan"}\n{"step": 2, "loss": 1}\n')
    daemon, _ = make_daemon(tmp_path)
    daemon.run()
    summary = daemon.runs[tmp_path / "run"].summary()
    assert summary["rows"] == 3 and sum(summary["skipped"].values()) == 2


@pytest.mark.parametrize("native", [True, False], ids=["own-inotify", "watchdog"])
def test_inotify_limit_falls_back_to_polling(tmp_path, monkeypatch, caplog, native):
    import watchdog.observers

    import autolr.inotify

    class Exhausted(watchdog.observers.Observer):
        def schedule(self, *a, **k):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

    def exhausted(self, *a, **k):
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watchdog.observers, "Observer", Exhausted)
    monkeypatch.setattr(autolr.inotify.InotifyWatcher, "add_tree", exhausted)
    daemon, _ = make_daemon(tmp_path)
    daemon.options.once = False
    daemon.options.native_inotify = native
    daemon.start_observer()
    try:
        assert "poll" in daemon.mode
        assert "falling back to polling" in caplog.text
    finally:
        daemon.observer.stop()
        daemon.observer.join()


def test_one_log_kind_per_run(tmp_path):
    """A CSV and a JSONL with the same metrics in one run folder must not double-count."""
    run = tmp_path / "run"
    write_jsonl(run / "metrics.jsonl", flat_then_flat(range(10)))
    (run / "metrics.csv").write_text("step,loss\n" + "".join(f"{s},1.0\n" for s in range(10)))
    (run / "console.log").write_text("iter 1: loss 2.0, time 1ms\n")
    daemon, events = make_daemon(tmp_path)
    daemon.run()
    assert len(daemon.runs[run].sources) == 1 and daemon.runs[run].rows == 10
    assert len([e for e in events if e[0] == "ignored"]) == 2


@pytest.mark.parametrize("start_first", [True, False])
def test_a_callbacks_fit_start_file_is_read_beside_the_runs_log_of_any_kind(tmp_path, start_first):
    """autolr-fit.jsonl (the Lightning callback's: the step a fit starts at) is a companion: read
    beside metrics.csv whichever comes first, while a second log kind is still left out."""
    run = tmp_path / "run"
    run.mkdir()
    start = run / "autolr-fit.jsonl"
    if start_first:
        start.write_text('{"step": -1}\n')
    (run / "metrics.csv").write_text("step,loss\n" + "".join(f"{s},1.0\n" for s in range(10)))
    write_jsonl(run / "other.jsonl", flat_then_flat(range(10)))
    daemon, events = make_daemon(tmp_path)
    daemon.run()
    if not start_first:  # a fit resumed later in a run the daemon knows (a restart: from its state)
        start.write_text('{"step": 4}\n')
        daemon, events = make_daemon(tmp_path)
        daemon.run()
        assert daemon.runs[run].engine.rewinds == 0  # a late row: the resumed fit's own rows rewind
    assert sorted(p.name for p in daemon.runs[run].sources) == ["autolr-fit.jsonl", "metrics.csv"]
    assert [d["path"] for k, d in events if k == "ignored"] == [str(run / "other.jsonl")]
    assert daemon.runs[run].rows == 11


def test_a_fit_start_file_read_after_the_whole_log_never_rewinds_the_run(tmp_path):
    """Regression (a helper's audit): catching up, the daemon reads a folder's files one after the
    other, so the fit starts (-1, then a resumed fit's 249) came after the whole log and rewound
    the run to step -1, dropping its history: a final scale of 0.25 where the log gives 0.125."""
    def folder(name: str, with_start: bool) -> Path:
        run = tmp_path / name / "run"
        rows = [{"step": s, "loss": 1.0 if s < 20 else 2.0} for s in range(0, 300)]
        write_jsonl(run / "metrics.jsonl", rows)
        if with_start:
            (run / "autolr-fit.jsonl").write_text('{"step": -1}\n{"step": 249}\n')
            os.utime(run / "autolr-fit.jsonl", (time.time() + 5, time.time() + 5))  # read last
        return tmp_path / name

    scales = []
    for name, with_start in (("plain", False), ("started", True)):
        daemon, _ = make_daemon(folder(name, with_start))
        daemon.run()
        run = daemon.runs[tmp_path / name / "run"]
        scales.append(run.engine.scale)
        assert run.engine.rewinds == 0
    assert scales[0] < 0.01 and scales[1] == scales[0]


def test_catching_up_reports_progress(tmp_path, monkeypatch):
    import autolr.daemon as daemon_mod
    import autolr.readers.base as base

    monkeypatch.setattr(base, "READ_BLOCK", 4096)  # many reads for a small log
    clock = iter(range(0, 10_000, 2))  # every clock read is 2 s later
    monkeypatch.setattr(daemon_mod.time, "monotonic", lambda: float(next(clock)))
    write_jsonl(tmp_path / "run" / "m.jsonl", flat_then_flat(range(2000)))
    daemon, events = make_daemon(tmp_path, policy=("constant",))
    daemon.run()
    progress = [d for k, d in events if k == "progress"]
    assert len(progress) >= 3 and progress[-1]["rows"] <= 2000
    assert [d["rows"] for d in progress] == sorted(d["rows"] for d in progress)


def test_engine_history_columns_round_trip():
    """The compact history gives back every row exactly, odd ones (huge step, int values) too."""
    from autolr.engine import History

    rows = [(1, None, {"loss": 0.5}), (None, 2.0, {"loss": float("nan"), "acc": 0.1}),
            (2**70, None, {"loss": 1.0}), (3, None, {"loss": 3}), (4, None, {}), (5, 1.5, {"loss": -0.0})]
    h = History()
    for r in rows:
        h.append(*r)
    same = lambda a, b: repr(a) == repr(b)  # noqa: E731  (NaN-aware, type-exact)
    assert same([h.row(i) for i in range(len(h))], rows)
    back = History.from_state(json.loads(json.dumps(h.get_state())))
    assert same([back.row(i) for i in range(len(back))], rows)
    h.drop_front(2)
    assert same([h.row(i) for i in range(len(h))], rows[2:]) and h.first == 2
    h.truncate(2)
    assert same([h.row(i) for i in range(len(h))], rows[2:4]) and h.key(0, "step") == 2**70
    h.append(*rows[5])
    assert same(h.row(2), rows[5])
    # one name set for a while (no per-row keys), cut at the front, then other names
    h, plain = History(), [(s, None, {"loss": 1.0 / (s + 1), "acc": 0.5}) for s in range(6)]
    for r in plain:
        h.append(*r)
    assert h.keys is None and h.epochs is None and len(h.values) == 12
    h.drop_front(2)
    more = [(6, 0.5, {"val_loss": 0.25}), (7, None, {"loss": 0.1, "acc": 0.6})]
    for r in more:
        h.append(*r)
    expected = plain[2:] + more
    assert same([h.row(i) for i in range(len(h))], expected)
    back = History.from_state(json.loads(json.dumps(h.get_state())))
    assert same([back.row(i) for i in range(len(back))], expected)
    h.truncate(3)
    assert same([h.row(i) for i in range(len(h))], expected[:3])


def test_engine_state_round_trip_then_rewind_is_exact():
    """Saved mid-run (new and first state formats), restored, rewound: same decisions as never saved."""
    from autolr.engine import RunEngine
    from autolr.records import Record

    settings = Settings(policies=parse_policy_options(["step:step_size=7,gamma=0.9"]), base_lr=0.1)

    def feed(engine, steps):
        return [(d.step, d.scale, d.kind) for s in steps
                for d in engine.feed(Record({"loss": 1.0 / (1 + s)}, s, None), ["loss"])]

    plain = RunEngine(settings.chain(POLICIES))
    feed(plain, range(2000))
    state = json.loads(json.dumps(plain.get_state(), allow_nan=True))
    first_format = dict(state, rows=[list(plain.rows.row(i)) for i in range(len(plain.rows))])
    del first_format["history"]
    expected = feed(plain, [*range(1500, 1700), *range(1100, 1300)])  # two rewinds
    assert [k for _, _, k in expected].count("rewind") == 2
    for saved in (state, first_format):
        engine = RunEngine(settings.chain(POLICIES))
        engine.set_state(saved)
        assert feed(engine, [*range(1500, 1700), *range(1100, 1300)]) == expected


def test_engine_checkpoints_are_packed_exactly_and_rewind_with_auto():
    """Checkpoints are marshal bytes of the state: get_state gives back the very states, and a
    rewind with a stateful policy (auto's windows and guard) restores them bit for bit."""
    from autolr.engine import RunEngine, _pack, _unpack
    from autolr.records import Record

    settings = Settings(policies=parse_policy_options(["auto"]), base_lr=0.1)
    rng = np.random.default_rng(3)
    losses = np.maximum(1.0 / (1 + 0.01 * np.arange(3000)), 0.05) * (1 + 0.05 * rng.standard_normal(3000))

    def feed(engine, steps):
        return [(d.step, d.scale, d.kind) for s in steps
                for d in engine.feed(Record({"loss": float(losses[s])}, s, None), ["loss"])]

    engine = RunEngine(settings.chain(POLICIES))
    states = {}
    for s in range(2500):
        feed(engine, [s])
        states[s + 1] = engine.state
    assert len(engine.checkpoints) == 3 and all(type(p) is bytes for _, p in engine.checkpoints)
    for n, packed in engine.checkpoints:
        assert _unpack(packed) == states[n]  # floats bit for bit, every list and counter
    assert json.loads(json.dumps(engine.get_state()))["checkpoints"][0][1] == states[engine.checkpoints[0][0]]
    # a rewind into the oldest checkpoint's span decides exactly as a run that never went past it
    fresh = RunEngine(settings.chain(POLICIES))
    feed(fresh, range(1100))
    expected = feed(fresh, range(1100, 2500))
    assert expected  # decisions to compare, not an empty list
    assert [x for x in feed(engine, range(1100, 2500)) if x[2] != "rewind"] == expected

    class Name(str):
        pass

    odd = {"name": Name("x"), "values": [1.0]}
    assert _pack(odd) is odd and _unpack(_pack(odd)) is odd  # a type marshal refuses: kept as is


def test_a_step_that_restarts_every_epoch_is_called_out():
    """Steps going back while the epoch advances: a per-epoch counter, not a resumed job. It is
    handled as a rewind (the only safe reading), and the reason says what to do."""
    from autolr.engine import RunEngine
    from autolr.records import Record

    engine = RunEngine(Settings(policies=parse_policy_options(["auto"]), base_lr=0.1).chain(POLICIES))
    rewinds = [d for epoch in range(2) for b in range(50)
               for d in engine.feed(Record({"loss": 1.0}, b, float(epoch)), ["loss"]) if d.kind == "rewind"]
    assert len(rewinds) == 1 and "the epoch advanced (0 -> 1)" in rewinds[0].reason
    assert "--unit epoch" in rewinds[0].reason
    # a real resume (epoch and step both back) says nothing of the kind
    back = [d for d in engine.feed(Record({"loss": 1.0}, 10, 0.0), ["loss"]) if d.kind == "rewind"]
    assert back and "epoch advanced" not in back[0].reason


def test_a_manual_set_while_the_factors_are_zero_never_stops_the_run(tmp_path):
    """Regression: ``autolr set`` after a polynomial decay reached 0 raised ZeroDivisionError
    in the daemon at every start (the journal's manual entry is adopted again at load)."""
    from autolr.manual import set_manual

    run = tmp_path / "run"
    policy = ("polynomial:total_iters=10",)
    write_jsonl(run / "metrics.jsonl", flat_then_flat(range(10)))
    make_daemon(tmp_path, policy=policy)[0].run()
    set_manual(run, lr=0.05)
    for extra in (range(10, 12), range(12, 14)):  # two more starts, each adopting the journal
        write_jsonl(run / "metrics.jsonl", flat_then_flat(extra))
        make_daemon(tmp_path, policy=policy)[0].run()
        control = json.loads((run / "autolr.json").read_text())
        assert control["lr"] == pytest.approx(0.05) and control["policy"] == "manual"
    manual = [e for e in read_journal(run) if e["kind"] == "manual"]
    assert len(manual) == 1 and read_journal(run)[-1]["seq"] == manual[0]["seq"]  # nothing after it


def test_a_manual_lr_set_before_the_daemon_knows_the_base_lr(tmp_path):
    """``autolr set --lr`` before the first start (no base LR in the file: scale 1), then
    ``watch --base-lr 0.1``: the LR is the manual 0.5 and the next decision halves it (it was
    0.1 × 0.5: the manual LR read as a scale of 1)."""
    from autolr.manual import set_manual

    run = tmp_path / "run"
    run.mkdir()
    set_manual(run, lr=0.5)
    write_jsonl(run / "metrics.jsonl", flat_then_flat(range(7)))
    make_daemon(tmp_path, policy=("step:step_size=5,gamma=0.5",), base_lr=0.1)[0].run()
    entries = [(e["kind"], e["lr"]) for e in read_journal(run)]
    assert entries[0] == ("manual", 0.5) and entries[-1] == ("decision", pytest.approx(0.25)), entries


def test_a_manual_set_beyond_the_daemons_bounds_is_written_at_the_bound(tmp_path):
    """``autolr set --lr`` above max_lr (or below min_lr) was written as is: the loop ran at it
    until the daemon's next row took it to the bound. The daemon's records carry its bounds,
    and ``set`` (through the CLI: it says so) writes the bound; a second set still sees them."""
    from click.testing import CliRunner

    from autolr.cli import main

    run = tmp_path / "run"
    write_jsonl(run / "metrics.jsonl", flat_then_flat(range(3)))
    overrides = {"policies": parse_policy_options(("step:step_size=100",)), "base_lr": 0.1,
                 "min_lr": 0.01, "max_lr": 0.2}
    Daemon(tmp_path, load_config(None), overrides, POLICIES, READERS, Options(once=True, fsync=False)).run()
    control = json.loads((run / "autolr.json").read_text())
    assert (control["min_lr"], control["max_lr"]) == (0.01, 0.2)
    runner = CliRunner()
    for args, lr, bound in ((["--lr", "5"], 0.2, "max_lr 0.2"), (["--scale", "0.001"], 0.01, "min_lr 0.01"),
                            (["--lr", "0.15"], 0.15, None)):
        result = runner.invoke(main, ["set", str(run), *args])
        assert result.exit_code == 0, result.output
        control = json.loads((run / "autolr.json").read_text())
        assert control["lr"] == pytest.approx(lr) and control["scale"] == pytest.approx(lr / 0.1)
        assert (control["min_lr"], control["max_lr"]) == (0.01, 0.2)  # carried for the next set
        assert (bound is None) == ("beyond" not in result.stderr), result.stderr
        if bound:
            assert f"beyond the daemon's {bound}" in result.stderr
    write_jsonl(run / "metrics.jsonl", flat_then_flat(range(3, 6)))
    Daemon(tmp_path, load_config(None), overrides, POLICIES, READERS, Options(once=True, fsync=False)).run()
    assert read_journal(run)[-1]["kind"] == "manual"  # adopted as written: nothing to correct


def _margin_daemon(root: Path, policy=("auto:warmup=0",), margin=5) -> Daemon:
    overrides = {"policies": parse_policy_options(policy), "base_lr": 0.1, "apply_margin": margin}
    return Daemon(root, load_config(None), overrides, POLICIES, READERS, Options(once=True, fsync=False))


@pytest.mark.parametrize("margin", [20, 50])
def test_apply_margin_a_change_on_every_row_applies_at_its_step(tmp_path, margin):
    """Regression (a helper's audit): the control file listed the last 32 changes; with a
    change on every row and a margin of 32 or more all of them lay ahead of the job, so the
    job found none in force and ran on the initial value for good (a cosine over 300 steps:
    every step at scale 1). The file lists every change not yet due, then the latest due."""
    run, log = tmp_path / "exp", tmp_path / "exp" / "metrics.jsonl"
    write_jsonl(log, [{"step": 0, "loss": 1.0}])
    daemon = _margin_daemon(tmp_path, policy=("cosine:T_max=300",), margin=margin)
    daemon.discover()
    daemon.catch_up()
    job = Control(run)
    used = {}
    for step in range(1, 300):
        used[step] = job.scale(step)  # the scale the job takes this step with
        write_jsonl(log, [{"step": step, "loss": 1.0}])
        daemon.handle(log)
    journal = read_journal(run)
    assert len(journal) == 300
    assert used == {step: in_force(journal, step)["scale"] for step in used}
    assert len(json.loads((run / "autolr.json").read_text())["schedule"]) <= MAX_SCHEDULE
    assert Control(run).scale(100) == in_force(journal, 100)["scale"]  # a job resumed at step 100


def test_apply_margin_an_epoch_level_log_lists_its_latest_changes(tmp_path):
    """Regression (a helper's audit): on a log without steps (Keras's CSVLogger: epochs) the
    bounded schedule had no step to tell due changes from those ahead, kept the 255 oldest, and
    a client reading with ``step=`` never got a change after the 256th."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("epoch,loss\n" + "".join(f"{e},1.0\n" for e in range(400)))
    _margin_daemon(tmp_path, policy=("exponential:gamma=0.99",), margin=2).run()
    journal = read_journal(run)
    assert len(journal) == 401
    assert Control(run).scale(401) == journal[-1]["scale"]
    assert Control(run).scale(300) == in_force(journal, 300)["scale"]


def test_apply_margin_a_manual_set_is_in_force_for_a_restarted_job(tmp_path):
    """Regression (a helper's audit): an ``autolr set`` was missing from the control file's
    schedule once the daemon published again, so a job restarted (or a rank reading late)
    took the change before the set: 12.5x the LR the user set, until the next change."""
    from autolr.manual import set_manual

    run, log = tmp_path / "exp", tmp_path / "exp" / "metrics.jsonl"
    write_jsonl(log, [{"step": s, "loss": 1.0} for s in range(66)])
    daemon = _margin_daemon(tmp_path, policy=("step:step_size=30,gamma=0.5",), margin=20)
    daemon.discover()
    daemon.catch_up()  # changes at 30 (due 50) and 60 (due 85)
    set_manual(run, scale=0.01)
    write_jsonl(log, [{"step": s, "loss": 1.0} for s in range(66, 95)])
    daemon.handle(log)  # adopts the set; the change at 90 is due at 114
    assert read_journal(run)[-1]["kind"] == "decision" and read_journal(run)[-1]["apply_at_step"] == 114
    restarted = Control(run)
    assert restarted.scale(95) == pytest.approx(0.01)
    assert restarted.scale(114) == pytest.approx(0.005)
    daemon.flush()
    _margin_daemon(tmp_path, policy=("step:step_size=30,gamma=0.5",), margin=20).run()  # the restart keeps it
    assert Control(run).scale(95) == pytest.approx(0.01)


def test_apply_margin_a_resumed_run_journals_its_rewind_and_guard_and_restarts(tmp_path):
    """Regression: with --apply-margin, a rewind compared the initial entry's apply_at_step
    (None) with an int: TypeError after the engine had taken the rows, so the rewind and the
    guard's cut were lost, and every later start failed the same way. And a change after a
    rewind applied at the abandoned branch's last step + margin (304 here, not 214)."""
    run = tmp_path / "exp"
    write_jsonl(run / "metrics.jsonl", [{"step": s, "loss": 1.0 / (1 + 0.01 * s)} for s in range(300)])
    _margin_daemon(tmp_path).run()
    write_jsonl(run / "metrics.jsonl", [{"step": s, "loss": 1.0 / (1 + 0.01 * s) if s < 205 else "NaN"}
                                        for s in range(200, 210)])
    _margin_daemon(tmp_path).run()
    journal = read_journal(run)
    kinds = [(e["kind"], e["step"], e.get("apply_at_step")) for e in journal if e["kind"] != "initial"]
    assert ("rewind", 200, 205) in kinds, kinds
    guard = [e for e in journal if "divergence guard" in (e.get("reason") or "")]
    assert len(guard) == 1 and guard[0]["step"] == 205 and guard[0]["apply_at_step"] == 214, kinds
    control = json.loads((run / "autolr.json").read_text())
    assert control["seq"] == journal[-1]["seq"] and control["scale"] == pytest.approx(0.5)
    write_jsonl(run / "metrics.jsonl", [{"step": 210, "loss": 1.0}])
    _margin_daemon(tmp_path).run()  # a later start catches up without failing
    assert read_journal(run)[-1]["seq"] >= journal[-1]["seq"]


def test_one_run_failing_during_catch_up_leaves_the_others_and_the_start(tmp_path, monkeypatch):
    from autolr import run as runmod

    for name in ("a", "b"):
        write_jsonl(tmp_path / name / "metrics.jsonl", flat_then_flat(range(10)))
    real = runmod.Run.feed

    def feed(self, reader, records):
        if self.folder.name == "a":
            raise RuntimeError("a bug in this run's path")
        return real(self, reader, records)

    monkeypatch.setattr(runmod.Run, "feed", feed)
    daemon, _ = make_daemon(tmp_path)
    daemon.run()
    assert daemon.errors["unexpected error"] == 1
    assert decisions(tmp_path / "b") == replay_changes(tmp_path / "b" / "metrics.jsonl")


def test_skip_counts_carry_over_a_restart(tmp_path):
    """Regression: the counts were the live readers' own, and a restarted reader resumes past
    what it skipped: `autolr status` showed nothing after a restart, then only the new ones."""
    log = tmp_path / "run" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text('{"step": 0, "loss": 1}\nGARBAGE\n{"step": 1, "loss": "abc"}\n[1,2]\n')
    make_daemon(tmp_path)[0].run()
    first = json.loads((tmp_path / "run" / "autolr.state.json").read_text())["skipped"]
    assert sum(first.values()) == 2, first  # the garbage line and the array (a string value is no error)
    with open(log, "a") as f:
        f.write('{"step": 2, "loss": 1}\n')
    make_daemon(tmp_path)[0].run()
    assert json.loads((tmp_path / "run" / "autolr.state.json").read_text())["skipped"] == first
    with open(log, "a") as f:
        f.write('MORE GARBAGE\n{"step": 3, "loss": 1}\n')
    make_daemon(tmp_path)[0].run()
    last = json.loads((tmp_path / "run" / "autolr.state.json").read_text())["skipped"]
    assert sum(last.values()) == 3 and all(last[k] >= v for k, v in first.items()), last


def _run_of(root: Path, policy=("step:step_size=10,gamma=0.5",), base_lr=0.1):
    from autolr.run import Run

    settings = Settings(policies=parse_policy_options(policy), base_lr=base_lr)
    run = Run(root, settings, POLICIES, fsync=False)
    sources = run.load()
    run.start()
    return run, sources


def _steps(first, last):
    from autolr.readers.base import Record

    return [Record({"loss": 1.0}, s) for s in range(first, last)]


class _Source:
    """A reader stand-in: Run.feed asks only for its path and columns."""

    name = "fake"

    def __init__(self, path: Path):
        self.path = path

    def columns(self):
        return ["loss"]


def test_a_manual_set_while_the_daemon_derives_decisions_wins(tmp_path):
    """Regression: with inotify, feed() does not stat the control file; a decision derived from
    rows read before an ``autolr set`` was published after it (a higher seq), the LR went back
    to the schedule's and the override was never adopted (2 to 10 of 20 sets lost under load).
    Now the publish sees the newer seq: the override is adopted, the stale decision dropped,
    and later decisions continue from the manual LR."""
    from autolr.manual import set_manual

    run, _ = _run_of(tmp_path)
    run.manual_by_events = True  # the event announcing the set has not been handled yet
    source = _Source(tmp_path / "metrics.jsonl")
    run.feed(source, _steps(0, 5))
    set_manual(tmp_path, lr=0.03)
    run.feed(source, _steps(5, 15))  # the LR halves for step 10: derived before the set was seen
    control = json.loads((tmp_path / "autolr.json").read_text())
    assert control["policy"] == "manual" and control["lr"] == pytest.approx(0.03)
    assert run.engine.lr == pytest.approx(0.03) and run.seq == control["seq"]
    run.feed(source, _steps(15, 25))  # and for step 20, from the manual LR
    entries = [(e["kind"], e["step"], pytest.approx(e["lr"])) for e in read_journal(tmp_path)]
    assert entries == [("initial", None, 0.1), ("manual", None, 0.03), ("decision", 19, 0.015)]
    assert json.loads((tmp_path / "autolr.state.json").read_text())["seq"] == control["seq"]  # saved at once


def test_a_restart_behind_the_journal_adopts_a_manual_set_between_two_decisions(tmp_path):
    """Regression: a kill -9 left the state before decision A, an ``autolr set`` and decision B
    (derived from the manual LR). The restart re-derived A and B in one batch before matching
    the journal, so B came out without the override, disagreed, and was published over it (the
    LR jumped from 0.0075 to 0.025). Now each re-derived decision is matched as it comes."""
    from autolr.manual import set_manual

    run, _ = _run_of(tmp_path)
    run.save()  # the last save before the kill
    saved = (tmp_path / "autolr.state.json").read_bytes()
    source = _Source(tmp_path / "metrics.jsonl")
    run.feed(source, _steps(0, 15))  # A: 0.05 at step 10
    set_manual(tmp_path, lr=0.015)
    run.adopt_manual()  # (its save failed: a full disk, say)
    (tmp_path / "autolr.state.json").write_bytes(saved)
    run.feed(source, _steps(15, 25))  # B: 0.0075 at step 20
    before = read_journal(tmp_path)
    assert [e["kind"] for e in before] == ["initial", "decision", "manual", "decision"]
    restarted, _ = _run_of(tmp_path)  # kill -9: the state is the one saved before A
    restarted.feed(source, _steps(0, 25))  # the log read again from the saved position
    assert read_journal(tmp_path) == before
    assert restarted.engine.lr == pytest.approx(run.engine.lr) == pytest.approx(0.0075)
    assert restarted.seq == before[-1]["seq"]


@pytest.mark.parametrize("control_lost", [False, True])
def test_apply_margin_a_restart_behind_the_journal_keeps_the_schedule(tmp_path, control_lost):
    """Regression: after a kill -9 that left the state behind the journal, the control file's
    ``schedule`` (the changes a rank started later applies at their steps) kept only the saved
    entries: the ones the restart matched in the journal were missing, and a control file
    rewritten from the journal (the kill came before its replace) listed none."""
    from autolr.run import Run

    settings = Settings(policies=parse_policy_options(("step:step_size=10,gamma=0.5",)), base_lr=0.1,
                        apply_margin=5)
    source = _Source(tmp_path / "a" / "metrics.jsonl")
    clean = Run(tmp_path / "clean", settings, POLICIES, fsync=False)
    clean.load(), clean.start()
    clean.feed(source, _steps(0, 35))  # read as the interrupted run read it: apply_at_step is
    clean.feed(source, _steps(35, 45))  # the highest step seen when published + apply_margin
    run = Run(tmp_path / "a", settings, POLICIES, fsync=False)
    run.load(), run.start()
    run.save()  # the last save before the kill
    run.feed(source, _steps(0, 35))
    if control_lost:
        (tmp_path / "a" / "autolr.json").unlink()
    restarted = Run(tmp_path / "a", settings, POLICIES, fsync=False)
    restarted.load()
    if control_lost:  # rewritten from the journal at load
        assert len(json.loads((tmp_path / "a" / "autolr.json").read_text())["schedule"]) == 4
    restarted.feed(source, _steps(0, 45))
    got, want = (json.loads((tmp_path / d / "autolr.json").read_text())["schedule"] for d in ("a", "clean"))
    assert [(e["at"], e["seq"], e["lr"]) for e in got] == [(e["at"], e["seq"], e["lr"]) for e in want]
    assert len(want) == 5


def _rotation_rows():
    return [{"step": s, "loss": 1.0 if s < 25 else 0.5} for s in range(60)]


@pytest.mark.parametrize("order", ["old name first", "new name first", "old name recreated later", "restart"])
def test_a_rotated_log_is_read_on_under_its_new_name_not_again(tmp_path, order):
    """Regression: a log renamed to a name that still matches (loguru's rotation: train.jsonl
    -> train.1.jsonl, then a new train.jsonl) was read again from byte 0 under its new name:
    a spurious rewind, and its decisions journaled again. The file is known by its inode: its
    new name reads on from where the old one stopped. Whatever order the names are seen in,
    and across a restart of the daemon."""
    rows = _rotation_rows()
    run = tmp_path / "run"
    write_jsonl(run / "train.jsonl", rows[:30])
    daemon, _ = make_daemon(tmp_path)
    daemon.discover()  # a live daemon: it keeps each log open between reads
    daemon.catch_up()
    daemon.flush()
    write_jsonl(run / "train.jsonl", rows[30:40])  # written after the last read
    os.rename(run / "train.jsonl", run / "train.1.jsonl")
    if order != "old name recreated later":
        write_jsonl(run / "train.jsonl", rows[40:])
    if order == "restart":
        make_daemon(tmp_path)[0].run()
    else:
        names = [run / "train.jsonl", run / "train.1.jsonl"]
        for path in names if order != "new name first" else names[::-1]:
            daemon.handle(path)
        if order == "old name recreated later":
            write_jsonl(run / "train.jsonl", rows[40:])
            daemon.handle(run / "train.jsonl")
    write_jsonl(tmp_path / "clean" / "train.jsonl", rows)
    make_daemon(tmp_path / "clean")[0].run()
    assert [e["kind"] for e in read_journal(run)].count("rewind") == 0
    assert decisions(run) == decisions(tmp_path / "clean")


@pytest.mark.parametrize("renamed_first", [True, False])
def test_a_log_rotated_after_a_restart_reads_on_from_the_live_position(tmp_path, renamed_first):
    """Regression (a helper's bug hunt): after a restart, a log read on past the position saved
    at that restart, then rotated, was read under its new name from the saved position: the
    rows in between again, a spurious rewind and their decisions journaled twice."""
    rows = _rotation_rows()
    run = tmp_path / "run"
    write_jsonl(run / "train.jsonl", rows[:20])
    make_daemon(tmp_path)[0].run()  # state saved at row 20
    daemon, _ = make_daemon(tmp_path)
    daemon.discover()
    daemon.catch_up()
    write_jsonl(run / "train.jsonl", rows[20:40])
    daemon.handle(run / "train.jsonl")  # read live up to row 40
    os.rename(run / "train.jsonl", run / "train.1.jsonl")
    write_jsonl(run / "train.jsonl", rows[40:])
    names = [run / "train.1.jsonl", run / "train.jsonl"]
    for path in names if renamed_first else names[::-1]:
        daemon.handle(path)
    write_jsonl(tmp_path / "clean" / "train.jsonl", rows)
    make_daemon(tmp_path / "clean")[0].run()
    assert [e["kind"] for e in read_journal(run)].count("rewind") == 0
    assert decisions(run) == decisions(tmp_path / "clean")
    assert daemon.runs[run].engine.state["rows"] == 60


@pytest.mark.parametrize("gone", ["renamed", "deleted"])
def test_a_log_renamed_to_a_name_no_reader_takes_is_read_to_its_end(tmp_path, gone):
    """Regression: logrotate renames train.jsonl to train.jsonl.1 (no reader takes that name)
    while the job writes on into its open file until it reopens train.jsonl. When the path
    vanished, the source was dropped and its descriptor closed: the rows not read yet and
    those the job wrote before reopening were lost. They are read, through the descriptor
    kept for the next reader of the path, before the new file; once, even if the old file
    shows up later under a name a reader takes. A deleted log's unread rows are read too."""
    rows = _rotation_rows()
    run = tmp_path / "run"
    log = run / "train.jsonl"
    write_jsonl(log, rows[:30])
    daemon, _ = make_daemon(tmp_path)
    daemon.discover()  # a live daemon: it keeps each log open between reads
    daemon.catch_up()
    with open(log, "a") as job:
        job.writelines(json.dumps(r) + "\n" for r in rows[30:35])  # not read before the rename
        job.flush()
        if gone == "renamed":
            os.rename(log, run / "train.jsonl.1")
        else:
            log.unlink()
        daemon.handle(log)
        assert log not in daemon.sources and run not in daemon.runs
        assert daemon.closing[run][1].rows == 35  # its rows not read yet were read first
        assert len(daemon.behind) == (gone == "renamed")
        job.writelines(json.dumps(r) + "\n" for r in rows[35:40])  # into the old file
    if gone == "deleted":
        write_jsonl(log, rows[35:])  # those rows went with the deleted file: again in the new one
    else:
        write_jsonl(log, rows[40:])
    daemon.handle(log)
    assert daemon.runs[run].rows == len(rows) and not daemon.behind  # (its descriptor taken)
    if gone == "renamed":  # found later under a name a reader takes: nothing read again
        os.rename(run / "train.jsonl.1", run / "train.1.jsonl")
        daemon.handle(run / "train.1.jsonl")
        assert run / "train.1.jsonl" in daemon.sources
    daemon.flush()
    assert daemon.runs[run].rows == len(rows)
    write_jsonl(tmp_path / "clean" / "train.jsonl", rows)
    make_daemon(tmp_path / "clean")[0].run()
    assert [e["kind"] for e in read_journal(run)].count("rewind") == 0
    assert decisions(run) == decisions(tmp_path / "clean")


@pytest.mark.parametrize("case", ["renamed", "renamed twice", "inode reused"])
def test_a_restart_reads_the_rest_of_a_log_rotated_while_it_was_down(tmp_path, case):
    """Regression: rows written into a log, which logrotate then renamed to a name no reader
    takes (train.jsonl -> train.jsonl.1) while the daemon was down (killed before it read
    them), were lost: the restart found a new train.jsonl and read only that. The saved
    position names the file by (device, inode); the restart finds it in the folder, checks the
    bytes before the position, and reads its rest first. A file that only has the inode number
    now (the old one deleted, the number reused) is not read."""
    rows = _rotation_rows()
    run = tmp_path / "run"
    log = run / "train.jsonl"
    policy = ("step:step_size=5,gamma=0.9",)  # a decision every 5 rows: each lost row shows
    write_jsonl(log, rows[:30])
    make_daemon(tmp_path, policy=policy)[0].run()  # state saved at row 30
    write_jsonl(log, rows[30:40])  # never read: the daemon is down
    os.rename(log, run / "train.jsonl.1")
    if case == "renamed twice":
        os.rename(run / "train.jsonl.1", run / "train.jsonl.2.gz")
    if case == "inode reused":  # another file's bytes under the old file's inode number
        other = run / "train.jsonl.1"
        other.write_bytes(b" " * (other.stat().st_size - 1) + b"\n"
                          + b"".join(json.dumps(r).encode() + b"\n" for r in rows[30:40]))
    write_jsonl(log, rows[40:])
    make_daemon(tmp_path, policy=policy)[0].run()
    write_jsonl(tmp_path / "clean" / "train.jsonl", rows if case != "inode reused" else rows[:30] + rows[40:])
    make_daemon(tmp_path / "clean", policy=policy)[0].run()
    assert [e["kind"] for e in read_journal(run)].count("rewind") == 0
    assert decisions(run) == decisions(tmp_path / "clean")


@pytest.mark.parametrize("live, start", [(False, False), (True, False), (True, True)])
def test_a_run_folder_copied_to_start_a_new_run_continues_from_its_own_log(tmp_path, live, start, monkeypatch):
    """Regression (a helper's audit): ``cp -r runs/a runs/b`` (the control file and journal
    with it), then a new job in b logging from step 0: the daemon matched the new log's
    decisions against the copied journal and took them as published, so the job ran on a's
    last LR (0.03125 instead of 1.0, then 0.5, ...). The journal's entries beyond every row
    of the log are not this log's: a rewind to the log's LR is published (live, once that has
    held for AHEAD_SETTLE seconds: the end of the log may be that of a copy under way). With a
    callback's fit-start file beside the log (``start``), the same (a helper's audit: the live
    check ran only for runs of one source, and the companion made two)."""
    from autolr import daemon as daemon_module

    monkeypatch.setattr(daemon_module, "AHEAD_SETTLE", 0.3)
    policy = ("step:step_size=20,gamma=0.5",)
    a, b = tmp_path / "a", tmp_path / "b"
    write_jsonl(a / "metrics.jsonl", [{"step": s, "loss": 1.0} for s in range(100)])
    make_daemon(a, policy=policy)[0].run()
    b.mkdir()
    for name in ("autolr.json", "autolr.decisions.jsonl"):  # (the copy seen before a's state file)
        (b / name).write_bytes((a / name).read_bytes())
    write_jsonl(b / "metrics.jsonl", [{"step": s, "loss": 1.0} for s in range(5)])
    if start:
        (b / "autolr-fit.jsonl").write_text('{"step": -1}\n')
    daemon, _ = make_daemon(b, policy=policy)
    if live:
        daemon.discover()
        if start:
            daemon.process(b / "autolr-fit.jsonl")
        daemon.process(b / "metrics.jsonl")
        assert Control(b).scale() == 0.03125  # not yet: a copy may be under way
        time.sleep(0.35)
        daemon.process(b / "metrics.jsonl")
    else:
        daemon.run()
    assert Control(b).scale() == 1.0 and read_journal(b)[-1]["kind"] == "rewind"
    write_jsonl(b / "metrics.jsonl", [{"step": s, "loss": 1.0} for s in range(5, 60)])
    if live:
        daemon.handle(b / "metrics.jsonl")
    else:
        make_daemon(b, policy=policy)[0].run()
    assert Control(b).scale() == 0.125
    assert [(e["kind"], e["step"]) for e in read_journal(b)[6:]] == [
        ("rewind", 4), ("decision", 19), ("decision", 39), ("decision", 59)]


def test_a_rescan_reading_a_log_in_slices_takes_the_journal_as_its_own(tmp_path, monkeypatch):
    """Regression (a helper's audit of the journal-ahead check): a run folder moved in with its
    log and journal (no state) while the daemon runs is read in time slices; the safety-net
    rescan's catch-up checked the journal against the log after its first slice, published a
    spurious rewind and journaled the rest of the log's decisions again."""
    from autolr import daemon as daemon_module
    from autolr.readers import base

    policy = ("step:step_size=50,gamma=0.9",)
    src = tmp_path / "src" / "run1"
    write_jsonl(src / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(2000)])
    make_daemon(tmp_path / "src", policy=policy)[0].run()
    (src / "autolr.state.json").unlink()
    journal = read_journal(src)
    root = tmp_path / "root"
    root.mkdir()
    daemon, _ = make_daemon(root, policy=policy)
    daemon.discover()
    daemon.catching_up = False  # live from here on
    monkeypatch.setattr(base, "READ_BLOCK", 4096)  # a read takes 4 KiB of the log...
    monkeypatch.setattr(daemon_module, "READ_SLICE", 0.0)  # ...and the others get their turn after each
    os.rename(src, root / "run1")
    daemon.rescan()
    while daemon.pending:
        daemon.drain()
    assert read_journal(root / "run1") == journal


def test_a_misspelt_metric_is_reported_once_by_the_daemon(tmp_path, caplog):
    """Regression (a helper's audit): ``watch --metric val_los`` said nothing; the plateau
    could never fire."""
    write_jsonl(tmp_path / "run" / "m.jsonl", [{"step": s, "loss": 1.0, "val_loss": 1.0} for s in range(20)])
    write_jsonl(tmp_path / "ok" / "m.jsonl", [{"step": s, "loss": 1.0, "val_los": 1.0} for s in range(20)])
    with caplog.at_level("WARNING", logger="autolr.run"):
        daemon, _ = make_daemon(tmp_path, metric="val_los")
        daemon.run()
        write_jsonl(tmp_path / "run" / "m.jsonl", [{"step": s, "loss": 1.0, "val_loss": 1.0} for s in range(20, 30)])
        daemon.handle(tmp_path / "run" / "m.jsonl")
    said = [r.getMessage() for r in caplog.records if "--metric" in r.getMessage()]
    assert len(said) == 1 and "run: --metric 'val_los'" in said[0] and "did you mean 'val_loss'" in said[0], said


def test_a_policys_misspelt_metric_is_reported_once_by_the_daemon_not_after_a_restart(tmp_path, caplog):
    write_jsonl(tmp_path / "run" / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(20)])
    policy = ("plateau:method=threshold,metric=losss",)
    with caplog.at_level("WARNING", logger="autolr.run"):
        make_daemon(tmp_path, policy=policy)[0].run()
        write_jsonl(tmp_path / "run" / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(20, 30)])
        make_daemon(tmp_path, policy=policy)[0].run()
    said = [r.getMessage() for r in caplog.records if "losss" in r.getMessage()]
    assert len(said) == 1 and "plateau:metric 'losss'" in said[0] and "did you mean 'loss'" in said[0], said


def test_apply_margin_a_rewind_in_the_same_batch_voids_the_entries_before_it(tmp_path):
    """Regression (a helper's bug hunt): a rewind published in one batch with decisions of the
    abandoned branch left those in the control file's schedule (only the schedule from before
    the batch was voided), so it differed from what a restart rebuilds from the journal."""
    run = tmp_path / "exp"
    write_jsonl(run / "metrics.jsonl", flat_then_flat([*range(100), *range(50, 60)]))
    _margin_daemon(tmp_path, policy=("step:step_size=20,gamma=0.5",)).run()
    journal = read_journal(run)
    assert [e["kind"] for e in journal].count("rewind") == 1
    rebuilt: list = []
    for entry in journal:
        if "apply_at_step" in entry:
            rebuilt = scheduled_with(rebuilt, entry)
    schedule = json.loads((run / "autolr.json").read_text())["schedule"]
    assert [e["seq"] for e in schedule] == [e["seq"] for e in rebuilt]
    rewind = next(e for e in journal if e["kind"] == "rewind")
    assert all(e["at"] is None or e["at"] < rewind["apply_at_step"] or e["seq"] >= rewind["seq"] for e in schedule)


def test_a_manual_set_survives_a_kill_at_the_row_it_was_adopted(tmp_path):
    """Regression (a helper's bug hunt): after a kill -9 the restart adopted an ``autolr set``
    at the row of the last state save, not where it was adopted; with a factor that moves
    without publishing (cosine with --min-change) the manual factor came out different and
    decisions were journaled again over the override. The adoption now saves the state."""
    from autolr.manual import set_manual
    from autolr.run import Run

    def run_of(root):
        settings = Settings(policies=parse_policy_options(("cosine:T_max=2000",)), base_lr=0.1, min_change=0.05)
        run = Run(root, settings, POLICIES, fsync=False)
        run.load()
        run.start()
        return run

    results = []
    for name in ("uninterrupted", "killed"):
        root = tmp_path / name
        root.mkdir()
        run, source = run_of(root), _Source(root / "metrics.jsonl")
        run.feed(source, _steps(0, 400))
        run.save()
        run.feed(source, _steps(400, 470))  # not saved: the flush comes every few seconds
        set_manual(root, lr=0.05)
        run.adopt_manual()
        position = run.rows  # where a restart's log reader resumes: the last save's
        if name == "killed":
            run = run_of(root)
            position = run.rows
        run.feed(source, _steps(position, 1400))
        results.append([(e["kind"], e["step"], e["scale"]) for e in read_journal(root)])
    assert results[0] == results[1]


def test_a_restart_that_lost_rows_matches_the_journal_from_where_it_resumes(tmp_path):
    """Regression (a helper's hunt): rows the job wrote into a log that was then rotated to a
    name no reader takes were gone for a restart after kill -9; the first decision it derived
    disagreed with the journal's next one, and every decision after it was journaled again
    (66 duplicates with a cosine schedule). The journal's decisions at earlier steps are
    taken as published; matching goes on from there."""
    run, _ = _run_of(tmp_path, policy=("cosine:T_max=1000",))
    source = _Source(tmp_path / "metrics.jsonl")
    run.feed(source, _steps(0, 50))
    run.save()
    run.feed(source, _steps(50, 70))  # published, not saved: then the kill
    restarted, _ = _run_of(tmp_path, policy=("cosine:T_max=1000",))
    restarted.feed(source, _steps(55, 80))  # rows 50-54 are gone
    steps = [e["step"] for e in read_journal(tmp_path) if e["kind"] == "decision"]
    assert steps == list(range(80)) and restarted.seq == read_journal(tmp_path)[-1]["seq"]


def test_set_on_the_watched_root_or_a_log_file_is_refused(tmp_path):
    """Regression (a helper's audit): ``autolr set runs --scale 0.5`` (the root, not a run)
    wrote a control file no job reads, silently; on a log file it said "no such run folder"."""
    from autolr.manual import ManualError, set_manual

    write_jsonl(tmp_path / "exp1" / "m.jsonl", flat_then_flat(range(3)))
    make_daemon(tmp_path)[0].run()
    with pytest.raises(ManualError, match=r"holds runs \(exp1\)"):
        set_manual(tmp_path, scale=0.5)
    write_jsonl(tmp_path / "sweep" / "lightning_logs" / "version_0" / "m.jsonl", flat_then_flat(range(3)))
    make_daemon(tmp_path)[0].run()
    with pytest.raises(ManualError, match=r"holds runs \(lightning_logs/version_0\)"):
        set_manual(tmp_path / "sweep", scale=0.5)
    with pytest.raises(ManualError, match="is a file: give its run folder"):
        set_manual(tmp_path / "exp1" / "m.jsonl", scale=0.5)
    assert not (tmp_path / "autolr.json").exists()
    set_manual(tmp_path / "exp1", scale=0.5)


@pytest.mark.parametrize("how", [{"scale": 0.3}, {"lr": 0.03}])
def test_a_rewind_to_before_a_manual_set_resumes_at_the_value_set(how):
    """Regression (a helper's audit): ``autolr set --scale 0.3`` after ten halvings (step 1009),
    then a resume at step 500: the set's factor (0.3 / 0.5^10), carried back onto the older
    checkpoints, gave 0.3 * 2^5 = 9.6 times the base LR there. The LR where the job resumes is
    the value set, later decisions continue from it, and a saved state does the same."""
    from autolr.engine import RunEngine
    from autolr.records import Record

    settings = Settings(policies=parse_policy_options(["step:step_size=100,gamma=0.5"]), base_lr=0.1)

    def feed(engine, steps):
        return [(d.step, d.scale, d.kind) for s in steps
                for d in engine.feed(Record({"loss": 1.0}, s, None), ["loss"])]

    engine = RunEngine(settings.chain(POLICIES))
    feed(engine, range(1010))
    engine.override(**how)
    assert engine.scale == pytest.approx(0.3)
    restored = RunEngine(settings.chain(POLICIES))
    restored.set_state(json.loads(json.dumps(engine.get_state(), allow_nan=True)))
    for e in (engine, restored):
        assert feed(e, range(500, 601)) == [(500, pytest.approx(0.3), "rewind"), (599, pytest.approx(0.15), "decision")]


def test_a_rewind_replaying_rows_past_a_manual_set_takes_it_at_its_row():
    """A rewind whose replay starts at a checkpoint from before an ``autolr set`` and ends after
    it takes the set at the row it was made: the state is that of a run that never went past
    the resume point (every decision after it as the uninterrupted run's)."""
    from autolr.engine import RunEngine
    from autolr.records import Record

    settings = Settings(policies=parse_policy_options(["step:step_size=5,gamma=0.9"]), base_lr=0.1)

    def feed(engine, steps):
        return [(d.step, round(d.scale, 12), d.kind) for s in steps
                for d in engine.feed(Record({"loss": 1.0}, s, None), ["loss"])]

    straight, resumed = RunEngine(settings.chain(POLICIES)), RunEngine(settings.chain(POLICIES))
    for engine in (straight, resumed):
        feed(engine, range(1030))  # a checkpoint at row 1024
        engine.override(scale=0.5)
    feed(straight, range(1030, 1040))
    feed(resumed, range(1030, 1200))
    assert [d[:2] for d in feed(resumed, [1040])] == [(1040, round(straight.scale, 12))]  # the rewind
    assert feed(resumed, range(1041, 1100)) == feed(straight, range(1040, 1100))


def test_a_set_adopted_within_a_read_saves_no_position_ahead_of_the_engine(tmp_path):
    """Regression (a helper's audit): without inotify the daemon adopts an ``autolr set`` when
    it feeds the next batch, after reading it; the adoption saved the state at once, with the
    read position past the batch and the engine before it. A crash then lost the batch's
    rows for good. The save waits for the end of the feed."""
    from autolr.manual import set_manual

    run, log = tmp_path / "run", tmp_path / "run" / "m.jsonl"
    policy = ("step:step_size=5,gamma=0.9",)
    write_jsonl(log, [{"step": s, "loss": 1.0} for s in range(30)])
    daemon, _ = make_daemon(tmp_path, policy=policy)
    daemon.discover()
    daemon.catch_up()
    daemon.flush()
    assert not daemon.runs[run].manual_by_events
    set_manual(run, scale=0.5)
    write_jsonl(log, [{"step": s, "loss": 1.0} for s in range(30, 60)])
    daemon.handle(log)  # then a crash: no flush
    state = json.loads((run / "autolr.state.json").read_text())
    assert state["rows"] == 60 and state["max_step"] == 59
    make_daemon(tmp_path, policy=policy)[0].run()  # the restart
    steps = [e["step"] for e in read_journal(run) if e["kind"] == "decision"]
    assert steps == list(range(4, 60, 5))
