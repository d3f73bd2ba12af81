"""CSV logs: Keras CSVLogger, Lightning CSVLogger and any table with a header row.

Empty and ``NA`` cells are missing values; ``nan``/``inf`` are real values (a diverging loss).
A header that changes to a superset of the old columns, over the same first row, is
Lightning's in-place rewrite: the rows already delivered are skipped when the file is read
again. A truncated or replaced file with any other header or first row (Keras re-fitting with
a new column) is a new log, read from its start.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..hookspecs import hookimpl
import numpy as np

from ..records import EPOCH_KEYS, STEP_KEYS, Record, split_counters
from . import base
from .base import Reader, TextTailer
from .block import NUMBER, Batch, counters, interleave, parse_numbers, pieces

MISSING = frozenset({"", "NA", "N/A", "None", "null"})
#: A line the csv module cannot parse.
BAD_ROW: list[str] = ["<malformed>"]
#: Lines looked at for the header row when checking for a rewrite.
HEADER_SCAN = 100
#: Bytes of the head read to find the header row (longer heads take the slow way).
HEAD_BYTES = 64 << 10


class CsvReader(Reader):
    name = "csv"
    #: Parse whole blocks into columns (False: every line alone, the exact path; for tests).
    block_parsing = True
    #: Fewer lines than this go line by line: the vectorised path costs ~0.2 ms a call, the
    #: exact one ~4 us a line (a live log brings a few lines a read); even at ~50 lines.
    min_block_lines = 64

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.tailer = TextTailer(self.path, self)
        self.header: list[str] | None = None
        self.delivered = 0  # data rows returned since the file's start
        self.to_skip = 0  # rows of an in-place rewrite still to pass over
        self.need_header = True  # the next non-blank row is the header
        self.known_head = b""  # the file's bytes up to our header's newline, when last checked
        self.first: dict[str, str] | None = None  # the first data row's cells by column name

    @classmethod
    def matches(cls, path: Path) -> bool:
        return path.suffix.lower() in (".csv", ".tsv")

    def columns(self) -> list[str]:
        return list(self.header or [])

    def get_state(self) -> dict[str, Any]:
        return {
            "tail": self.tailer.get_state(),
            "header": self.header,
            "delivered": self.delivered,
            "to_skip": self.to_skip,
            "need_header": self.need_header,
            "first": self.first,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.tailer.set_state(state.get("tail", {}))
        self.header = state.get("header")
        self.delivered = int(state.get("delivered", 0))
        self.to_skip = int(state.get("to_skip", 0))
        self.need_header = bool(state.get("need_header", self.header is None or self.tailer.offset == 0))
        first = state.get("first")
        self.first = first if isinstance(first, dict) else None

    def read(self) -> list[Record]:
        return self._read(columns=False)

    def read_batch(self) -> Batch:
        """``read()`` as columns: the same rows, in the same order."""
        return self._read(columns=True)

    def _read(self, columns: bool):
        self.restarted = False
        checked = self.header is not None
        if checked and self._header_changed():
            self.tailer.restart()
        block = self.tailer.read_block(reuse_stat=checked)
        if self.restarted:  # read from the start again
            self.need_header = True
        # A truncated or replaced file is only a new log once its header says so: a file caught
        # in the middle of Lightning's rewrite (empty, or half a header) is not a restart.
        self.restarted = False
        if not block:
            return Batch.empty() if columns else []
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n")
        pre: list[Record] = []
        pos = 0
        while pos < len(block) and (self.need_header or self.to_skip):  # line by line
            end = block.index(b"\n", pos)
            self._line(block[pos:end], pre)
            pos = end + 1
        rest = block[pos:] if pos else block
        if self.first is None and not (self.need_header or self.delivered or self.to_skip):
            self._remember_first(rest)
        parts = [self._rows(piece, columns) for piece in pieces(rest)]
        if columns:
            return Batch.concat([Batch.from_records(pre), *parts])
        for part in parts:
            pre += part
        return pre

    def _rows(self, rest: bytes, columns: bool):
        """The data rows of ``rest`` (complete lines after the header), as columns or Records."""
        fast, fast_lines, lines = self._fast(rest)
        slow: list[Record] = []
        at: list[int] = []
        for i in np.flatnonzero(~fast_lines).tolist():
            if self._line(lines[i], slow):
                at.append(i)
        self.delivered += int(fast_lines.sum())
        fast_at = np.flatnonzero(fast_lines)
        if columns:
            if not slow:
                return fast
            order = np.argsort(np.concatenate([fast_at, at]), kind="stable")
            return Batch.concat([fast, Batch.from_records(slow)]).take(order)
        return interleave(fast.records(), fast_at, slow, at)

    def _line(self, line: bytes, out: list[Record]) -> bool:
        """One line the exact way: header, rows to skip, bad rows. True when a record was added."""
        row = self._row(line)
        if row is None:  # blank line
            return False
        if self.need_header and row is not BAD_ROW:
            self.need_header = False
            cells = [c.strip() for c in row]
            if cells[0].startswith("\ufeff"):  # a UTF-8 byte order mark (Excel, utf-8-sig)
                cells[0] = cells[0][1:].strip()
            self._take_header(cells)
            return False
        if not self.need_header:
            if self.to_skip and not self.delivered and not self._same_first(row):
                self.restarted, self.to_skip = True, 0  # a wider header over other rows: a new log
                self.first = None
                self._remember_first(line + b"\n")
            # Every data row counts, good or bad: Lightning's rewrite writes them all again.
            self.delivered += 1
            if self.to_skip:
                self.to_skip -= 1
                return False
        if row is BAD_ROW:
            self.skip("malformed CSV row", "unparseable")
            return False
        record = self._parse(row)
        if record is None:
            return False
        out.append(record)
        return True

    def _fast(self, block: bytes) -> tuple[Batch, np.ndarray, list[bytes]]:
        """The data rows of ``block`` (complete lines, after the header) that need no csv
        quoting rules, as columns; the mask of those lines; the lines (None when all are fast)."""
        if not self.block_parsing or block.count(b"\n") < self.min_block_lines:
            lines = block.split(b"\n")
            return Batch.empty(), np.zeros(len(lines) - 1, bool), lines
        header = self.header
        ncols = len(header)
        delim = 9 if self.path.suffix.lower() == ".tsv" else 44
        buf = np.frombuffer(block, np.uint8)
        ends = np.flatnonzero(buf == 10)
        starts = np.empty_like(ends)
        starts[0], starts[1:] = 0, ends[:-1] + 1
        cuts = np.flatnonzero((buf == delim) | (buf == 10))  # every field's end
        per_line = np.diff(np.searchsorted(cuts, ends, side="right"), prepend=0)
        sizes = ends - starts
        ok = (per_line == ncols) & (sizes > 0) & (sizes <= csv.field_size_limit())
        if len(set(header)) != ncols:
            ok[:] = False  # duplicate names: which one wins is csv's business
        if b'"' in block or b"\x00" in block or b"\r" in block:  # quoting, NUL, stray CR: exact path
            bad = np.flatnonzero((buf == 34) | (buf == 0) | (buf == 13))
            ok[np.searchsorted(ends, bad)] = False
        rows = int(ok.sum())
        lines = None if rows == len(ends) else block.split(b"\n")
        if rows == 0:
            return Batch.empty(), ok, lines
        if rows < len(ends):
            keep = ok[np.searchsorted(ends, cuts)]
            cuts = cuts[keep]
        fstart = np.empty_like(cuts)
        fstart[0], fstart[1:] = 0, cuts[:-1] + 1
        if rows < len(ends):  # a kept field right after a dropped line starts at that line's start
            fstart = fstart.reshape(rows, ncols)
            fstart[:, 0] = starts[ok]
            fstart = fstart.ravel()
        flen = cuts - fstart
        values, kinds = parse_numbers(buf, fstart, flen)
        has = (kinds == NUMBER).reshape(rows, ncols)
        values = values.reshape(rows, ncols)
        others = np.flatnonzero((kinds != NUMBER) & (flen > 0))
        if others.size:  # text, MISSING markers, long numbers: the exact rule, field by field
            vals, flags = values.ravel(), has.ravel()
            for i, a, b in zip(others.tolist(), fstart[others].tolist(), cuts[others].tolist()):
                v = _cell(block[a:b])
                if v is not None:
                    vals[i], flags[i] = v, True
        cols = {name: values[:, j] for j, name in enumerate(header)}
        masks = {name: has[:, j] for j, name in enumerate(header) if not has[:, j].all()}
        steps, epochs = counters(header, cols, masks, rows)
        counted = set(STEP_KEYS) | set(EPOCH_KEYS)
        names = [n for n in header if n not in counted and (n not in masks or masks[n].any())]
        return Batch(steps, epochs, {n: cols[n] for n in names},
                     {n: masks[n] for n in names if n in masks}), ok, lines

    def _row(self, line: bytes) -> list[str] | None:
        """One line parsed on its own (so chunking cannot matter); None when blank."""
        delimiter = "\t" if self.path.suffix.lower() == ".tsv" else ","
        try:
            row = next(csv.reader([line.decode("utf-8", "replace")], delimiter=delimiter), [])
        except csv.Error:  # a stray CR, a field over csv's size limit
            return BAD_ROW
        return None if not row or row == [""] else row

    def _take_header(self, new: list[str]) -> None:
        """Reading from the start again: a wider header is a rewrite (if the first row is the
        same: :meth:`_same_first`), anything else a new log."""
        old = self.header
        if old is not None and set(old) < set(new):
            self.to_skip, self.delivered = self.delivered, 0
        else:
            self.restarted = old is not None
            self.to_skip = self.delivered = 0
            self.first = None
        self.header = new

    def _remember_first(self, lines: bytes) -> None:
        """Keep the first data row of ``lines`` (complete lines after the header), if any."""
        pos = 0
        while (end := lines.find(b"\n", pos)) >= 0:
            line, pos = lines[pos:end], end + 1
            row = self._row(line[:-1] if line.endswith(b"\r") else line)
            if row is not None:
                self.first = self._cells(row) or {}
                return

    def _same_first(self, row: list[str]) -> bool:
        """Whether ``row``, the first after a wider header, repeats the first row we delivered
        (Lightning's rewrite copies the old cells); True when that cannot be told."""
        cells = self._cells(row)
        if not self.first or cells is None:
            return True
        return all(cells.get(k) == v for k, v in self.first.items())

    def _cells(self, row: list[str]) -> dict[str, str] | None:
        """A data row's cells by column name; None for a malformed row."""
        if row is BAD_ROW or len(row) != len(self.header):
            return None
        return dict(zip(self.header, (c.strip() for c in row)))

    def _header_changed(self) -> bool:
        """True when the file's header row (its first non-blank line) is no longer ours."""
        known = self.known_head
        try:  # through the tailer's kept descriptor
            if known and self.tailer.head(len(known)) == known:  # the usual case: one short pread
                return False
            self.known_head = b""
            for size in (4096, HEAD_BYTES):
                head = self.tailer.head(size)
                if head is None:
                    return False
                verdict = self._scan_head(head, size)
                if verdict is not None:
                    return verdict
        except OSError:
            return False
        return self._header_changed_long()

    def _scan_head(self, head: bytes, size: int) -> bool | None:
        """``_header_changed`` on the first ``size`` bytes; None when they are too few to tell."""
        pos = 0
        for _ in range(HEADER_SCAN):
            end = head.find(b"\n", pos)
            if end < 0:
                return None if len(head) >= size else False
            line, pos = head[pos:end], end + 1
            verdict = self._header_verdict(line)
            if verdict is not None:
                if not verdict:
                    self.known_head = head[:pos]  # up to the header's newline, blank lines included
                return verdict
        return False

    def _header_changed_long(self) -> bool:
        """``_header_changed`` for a file whose first lines exceed HEAD_BYTES."""
        try:
            with open(self.path, "rb") as f:
                for _ in range(HEADER_SCAN):
                    line = f.readline(base.MAX_LINE + 2)
                    if not line.endswith(b"\n"):
                        return False  # being rewritten right now (or absurd): look again next time
                    verdict = self._header_verdict(line[:-1])
                    if verdict is not None:
                        return verdict
        except OSError:
            return False
        return False

    def _header_verdict(self, line: bytes) -> bool | None:
        """For one line of the head: None when it cannot be the header, else whether it differs."""
        if len(line) > base.MAX_LINE:
            return None  # the tailer skipped it too
        row = self._row(line[:-1] if line.endswith(b"\r") else line)
        if row is None or row is BAD_ROW:
            return None
        return [c.strip() for c in row] != self.header

    def _parse(self, row: list[str]) -> Record | None:
        header = self.header
        if len(row) != len(header):
            self.skip("malformed CSV row", f"{len(row)} fields, header has {len(header)}")
            return None
        values: dict[str, float] = {}
        for key, cell in zip(header, row):
            cell = cell.strip()
            if cell in MISSING:
                continue
            try:
                values[key] = float(cell)
            except ValueError:
                continue  # a text column (a timestamp, a name): not a metric
        return split_counters(values)


def _cell(raw: bytes) -> float | None:
    """One field the exact way: None when missing or not a number."""
    cell = raw.decode("utf-8", "replace").strip()
    if cell in MISSING:
        return None
    try:
        return float(cell)
    except ValueError:
        return None


@hookimpl
def register_readers(register) -> None:
    register(CsvReader)
