"""Weights & Biases run files (``wandb/offline-run-<date>_<time>-<id>/run-<id>.wandb``).

Format (wandb 0.31, checked on files it wrote):

* A 7-byte header ``:W&B`` + magic ``0xBEE1`` (little-endian) + version byte 0.
* Then the LevelDB log format in 32 KiB blocks counted from the start of the file (the header
  sits in the first block). Physical record: ``<IHB`` header (CRC, payload length, type
  FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) and the payload; a logical record larger than the rest
  of a block is split into FIRST, MIDDLE..., LAST. When fewer than 7 bytes remain in a block
  they are zero padding. CRC = ``zlib.crc32(payload, zlib.crc32(bytes([type])))``, unmasked.
* Payload: protobuf ``Record``; its field 2 is a ``HistoryRecord`` (one ``run.log`` row):
  ``item`` = 1 (repeated: ``key`` = 1, ``nested_key`` = 2 repeated, ``value_json`` = 16) and
  ``step`` = 2 (a message whose ``num`` = 1). 0.31 fills ``nested_key`` (a logged nested dict
  ``{"a": {"b": 1}}`` gives ``["a", "b"]``, joined here as ``a/b``). Values are JSON text:
  numbers, ``NaN``, ``Infinity``; strings, booleans, lists and media objects are not metrics.
  ``_step`` is the step; ``_runtime``, ``_timestamp`` and other ``_`` keys are dropped.

Reading resumes at a logical-record boundary. A half-written record at the end is read again
next time. A corrupt record (bad CRC, impossible header) is counted and skipped: the reader
first trusts its length, and when the record after it is bad as well it resyncs at the next
block, as LevelDB does. Memory is bounded by ``READ_BLOCK`` and ``MAX_RECORD``.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

from ..hookspecs import hookimpl
from ..records import Record, split_counters
from .base import READ_BLOCK, Reader

FILE_HEADER = b":W&B\xe1\xbe\x00"
BLOCK = 32 * 1024
PHYS = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
#: A logical record assembled from fragments beyond this size is skipped, never buffered.
MAX_RECORD = 4 << 20
#: The type byte's CRC, the seed of each record's CRC.
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (FULL, FIRST, MIDDLE, LAST)}


# --- minimal protobuf wire-format decoding -------------------------------------------------

def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; returns (value, next position)."""
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or over-long varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def iter_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value): int for varints, bytes for the other types."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 2:
            size, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("field runs past the end of its message")
        yield field, wire, value


def _text(value: bytes | memoryview) -> str:
    return bytes(value).decode("utf-8", "replace")


def _item(buf: bytes | memoryview) -> tuple[str, float] | None:
    """One ``HistoryItem`` as (name, number), or None when its value is not a number."""
    key, nested, value = "", [], None
    for field, wire, v in iter_fields(buf):
        if wire != 2:
            continue
        if field == 1:
            key = _text(v)
        elif field == 2:
            nested.append(_text(v))
        elif field == 16:
            value = v
    if value is None:
        return None
    try:  # JSON numbers, NaN, Infinity; quoted strings, true, null, [..] and {..} fail
        number = float(bytes(value))
    except ValueError:
        return None
    return ("/".join(nested) if nested else key), number


def history_values(payload: bytes | memoryview) -> dict[str, float] | None:
    """The numeric items of a ``Record`` holding a history row (None: another record kind)."""
    history = None
    for field, wire, value in iter_fields(payload):
        if field == 2 and wire == 2:
            history = value
    if history is None:
        return None
    values: dict[str, float] = {}
    step = None
    for field, wire, value in iter_fields(history):
        if field == 1 and wire == 2:
            item = _item(value)
            if item is not None:
                values[item[0]] = item[1]
        elif field == 2 and wire == 2:
            step = 0
            for f, w, v in iter_fields(value):
                if f == 1 and w == 0:
                    step = v - (1 << 64) if v >= 1 << 63 else v
    if "_step" not in values and step is not None:
        values["_step"] = float(step)
    return {k: v for k, v in values.items() if not k.startswith("_") or k == "_step"}


# --- the reader -----------------------------------------------------------------------------

class WandbReader(Reader):
    """Tails a ``.wandb`` run file (offline or online mode) and returns its history rows."""

    name = "wandb"
    priority = 10

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._reset()
        self.identity: tuple[int, int] | None = None

    def _reset(self) -> None:
        self.offset = 0
        self.discard = False  # dropping fragments of a broken or over-long record
        self.suspect = False  # the previous record failed its CRC
        self.resync = False  # skip to the next block boundary at or after the offset
        self.bad_header = False

    @classmethod
    def matches(cls, path: Path) -> bool:
        """Any ``*.wandb`` file, except through W&B's ``wandb/latest-run`` symlink (a duplicate)."""
        return path.suffix == ".wandb" and path.parent.name != "latest-run"

    @classmethod
    def run_dir(cls, path: Path) -> Path:
        """The ``offline-run-...`` (or ``run-...``) folder holding the file."""
        return path.parent

    def get_state(self) -> dict[str, Any]:
        return {"offset": self.offset, "identity": self.identity, "discard": self.discard,
                "suspect": self.suspect, "resync": self.resync, "bad_header": self.bad_header}

    def set_state(self, state: dict[str, Any]) -> None:
        self.offset = int(state.get("offset", 0))
        ident = state.get("identity")
        self.identity = tuple(ident) if ident else None
        for flag in ("discard", "suspect", "resync", "bad_header"):
            setattr(self, flag, bool(state.get(flag, False)))

    def read(self) -> list[Record]:
        self.restarted = self.more = False
        size = READ_BLOCK
        while True:
            start = self.offset
            out = self._read(size)
            # A record longer than the read window: read more at once (bounded by MAX_RECORD).
            if self.offset != start or not self.more or size > 2 * (MAX_RECORD + BLOCK):
                return out
            size *= 2

    def _read(self, size: int) -> list[Record]:
        data = self._load(size)
        if not data:
            return []
        base = self.offset
        if base == 0:
            if not self._check_header(data):
                return []
            base, data = len(FILE_HEADER), data[len(FILE_HEADER):]
            self.offset = base
        out: list[Record] = []
        for payload in self._records(memoryview(data), base):
            record = self._decode(payload)
            if record is not None:
                out.append(record)
        return out

    def _load(self, size: int) -> bytes:
        """Up to ``size`` bytes from the offset; handles a replaced or truncated file."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                identity = (st.st_dev, st.st_ino)
                if (self.identity is not None and identity != self.identity) or st.st_size < self.offset:
                    self._reset()
                    self.restarted = True
                self.identity = identity
                if self.bad_header or st.st_size <= self.offset:
                    return b""
                f.seek(self.offset)
                data = f.read(size)
        except FileNotFoundError:
            return b""
        self.more = len(data) >= size
        return data

    def _check_header(self, data: bytes) -> bool:
        """True when the file header is complete and valid; counts a bad one."""
        if len(data) < len(FILE_HEADER):
            if FILE_HEADER.startswith(data):
                return False  # still being written
        elif data[:6] == FILE_HEADER[:6]:
            return True  # a version other than 0 is read as version 0
        self.bad_header = True
        self.skip("file without a W&B header", repr(data[:7]))
        return False

    def _records(self, data: memoryview, base: int) -> Iterator[memoryview | bytes]:
        """Logical record payloads from ``data`` (which starts at file offset ``base``).

        Advances ``self.offset`` past what was consumed; an incomplete tail stays unread.
        """
        pos = commit = 0
        frags: list[memoryview] | None = None
        frag_start = frag_size = 0
        end = len(data)
        while True:
            block_left = BLOCK - (base + pos) % BLOCK
            if self.resync:  # to the next block boundary at or after pos
                jump = block_left % BLOCK
                if pos + jump > end:
                    commit = end
                    break
                pos = commit = pos + jump
                self.resync = False
                continue
            if block_left < PHYS.size:  # zero padding at a block's end
                if pos + block_left > end:
                    break
                pos += block_left
                if frags is None:
                    commit = pos
                continue
            if end - pos < PHYS.size:
                break
            crc, length, rtype = PHYS.unpack_from(data, pos)
            if rtype not in _TYPE_CRC or PHYS.size + length > block_left:
                if not self.suspect:  # else counted with the bad record before it
                    self._corrupt(f"impossible record header at byte {base + pos}")
                frags, self.resync, self.suspect = None, True, False
                pos += 1  # the boundary to resync at is after this header
                commit = pos
                continue
            stop = pos + PHYS.size + length
            if stop > end:
                break
            payload = data[pos + PHYS.size:stop]
            if zlib.crc32(payload, _TYPE_CRC[rtype]) != crc:
                frags = None
                if self.suspect:  # two bad records in a row: the length is not to be trusted
                    self.resync, self.suspect = True, False
                    pos = commit = pos + 1
                    continue
                self._corrupt(f"CRC mismatch at byte {base + pos}")
                self.suspect = True
                pos = commit = stop
                continue
            self.suspect = False
            if rtype == FULL:
                if frags is not None:
                    self.skip("incomplete W&B record", f"FIRST without LAST before byte {base + pos}")
                frags, self.discard = None, False
                yield payload
            elif rtype == FIRST:
                if frags is not None:
                    self.skip("incomplete W&B record", f"FIRST without LAST before byte {base + pos}")
                frags, frag_start, frag_size, self.discard = [payload], pos, length, False
            elif frags is None:  # MIDDLE or LAST of a record we are not assembling
                if not self.discard:
                    self.skip("orphan W&B record fragment", f"at byte {base + pos}")
                self.discard = rtype != LAST
            elif rtype == LAST:
                frags.append(payload)
                yield b"".join(frags)
                frags = None
            else:
                frags.append(payload)
                frag_size += length
                if frag_size > MAX_RECORD:
                    self.skip("over-long W&B record", f"> {MAX_RECORD} bytes")
                    frags, self.discard = None, True
            pos = stop
            if frags is None:
                commit = pos
        if frags is not None:
            commit = frag_start
        self.offset = base + commit

    def _corrupt(self, detail: str) -> None:
        self.skip("corrupt W&B record", detail)
        self.discard = True

    def _decode(self, payload: memoryview | bytes) -> Record | None:
        try:
            values = history_values(payload)
        except (ValueError, IndexError) as exc:
            self.skip("undecodable W&B record", str(exc))
            return None
        if values is None:
            return None
        record = split_counters(values)
        if not record.metrics and record.step is None and record.epoch is None:
            return None
        return record


@hookimpl
def register_readers(register) -> None:
    register(WandbReader)
