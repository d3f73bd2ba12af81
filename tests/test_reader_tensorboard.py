"""TensorBoard reader: files from the real writers (torch, tensorboardX, tensorboard's own
EventFileWriter for the TF2 layout), incremental reads, damage, state, layouts."""
from __future__ import annotations

import json
import math
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from autolr.readers import tensorboard as tbmod
from autolr.readers.tensorboard import TensorBoardReader, masked_crc32c, masked_crcs, parse_event


# ---- helpers -----------------------------------------------------------------------------------

def read_all(path, idle: float = 0.0, reader: TensorBoardReader | None = None):
    """Every record of ``path`` (loops while ``more``); idle 0 also flushes the open step."""
    reader = reader or TensorBoardReader(path)
    reader.idle_seconds = idle
    out = []
    for _ in range(10_000):
        out += reader.read()
        if not reader.more:
            return out
    raise AssertionError("read() kept saying more")


def event_file(folder: Path) -> Path:
    files = sorted(folder.glob("*tfevents*"))
    assert len(files) == 1, files
    return files[0]


def record_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each record of a clean event file, from the framing."""
    spans, pos = [], 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        spans.append((pos, pos + 16 + length))
        pos += 16 + length
    assert pos == len(data)
    return spans


def reprs(records) -> list[str]:
    return [repr(r) for r in records]  # repr: nan compares equal to itself


def grow(src: bytes, dst: Path, cuts: list[int], idle: float = math.inf):
    """Append ``src`` to ``dst`` piece by piece (cut at ``cuts``), reading after each piece."""
    dst.write_bytes(b"")
    reader = TensorBoardReader(dst)
    out = []
    prev = 0
    for cut in sorted(set(cuts)) + [len(src)]:
        with open(dst, "ab") as f:
            f.write(src[prev:cut])
        prev = cut
        out += read_all(dst, idle, reader)
    return out, reader


def flush_all(reader: TensorBoardReader):
    """What a finished file still holds back: the open step, once the file is idle."""
    reader.idle_seconds = 0
    return reader.read()


@pytest.fixture(scope="module")
def torch_writer():
    return pytest.importorskip("torch.utils.tensorboard").SummaryWriter


@pytest.fixture(scope="module")
def rich_file(tmp_path_factory, torch_writer) -> bytes:
    """A torch event file with scalars (old and new style), histograms, images and text."""
    folder = tmp_path_factory.mktemp("rich")
    w = torch_writer(str(folder))
    rng = np.random.default_rng(0)
    for step in range(60):
        w.add_scalar("train/loss", 1.0 / (step + 1), step)
        w.add_scalar("lr", 0.1 * 0.99 ** step, step, new_style=True)
        if step % 7 == 0:
            w.add_scalar("val/acc", step / 100, step)
            w.add_histogram("weights", rng.normal(size=50), step)
        if step % 20 == 0:
            w.add_image("img", rng.random((3, 8, 8)), step)
            w.add_text("note", f"step {step}", step)
        w.add_scalar("epoch", step // 10, step)
    w.add_scalar("train/loss", float("nan"), 60)
    w.close()
    return event_file(folder).read_bytes()


# ---- CRC and protobuf pieces ---------------------------------------------------------------------

def test_crc32c_known_answers():
    assert tbmod.crc32c(b"") == 0
    assert tbmod.crc32c(b"123456789") == 0xE3069283
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference
    data = os.urandom(9000)
    arr = np.frombuffer(data, dtype=np.uint8)
    rng = random.Random(3)
    spans = [(rng.randrange(0, 4000), rng.choice([0, 1, 3, 4, 7, 8, 16, 17, 255, 256, 257, 4096, 4097]))
             for _ in range(400)]
    got = masked_crcs(arr, [s for s, _ in spans], [n for _, n in spans])
    assert [int(x) for x in got] == [reference(data[s:s + n]) for s, n in spans]
    assert masked_crc32c(data[:100]) == reference(data[:100])


def test_parse_event_unpacked_and_half_values():
    """Hand-built tensors: unpacked float_val, half_val for HALF and BFLOAT16, int tensors."""
    def field(num, wt, payload):
        return bytes([num << 3 | wt]) + (bytes([len(payload)]) + payload if wt == 2 else payload)

    def event(tensor: bytes, tag=b"x") -> bytes:
        value = field(1, 2, tag) + field(8, 2, tensor)
        return field(2, 0, b"\x07") + field(5, 2, field(1, 2, value))

    f32 = struct.pack("<f", 1.5)
    assert parse_event(event(field(1, 0, b"\x01") + field(5, 5, f32)))[1][0][1] == 1.5
    two = field(1, 0, b"\x01") + field(5, 5, f32) + field(5, 5, f32)
    assert parse_event(event(two))[1][0][1] is None  # two elements: not a scalar
    half = struct.unpack("<H", struct.pack("<e", 0.75))[0]
    half_val = field(13, 2, bytes([half & 0x7F | 0x80, half >> 7]))
    assert parse_event(event(field(1, 0, bytes([19])) + half_val))[1][0][1] == 0.75
    bf16 = struct.unpack("<I", struct.pack("<f", -2.0))[0] >> 16
    assert parse_event(event(field(1, 0, bytes([14])) + field(4, 2, struct.pack("<H", bf16))))[1][0][1] == -2.0
    assert parse_event(event(field(1, 0, b"\x03") + field(7, 0, b"\x05")))[1][0][1] is None  # int32
    step, values, start = parse_event(event(field(1, 0, b"\x02") + field(6, 1, struct.pack("<d", 0.1))))
    assert (step, values[0][1], start) == (7, 0.1, False)


# ---- the real writers ----------------------------------------------------------------------------

def test_torch_writer_values_and_grouping(tmp_path, torch_writer):
    w = torch_writer(str(tmp_path))
    expect = []
    for step in range(0, 300, 3):  # steps above 127 need multi-byte varints
        loss, lr = 1.0 / (step + 1), 0.1 / (step + 1)
        w.add_scalar("loss", loss, step)
        w.add_scalar("lr", lr, step, new_style=True)
        w.add_scalar("lr64", lr, step, new_style=True, double_precision=True)
        expect.append((step, np.float32(loss), np.float32(lr), lr))
    w.close()
    reader = TensorBoardReader(event_file(tmp_path))
    records = read_all(reader.path, math.inf, reader)  # complete steps come without waiting
    assert len(records) == len(expect)
    for rec, (step, loss, lr, lr64) in zip(records, expect):
        assert rec.step == step and rec.epoch is None and not rec.restart
        assert rec.metrics == {"loss": float(loss), "lr": float(lr), "lr64": lr64}
    assert not reader.skipped


def test_torch_non_scalars_ignored_and_epoch_tag(tmp_path, torch_writer, rich_file):
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(rich_file)
    reader = TensorBoardReader(path)
    records = read_all(path, reader=reader)
    assert not reader.skipped
    assert [r.step for r in records] == list(range(61))
    assert records[7].metrics.keys() == {"train/loss", "lr", "val/acc"}
    assert records[8].metrics.keys() == {"train/loss", "lr"}
    assert [r.epoch for r in records[:60]] == [float(s // 10) for s in range(60)]
    assert math.isnan(records[60].metrics["train/loss"])


def test_tensorboardx_writer(tmp_path):
    tbx = pytest.importorskip("tensorboardX")
    w = tbx.SummaryWriter(str(tmp_path))
    for step in range(50):
        w.add_scalar("loss", 2.0 ** -step, step)
        w.add_scalar("acc", step / 50, step)
        w.add_histogram("h", np.arange(10.0), step)
    w.close()
    records = read_all(event_file(tmp_path))
    assert [r.step for r in records] == list(range(50))
    assert all(r.metrics == {"loss": float(np.float32(2.0 ** -s)), "acc": float(np.float32(s / 50))}
               for s, r in enumerate(records))


def tf2_writer(folder: Path, suffix: str = ".v2"):
    pytest.importorskip("tensorboard")
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    return EventFileWriter(str(folder), filename_suffix=suffix)


def tf2_event(step: int, tag: str, tensor, plugin: str | None):
    """An Event as TF2 writes it: the value in a tensor, plugin metadata only when given."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
    if plugin:
        value.metadata.plugin_data.plugin_name = plugin
        value.metadata.data_class = summary_pb2.DATA_CLASS_SCALAR if plugin == "scalars" else 0
    return event_pb2.Event(wall_time=1e9 + step, step=step, summary=summary_pb2.Summary(value=[value]))


def tf2_tensor(dtype: str, content: bytes = b"", shape=(), **fields):
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in shape]
    return tensor_pb2.TensorProto(dtype=getattr(types_pb2, dtype), tensor_content=content,
                                  tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims), **fields)


def test_tf2_tensor_scalars(tmp_path):
    """tensor_content (FLOAT 4 bytes, DOUBLE 8 bytes), metadata on a tag's first event only;
    histograms, text and a one-element tensor of a histogram tag are ignored."""
    w = tf2_writer(tmp_path / "run")
    expect = []
    for step in range(20):
        first = step == 0
        loss, acc = 1.0 / (step + 1), step / 20
        w.add_event(tf2_event(step, "loss", tf2_tensor("DT_FLOAT", struct.pack("<f", loss)),
                              "scalars" if first else None))
        w.add_event(tf2_event(step, "acc", tf2_tensor("DT_DOUBLE", struct.pack("<d", acc)),
                              "scalars" if first else None))
        hist = np.arange(30, dtype="<f8").tobytes()
        w.add_event(tf2_event(step, "w", tf2_tensor("DT_DOUBLE", hist, (10, 3)), "histograms" if first else None))
        w.add_event(tf2_event(step, "odd", tf2_tensor("DT_FLOAT", struct.pack("<f", 1.0)),
                              "histograms" if first else None))
        w.add_event(tf2_event(step, "note", tf2_tensor("DT_STRING", string_val=[b"hi"]), "text" if first else None))
        w.add_event(tf2_event(step, "h16", tf2_tensor("DT_HALF", half_val=[0x3C00]), None))  # 1.0
        w.add_event(tf2_event(step, "b16", tf2_tensor("DT_BFLOAT16", struct.pack("<H", 0x4040)), None))  # 3.0
        w.add_event(tf2_event(step, "fv", tf2_tensor("DT_FLOAT", float_val=[0.5]), None))
        expect.append({"loss": float(np.float32(loss)), "acc": acc, "h16": 1.0, "b16": 3.0, "fv": 0.5})
    w.close()
    path = event_file(tmp_path / "run")
    reader = TensorBoardReader(path)
    records = read_all(path, reader=reader)
    assert [r.metrics for r in records] == expect
    assert [r.step for r in records] == list(range(20))
    assert not reader.skipped
    # Resuming mid-file: the plugin learned from the first event is part of the state.
    spans = record_spans(path.read_bytes())
    cut = spans[len(spans) // 2][0]
    part = tmp_path / "part" / path.name
    part.parent.mkdir()
    part.write_bytes(path.read_bytes()[:cut])
    first = TensorBoardReader(part)
    head = read_all(part, math.inf, first)
    second = TensorBoardReader(part)
    second.set_state(json.loads(json.dumps(first.get_state(), allow_nan=False)))
    with open(part, "ab") as f:
        f.write(path.read_bytes()[cut:])
    assert reprs(head + read_all(part, reader=second)) == reprs(records)


def test_keras_layout(tmp_path):
    """log_dir/train and log_dir/validation: one run; epoch_* tags are per epoch, val_ prefix."""
    log_dir = tmp_path / "logs"
    train, val = tf2_writer(log_dir / "train"), tf2_writer(log_dir / "validation")
    it = 0
    for epoch in range(4):
        for _ in range(3):
            train.add_event(tf2_event(it, "batch_loss", tf2_tensor("DT_FLOAT", struct.pack("<f", 1.0)), "scalars"))
            it += 1
        val.add_event(tf2_event(it, "evaluation_loss_vs_iterations",
                                tf2_tensor("DT_FLOAT", struct.pack("<f", 0.5)), "scalars"))
        for w, loss in ((train, 1.0 / (epoch + 1)), (val, 2.0 / (epoch + 1))):
            w.add_event(tf2_event(epoch, "epoch_loss", tf2_tensor("DT_FLOAT", struct.pack("<f", loss)), "scalars"))
            w.add_event(tf2_event(epoch, "epoch_accuracy", tf2_tensor("DT_FLOAT", struct.pack("<f", 0.5)), "scalars"))
    train.close()
    val.close()
    tfile, vfile = event_file(log_dir / "train"), event_file(log_dir / "validation")
    assert TensorBoardReader.run_dir(tfile) == TensorBoardReader.run_dir(vfile) == log_dir
    t, v = read_all(tfile), read_all(vfile)
    per_epoch = [r for r in v if r.step is None]
    assert [(r.epoch, r.metrics) for r in per_epoch] == [
        (float(e), {"val_loss": float(np.float32(2.0 / (e + 1))), "val_accuracy": 0.5}) for e in range(4)]
    assert [r.metrics for r in v if r.step is not None] == [{"val_evaluation_loss_vs_iterations": 0.5}] * 4
    assert [r.epoch for r in t if "loss" in r.metrics] == [0.0, 1.0, 2.0, 3.0]
    assert [r.step for r in t if "batch_loss" in r.metrics] == list(range(12))


def test_add_scalars_subfolders(tmp_path, torch_writer):
    w = torch_writer(str(tmp_path / "run"))
    for step in range(3):
        w.add_scalars("loss/split", {"train": 1.0 + step, "val": 2.0 + step}, step)
        w.add_scalar("lr", 0.1, step)
    w.close()
    files = sorted((tmp_path / "run").rglob("*tfevents*"))
    assert len(files) == 3
    assert {TensorBoardReader.run_dir(f) for f in files} == {tmp_path / "run"}
    names = {name for f in files for r in read_all(f) for name in r.metrics}
    assert names == {"lr", "loss/split/train", "loss/split/val"}


def test_add_scalars_tensorboardx_nested(tmp_path):
    tbx = pytest.importorskip("tensorboardX")
    w = tbx.SummaryWriter(str(tmp_path / "run"))
    w.add_scalar("lr", 0.1, 0)
    w.add_scalars("loss", {"train": 1.0, "validation": 2.0}, 0)
    w.close()
    files = sorted((tmp_path / "run").rglob("*tfevents*"))
    assert {TensorBoardReader.run_dir(f) for f in files} == {tmp_path / "run"}
    names = {name for f in files for r in read_all(f) for name in r.metrics}
    assert names == {"lr", "loss/train", "loss/validation"}


def test_several_files_in_one_run_and_purge_step(tmp_path, torch_writer):
    """A second writer with purge_step=5 writes a SessionLog START at step 5: its first record
    says restart (drop steps >= 5 of the earlier file)."""
    w = torch_writer(str(tmp_path))
    for step in range(10):
        w.add_scalar("loss", float(step), step)
    w.close()
    w = torch_writer(str(tmp_path), purge_step=5)
    for step in range(5, 8):
        w.add_scalar("loss", 100.0 + step, step)
    w.close()
    first, second = sorted(tmp_path.glob("*tfevents*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    assert TensorBoardReader.run_dir(first) == TensorBoardReader.run_dir(second) == tmp_path
    assert [r.step for r in read_all(first)] == list(range(10))
    assert not any(r.restart for r in read_all(first))
    records = read_all(second)
    assert [(r.step, r.metrics["loss"], r.restart) for r in records] == [
        (5, 105.0, True), (6, 106.0, False), (7, 107.0, False)]


def test_registered_as_plugin():
    import pluggy

    from autolr import hookspecs
    from autolr.plugins import reader_classes
    pm = pluggy.PluginManager("autolr")
    pm.add_hookspecs(hookspecs)
    pm.register(tbmod)
    assert reader_classes(pm) == {"tensorboard": TensorBoardReader}
    assert TensorBoardReader.matches(Path("events.out.tfevents.1700000000.host.1.0.v2"))
    assert not TensorBoardReader.matches(Path("metrics.csv"))


# ---- incremental reading -------------------------------------------------------------------------

def test_half_written_last_record_then_completion(tmp_path, rich_file):
    whole = tmp_path / "whole" / "events.out.tfevents.1.h"
    whole.parent.mkdir()
    whole.write_bytes(rich_file)
    expected = reprs(read_all(whole))
    start, end = record_spans(rich_file)[-3]
    for cut in (start + 5, start + 12, start + 20, end - 2):  # in the header, data, footer
        dst = tmp_path / f"cut{cut}" / "events.out.tfevents.1.h"
        dst.parent.mkdir()
        got, reader = grow(rich_file, dst, [cut])
        assert reprs(got + flush_all(reader)) == expected
        assert not reader.skipped


@pytest.mark.parametrize("seed", range(6))
def test_random_chunks_equal_one_read(tmp_path, rich_file, seed):
    rng = random.Random(seed)
    whole = tmp_path / "events.out.tfevents.1.whole"
    whole.write_bytes(rich_file)
    reader = TensorBoardReader(whole)
    expected = read_all(whole, math.inf, reader)
    expected += flush_all(reader)
    pieces = rng.choice([5, 40, 300])
    cuts = [rng.randrange(len(rich_file)) for _ in range(pieces)]
    got, grown = grow(rich_file, tmp_path / "events.out.tfevents.1.grown", cuts)
    assert reprs(got + flush_all(grown)) == reprs(expected)
    assert not grown.skipped


def test_random_chunks_hypothesis(tmp_path_factory, rich_file):
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    folder = tmp_path_factory.mktemp("hyp")
    whole = folder / "events.out.tfevents.1.whole"
    whole.write_bytes(rich_file)
    expected = reprs(read_all(whole))

    @hyp.settings(max_examples=25, deadline=None)
    @hyp.given(st.lists(st.integers(0, len(rich_file)), max_size=30))
    def check(cuts):
        got, reader = grow(rich_file, folder / "events.out.tfevents.1.grown", cuts)
        assert reprs(got + flush_all(reader)) == expected

    check()


def test_state_round_trip_resumes_mid_file(tmp_path, rich_file):
    whole = tmp_path / "events.out.tfevents.1.whole"
    whole.write_bytes(rich_file)
    expected = reprs(read_all(whole))
    rng = random.Random(7)
    for cut in [rng.randrange(len(rich_file)) for _ in range(8)]:
        path = tmp_path / f"events.out.tfevents.1.cut{cut}"
        path.write_bytes(rich_file[:cut])
        first = TensorBoardReader(path)
        head = read_all(path, math.inf, first)
        state = json.loads(json.dumps(first.get_state(), allow_nan=False))  # as the daemon saves it
        with open(path, "ab") as f:
            f.write(rich_file[cut:])
        resumed = TensorBoardReader(path)
        resumed.set_state(state)
        assert reprs(head + read_all(path, reader=resumed)) == expected


def test_open_step_waits_unless_idle(tmp_path, torch_writer):
    """A step whose tags are not all there yet is held; a finished (idle) file releases it."""
    w = torch_writer(str(tmp_path))
    for step in range(3):
        w.add_scalar("a", 1.0, step)
        w.add_scalar("b", 2.0, step)
    w.add_scalar("a", 1.0, 3)
    w.close()
    reader = TensorBoardReader(event_file(tmp_path))
    reader.idle_seconds = math.inf
    assert [r.step for r in reader.read()] == [0, 1, 2]  # step 2 is complete: a and b
    state = json.dumps(reader.get_state(), allow_nan=False)
    assert [(r.step, r.metrics) for r in flush_all(reader)] == [(3, {"a": 1.0})]
    again = TensorBoardReader(reader.path)
    again.set_state(json.loads(state))
    assert [(r.step, r.metrics) for r in flush_all(again)] == [(3, {"a": 1.0})]


def test_replaced_file_starts_over(tmp_path, rich_file, torch_writer):
    path = tmp_path / "events.out.tfevents.1.h"
    path.write_bytes(rich_file)
    reader = TensorBoardReader(path)
    first = read_all(path, reader=reader)
    tmp = tmp_path / "new"
    tmp.write_bytes(rich_file[: record_spans(rich_file)[40][0]])
    os.replace(tmp, path)
    again = read_all(path, reader=reader)
    assert reader.restarted
    assert 0 < len(again) < len(first)
    assert reprs(again[:-1]) == reprs(first[: len(again) - 1])  # the last may be a cut step
    assert again[-1].step == first[len(again) - 1].step


# ---- damage --------------------------------------------------------------------------------------

def scalar_record(data: bytes, nth: int) -> tuple[int, int]:
    """The span of the ``nth`` record that carries a train/loss scalar."""
    spans = [s for s in record_spans(data) if b"train/loss" in data[s[0]:s[1]]]
    return spans[nth]


def test_corrupt_data_crc_is_skipped_and_counted(tmp_path, rich_file):
    start, end = scalar_record(rich_file, 10)
    bad = bytearray(rich_file)
    bad[end - 6] ^= 0x01  # a bit of the float: the data CRC no longer matches
    path = tmp_path / "events.out.tfevents.1.bad"
    path.write_bytes(bytes(bad))
    ref = tmp_path / "events.out.tfevents.1.ref"
    ref.write_bytes(rich_file[:start] + rich_file[end:])
    reader = TensorBoardReader(path)
    assert reprs(read_all(path, reader=reader)) == reprs(read_all(ref))
    assert reader.skipped == {"corrupt record (data CRC mismatch)": 1}


def test_corrupt_header_resynchronises(tmp_path, rich_file):
    start, end = scalar_record(rich_file, 10)
    bad = bytearray(rich_file)
    bad[start] ^= 0x40  # the length itself: untrustworthy, scan to the next record
    path = tmp_path / "events.out.tfevents.1.bad"
    path.write_bytes(bytes(bad))
    ref = tmp_path / "events.out.tfevents.1.ref"
    ref.write_bytes(rich_file[:start] + rich_file[end:])
    reader = TensorBoardReader(path)
    assert reprs(read_all(path, reader=reader)) == reprs(read_all(ref))
    assert reader.skipped == {"corrupt record header": 1}


def test_garbage_between_records_and_at_the_end(tmp_path, rich_file):
    start, _ = scalar_record(rich_file, 5)
    junk = bytes(random.Random(1).randrange(256) for _ in range(3000))
    path = tmp_path / "events.out.tfevents.1.junk"
    grown, reader = grow(rich_file[:start] + junk + rich_file[start:] + junk[:500], path,
                         list(range(0, len(rich_file) + 3500, 997)))
    assert reprs(grown + flush_all(reader)) == reprs(read_all(_write(tmp_path / "r", rich_file)))
    assert reader.skipped["corrupt record header"] == 2


def _write(folder: Path, data: bytes) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "events.out.tfevents.1.x"
    path.write_bytes(data)
    return path


def test_over_long_record_skipped(tmp_path, rich_file, monkeypatch):
    monkeypatch.setattr(tbmod, "MAX_RECORD", 300)  # images and histograms are longer
    path = _write(tmp_path, rich_file)
    reader = TensorBoardReader(path)
    records = read_all(path, reader=reader)
    longer = sum(1 for s, e in record_spans(rich_file) if e - s - 16 > 300)
    assert longer >= 3 and reader.skipped == {"over-long record": longer}
    assert [r.step for r in records] == list(range(61))


def test_huge_declared_length_waits_without_reading(tmp_path):
    header = struct.pack("<Q", 1 << 60)
    path = _write(tmp_path, header + struct.pack("<I", masked_crc32c(header)) + b"x" * 100)
    reader = TensorBoardReader(path)
    assert read_all(path, reader=reader) == [] and reader.offset == 0 and not reader.skipped


def test_garbage_never_raises(tmp_path, rich_file):
    rng = random.Random(5)
    blobs = [b"", b"\x00" * 100, os.urandom(5000), rich_file[:17] * 50,
             b"".join(rich_file[s:e][: rng.randrange(1, e - s)] for s, e in record_spans(rich_file)[:80])]
    for i in range(20):  # real records with random bytes changed
        data = bytearray(rich_file)
        for _ in range(rng.choice([1, 5, 50])):
            data[rng.randrange(len(data))] = rng.randrange(256)
        blobs.append(bytes(data))
    for i, blob in enumerate(blobs):
        path = _write(tmp_path / str(i), blob)
        cuts = [rng.randrange(len(blob) + 1) for _ in range(5)]
        grow(blob, path, cuts, idle=0)
        read_all(path)


def test_garbage_never_raises_hypothesis(tmp_path_factory, rich_file):
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    folder = tmp_path_factory.mktemp("garbage")
    spans = record_spans(rich_file)

    @hyp.settings(max_examples=60, deadline=None)
    @hyp.given(st.lists(st.one_of(st.binary(max_size=64), st.sampled_from(spans)), max_size=30),
               st.lists(st.integers(0, 4000), max_size=5))
    def check(pieces, cuts):
        blob = b"".join(p if isinstance(p, bytes) else rich_file[p[0]:p[1]] for p in pieces)
        grow(blob, folder / "events.out.tfevents.1.g", cuts, idle=0)

    check()


def test_small_read_blocks_and_records_longer_than_a_block(tmp_path, rich_file, monkeypatch):
    """``more`` drives the caller's loop; a record longer than a block is read whole."""
    path = _write(tmp_path, rich_file)
    expected = reprs(read_all(path))
    monkeypatch.setattr(tbmod, "PARSE_BLOCK", 700)  # the images are ~10 KB
    reader = TensorBoardReader(path)
    assert reprs(read_all(path, reader=reader)) == expected and not reader.skipped


def fast_agrees(payload: bytes) -> bool:
    """If the vectorised fast path takes ``payload``, it decodes it as ``parse_event`` does."""
    arr = np.frombuffer(payload, dtype=np.uint8)
    ok, step, value, tag_at, tag_end, tensor = tbmod.fast_events(arr, np.array([0]), np.array([len(payload)]))
    if not ok[0]:
        return False
    parsed_step, values, start = parse_event(payload)
    assert len(values) == 1 and not start
    tag, parsed, from_tensor, plugin = values[0]
    assert (step[0], payload[tag_at[0]:tag_end[0]], bool(tensor[0])) == (parsed_step, tag, from_tensor)
    assert plugin in (None, b"scalars")
    assert value[0] == parsed or (math.isnan(value[0]) and math.isnan(parsed))
    return True


def test_fast_path_agrees_with_the_parser(tmp_path):
    """Extreme steps, long tags, simple_value and tensor forms: fast path == parse_event."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
    w = tf2_writer(tmp_path, "")
    steps = [0, 1, 127, 128, 300, 2**31, 2**40 + 3, 2**62, -1, -(2**40)]
    tags = ["a", "b" * 100, "c" * 118, "d" * 119, "é/ü"]
    for step in steps:
        for tag in tags:
            value = summary_pb2.Summary.Value(tag=tag, simple_value=step / 7)
            w.add_event(event_pb2.Event(wall_time=1.0, step=step, summary=summary_pb2.Summary(value=[value])))
        tensors = [("t32", tf2_tensor("DT_FLOAT", struct.pack("<f", step / 3))),
                   ("t64", tf2_tensor("DT_DOUBLE", struct.pack("<d", step / 3))),
                   ("f32", tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[step / 3])),
                   ("f64", tensor_pb2.TensorProto(dtype=types_pb2.DT_DOUBLE, double_val=[step / 3]))]
        for tag, tensor in tensors:
            torch_style = tag.startswith("f")
            event = tf2_event(step, tag, tensor, "scalars" if torch_style else None)
            if torch_style:  # torch new_style: plugin name only, no tensor shape
                event.summary.value[0].metadata.ClearField("data_class")
            w.add_event(event)
    w.close()
    data = event_file(tmp_path).read_bytes()
    spans = record_spans(data)[1:]
    taken = [fast_agrees(data[s + 12 : t - 4]) for s, t in spans]
    assert sum(taken) == len(steps) * 8  # all but the 119-byte tags (two-byte lengths)
    records = read_all(event_file(tmp_path))
    assert [r.step for r in records] == steps
    for r in records:
        third = r.step / 3
        assert r.metrics == {**{t: float(np.float32(r.step / 7)) for t in tags}, "t32": float(np.float32(third)),
                             "t64": third, "f32": float(np.float32(third)), "f64": third}


def test_parse_event_fuzz(rich_file):
    """Arbitrary and mutated payloads: only the decode errors the reader catches."""
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    payloads = [rich_file[s + 12 : e - 4] for s, e in record_spans(rich_file)]

    @hyp.settings(max_examples=300, deadline=None)
    @hyp.given(st.one_of(st.binary(max_size=200),
                         st.tuples(st.sampled_from(payloads), st.integers(0, 10_000), st.integers(0, 255))))
    def check(case):
        if isinstance(case, tuple):
            data, at, byte = case
            data = bytearray(data)
            data[at % len(data)] = byte
            case = bytes(data)
        try:
            parse_event(case)
        except tbmod._DECODE_ERRORS:
            return
        fast_agrees(case)

    check()


def test_daemon_reads_and_resumes_through_a_plugin_file(tmp_path, torch_writer, cli):
    """The real ``autolr watch --once`` with the reader loaded from --plugins-dir: every step
    is a row, the read position is saved as JSON, and a second pass reads only what is new."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tb.py").write_text("from autolr.readers.tensorboard import register_readers  # noqa: F401\n")
    run = tmp_path / "root" / "run1"
    w = torch_writer(str(run))
    for step in range(30):
        w.add_scalar("loss", 1.0, step)
        w.add_scalar("lr", 0.1, step)
    w.close()
    args = ["--plugins-dir", str(plugins), "watch", str(tmp_path / "root"), "--once",
            "--policy", "plateau:method=threshold,patience=3", "--base-lr", "0.1", "--no-fsync"]
    cli(*args)
    state = json.loads((run / "autolr.state.json").read_text())
    (source,) = state["sources"].values()
    assert source["reader"] == "tensorboard" and state["rows"] == 30
    w = torch_writer(str(run))
    for step in range(30, 40):
        w.add_scalar("loss", 1.0, step)
        w.add_scalar("lr", 0.1, step)
    w.close()
    cli(*args)
    state = json.loads((run / "autolr.state.json").read_text())
    assert state["rows"] == 40 and len(state["sources"]) == 2


def test_lightning_hp_metric_placeholder_does_not_take_a_resumed_run_to_step_0(tmp_path):
    """Lightning's TensorBoardLogger writes hp_metric = -1 at step 0 whenever a fit starts with
    hyperparameters, a resumed one too: read as a row, it rewound the run to step 0 and threw
    its history away (a multistep cut at step 30 was undone after a resume at step 40)."""
    pytest.importorskip("lightning")
    from lightning.pytorch.loggers import TensorBoardLogger

    from autolr.config import load_config, parse_policy_options
    from autolr.control import read_journal
    from autolr.daemon import Daemon, Options
    from autolr.plugins import get_plugin_manager, policy_classes, reader_classes

    def fit(steps):
        logger = TensorBoardLogger(tmp_path, name="lt", version=0)
        logger.log_hyperparams({"width": 8})
        for s in steps:
            logger.log_metrics({"train_loss": 1.0 / (1 + s)}, s)
        logger.finalize("success")

    pm = get_plugin_manager(entry_points=False)
    overrides = {"policies": parse_policy_options(["multistep:milestones=[30],gamma=0.5"]), "base_lr": 0.1}
    fit(range(80))
    fit(range(40, 60))  # resumed from the checkpoint at step 40: a second events file
    Daemon(tmp_path, load_config(None), overrides, policy_classes(pm), reader_classes(pm),
           Options(once=True, fsync=False)).run()
    journal = read_journal(tmp_path / "lt" / "version_0")
    assert [(e["kind"], e["step"]) for e in journal if e["kind"] == "rewind"] == [("rewind", 40)], journal
    assert journal[-1]["lr"] == pytest.approx(0.05)  # the cut at step 30 still holds
    reader = TensorBoardReader(sorted((tmp_path / "lt" / "version_0").glob("events.out.tfevents.*"))[0])
    assert all("hp_metric" not in r.metrics for r in reader.read())


def test_add_scalars_folders_of_one_run_take_no_rewind_from_each_other(tmp_path, torch_writer):
    """Regression: add_scalars writes each key's scalars to its own folder, read one after the
    other: the validation file's step 0 after the training file's step 399 was taken for a
    resumed job; the rewind threw the training rows away and auto's warmup began again (the
    LR 10x lower). A resume in one folder (a second file there) still rewinds."""
    from autolr.config import load_config, parse_policy_options
    from autolr.control import read_journal
    from autolr.daemon import Daemon, Options
    from autolr.plugins import get_plugin_manager, policy_classes, reader_classes

    w = torch_writer(str(tmp_path / "run"))
    for s in range(400):
        w.add_scalars("Loss", {"train": 1.0 / (1 + 0.01 * s), "val": 1.1 / (1 + 0.01 * s)}, s)
    w.close()
    pm = get_plugin_manager(entry_points=False)

    def watch(policy="auto"):
        Daemon(tmp_path, load_config(None), {"policies": parse_policy_options([policy])},
               policy_classes(pm), reader_classes(pm), Options(once=True, fsync=False)).run()

    watch()
    journal = read_journal(tmp_path / "run")
    assert not [e for e in journal if e["kind"] == "rewind"], [e["reason"] for e in journal if e["kind"] == "rewind"]
    assert journal[-1]["scale"] >= 0.5  # the warmup ended once; no fall back to its start (0.1)
    state = json.loads((tmp_path / "run" / "autolr.state.json").read_text())
    assert state["engine"]["lanes"] == {"Loss_train": 399, "Loss_val": 399} and state["engine"]["last_key"] == 399
    # the job resumes from step 200 and writes a second file in each folder: one rewind, to 200
    w = torch_writer(str(tmp_path / "run"))
    for s in range(200, 220):
        w.add_scalars("Loss", {"train": 0.5, "val": 0.55}, s)
    w.close()
    watch()
    rewinds = [(e["step"], e["evidence"]["from"]) for e in read_journal(tmp_path / "run") if e["kind"] == "rewind"]
    assert rewinds == [(200, 399)], rewinds


def test_live_rows_of_a_side_by_side_folder_behind_the_other_are_late_not_a_resume(tmp_path, torch_writer):
    """Live, the two folders' new rows are read one file after the other: validation's steps
    10-19 after training's 10-19 are late rows of the same moment, fed without a rewind; a
    folder going back below its own last step is a resume and still rewinds."""
    from autolr.config import Settings, parse_policy_options
    from autolr.plugins import get_plugin_manager, policy_classes
    from autolr.run import Run

    w = torch_writer(str(tmp_path / "run"))
    for s in range(10):
        w.add_scalars("Loss", {"train": 1.0, "val": 1.0}, s)
    w.flush()
    files = {p.parent.name: p for p in (tmp_path / "run").rglob("events.out.tfevents.*") if p.parent.name != "run"}
    train, val = TensorBoardReader(files["Loss_train"]), TensorBoardReader(files["Loss_val"])
    run = Run(tmp_path / "run", Settings(policies=parse_policy_options(["constant"])),
              policy_classes(get_plugin_manager(entry_points=False)), fsync=False)
    run.start()
    for reader in (train, val, train, val):
        train.idle_seconds = val.idle_seconds = 0
        run.feed(reader, reader.read())
        if reader is val:
            for s in range(10, 20):
                w.add_scalars("Loss", {"train": 1.0, "val": 1.0}, s)
            w.flush()
    assert run.engine.rewinds == 0 and run.rows == 40
    assert run.engine.lanes == {"Loss_train": 19, "Loss_val": 19} and run.engine.last_key == 19
    w.close()
    late = TensorBoardReader(files["Loss_val"])
    records = late.read()  # the same validation rows again: that folder went back, a resume
    run.feed(late, records[5:6])
    assert run.engine.rewinds == 1 and run.engine.last_key == 5


@pytest.mark.parametrize("sub", ["train", "validation"])
def test_a_torch_writers_train_folder_is_a_run_of_its_own(tmp_path, sub):
    """Regression: Lightning's TensorBoardLogger(sub_dir="train") writes torch event files in
    version_0/train, its trainer.log_dir (where AutolrCallback reads); they were taken for
    Keras's layout: the control file went to version_0, and "validation" prefixed every
    metric with val_ (val_train_loss)."""
    from torch.utils.tensorboard import SummaryWriter

    folder = tmp_path / "version_0" / sub
    with SummaryWriter(str(folder)) as w:
        w.add_scalar("train_loss", 1.0, 0)
    path = event_file(folder)
    assert TensorBoardReader.run_dir(path) == folder
    assert [r.metrics for r in read_all(path)] == [{"train_loss": 1.0}]
