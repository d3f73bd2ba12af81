"""A recursive Linux inotify watcher without watchdog: many events per read, coalesced per path.

Why: at thousands of appended rows a second, watchdog builds several Python objects per
inotify event, dispatches them one by one, and turns every temporary file of the daemon's own
atomic writes into a "folder modified" event. Here one ``os.read`` returns up to 256 KiB of
``struct inotify_event`` records (16-byte header ``wd, mask, cookie, len`` + name); they are
parsed with ``struct``, the daemon's own files and ``.autolr*`` temporaries are dropped by
name, and the rest is handed over as one *set* of paths: a log that got five events is read
once.

Only paths are reported; the daemon re-reads from its stored offsets, so a lost, duplicated or
coalesced event does no harm. Each batch also says which paths were *moved*: created, deleted,
renamed, or in a folder that was (the daemon's own files aside). A path that is not moved only
had bytes written in place, so the file the daemon keeps open is still the one the path names,
and its next read needs no ``stat``. A queue overflow (``IN_Q_OVERFLOW``) is reported so that the
daemon rescans everything. Folders created or moved in are watched as they appear.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import math
import os
import select
import struct
import threading
from typing import Callable

log = logging.getLogger("autolr.inotify")

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

#: Changes only: opens and plain closes (our own reads) are left out, and so are attribute changes.
MASK = (IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
        | IN_DELETE_SELF | IN_MOVE_SELF)
_HEADER = struct.Struct("iIII")
_READ_SIZE = 256 << 10
#: Names never reported: the daemon's own files. A change to the control file or the journal
#: (``autolr set``, and our own publishes) is reported as the control file's path, so that the
#: daemon adopts a manual override without checking both files before every read.
_OWN = frozenset({b"autolr.state.json", b"autolr.lock", b"autolr.toml", b"autolr.daemon.log"})
_CONTROL = frozenset({b"autolr.json", b"autolr.decisions.jsonl"})

#: File events that may change which file a path names.
MOVES = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
Sink = Callable[[set, bool, set], None]  # (changed paths as str, overflowed, moved paths)


def alias_inside(folder: str, real_root: str) -> bool:
    """Whether ``folder`` is a symlink to a folder inside the root (``real_root``: its real
    path and a trailing /); followed, such a folder is walked where it lies instead."""
    return os.path.islink(folder) and (os.path.realpath(folder) + "/").startswith(real_root)


class InotifyWatcher:
    """Watches ``root`` recursively; ``sink(paths, overflowed, moved)`` gets each batch, from a
    thread of its own or, with ``start(threaded=False)``, from the caller's ``poll_once()``.

    ``start()`` raises OSError when inotify is unavailable or its limits are reached
    (ENOSPC: ``max_user_watches``, EMFILE: ``max_user_instances``), for the caller to fall back.
    """

    def __init__(self, root: str | os.PathLike, sink: Sink, *, follow_symlinks: bool = False):
        self.root = os.fspath(root).rstrip("/") or "/"
        self.sink = sink
        self.follow_symlinks = follow_symlinks
        self.paths: dict[int, str] = {}  # wd -> folder
        self.wds: dict[str, int] = {}  # folder -> wd
        self.links: dict[int, str] = {}  # wd -> symlinked file (its target's own watch)
        self.link_wds: dict[str, int] = {}  # symlinked file -> wd
        self.fd = -1
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._poller: select.poll | None = None
        self._libc = None
        self.watch_errors = 0

    # ---- watches -------------------------------------------------------------------------
    def start(self, threaded: bool = True) -> None:
        """Watch the tree. ``threaded``: a thread hands each batch to the sink as it comes;
        False: the caller's own loop calls ``poll_once()`` (no second thread, no lock handover)."""
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        try:
            self._init1, self._add, self._rm = libc.inotify_init1, libc.inotify_add_watch, libc.inotify_rm_watch
        except AttributeError as exc:  # not Linux
            raise OSError(errno.ENOSYS, "inotify is not available") from exc
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        fd = self._init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        try:
            self.add_tree(self.root, strict=True)
        except OSError:
            self.close()
            raise
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = select.poll()
        self._poller.register(self.fd, select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)
        if threaded:
            self._thread = threading.Thread(target=self._loop, name="autolr-inotify", daemon=True)
            self._thread.start()

    def add_tree(self, top: str, *, strict: bool = False) -> None:
        """Watch ``top`` and every folder below it but hidden ones (``.git``, ``.venv``, our
        ``.autolr*``) and, following symlinks, links to folders inside the root (watched where
        they lie, so that events name the real paths)."""
        self._watch(top, strict)
        seen: set[str] = set()  # real paths: followed symlinks may form cycles
        real_root = os.path.realpath(self.root) + "/"
        for dirpath, dirnames, _ in os.walk(top, followlinks=self.follow_symlinks):
            if self.follow_symlinks:
                real = os.path.realpath(dirpath)
                if real in seen:
                    dirnames[:] = []
                    continue
                seen.add(real)
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and not (self.follow_symlinks and alias_inside(
                os.path.join(dirpath, d), real_root))]
            for d in dirnames:
                self._watch(os.path.join(dirpath, d), strict)

    def _watch(self, folder: str, strict: bool) -> None:
        flags = MASK | IN_ONLYDIR | IN_EXCL_UNLINK | (0 if self.follow_symlinks else IN_DONT_FOLLOW)
        wd = self._add(self.fd, os.fsencode(folder), flags)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR, errno.EACCES) and not (strict and folder == self.root):
                return  # gone already, or not ours to read; the rescan covers it
            if strict:
                raise OSError(err, f"inotify_add_watch {folder}: {os.strerror(err)}")
            self.watch_errors += 1
            if self.watch_errors <= 3:
                log.warning("cannot watch %s (%s); it is covered by the periodic rescan only", folder, os.strerror(err))
            return
        old = self.paths.get(wd)
        if old is not None and old != folder:
            if os.path.realpath(old) == os.path.realpath(folder):
                return  # the same folder through a symlink: events keep the first path
            if self.wds.get(old) == wd:
                del self.wds[old]  # a stale path (the folder moved unseen)
        self.paths[wd] = folder
        self.wds[folder] = wd

    def watch_link(self, path: str) -> None:
        """Watch the file a symlinked log leads to (followed symlinks only): a target outside
        the watched folders sends no event of its own. Its events report ``path``, the link;
        a re-pointed link moves the watch to the new target."""
        wd = self._add(self.fd, os.fsencode(path), MASK | IN_EXCL_UNLINK)
        if wd < 0:
            return  # gone, or not ours to read: the rescan covers it
        old = self.link_wds.get(path)
        if old is not None and old != wd and self.links.get(old) == path:
            del self.links[old]
            self._rm(self.fd, old)
        self.links[wd] = path
        self.link_wds[path] = wd

    def remove_tree(self, top: str) -> None:
        """Stop watching ``top`` and below (moved away: its watch descriptors now name other paths)."""
        prefix = top + "/"
        for folder in [f for f in self.wds if f == top or f.startswith(prefix)]:
            wd = self.wds.pop(folder)
            if self.paths.get(wd) == folder:
                del self.paths[wd]
                self._rm(self.fd, wd)

    # ---- events --------------------------------------------------------------------------
    def parse(self, buf: bytes) -> tuple[set[str], bool, set[str]]:
        """The changed paths in a buffer of inotify events, whether the queue overflowed, and the
        changed paths that were moved (see the module docstring)."""
        changed: set[str] = set()
        moved: set[str] = set()
        shaken: set[str] = set()  # folders where something else than our own files moved
        overflow = False
        unpack, paths, fsdecode = _HEADER.unpack_from, self.paths, os.fsdecode
        i, end = 0, len(buf)
        while i < end:
            wd, mask, _, n = unpack(buf, i)
            name = buf[i + 16 : i + 16 + n].rstrip(b"\0")
            i += 16 + n
            if mask & IN_Q_OVERFLOW:
                overflow = True
                continue
            folder = paths.get(wd)
            if folder is None:
                link = self.links.get(wd)
                if link is not None:  # a symlinked log's target: no name, the file itself
                    changed.add(link)
                    if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                        moved.add(link)
                    if mask & IN_IGNORED:
                        del self.links[wd]
                        if self.link_wds.get(link) == wd:
                            del self.link_wds[link]
                continue
            if mask & IN_IGNORED:
                del paths[wd]
                if self.wds.get(folder) == wd:
                    del self.wds[folder]
                shaken.add(folder)
                continue
            if not name:  # the watched folder itself was deleted or moved
                changed.add(folder)
                shaken.add(folder)
                continue
            if mask & IN_ISDIR:
                if name.startswith(b"."):
                    continue  # hidden folders are not watched (see add_tree)
                path = folder + "/" + fsdecode(name)
                if mask & (IN_CREATE | IN_MOVED_TO):
                    self.add_tree(path)
                elif mask & IN_MOVED_FROM:
                    self.remove_tree(path)
                changed.add(path)
                shaken.add(path)
                continue
            if name in _OWN or name.startswith(b".autolr"):
                continue  # our own state and temporary files (other hidden files may be logs)
            if name in _CONTROL:
                changed.add(folder + "/autolr.json")
                continue
            path = folder + "/" + fsdecode(name)
            changed.add(path)
            if mask & MOVES:
                moved.add(path)
        if shaken:
            prefixes = tuple(f + "/" for f in shaken)
            moved.update(p for p in changed if p.startswith(prefixes))
        return changed, overflow, moved

    def _loop(self) -> None:
        while not self._stopping:
            self.poll_once(None)

    def poll_once(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: no limit) for events or ``wakeup()``; hand what
        is queued to the sink as one batch. True when the sink got a batch."""
        try:
            ready = self._poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000)))
        except InterruptedError:
            return False
        if not ready or self._stopping:
            return False
        if any(fd == self._wake_r for fd, _ in ready):
            try:
                os.read(self._wake_r, 4096)
            except OSError:
                pass
        if not any(fd == self.fd for fd, _ in ready):
            return False
        changed: set[str] = set()
        moved: set[str] = set()
        overflow = False
        while True:  # everything queued now, as one batch
            try:
                buf = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                log.error("inotify read failed: %s; rescanning", exc)
                overflow = True
                break
            try:
                more, over, gone = self.parse(buf)
            except Exception as exc:  # never die on an event: rescan instead
                log.exception("inotify event parsing failed: %s", exc)
                more, over, gone = set(), True, set()
            changed |= more
            moved |= gone
            overflow |= over
            if len(buf) < _READ_SIZE // 2:
                break
        if changed or overflow:
            self.sink(changed, overflow, moved)
            return True
        return False

    def wakeup(self) -> None:
        """End a ``poll_once()`` wait now (from a signal handler or another thread)."""
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:  # full or closed: a wakeup is pending anyway
                pass

    # ---- lifecycle (the observer interface the daemon uses) ------------------------------
    def stop(self) -> None:
        self._stopping = True
        self.wakeup()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.close()

    def close(self) -> None:
        for fd in (self.fd, self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self._wake_r = self._wake_w = -1
