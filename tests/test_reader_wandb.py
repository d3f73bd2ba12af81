"""W&B reader against run files written by the real wandb (offline mode)."""
from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autolr.readers import wandb as wbmod
from autolr.readers.text import TextReader
from autolr.readers.wandb import BLOCK, FILE_HEADER, WandbReader

ROWS = 300
BIG_ROW = 150  # this row has enough keys to span several 32 KiB blocks
BIG_KEYS = 3000

SCRIPT = textwrap.dedent(f"""
    import math, sys, wandb
    settings = wandb.Settings(silent=True, disable_git=True, x_disable_stats=True,
                              x_disable_meta=True, x_disable_machine_info=True)
    run = wandb.init(project="autolr-test", mode="offline", dir=sys.argv[1], settings=settings)
    for i in range({ROWS}):
        row = {{"loss": 1.0 / (i + 1), "train/acc": i / 1000, "opt": {{"lr": 1e-3 * 0.99 ** i}},
               "name": "x", "flag": True, "hist": [1, 2], "none": None}}
        if i == 7:
            row["loss"] = float("nan")
        if i == 8:
            row["grad_norm"] = float("inf")
        if i % 50 == 49:
            row["epoch"] = i // 50
        if i == {BIG_ROW}:
            row.update({{f"layer_{{k:05d}}/grad_norm": k * 0.5 for k in range({BIG_KEYS})}})
        run.log(row, step=i * 10)
        if i == 100:
            print("halfway")
    run.finish()
""")


def expected_rows() -> list[tuple]:
    rows = []
    for i in range(ROWS):
        m = {"loss": 1.0 / (i + 1), "train/acc": i / 1000, "opt/lr": 1e-3 * 0.99 ** i}
        if i == 7:
            m["loss"] = math.nan
        if i == 8:
            m["grad_norm"] = math.inf
        if i == BIG_ROW:
            m.update({f"layer_{k:05d}/grad_norm": k * 0.5 for k in range(BIG_KEYS)})
        epoch = float(i // 50) if i % 50 == 49 else None
        rows.append(_norm(m, i * 10, epoch))
    return rows


def _norm(metrics: dict, step, epoch) -> tuple:
    """Hashable, NaN-safe form of a record."""
    items = tuple(sorted((k, "nan" if v != v else v) for k, v in metrics.items()))
    return step, epoch, items


def norm(records) -> list[tuple]:
    return [_norm(r.metrics, r.step, r.epoch) for r in records]


@pytest.fixture(scope="module")
def run_file(tmp_path_factory) -> Path:
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(root),
               WANDB_DISABLE_CODE="true", WANDB_CONSOLE="wrap")
    subprocess.run([sys.executable, "-c", SCRIPT, str(root)], env=env, check=True, timeout=120,
                   cwd=root, capture_output=True)
    (path,) = root.glob("wandb/offline-run-*/run-*.wandb")
    return path


def read_all(reader: WandbReader) -> list:
    out = reader.read()
    while reader.more:
        out += reader.read()
    return out


def grow(src: bytes, dst: Path, sizes) -> list:
    """Append ``src`` to ``dst`` in pieces, reading after each; returns every record read."""
    reader = WandbReader(dst)
    dst.write_bytes(b"")
    out, pos = [], 0
    with open(dst, "ab") as f:
        for size in sizes:
            f.write(src[pos:pos + size])
            f.flush()
            pos += size
            out += reader.read()
            if pos >= len(src):
                break
    assert pos >= len(src)
    return out + reader.read()


def physical_records(data: bytes):
    """(offset, type, length) of each physical record of a clean file."""
    pos = len(FILE_HEADER)
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, rtype = struct.unpack_from("<IHB", data, pos)
        yield pos, rtype, length
        pos += 7 + length


def history_record_at(data: bytes, row: int) -> int:
    """Offset of the FULL physical record holding the history row ``row``."""
    for off, rtype, length in physical_records(data):
        if rtype == wbmod.FULL:
            values = wbmod.history_values(data[off + 7:off + 7 + length])
            if values and values.get("_step") == row * 10:
                return off
    raise AssertionError(f"row {row} not found")


def test_whole_file_equals_what_was_logged(run_file: Path):
    reader = WandbReader(run_file)
    records = read_all(reader)
    assert norm(records) == expected_rows()
    assert not reader.skipped
    assert reader.read() == []


def test_real_file_has_header_and_fragmented_history(run_file: Path):
    data = run_file.read_bytes()
    assert data[:7] == FILE_HEADER
    types = [t for _, t, _ in physical_records(data)]
    assert types.count(wbmod.MIDDLE) >= 1 and types.count(wbmod.FIRST) >= 1


def test_growth_in_random_chunks_equals_whole_read(run_file: Path, tmp_path: Path):
    src = run_file.read_bytes()
    whole = norm(read_all(WandbReader(run_file)))
    for seed in range(3):
        rng = random.Random(seed)
        sizes = iter(lambda: rng.choice([1, 2, 6, 7, 8, 100, 977, 4096, 33000]), None)
        assert norm(grow(src, tmp_path / f"g{seed}.wandb", sizes)) == whole


def test_every_split_point_near_headers_and_block_ends(run_file: Path, tmp_path: Path):
    src = run_file.read_bytes()[: 2 * BLOCK + 3000]
    whole = norm(read_all(WandbReader(run_file)))
    dst = tmp_path / "run-s.wandb"
    cuts = sorted(set(range(0, 200)) | {b + d for b in (BLOCK, 2 * BLOCK) for d in range(-16, 16)})
    for cut in cuts:
        dst.write_bytes(src[:cut])
        reader = WandbReader(dst)
        got = read_all(reader)
        with open(dst, "ab") as f:
            f.write(src[cut:])
        got += read_all(reader)
        assert norm(got) == whole[: len(got)] and not reader.skipped, cut
    assert len(got) > 10


def test_small_read_block_loops_with_more(run_file: Path, monkeypatch):
    monkeypatch.setattr(wbmod, "READ_BLOCK", 5000)
    reader = WandbReader(run_file)
    records, calls = [], 0
    while True:
        records += reader.read()
        calls += 1
        if not reader.more:
            break
    assert calls > 5
    assert norm(records) == expected_rows()


def test_state_round_trip(run_file: Path, tmp_path: Path):
    src = run_file.read_bytes()
    dst = tmp_path / "run-x.wandb"
    dst.write_bytes(src[: len(src) // 2 + 5])  # ends inside a record
    first = WandbReader(dst)
    part = first.read()
    state = json.loads(json.dumps(first.get_state()))
    with open(dst, "ab") as f:
        f.write(src[len(src) // 2 + 5:])
    second = WandbReader(dst)
    second.set_state(state)
    assert norm(part + read_all(second)) == expected_rows()
    assert 0 < len(part) < ROWS


def test_truncated_tail_is_retried(run_file: Path, tmp_path: Path):
    src = run_file.read_bytes()
    dst = tmp_path / "run-t.wandb"
    offsets = [off for off, t, _ in physical_records(src) if t == wbmod.FULL]
    cut = offsets[len(offsets) * 2 // 3] + 20  # inside a record's payload
    dst.write_bytes(src[:cut])
    reader = WandbReader(dst)
    part = read_all(reader)
    assert reader.get_state()["offset"] <= cut - 20 and not reader.skipped
    assert reader.read() == []  # nothing new: still waiting for the record
    with open(dst, "ab") as f:
        f.write(src[cut:])
    assert norm(part + reader.read()) == expected_rows()
    assert not reader.skipped


def test_corrupt_payload_byte_loses_one_record(run_file: Path, tmp_path: Path):
    data = bytearray(run_file.read_bytes())
    data[history_record_at(bytes(data), 200) + 30] ^= 0x55  # a payload byte
    dst = tmp_path / "run-c.wandb"
    dst.write_bytes(bytes(data))
    reader = WandbReader(dst)
    got = norm(read_all(reader))
    want = expected_rows()
    assert got == want[:200] + want[201:]
    assert reader.skipped["corrupt W&B record"] == 1


def test_impossible_header_resyncs_at_next_block(run_file: Path, tmp_path: Path):
    data = bytearray(run_file.read_bytes())
    head = history_record_at(bytes(data), 30)
    data[head + 6] = 9  # an unknown record type: the length cannot be trusted either
    dst = tmp_path / "run-h.wandb"
    dst.write_bytes(bytes(data))
    reader = WandbReader(dst)
    got = norm(read_all(reader))
    want = expected_rows()
    assert reader.skipped["corrupt W&B record"] == 1
    assert set(got) <= set(want)
    lost = [w for w in want if w not in got]
    assert 1 <= len(lost) < 100 and got[-1] == want[-1]
    assert all(w[0] >= 300 for w in lost)  # only rows after the corruption in its block


def test_oversized_record_is_skipped_and_counted(run_file: Path, monkeypatch):
    monkeypatch.setattr(wbmod, "MAX_RECORD", 40_000)
    reader = WandbReader(run_file)
    got = norm(read_all(reader))
    want = expected_rows()
    assert got == want[:BIG_ROW] + want[BIG_ROW + 1:]
    assert reader.skipped["over-long W&B record"] >= 1  # the history row (and its summary)


def test_random_corruption_never_raises_nor_invents(run_file: Path, tmp_path: Path):
    src = run_file.read_bytes()
    want = set(expected_rows())
    rng = random.Random(7)
    for i in range(25):
        data = bytearray(src)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        dst = tmp_path / f"f{i}.wandb"
        sizes = iter(lambda: rng.randint(1, 20000), None)
        got = grow(bytes(data), dst, sizes)
        assert set(norm(got)) <= want


@pytest.mark.parametrize("blob", [
    b"", b":W&", b"garbage that is not a wandb file at all\n" * 50,
    FILE_HEADER + bytes(range(256)) * 300, FILE_HEADER + b"\x00" * 70000,
    FILE_HEADER + b"\xff" * 70000,
])
def test_garbage_never_raises(blob: bytes, tmp_path: Path):
    path = tmp_path / "run-g.wandb"
    path.write_bytes(blob)
    reader = WandbReader(path)
    assert read_all(reader) == []
    assert reader.read() == []


def test_random_bytes_after_header(tmp_path: Path):
    rng = random.Random(3)
    for i in range(10):
        path = tmp_path / f"r{i}.wandb"
        path.write_bytes(FILE_HEADER + rng.randbytes(rng.randint(1, 100_000)))
        read_all(WandbReader(path))


def test_replaced_file_starts_over(run_file: Path, tmp_path: Path):
    dst = tmp_path / "run-r.wandb"
    dst.write_bytes(run_file.read_bytes())
    reader = WandbReader(dst)
    first = read_all(reader)
    tmp = tmp_path / "new.wandb"
    tmp.write_bytes(run_file.read_bytes()[:5000])
    tmp.replace(dst)
    again = reader.read()
    assert reader.restarted and 0 < len(again) < len(first)
    assert norm(again) == norm(first)[: len(again)]


def test_matching_run_dir_and_registration(run_file: Path):
    run = run_file.parent
    assert WandbReader.matches(run_file)
    assert WandbReader.run_dir(run_file) == run
    assert WandbReader(run_file).folder_for(None) == run
    assert not WandbReader.matches(run / "files" / "output.log")
    output = run / "files" / "output.log"
    assert output.is_file() and TextReader.matches(output)
    assert TextReader.run_dir(output) == run
    assert "halfway" in output.read_text()
    for name in ("logs/debug.log", "logs/debug-internal.log", "files/requirements.txt"):
        assert not TextReader.matches(run / name)
    assert not TextReader.matches(run.parent / "debug.log")
    latest = run.parent / "latest-run"
    assert latest.is_symlink()  # the same run again: read it once, by its real name
    assert not WandbReader.matches(latest / run_file.name)
    assert not TextReader.matches(latest / "files" / "output.log")
    got = []
    wbmod.register_readers(register=got.append)
    assert got == [WandbReader]


HF_SCRIPT = textwrap.dedent("""
    import sys, wandb
    settings = wandb.Settings(silent=True, disable_git=True, x_disable_stats=True,
                              x_disable_meta=True, x_disable_machine_info=True)
    run = wandb.init(project="autolr-test", mode="offline", dir=sys.argv[1], settings=settings)
    run.define_metric("train/global_step")
    run.define_metric("*", step_metric="train/global_step", step_sync=True)
    for gs in range(4, 33, 4):  # as transformers' WandbCallback: no step=, so _step counts calls
        run.log({"train/loss": 1.0 / gs, "train/epoch": gs / 16, "train/global_step": gs})
        if gs % 8 == 0:
            run.log({"eval/loss": 2.0 / gs, "train/epoch": gs / 16, "train/global_step": gs})
    run.finish()
""")


def test_hugging_face_keys_give_the_global_step_and_epoch(tmp_path: Path):
    """Regression: Trainer with report_to="wandb" logs train/global_step and train/epoch and no
    step=; the reader took W&B's _step (a count of log calls, training and eval mixed: 0-11)."""
    pytest.importorskip("wandb")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path),
               WANDB_DISABLE_CODE="true")
    subprocess.run([sys.executable, "-c", HF_SCRIPT, str(tmp_path)], env=env, check=True, timeout=120,
                   cwd=tmp_path, capture_output=True)
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = read_all(WandbReader(path))
    train = [(r.step, r.epoch) for r in records if "train/loss" in r.metrics]
    evals = [r.step for r in records if "eval/loss" in r.metrics]
    assert train == [(gs, gs / 16) for gs in range(4, 33, 4)] and evals == [8, 16, 24, 32]
    assert all("train/global_step" not in r.metrics and "train/epoch" not in r.metrics for r in records)
