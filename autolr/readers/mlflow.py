"""MLflow tracking stores: the SQLite database and the legacy file store.

SQLite (``mlflow.db``, MLflow's default store since 3.7). Metrics are rows of the table
``metrics(key, value, timestamp, step, run_uuid, is_nan)``; one database holds every run.
The table is polled by ``rowid`` (rows are only ever inserted, so rowids grow), read-only,
and a locked or busy database is simply tried again on the next read. MLflow stores NaN as
``value=0, is_nan=1`` and ±inf as ±1.7976931348623157e308; both are turned back into the
IEEE values. Consecutive rows of one run at one step become one Record, ``Record.run`` is the
run id, and a metric named ``epoch`` becomes ``Record.epoch``. MLflow's system metrics
(``system/...``) are left out in both stores: their steps count samples, not training steps.
A metric logged without a step has step 0, as MLflow stores it.

Control folder of a SQLite run: ``<folder of mlflow.db>/autolr-runs/<run_id>/``. The run's
artifact folder is not used: it depends on the working directory the job started in and may
be remote, while this path follows from two things the training loop knows::

    Control(Path(db_path).parent / "autolr-runs" / mlflow.active_run().info.run_id)

(:func:`sqlite_run_folder` computes the same path.)

File store (``MLFLOW_ALLOW_FILE_STORE=true`` with a ``file:`` URI in MLflow 3.17):
``<root>/<experiment>/<run>/metrics/<key>``, where a key containing ``/`` becomes subfolders,
one line per value: ``timestamp_ms value step``, or ``timestamp_ms value step dataset digest``
(a 2-field ``timestamp value`` line from old MLflow has step 0). Every key file is its own
source, tailed by byte offset, and belongs to the run folder ``<root>/<experiment>/<run>``,
which is also its control folder: all key files of one MLflow run are one autolr run. Their
new lines are read together and merged by timestamp (see :class:`RunFiles`), so the run's
steps never go back from one key file to the next.
"""
from __future__ import annotations

import heapq
import logging
import math
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..hookspecs import hookimpl
from ..records import Record
from .base import Reader, TextTailer

if TYPE_CHECKING:
    import sqlite3

log = logging.getLogger("autolr.readers")

DB_NAME = "mlflow.db"
RUNS_FOLDER = "autolr-runs"
#: MLflow's stand-in for ±inf in the database.
DB_INF = 1.7976931348623157e308
#: Rows fetched per ``read()`` at most; ``more`` says when there are further ones.
BATCH_ROWS = 50_000
#: Seconds a read waits for a writer's lock before giving up until the next read.
BUSY_TIMEOUT = 0.05
SQLITE_MAGIC = b"SQLite format 3\x00"
DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")
#: MLflow's system metrics (CPU, GPU, memory): their steps count samples, not training steps.
SYSTEM_PREFIX = "system/"

QUERY = (
    "SELECT rowid, key, value, step, run_uuid, is_nan FROM metrics "
    "WHERE rowid > ? ORDER BY rowid LIMIT ?"
)


def sqlite_run_folder(db_path: str | os.PathLike, run_id: str) -> Path:
    """The control folder autolr uses for ``run_id`` of the SQLite store at ``db_path``."""
    return Path(db_path).parent / RUNS_FOLDER / run_id


def _sqlite():
    """The ``sqlite3`` module, imported on first use: with ``urllib.request`` for the URI, ~8 MB
    of a daemon's memory that only a folder holding an MLflow database needs."""
    import sqlite3

    return sqlite3


def _connect(path: Path) -> sqlite3.Connection:
    from urllib.request import pathname2url

    uri = "file:" + pathname2url(os.path.abspath(path)) + "?mode=ro"
    return _sqlite().connect(uri, uri=True, timeout=BUSY_TIMEOUT)


def _has_metrics_table(path: Path) -> bool:
    """An SQLite file whose ``metrics`` table has MLflow's columns (a cheap schema peek)."""
    try:
        with open(path, "rb") as f:
            if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                return False
        conn = _connect(path)
        try:
            row = conn.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'metrics'"
            ).fetchone()
        finally:
            conn.close()
    except (OSError, _sqlite().Error):
        return False
    sql = (row[0] or "").lower() if row else ""
    return all(col in sql for col in ("run_uuid", "is_nan", "step", "value"))


def _metric_value(value: Any, is_nan: Any) -> float | None:
    if is_nan:
        return math.nan
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if abs(v) == DB_INF:
        return math.copysign(math.inf, v)
    return v


def _record(metrics: dict[str, float], step: int | None, run: str | None) -> Record:
    epoch = metrics.pop("epoch", None)
    if epoch is not None and epoch != epoch:
        epoch = None
    return Record(metrics, step, epoch, run)


class MlflowDbReader(Reader):
    """Reads the ``metrics`` table of an MLflow SQLite store; records carry their run id."""

    name = "mlflow"
    multi_run = True  # records carry Record.run; the daemon keeps this reader's state itself

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.rowid = 0  # the last rowid delivered
        self.tops: dict[str, StepTops] = {}  # per MLflow run
        self.identity: tuple[int, int] | None = None
        self._restart_pending = False
        self._bad: tuple | None = None  # the file signature last counted as not a database

    @classmethod
    def matches(cls, path: Path) -> bool:
        if path.name == DB_NAME:
            return True
        return path.suffix.lower() in DB_SUFFIXES and _has_metrics_table(path)

    @classmethod
    def run_dir(cls, path: Path) -> Path:
        return path.parent

    def folder_for(self, run: str | None) -> Path:
        if run is None:
            return self.run_dir(self.path)
        return sqlite_run_folder(self.path, run)

    def get_state(self) -> dict[str, Any]:
        return {"rowid": self.rowid, "identity": self.identity, "restart": self._restart_pending,
                "tops": {run: tops.keys for run, tops in self.tops.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        self.rowid = int(state.get("rowid", 0))
        tops = state.get("tops")
        if isinstance(tops, dict):
            self.tops = {run: StepTops({k: v for k, v in keys.items() if isinstance(v, int)})
                         for run, keys in tops.items() if isinstance(keys, dict)}
        ident = state.get("identity")
        self.identity = tuple(ident) if ident else None
        self._restart_pending = bool(state.get("restart", False))

    def read(self) -> list[Record]:
        self.restarted = False
        self.more = False
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        self._check_identity((st.st_dev, st.st_ino))
        rows = self._fetch((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        if not rows:
            return []
        self.more = len(rows) >= BATCH_ROWS
        self.rowid = rows[-1][0]
        if self._restart_pending:
            self.restarted, self._restart_pending = True, False
        return list(self._group(rows))

    def _check_identity(self, identity: tuple[int, int]) -> None:
        """A different file at the path (a new database): read it from its first row."""
        if self.identity is not None and identity != self.identity:
            log.info("%s: database replaced, reading it from the start", self.path)
            self.rowid = 0
            self.tops = {}
            self._restart_pending = True
        self.identity = identity

    def _fetch(self, signature: tuple) -> list[tuple]:
        sqlite3 = _sqlite()
        try:
            conn = _connect(self.path)
        except sqlite3.Error as exc:
            log.debug("%s: cannot open (%s); retrying next time", self.path, exc)
            return []
        try:
            rows = conn.execute(QUERY, (self.rowid, BATCH_ROWS)).fetchall()
            if not rows:
                self._clamp(conn)
            return rows
        except sqlite3.OperationalError as exc:  # locked, busy, tables not created yet
            log.debug("%s: %s; retrying next time", self.path, exc)
        except sqlite3.DatabaseError as exc:  # not a database, or a corrupt one
            if self._bad != signature:
                self._bad = signature
                self.skip("unreadable SQLite database", str(exc)[:80])
        finally:
            conn.close()
        return []

    def _clamp(self, conn: sqlite3.Connection) -> None:
        """Rows above our rowid were deleted (MLflow's gc): new rows reuse their ids."""
        top = conn.execute("SELECT max(rowid) FROM metrics").fetchone()[0] or 0
        if top < self.rowid:
            log.info("%s: rows above %d deleted; following from %d", self.path, self.rowid, top)
            self.rowid = top

    def _group(self, rows: Iterable[tuple]) -> Iterable[Record]:
        """Consecutive rows of one (run, step) as one Record; a repeated key starts a new one."""
        metrics: dict[str, float] = {}
        current: tuple | None = None
        for _rowid, key, value, step, run, is_nan in rows:
            v = _metric_value(value, is_nan)
            if v is None or not isinstance(key, str) or not isinstance(run, str):
                self.skip("malformed metrics row", f"key={key!r} value={value!r}")
                continue
            if key.startswith(SYSTEM_PREFIX):
                continue
            tops = self.tops.get(run)
            if tops is None:
                tops = self.tops[run] = StepTops()
            step = tops.step(key, step if isinstance(step, int) else None)
            if metrics and ((step, run) != current or key in metrics):
                yield _record(metrics, *current)
                metrics = {}
            current = (step, run)
            metrics[key] = v
        if metrics:
            yield _record(metrics, *current)


class StepTops:
    """A run's highest step, per key and overall, to tell a value logged without a step from a
    job going back to the start: MLflow stores both at step 0. Step 0 of a key that never had
    another step, once the run is past step 0, is read as no step (None): no rewind."""

    def __init__(self, keys: dict[str, int] | None = None):
        self.keys: dict[str, int] = dict(keys or {})
        self.top = max(self.keys.values(), default=0)

    def step(self, key: str, step: int | None) -> int | None:
        if step:
            if step > self.keys.get(key, 0):
                self.keys[key] = step
                if step > self.top:
                    self.top = step
            return step
        if step == 0 and self.top > 0 and not self.keys.get(key):
            return None
        return step


def locate_metric_file(path: Path) -> tuple[Path, str] | None:
    """``(run folder, metric key)`` for a key file of an MLflow file store, else None.

    The layout is ``<root>/<experiment>/<run>/metrics/<key parts...>``; the root is named
    ``mlruns`` or the run and experiment folders hold MLflow's ``meta.yaml``. Deleted runs
    (``.trash``) and system metrics are not training metrics: None.
    """
    parts = path.parts
    for i in range(3, len(parts) - 1):
        if parts[i] != "metrics" or parts[i - 2] == ".trash":
            continue
        run = Path(*parts[:i])
        if parts[i - 3] == "mlruns" or (
            (run / "meta.yaml").is_file() and (run.parent / "meta.yaml").is_file()
        ):
            key = "/".join(parts[i + 1 :])
            return None if key.startswith(SYSTEM_PREFIX) else (run, key)
    return None


class RunFiles:
    """The live readers of one file-store run's key files, read together, merged in time.

    Fed to one engine one file after another, a run's key files would step backwards at
    every file (``loss`` up to step 1000, then ``val_loss`` from 0): the engine would take
    that for a resumed job and rewind. So whichever reader of the run is asked reads every
    key file of the run that has a reader, and returns their new lines merged by timestamp
    (then step), the order they were logged in. Each file's offset stays in its own reader's state.
    """

    def __init__(self) -> None:
        self.members: weakref.WeakValueDictionary[Path, MlflowFileReader] = weakref.WeakValueDictionary()
        self.tops = StepTops()

    def read(self) -> tuple[list[tuple[int, int, str, float]], bool, bool]:
        """New (timestamp, step, key, value) rows of every member in logging order, and
        whether any member has more to read, and whether any file started over.

        The files are merged by their timestamps, so a job resumed from a checkpoint, which
        logs lower steps to the same run, shows its step going back once, where it resumed.
        A member whose read stopped short (a long file: ``more``) holds the others back: their
        rows logged after its last one are handed back to their files, read again next time.
        """
        blocks = []
        more = restarted = False
        # Rows after the frontier wait for the member cut short at it (the holder, which always
        # keeps its rows, so every read makes progress whatever the files hold).
        frontier: tuple[float, int] = (math.inf, 0)
        holder = None
        for path in sorted(self.members):
            reader = self.members.get(path)
            if reader is None:
                continue
            reader.restarted = False
            blocks.append((reader, reader.tailer.read_block()))
            if reader.more:
                last = _last_time(blocks[-1][1])
                if holder is None or last < frontier:
                    frontier, holder = last, reader
            more, restarted = more or reader.more, restarted or reader.restarted
        streams: list[list[tuple[int, int, str, float]]] = []
        for reader, block in blocks:
            rows, pos, hold = [], 0, reader is not holder
            lines = block.split(b"\n")
            lines.pop()  # after the last line end
            for line in lines:
                parsed = reader.parse(line)
                if parsed is not None:
                    if hold and parsed[:2] > frontier and reader.tailer.give_back(block, pos):
                        break
                    rows.append((parsed[0], parsed[1], reader.key, parsed[2]))
                pos += len(line) + 1
            streams.append(rows)
        return list(heapq.merge(*streams, key=lambda row: (row[0], row[1]))), more, restarted


def _last_time(block: bytes) -> tuple[float, int]:
    """(timestamp, step) of the last well-formed line of ``block``; before any when none is."""
    for line in reversed(block.split(b"\n")):
        try:
            parsed = parse_metric_line(line)
        except ValueError:
            continue
        if parsed is not None:
            return parsed[:2]
    return (-math.inf, 0)


#: One RunFiles per run folder of a file store, alive while any of its readers is.
RUN_FILES: weakref.WeakValueDictionary[str, RunFiles] = weakref.WeakValueDictionary()


class MlflowFileReader(Reader):
    """One metric file of an MLflow file store (``<run>/metrics/<key>``), tailed by offset.

    ``read()`` returns the new values of all key files of the run (see :class:`RunFiles`);
    the values of several keys at one step form one Record.
    """

    name = "mlflow-file"
    priority = 10  # a key named like ``acc.csv`` is still an MLflow metric file

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.tailer = TextTailer(self.path, self)
        found = locate_metric_file(self.path)
        self.key = found[1] if found else self.path.name
        folder = os.path.abspath(found[0] if found else self.path.parent)
        group = RUN_FILES.get(folder)
        if group is None:
            group = RUN_FILES[folder] = RunFiles()
        self.group = group  # the readers hold their group; it holds them weakly
        group.members[self.path] = self  # a newer reader of the same file replaces the old one

    @classmethod
    def matches(cls, path: Path) -> bool:
        return locate_metric_file(path) is not None

    @classmethod
    def run_dir(cls, path: Path) -> Path:
        found = locate_metric_file(path)
        return found[0] if found else path.parent

    def get_state(self) -> dict[str, Any]:
        return {"tail": self.tailer.get_state(), "top": self.group.tops.keys.get(self.key, 0)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.tailer.set_state(state.get("tail", {}))
        top = state.get("top")
        if isinstance(top, int) and top > 0:
            self.group.tops.step(self.key, top)

    def read(self) -> list[Record]:
        rows, more, restarted = self.group.read()
        self.more, self.restarted = more, restarted
        return list(group_steps(rows, self.group.tops))

    def parse(self, line: bytes) -> tuple[int, int, float] | None:
        """:func:`parse_metric_line`, a malformed line counted and skipped."""
        try:
            return parse_metric_line(line)
        except ValueError as exc:
            self.skip("malformed MLflow metric line", str(exc)[:80])
            return None


def parse_metric_line(line: bytes) -> tuple[int, int, float] | None:
    """``timestamp value [step [dataset digest]]`` as ``(timestamp, step, value)``; None for a
    blank line, ValueError for a malformed one."""
    fields = line.split()
    if not fields:
        return None
    if len(fields) < 2:
        raise ValueError("fewer than 2 fields")
    timestamp, value = int(fields[0]), float(fields[1])
    return timestamp, int(fields[2]) if len(fields) >= 3 else 0, value


def group_steps(rows: Iterable[tuple[int, int, str, float]], tops: StepTops | None = None) -> Iterable[Record]:
    """Rows ``(timestamp, step, key, value)`` as Records, one per run of rows at one step.

    A key repeated at the same step starts a new Record; ``tops`` reads a step-less value's 0
    as no step (:class:`StepTops`).
    """
    metrics: dict[str, float] = {}
    current: int | None = None
    for _ts, step, key, value in rows:
        if tops is not None:
            step = tops.step(key, step)
        if metrics and (step != current or key in metrics):
            yield _record(metrics, current, None)
            metrics = {}
        current = step
        metrics[key] = value
    if metrics:
        yield _record(metrics, current, None)


@hookimpl
def register_readers(register) -> None:
    register(MlflowDbReader)
    register(MlflowFileReader)
