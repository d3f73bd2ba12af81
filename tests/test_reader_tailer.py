"""TextTailer's kept descriptor: reused between reads, released on delete and close()."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from autolr.readers.base import TextTailer
from autolr.readers.csv import CsvReader
from autolr.readers.jsonl import JsonlReader
from autolr.readers.text import TextReader

ROW = b'{"step": %d, "loss": 1.5}\n'


def steps(records) -> list:
    return [r.step for r in records]


def test_descriptor_is_kept_and_reused(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW % 1)
    reader = JsonlReader(path)
    assert steps(reader.read()) == [1]
    fd = reader.tailer.fd
    assert fd is not None and os.fstat(fd).st_ino == path.stat().st_ino
    with open(path, "ab") as f:
        f.write(ROW % 2)
    assert steps(reader.read()) == [2] and reader.tailer.fd == fd and not reader.restarted
    reader.close()
    assert reader.tailer.fd is None
    with pytest.raises(OSError):
        os.fstat(fd)
    with open(path, "ab") as f:
        f.write(ROW % 3)
    assert steps(reader.read()) == [3] and not reader.restarted  # reopened, same offset


def test_deleted_file_releases_the_descriptor(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW % 1)
    reader = JsonlReader(path)
    reader.read()
    assert reader.tailer.fd is not None
    path.unlink()
    assert reader.read() == [] and reader.tailer.fd is None
    path.write_bytes(ROW % 7)  # recreated: a new file, read from its start
    assert steps(reader.read()) == [7] and reader.restarted


def test_replaced_file_is_reopened_and_read_from_the_start(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW % 1 + ROW % 2)
    reader = JsonlReader(path)
    assert steps(reader.read()) == [1, 2]
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_bytes(ROW % 5)
    fresh.replace(path)
    assert steps(reader.read()) == [5] and reader.restarted
    assert os.fstat(reader.tailer.fd).st_ino == path.stat().st_ino


@pytest.mark.parametrize("how", ["shrink", "rewrite"])
def test_in_place_rewrites_through_the_kept_descriptor(tmp_path: Path, how: str):
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW % 1 + ROW % 2)
    reader = JsonlReader(path)
    assert steps(reader.read()) == [1, 2]
    with open(path, "r+b") as f:  # same inode
        f.truncate(0)
        f.write(ROW % 8 if how == "shrink" else ROW % 8 + ROW % 9 + ROW % 10)
    assert steps(reader.read()) == ([8] if how == "shrink" else [8, 9, 10]) and reader.restarted


def test_out_of_descriptors_reads_without_keeping_one(tmp_path: Path, monkeypatch):
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW % 1)
    reader = JsonlReader(path)

    def full(self):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(TextTailer, "_sync", full)
    assert steps(reader.read()) == [1] and reader.tailer.fd is None
    with open(path, "ab") as f:
        f.write(ROW % 2)
    assert steps(reader.read()) == [2]


@pytest.mark.parametrize("cls,name,data", [
    (CsvReader, "m.csv", b"step,loss\n1,0.5\n"),
    (TextReader, "train.log", b"iter 1: loss 0.5\n"),
])
def test_every_text_reader_closes(tmp_path: Path, cls, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    reader = cls(path)
    assert steps(reader.read()) == [1]
    assert reader.tailer.fd is not None
    reader.close()
    assert reader.tailer.fd is None
    reader.close()  # twice is fine


def test_csv_header_longer_than_the_head_read(tmp_path: Path):
    from autolr.readers import csv as csvmod

    path = tmp_path / "m.csv"
    wide = ",".join(f"metric_{i:05d}" for i in range(csvmod.HEAD_BYTES // 10))  # > HEAD_BYTES
    path.write_bytes(f"step,{wide}\n1{',' * wide.count(',')},2.5\n".encode())
    reader = CsvReader(path)
    assert steps(reader.read()) == [1]
    assert not reader._header_changed()
    with open(path, "r+b") as f:  # rewritten in place with another (long) header: a new log
        f.truncate(0)
        f.write(f"step,other,{wide[1:]}\n7,0.5{',' * (wide.count(',') + 1)}\n".encode())
    assert reader._header_changed()
    assert steps(reader.read()) == [7] and reader.restarted


def test_csv_read_costs_one_stat_and_a_short_head_read(tmp_path: Path, monkeypatch):
    from autolr.readers import base

    path = tmp_path / "m.csv"
    path.write_bytes(b"step,loss\n1,0.5\n")
    reader = CsvReader(path)
    assert steps(reader.read()) == [1]
    assert reader.read() == []  # the first header check remembers the header's bytes
    with open(path, "ab") as f:
        f.write(b"2,0.25\n")
    stats, preads = [], []
    real_stat, real_pread = os.stat, base._pread
    monkeypatch.setattr(base.os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    monkeypatch.setattr(base, "_pread", lambda fd, n, off: preads.append((n, off)) or real_pread(fd, n, off))
    assert steps(reader.read()) == [2]
    assert len(stats) == 1
    assert preads[0] == (len(b"step,loss\n"), 0)  # the header, compared with the known one


def test_a_descriptor_gone_bad_is_reopened(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW % 1)
    reader = JsonlReader(path)
    assert steps(reader.read()) == [1]
    os.close(reader.tailer.fd)  # as if the server dropped it (ESTALE): pread fails with EBADF
    with open(path, "ab") as f:
        f.write(ROW % 2)
    assert steps(reader.read()) == [2] and not reader.restarted


def test_same_size_rewrite_is_caught_by_the_mark(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW % 1 + ROW % 2)
    reader = JsonlReader(path)
    assert steps(reader.read()) == [1, 2]
    with open(path, "r+b") as f:  # same inode, same size, other bytes before the offset
        f.write(ROW % 3 + ROW % 4)
    assert steps(reader.read()) == [3, 4] and reader.restarted


def test_a_read_of_new_rows_costs_one_stat_and_one_pread(tmp_path: Path, monkeypatch):
    from autolr.readers import base

    path = tmp_path / "m.jsonl"
    first = b"".join(ROW % i for i in range(4))
    path.write_bytes(first)
    reader = JsonlReader(path)
    assert steps(reader.read()) == [0, 1, 2, 3]
    with open(path, "ab") as f:
        f.write(ROW % 4)
    stats, preads = [], []
    real_stat, real_pread = os.stat, base._pread
    monkeypatch.setattr(base.os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    monkeypatch.setattr(base, "_pread", lambda fd, n, off: preads.append((n, off)) or real_pread(fd, n, off))
    assert steps(reader.read()) == [4]
    assert len(stats) == 1 and len(preads) == 1  # the mark comes with the new bytes
    assert preads[0][1] == len(first) - base.MARK


def _count_calls(monkeypatch):
    from autolr.readers import base

    stats, preads = [], []
    real_stat, real_pread = os.stat, os.pread
    monkeypatch.setattr(base.os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    monkeypatch.setattr(base.os, "pread", lambda fd, n, off: preads.append((n, off)) or real_pread(fd, n, off))
    return stats, preads


@pytest.mark.parametrize("cls", [JsonlReader, CsvReader])
def test_an_in_place_read_costs_one_pread_and_no_stat(tmp_path: Path, monkeypatch, cls):
    path = tmp_path / ("m.jsonl" if cls is JsonlReader else "m.csv")
    row = (lambda i: ROW % i) if cls is JsonlReader else (lambda i: b"%d,1.5\n" % i)
    path.write_bytes((b"" if cls is JsonlReader else b"step,loss\n") + b"".join(row(i) for i in range(4)))
    reader = cls(path)
    assert steps(reader.read()) == [0, 1, 2, 3]
    with open(path, "ab") as f:
        f.write(row(4) + row(5))
    stats, preads = _count_calls(monkeypatch)
    reader.assume_in_place()
    assert steps(reader.read()) == [4, 5] and not reader.more
    assert stats == [] and len(preads) == (1 if cls is JsonlReader else 2)  # CSV: + its header check
    # (a short pread is the end of the file: no second one)
    reader.assume_in_place()
    assert reader.read() == [] and stats == []  # an event already read: nothing, still no stat
    assert steps(reader.read()) == [] and len(stats) == 1  # without the hint: the checked path


def test_an_in_place_read_falls_back_when_the_mark_differs(tmp_path: Path, monkeypatch):
    """Truncated, or rewritten past the offset: the hint is not trusted, the stat path restarts."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW % 1 + ROW % 2)
    reader = JsonlReader(path)
    assert steps(reader.read()) == [1, 2]
    with open(path, "r+b") as f:  # same inode: in place indeed, but other bytes before the offset
        f.write(ROW % 3 + ROW % 4 + ROW % 5)
    reader.assume_in_place()
    assert steps(reader.read()) == [3, 4, 5] and reader.restarted
    with open(path, "wb") as f:  # truncated below the offset, then one short row
        f.write(ROW % 6)
    stats, _ = _count_calls(monkeypatch)
    reader.assume_in_place()
    assert steps(reader.read()) == [6] and reader.restarted and len(stats) == 1


def test_an_in_place_read_of_a_large_append_continues_with_more(tmp_path: Path):
    from autolr.readers import base

    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW % 0)
    reader = JsonlReader(path)
    assert steps(reader.read()) == [0]
    n = base.IN_PLACE_READ // len(ROW % 1) * 3
    with open(path, "ab") as f:
        f.write(b"".join(ROW % i for i in range(1, n)))
    reader.assume_in_place()
    got = steps(reader.read())
    assert reader.more and got == list(range(1, len(got) + 1))
    while reader.more:
        got += steps(reader.read())
    assert got == list(range(1, n))


def test_the_hint_is_ignored_before_the_first_read(tmp_path: Path, monkeypatch):
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW % 0)
    reader = JsonlReader(path)
    stats, _ = _count_calls(monkeypatch)
    reader.assume_in_place()  # no descriptor yet: the checked path opens the file
    assert steps(reader.read()) == [0] and len(stats) == 1


@pytest.mark.parametrize("cls,name,row,header", [
    (JsonlReader, "m.jsonl", ROW, b""),
    (CsvReader, "m.csv", b"%d,1.5\n", b"step,loss\n"),
    (TextReader, "train.log", b"iter %d: loss 1.5\n", b""),
])
def test_a_file_renamed_away_is_read_to_its_end_before_the_new_one(tmp_path: Path, cls, name, row, header):
    """Rotation: the log is renamed away with lines not read yet and a new file takes its name.
    The kept descriptor's lines come first (as ``tail -F`` reads them), then the new file from
    its start, announced as a restart; the old file's state is left for its new name. A last
    line without its newline does not hold the reader for ever."""
    path = tmp_path / name
    path.write_bytes(header + row % 1)
    reader = cls(path)
    assert steps(reader.read()) == [1]
    with open(path, "ab") as f:
        f.write(row % 2 + row % 3 + b"step")  # the last line torn: never finished
    os.rename(path, tmp_path / ("old-" + name))
    path.write_bytes(header + row % 4)
    got, rounds = [], 0
    while True:
        got += steps(reader.read())
        rounds += 1
        if reader.restarted:
            assert got == [2, 3, 4] and reader.left_behind is not None
            break
        assert reader.more and rounds < 5
    identity, state = reader.left_behind
    assert identity == ((tmp_path / ("old-" + name)).stat().st_dev, (tmp_path / ("old-" + name)).stat().st_ino)
    renamed = cls(tmp_path / ("old-" + name))
    renamed.set_state(state)
    assert steps(renamed.read()) == [] and not renamed.restarted  # read on from where it stopped


def _read_all(reader) -> list:
    got, rounds = steps(reader.read()), 1
    while reader.more:
        got += steps(reader.read())
        rounds += 1
        assert rounds < 10
    return got


@pytest.mark.parametrize("gone", ["renamed", "deleted"])
def test_a_vanished_file_is_read_to_its_end_through_the_kept_descriptor(tmp_path: Path, gone):
    """Regression: logrotate renames the log to a name no reader takes (m.jsonl.1), or it is
    deleted, with lines not read yet: the path's stat failing closed the descriptor and those
    lines were lost. They are read first. A file renamed away keeps its descriptor, which a
    new reader of the path adopts: the lines its writer added before reopening the path come
    before the new file. A deleted file's descriptor is released once it is read."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(ROW % 1)
    reader = JsonlReader(path)
    assert steps(reader.read()) == [1]
    with open(path, "ab") as job:  # the writer's open file
        job.write(ROW % 2 + ROW % 3)
        job.flush()
        if gone == "renamed":
            os.rename(path, tmp_path / "m.jsonl.1")
        else:
            path.unlink()
        assert _read_all(reader) == [2, 3] and reader.read() == [] and not reader.restarted
        if gone == "deleted":
            assert reader.tailer.fd is None and reader.tailer.detach() is None
            return
        kept = reader.tailer.detach()
        assert kept is not None and reader.tailer.fd is None
        job.write(ROW % 4)  # written on before the job reopens its log
    path.write_bytes(ROW % 7)
    fresh = JsonlReader(path)
    fresh.set_state(reader.get_state())
    assert fresh.tailer.adopt(kept) and kept.fd is None
    assert _read_all(fresh) == [4, 7] and fresh.restarted and fresh.left_behind is not None
