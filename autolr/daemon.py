"""``autolr watch``: watch a tree of runs, tail their logs, decide and publish.

The event side only enqueues paths: on Linux autolr's own inotify reader (``inotify.py``:
many events per read, one set of paths per batch), which the worker (the main thread) polls
itself between batches, so no second thread competes for the interpreter; elsewhere, or when
it cannot start, watchdog's observer thread. The worker reads each changed file from its stored
position, so duplicate, coalesced or dropped events do no harm; a slow rescan runs as a safety
net. ``--poll`` uses watchdog's polling observer (NFS, SMB, Lustre); the daemon falls back to
it by itself when the inotify limits are reached.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import Config
from .control import CONTROL_NAME, atomic_write_json, path_identity, read_json
from .inotify import alias_inside
from .readers import is_own_file, reader_for
from .readers.base import Reader, TextTailer
from .run import Run

log = logging.getLogger("autolr.daemon")

_CONTROL_SUFFIX = "/" + CONTROL_NAME
#: Under load (the last batch held BUSY_BATCH paths or more: many runs writing) a batch is
#: handled GATHER s after the previous one at the soonest, so that each wakeup reads more logs:
#: at 1000 runs x 10 rows/s this took a sixth off the worker's CPU. A few runs never wait.
BUSY_BATCH = 32
GATHER = 0.02
SOURCES_STATE = ".autolr-sources.json"  # read positions of sources that feed several runs
DAEMON_LOCK = ".autolr-daemon.lock"  # held (flock) by the daemon watching its folder; holds its pid
#: State files the periodic flush writes a second at most. A save is a file created and renamed
#: (~0.3 ms of kernel time on ext4 when spread over many folders, more while logs are being
#: written): with 1000 runs, saving each every 2 s took 15 % of a core, 50 a second still 6 %.
#: Saves go oldest first in small slices (every SAVE_TICK s) so the worker never stalls for long;
#: with up to 50 runs each dirty run is still saved every ``flush`` s, with 1000 every 40 s. The
#: journal keeps every decision meanwhile; a restart re-reads the rows since the last save.
MAX_SAVES_PER_SECOND = 25
SAVE_TICK = 0.25
#: Seconds a live run's journal must look ahead of its log, read to its end, before it is taken
#: for another log's (Run.check_journal_ahead): a folder copied in, journal first, is read while
#: the copy of its log is under way.
AHEAD_SETTLE = 10.0
#: Seconds one log is read in a row while live before the others get their turn (a large
#: log copied in must not hold back the decisions of every other run).
READ_SLICE = 0.05
#: Files that left their path, remembered this many seconds (and at most MAX_DEPARTED of them)
#: for a rename that shows up later: the rescan finds a new name within ``--rescan`` seconds.
DEPARTED_FOR = 300.0
MAX_DEPARTED = 256
#: Seconds a vanished control file or a run whose logs all vanished waits before the daemon
#: writes in its folder again: ``rm -rf`` of a run folder deletes its files one by one, and a
#: file written back meanwhile would make the folder reappear (and the rm fail).
SETTLE = 0.5


@dataclass
class Options:
    poll: float | None = None  # seconds between polls; None: inotify
    once: bool = False
    follow_symlinks: bool = False
    rescan: float = 30.0
    flush: float = 2.0
    fsync: bool = True
    native_inotify: bool = True  # Linux: autolr's own inotify reader; False: watchdog's


class DaemonLocked(RuntimeError):
    """Another daemon watches this root, a folder above it or a folder inside it."""


def take_daemon_lock(root: Path) -> int | None:
    """Lock ``root`` for one daemon (``flock`` on ``root/.autolr-daemon.lock``, released when
    the process ends, even by kill -9); return the descriptor to keep. DaemonLocked when a
    daemon holds it, or holds the lock of a folder above or inside (their runs would be tuned
    twice: every decision journaled twice). None, with a warning, where no lock can be taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX)
        return None
    for folder in root.parents:
        if not (folder / DAEMON_LOCK).exists():
            continue
        with contextlib.suppress(OSError):
            fd = os.open(folder / DAEMON_LOCK, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DaemonLocked(f"autolr watch {folder} (pid {_pid_in(fd)}) already watches {root}") from None
            finally:
                os.close(fd)
    try:
        fd = os.open(root / DAEMON_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        log.warning("%s: cannot take the daemon lock (%s); nothing stops a second daemon here", root, exc)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _pid_in(fd)
        os.close(fd)
        raise DaemonLocked(f"another autolr watch (pid {pid}) already watches {root}; stop it first") from None
    below = _daemon_below(root)
    if below is not None:
        os.close(fd)
        raise DaemonLocked(f"autolr watch {below[0]} (pid {below[1]}) already watches a folder inside {root}; "
                           "stop it first") from None
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _daemon_below(root: Path) -> tuple[Path, str] | None:
    """(folder, pid) of a daemon holding the lock of a folder inside ``root``: one walk of the
    tree at start (symlinks not followed), before anything is written."""
    import fcntl

    for folder, _, files in os.walk(root, onerror=lambda exc: None):
        if DAEMON_LOCK not in files or folder == os.fspath(root):
            continue
        with contextlib.suppress(OSError):
            fd = os.open(os.path.join(folder, DAEMON_LOCK), os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return Path(folder), _pid_in(fd)
            finally:
                os.close(fd)
    return None


def _pid_in(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0).strip()))
    return "unknown"


def _tail_identity(state: Any) -> tuple[int, int] | None:
    """The (device, inode) a saved reader state's TextTailer read, if it has one."""
    try:
        ident = state["tail"]["identity"]
        return (int(ident[0]), int(ident[1])) if ident else None
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _age(path: Path) -> tuple[float, str]:
    """Sort key: modification time (a vanished file first), then the name."""
    try:
        return path.stat().st_mtime, path.name
    except OSError:
        return 0.0, path.name


class Daemon:
    """Watches ``root``; ``run()`` blocks until stopped (or, with ``once``, until caught up)."""

    def __init__(self, root: Path, config: Config, overrides: dict[str, Any], policies: dict[str, type],
                 readers: dict[str, type], options: Options | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None):
        self.root = Path(root).resolve()
        self.config = config
        self.overrides = overrides
        self.policies = policies
        self.readers = readers
        self.options = options or Options()
        self.on_event = on_event or (lambda kind, data: None)
        self.runs: dict[Path, Run] = {}
        self.sources: dict[Path, Reader] = {}
        self.ignored: dict[Path, str] = {}  # second log kinds of a run (the same metrics again)
        self.saved_sources: dict[Path, dict[str, dict]] = {}
        # (device, inode) -> (time, run folder, reader name, state) of files that left their
        # path (renamed away by a log rotation): found under a new name, read on from there
        self.departed: OrderedDict[tuple[int, int], tuple[float, Path, str, dict]] = OrderedDict()
        # path -> (time, tailer holding the kept descriptor) of departed files renamed to a name
        # no reader takes (logrotate: train.jsonl.1): its writer may add rows to it before it
        # reopens the path; the next reader of the path reads them first (_take_behind)
        self.behind: OrderedDict[Path, tuple[float, TextTailer]] = OrderedDict()
        self._links_said: set[Path] = set()  # symlinks out of the root, reported once each
        self.multi_state: dict[str, Any] = {}
        self._multi_saved_at = 0.0
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.pending: set[str] = set()
        self.moved: set[str] = set()  # pending paths that may name another file than last read
        self.overflowed = False  # the event queue overflowed: rescan everything
        self._paths: dict[str, Path] = {}  # Path objects of event paths, built once
        self.by_dir: defaultdict[Path, set[Path]] = defaultdict(set)  # sources per folder
        self.run_for: dict[Path, Run] = {}  # the run of each single-run source, looked up once
        self.lock = threading.Lock()
        self.observer = None
        self.inline = None  # our inotify watcher, polled by the worker itself (no event thread)
        self._last_drain = 0.0  # time.monotonic() of the last batch, and its size
        self._last_batch = 0
        self.native_events = False  # our inotify reader runs: it reports control-file changes
        self.mode = "once" if self.options.once else ("poll" if self.options.poll else "inotify")
        self.errors: defaultdict[str, int] = defaultdict(int)
        # New folders are walked again shortly after their creation event: files created in
        # them before the observer watched them send no event of their own.
        self.rechecks: list[tuple[float, Path]] = []
        # run folders whose control file vanished: written again from the journal at this time
        self.restores: dict[Path, float] = {}
        # runs whose logs all vanished: their state is saved at this time if their folder is left
        self.closing: dict[Path, tuple[float, Run]] = {}
        self.catching_up = False
        self._progress = (0.0, 0, 0.0)  # (start, rows, last report) while catching up
        self._catch_up_saved = time.monotonic()

    # ---- discovery -----------------------------------------------------------------------
    def inside_root(self, path: Path) -> bool:
        if self.options.follow_symlinks:
            return True
        try:
            inside = Path(os.path.realpath(path)).is_relative_to(self.root)
        except OSError:
            return False
        if not inside:
            self._skipped_link(path)
        return inside

    def _skipped_link(self, path: Path) -> None:
        """Say once per path that a symlink leading out of the root is not followed (a run
        folder linked to scratch space would otherwise vanish without a word)."""
        if path not in self._links_said and len(self._links_said) < 1000:
            self._links_said.add(path)
            log.warning("%s leads out of the watched root (to %s): not followed; --follow-symlinks follows it",
                        path, os.path.realpath(path))

    def discover(self, folder: Path | None = None) -> list[Path]:
        """Walk ``folder`` (default the root), add every recognised log not yet known; return them."""
        folder = folder or self.root
        found: list[Path] = []
        seen_dirs: set[str] = set()
        follow = self.options.follow_symlinks
        real_root = os.path.realpath(self.root) + "/"
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=follow, onerror=lambda e: None):
            real = os.path.realpath(dirpath)
            if real in seen_dirs or not self.inside_root(Path(dirpath)):
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            # Hidden folders (.git, .venv, .cache, our .autolr*) are not runs; a followed symlink
            # to a folder inside the root is walked where it lies (W&B's latest-run).
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                 and not (follow and alias_inside(os.path.join(dirpath, d), real_root)))
            if not follow:  # (os.walk does not enter them: say so for those leading out)
                for d in dirnames:
                    link = os.path.join(dirpath, d)
                    if os.path.islink(link):
                        self.inside_root(Path(link))
            candidates = [p for name in filenames
                          if (p := Path(dirpath) / name) not in self.sources and self._reader_class(p)]
            for path in sorted(candidates, key=_age):  # oldest first: a requeued job's log after the first
                if self.consider(path) is not None:
                    found.append(path)
        return found

    def _in_hidden_folder(self, path: Path) -> bool:
        """Below a hidden folder of the root (an event from one: watchdog watches them all)."""
        try:
            parts = path.parent.relative_to(self.root).parts
        except ValueError:
            return False
        return any(part.startswith(".") for part in parts)

    def _reader_class(self, path: Path) -> type | None:
        """The reader for ``path`` by the cheap checks first (its name: hidden, our own,
        ignored; the readers' own), before any ``realpath``: a tree of many other files."""
        if is_own_file(path) or path.name.startswith(".") or path in self.ignored:
            return None
        return reader_for(path, self.readers)

    def consider(self, path: Path) -> Reader | None:
        """Add ``path`` as a source if a reader recognises it."""
        cls = self._reader_class(path)
        if cls is None or self._in_hidden_folder(path) or not self.inside_root(path):
            return None
        try:
            reader = cls(path)
        except Exception as exc:
            self.count(f"reader {cls.name} failed to open", path, exc)
            return None
        if getattr(cls, "multi_run", False):
            saved = self.multi_state.get(str(path))
            if saved and saved.get("reader") == cls.name:
                with contextlib.suppress(Exception):
                    reader.set_state(saved["state"])
        else:
            try:
                run = self.open_run(cls.run_dir(path))
            except Exception as exc:  # one run's damaged files never stop the daemon (or its start)
                reader.close()
                self.count("run failed to open", path, exc)
                return None
            kind = next((r for r in run.sources.values() if not getattr(r, "companion", False)), None)
            if kind is not None and kind.name != reader.name and not getattr(cls, "companion", False):
                # Lightning's CSV beside its event files, W&B's output.log beside run-*.wandb:
                # the same metrics twice would double every observation. One kind per run
                # (besides a companion: a callback's fit starts, which carry no metric).
                if getattr(kind, "priority", 0) >= cls.priority or run.rows:
                    self.ignored[path] = kind.name
                    self.on_event("ignored", {"path": str(path), "reader": cls.name, "kept": kind.name})
                    return None
                for old in [p for p, r in run.sources.items() if not getattr(r, "companion", False)]:
                    self.ignored[old] = reader.name
                    self._forget_source(old)
                    run.sources.pop(old)
                    self.on_event("ignored", {"path": str(old), "reader": kind.name, "kept": reader.name})
            # taken once: later the live reader (or the departed list) knows better
            saved = self.saved_sources.get(run.folder, {}).pop(str(path), None)
            at_start = saved is not None
            if saved is None and (run.sources or self.departed or self.saved_sources.get(run.folder)):
                saved = self._renamed_to(path, reader, run)
            run.add_source(reader, saved)
            self._take_behind(path, reader, run)
            if at_start:
                self._reopen_moved(path, reader)
        self.sources[path] = reader
        self._paths[os.fspath(path)] = path  # events then look it up by this very object (no __eq__)
        self.watch_link(path)
        self.by_dir[path.parent].add(path)
        self.on_event("source", {"path": str(path), "reader": cls.name})
        return reader

    def _renamed_to(self, path: Path, reader: Reader, run: Run) -> dict[str, Any] | None:
        """The saved state for ``path`` when it is a log of ``run`` renamed from another name
        (rotation: ``train.log`` -> ``train.1.log``), so it is not read again from its start."""
        identity = path_identity(path)
        found = self.departed.pop(identity, None) if identity else None
        if found is not None:
            when, folder, name, state = found
            if folder != run.folder or name != reader.name or time.monotonic() - when > DEPARTED_FOR:
                return None
        else:  # its old name not read since the rename (by this daemon, or by the last one)
            saved = [(r.path, r.get_state(), r) for r in run.sources.values()  # live readers first
                     if r.name == reader.name and r.file_identity() == identity]
            saved += [(Path(p), v["state"], None) for p, v in self.saved_sources.get(run.folder, {}).items()
                      if isinstance(v, dict) and v.get("reader") == reader.name and _tail_identity(v.get("state")) == identity]
            moved = [(state, r) for old, state, r in saved if old != path and path_identity(old) != identity]
            if not moved:
                return None
            state = moved[0][0]
            for _, r in moved:  # the file is read under its new name from now on
                if r is not None:
                    r.tailer.hand_over()
        log.info("%s: a renamed log (same file); reading on from where it was", path)
        return {"reader": reader.name, "state": state}

    def _reopen_moved(self, path: Path, reader: Reader) -> None:
        """The saved position is in a file ``path`` no longer names, rotated while no daemon
        ran (or before this one read its last rows) to a name no reader takes: its rest is read
        first, then the new file (``TextTailer.reopen_moved``)."""
        tailer = getattr(reader, "tailer", None)
        if isinstance(tailer, TextTailer) and not getattr(reader, "multi_run", False):
            moved = tailer.reopen_moved(lambda p: self._reader_class(p) is not None)
            if moved is not None:
                log.info("%s: the file read before is %s now; reading its last rows first", path, moved.name)

    def _depart(self, reader: Reader, identity: tuple[int, int] | None, state: dict[str, Any]) -> None:
        """Remember a file that left ``reader``'s path, in case it shows up under another name."""
        tailer = getattr(reader, "tailer", None)
        if identity is None or getattr(reader, "multi_run", False) or getattr(tailer, "handed_over", False):
            return  # (handed over: its file is read under its new name already)
        self.departed[tuple(identity)] = (time.monotonic(), reader.run_dir(reader.path), reader.name, state)
        while len(self.departed) > MAX_DEPARTED:
            self.departed.popitem(last=False)

    def _keep_behind(self, path: Path, reader: Reader) -> None:
        """``path`` is gone and its file read to its end: keep the descriptor of the file if it
        was renamed away (not deleted), for the rows its writer still adds (``_take_behind``)."""
        tailer = getattr(reader, "tailer", None)
        kept = tailer.detach() if isinstance(tailer, TextTailer) and not getattr(reader, "multi_run", False) else None
        if kept is None:
            return
        old = self.behind.pop(path, None)
        if old is not None:
            old[1].close()
        self.behind[path] = (time.monotonic(), kept)
        while len(self.behind) > MAX_DEPARTED:
            self.behind.popitem(last=False)[1][1].close()

    def _take_behind(self, path: Path, reader: Reader, run: Run) -> None:
        """A new log under the name a file was renamed away from (``_keep_behind``): the new
        reader reads on in the old file through the kept descriptor first (the rows its writer
        added after the rename), then the new file, as when the rename is seen while the source
        lives. Only while that file is not read under another name, within DEPARTED_FOR."""
        entry = self.behind.pop(path, None)
        if entry is None:
            return
        when, kept = entry
        tailer = getattr(reader, "tailer", None)
        found = self.departed.get(kept.fd_identity)
        if (found is not None and found[1] == run.folder and found[2] == reader.name
                and time.monotonic() - when <= DEPARTED_FOR and isinstance(tailer, TextTailer)
                and tailer.identity in (None, kept.fd_identity)):
            with contextlib.suppress(Exception):
                reader.set_state(found[3])  # where the old reader stopped in that file
                if tailer.adopt(kept):
                    del self.departed[kept.fd_identity]  # the new reader reads it: it departs again from there
        kept.close()

    def open_run(self, folder: Path) -> Run:
        folder = Path(folder)
        run = self.runs.get(folder)
        if run is not None:
            return run
        self._close(folder)  # a log again in a run folder that lost its logs: the new Run loads its state
        try:
            rel = str(folder.relative_to(self.root))
        except ValueError:
            rel = str(folder)
        settings = self.config.for_run(rel).merged(self.overrides)
        created = not folder.is_dir()  # an MLflow run kept in a database has no folder of its own
        folder.mkdir(parents=True, exist_ok=True)
        run = Run(folder, settings, self.policies, fsync=self.options.fsync,
                  on_decision=lambda r, rec: self.on_event("decision", {"run": str(r.folder), **rec}),
                  create_folder=created)
        run.manual_by_events = self.native_events
        self.saved_sources[folder] = run.load()
        self.runs[folder] = run
        run.start()
        self.on_event("run", {"run": str(folder), "control": str(run.writer.path),
                              "policy": run.engine.chain.names, "restored": run.restored})
        return run

    # ---- reading -------------------------------------------------------------------------
    def process(self, path: Path, in_place: bool = False) -> None:
        """Read what is new in source ``path`` and feed it to its run(s).

        ``in_place``: inotify saw only writes to the file since the last read (no create,
        delete or rename of it or its folders), so the reader may skip its ``stat``."""
        reader = self.sources.get(path)
        if reader is None:
            return
        if in_place:
            reader.assume_in_place()
        multi = getattr(reader, "multi_run", False)
        deadline = None if self.catching_up else time.monotonic() + READ_SLICE
        while True:
            records = self._read_source(path, reader)
            if records is None:
                return
            if records:
                if multi:
                    groups: dict[str | None, list] = defaultdict(list)
                    for rec in records:
                        groups[rec.run].append(rec)
                    for run_id, group in groups.items():
                        self.open_run(reader.folder_for(run_id)).feed(reader, group)
                    self.multi_state[str(path)] = {"reader": reader.name, "state": reader.get_state()}
                else:
                    run = self.run_for.get(path)
                    if run is None:
                        run = self.run_for[path] = self.runs[reader.run_dir(path)]
                    run.feed(reader, records)
            if self.catching_up and records:
                self._report_progress(len(records))
                self._save_while_catching_up()
            if not reader.more or self.stop_event.is_set():
                if not multi and not self.catching_up and not reader.more:
                    run = self.run_for.get(path)
                    if run is not None and run.pending and run.logs() == 1:
                        run.check_journal_ahead(settle=AHEAD_SETTLE)  # (its only log read to its end)
                break
            if deadline is not None and time.monotonic() > deadline:
                self._requeue(path)  # the rest after the other logs' turn
                break

    def _requeue(self, path: Path) -> None:
        with self.lock:
            self.pending.add(os.fspath(path))
        self.wake.set()

    def _save_while_catching_up(self) -> None:
        """Save the runs' state every ``flush`` seconds of a long catch-up (between reads, where
        every run has taken what its readers read): a stop or crash then does not start over."""
        now = time.monotonic()
        if now - self._catch_up_saved >= self.options.flush:
            self._catch_up_saved = now
            self.flush(budget=max(1, round(MAX_SAVES_PER_SECOND * self.options.flush)))

    def _forget_source(self, path: Path) -> Reader | None:
        reader = self.sources.pop(path, None)
        self.run_for.pop(path, None)
        known = self.by_dir.get(path.parent)
        if known is not None:
            known.discard(path)
            if not known:
                del self.by_dir[path.parent]
        if reader is not None:
            reader.close()  # its kept file descriptor
        return reader

    def drop_source(self, path: Path) -> None:
        reader = self._forget_source(path)
        if reader is None:
            return
        with contextlib.suppress(Exception):
            self._depart(reader, reader.file_identity(), reader.get_state())
        self.on_event("vanished", {"path": str(path)})
        if getattr(reader, "multi_run", False):
            return
        folder = reader.run_dir(path)
        run = self.runs.get(folder)
        if run is None:
            return
        run.sources.pop(path, None)
        if not run.sources:
            del self.runs[folder]
            self.restores.pop(folder, None)
            self.closing[folder] = (time.monotonic() + SETTLE, run)  # saved unless its folder goes too
            self.on_event("dropped", {"run": str(folder)})

    def handle(self, path: Path, in_place: bool = False) -> None:
        """React to a path the observer reported (or a rescan found); ``in_place``: see process()."""
        if path in self.sources:
            if not in_place:
                self.watch_link(path)  # a link re-pointed, or its target replaced
            self.process(path, in_place)
            return
        if path.name == CONTROL_NAME and path.parent in self.runs:
            self._control_changed(self.runs[path.parent])
            return
        if is_own_file(path):
            return
        if path.is_dir():
            if self.inside_root(path):
                for p in [p for p in self.by_dir.get(path, ()) if not p.exists()]:
                    self.drop_source(p)  # renamed or deleted away
                for p in self.discover(path):  # files already known have events of their own
                    self.process(p)
                now = time.monotonic()
                if not any(p == path for _, p in self.rechecks):
                    self.rechecks += [(now + 0.5, path), (now + 2.0, path)]
            return
        if path.is_file():  # not a known log (those are handled above): perhaps a new one
            if self.consider(path) is not None:
                self.process(path)
            return
        gone = [p for p in self.sources if p.is_relative_to(path)]  # O(logs): a vanished path only
        for p in gone:  # a folder moved away or deleted
            if not p.exists():
                self.drop_source(p)

    def _control_changed(self, run: Run) -> None:
        """A control file written (``autolr set``: adopt it) or deleted (write it again from
        the journal, so the training loop keeps its LR)."""
        run.adopt_manual()
        if run.seq and run.folder not in self.restores and not run.writer.path.exists():
            self.restores[run.folder] = time.monotonic() + SETTLE  # unless the whole folder goes

    def _restore(self, folder: Path) -> None:
        run = self.runs.get(folder)
        if run is None or not run.folder_unchanged() or run.writer.path.exists():
            return  # (the run folder deleted: its logs' delete events drop the run)
        try:
            if run.writer.repair(schedule=run.schedule) is not None:
                log.info("%s: control file deleted; written again from the journal", folder)
        except OSError as exc:
            self.count("control write failed", folder, exc)

    def _close(self, folder: Path) -> None:
        """Save the state of a run whose logs all vanished, unless its folder went with them."""
        _, run = self.closing.pop(folder, (0.0, None))
        if run is not None and run.folder_unchanged():  # (not a new folder of the same name)
            run.save()

    def settle(self, now: float) -> None:
        """What waits for a time: new folders walked again, deleted control files restored,
        state saved for runs whose logs all vanished."""
        for entry in [e for e in self.rechecks if e[0] <= now]:
            self.rechecks.remove(entry)
            if entry[1].is_dir():
                for p in self.discover(entry[1]):
                    self.process(p)
        for folder in [f for f, t in self.restores.items() if t <= now]:
            del self.restores[folder]
            self._restore(folder)
        for folder in [f for f, (t, _) in self.closing.items() if t <= now]:
            self._close(folder)
        for path in [p for p, (t, kept) in self.behind.items()
                     if now - t > DEPARTED_FOR or kept.fd_identity not in self.departed]:
            self.behind.pop(path)[1].close()  # its time is up, or it is read under another name

    def _next_settle(self) -> float:
        return min([math.inf, *(t for t, _ in self.rechecks), *self.restores.values(),
                    *(t for t, _ in self.closing.values())])

    def watch_link(self, path: Path) -> None:
        """A symlinked log: watch the file it leads to (inotify reports changes under the
        target's own path, in a folder that may not be watched at all)."""
        if self.native_events and path.is_symlink():
            self.observer.watch_link(os.fspath(path))

    def catch_up(self) -> None:
        """Read every known source to its end; vanished ones are dropped. A run whose files
        lie in several folders (add_scalars, Keras's train/ and validation/) has them read
        together and merged by step (:meth:`catch_up_merged`)."""
        side_by_side: dict[Path, dict[str, list[Path]]] = {}
        folder_of: dict[Path, Path] = {}
        for path, reader in self.sources.items():
            run = None if getattr(reader, "multi_run", False) else self.runs.get(reader.run_dir(path))
            if run is not None:
                folder_of[path] = run.folder
                side_by_side.setdefault(run.folder, {}).setdefault(run.lane_of(reader), []).append(path)
        merged = {folder: lanes for folder, lanes in side_by_side.items() if len(lanes) > 1}
        done: set[Path] = set()
        for path in list(self.sources):
            if self.stop_event.is_set():
                return
            if path in done:
                continue
            folder = folder_of.get(path)
            try:
                if folder in merged:
                    lanes = merged.pop(folder)
                    done.update(p for paths in lanes.values() for p in paths)
                    self.catch_up_merged(self.runs[folder], list(lanes.values()))
                else:
                    self.process(path)
            except Exception as exc:  # one run's failure must not stop the others (or the start)
                self.count("unexpected error", path, exc)
        if self.catching_up:  # (a rescan's reads stop at their time slice: the rest comes later)
            for run in list(self.runs.values()):
                if run.pending and not any(r.more for r in run.sources.values()):  # its logs read to their end
                    run.check_journal_ahead()

    def catch_up_merged(self, run: Run, lanes: list[list[Path]]) -> None:
        """Catch ``run`` up on files written side by side, one list of files per folder (each
        in the order they were written): a k-way merge by step. A folder's next rows are read
        once its queue is empty; rows go out, smallest step first, up to the lowest last step
        among folders with more to read (a folder read to its end holds nothing back)."""
        engine = run.engine
        queues: list[deque] = [deque() for _ in lanes]
        todo = [list(paths) for paths in lanes]
        more = [True] * len(lanes)
        while not self.stop_event.is_set():
            for i, paths in enumerate(todo):
                while more[i] and not queues[i]:
                    if not paths:
                        more[i] = False
                        break
                    path = paths[0]
                    reader = self.sources.get(path)
                    records = self._read_source(path, reader) if reader is not None else None
                    if records is None or not reader.more:
                        paths.pop(0)  # this file is read to its end: the folder's next one
                    if records:
                        columns = tuple(reader.columns())
                        queues[i].extend((r, reader, columns) for r in records)
                        if self.catching_up:
                            self._report_progress(len(records))
            if not any(queues):
                return
            open_keys = [engine.key_of(q[-1][0]) for i, q in enumerate(queues) if more[i] and q]
            limit = min((k for k in open_keys if k is not None), default=None)
            picked: list[tuple] = []
            while True:
                heads = [(engine.key_of(q[0][0]), i) for i, q in enumerate(queues) if q]
                if not heads:
                    break
                key, i = min(heads, key=lambda h: (-math.inf if h[0] is None else h[0], h[1]))
                if limit is not None and key is not None and key > limit:
                    break
                picked.append(queues[i].popleft())
                if more[i] and not queues[i]:
                    break  # that folder must be read further before anything later goes out
            for (_, reader), group in itertools.groupby(picked, key=lambda x: (x[2], x[1])):
                run.feed(reader, [r for r, _, _ in group])

    def _read_source(self, path: Path, reader: Reader) -> list | None:
        """One read of source ``path``; None when it is gone (dropped) or failed (counted)."""
        try:
            records = reader.read()
        except Exception as exc:  # a reader bug must never kill the daemon
            if not os.path.exists(path):
                self.drop_source(path)
            else:
                self.count(f"reader {reader.name} error", path, exc)
            return None
        if reader.left_behind is not None:  # the path names another file now
            self._depart(reader, *reader.left_behind)
            reader.left_behind = None
        if not records and not reader.more and not os.path.exists(path):
            self._keep_behind(path, reader)  # (its kept file was read to its end just now)
            self.drop_source(path)  # checked only when nothing came: one stat less per row
            return None
        return records

    def _report_progress(self, rows: int) -> None:
        """A progress line at most once a second while reading large existing logs."""
        start, total, last = self._progress
        now = time.monotonic()
        total += rows
        if now - last >= 1.0:
            self.on_event("progress", {"rows": total, "rate": total / max(now - start, 1e-9)})
            last = now
        self._progress = (start, total, last)

    def rescan(self) -> None:
        """The safety net: new logs, unread rows and manual overrides that sent no event."""
        for run in list(self.runs.values()):
            try:
                self._control_changed(run)
            except Exception as exc:  # one run's unreadable files never stop the others
                self.count("unexpected error", run.folder, exc)
        self.discover()
        self.catch_up()

    # ---- persistence ---------------------------------------------------------------------
    def load_multi_state(self) -> None:
        with contextlib.suppress(Exception):
            data = read_json(self.root / SOURCES_STATE, 64 << 20)
            if isinstance(data, dict):
                self.multi_state = data

    def flush(self, budget: int | None = None) -> None:
        """Retry refused publishes; save the dirty runs' state (``budget``: at most that many,
        only runs unsaved for ``flush`` s, the longest unsaved first)."""
        runs = list(self.runs.values())
        for run in runs:
            run.retry()
        if budget is None:
            due = [r for r in runs if r.dirty]
        else:
            before = time.monotonic() - self.options.flush
            due = sorted((r for r in runs if r.dirty and r.saved_at <= before), key=lambda r: r.saved_at)[:budget]
        for run in due:
            run.save()
        now = time.monotonic()
        if budget is not None and now - self._multi_saved_at < self.options.flush:
            return
        self._multi_saved_at = now
        if self.multi_state:
            with contextlib.suppress(OSError, ValueError):
                atomic_write_json(self.root / SOURCES_STATE, self.multi_state, fsync=self.options.fsync, allow_nan=True)

    # ---- the loop ------------------------------------------------------------------------
    def enqueue(self, path: str | bytes) -> None:
        """Called from the observer thread: only records the path."""
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        name = os.path.basename(path)
        if name.startswith(".autolr") or (is_own_file(Path(path)) and name != CONTROL_NAME):
            return
        with self.lock:
            self.pending.add(path)
            self.moved.add(path)  # watchdog's events are not told apart: always stat
        self.wake.set()

    def enqueue_many(self, paths: set[str], overflowed: bool = False, moved: set[str] | None = None) -> None:
        """Called by our inotify reader (in the worker, or its thread) with one batch of changed
        paths (already filtered);
        ``moved``: those that may name another file now (None: all of them)."""
        with self.lock:
            self.pending |= paths
            self.moved |= paths if moved is None else moved
            self.overflowed |= overflowed
        self.wake.set()

    def _gather(self) -> None:
        """Under load, let more events come before the next batch (see BUSY_BATCH)."""
        wait = self._last_drain + GATHER - time.monotonic()
        if self._last_batch >= BUSY_BATCH and wait > 0 and not self.stop_event.is_set():
            time.sleep(wait)
            self.inline.poll_once(0.0)

    def drain(self) -> None:
        """Handle every path enqueued since the last drain, each once, in path order."""
        self._last_drain = time.monotonic()
        with self.lock:
            batch, self.pending = self.pending, set()
            self._last_batch = len(batch)
            moved, self.moved = self.moved, set()
            overflowed, self.overflowed = self.overflowed, False
        self.wake.clear()
        if overflowed:
            log.warning("the inotify queue overflowed; rescanning every log")
            self.rescan()
        cache = self._paths
        if len(cache) > 100_000:
            cache.clear()
        # Control files first: a manual override is adopted before the rows that follow it.
        controls = [n for n in batch if n.endswith(_CONTROL_SUFFIX)]
        if controls:
            batch.difference_update(controls)
            controls.sort()
        for name in controls + sorted(batch):
            if self.stop_event.is_set():
                return
            path = cache.get(name)
            if path is None:
                path = cache[name] = Path(name)
            try:
                self.handle(path, name not in moved)
            except Exception as exc:  # never die on a log
                self.count("unexpected error", path, exc)

    def start_observer(self) -> None:
        from watchdog import events as ev
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        daemon = self

        class Handler(ev.FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return  # reads (ours included) are not changes
                daemon.enqueue(event.src_path)
                dest = getattr(event, "dest_path", None)
                if dest:
                    daemon.enqueue(dest)

        # Only changes. Opens and plain closes would make every read of ours an event (a busy
        # loop); moves are left out because watchdog holds a move-from for up to 0.5 s waiting
        # for its move-to, stalling every event behind it, and the daemon's own atomic renames
        # make them all the time. A log that arrives by rename is found by the folder's
        # modification event or the rescan; `autolr set` is adopted before the next decision.
        wanted = [ev.FileCreatedEvent, ev.FileModifiedEvent, ev.FileDeletedEvent, ev.FileClosedEvent,
                  ev.DirCreatedEvent, ev.DirDeletedEvent, ev.DirModifiedEvent]

        def start(observer) -> None:
            observer.schedule(Handler(), str(self.root), recursive=True, event_filter=wanted)
            observer.start()
            self.observer = observer

        if self.options.poll:
            start(PollingObserver(timeout=self.options.poll))
            return
        try:
            if self.options.native_inotify and sys.platform.startswith("linux"):
                try:
                    self.start_native()
                    return
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EMFILE, errno.ENFILE):
                        raise
                    log.warning("own inotify reader unavailable (%s); using watchdog's", exc)
            start(Observer())
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EMFILE, errno.ENFILE):
                raise
            log.warning("inotify limit reached (%s): falling back to polling every 1 s. Raise "
                        "fs.inotify.max_user_watches / max_user_instances to use inotify.", exc)
            self.mode = "poll (inotify limit)"
            start(PollingObserver(timeout=1.0))

    def start_native(self) -> None:
        """autolr's own inotify reader (Linux): batches of changed paths, coalesced per file."""
        from .inotify import InotifyWatcher

        watcher = InotifyWatcher(self.root, self.enqueue_many, follow_symlinks=self.options.follow_symlinks)
        watcher.start(threaded=False)  # the loop in run() polls it: no thread to hand the lock to
        self.observer = self.inline = watcher
        self.mode = "inotify"
        self.native_events = True
        for run in self.runs.values():
            run.manual_by_events = True

    def stop(self, *_: Any) -> None:
        self.stop_event.set()
        self.wake.set()
        if self.inline is not None:
            self.inline.wakeup()

    def run(self) -> None:
        """Watch until stopped (with ``once``: until caught up). DaemonLocked when another
        daemon watches the root."""
        lock = take_daemon_lock(self.root)
        try:
            self._run()
        finally:
            if lock is not None:
                os.close(lock)

    def _run(self) -> None:
        self.load_multi_state()
        if not self.options.once:
            self.start_observer()  # first: whatever appears during the walk still sends an event
        self.discover()
        self.on_event("ready", {"runs": len(self.runs), "sources": len(self.sources), "mode": self.mode})
        try:
            now = time.monotonic()
            self.catching_up, self._progress = True, (now, 0, now)
            self.catch_up()
            self.catching_up = False
            self.flush()
            if self.stop_event.is_set():
                return  # stopped during the catch-up: not caught up
            self.on_event("caught_up", {"runs": len(self.runs)})
            if self.options.once:
                return
            next_rescan = time.monotonic() + self.options.rescan
            next_flush = time.monotonic() + self.options.flush
            tick = min(SAVE_TICK, self.options.flush)
            next_save = time.monotonic() + tick
            while not self.stop_event.is_set():
                due = min(next_rescan, next_flush, next_save, self._next_settle())
                timeout = max(0.0, due - time.monotonic())
                if self.inline is not None:  # our inotify reader: its batch lands in pending
                    self.inline.poll_once(0.0 if self.wake.is_set() else timeout)
                    if self.wake.is_set():
                        self._gather()
                        self.drain()
                elif self.wake.wait(timeout):
                    self.drain()
                now = time.monotonic()
                self.settle(now)
                if now >= next_rescan:
                    self.rescan()
                    next_rescan = now + self.options.rescan
                if now >= next_save:
                    self.flush(budget=max(1, round(MAX_SAVES_PER_SECOND * tick)))
                    next_save = now + tick
                if now >= next_flush:
                    self.on_event("tick", {})
                    next_flush = now + self.options.flush
        finally:
            if self.observer is not None:
                self.observer.stop()
                with contextlib.suppress(RuntimeError):
                    self.observer.join(timeout=5)
            for folder in list(self.restores):
                self._restore(folder)
            for folder in list(self.closing):
                self._close(folder)
            self.flush()
            for reader in self.sources.values():
                reader.close()
            for _, kept in self.behind.values():
                kept.close()
            self.behind.clear()
            self.on_event("stopped", {})

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        if hasattr(signal, "SIGHUP"):  # the terminal closed: stop as on SIGTERM, state saved
            signal.signal(signal.SIGHUP, self.stop)

    def count(self, what: str, path: Path, exc: BaseException) -> None:
        self.errors[what] += 1
        level = logging.WARNING if self.errors[what] <= 3 else logging.DEBUG
        log.log(level, "%s: %s: %s", path, what, exc, exc_info=self.errors[what] <= 1)
