"""JsonlReader against JSON Lines written by a real (tiny) torch training loop, tailed live.

No installed framework writes plain JSONL, so the writer is the usual hand-rolled one: a torch
loop that appends ``json.dumps(stats)`` lines and flushes, in three styles: plain numbers,
nested objects, and fairseq's numbers-as-strings (``"loss": "16.475"``).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autolr.readers import base
from autolr.readers.jsonl import JsonlReader, numeric_items
from autolr.records import Record

from .readers_util import (
    check_parse_cuts,
    drain,
    grow,
    norm,
    random_cuts,
    resumed,
    rewrite_in_place,
    special_cuts,
    whole,
)

SEEDS = range(6)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def fairseq_stat(v: float) -> str:
    return f"{v:.3f}"


def train(path: Path, steps: int, *, mode: str = "w", newline: str | None = None, seed: int = 0,
          tail: JsonlReader | None = None):
    """A tiny torch regression; one JSON line per step, flushed; ``tail`` reads after each."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    reads = []
    with open(path, mode, encoding="utf-8", newline=newline) as f:
        for step in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
            opt.step()
            lr = opt.param_groups[0]["lr"]
            if step % 3 == 0:  # plain
                stats = {"step": step, "epoch": step / 4, "loss": loss.item(), "lr": lr, "tag": "train"}
            elif step % 3 == 1:  # nested, with a multi-byte key
                stats = {"global_step": step, "train": {"loss": loss.item(), "grad": {"norm": gnorm}},
                         "Δlr": lr, "done": False, "note": None}
            else:  # fairseq style
                stats = {"epoch": step // 4 + 1, "loss": fairseq_stat(loss.item()), "lr": f"{lr:g}",
                         "num_updates": str(step), "wall": "0"}
            f.write(json.dumps(stats, ensure_ascii=False) + "\n")
            f.flush()
            if tail is not None:
                reads.append((drain(tail), tail.restarted))
    return reads


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jsonl")
    path = folder / "log.jsonl"
    live = JsonlReader(path)
    late = JsonlReader(path)
    out = {"path": path}
    out["reads1"] = train(path, 9, tail=live)
    out["run1"] = path.read_bytes()
    out["late1"] = drain(late)
    out["reads2"] = train(path, 3, mode="w", seed=1, tail=live)  # a new run truncates
    out["run2"] = path.read_bytes()
    out["late2"] = (drain(late), late.restarted)
    crlf = folder / "crlf.jsonl"
    train(crlf, 9, newline="\r\n", seed=2)
    out["crlf"] = crlf.read_bytes()
    return out


def test_written_file_has_the_three_styles(runs):
    text = runs["run1"].decode("utf-8")
    assert '"loss": "' in text and '"train": {"loss"' in text and "Δlr" in text
    assert runs["crlf"].count(b"\r\n") == 9


def test_live_tail_equals_whole_read(runs, tmp_path):
    live = [r for recs, _ in runs["reads1"] for r in recs]
    assert all(len(recs) == 1 and not restarted for recs, restarted in runs["reads1"])
    records, skipped = whole(JsonlReader, write(tmp_path / "a.jsonl", runs["run1"]))
    assert norm(live) == norm(records) and skipped == {}
    assert [r.step for r in records] == list(range(9))


def test_value_styles(runs, tmp_path):
    records, _ = whole(JsonlReader, write(tmp_path / "a.jsonl", runs["run1"]))
    plain, nested, fairseq = records[0], records[1], records[2]
    assert set(plain.metrics) == {"loss", "lr"} and plain.epoch == 0.0  # "tag" is text
    assert set(nested.metrics) == {"train/loss", "train/grad/norm", "Δlr"}  # bool/null ignored
    assert nested.step == 1
    assert fairseq.step == 2 and fairseq.epoch == 1.0
    assert fairseq.metrics["lr"] == 0.1 and fairseq.metrics["wall"] == 0.0
    assert fairseq.metrics["loss"] == float(fairseq_stat(fairseq.metrics["loss"]))
    line = json.loads(runs["run1"].splitlines()[2])
    assert fairseq.metrics["loss"] == float(line["loss"])


def test_new_run_truncating_the_file_restarts_the_live_reader(runs, tmp_path):
    (first, restarted), *rest = runs["reads2"]
    assert restarted and [r.step for r in first] == [0]
    assert not any(r for _, r in rest)
    again = first + [r for recs, _ in rest for r in recs]
    assert norm(again) == norm(whole(JsonlReader, write(tmp_path / "b.jsonl", runs["run2"]))[0])


def test_truncation_regrown_past_the_offset_is_detected(tmp_path):
    """Truncated and rewritten to a larger size before the reader looks again."""
    path = write(tmp_path / "a.jsonl", b'{"step": 0, "loss": 1.5}\n')
    reader = JsonlReader(path)
    assert [r.step for r in drain(reader)] == [0]
    rewrite_in_place(path, b'{"step": 0, "loss": 2.5}\n{"step": 1, "loss": 2.25}\n', "w")
    again = drain(reader)
    assert reader.restarted
    assert [(r.step, r.metrics["loss"]) for r in again] == [(0, 2.5), (1, 2.25)]


def test_late_reader_sees_new_run_from_its_start(runs, tmp_path):
    records, restarted = runs["late2"]
    assert restarted
    assert norm(records) == norm(whole(JsonlReader, write(tmp_path / "b.jsonl", runs["run2"]))[0])


def test_replaced_file_restarts(runs, tmp_path):
    path = write(tmp_path / "a.jsonl", runs["run2"])
    reader = JsonlReader(path)
    drain(reader)
    write(tmp_path / "new.jsonl", runs["run1"])
    inode = path.stat().st_ino
    os.replace(tmp_path / "new.jsonl", path)
    assert path.stat().st_ino != inode
    again = drain(reader)
    assert reader.restarted and len(again) == 9
    assert drain(reader) == [] and not reader.restarted


def test_shrunk_file_restarts(runs, tmp_path):
    path = write(tmp_path / "a.jsonl", runs["run1"])
    reader = JsonlReader(path)
    drain(reader)
    rewrite_in_place(path, runs["run2"])
    assert [r.step for r in drain(reader)] == [0, 1, 2] and reader.restarted


def test_real_files_grown_in_random_chunks_equal_whole_read(runs, tmp_path):
    for name in ("run1", "crlf"):
        data = runs[name]
        want = whole(JsonlReader, write(tmp_path / f"{name}.jsonl", data))
        specials = special_cuts(data)
        assert any(data[c] & 0xC0 == 0x80 for c in specials)  # inside "Δ"
        if name == "crlf":
            assert any(data[c - 1 : c + 1] == b"\r\n" for c in specials)
        for seed in SEEDS:
            path = tmp_path / f"{name}-{seed}.jsonl"
            reader = JsonlReader(path)
            got = grow(reader, path, data, random_cuts(data, seed, extra=specials if seed % 2 else ()))
            assert norm(got) == norm(want[0]), (name, seed)
            assert dict(reader.skipped) == want[1] == {}


def test_partial_last_line_is_held_back(tmp_path):
    path = write(tmp_path / "a.jsonl", b'{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    reader = JsonlReader(path)
    assert [r.step for r in drain(reader)] == [1]
    assert drain(reader) == [] and reader.skipped == {}
    with open(path, "ab") as f:
        f.write(b'ss": 0.25}')
    assert drain(reader) == []
    with open(path, "ab") as f:
        f.write(b"\n")
    assert [(r.step, r.metrics) for r in drain(reader)] == [(2, {"loss": 0.25})]


@pytest.mark.parametrize("which", ["run1", "crlf"])
def test_state_round_trip_mid_file(runs, tmp_path, which):
    data = runs[which]
    full = norm(whole(JsonlReader, write(tmp_path / "full.jsonl", data))[0])
    for cut in (1, len(data) // 3, len(data) // 2 + 1, len(data) - 1):
        path = write(tmp_path / f"part{cut}.jsonl", data[:cut])
        reader = JsonlReader(path)
        first = drain(reader)
        state = json.loads(json.dumps(reader.get_state()))
        with open(path, "ab") as f:
            f.write(data[cut:])
        fresh = JsonlReader(path)
        fresh.set_state(state)
        rest = drain(fresh)
        assert not fresh.restarted
        assert norm(first) + norm(rest) == full, cut


def test_state_from_before_a_truncation_restarts(runs, tmp_path):
    path = write(tmp_path / "a.jsonl", runs["run1"])
    reader = JsonlReader(path)
    drain(reader)
    rewrite_in_place(path, runs["run2"])
    fresh = resumed(JsonlReader, reader, path)
    assert len(drain(fresh)) == 3 and fresh.restarted


# ---------------------------------------------------------------------------------- garbage


def test_bad_lines_are_skipped_and_counted(tmp_path):
    lines = [
        b'{"step": 1, "loss": 0.5}',
        b"\xff\xfe\x00garbage\x81",               # binary
        b"[1, 2, 3]", b"42", b'"text"', b"null",   # JSON but not objects
        b'{"step": 2, "loss": ',                   # broken JSON
        b'{"step": 3, "loss": NaN, "gn": Infinity, "x": -Infinity}',
        b'{"step": "4", "loss": "nan", "lr": "inf", "name": "abc", "ok": true}',
        b'{"step": 5, "big": 1' + b"0" * 400 + b', "neg": -1' + b"0" * 400 + b"}",  # beyond float
        b'{"step": 6, "a": {"b": {"c": "1.5"}}, "l": [1, 2]}',
        b"   ",
        b"{}",
        b'{"step": 7, "loss": 0.125}',
    ]
    path = write(tmp_path / "bad.jsonl", b"\n".join(lines) + b"\n")
    reader = JsonlReader(path)
    records = drain(reader)
    by_step = {r.step: r.metrics for r in records}
    assert [r.step for r in records] == [1, 3, 4, 5, 6, None, 7]
    assert math.isnan(by_step[3]["loss"]) and by_step[3]["gn"] == math.inf and by_step[3]["x"] == -math.inf
    assert math.isnan(by_step[4]["loss"]) and by_step[4]["lr"] == math.inf and set(by_step[4]) == {"loss", "lr"}
    assert by_step[5] == {"big": math.inf, "neg": -math.inf}
    assert by_step[6] == {"a/b/c": 1.5}
    assert records[5].metrics == {}
    assert reader.skipped == {"invalid JSON line": 2, "JSON line that is not an object": 4}


@pytest.mark.parametrize("depth", [10, 500, 990, 1000, 5000, 100_000])
@pytest.mark.parametrize("shape", ["object", "array"])
def test_deep_nesting_never_raises(tmp_path, depth, shape):
    if shape == "object":
        line = b'{"a":' * depth + b"1" + b"}" * depth
    else:
        line = b'{"a":' + b"[" * depth + b"]" * depth + b', "loss": 1}'
    path = write(tmp_path / "deep.jsonl", line + b'\n{"step": 9}\n')
    reader = JsonlReader(path)
    records = drain(reader)  # must not raise RecursionError
    assert records[-1].step == 9
    assert len(records) + sum(reader.skipped.values()) == 2
    if len(records) == 2 and shape == "object":
        assert records[0].metrics == {"/".join(["a"] * depth): 1.0}


def test_numeric_items_flattens_with_slash():
    assert numeric_items({"a": {"b": 1, "c": {"d": "2"}}, "e": [3], "f": True}) == {"a/b": 1.0, "a/c/d": 2.0}


def test_three_megabyte_line_is_skipped_counted_and_never_returned(tmp_path):
    huge = b'{"loss": "' + b"7" * (3 << 20) + b'"}'
    data = b'{"step": 1}\n' + huge + b'\n{"step": 2}\n'
    path = write(tmp_path / "huge.jsonl", data)
    reader = JsonlReader(path)
    records = drain(reader)
    assert [(r.step, r.metrics) for r in records] == [(1, {}), (2, {})]
    assert reader.skipped == {"over-long line": 1}
    grown_path = tmp_path / "grown.jsonl"
    grown = JsonlReader(grown_path)
    got = grow(grown, grown_path, data, range(0, len(data), 200_000))
    assert norm(got) == norm(records) and grown.skipped == {"over-long line": 1}


def test_a_large_log_is_handed_on_a_parse_block_at_a_time(tmp_path):
    """Catching up on a large log: each read's records come from at most PARSE_BLOCK bytes of
    lines (the Records of one read are live at once), ``more`` until the end, nothing lost."""
    line = b'{"step": %d, "loss": 0.5}\n'
    data = b"".join(line % i for i in range(100_000))  # 2.7 MB: beyond one READ_BLOCK
    reader = JsonlReader(write(tmp_path / "big.jsonl", data))
    sizes, steps = [], []
    while True:
        records = reader.read()
        sizes.append(len(records))
        steps += [r.step for r in records]
        if not reader.more:
            break
    assert steps == list(range(100_000))
    assert max(sizes) <= base.PARSE_BLOCK // len(line % 0) + 1
    assert len(sizes) >= len(data) // base.PARSE_BLOCK


def test_over_long_line_memory_is_bounded(tmp_path):
    data = b'{"step": 1}\n' + b'{"x": "' + b"8" * (3 << 20) + b'"}\n{"step": 2}\n'
    path = write(tmp_path / "huge.jsonl", data)
    with mock.patch.object(base, "READ_BLOCK", 256 << 10), mock.patch.object(base, "MAX_LINE", 64 << 10):
        import tracemalloc

        reader = JsonlReader(path)
        tracemalloc.start()
        try:
            records = drain(reader)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert [r.step for r in records] == [1, 2] and reader.skipped == {"over-long line": 1}
    assert peak < 1 << 20, peak


def test_line_of_exactly_max_line_kept_however_it_arrives(tmp_path):
    with mock.patch.object(base, "MAX_LINE", 40):
        ok = b'{"loss": ' + b"1" * 30 + b"}"
        too_long = b'{"loss": ' + b"2" * 31 + b"}"
        assert len(ok) == 40 and len(too_long) == 41
        data = ok + b"\n" + too_long + b"\n" + b'{"step": 3}\n'
        want = whole(JsonlReader, write(tmp_path / "w.jsonl", data))
        assert len(want[0]) == 2 and want[1] == {"over-long line": 1}
        path = tmp_path / "g.jsonl"
        reader = JsonlReader(path)
        got = grow(reader, path, data, [40, 41, 82])  # each line present before its newline
        assert norm(got) == norm(want[0]) and dict(reader.skipped) == want[1]


def test_missing_file(tmp_path):
    reader = JsonlReader(tmp_path / "absent.jsonl")
    assert drain(reader) == [] and not reader.restarted
    path = write(tmp_path / "absent.jsonl", b'{"step": 1}\n')
    assert [r.step for r in drain(reader)] == [1]
    path.unlink()
    assert drain(reader) == []


# ------------------------------------------------------------------------------- properties

JSON_TOKENS = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"\n", b"\r\n", b"\r", b" ", b'"step"',
               b'"loss"', b'"a"', b"1", b"-2.5e3", b'"3"', b"NaN", b"Infinity", b"true", b"null",
               b"\\", b"\xce\x94", b"\xff", b"\x00"]
json_like = st.lists(st.sampled_from(JSON_TOKENS), max_size=60).map(b"".join)
objects = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=8,
)
json_lines = st.lists(objects, max_size=6).map(lambda objs: "".join(json.dumps(o) + "\n" for o in objs).encode())
any_bytes = st.binary(max_size=300) | json_like | json_lines


def check_chunking(data: bytes, cuts: list[int]) -> None:
    with tempfile.TemporaryDirectory() as d:
        want = whole(JsonlReader, write(Path(d) / "whole.jsonl", data))
        path = Path(d) / "grown.jsonl"
        reader = JsonlReader(path)
        got = grow(reader, path, data, cuts)
        assert norm(got) == norm(want[0])
        assert dict(reader.skipped) == want[1]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=any_bytes, cuts=st.lists(st.integers(1, 300), max_size=12))
def test_property_any_bytes_any_chunking(data, cuts):
    check_chunking(data, cuts)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=any_bytes, cuts=st.lists(st.integers(1, 300), max_size=12))
def test_property_with_tiny_line_limit(data, cuts):
    """Over-long lines and read windows everywhere: MAX_LINE 8 bytes, READ_BLOCK 32."""
    with mock.patch.object(base, "MAX_LINE", 8), mock.patch.object(base, "READ_BLOCK", 32):
        check_chunking(data, cuts)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=any_bytes, cuts=st.lists(st.integers(1, 300), max_size=12), parse=st.integers(1, 80))
def test_property_reads_cut_at_parse_block(data, cuts, parse):
    check_parse_cuts(JsonlReader, ".jsonl", data, cuts, parse)


def expected_metrics(obj, prefix=""):
    """An independent flattening: numbers and numeric strings, nested names joined by "/"."""
    out = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(expected_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, bool) or value is None or isinstance(value, list):
            continue
        else:
            try:
                out[prefix + key] = float(value)
            except ValueError:
                pass
            except OverflowError:  # an int beyond float range
                out[prefix + key] = math.copysign(math.inf, value)
    return out


keys = st.text(alphabet="xyz", min_size=1, max_size=3)
values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(alphabet="0123456789.e-+ainf", max_size=5),
    lambda kids: st.lists(kids, max_size=2) | st.dictionaries(keys, kids, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(objs=st.lists(st.dictionaries(keys, values, max_size=4), min_size=1, max_size=5))
def test_property_every_number_reaches_the_record(objs):
    data = "".join(json.dumps(o) + "\n" for o in objs).encode()
    with tempfile.TemporaryDirectory() as d:
        records, skipped = whole(JsonlReader, write(Path(d) / "a.jsonl", data))
    assert skipped == {}
    assert norm(records) == norm([Record(expected_metrics(o)) for o in objs])


def test_give_back_reads_the_tail_again(tmp_path):
    """``give_back`` returns the tail of the last block from a line start; it refuses (and
    changes nothing) when the block was not the file's bytes one for one."""
    path = write(tmp_path / "a.jsonl", b'{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    reader = JsonlReader(path)
    tailer = reader.tailer
    block = tailer.read_block()
    assert tailer.give_back(block, len(b'{"step": 1}\n'))
    assert [r.step for r in reader.read()] == [2, 3] and reader.read() == []
    assert not tailer.give_back(block, 0)  # the last read handed on nothing: nothing to give back
    with mock.patch.object(base, "MAX_LINE", 16):
        long = write(tmp_path / "b.jsonl", b'{"step": 1}\n{"step": 2, "x": 12345}\n{"step": 3}\n')
        reader = JsonlReader(long)
        block = reader.tailer.read_block()  # the long line left out
        assert not reader.tailer.give_back(block, 0)
        assert reader.read() == [] and dict(reader.skipped) == {"over-long line": 1}
