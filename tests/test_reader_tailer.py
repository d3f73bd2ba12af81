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
