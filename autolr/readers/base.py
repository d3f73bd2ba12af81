"""Reader interface and the byte-offset tailer shared by the text formats."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections import Counter
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from ..records import Record

log = logging.getLogger("autolr.readers")

#: Bytes read per ``read()`` call at most; callers loop while ``more`` is True. Must exceed
#: MAX_LINE, so that a line of up to MAX_LINE bytes is seen whole.
READ_BLOCK = 2 << 20
#: Bytes of whole lines one read hands on (more only when its first line is longer): the
#: Records of one read are live at once, and the allocator keeps their high-water mark. 256 KiB
#: (about 7k rows) reads as fast as 2 MiB; a daemon catching up on a 500k-row log with ``auto``
#: then holds 90 MB instead of 127 (45 instead of 67 with the threshold rule).
PARSE_BLOCK = 256 << 10
#: Lines longer than this are skipped and counted, never loaded whole.
MAX_LINE = 1 << 20
#: Bytes before the offset kept to recognise a file rewritten past the offset.
MARK = 64
#: Bytes asked for by a read without ``stat`` (``in_place``); a full answer means more to read.
IN_PLACE_READ = 64 << 10


def _max_kept() -> int:
    """Half the process's descriptor limit (at most 4096): the rest stay free for the journal,
    control and state writes, inotify and the interpreter."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover (not POSIX)
        return 256
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(8, min(4096, soft // 2))


#: Descriptors the TextTailers keep open between reads, all together, at most. The logs opened
#: beyond it are opened and closed at each read (an ``open`` more a read), so a daemon watching
#: more logs than ``ulimit -n`` allows never runs out of descriptors.
MAX_KEPT = _max_kept()
_kept = [0]  # descriptors kept now
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _open_read(path: Path) -> int:
    return os.open(path, _READ_FLAGS)


class Reader:
    """Reads new records from one log file, resuming from a stored position.

    ``read()`` never raises on bad content: it skips, counts in ``skipped`` and logs. When the
    file was replaced or truncated it starts over and sets ``restarted``; the records then come
    again from the beginning and the run rewinds to them.
    """

    name: ClassVar[str] = ""
    #: Higher wins when several readers match a file.
    priority: ClassVar[int] = 0

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.skipped: Counter[str] = Counter()
        self.restarted = False
        self.more = False
        #: ((device, inode), state) of the file the path named before a replace was noticed: a
        #: log renamed away (rotation) and found under its new name reads on from there.
        self.left_behind: tuple[tuple[int, int], dict[str, Any]] | None = None

    def file_identity(self) -> tuple[int, int] | None:
        """(device, inode) of the file the read position belongs to (readers on a TextTailer)."""
        tailer = getattr(self, "tailer", None)
        return tailer.identity if isinstance(tailer, TextTailer) else None

    @classmethod
    def matches(cls, path: Path) -> bool:
        """True when this reader owns ``path``. Cheap: a name check, at most a peek at the head."""
        raise NotImplementedError

    @classmethod
    def run_dir(cls, path: Path) -> Path:
        """The run folder a log file belongs to (its control file goes there)."""
        return path.parent

    def folder_for(self, run: str | None) -> Path:
        """The folder of a run named by ``Record.run`` (None: this file's run)."""
        return self.run_dir(self.path)

    def read(self) -> list[Record]:
        raise NotImplementedError

    def columns(self) -> list[str]:
        """Metric names the log declares up front (a CSV header), else []."""
        return []

    def get_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def set_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the reader keeps open (a file descriptor); reading again reopens.

        The daemon calls it when it drops the source. The default closes ``self.tailer`` if any.
        """
        tailer = getattr(self, "tailer", None)
        if tailer is not None and hasattr(tailer, "close"):
            tailer.close()

    def assume_in_place(self) -> None:
        """The daemon knows (from inotify) that the path still names the file last read and was
        only written to: the next read may skip its ``stat``. Readers on a TextTailer use it."""
        tailer = getattr(self, "tailer", None)
        if isinstance(tailer, TextTailer):
            tailer.in_place = True

    def finish(self) -> None:
        """The writer is done (``autolr replay`` of a finished log): a last line without its
        newline is read too. Readers on a TextTailer use it; the others read whole records only."""
        tailer = getattr(self, "tailer", None)
        if isinstance(tailer, TextTailer):
            tailer.finished = True

    def skip(self, what: str, detail: str = "") -> None:
        """Count and log one skipped piece of bad input."""
        self.skipped[what] += 1
        if self.skipped[what] <= 3:
            log.warning("%s: skipped %s%s", self.path, what, f" ({detail})" if detail else "")


class TextTailer:
    """Yields the complete lines appended to a file since the stored byte offset.

    A partial last line stays unread until its newline arrives. A file whose identity (device,
    inode) changed, that shrank below the offset, or whose bytes just before the offset are no
    longer the ones already read (truncated and rewritten past the offset between two reads) is
    read again from the start.

    The file stays open between reads (``os.pread`` from the offset); each read still stats the
    path to notice a replaced or deleted file, and ``close()`` releases the descriptor. When the
    process is out of descriptors a read opens and closes the file as before. Subclasses change
    how the bytes become lines by overriding ``_split``.
    """

    def __init__(self, path: Path, reader: Reader):
        self.path = path
        self.reader = reader
        self.offset = 0
        self.identity: tuple[int, int] | None = None
        self.skipping = False  # inside an over-long line, discarding up to its newline
        self.mark = b""  # the last MARK bytes before the offset, as read
        self.fd: int | None = None
        self.fd_identity: tuple[int, int] | None = None
        self.last_stat: os.stat_result | None = None  # the stat taken by head()
        self.in_place = False  # the next read may skip the stat (Reader.assume_in_place)
        self.given: tuple[int, bytes] | None = None  # (offset, mark) before the last block: see give_back
        self.finished = False  # the file is complete: its last line needs no newline (Reader.finish)
        self.behind: int | None = None  # the offset when the kept file, renamed away, was last drained
        self.handed_over = False  # the kept file is read under another name now: let it go

    def get_state(self) -> dict[str, Any]:
        return {"offset": self.offset, "identity": self.identity, "skipping": self.skipping,
                "mark": self.mark.hex()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.offset = int(state.get("offset", 0))
        ident = state.get("identity")
        self.identity = tuple(ident) if ident else None
        self.skipping = bool(state.get("skipping", False))
        try:
            self.mark = bytes.fromhex(state.get("mark") or "")[-MARK:]
        except (TypeError, ValueError):
            self.mark = b""
        if len(self.mark) > self.offset:
            self.mark = b""

    def restart(self) -> None:
        self.offset, self.skipping, self.mark = 0, False, b""
        self.handed_over = False
        self.reader.restarted = True

    def close(self) -> None:
        """Release the kept descriptor (the next read opens the file again)."""
        fd, self.fd, self.fd_identity, self.last_stat = self.fd, None, None, None
        if fd is not None:
            _kept[0] -= 1
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def _sync(self) -> os.stat_result | None:
        """Stat the path and (re)open it when it names another file than the kept one.

        When the path is gone, the kept file's stat while it holds lines not read yet, then None
        (the descriptor of the file read is kept: see ``detach``). Raises other OSErrors.
        """
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            kept = self._drain_behind()  # renamed away or deleted: its unread lines still count
            if kept is None and not self._renamed_away():
                self.close()  # (a file renamed away stays open: see detach)
            return kept
        if self.fd is None or (st.st_dev, st.st_ino) != self.fd_identity:
            kept = self._drain_behind()
            if kept is not None:
                return kept
            self.close()
            self.behind = None
            if _kept[0] >= MAX_KEPT:
                raise OSError(errno.EMFILE, "descriptors kept for logs at their limit (MAX_KEPT)")
            try:
                fd = _open_read(self.path)
            except FileNotFoundError:
                return None
            try:
                st = os.fstat(fd)
            except OSError:
                os.close(fd)
                raise
            self.fd, self.fd_identity = fd, (st.st_dev, st.st_ino)
            _kept[0] += 1
        elif self.behind is not None:  # gone a while, then renamed back: nothing left behind
            self.behind = None
        return st

    def _drain_behind(self) -> os.stat_result | None:
        """The kept file's stat when the path names another file now (a rotation renamed it
        away) and it still holds lines we have not read: those come first, as ``tail -F``
        reads them. None once a drain made no progress (a last line without its newline)."""
        if self.fd is None or self.handed_over or self.fd_identity != self.identity:
            return None
        try:
            st = os.fstat(self.fd)
        except OSError:
            return None
        if st.st_size <= self.offset or self.behind == self.offset:
            return None
        self.behind = self.offset
        return st

    def detach(self) -> TextTailer | None:
        """The kept descriptor, handed to a new tailer (which ``adopt`` gives to another reader of
        the path) when the path is gone and the file read still has a name (renamed away): its
        writer may still add lines to it before it reopens the path. None otherwise."""
        if not self._renamed_away():
            return None
        kept = TextTailer(self.path, self.reader)
        kept.fd, kept.fd_identity = self.fd, self.fd_identity
        self.fd, self.fd_identity, self.last_stat = None, None, None
        return kept

    def _renamed_away(self) -> bool:
        """The kept descriptor is the file read, not read under another name, not deleted."""
        if self.handed_over or not self._kept_is_read():
            return False
        try:
            return os.fstat(self.fd).st_nlink > 0
        except OSError:
            return False

    def adopt(self, kept: TextTailer) -> bool:
        """Take ``kept``'s descriptor (see ``detach``) when the offset belongs to its file: its
        unread lines come first, then the file the path names now (``_drain_behind``)."""
        if self.fd is not None or kept.fd is None or kept.fd_identity != self.identity:
            return False
        self.fd, self.fd_identity = kept.fd, kept.fd_identity
        kept.fd, kept.fd_identity = None, None
        return True

    def reopen_moved(self, taken: Callable[[Path], bool]) -> Path | None:
        """At a start, when the saved offset belongs to a file the path no longer names (rotated
        to a name no reader takes while no daemon ran): find that file in the folder by its
        (device, inode), under a name ``taken`` says no reader reads, check that the bytes
        before the offset are the ones read (an inode number is reused once its file is
        deleted), and keep it open, so its unread lines are read first (``_drain_behind``).
        Returns its path, or None."""
        if self.fd is not None or self.identity is None or not self.mark:
            return None
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.identity:
                return None
        try:
            with os.scandir(self.path.parent) as entries:
                names = sorted(e.name for e in entries if e.inode() == self.identity[1])
        except OSError:
            return None
        for name in names:
            candidate = self.path.parent / name
            if candidate == self.path or taken(candidate) or _kept[0] >= MAX_KEPT:
                continue
            try:
                fd = _open_read(candidate)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                same = ((st.st_dev, st.st_ino) == self.identity and stat.S_ISREG(st.st_mode)
                        and st.st_size >= self.offset
                        and _pread(fd, len(self.mark), self.offset - len(self.mark)) == self.mark)
            except OSError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.fd, self.fd_identity = fd, self.identity
            _kept[0] += 1
            return candidate
        return None

    def hand_over(self) -> None:
        """The kept file is read on under another name: the next read takes whatever the path
        names, without draining it."""
        self.handed_over = True

    def head(self, size: int) -> bytes | None:
        """Up to ``size`` bytes from the start of the file the path names now (None: gone).

        Its stat of the path is kept in ``last_stat`` for ``read_block(reuse_stat=True)``; with
        ``in_place`` set there is no stat: the kept descriptor is still the path's file."""
        self.last_stat = None
        if self.in_place and self._kept_is_read():
            return _pread(self.fd, size, 0)
        try:
            st = self._sync()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            return self._head_unkept(size)
        if st is None:
            return None
        self.last_stat = st
        return _pread(self.fd, size, 0)

    def _head_unkept(self, size: int) -> bytes | None:
        """``head`` with a descriptor opened for this read only (none may be kept)."""
        try:
            fd = _open_read(self.path)
        except FileNotFoundError:
            return None
        try:
            return _pread(fd, size, 0)
        finally:
            os.close(fd)

    def _fetch(self, reuse_stat: bool = False) -> bytes:
        """The bytes from the offset (at most READ_BLOCK), after the restart checks."""
        self.given = None  # any read ends what give_back may return
        self.reader.more = False
        if self.in_place:
            self.in_place = False
            data = self._fetch_in_place()
            if data is not None:
                return data
        st, self.last_stat = (self.last_stat if reuse_stat else None), None
        try:
            if st is None or self.fd is None:
                st = self._sync()
            if st is None:
                return b""
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            return self._fetch_unkept()
        try:
            return self._fetch_from(self.fd, st)
        except OSError:  # a descriptor gone bad (ESTALE on NFS): once more with a fresh one
            self.close()
            st = self._sync()
            return b"" if st is None else self._fetch_from(self.fd, st)

    def _kept_is_read(self) -> bool:
        """The kept descriptor is the file the offset belongs to."""
        return self.fd is not None and self.identity == self.fd_identity

    def _fetch_in_place(self) -> bytes | None:
        """The new bytes by one ``pread`` on the kept descriptor, no ``stat``; None when that
        cannot be trusted (no descriptor or mark, or the mark no longer matches: truncated or
        rewritten), and the caller takes the checked path."""
        m = len(self.mark)
        if not self._kept_is_read() or (m == 0 and self.offset) or m > self.offset:
            return None
        try:
            data = _pread(self.fd, IN_PLACE_READ + m, self.offset - m)
        except OSError:
            return None
        if len(data) < m or (m and data[:m] != self.mark):
            return None
        self.reader.more = len(data) >= IN_PLACE_READ + m
        return data[m:] if m else data

    def _fetch_unkept(self) -> bytes:
        """``_fetch`` with a descriptor opened for this read only (out of descriptors)."""
        try:
            fd = _open_read(self.path)
        except FileNotFoundError:
            return b""
        try:
            return self._fetch_from(fd, os.fstat(fd))
        finally:
            os.close(fd)

    def _fetch_from(self, fd: int, st: os.stat_result) -> bytes:
        """One ``pread`` in the common case: the mark and the new bytes are read together."""
        identity = (st.st_dev, st.st_ino)
        if self.identity is not None and identity != self.identity:
            if not self.handed_over:
                self.reader.left_behind = (self.identity, self.reader.get_state())
            self.restart()
        elif st.st_size < self.offset:
            self.restart()
        self.identity = identity
        m = len(self.mark) if self.mark and len(self.mark) <= self.offset else 0
        if m == 0 and st.st_size == self.offset:
            return b""
        # What the stat shows is there (more comes with its own event): no oversized buffer.
        data = _pread(fd, min(READ_BLOCK, max(st.st_size - self.offset, 0)) + m, self.offset - m)
        if m:
            if data[:m] != self.mark:  # rewritten past the offset since the last read
                self.restart()
                data = _pread(fd, min(READ_BLOCK, st.st_size), 0)
            else:
                data = data[m:]
        self.reader.more = len(data) >= READ_BLOCK or self.behind is not None  # then the path's new file
        return data

    def _remember(self, data: bytes, start: int) -> None:
        """Keep the last MARK bytes consumed (the offset moved from ``start``)."""
        n = self.offset - start
        if n >= MARK:
            self.mark = data[n - MARK : n]
        elif n > 0:
            self.mark = ((self.mark if start else b"") + data[:n])[-MARK:]

    def read_block(self, reuse_stat: bool = False) -> bytes:
        """The complete lines from the offset as one block (each ending with ``\\n``, line ends
        left as written), over-long lines left out and counted; at most READ_BLOCK bytes.

        ``reuse_stat``: use the stat of the ``head()`` called just before (one stat a read)."""
        data = self._fetch(reuse_stat)
        if not data:
            return b""
        start, mark = self.offset, self.mark
        data, added = self._end_line(data)
        block = self._block(data)
        self._unadd(added, start, data)
        self._remember(data, start)
        if self.offset - start == len(block):  # the file's bytes one for one: see give_back
            self.given = (start, mark)
        return block

    def give_back(self, block: bytes, keep: int) -> bool:
        """Hand back all but the first ``keep`` bytes of ``block``, the last ``read_block()``:
        the next read starts again at ``keep`` (a line start). False, and nothing changes, when
        that block is not the file's bytes one for one (an over-long line was left out)."""
        if self.given is None or not 0 <= keep <= len(block):
            return False
        start, mark = self.given
        self.offset = start + keep
        self.mark = ((mark if start else b"") + block[:keep])[-MARK:]
        self.given = None
        return True

    def read_lines(self) -> list:
        """Complete lines (without line ends) from the offset, at most READ_BLOCK bytes."""
        data = self._fetch()
        if not data:
            return []
        start = self.offset
        data, added = self._end_line(data)
        lines = self._split(data)
        self._unadd(added, start, data)
        self._remember(data, start)
        return lines

    def _end_line(self, data: bytes) -> tuple[bytes, bool]:
        """``data`` with a newline after a finished file's unterminated last line (and True)."""
        if self.finished and not self.reader.more and data[-1:] not in (b"\n", b""):
            return data + b"\n", True
        return data, False

    def _unadd(self, added: bool, start: int, data: bytes) -> None:
        """The offset back off the newline ``_end_line`` added, once it was consumed."""
        if added and self.offset - start == len(data):
            self.offset -= 1

    def _split(self, data: bytes) -> list:
        block = self._block(data)
        if not block:
            return []
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n")
        lines = block.split(b"\n")
        lines.pop()
        return lines

    def _block(self, data: bytes) -> bytes:
        end = data.rfind(b"\n", 0, PARSE_BLOCK)
        cut = end >= 0 and data.find(b"\n", end + 1) >= 0  # whole lines left for the next read
        if end < 0:
            end = data.rfind(b"\n")
        if cut:
            self.reader.more = True
        if end < 0:
            if len(data) > MAX_LINE:  # no newline in sight: discard, bounded
                self.offset += len(data)
                if not self.skipping:
                    self.reader.skip("over-long line", f"> {MAX_LINE} bytes")
                self.skipping = True
            return b""
        self.offset += end + 1
        block = data[: end + 1]
        if self.skipping:  # the first piece is the tail of an over-long line
            block = block[block.find(b"\n") + 1 :]
            self.skipping = False
        if len(block) > MAX_LINE + 1:
            block = self._drop_long(block)
        tail = len(data) - (end + 1)
        if tail > MAX_LINE and not cut:  # the unfinished last line is already over-long: discard it now
            self.offset += tail
            self.skipping = True
            self.reader.skip("over-long line", f"> {MAX_LINE} bytes")
        return block

    def _drop_long(self, block: bytes) -> bytes:
        """``block`` without its lines longer than MAX_LINE (each one counted)."""
        ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
        sizes = np.diff(ends, prepend=-1) - 1
        long = np.flatnonzero(sizes > MAX_LINE)
        if not long.size:
            return block
        pieces, pos = [], 0
        for i in long.tolist():
            first = int(ends[i] - sizes[i])
            self.reader.skip("over-long line", f"{int(sizes[i])} bytes")
            pieces.append(block[pos:first])
            pos = int(ends[i]) + 1
        pieces.append(block[pos:])
        return b"".join(pieces)


def _pread(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset`` (fewer at the end of the file: a short read ends it)."""
    if _HAS_PREAD:
        first = os.pread(fd, size, offset)
        if len(first) < size:  # the usual read of a live log: all there is, in one call
            return first
        parts, size, offset = [first], size - len(first), offset + len(first)
    else:
        parts = []
    while size > 0:
        if _HAS_PREAD:
            chunk = os.pread(fd, size, offset)
        else:
            os.lseek(fd, offset, os.SEEK_SET)
            chunk = os.read(fd, size)
        parts.append(chunk)
        if len(chunk) < size:
            break
        size -= len(chunk)
        offset += len(chunk)
    return b"" if not parts else parts[0] if len(parts) == 1 else b"".join(parts)


_HAS_PREAD = hasattr(os, "pread")
