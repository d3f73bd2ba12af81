"""CSV logs: Keras CSVLogger, Lightning CSVLogger and any table with a header row.

Empty and ``NA`` cells are missing values; ``nan``/``inf`` are real values (a diverging loss).
A header that changes to a superset of the old columns is Lightning's in-place rewrite: the
rows already delivered are skipped when the file is read again. A truncated or replaced file
with any other header is a new log, read from its start.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..hookspecs import hookimpl
from ..records import Record, split_counters
from .base import Reader, TextTailer

MISSING = frozenset({"", "NA", "N/A", "None", "null"})


class CsvReader(Reader):
    name = "csv"

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.tailer = TextTailer(self.path, self)
        self.header: list[str] | None = None
        self.delivered = 0  # data rows returned since the file's start
        self.to_skip = 0  # rows of an in-place rewrite still to pass over

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
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.tailer.set_state(state.get("tail", {}))
        self.header = state.get("header")
        self.delivered = int(state.get("delivered", 0))
        self.to_skip = int(state.get("to_skip", 0))

    def read(self) -> list[Record]:
        self.restarted = False
        if self.header is not None and self._header_changed():
            self.tailer.offset, self.tailer.skipping = 0, False
        at_start = self.tailer.offset == 0
        lines = self.tailer.read_lines()
        if not lines:
            return []
        expect_header = at_start or self.restarted
        self.restarted = False  # decided by the header below
        delimiter = "\t" if self.path.suffix.lower() == ".tsv" else ","
        out: list[Record] = []
        for row in csv.reader([b.decode("utf-8", "replace") for b in lines], delimiter=delimiter):
            if not row or row == [""]:
                continue
            if expect_header:
                expect_header = False
                self._take_header([c.strip() for c in row])
            elif self.to_skip:
                self.to_skip -= 1
                self.delivered += 1
            else:
                record = self._parse(row)
                if record is not None:
                    self.delivered += 1
                    out.append(record)
        return out

    def _take_header(self, new: list[str]) -> None:
        """Reading from the start again: a wider header is a rewrite, anything else a new log."""
        old = self.header
        if old is not None and set(old) < set(new):
            self.to_skip, self.delivered = self.delivered, 0
        else:
            self.restarted = old is not None
            self.to_skip = self.delivered = 0
        self.header = new

    def _header_changed(self) -> bool:
        """True when the file's first line no longer is the header we parsed."""
        try:
            with open(self.path, "rb") as f:
                first = f.readline(1 << 16)
        except OSError:
            return False
        if not first.endswith(b"\n"):
            return False  # being rewritten right now: look again next time
        row = next(csv.reader(io.StringIO(first.decode("utf-8", "replace"))), [])
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


@hookimpl
def register_readers(register) -> None:
    register(CsvReader)
