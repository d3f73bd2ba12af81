"""Block parsing of CSV and JSONL: the columnar fast path equals the exact per-line path.

The reference is the same reader with the fast path switched off (every line parsed alone by
``csv.reader`` / ``json.loads``, as before block parsing): same records, same skip counts and
messages, for any bytes in any chunking, and ``read_batch()`` holds the same rows as ``read()``.
"""
from __future__ import annotations

import importlib
import json
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from autolr.readers import block
from autolr.readers.block import BAD, FLOAT, NUMBER, Batch, parse_numbers
from autolr.readers.csv import CsvReader
from autolr.readers.jsonl import JsonlReader
from autolr.records import Record

FUZZ = settings(max_examples=int(os.environ.get("AUTOLR_BLOCK_EXAMPLES", 150)), deadline=None, suppress_health_check=list(HealthCheck))


class Logged:
    """Keeps every skip call (what, detail) in order."""

    def skip(self, what: str, detail: str = "") -> None:
        self.calls = getattr(self, "calls", [])
        self.calls.append((what, detail))
        super().skip(what, detail)


class FastCsv(Logged, CsvReader):
    min_block_lines = 0  # the vectorised path even for a line or two


class SlowCsv(Logged, CsvReader):
    block_parsing = False


class FastJsonl(Logged, JsonlReader):
    min_block_lines = 0


class SlowJsonl(Logged, JsonlReader):
    block_parsing = False


def key(r: Record) -> tuple:
    return (repr(r.step), repr(r.epoch), r.run, r.restart, sorted((k, repr(v)) for k, v in r.metrics.items()))


def ordered(r: Record) -> tuple:
    """``key`` with the metrics' order kept (the exact path's dict order)."""
    return (repr(r.step), repr(r.epoch), [(k, repr(v)) for k, v in r.metrics.items()])


def feed(cls, path, chunks, columns=False):
    path.write_bytes(b"")
    reader = cls(path)
    out = []
    for chunk in chunks:
        with open(path, "ab") as f:
            f.write(chunk)
        while True:
            got = reader.read_batch() if columns else reader.read()
            if columns:
                assert isinstance(got, Batch)
                got = got.records()
            out += got
            if not reader.more:
                break
    reader.close()
    return out, getattr(reader, "calls", []), reader


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def check(fast_cls, slow_cls, tmp, data: bytes, cuts: list[int], piece: int = 0):
    saved = block.PIECE
    block.PIECE = piece or saved  # small pieces: a block parsed a few lines at a time
    try:
        compare(fast_cls, slow_cls, tmp, data, cuts)
    finally:
        block.PIECE = saved


def compare(fast_cls, slow_cls, tmp, data: bytes, cuts: list[int]):
    ref, ref_calls, ref_reader = feed(slow_cls, tmp / "ref", [data])
    got, calls, reader = feed(fast_cls, tmp / "whole", [data])
    assert [ordered(r) for r in got] == [ordered(r) for r in ref]
    assert calls == ref_calls
    if fast_cls is FastCsv:
        assert (reader.header, reader.delivered, reader.to_skip) == \
            (ref_reader.header, ref_reader.delivered, ref_reader.to_skip)
    parts, part_calls, _ = feed(fast_cls, tmp / "parts", chunked(data, cuts))
    assert [key(r) for r in parts] == [key(r) for r in ref]
    assert sorted(part_calls) == sorted(ref_calls) or len(part_calls) == len(ref_calls)
    cols, col_calls, _ = feed(fast_cls, tmp / "cols", chunked(data, cuts), columns=True)
    assert [key(r) for r in cols] == [key(r) for r in ref]


# ---- generated logs ---------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(min_value=-1e6, max_value=1e6).map(lambda x: f"{x:.6f}"),
    st.floats(min_value=1e-12, max_value=1.0).map(lambda x: f"{x:.4e}"),
    st.integers(-10**20, 10**20).map(str),
    st.sampled_from(["0", "-0", "-0.0", "01", ".5", "5.", "+3", "1e400", "1e-400", "1E5", "2e-05", "1_0",
                     "0.30000000000000004", "123456789012345678", "9007199254740993", "1e22", "1e23"]),
)
CELLS = st.one_of(NUMBERS, NUMBERS.map(lambda s: f" {s} "), st.sampled_from(
    ["", "", "NA", "N/A", "None", "null", "nan", "inf", "-inf", "abc", '"1,5"', '"2.5"', "1.5\r2", "\u0663",
     "2024-01-01 10:00:00", " ", "1 2", "--1", "1e", "e1", ".", "-"]))
NAMES = st.sampled_from(["step", "epoch", "loss", "val_loss", "lr-Adam", "global_step", "a b", "loss"])


@st.composite
def csv_logs(draw):
    header = draw(st.lists(NAMES, min_size=1, max_size=5))
    out = [",".join(header)]
    for _ in range(draw(st.integers(0, 30))):
        n = len(header) + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))
        out.append(",".join(draw(st.lists(CELLS, min_size=max(n, 0), max_size=max(n, 0)))))
    end = draw(st.sampled_from(["\n", "\r\n"]))
    return (end.join(out) + end).encode("utf-8", "surrogatepass")


JVALUES = st.one_of(NUMBERS, NUMBERS.map(lambda s: f'"{s}"'), st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "true", "false", "null", '"x"', "[1, 2]", '{"b": 1}', "1.", "-", "", " 2 "]))
JKEYS = st.one_of(NAMES, st.sampled_from(["a:b", "a,b", "é", "k\\u0041", "x{", "", "#1"]))


@st.composite
def jsonl_logs(draw):
    lines = []
    for _ in range(draw(st.integers(0, 30))):
        if draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.sampled_from(["", " ", "[]", "{", "{}", '{"a":1,}', '{"a" 1}', '{"a":1 "b":2}',
                                               ' {"a": 1}', '{"a": 1} ', '{"a":1}{"b":2}', "garbage"])))
            continue
        items = draw(st.lists(st.tuples(JKEYS, JVALUES), max_size=5))
        sep = draw(st.sampled_from([(", ", ": "), (",", ":"), (" , ", " :  "), (",\t", ":\t")]))
        lines.append("{" + sep[0].join(f'"{k}"{sep[1]}{v}' for k, v in items) + "}")
    end = draw(st.sampled_from(["\n", "\r\n"]))
    return (end.join(lines) + end).encode("utf-8")


CUTS = st.lists(st.integers(min_value=0), max_size=8)
PIECES = st.sampled_from([0, 0, 1, 7, 60])


@FUZZ
@given(data=csv_logs(), cuts=CUTS, piece=PIECES)
def test_csv_fast_path_equals_exact_path(tmp_path_factory, data, cuts, piece):
    check(FastCsv, SlowCsv, tmp_path_factory.mktemp("csv"), data, cuts, piece)


@FUZZ
@given(data=st.binary(max_size=2000), cuts=CUTS, seed=st.booleans(), piece=PIECES)
def test_csv_any_bytes(tmp_path_factory, data, cuts, seed, piece):
    if seed:
        data = b"epoch,step,loss,val_loss\n0,1,2.5,\n0,2,,1.5\n" + data
    check(FastCsv, SlowCsv, tmp_path_factory.mktemp("csvb"), data, cuts, piece)


@FUZZ
@given(data=jsonl_logs(), cuts=CUTS, piece=PIECES)
def test_jsonl_fast_path_equals_exact_path(tmp_path_factory, data, cuts, piece):
    check(FastJsonl, SlowJsonl, tmp_path_factory.mktemp("jsonl"), data, cuts, piece)


@FUZZ
@given(data=st.binary(max_size=2000), cuts=CUTS, seed=st.booleans(), piece=PIECES)
def test_jsonl_any_bytes(tmp_path_factory, data, cuts, seed, piece):
    if seed:
        data = b'{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25, "lr": 1e-05}\n' + data
    check(FastJsonl, SlowJsonl, tmp_path_factory.mktemp("jsonlb"), data, cuts, piece)


# ---- the number parser --------------------------------------------------------------------------

def reference(token: bytes, strict_json: bool):
    try:
        if strict_json:
            v = json.loads(token)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return None
            return float(v)
        return float(token)
    except (ValueError, OverflowError):
        return None


@FUZZ
@given(tokens=st.lists(NUMBERS.map(str.encode) | st.binary(max_size=12), min_size=1, max_size=40),
       strict=st.booleans())
def test_parse_numbers_is_exact(tokens, strict):
    buf = b"".join(tokens)
    lengths = np.array([len(t) for t in tokens])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    values, kinds = parse_numbers(np.frombuffer(buf, np.uint8), starts, lengths, strict)
    for t, v, k in zip(tokens, values.tolist(), kinds.tolist()):
        ref = reference(t, strict)
        if k == NUMBER:
            assert repr(v) == repr(ref), t
        elif k == FLOAT:
            assert ref is not None, t
        else:
            assert k == BAD


def test_lightning_columns(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"epoch,step,train_loss,val_loss\n0,0,2.5,\n0,1,2.25,\n0,1,,3.5\n1,2,nan,\n")
    batch = FastCsv(path).read_batch()
    assert batch.steps.tolist() == [0, 1, 1, 2] and batch.epochs.tolist() == [0, 0, 0, 1]
    assert list(batch.metrics) == ["train_loss", "val_loss"]
    assert batch.present["train_loss"].tolist() == [True, True, False, True]
    assert math.isnan(batch.metrics["train_loss"][3])
    assert batch.present["val_loss"].tolist() == [False, False, True, False]
    assert batch.records()[2] == Record({"val_loss": 3.5}, 1, 0.0)


def test_jsonl_columns(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.5}\n{"step": 2, "loss": "2.25"}\n{"step": 3, "val": -0}\n')
    reader = FastJsonl(path)
    batch = reader.read_batch()
    assert batch.steps.tolist() == [1, 2, 3]
    assert batch.metrics["loss"][:2].tolist() == [2.5, 2.25] and batch.present["loss"].tolist() == [1, 1, 0]
    assert repr(float(batch.metrics["val"][2])) == "0.0"  # JSON's -0 is the integer 0


@pytest.mark.parametrize("cls,name,row", [(FastCsv, "m.csv", b"%d,1.5\n"),
                                          (FastJsonl, "m.jsonl", b'{"step": %d, "loss": 1.5}\n')])
def test_block_boundaries_and_long_lines(tmp_path, monkeypatch, cls, name, row):
    from autolr.readers import base
    monkeypatch.setattr(base, "READ_BLOCK", 64)
    monkeypatch.setattr(base, "MAX_LINE", 40)
    path = tmp_path / name
    head = b"step,loss\n" if cls is FastCsv else b""
    path.write_bytes(head + b"".join(row % i for i in range(5)) + b"x" * 100 + b"\n" + row % 9)
    reader = cls(path)
    out = []
    while True:
        out += reader.read()
        if not reader.more:
            break
    assert [r.step for r in out] == [0, 1, 2, 3, 4, 9]
    assert reader.skipped["over-long line"] == 1


def test_records_pause_the_collector_only_while_building(tmp_path):
    import gc

    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.5}\n' * 10)
    assert len(FastJsonl(path).read()) == 10 and gc.isenabled()
    gc.disable()
    try:
        assert len(FastJsonl(path).read()) == 10 and not gc.isenabled()
    finally:
        gc.enable()


@FUZZ
@given(rows=st.lists(st.tuples(st.dictionaries(st.sampled_from([f"m{i}" for i in range(70)]),
                                               st.floats(allow_nan=True), max_size=70),
                               st.none() | st.integers(-2**53, 2**53), st.none() | st.floats(allow_nan=False)),
                     max_size=30),
       wide=st.booleans())
def test_batch_round_trip(rows, wide):
    """Records -> Batch -> Records, with few and with many (> 16, > 60) partial columns."""
    if not wide:
        rows = [({k: v for k, v in m.items() if int(k[1:]) < 5}, s, e) for m, s, e in rows]
    records = [Record(m, s, e) for m, s, e in rows]
    back = Batch.from_records(records).records()
    assert [key(r) for r in back] == [key(r) for r in records]
    joined = Batch.concat([Batch.from_records(records[:3]), Batch.from_records(records[3:])]).records()
    assert [key(r) for r in joined] == [key(r) for r in back]


@pytest.mark.parametrize("cls,name,row", [(CsvReader, "m.csv", b"%d,1.5\n"),
                                          (JsonlReader, "m.jsonl", b'{"step": %d, "loss": 1.5}\n')])
def test_a_few_lines_go_line_by_line(tmp_path, monkeypatch, cls, name, row):
    calls = []
    monkeypatch.setattr(importlib.import_module(cls.__module__), "parse_numbers",
                        lambda *a, **k: calls.append(1) or parse_numbers(*a, **k))
    path = tmp_path / name
    head = b"step,loss\n" if cls is CsvReader else b""
    path.write_bytes(head + b"".join(row % i for i in range(3)))
    reader = cls(path)
    assert [r.step for r in reader.read()] == [0, 1, 2] and not calls  # the exact path
    with open(path, "ab") as f:
        f.write(b"".join(row % i for i in range(3, 3 + cls.min_block_lines)))
    assert len(reader.read()) == cls.min_block_lines and calls  # a block: vectorised
