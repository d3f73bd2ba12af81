"""Helpers shared by the CSV and JSONL reader tests (growing files, comparing records)."""
from __future__ import annotations

import json
import math
import random
import tempfile
from pathlib import Path
from unittest import mock

from autolr.readers import base

MAX_READS = 10_000  # a read loop that never ends is a bug, not a hang


def _num(v):
    if v is None:
        return None
    return "nan" if math.isnan(v) else v


def norm(records) -> list[tuple]:
    """Records as comparable tuples (NaN equal to NaN, metric order ignored)."""
    return [
        (tuple(sorted((k, _num(v)) for k, v in r.metrics.items())), r.step, _num(r.epoch), r.run, r.restart)
        for r in records
    ]


def drain(reader) -> list:
    """Every record available now: read() until ``more`` is off."""
    out = list(reader.read())
    n = 0
    while reader.more:
        out += reader.read()
        n += 1
        assert n < MAX_READS, "reader.more never turned off"
    return out


def whole(cls, path: Path):
    """A fresh reader's view of the complete file: (records, skipped counts)."""
    reader = cls(path)
    records = drain(reader)
    assert not reader.restarted
    return records, dict(reader.skipped)


def special_cuts(data: bytes) -> set[int]:
    """Cut points inside every CRLF and inside every multi-byte UTF-8 character."""
    cuts = {i + 1 for i in range(len(data) - 1) if data[i : i + 2] == b"\r\n"}
    cuts |= {i for i, b in enumerate(data) if 0x80 <= b <= 0xBF}  # continuation bytes
    return cuts


def random_cuts(data: bytes, seed: int, max_piece: int = 40, extra=()) -> list[int]:
    rng = random.Random(seed)
    cuts = set(extra)
    pos = 0
    while pos < len(data):
        pos += rng.randint(1, max_piece)
        cuts.add(pos)
    return sorted(c for c in cuts if 0 < c < len(data))


def grow(reader, path: Path, data: bytes, cuts) -> list:
    """Write ``data`` into ``path`` piece by piece, reading after each piece; all records."""
    out = []
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]
    with open(path, "wb", buffering=0) as f:
        for a, b in zip(bounds, bounds[1:]):
            f.write(data[a:b])
            out += drain(reader)
            assert not reader.restarted, "appending must never look like a restart"
    return out


def resumed(cls, reader, path: Path):
    """A new reader continuing from ``reader``'s state, passed through JSON as a daemon stores it."""
    fresh = cls(path)
    fresh.set_state(json.loads(json.dumps(reader.get_state())))
    return fresh


def rewrite_in_place(path: Path, data: bytes, how: str = "r+") -> None:
    """Replace the content of ``path`` keeping its inode, as ``open(..., "w")`` writers do."""
    if how == "r+":
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def check_parse_cuts(cls, suffix: str, data: bytes, cuts, parse: int) -> None:
    """Reads that hand on at most ``parse`` bytes of lines (``PARSE_BLOCK``; more only for a
    longer first line) give the records and skip counts of reads that hand on every line, read
    whole or grown piece by piece. MAX_LINE 24 and READ_BLOCK 64: over-long lines in most files."""
    with mock.patch.object(base, "MAX_LINE", 24), mock.patch.object(base, "READ_BLOCK", 64), \
            tempfile.TemporaryDirectory() as d:
        whole_path = Path(d) / ("whole" + suffix)
        whole_path.write_bytes(data)
        want, want_skipped = whole(cls, whole_path)
        with mock.patch.object(base, "PARSE_BLOCK", parse):
            assert norm(whole(cls, whole_path)[0]) == norm(want)
            path = Path(d) / ("grown" + suffix)
            reader = cls(path)
            assert norm(grow(reader, path, data, cuts)) == norm(want)
            assert dict(reader.skipped) == want_skipped
