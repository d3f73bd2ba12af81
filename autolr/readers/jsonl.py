"""JSON Lines logs: one object per line, free-form keys, numbers possibly as strings.

Nested objects are flattened with ``/`` (``{"train": {"loss": 1}}`` gives ``train/loss``).
"""
from __future__ import annotations

import json
import json.scanner
import math
import re
from operator import itemgetter
from pathlib import Path
from typing import Any

from ..hookspecs import hookimpl
from . import FIT_START_FILE
import numpy as np

from ..records import EPOCH_KEYS, STEP_KEYS, Record, split_counters
from .base import Reader, TextTailer
from .block import BAD, FLOAT, Batch, _counters, _records, counters, interleave, parse_numbers, paused_gc, pieces


def numeric_items(obj: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric values of a JSON object (numeric strings included), flattened with ``/``."""
    out: dict[str, float] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}" if prefix else key
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float):
            out[name] = value
        elif isinstance(value, int):
            try:
                out[name] = float(value)
            except OverflowError:  # an integer beyond float range, as float("1e999") would be
                out[name] = math.inf if value > 0 else -math.inf
        elif isinstance(value, str):
            try:
                out[name] = float(value)
            except ValueError:
                pass
        elif isinstance(value, dict):
            out.update(numeric_items(value, name + "/"))
    return out


class JsonlReader(Reader):
    name = "jsonl"
    #: Parse whole blocks into columns (False: every line alone, the exact path; for tests).
    block_parsing = True
    #: Fewer lines than this go line by line: the vectorised path costs ~0.2-0.3 ms a call,
    #: the exact one ~4 us a line (a live log brings a few lines a read); even at ~90 lines.
    min_block_lines = 96

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.tailer = TextTailer(self.path, self)

    @classmethod
    def matches(cls, path: Path) -> bool:
        return path.suffix.lower() in (".jsonl", ".ndjson")

    def get_state(self) -> dict[str, Any]:
        return {"tail": self.tailer.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.tailer.set_state(state.get("tail", {}))

    def read(self) -> list[Record]:
        return self._read(columns=False)

    def read_batch(self) -> Batch:
        """``read()`` as columns: the same rows, in the same order."""
        return self._read(columns=True)

    def _read(self, columns: bool):
        self.restarted = False
        block = self.tailer.read_block()
        if not block:
            return Batch.empty() if columns else []
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n")
        if not columns and (not self.block_parsing or block.count(b"\n") < self.min_block_lines):
            lines = block.split(b"\n")  # a live log's few lines: no numpy at all
            lines.pop()
            return [r for r in map(self.parse, lines) if r is not None]
        parts = [self._rows(piece, columns) for piece in pieces(block)]
        if columns:
            return Batch.concat(parts)
        return parts[0] if len(parts) == 1 else [r for part in parts for r in part]

    def _rows(self, block: bytes, columns: bool):
        """The rows of ``block`` (complete lines), as columns or Records."""
        if self.block_parsing and block.count(b"\n") >= self.min_block_lines:
            groups, fast, lines = fast_objects(block)
        else:
            groups, fast, lines = [], np.zeros(block.count(b"\n"), bool), block.split(b"\n")
        slow: list[Record] = []
        at: list[int] = []
        for i in np.flatnonzero(~fast).tolist():
            record = self.parse(lines[i])
            if record is not None:
                slow.append(record)
                at.append(i)
        if columns:
            batches = [Batch.from_records(slow)] if slow else []
            where = [np.asarray(at, np.int64)] if slow else []
            for keys, rows, values, steps, epochs in groups:
                batches.append(_group_batch(keys, values, steps, epochs))
                where.append(rows)
            if not batches:
                return Batch.empty()
            batch = Batch.concat(batches)
            return batch.take(np.argsort(np.concatenate(where), kind="stable")) if len(batches) > 1 else batch
        with paused_gc():
            return self._assemble(groups, slow, at)

    @staticmethod
    def _assemble(groups: list[tuple], slow: list[Record], at: list[int]) -> list[Record]:
        """The groups' and the exact path's records in line order."""
        if len(groups) == 1:
            keys, rows, values, steps, epochs = groups[0]
            recs = _records(keys, list(values.T), *_counters(steps, epochs))
            return interleave(recs, rows, slow, at)
        parts: list[Record] = list(slow)
        where = [np.asarray(at, np.int64)]
        for keys, rows, values, steps, epochs in groups:
            parts += _records(keys, list(values.T), *_counters(steps, epochs))
            where.append(rows)
        if len(parts) < 2:
            return parts
        order = np.argsort(np.concatenate(where), kind="stable")  # line numbers to log order
        return list(itemgetter(*order.tolist())(parts))

    def parse(self, line: bytes) -> Record | None:
        try:  # UTF-8 straight to json's scanner; anything else takes json.loads's own path
            text = line.decode()
            obj, end = _scan(text, 0)
            if end != len(text) and not text[end:].isspace():
                raise ValueError("extra data")
        except (ValueError, StopIteration, RecursionError):
            if not line.strip():
                return None
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:
                self.skip("invalid JSON line", str(exc)[:80])
                return None
        if not isinstance(obj, dict):
            self.skip("JSON line that is not an object")
            return None
        return split_counters(numeric_items(obj), copy=False)  # a dict of its own


_scan = json.scanner.make_scanner(json.JSONDecoder())  # (obj, end) from an index: decode() minus its wrappers

#: A flat object on one line with its values cut out (``{"step":, "loss":}``): its skeleton.
_SKELETON = re.compile(rb'\{(?:[ \t]*"[^"]*"[ \t]*:[ \t]?(?:,[ \t]*"[^"]*"[ \t]*:[ \t]?)*)?[ \t]*\}')
_KEY = re.compile(rb'"([^"]*)"')
#: Bytes a line of the fast path may hold: printable ASCII but for backslash and brackets.
_PLAIN = np.zeros(256, bool)
_PLAIN[0x20:0x7F] = True
_PLAIN[[ord("\\"), ord("["), ord("]")]] = False
_BRACE, _QUOTE, _COLON, _COMMA, _NL, _ODD = range(1, 7)
_CODE = np.where(_PLAIN, 0, _ODD).astype(np.uint8)
_CODE[[ord("{"), ord("}")]] = _BRACE
_CODE[ord('"')] = _QUOTE
_CODE[ord(":")] = _COLON
_CODE[ord(",")] = _COMMA
_CODE[ord("\n")] = _NL
_TOKEN = _CODE != 0


def fast_objects(block: bytes) -> tuple[list[tuple], np.ndarray, list[bytes]]:
    """The lines of ``block`` that are flat objects of plain numbers (``{"step": 3, "loss":
    0.5}``), parsed at once and grouped by their keys: ``(keys, line numbers, values (rows x
    keys), steps, epochs)`` per group, counters split off as ``split_counters`` does; the mask
    of those lines; all lines (None when every line is in a group). Any other line is left
    to the exact path."""
    buf = np.frombuffer(block, np.uint8)
    tok = np.flatnonzero(_TOKEN[buf])  # the structural bytes, and those that rule a line out
    code = _CODE[buf[tok]]
    newline = code == _NL
    ends = tok[newline]
    nlines = len(ends)
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    line = np.cumsum(newline) - newline  # the line of each token
    ok = (ends - starts >= 2) & (buf[starts] == 0x7B) & (buf[np.maximum(ends - 1, 0)] == 0x7D)
    ok &= np.bincount(line[code == _ODD], minlength=nlines) == 0
    ok &= np.bincount(line[code == _BRACE], minlength=nlines) == 2
    quote = code == _QUOTE
    quotes = np.bincount(line[quote], minlength=nlines)
    ok &= (quotes & 1) == 0
    if not ok.any():
        return [], ok, block.split(b"\n")
    before = np.cumsum(quote) - quote  # quotes before each token, then before each line
    qbase = np.cumsum(quotes) - quotes
    sep = ((code == _COLON) | (code == _COMMA)) & (((before - qbase[line]) & 1) == 0)
    sep &= ok[line]
    seps, sep_line = tok[sep], line[sep]
    colon = buf[seps] == 0x3A
    # members alternate ':' ',' ':' ... ':' within a line
    per_line = np.bincount(sep_line, minlength=nlines)
    first_sep = np.cumsum(per_line) - per_line
    rank = np.arange(len(seps)) - first_sep[sep_line]
    wrong = colon != (rank % 2 == 0)
    ok[sep_line[wrong]] = False
    ok &= ((per_line % 2) == 1) | (per_line == 0)
    # values: after each ':' up to the next ',' or the closing brace
    c = np.flatnonzero(colon)
    vstart = seps[c] + 1
    nxt = np.minimum(c + 1, len(seps) - 1)
    last = (c + 1 >= len(seps)) | (sep_line[nxt] != sep_line[c])
    vend = np.where(last, ends[sep_line[c]] - 1, seps[nxt])
    vstart += buf[vstart] == 0x20  # the usual space after ':' (spaces are allowed anyway)
    values, kinds = parse_numbers(buf, vstart, vend - vstart, strict_json=True)
    vline = sep_line[c]
    ok[vline[kinds == BAD]] = False
    keep = np.ones(len(buf), bool)  # the value bytes cut out leave the line's skeleton
    vlen = np.where(kinds == BAD, 0, vend - vstart)
    for k in range(int(vlen.max(initial=0))):
        keep[vstart[vlen > k] + k] = False
    skeleton = buf[keep].tobytes().split(b"\n")[:nlines]
    ids = {sk: i for i, sk in enumerate(dict.fromkeys(skeleton))}
    if len(ids) == 1:
        tid = np.zeros(nlines, np.int64)
    else:
        tid = np.fromiter(map(ids.__getitem__, skeleton), np.int64, nlines)
    nvals = np.bincount(vline, minlength=nlines)
    vbase = np.cumsum(nvals) - nvals
    groups = []
    for sk, t in ids.items():
        rows = np.flatnonzero(ok & (tid == t))
        if not rows.size:
            continue
        if _SKELETON.fullmatch(sk) is None:
            ok[rows] = False
            continue
        keys = [k.decode("ascii") for k in _KEY.findall(sk)]
        idx = vbase[rows][:, None] + np.arange(len(keys))
        vals, kind = values[idx], kinds[idx]
        floats = np.flatnonzero(kind.ravel() == FLOAT)
        if floats.size:  # well-formed numbers beyond the exact fast rule
            flat = vals.ravel()
            pos = idx.ravel()[floats]
            for j, a, b in zip(floats.tolist(), vstart[pos].tolist(), vend[pos].tolist()):
                flat[j] = float(block[a:b])
        groups.append((*_members(keys, vals), rows))
    groups = [(keys, rows, vals, steps, epochs) for keys, vals, steps, epochs, rows in groups]
    return groups, ok, None if ok.all() else block.split(b"\n")


def _members(keys: list[str], vals: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """A group's metric names and columns (a repeated key keeps its last value at its first
    place), with the counters taken out: (names, values, steps, epochs)."""
    col = {}
    for j, k in enumerate(keys):
        col[k] = j
    n = len(vals)
    cols = {k: vals[:, j] for k, j in col.items()}
    steps, epochs = counters(list(col), cols, {}, n)
    counted = set(STEP_KEYS) | set(EPOCH_KEYS)
    names = [k for k in col if k not in counted]
    out = vals[:, [col[k] for k in names]] if names else np.zeros((n, 0))
    return names, out, steps, epochs


def _group_batch(keys: list[str], values: np.ndarray, steps: np.ndarray, epochs: np.ndarray) -> Batch:
    return Batch(steps, epochs, {k: values[:, j] for j, k in enumerate(keys)})


class FitStartReader(JsonlReader):
    """A callback's fit starts (autolr-fit.jsonl: the step each fit starts at), beside any log."""

    name = "fit-start"
    priority = 20  # the file is a JSONL's, but this reader's
    #: Read beside the run's log of another kind (a run keeps one kind of log: the same metrics
    #: twice would double every observation). Its rows carry a step and no metric: a Lightning
    #: run, whose CSVLogger writes its first rows at its first flush, counts in steps from its
    #: first step on (the control file lists a warmup ahead from there). Its rows are a lane of
    #: their own (Run.lane_of): read apart from the log, they never rewind the run.
    companion = True

    @classmethod
    def matches(cls, path: Path) -> bool:
        return path.name == FIT_START_FILE


@hookimpl
def register_readers(register) -> None:
    register(JsonlReader)
    register(FitStartReader)
