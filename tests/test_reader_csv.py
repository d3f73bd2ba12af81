"""CsvReader against files written by the real Keras and Lightning CSVLoggers, tailed live.

The Keras and Lightning runs happen once per module (module fixtures); the reader is called from
inside training (callbacks), so the truncation at ``fit()`` and Lightning's in-place header
rewrite are met the way a tailing daemon meets them.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import tracemalloc
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autolr.readers import base
from autolr.readers.csv import CsvReader

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


# --------------------------------------------------------------------------- real Keras runs


@pytest.fixture(scope="module")
def keras_run(tmp_path_factory):
    """Three fits into one CSVLogger file, tailed from callbacks by a live reader.

    fit 1: 2 epochs with validation data; fit 2: ``append=False`` (truncates), 6 epochs without
    validation (``NA`` cells); fit 3: ``append=True``, 2 epochs. A second, "late" reader only
    looks after each whole fit, so it meets fit 2's file already regrown past its old offset.
    """
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras already imported with another backend")
    import numpy as np

    folder = tmp_path_factory.mktemp("keras")
    path = folder / "training.csv"
    live, late = CsvReader(path), CsvReader(path)
    events: list[tuple[str, list, bool, list[str]]] = []

    class Tail(keras.callbacks.Callback):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def _read(self, when):
            records = live.read()
            events.append((f"{self.tag}:{when}", records, live.restarted, live.columns()))

        def on_train_begin(self, logs=None):
            self._read("begin")

        def on_epoch_end(self, epoch, logs=None):
            self._read(f"epoch{epoch}")

    def métrique_λ(y_true, y_pred):  # a metric name with multi-byte UTF-8 in the header
        return keras.ops.mean(keras.ops.abs(y_true - y_pred))

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((32, 4)).astype("float32")
    y = rng.random((32, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", metrics=[métrique_λ])

    def fit(tag, epochs, append, validation):
        logger = keras.callbacks.CSVLogger(str(path), append=append)
        model.fit(x, y, epochs=epochs, batch_size=16, verbose=0,
                  validation_data=(x, y) if validation else None, callbacks=[logger, Tail(tag)])
        return path.read_bytes()

    out = {"path": path, "events": events, "late": {}}
    out["fit1"] = fit("fit1", 2, False, True)
    out["late"]["fit1"] = (drain(late), late.restarted)
    out["fit2"] = fit("fit2", 6, False, False)
    out["late"]["fit2"] = (drain(late), late.restarted)
    out["fit3"] = fit("fit3", 2, True, True)
    out["late"]["fit3"] = (drain(late), late.restarted)
    out["live_final"] = (drain(live), live.restarted)
    return out


def events_of(run, tag):
    return [e for e in run["events"] if e[0].startswith(tag + ":")]


def test_keras_file_has_the_documented_shape(keras_run):
    text = keras_run["fit1"].decode("utf-8")
    assert text.startswith("epoch,loss,métrique_λ,val_loss,val_métrique_λ\r\n")
    assert "NA" in keras_run["fit2"].decode("utf-8")
    assert len(keras_run["fit2"]) > len(keras_run["fit1"])  # precondition of the "late" test
    assert keras_run["fit3"].startswith(keras_run["fit2"])  # append=True appended


def test_keras_live_tail_of_first_fit_equals_whole_read(keras_run, tmp_path):
    live = [r for e in events_of(keras_run, "fit1") for r in e[1]]
    records, skipped = whole(CsvReader, write(tmp_path / "k.csv", keras_run["fit1"]))
    assert norm(live) == norm(records)
    assert [r.epoch for r in records] == [0.0, 1.0]
    assert set(records[0].metrics) == {"loss", "métrique_λ", "val_loss", "val_métrique_λ"}
    assert all(r.step is None for r in records)
    assert skipped == {}
    assert not any(e[2] for e in events_of(keras_run, "fit1"))


def test_keras_na_cells_are_missing_values(keras_run, tmp_path):
    records, _ = whole(CsvReader, write(tmp_path / "k.csv", keras_run["fit2"]))
    assert [r.epoch for r in records] == [float(e) for e in range(6)]
    for r in records:
        assert set(r.metrics) == {"loss", "métrique_λ"}
        assert all(math.isfinite(v) for v in r.metrics.values())


def test_keras_truncating_fit_restarts_the_live_reader(keras_run, tmp_path):
    fit2 = events_of(keras_run, "fit2")
    begin = fit2[0]
    # On train begin the file is empty: no records, and no restart announced before a header.
    assert begin[0] == "fit2:begin" and begin[1] == [] and begin[2] is False
    restarts = [e for e in fit2 if e[2]]
    assert len(restarts) == 1 and restarts[0][0] == "fit2:epoch0"
    assert [r.epoch for r in restarts[0][1]] == [0.0]
    after = [r for e in fit2 for r in e[1]]
    records, _ = whole(CsvReader, write(tmp_path / "k.csv", keras_run["fit2"]))
    assert norm(after) == norm(records)


def test_keras_truncation_regrown_past_the_offset_is_detected(keras_run, tmp_path):
    """The late reader never saw fit 2's file small: only its bytes tell it is a new log."""
    first, first_restarted = keras_run["late"]["fit1"]
    second, second_restarted = keras_run["late"]["fit2"]
    assert not first_restarted and second_restarted
    records, _ = whole(CsvReader, write(tmp_path / "k.csv", keras_run["fit2"]))
    assert norm(second) == norm(records)
    assert second[0].epoch == 0.0


def test_keras_append_true_adds_rows_without_restart(keras_run, tmp_path):
    fit3 = events_of(keras_run, "fit3")
    assert not any(e[2] for e in fit3)
    appended = [r for e in fit3 for r in e[1]]
    assert [r.epoch for r in appended] == [0.0, 1.0]
    assert {"val_loss", "val_métrique_λ"} <= set(appended[0].metrics)
    late, late_restarted = keras_run["late"]["fit3"]
    assert not late_restarted and norm(late) == norm(appended)
    everything, _ = whole(CsvReader, write(tmp_path / "k.csv", keras_run["fit3"]))
    fit2_records, _ = whole(CsvReader, write(tmp_path / "k2.csv", keras_run["fit2"]))
    assert norm(everything) == norm(fit2_records + appended)
    assert keras_run["live_final"] == ([], False)


def test_keras_replaced_file_restarts(keras_run, tmp_path):
    path = write(tmp_path / "k.csv", keras_run["fit1"])
    reader = CsvReader(path)
    assert len(drain(reader)) == 2
    inode = path.stat().st_ino
    write(tmp_path / "new.csv", keras_run["fit2"])
    os.replace(tmp_path / "new.csv", path)
    assert path.stat().st_ino != inode
    again = drain(reader)
    assert reader.restarted
    assert norm(again) == norm(whole(CsvReader, path)[0])
    assert drain(reader) == [] and not reader.restarted


def test_keras_replaced_by_a_shorter_file_restarts(keras_run, tmp_path):
    path = write(tmp_path / "k.csv", keras_run["fit2"])
    reader = CsvReader(path)
    drain(reader)
    rewrite_in_place(path, keras_run["fit1"])  # same inode, smaller
    again = drain(reader)
    assert reader.restarted and [r.epoch for r in again] == [0.0, 1.0]


# ------------------------------------------------------------------------ real Lightning run


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    """Two epochs of a tiny LightningModule; a callback tails metrics.csv during training."""
    torch = pytest.importorskip("torch")
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, _):
            loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, _):
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    reads: list[dict] = []

    class Tail(pl.Callback):
        reader: CsvReader | None = None

        def _read(self, trainer, when):
            path = Path(trainer.logger.experiment.metrics_file_path)
            if self.reader is None:
                self.reader = CsvReader(path)
            records = drain(self.reader)
            st = path.stat() if path.exists() else None
            reads.append({
                "when": when, "records": records, "restarted": self.reader.restarted,
                "columns": self.reader.columns(), "inode": st and st.st_ino,
                "size": st and st.st_size, "data": path.read_bytes() if st else b"",
            })

        def on_train_batch_end(self, trainer, *args):
            self._read(trainer, f"batch{trainer.global_step}")

        def on_validation_end(self, trainer, *args):
            self._read(trainer, "validation")

        def on_train_end(self, trainer, *args):
            self._read(trainer, "end")

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    folder = tmp_path_factory.mktemp("lightning")
    logger = CSVLogger(str(folder), flush_logs_every_n_steps=1)
    tail = Tail()
    trainer = pl.Trainer(max_epochs=2, log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, logger=logger,
                         accelerator="cpu", callbacks=[tail])
    trainer.fit(Tiny(), loader, loader)
    path = Path(logger.experiment.metrics_file_path)
    final = drain(tail.reader)
    return {"path": path, "reads": reads, "final": final, "data": path.read_bytes()}


def rewrite_pair(run) -> tuple[dict, dict]:
    """The last read before the header gained val_loss, and the first read after."""
    reads = [r for r in run["reads"] if r["columns"]]
    for a, b in zip(reads, reads[1:]):
        if "val_loss" not in a["columns"] and "val_loss" in b["columns"]:
            return a, b
    raise AssertionError("the header rewrite was never observed while tailing")


def test_lightning_file_has_the_documented_shape(lightning_run):
    text = lightning_run["data"].decode()
    assert text.startswith("epoch,step,train_loss,val_loss\r\n")
    rows = text.split("\r\n")[1:-1]
    assert any(r.endswith(",") for r in rows) and any(",," in r for r in rows)  # sparse rows


def test_lightning_rewrite_observed_while_tailing(lightning_run):
    before, after = rewrite_pair(lightning_run)
    assert before["columns"] == ["epoch", "step", "train_loss"]
    assert after["columns"] == ["epoch", "step", "train_loss", "val_loss"]
    # What makes it a rewrite and not a truncation: same file, larger.
    assert after["inode"] == before["inode"] and after["size"] > before["size"]
    assert not after["data"].startswith(before["data"])
    assert not any(r["restarted"] for r in lightning_run["reads"])


def test_lightning_live_tail_equals_whole_read(lightning_run, tmp_path):
    live = [rec for r in lightning_run["reads"] for rec in r["records"]] + lightning_run["final"]
    records, skipped = whole(CsvReader, write(tmp_path / "metrics.csv", lightning_run["data"]))
    assert norm(live) == norm(records)
    assert skipped == {}
    assert len(records) == lightning_run["data"].count(b"\r\n") - 1


def test_lightning_sparse_rows_and_validation_reusing_a_step(lightning_run, tmp_path):
    records, _ = whole(CsvReader, write(tmp_path / "metrics.csv", lightning_run["data"]))
    train = [r for r in records if "train_loss" in r.metrics]
    val = [r for r in records if "val_loss" in r.metrics]
    assert len(train) == 8 and len(val) == 2
    assert [r.step for r in train] == list(range(8))
    assert all(set(r.metrics) == {"train_loss"} for r in train)
    assert all(set(r.metrics) == {"val_loss"} for r in val)
    for v in val:  # the validation row follows the training row of the same step
        i = records.index(v)
        assert records[i - 1].step == v.step and v.epoch == records[i - 1].epoch


@pytest.mark.parametrize("how", ["r+", "w"])
def test_lightning_rewrite_simulated_bytewise_no_duplicates(lightning_run, tmp_path, how):
    before, after = rewrite_pair(lightning_run)
    path = write(tmp_path / "metrics.csv", before["data"])
    reader = CsvReader(path)
    got = drain(reader)
    inode = path.stat().st_ino
    rewrite_in_place(path, after["data"], how)
    assert path.stat().st_ino == inode
    got += drain(reader)
    assert not reader.restarted
    assert norm(got) == norm(whole(CsvReader, path)[0])
    assert reader.columns()[-1] == "val_loss"


def test_lightning_rewrite_caught_half_written(lightning_run, tmp_path):
    """Reads while the rewrite is under way: empty file, half header, header and some rows."""
    before, after = rewrite_pair(lightning_run)
    new = after["data"]
    path = write(tmp_path / "metrics.csv", before["data"])
    reader = CsvReader(path)
    got = drain(reader)
    header_end = new.index(b"\n") + 1
    second_row_end = new.index(b"\n", new.index(b"\n", header_end) + 1) + 1
    with open(path, "r+b", buffering=0) as f:
        f.truncate(0)
        for piece in (b"", new[: header_end // 2], new[:header_end], new[: second_row_end - 3],
                      new[:second_row_end], new):
            f.seek(0)
            f.write(piece)
            got += drain(reader)
            assert not reader.restarted, f"spurious restart at {len(piece)} bytes"
    assert norm(got) == norm(whole(CsvReader, path)[0])


def test_lightning_rewrite_with_rows_the_reader_had_not_seen(lightning_run, tmp_path):
    before, after = rewrite_pair(lightning_run)
    old = before["data"]
    cut = old.rindex(b"\r\n", 0, len(old) - 2) - 4  # inside the last-but-one row
    path = write(tmp_path / "metrics.csv", old[:cut])
    reader = CsvReader(path)
    got = drain(reader)
    rewrite_in_place(path, after["data"])
    got += drain(reader)
    assert norm(got) == norm(whole(CsvReader, path)[0])


def test_lightning_state_saved_before_rewrite_resumes_after_it(lightning_run, tmp_path):
    before, after = rewrite_pair(lightning_run)
    path = write(tmp_path / "metrics.csv", before["data"])
    reader = CsvReader(path)
    got = drain(reader)
    rewrite_in_place(path, after["data"])
    got += drain(resumed(CsvReader, reader, path))
    assert norm(got) == norm(whole(CsvReader, path)[0])


# ------------------------------------------------------------------ random growth, real bytes


def real_files(keras_run, lightning_run) -> dict[str, bytes]:
    return {"keras_fit1": keras_run["fit1"], "keras_fit3": keras_run["fit3"],
            "lightning": lightning_run["data"]}


def test_real_files_grown_in_random_chunks_equal_whole_read(keras_run, lightning_run, tmp_path):
    for name, data in real_files(keras_run, lightning_run).items():
        want = whole(CsvReader, write(tmp_path / f"{name}.csv", data))
        specials = special_cuts(data)
        assert any(data[c - 1 : c + 1] == b"\r\n" for c in specials)
        if name.startswith("keras"):
            assert any(data[c] & 0xC0 == 0x80 for c in specials)  # inside "λ" / "é"
        for seed in SEEDS:
            path = tmp_path / f"{name}-{seed}.csv"
            reader = CsvReader(path)
            got = grow(reader, path, data, random_cuts(data, seed, extra=specials if seed % 2 else ()))
            assert norm(got) == norm(want[0]), (name, seed)
            assert dict(reader.skipped) == want[1]


def test_real_file_in_single_bytes(keras_run, tmp_path):
    data = keras_run["fit1"]
    path = tmp_path / "k.csv"
    got = grow(CsvReader(path), path, data, range(1, len(data)))
    assert norm(got) == norm(whole(CsvReader, path)[0])


def test_partial_last_line_is_held_back(keras_run, tmp_path):
    data = keras_run["fit1"]
    last = data.rindex(b"\r\n", 0, len(data) - 2) + 2
    path = write(tmp_path / "k.csv", data[: last + 5])
    reader = CsvReader(path)
    assert [r.epoch for r in drain(reader)] == [0.0]
    with open(path, "ab") as f:
        f.write(data[last + 5 : -1])  # all but the final "\n"
    assert drain(reader) == []
    with open(path, "ab") as f:
        f.write(b"\n")
    assert [r.epoch for r in drain(reader)] == [1.0]


# ------------------------------------------------------------------------------------ state


@pytest.mark.parametrize("which", ["keras_fit3", "lightning"])
def test_state_round_trip_mid_file(keras_run, lightning_run, tmp_path, which):
    data = real_files(keras_run, lightning_run)[which]
    full = norm(whole(CsvReader, write(tmp_path / "full.csv", data))[0])
    for cut in (1, len(data) // 3, len(data) // 2 + 1, len(data) - 1):
        path = write(tmp_path / f"part{cut}.csv", data[:cut])
        reader = CsvReader(path)
        first = drain(reader)
        state = json.loads(json.dumps(reader.get_state()))
        with open(path, "ab") as f:
            f.write(data[cut:])
        fresh = CsvReader(path)
        fresh.set_state(state)
        rest = drain(fresh)
        assert not fresh.restarted
        assert norm(first) + norm(rest) == full, cut
        assert fresh.columns() == data[: data.index(b"\r\n")].decode().split(",")


def test_state_keeps_the_header(keras_run, tmp_path):
    path = write(tmp_path / "k.csv", keras_run["fit1"])
    reader = CsvReader(path)
    drain(reader)
    fresh = resumed(CsvReader, reader, path)
    assert fresh.columns() == reader.columns() and fresh.columns()[0] == "epoch"
    assert drain(fresh) == []
    with open(path, "ab") as f:
        f.write(b"2,0.5,0.25,NA,NA\r\n")
    assert [(r.epoch, r.metrics) for r in drain(fresh)] == [(2.0, {"loss": 0.5, "métrique_λ": 0.25})]


# ---------------------------------------------------------------------------------- garbage


def test_bad_rows_are_skipped_and_counted(tmp_path):
    data = (
        b"step,loss,name\r\n"
        b"1,0.5,run-a\r\n"
        b"2,0.4\r\n"                      # too few fields
        b"3,0.3,x,extra\r\n"              # too many
        b"4,abc,run-a\r\n"                # non-numeric cell: dropped, row kept
        b"5,nan,run-a\r\n"                # nan is a value
        b"6,inf,run-a\r\n"
        b"7,-inf,NA\r\n"
        b"8,0.1\rstray,run-a\r\n"         # a bare CR inside: unparseable by csv
        b"9,\"" + b"1" * 200_000 + b"\",x\r\n"  # a field over csv's size limit
        b"\xff\xfe\x00\x01,\x80,\x00\r\n"   # binary, but three cells
        b"\r\n\r\n"                       # blank lines
        b"10,0.05,run-b\r\n"
    )
    path = write(tmp_path / "bad.csv", data)
    reader = CsvReader(path)
    records = drain(reader)
    got = [(r.step, r.metrics.get("loss")) for r in records]
    assert got[0] == (1, 0.5)
    assert (4, None) in got
    assert math.isnan(dict(got)[5]) and dict(got)[6] == math.inf and dict(got)[7] == -math.inf
    assert got[-1] == (10, 0.05)
    assert [s for s, _ in got] == [1, 4, 5, 6, 7, None, 10]
    assert records[5].metrics == {}  # the binary row: three cells, none a number
    assert reader.skipped["malformed CSV row"] == 4  # 2, 3, the CR row, the huge field
    assert all("name" not in r.metrics for r in records)


def test_three_megabyte_line_is_skipped_counted_and_never_returned(tmp_path):
    huge = b"9," + b"7" * (3 << 20)
    data = b"step,loss\n1,0.5\n" + huge + b"\n2,0.25\n"
    path = write(tmp_path / "huge.csv", data)
    reader = CsvReader(path)
    records = drain(reader)
    assert [(r.step, r.metrics) for r in records] == [(1, {"loss": 0.5}), (2, {"loss": 0.25})]
    assert reader.skipped["over-long line"] == 1
    grown_path = tmp_path / "grown.csv"
    grown = CsvReader(grown_path)
    got = grow(grown, grown_path, data, range(0, len(data), 256 << 10))
    assert norm(got) == norm(records) and grown.skipped["over-long line"] == 1
    # Discarded as soon as it passes MAX_LINE, before its newline exists: never held whole.
    part_path = write(tmp_path / "part.csv", data[: -len(b"\n2,0.25\n")])
    part = CsvReader(part_path)
    assert [r.step for r in drain(part)] == [1] and part.skipped["over-long line"] == 1
    assert part.tailer.offset == len(data) - len(b"\n2,0.25\n") and part.tailer.skipping


def test_over_long_line_memory_is_bounded(tmp_path):
    data = b"step,loss\n1,0.5\n" + b"8" * (3 << 20) + b"\n2,0.25\n"
    path = write(tmp_path / "huge.csv", data)
    with mock.patch.object(base, "READ_BLOCK", 256 << 10), mock.patch.object(base, "MAX_LINE", 64 << 10):
        reader = CsvReader(path)
        tracemalloc.start()
        try:
            records = drain(reader)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert [r.step for r in records] == [1, 2]
    assert reader.skipped["over-long line"] == 1
    assert peak < 1 << 20, peak  # a 3 MB line, read through a 256 KB window


def test_line_of_exactly_max_line_kept_however_it_arrives(tmp_path):
    with mock.patch.object(base, "MAX_LINE", 64):
        line = b"1," + b"2" * 62
        assert len(line) == 64
        data = b"a,b\n" + line + b"\n" + b"3," + b"4" * 63 + b"\n5,6\n"  # then 65 bytes: too long
        want = whole(CsvReader, write(tmp_path / "w.csv", data))
        assert [r.metrics["a"] for r in want[0]] == [1.0, 5.0] and want[1] == {"over-long line": 1}
        path = tmp_path / "g.csv"
        reader = CsvReader(path)
        got = grow(reader, path, data, [4, 68, 69, 134])  # each long line arrives before its \n
        assert norm(got) == norm(want[0]) and dict(reader.skipped) == want[1]


def test_blank_lines_before_header_do_not_cause_rereads(tmp_path):
    path = write(tmp_path / "b.csv", b"\r\n\r\nstep,loss\r\n1,0.5\r\n")
    reader = CsvReader(path)
    assert [r.step for r in drain(reader)] == [1]
    with open(path, "ab") as f:
        f.write(b"2,0.4\r\n")
    assert [r.step for r in drain(reader)] == [2]
    assert drain(reader) == [] and not reader.restarted


def test_header_arriving_after_a_blank_read(tmp_path):
    path = write(tmp_path / "b.csv", b"\n")
    reader = CsvReader(path)
    assert drain(reader) == []
    with open(path, "ab") as f:
        f.write(b"step,loss\n1,0.5\n")
    assert [(r.step, r.metrics) for r in drain(reader)] == [(1, {"loss": 0.5})]


def test_missing_file_and_empty_file(tmp_path):
    reader = CsvReader(tmp_path / "absent.csv")
    assert drain(reader) == [] and reader.columns() == []
    empty = CsvReader(write(tmp_path / "empty.csv", b""))
    assert drain(empty) == [] and empty.columns() == []


def test_tsv(tmp_path):
    path = write(tmp_path / "m.tsv", b"step\tloss\n3\t0.5\n")
    assert [(r.step, r.metrics) for r in drain(CsvReader(path))] == [(3, {"loss": 0.5})]


# ------------------------------------------------------------------------------- properties

CSV_TOKENS = [b"step", b"epoch", b"loss", b",", b",", b"\r\n", b"\n", b"\r", b'"', b"1", b"2.5",
              b"-3e2", b"NA", b"nan", b"inf", b" ", b"\xce\xbb", b"\xff", b"\x00", b"\t"]
csv_like = st.lists(st.sampled_from(CSV_TOKENS), max_size=60).map(b"".join)
any_bytes = st.binary(max_size=300) | csv_like
#: A header, then short rows (some odd): records that survive MAX_LINE 24.
csv_files = st.lists(st.sampled_from([b"1,2.5\n", b"3,nan\n", b"x\n", b"7,-3e2,9\n", b"\n", b"4,\r\n"]),
                     max_size=30).map(lambda rows: b"step,loss\n" + b"".join(rows))


def check_chunking(data: bytes, cuts: list[int]) -> None:
    with tempfile.TemporaryDirectory() as d:
        want = whole(CsvReader, write(Path(d) / "whole.csv", data))
        path = Path(d) / "grown.csv"
        reader = CsvReader(path)
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
@given(data=any_bytes | csv_files, cuts=st.lists(st.integers(1, 300), max_size=12), parse=st.integers(1, 80))
def test_property_reads_cut_at_parse_block(data, cuts, parse):
    check_parse_cuts(CsvReader, ".csv", data, cuts, parse)


metric_rows = st.lists(
    st.dictionaries(st.sampled_from(["train_loss", "val_loss", "lr-SGD", "acc", "epoch"]),
                    st.floats(allow_infinity=True, allow_nan=True, width=32), min_size=1),
    min_size=1, max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=metric_rows, reads=st.lists(st.booleans(), min_size=12, max_size=12))
def test_property_lightning_writer_with_new_keys_read_any_time(rows, reads):
    """Lightning's own experiment writer, new keys at random moments, reads between saves."""
    pytest.importorskip("lightning")
    from lightning.fabric.loggers.csv_logs import _ExperimentWriter

    with tempfile.TemporaryDirectory() as d:
        writer = _ExperimentWriter(d)
        path = Path(writer.metrics_file_path)
        reader = CsvReader(path)
        got = []
        for step, (row, read_now) in enumerate(zip(rows, reads)):
            writer.log_metrics(row, step)
            writer.save()
            if read_now:
                got += drain(reader)
                assert not reader.restarted
        got += drain(reader)
        assert not reader.restarted
        want, skipped = whole(CsvReader, path)
        assert len(want) == len(rows) and skipped == {}
        assert norm(got) == norm(want)


def test_a_utf8_byte_order_mark_before_the_header_is_not_part_of_the_first_name(tmp_path):
    """Regression: Excel's and Python's utf-8-sig CSV starts with a BOM; the first column read
    as "\\ufeffstep", so the log lost its step counter."""
    plain, marked = tmp_path / "a" / "log.csv", tmp_path / "b" / "log.csv"
    for path, head in ((plain, ""), (marked, "\ufeff")):
        path.parent.mkdir()
        path.write_text(head + "step,loss\n" + "".join(f"{s * 10},{1 / (1 + s)}\n" for s in range(5)), encoding="utf-8")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbfstep")
    got, want = CsvReader(marked).read(), CsvReader(plain).read()
    assert got == want and [r.step for r in got] == [0, 10, 20, 30, 40]



def test_keras_refit_with_a_wider_header_is_a_new_log_not_a_rewrite(keras_run, tmp_path):
    """Regression: a Keras fit, then the model compiled again with one more metric and fit
    into the same file (append=False): the wider header was taken for Lightning's in-place
    rewrite and the new fit's rows were skipped as already delivered. Its first row differs
    from the one delivered: a new log. Across a restart of the reader too."""
    import keras
    import numpy as np

    path = tmp_path / "training.csv"
    rng = np.random.default_rng(1)
    x, y = rng.random((32, 4)).astype("float32"), rng.random((32, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    reader = CsvReader(path)
    fits = []
    for metrics in ([], ["mae"]):
        model.compile(optimizer="sgd", loss="mse", metrics=metrics)
        model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[keras.callbacks.CSVLogger(str(path))])
        fits.append(path.read_bytes())
        if not metrics:
            assert len(drain(reader)) == 3
            saved = json.loads(json.dumps(reader.get_state()))
    assert fits[1].startswith(b"epoch,loss,mae,")  # a superset of the first fit's columns
    for r in (reader, CsvReader(path)):
        if r is not reader:
            r.set_state(saved)
        again = drain(r)
        assert r.restarted and [x.epoch for x in again] == [0.0, 1.0, 2.0]
        assert norm(again) == norm(whole(CsvReader, write(tmp_path / "w.csv", fits[1]))[0])
