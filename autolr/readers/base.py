"""Reader interface and the byte-offset tailer shared by the text formats."""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from ..records import Record

log = logging.getLogger("autolr.readers")

#: Bytes read per ``read()`` call at most; callers loop while ``more`` is True.
READ_BLOCK = 8 << 20
#: Lines longer than this are skipped and counted, never loaded whole.
MAX_LINE = 1 << 20
#: Bytes before the offset kept to recognise a file rewritten past the offset.
MARK = 64


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
    """

    def __init__(self, path: Path, reader: Reader):
        self.path = path
        self.reader = reader
        self.offset = 0
        self.identity: tuple[int, int] | None = None
        self.skipping = False  # inside an over-long line, discarding up to its newline
        self.mark = b""  # the last MARK bytes before the offset, as read

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
        self.reader.restarted = True

    def read_lines(self) -> list[bytes]:
        """Complete lines (without line ends) from the offset, at most READ_BLOCK bytes."""
        self.reader.more = False
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                identity = (st.st_dev, st.st_ino)
                if self.identity is not None and identity != self.identity:
                    self.restart()
                elif st.st_size < self.offset:
                    self.restart()
                elif self.mark and len(self.mark) <= self.offset:
                    f.seek(self.offset - len(self.mark))
                    if f.read(len(self.mark)) != self.mark:
                        self.restart()
                self.identity = identity
                if st.st_size == self.offset:
                    return []
                f.seek(self.offset)
                data = f.read(READ_BLOCK)
        except FileNotFoundError:
            return []
        start = self.offset
        lines = self._split(data)
        n = self.offset - start
        if n >= MARK:
            self.mark = data[n - MARK : n]
        elif n > 0:
            self.mark = ((self.mark if start else b"") + data[:n])[-MARK:]
        return lines

    def _split(self, data: bytes) -> list[bytes]:
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) > MAX_LINE:  # no newline in sight: discard, bounded
                self.offset += len(data)
                if not self.skipping:
                    self.reader.skip("over-long line", f"> {MAX_LINE} bytes")
                self.skipping = True
                self.reader.more = len(data) >= READ_BLOCK
            return []
        self.offset += end + 1
        self.reader.more = len(data) >= READ_BLOCK
        lines = data[: end + 1].split(b"\n")
        lines.pop()
        if self.skipping:  # the first piece is the tail of an over-long line
            lines.pop(0)
            self.skipping = False
        out = []
        for line in lines:
            if len(line) > MAX_LINE:
                self.reader.skip("over-long line", f"{len(line)} bytes")
                continue
            out.append(line[:-1] if line.endswith(b"\r") else line)
        tail = len(data) - (end + 1)
        if tail > MAX_LINE:  # the unfinished last line is already over-long: discard it now
            self.offset += tail
            self.skipping = True
            self.reader.skip("over-long line", f"> {MAX_LINE} bytes")
        return out
