"""MLflow readers against stores written by the real mlflow client (SQLite and file store)."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sqlite3
import time
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

mlflow = pytest.importorskip("mlflow")
np = pytest.importorskip("numpy")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric  # noqa: E402

from autolr.readers import reader_for  # noqa: E402
from autolr.readers.mlflow import (  # noqa: E402
    MlflowDbReader,
    MlflowFileReader,
    locate_metric_file,
    parse_metric_line,
    sqlite_run_folder,
)


def key(v: float):
    """NaN-safe sort/compare key for a value."""
    return ("nan",) if v != v else ("num", v)


def flatten(records) -> list[tuple]:
    """(run, step, key, value) rows of records, epoch included as a key."""
    rows = []
    for r in records:
        rows += [(r.run, r.step, k, key(v)) for k, v in r.metrics.items()]
        if r.epoch is not None:
            rows.append((r.run, r.step, "epoch", key(r.epoch)))
    return sorted(rows, key=lambda row: (row[0] or "", -1 if row[1] is None else row[1], *row[2:]))


@pytest.fixture(scope="module")
def tracking():
    """Restores the tracking URI the rest of the process had."""
    before = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        yield mp
    mlflow.set_tracking_uri(before)


@pytest.fixture(scope="module")
def db(tracking, tmp_path_factory):
    """One SQLite store (creating it is slow), its client and what the tests logged so far."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{path}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("autolr")
    return {"path": path, "client": client, "exp": exp, "logged": []}


def log(db, run_id: str, step: int, **values: float) -> None:
    """Log one batch (several keys at one step) and remember it."""
    metrics = [Metric(k.replace("__", "/"), v, 1_700_000_000_000 + step, step) for k, v in values.items()]
    db["client"].log_batch(run_id, metrics=metrics)
    db["logged"] += [(run_id, step, m.key, key(v)) for m, v in zip(metrics, values.values())]


def new_run(db) -> str:
    return db["client"].create_run(db["exp"]).info.run_id


# ---- SQLite -----------------------------------------------------------------------------
def test_sqlite_records_equal_what_was_logged(db):
    a, b = new_run(db), new_run(db)
    for step in range(5):
        log(db, a, step, loss=1.0 / (step + 1), val__loss=2.0 / (step + 1), epoch=step // 2)
        log(db, b, step * 10, loss=0.5 + step)
    log(db, a, 5, loss=float("nan"), grad=float("inf"), low=float("-inf"))
    c = new_run(db)
    with mlflow.start_run(run_id=c):  # the fluent API too, step defaulting to 0
        mlflow.log_metric("no_step", 3.25)
        mlflow.log_metrics({"system/cpu_utilization_percentage": 12.0, "system/gpu_0_memory_usage_megabytes": 3.0}, step=0)
    db["logged"].append((c, 0, "no_step", key(3.25)))

    reader = MlflowDbReader(db["path"])
    records = reader.read()
    assert flatten(records) == sorted(db["logged"])
    assert not reader.skipped and not reader.more
    assert {r.run for r in records} == {a, b, c}  # system metrics (own step counter) left out
    first = next(r for r in records if r.run == a)
    assert first.metrics == {"loss": 1.0, "val/loss": 2.0} and first.step == 0 and first.epoch == 0.0
    last = [r for r in records if r.run == a and r.step == 5][0]
    assert math.isnan(last.metrics["loss"]) and last.metrics["grad"] == math.inf and last.metrics["low"] == -math.inf
    assert [r.step for r in records if r.run == b] == [0, 10, 20, 30, 40]
    assert reader.read() == []


def test_sqlite_incremental_and_resume(db):
    reader = MlflowDbReader(db["path"])
    reader.read()  # whatever earlier tests logged
    run = new_run(db)
    before = len(db["logged"])
    seen = []
    for step in range(6):
        log(db, run, step, loss=10.0 - step)
        if step % 2:
            log(db, run, step, val__loss=9.0 - step)
        got = reader.read()
        assert got and all(r.run == run and r.step == step for r in got)
        seen += got
    assert flatten(seen) == sorted(db["logged"][before:])
    # Resume: a reader restored from the saved state returns only rows logged since.
    state = json.loads(json.dumps(reader.get_state()))
    log(db, run, 6, loss=3.0)
    again = MlflowDbReader(db["path"])
    again.set_state(state)
    got = again.read()
    assert [(r.run, r.step, r.metrics) for r in got] == [(run, 6, {"loss": 3.0})]


def test_sqlite_locked_database_is_retried(db):
    reader = MlflowDbReader(db["path"])
    reader.read()
    run = new_run(db)
    log(db, run, 1, loss=1.5)
    holder = sqlite3.connect(db["path"], timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert reader.read() == []  # locked: no exception, no skip, try again later
        assert not reader.skipped
    finally:
        holder.rollback()
        holder.close()
    assert [(r.run, r.metrics) for r in reader.read()] == [(run, {"loss": 1.5})]


def test_sqlite_run_folders_and_matching(db, tmp_path):
    path = db["path"]
    reader = MlflowDbReader(path)
    assert MlflowDbReader.multi_run
    assert reader.folder_for("abc123") == path.parent / "autolr-runs" / "abc123" == sqlite_run_folder(path, "abc123")
    assert MlflowDbReader.matches(path)
    other = tmp_path / "tracking.db"
    shutil.copy(path, other)
    assert MlflowDbReader.matches(other)  # an MLflow schema under another name
    plain = tmp_path / "plain.db"
    with sqlite3.connect(plain) as conn:
        conn.execute("CREATE TABLE metrics (name TEXT, v REAL)")
    conn.close()
    (tmp_path / "text.db").write_text("hello")
    assert not MlflowDbReader.matches(plain) and not MlflowDbReader.matches(tmp_path / "text.db")
    assert not MlflowDbReader.matches(tmp_path / "mlflow.db-journal")


def test_sqlite_replaced_database_is_read_again(db, tmp_path):
    path = tmp_path / "mlflow.db"
    shutil.copy(db["path"], path)
    reader = MlflowDbReader(path)
    first = reader.read()
    assert first and not reader.restarted
    copy = tmp_path / "new.db"
    shutil.copy(db["path"], copy)
    os.replace(copy, path)  # a new file (new inode) at the same path
    assert flatten(reader.read()) == flatten(first) and reader.restarted


@pytest.mark.parametrize("content", [b"", b"not a database at all" * 100, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_sqlite_garbage_never_raises(tmp_path, content):
    path = tmp_path / "mlflow.db"
    path.write_bytes(content)
    reader = MlflowDbReader(path)
    assert reader.read() == [] and reader.read() == []
    assert sum(reader.skipped.values()) <= 1
    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    assert MlflowDbReader(tmp_path / "other.db").read() == []
    assert MlflowDbReader(tmp_path / "missing.db").read() == []


# ---- file store -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tracking, tmp_path_factory):
    """A run in a real file store: keys with and without '/', NaN/inf, a dataset-tagged metric."""
    root = tmp_path_factory.mktemp("files") / "mlruns"
    mlflow.set_tracking_uri(root.as_uri())
    rng = random.Random(0)
    logged: dict[str, list[tuple[int, float]]] = {"loss": [], "val/loss": [], "epoch": [], "acc": []}
    dataset = mlflow.data.from_numpy(np.zeros((3, 2)), name="train")
    with mlflow.start_run() as run:
        for step in range(40):
            loss = rng.random() * 3
            mlflow.log_metric("loss", loss, step=step)
            logged["loss"].append((step, loss))
            if step % 5 == 4:
                mlflow.log_metrics({"val/loss": loss + 0.1, "epoch": step // 10}, step=step)
                logged["val/loss"].append((step, loss + 0.1))
                logged["epoch"].append((step, float(step // 10)))
        mlflow.log_metric("loss", float("nan"), step=40)
        mlflow.log_metric("loss", float("inf"), step=41)
        logged["loss"] += [(40, float("nan")), (41, float("inf"))]
        mlflow.log_metric("acc", 0.75, step=41, dataset=dataset)  # a 5-field line
        logged["acc"].append((41, 0.75))
    run_dir = root / run.info.experiment_id / run.info.run_id
    return {"root": root, "run": run.info.run_id, "run_dir": run_dir, "logged": logged}


def pairs(records, name: str) -> list[tuple]:
    return [(r.step, key(r.epoch if name == "epoch" else r.metrics[name])) for r in records]


def test_file_store_records_equal_what_was_logged(store):
    run_dir = store["run_dir"]
    assert len((run_dir / "metrics" / "acc").read_text().split()) == 5
    for name, logged in store["logged"].items():
        path = run_dir / "metrics" / name
        assert MlflowFileReader.matches(path) and MlflowFileReader.run_dir(path) == run_dir
        assert reader_for(path, {"mlflow-file": MlflowFileReader, "mlflow": MlflowDbReader}) is MlflowFileReader
        reader = MlflowFileReader(path)
        assert reader.key == name and reader.folder_for(None) == run_dir
        records = reader.read()
        assert pairs(records, name) == [(s, key(v)) for s, v in logged]
        assert all(r.run is None for r in records) and not reader.skipped
    assert locate_metric_file(run_dir / "meta.yaml") is None
    assert not MlflowFileReader.matches(run_dir / "artifacts" / "metrics" / "x")
    assert not MlflowFileReader.matches(run_dir / "metrics" / "system" / "cpu_utilization_percentage")
    assert not MlflowFileReader.matches(store["root"] / ".trash" / store["run"] / "metrics" / "loss")


def test_file_store_grows_while_logging(store, tracking):
    mlflow.set_tracking_uri(store["root"].as_uri())
    path = store["run_dir"] / "metrics" / "late" / "metric"
    reader = None
    with mlflow.start_run(run_id=store["run"]):
        for step in range(42, 47):  # later than everything logged before: no step goes back
            mlflow.log_metric("late/metric", step * 0.5, step=step)
            reader = reader or MlflowFileReader(path)
            assert [(r.step, r.metrics) for r in reader.read()] == [(step, {"late/metric": step * 0.5})]
    assert MlflowFileReader.run_dir(path) == store["run_dir"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_file_store_chunked_reads_equal_a_whole_read(store, tmp_path, seed):
    data = (store["run_dir"] / "metrics" / "loss").read_bytes()
    target = tmp_path / "mlruns" / "0" / "abc" / "metrics" / "loss"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    rng = random.Random(seed)
    reader = MlflowFileReader(target)
    got, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, 40)
        with open(target, "ab") as f:
            f.write(data[pos : pos + n])
        pos += n
        got += reader.read()
        if rng.random() < 0.3:  # a daemon restart in between
            state = json.loads(json.dumps(reader.get_state()))
            reader = MlflowFileReader(target)
            reader.set_state(state)
    assert pairs(got, "loss") == pairs(MlflowFileReader(target).read(), "loss")
    assert pairs(got, "loss") == [(s, key(v)) for s, v in store["logged"]["loss"]]


def test_file_store_key_files_of_a_run_merge_by_step(store):
    """All key files read together: steps never go back from one file to the next."""
    import gc

    # The readers of earlier tests on this run (a reader and its tailer hold each other: freed by
    # the cyclic collector, whenever it runs) must not lend their run's step tops to these.
    gc.collect()
    run_dir = store["run_dir"]
    paths = [run_dir / "metrics" / name for name in store["logged"]]
    readers = [MlflowFileReader(p) for p in paths]
    records = readers[2].read()  # any one of them delivers the whole run
    assert all(r.read() == [] for r in readers)
    steps = [r.step for r in records]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one record per step
    for name, logged in store["logged"].items():
        have = [r for r in records if (r.epoch if name == "epoch" else r.metrics.get(name)) is not None]
        assert pairs(have, name) == [(s, key(v)) for s, v in logged]
    at4 = next(r for r in records if r.step == 4)
    assert set(at4.metrics) == {"loss", "val/loss"} and at4.epoch == 0.0


def test_file_store_live_run_and_resume_with_lower_steps(tracking, tmp_path):
    root = tmp_path / "mlruns"
    mlflow.set_tracking_uri(root.as_uri())
    readers: dict[str, MlflowFileReader] = {}
    got = []

    def poll(run_dir: Path) -> None:
        for path in sorted((run_dir / "metrics").rglob("*")):
            if path.is_file() and path not in readers:
                readers[path] = MlflowFileReader(path)
        for reader in readers.values():
            got.extend(reader.read())

    with mlflow.start_run() as run:
        run_dir = root / run.info.experiment_id / run.info.run_id
        for step in range(6):
            mlflow.log_metric("train/loss", 1.0 / (step + 1), step=step)
            if step % 2:
                mlflow.log_metrics({"val_loss": 2.0 / (step + 1), "epoch": step}, step=step)
            poll(run_dir)
    assert [r.step for r in got] == list(range(6))
    assert got[3].metrics == {"train/loss": 0.25, "val_loss": 0.5} and got[3].epoch == 3
    # The job resumes from its step-2 checkpoint and logs to the same MLflow run again.
    with mlflow.start_run(run_id=run.info.run_id):
        for step in range(3, 5):
            mlflow.log_metrics({"train/loss": 5.0 + step, "val_loss": 6.0 + step}, step=step)
    poll(run_dir)
    assert [(r.step, r.metrics) for r in got[6:]] == [
        (3, {"train/loss": 8.0, "val_loss": 9.0}), (4, {"train/loss": 9.0, "val_loss": 10.0})]
    # A daemon started now reads it all at once: the step goes back exactly where it resumed.
    fresh = [MlflowFileReader(p) for p in readers]
    steps = [r.step for r in fresh[0].read()]
    assert steps == [0, 1, 2, 3, 4, 5, 3, 4]


def test_file_store_garbage_lines_are_skipped(tmp_path):
    path = tmp_path / "mlruns" / "1" / "r1" / "metrics" / "loss"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"1 2\nabc\n\xff\xfe\x00\n1 x 3\n\n1700 0.5 3\n1700 0.25 4 ds dig\n1700 0.125\n5 6 7.5\n")
    reader = MlflowFileReader(path)
    got = reader.read()
    assert [(r.step, r.metrics["loss"]) for r in got] == [(0, 2.0), (3, 0.5), (4, 0.25), (0, 0.125)]
    assert sum(reader.skipped.values()) == 4


def test_file_store_keeps_working_with_autolr_files(store):
    (store["run_dir"] / "autolr.json").write_text("{}")  # the control file lands in the run folder
    client = MlflowClient(store["root"].as_uri())
    assert client.get_run(store["run"]).data.metrics["acc"] == 0.75
    assert len(client.get_metric_history(store["run"], "val/loss")) == len(store["logged"]["val/loss"])


# ---- through the watch daemon -----------------------------------------------------------
def run_daemon(root: Path):
    """``autolr watch --once`` in process, with these readers installed."""
    from autolr.config import load_config, parse_policy_options
    from autolr.daemon import Daemon, Options
    from autolr.plugins import get_plugin_manager, policy_classes, reader_classes

    pm = get_plugin_manager(entry_points=False)
    readers = {**reader_classes(pm), "mlflow": MlflowDbReader, "mlflow-file": MlflowFileReader}
    overrides = {"policies": parse_policy_options(["plateau"]), "base_lr": 0.1}
    daemon = Daemon(root, load_config(None), overrides, policy_classes(pm), readers, Options(once=True, fsync=False))
    daemon.run()
    return daemon


def test_daemon_feeds_each_sqlite_run_to_its_folder(db, tmp_path):
    shutil.copy(db["path"], tmp_path / "mlflow.db")
    records = MlflowDbReader(tmp_path / "mlflow.db").read()
    daemon = run_daemon(tmp_path)
    runs = {r.run for r in records}
    assert set(daemon.runs) == {sqlite_run_folder(tmp_path / "mlflow.db", run) for run in runs}
    for run in runs:
        engine = daemon.runs[sqlite_run_folder(tmp_path / "mlflow.db", run)].engine
        assert engine.state["rows"] == sum(r.run == run for r in records) and engine.rewinds == 0
        assert (tmp_path / "autolr-runs" / run / "autolr.json").is_file()
    assert run_daemon(tmp_path).runs == {}  # resumed: nothing new, no run touched


def test_daemon_reads_a_file_store_run_as_one_run(store, tmp_path):
    root = tmp_path / "mlruns"
    shutil.copytree(store["root"], root)
    run_dir = root / store["run_dir"].relative_to(store["root"])
    (run_dir / "autolr.json").unlink(missing_ok=True)
    daemon = run_daemon(tmp_path)
    assert set(daemon.runs) == {run_dir}
    engine = daemon.runs[run_dir].engine
    steps = {s for logged in store["logged"].values() for s, _ in logged}
    assert engine.rewinds == 0 and engine.state["rows"] >= len(steps)
    assert run_daemon(tmp_path).runs[run_dir].engine.state["rows"] == engine.state["rows"]


def _file_run(root: Path, files: dict[str, bytes]) -> list[Path]:
    metrics = root / "mlruns" / "0" / "run" / "metrics"
    metrics.mkdir(parents=True)
    for name, data in files.items():
        (metrics / name).write_bytes(data)
    return [metrics / name for name in files]


def _read_run(paths: list[Path]):
    """Every record of a file-store run, read through one of its readers until ``more`` is off,
    and the skip counts of all its readers."""
    readers = [MlflowFileReader(p) for p in paths]
    records = []
    for _ in range(10_000):
        records += readers[0].read()
        if not readers[0].more:
            break
    else:
        raise AssertionError("more never turned off")
    skipped: dict[str, int] = {}
    for r in readers:
        for what, n in r.skipped.items():
            skipped[what] = skipped.get(what, 0) + n
    return records, skipped


def test_file_store_long_key_file_read_in_parts_never_steps_back(tmp_path):
    """A loss logged every step for 100k steps (3 MB, read a PARSE_BLOCK at a time) and a
    val_loss every 100: the other file's later rows wait, so steps only go up, one record each."""
    t0 = 1_700_000_000_000
    loss = b"".join(b"%d %r %d\n" % (t0 + s, 1 / (1 + s), s) for s in range(100_000))
    val = b"".join(b"%d %r %d\n" % (t0 + s, 2 / (1 + s), s) for s in range(0, 100_000, 100))
    records, skipped = _read_run(_file_run(tmp_path, {"loss": loss, "val_loss": val}))
    assert [r.step for r in records] == list(range(100_000)) and skipped == {}
    assert [r.step for r in records if "val_loss" in r.metrics] == list(range(0, 100_000, 100))
    assert all(r.metrics["loss"] == 1 / (1 + r.step) for r in records)
    daemon = run_daemon(tmp_path)  # the daemon: no rewind (before, a step went back here)
    engine = daemon.runs[tmp_path / "mlruns" / "0" / "run"].engine
    assert engine.rewinds == 0 and engine.state["rows"] == 100_000


_lines = st.one_of(
    st.tuples(st.integers(0, 50), st.integers(0, 9)).map(lambda t: b"%d 0.5 %d\n" % t),
    st.sampled_from([b"garbage\n", b"\n", b"1 x 2\r\n", b"7 0.25\r\n"]),
)


def _in_time_order(blob: bytes) -> bool:
    """The (timestamp, step) of the well-formed lines go up: the order the files are merged in."""
    keys = []
    for line in blob.splitlines():
        try:
            parsed = parse_metric_line(line)
        except ValueError:
            continue
        if parsed is not None:
            keys.append(parsed[:2])
    return keys == sorted(keys)


_ordered_file = st.lists(
    st.tuples(st.integers(0, 50), st.integers(0, 9), st.sampled_from([b"", b"garbage\n", b"\n", b"1 x 2\r\n"])),
    max_size=25,
).map(lambda rows: b"".join(b"%d 0.5 %d\n%s" % row for row in sorted(rows, key=lambda row: row[:2])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(_ordered_file | st.lists(_lines, max_size=25).map(b"".join), min_size=1, max_size=3),
       parse=st.integers(1, 120))
@example(files=[b"0 0.5 1\n", b"0 0.5 0\n1 0.5 0\ngarbage\n0 0.5 0\ngarbage\n"], parse=32)  # a file
# whose times go back: its step-0 rows were read as 0 or as no step depending on the cut
def test_file_store_reads_cut_at_parse_block_equal_a_whole_read(files, parse):
    """Any key files (garbage, blank lines, CRLF), read PARSE_BLOCK bytes of lines at a time:
    the reads end, with every row and skip count of reading each file whole; in the same order
    when each file's times go up, as MLflow writes them."""
    import tempfile

    from autolr.readers import base

    data = {f"k{i}": blob for i, blob in enumerate(files)}
    with tempfile.TemporaryDirectory() as d:
        want = _read_run(_file_run(Path(d) / "whole", data))
        with mock.patch.object(base, "PARSE_BLOCK", parse):
            got = _read_run(_file_run(Path(d) / "cut", data))
    assert got[1] == want[1]  # the same skip counts
    if all(_in_time_order(blob) for blob in files):  # the same rows, and the steps in the same
        # order (rows logged at the same time and step may come in another order, or in two records)
        assert flatten(got[0]) == flatten(want[0])
        assert [r.step for r in got[0] for _ in r.metrics] == [r.step for r in want[0] for _ in r.metrics]
    else:  # a file whose times go back merges in an order that depends on where reads stop, and
        # a step-less key's step 0 reads as no step once another key is past 0 (StepTops): the
        # same rows, a step 0 possibly read as none
        assert _step_none_as_0(flatten(got[0])) == _step_none_as_0(flatten(want[0]))


def _step_none_as_0(rows: list[tuple]) -> list[tuple]:
    return sorted((run, 0 if step is None else step, *rest) for run, step, *rest in rows)


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_a_metric_logged_without_a_step_is_not_a_resume(tracking, tmp_path, kind):
    """Regression: mlflow.log_metric("val_loss", v) without step= is stored at step 0; after
    the training loss's steps it rewound the run to step 0 every epoch. Step 0 of a key that
    never had another step, once the run is past step 0, is read as no step, across restarts.
    A key going back to 0 after steps of its own is still a resume."""
    if kind == "file":
        mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    else:
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        for epoch in range(3):
            for s in range(10 * epoch, 10 * epoch + 10):
                mlflow.log_metric("loss", 1.0 / (s + 1), step=s)
            mlflow.log_metric("val_loss", 1.0 / (epoch + 2))  # no step
    daemon = run_daemon(tmp_path)
    (engine,) = [r.engine for r in daemon.runs.values()]
    assert engine.rewinds == 0 and engine.state["rows"] == 33
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_metric("val_loss", 0.1)  # still no step, after a restart of the daemon
        time.sleep(0.01)  # a later millisecond: rows of one millisecond may merge either way
        mlflow.log_metric("loss", 9.0, step=0)  # the job started over
    daemon = run_daemon(tmp_path)
    (engine,) = [r.engine for r in daemon.runs.values()]
    assert engine.rewinds == 1 and engine.state["rows"] == 1
