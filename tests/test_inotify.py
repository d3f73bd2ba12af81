"""autolr's own inotify reader: batches of changed paths, own files filtered, new folders watched."""
from __future__ import annotations

import os
import struct
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")

from autolr.inotify import (IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_ISDIR, IN_MODIFY,  # noqa: E402
                            IN_MOVED_FROM, IN_MOVED_TO, IN_Q_OVERFLOW, InotifyWatcher)


class Collector:
    def __init__(self):
        self.paths: set[str] = set()
        self.overflows = 0
        self.cond = threading.Condition()

    def __call__(self, paths, overflowed, moved):
        with self.cond:
            self.paths |= paths
            self.overflows += overflowed
            self.cond.notify_all()

    def wait_for(self, path, timeout=5.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while str(path) not in self.paths:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True


@pytest.fixture
def watched(tmp_path):
    sink = Collector()
    watcher = InotifyWatcher(tmp_path, sink)
    watcher.start()
    yield tmp_path, sink, watcher
    watcher.stop()
    watcher.join(5)


def test_appends_new_folders_and_own_files(watched):
    root, sink, watcher = watched
    log = root / "a" / "m.jsonl"
    log.parent.mkdir()
    assert sink.wait_for(root / "a")
    log.write_text('{"step": 1}\n')  # in a folder created after the start: watched by now
    assert sink.wait_for(log)
    deep = root / "b" / "c" / "d"
    deep.mkdir(parents=True)  # created faster than the watches are added: walked, then watched
    assert sink.wait_for(root / "b")  # the daemon walks a reported folder: files made early are found
    deadline = time.monotonic() + 5
    while str(deep) not in watcher.wds and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(log, "a") as f:
        f.write('{"step": 2}\n')
    (deep / "x.csv").write_text("step\n1\n2\n")
    assert sink.wait_for(deep / "x.csv")
    for name in ("autolr.state.json", "autolr.lock", ".autolr-1.tmp"):
        (root / "a" / name).write_text("{}")
    (root / "a" / ".hidden.jsonl").write_text("{}\n")  # a hidden log is still a log (the rescan reads it too)
    marker = root / "a" / "after.jsonl"
    marker.write_text("")
    assert sink.wait_for(marker)
    reported = {os.path.basename(p) for p in sink.paths}
    assert not reported & {"autolr.state.json", "autolr.lock", ".autolr-1.tmp", "autolr.json"}
    assert ".hidden.jsonl" in reported
    # the journal or the control file changed (autolr set, or a publish): reported as the control file
    (root / "a" / "autolr.decisions.jsonl").write_text("{}\n")
    assert sink.wait_for(root / "a" / "autolr.json")
    assert "autolr.decisions.jsonl" not in {os.path.basename(p) for p in sink.paths}


def test_folder_moved_in_and_out(watched, tmp_path_factory):
    root, sink, watcher = watched
    outside = tmp_path_factory.mktemp("outside")
    (outside / "run").mkdir()
    (outside / "run" / "m.jsonl").write_text("")
    os.rename(outside / "run", root / "run")
    assert sink.wait_for(root / "run")
    (root / "run" / "m.jsonl").write_text('{"step": 1}\n')
    assert sink.wait_for(root / "run" / "m.jsonl")
    os.rename(root / "run", outside / "back")
    deadline = time.monotonic() + 5
    while str(root / "run") in watcher.wds and time.monotonic() < deadline:
        time.sleep(0.01)
    assert str(root / "run") not in watcher.wds


def test_parse_coalesces_and_flags_overflow(tmp_path):
    watcher = InotifyWatcher(tmp_path, lambda *a: None)
    watcher.paths[1] = str(tmp_path)

    def event(wd, mask, name=b""):
        padded = name + b"\0" * (-len(name) % 16) if name else b""
        return struct.pack("iIII", wd, mask, 0, len(padded)) + padded

    buf = b"".join([event(1, IN_MODIFY, b"m.jsonl")] * 5 + [event(1, IN_CREATE, b".autolr-x.tmp"),
                   event(1, IN_MODIFY, b"autolr.state.json"), event(1, IN_MODIFY, b"autolr.decisions.jsonl"),
                   event(1, IN_MOVED_TO, b"autolr.json"), event(-1, IN_Q_OVERFLOW), event(7, IN_MODIFY, b"z")])
    changed, overflow, moved = watcher.parse(buf)
    assert changed == {str(tmp_path / "m.jsonl"), str(tmp_path / "autolr.json")} and overflow
    assert moved == set()  # only in-place writes to the log; our own renames do not count
    watcher.add_tree = lambda path: None  # no real watches in this test
    changed, _, _ = watcher.parse(event(1, IN_CREATE | IN_ISDIR, b"new") + event(1, IN_CREATE | IN_ISDIR, b".autolr-x"))
    assert changed == {str(tmp_path / "new")}


def event(wd, mask, name=b""):
    padded = name + b"\0" * (-len(name) % 16) if name else b""
    return struct.pack("iIII", wd, mask, 0, len(padded)) + padded


def test_parse_tells_in_place_writes_from_moves(tmp_path):
    """Only paths written in place may skip the daemon's stat: anything that can change which
    file a path names (create, delete, rename, its folder moved) puts it in ``moved``."""
    watcher = InotifyWatcher(tmp_path, lambda *a: None)
    watcher.add_tree = watcher.remove_tree = lambda path: None  # no real watches in this test
    root, a, b = str(tmp_path), str(tmp_path / "a"), str(tmp_path / "b")
    watcher.paths.update({1: root, 2: a, 3: b})
    changed, _, moved = watcher.parse(b"".join([
        event(2, IN_MODIFY, b"w.jsonl"), event(2, IN_CLOSE_WRITE, b"w.jsonl"),  # written in place
        event(2, IN_MODIFY, b"r.jsonl"), event(2, IN_MOVED_TO, b"r.jsonl"),  # replaced by a rename
        event(2, IN_CREATE, b"c.csv"), event(2, IN_DELETE, b"d.csv"), event(2, IN_MOVED_FROM, b"f.csv"),
        event(2, IN_MOVED_TO, b"autolr.json"), event(2, IN_CREATE, b".autolr-tmp"),  # ours: no move
        event(3, IN_MODIFY, b"x.jsonl"), event(3, IN_DELETE_SELF),  # b's file, then b itself gone
    ]))
    files = {f"{a}/{n}" for n in ("w.jsonl", "r.jsonl", "c.csv", "d.csv", "f.csv", "autolr.json")}
    assert changed == files | {f"{b}/x.jsonl", b}
    assert moved == {f"{a}/r.jsonl", f"{a}/c.csv", f"{a}/d.csv", f"{a}/f.csv", f"{b}/x.jsonl"}
    # a folder moved away: every path under it in the batch is moved, its siblings are not
    changed, _, moved = watcher.parse(event(2, IN_MODIFY, b"w.jsonl") + event(1, IN_MODIFY, b"top.jsonl")
                                      + event(1, IN_MOVED_FROM | IN_ISDIR, b"a"))
    assert changed == {f"{a}/w.jsonl", f"{root}/top.jsonl", a} and moved == {f"{a}/w.jsonl"}


def test_start_fails_cleanly_without_root(tmp_path):
    watcher = InotifyWatcher(tmp_path / "missing", lambda *a: None)
    with pytest.raises(OSError):
        watcher.start()
    assert watcher.fd == -1


def test_symlink_cycle_is_walked_once(tmp_path):
    (tmp_path / "a").mkdir()
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    watcher = InotifyWatcher(tmp_path, lambda *a: None, follow_symlinks=True)
    watcher.start()
    try:
        assert set(watcher.paths.values()) == {str(tmp_path), str(tmp_path / "a")}  # the loop aliases the root
    finally:
        watcher.stop()
        watcher.join(5)


def test_inline_mode_is_polled_by_the_caller_and_woken(tmp_path):
    """threaded=False: no thread; poll_once() hands a batch over, wakeup() ends a wait early."""
    sink = Collector()
    watcher = InotifyWatcher(tmp_path, sink)
    watcher.start(threaded=False)
    try:
        assert watcher._thread is None
        assert watcher.poll_once(0.0) is False  # nothing yet
        (tmp_path / "m.jsonl").write_text("{}\n")
        assert watcher.poll_once(5.0) is True and str(tmp_path / "m.jsonl") in sink.paths
        waker = threading.Timer(0.2, watcher.wakeup)
        waker.start()
        t0 = time.monotonic()
        assert watcher.poll_once(30.0) is False
        assert time.monotonic() - t0 < 10
        waker.join()
    finally:
        watcher.stop()
        watcher.join(5)
    assert watcher.fd == -1


def test_a_symlinked_file_outside_the_watched_folders_reports_the_link(tmp_path):
    """watch_link: the target's own events come under the link's path; a re-pointed link moves
    the watch, and the old target's events stop."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    target, other = outside / "m.jsonl", outside / "n.jsonl"
    target.write_text(""), other.write_text("")
    link = root / "m.jsonl"
    os.symlink(target, link)
    sink = Collector()
    watcher = InotifyWatcher(root, sink, follow_symlinks=True)
    watcher.start()
    try:
        watcher.watch_link(str(link))
        with open(target, "a") as f:
            f.write('{"step": 0}\n')
        assert sink.wait_for(link)
        os.unlink(link)
        os.symlink(other, link)
        watcher.watch_link(str(link))
        assert list(watcher.links.values()) == [str(link)]


        def settle(name):  # one queue: once this file's event is in, every earlier one is
            (root / name).write_text("x")
            assert sink.wait_for(root / name)

        settle("s0.txt")
        sink.paths.clear()
        with open(other, "a") as f:
            f.write('{"step": 0}\n')
        assert sink.wait_for(link)
        settle("s1.txt")
        sink.paths.clear()
        with open(target, "a") as f:  # the old target is no longer watched
            f.write('{"step": 1}\n')
        settle("s2.txt")
        assert str(link) not in sink.paths
    finally:
        watcher.stop()
        watcher.join(5)
