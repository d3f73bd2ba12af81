"""The control-file protocol: ``autolr.json`` in the run folder, and its journal.

Control file (schema 1)::

    {"schema": 1, "seq": 7, "scale": 0.1, "lr": 0.01, "step": 1200,
     "policy": "plateau", "reason": "...", "updated_at": "2026-11-21T10:00:00.123456Z"}

Optional: ``min_lr``/``max_lr`` (the daemon's bounds); ``apply_at_step`` with a ``schedule`` of
recent changes (``--apply-margin``); ``ahead``, ``[[step, scale, lr], ...]``: where the run's
schedule or warmup changes the LR next if no log row comes first (see :meth:`Control.entry`).

Every write is atomic (temporary file in the same folder, fsync, ``os.replace``), so a reader
never sees a partial file. Every decision is appended to ``autolr.decisions.jsonl`` first, with
its evidence, so the journal is never behind the control file. Writers take ``autolr.lock``.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import datetime as _dt
import itertools
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

SCHEMA = 1
CONTROL_NAME = "autolr.json"
JOURNAL_NAME = "autolr.decisions.jsonl"
LOCK_NAME = "autolr.lock"
#: A control file larger than this is refused by the client.
MAX_CONTROL_BYTES = 128 << 10
FILE_MODE = 0o644
DIR_MODE = 0o755
#: Changes a control file lists for step-exact application (multi-rank training, resumes):
#: every change not yet due, then the most recent ones already due (see scheduled_with).
MAX_SCHEDULE = 256
#: Changes ahead a control file lists at most: the steps at which a schedule or a warmup would
#: change the LR if no log row came first (see Chain.ahead), for a job logging every N steps.
MAX_AHEAD = 1024
#: A journal line longer than this is skipped by a restart's reading (ours are < 64 KiB).
MAX_JOURNAL_LINE = 16 << 20


class ControlError(ValueError):
    """A control file that is malformed or holds an unusable value."""


class ControlWriteError(OSError):
    """The decisions are in the journal, but the control file could not be replaced.

    ``records`` were journaled with their seq; ``ControlWriter.repair()`` writes the control
    file from the journal once the disk allows it. Publishing them again would duplicate them.
    """

    def __init__(self, records: list[dict[str, Any]], cause: OSError):
        super().__init__(cause.errno, f"control file not written ({cause}); the journal has the decisions")
        self.records = records


class ControlConflict(Exception):
    """Another writer (``autolr set``) published since the seq the caller expected; nothing
    was written. ``seq``: the seq now in force."""

    def __init__(self, seq: int):
        super().__init__(f"the control file moved on to seq {seq}")
        self.seq = seq


_second: list = [None, ""]  # the last whole second formatted, and its text


def utc_now() -> str:
    """ISO 8601 UTC with microseconds; the date part is formatted once per second."""
    us = time.time_ns() // 1000
    sec, frac = divmod(us, 1_000_000)
    if _second[0] != sec:
        _second[:] = [sec, _dt.datetime.fromtimestamp(sec, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second[1]}.{frac:06d}Z"


def control_path(run: str | os.PathLike) -> Path:
    """The control file of a run folder, or ``run`` itself when it names a ``.json`` file."""
    path = Path(run)
    return path if path.suffix == ".json" and not path.is_dir() else path / CONTROL_NAME


def validate_control(obj: Any) -> dict[str, Any]:
    """Return ``obj`` if it is a usable control record, else raise ControlError."""
    if not isinstance(obj, dict):
        raise ControlError("control file is not a JSON object")
    for key in ("schema", "seq"):
        if not isinstance(obj.get(key), int) or isinstance(obj.get(key), bool):
            raise ControlError(f"control file field {key!r} is missing or not an integer")
    if obj["schema"] != SCHEMA:
        raise ControlError(f"control file schema {obj['schema']} is not supported (expected {SCHEMA})")
    if not _positive(obj.get("scale")):
        raise ControlError(f"control file scale {obj.get('scale')!r} is not a finite number > 0")
    if "lr" not in obj:
        raise ControlError("control file field 'lr' is missing (use null for none)")
    lr = obj["lr"]
    if lr is not None and not _positive(lr):
        raise ControlError(f"control file lr {lr!r} is not a finite number > 0")
    for key in ("min_lr", "max_lr"):
        if obj.get(key) is not None and not _positive(obj[key]):
            raise ControlError(f"control file {key} {obj[key]!r} is not a finite number > 0")
    at = obj.get("apply_at_step")
    if at is not None and not _integer(at):
        raise ControlError(f"control file apply_at_step {at!r} is not an integer")
    schedule = obj.get("schedule")
    if schedule is not None:
        if not isinstance(schedule, list) or len(schedule) > MAX_SCHEDULE:
            raise ControlError(f"control file schedule must be a list of at most {MAX_SCHEDULE} entries")
        for entry in schedule:
            if not (isinstance(entry, dict) and _positive(entry.get("scale"))
                    and (entry.get("lr") is None or _positive(entry.get("lr")))
                    and (entry.get("at") is None or _integer(entry.get("at"))) and _integer(entry.get("seq"))):
                raise ControlError(f"control file schedule entry {entry!r} is malformed")
    if obj.get("ahead") is not None:
        _validate_ahead(obj["ahead"])
    return obj


def _validate_ahead(ahead: Any) -> None:
    """ControlError unless ``ahead`` is a list of at most MAX_AHEAD [step, scale, lr] with the
    steps increasing, every scale (and lr, when not null) finite and > 0."""
    if not isinstance(ahead, list) or len(ahead) > MAX_AHEAD:
        raise ControlError(f"control file ahead must be a list of at most {MAX_AHEAD} entries")
    last = None
    for item in ahead:
        if not (isinstance(item, list) and len(item) == 3 and _integer(item[0]) and _positive(item[1])
                and (item[2] is None or _positive(item[2])) and (last is None or item[0] > last)):
            raise ControlError(f"control file ahead entry {item!r} is malformed (or its steps do not increase)")
        last = item[0]


def _ahead_list(ahead: list[tuple[int, float, float | None]]) -> list[list[Any]]:
    """``ahead`` as the control file lists it, ``[[step, scale, lr], ...]``; ControlError (before
    any byte is written) when an entry is unusable."""
    listed = [[int(at), float(scale), None if lr is None else float(lr)] for at, scale, lr in ahead]
    _validate_ahead(listed)
    return listed


def _ahead_index(record: dict[str, Any]) -> tuple[list[int], list[dict[str, Any]]] | None:
    """A record's ``ahead`` as (steps, entries) for a bisection; None when it has none (or an
    ``apply_at_step``, whose changes the ``schedule`` lists instead)."""
    ahead = record.get("ahead")
    if not ahead or record.get("apply_at_step") is not None:
        return None
    seq = record["seq"]
    entries = [{"seq": seq, "scale": scale, "lr": lr, "ahead": at} for at, scale, lr in ahead]
    return [at for at, _, _ in ahead], entries


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def atomic_write_json(path: Path, obj: Any, *, fsync: bool = True, allow_nan: bool = False) -> os.stat_result:
    """Write ``obj`` as JSON to ``path`` atomically: temp file, fsync, ``os.replace``; return its stat.

    ``allow_nan`` is for private state files only (metric histories hold NaN); control files
    never carry a non-finite number. (A rename over the old file costs ext4 a flush of the new
    one, ``auto_da_alloc``; swapping with ``renameat2(RENAME_EXCHANGE)`` avoids it but, without
    fsync, can leave an empty file after a power loss: not done.)
    """
    data = (json.dumps(obj, allow_nan=allow_nan, separators=(", ", ": ")) + "\n").encode()
    fd, tmp = _open_temp(path.parent)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(errno.ENOSPC, f"short write to {tmp}")
                view = view[n:]
            if fsync:
                os.fsync(fd)
            os.fchmod(fd, FILE_MODE)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)
    return st




_tmp_names = itertools.count()


def _open_temp(folder: Path) -> tuple[int, str]:
    """A new ``.autolr-PID-N.tmp`` in ``folder``, created exclusively (never through a link).

    Cheaper than ``tempfile.mkstemp`` (no random names); a name left by a killed process with
    the same pid is skipped.
    """
    pid = os.getpid()
    while True:
        tmp = os.path.join(folder, f".autolr-{pid}-{next(_tmp_names)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json(path: Path, limit: int = MAX_CONTROL_BYTES) -> Any:
    """Parse a small JSON file; raise ControlError when it is oversized or malformed."""
    return parse_json(_read_limited(path, limit), path, limit)


def _read_limited(path: Path | str, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit + 1)


def parse_json(data: bytes, path: Path | str, limit: int = MAX_CONTROL_BYTES) -> Any:
    """Parse bytes read by ``_read_limited``; raise ControlError when oversized or malformed."""
    if len(data) > limit:
        raise ControlError(f"{path} is larger than {limit} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # (RecursionError: nested thousands deep)
        raise ControlError(f"{path} is not valid JSON: {exc}") from exc


def last_journal_entry(path: Path) -> dict[str, Any] | None:
    """The last complete JSON line of a journal, or None.

    Reads a small tail first (8 KiB), doubling up to 1 MiB only while no complete entry is in
    it, so the cost does not grow with the journal.
    """
    try:
        f = open(path, "rb")
    except OSError:  # missing, or not ours to read
        return None
    with f:
        size = f.seek(0, os.SEEK_END)
        want = 8 << 10
        while True:
            start = max(0, size - want)
            f.seek(start)
            lines = f.read(size - start).split(b"\n")
            if start > 0:
                lines = lines[1:]  # the first piece may be the end of a longer line
            for line in reversed(lines):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except (ValueError, RecursionError):
                        continue  # a torn last line from a crash: the one before it counts
                    if isinstance(obj, dict):
                        return obj
            if start == 0 or want >= (1 << 20):
                return None
            want *= 2


def read_journal(run: str | os.PathLike) -> list[dict[str, Any]]:
    """Every entry of a run's journal (torn and foreign lines skipped)."""
    return list(JournalCursor(Path(run) / JOURNAL_NAME))


class JournalCursor:
    """A run's journal entries (dicts with an integer ``seq``) from a byte offset on, read
    lazily a block at a time, up to the journal's size when the cursor was made.

    A restart matches the entries beyond the saved state against the decisions it re-derives;
    a journal of millions of decisions (a per-row schedule on a long log) is then never held
    in memory, and ``pop()`` is O(1). Torn lines and lines that are not an entry are skipped.
    """

    BLOCK = 256 << 10

    def __init__(self, path: str | os.PathLike, offset: int = 0, end: int | None = None):
        self.path = Path(path)
        self.offset = offset
        if end is None:
            try:
                end = os.stat(self.path).st_size
            except FileNotFoundError:
                end = 0
        self.end = end
        self.buffer: collections.deque[dict[str, Any]] = collections.deque()

    @classmethod
    def after(cls, path: str | os.PathLike, seq: int) -> "JournalCursor":
        """The entries after the last one whose seq is ``seq`` or below. The journal is read
        back from its end (seqs grow down the file), so the cost is that of the entries after
        it, not of the whole journal."""
        path = Path(path)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return cls(path, 0, 0)
        with f:
            end = f.seek(0, os.SEEK_END)
            pos, carry = end, b""  # carry: a line's start not yet seen (it began further back)
            while True:
                start = max(0, pos - cls.BLOCK)
                f.seek(start)
                data = f.read(pos - start) + carry
                lines = data.split(b"\n")
                carry = lines.pop(0) if start > 0 else b""
                line_end = start + len(data)  # where the last line's bytes end
                for line in reversed(lines):
                    entry = _journal_entry(line)
                    if entry is not None and entry["seq"] <= seq:
                        return cls(path, min(line_end + 1, end), end)
                    line_end -= len(line) + 1
                if start == 0:
                    return cls(path, 0, end)
                if len(carry) > MAX_JOURNAL_LINE:
                    carry = b""  # not one of ours: its first bytes are skipped as a torn line
                pos = start

    def _fill(self) -> None:
        """Parse the next block of whole lines into the buffer (the unterminated end too)."""
        while not self.buffer and self.offset < self.end:
            want = self.BLOCK
            try:
                with open(self.path, "rb") as f:
                    while True:
                        f.seek(self.offset)
                        data = f.read(min(want, self.end - self.offset))
                        cut = data.rfind(b"\n") + 1
                        if cut or self.offset + len(data) >= self.end or want >= MAX_JOURNAL_LINE:
                            break
                        want *= 4  # a line longer than a block
            except FileNotFoundError:
                data = b""
            if not data:  # gone or truncated since: nothing more to match
                self.offset = self.end
                return
            cut = cut or len(data)
            self.offset += cut
            for line in data[:cut].split(b"\n"):
                entry = _journal_entry(line)
                if entry is not None:
                    self.buffer.append(entry)

    def peek(self) -> dict[str, Any] | None:
        """The next entry, or None at the end."""
        if not self.buffer:
            self._fill()
        return self.buffer[0] if self.buffer else None

    def pop(self) -> dict[str, Any]:
        """Take the next entry (IndexError at the end)."""
        if not self.buffer:
            self._fill()
        return self.buffer.popleft()

    def clear(self) -> None:
        """Drop every remaining entry."""
        self.buffer.clear()
        self.offset = self.end

    def __bool__(self) -> bool:
        # (no call when it is spent: the daemon asks on every read of a live log)
        return bool(self.buffer) or (self.offset < self.end and self.peek() is not None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Take every remaining entry, in order."""
        while self.peek() is not None:
            yield self.buffer.popleft()


def _journal_entry(line: bytes) -> dict[str, Any] | None:
    """A journal line as an entry with an integer seq, or None (blank, torn, foreign)."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if isinstance(obj, dict) and type(obj.get("seq")) is int:
        return obj
    return None


def path_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` names; None when nothing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def scheduled_with(schedule: list[dict[str, Any]], entry: dict[str, Any],
                   now: int | float | None = None) -> list[dict[str, Any]]:
    """``schedule`` (the changes a control file lists) with a published change added.

    A rewind first voids the entries the resumed job has not reached (those at its
    ``apply_at_step`` or later; one at None is in force from the start: the initial value, and a
    manual override, which applies at once and which the daemon carries across rewinds). At
    most MAX_SCHEDULE entries: every change not yet due at step ``now`` (the last step logged),
    soonest first, and the most recent ones already due (a job resumed from a checkpoint finds
    the one in force where it resumes). The publish and a restart rebuilding it from the
    journal both use this."""
    if schedule and schedule[-1]["seq"] >= entry["seq"]:
        return schedule  # (entries come in seq order: this one is in already)
    at = None if entry.get("kind") == "manual" else entry["apply_at_step"]
    if entry.get("kind") == "rewind" and at is not None:
        schedule = [e for e in schedule if e["at"] is None or e["at"] < at]
    items = [*schedule, {"at": at, "seq": entry["seq"], "scale": entry.get("scale"), "lr": entry.get("lr")}]
    if len(items) <= MAX_SCHEDULE:
        return items
    if now is None:  # no step known to tell due from ahead: the latest
        return items[-MAX_SCHEDULE:]
    ahead: list[int] = []
    due: list[int] = []
    for i, e in enumerate(items):
        (ahead if e["at"] is not None and e["at"] > now else due).append(i)
    ahead = ahead[:MAX_SCHEDULE - 1]  # (more changes than that within the margin: the latest are left out)
    due = due[len(due) - (MAX_SCHEDULE - len(ahead)):]
    return [items[i] for i in sorted(ahead + due)]


class ControlWriter:
    """Publishes decisions for one run folder: journal line first, then the control file."""

    def __init__(self, run_dir: str | os.PathLike, *, fsync: bool = True, create_dir: bool = True):
        """``create_dir=False``: a run folder deleted by its user stays deleted (writes fail
        with FileNotFoundError instead of creating it again)."""
        self.run_dir = Path(run_dir)
        self.create_dir = create_dir
        self.path = self.run_dir / CONTROL_NAME
        self.journal = self.run_dir / JOURNAL_NAME
        self.fsync = fsync
        self._paths = (os.fspath(self.journal), os.fspath(self.path))
        # (files' signature, record): current() skips reading files that have not changed
        self._known: tuple[tuple, dict[str, Any] | None] | None = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's writer lock (``autolr.lock``) so seq numbers never collide."""
        if fcntl is None:  # pragma: no cover
            yield
            return
        lock = os.path.join(self.run_dir, LOCK_NAME)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except FileNotFoundError:
            if not self.create_dir:
                raise
            # Not world-writable even under umask 0: whoever can write the folder can replace the file.
            self.run_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _signature(self) -> tuple:
        """(inode, size, mtime) of the journal and the control file.

        Every protocol writer appends to the journal (its size grows) and replaces the control
        file (a new inode, never the one of the file it replaces, which is alive until the
        rename): an equal signature means neither changed since it was taken.
        """
        out = []
        for p in self._paths:
            try:
                st = _stat(p)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def current(self) -> dict[str, Any] | None:
        """The control record in force: the control file, or the journal when it is ahead.

        Two ``stat`` calls when nothing changed since the last call or our last publish.
        """
        signature = self._signature()
        known = self._known
        if known is not None and known[0] == signature:
            return known[1]
        record = self._read_current()
        self._known = (signature, record)  # taken before reading: a later change shows
        return record

    def _read_current(self) -> dict[str, Any] | None:
        record = None
        with contextlib.suppress(OSError, ControlError):  # missing, or not ours to read
            record = validate_control(read_json(self.path))
        last = last_journal_entry(self.journal)
        if last is not None and isinstance(last.get("seq"), int):
            if record is None or last["seq"] > record["seq"]:
                with contextlib.suppress(ControlError):
                    return validate_control(_control_fields(last))
        return record

    def publish(self, **decision: Any) -> dict[str, Any]:
        """Append one decision to the journal and replace the control file; return its record.

        Keywords: ``scale``, ``lr``, ``step``, ``policy``, ``reason``, optional ``evidence``,
        ``kind`` (default "decision") and extra control fields such as ``apply_at_step``.
        """
        return self.publish_many([decision])[-1]

    def publish_many(self, decisions: list[dict[str, Any]], schedule: list[dict[str, Any]] | None = None,
                     after_seq: int | None = None, now: int | float | None = None,
                     ahead: list[tuple[int, float, float | None]] | None = None) -> list[dict[str, Any]]:
        """Journal several decisions (one write, one fsync) then write the last as the control file.

        Each decision gets its own seq; nothing unusable is written: a non-finite or
        non-positive LR raises before any byte hits the disk. Decisions with an
        ``apply_at_step`` are added to ``schedule`` (see :func:`scheduled_with`; ``now``: the last
        step logged), which the control file then carries. ``after_seq``: the seq the caller last saw; when
        another writer has published since, :class:`ControlConflict` and nothing is written.
        ``ahead``: the changes ahead ``[(step, scale, lr), ...]`` the control file lists after the last
        decision (not journaled: they are derived from it; see :meth:`Control.entry`).
        """
        records = [self._record(**d) for d in decisions]
        if not records:
            return []
        if ahead:
            records[-1]["ahead"] = _ahead_list(ahead)
        with self.locked():
            current = self.current()
            self._known = None
            seq = current["seq"] if current else 0
            if after_seq is not None and seq > after_seq:
                raise ControlConflict(seq)
            entries = []
            scheduled = list(schedule or [])
            for record, d in zip(records, decisions):
                seq += 1
                record["seq"] = seq
                entry = dict(record, kind=d.get("kind", "decision"), evidence=_plain(d.get("evidence") or {}))
                entry.pop("ahead", None)
                if "apply_at_step" in record:
                    scheduled = scheduled_with(scheduled, entry, now)
                entry.pop("schedule", None)  # the journal holds every entry already
                entries.append(entry)
            if "apply_at_step" in records[-1]:
                records[-1]["schedule"] = scheduled
            journal = self._append_journal(entries)
            try:
                control = atomic_write_json(self.path, records[-1], fsync=self.fsync)
            except OSError as exc:
                raise ControlWriteError(records, exc) from exc
            # Still under the lock: nobody wrote in between. A rename keeps the file's times.
            self._known = (tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (journal, control)),
                           dict(records[-1]))
        return records

    def relist(self, seq: int, ahead: list[tuple[int, float, float | None]]) -> bool:
        """Rewrite the control file of record ``seq`` with the changes ``ahead`` (see
        :meth:`publish_many`): the same seq, nothing journaled, for a chain that can first list
        them without a new decision (the run's first row, a restart). False, writing nothing,
        when ``seq`` is not the record in force on disk (another writer moved on, or the
        journal is ahead of the file and waits for :meth:`repair`)."""
        listed = _ahead_list(ahead)
        with self.locked():
            self._known = None
            on_disk = None
            with contextlib.suppress(OSError, ControlError):
                on_disk = validate_control(read_json(self.path))
            current = self.current()
            if on_disk is None or current is None or on_disk["seq"] != seq or current["seq"] != seq:
                return False
            record = {k: v for k, v in on_disk.items() if k != "ahead"}
            if listed:
                record["ahead"] = listed
            atomic_write_json(self.path, record, fsync=self.fsync)
            self._known = None
        return True

    @staticmethod
    def _record(*, scale: float, lr: float | None, step: int | None, policy: str, reason: str,
                evidence: dict[str, Any] | None = None, kind: str = "decision", **extra: Any) -> dict[str, Any]:
        record = {
            "schema": SCHEMA,
            "seq": 0,
            "scale": float(scale),
            "lr": None if lr is None else float(lr),
            "step": _plain(step),
            "policy": policy,
            "reason": reason,
            "updated_at": utc_now(),
            **_plain(extra),
        }
        validate_control(dict(record, seq=1))  # never write an unusable LR
        return record

    def repair(self, schedule: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """Rewrite the control file from the journal when a crash left it behind; ``schedule``:
        the recent changes it lists when the journal's last entry has an ``apply_at_step``."""
        with self.locked():
            current = self.current()
            on_disk = None
            with contextlib.suppress(FileNotFoundError, ControlError):
                on_disk = validate_control(read_json(self.path))
            if current is not None and (on_disk is None or on_disk["seq"] < current["seq"]):
                self._known = None
                if schedule and "apply_at_step" in current and schedule[-1]["seq"] == current["seq"]:
                    current = dict(current, schedule=schedule[-MAX_SCHEDULE:])
                atomic_write_json(self.path, current, fsync=self.fsync)
            return current

    def _append_journal(self, entries: list[dict[str, Any]]) -> os.stat_result:
        line = b"".join((json.dumps(e, allow_nan=False, default=_json_default) + "\n").encode() for e in entries)
        fd = os.open(self.journal, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            # A crash may have left a torn last line: start on a fresh line.
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(errno.ENOSPC, f"short write to the journal ({written} of {len(line)} bytes)")
                if self.fsync:
                    os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # all or nothing: a retry must not duplicate entries
                raise
            return os.fstat(fd)
        finally:
            os.close(fd)


_stat = os.stat  # bound once: tests count the client's os.stat calls


def _plain(obj: Any) -> Any:
    """``obj`` as strict-JSON values: numpy scalars unwrapped, NaN/inf as strings.

    The evidence of a decision often holds the metric that triggered it, which is NaN or
    infinite exactly when a run diverges; ``allow_nan=False`` must not turn that into a
    failed publish.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("NaN" if obj != obj else ("Infinity" if obj > 0 else "-Infinity"))
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:  # numpy / torch scalars
        return _plain(obj.item())
    if hasattr(obj, "tolist"):
        return _plain(obj.tolist())
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


CONTROL_FIELDS = ("schema", "seq", "scale", "lr", "step", "policy", "reason", "updated_at", "apply_at_step",
                  "min_lr", "max_lr")


def _control_fields(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in CONTROL_FIELDS if k in entry}


#: Seconds without a control file after which a client says so, once (a misspelt run folder,
#: or no daemon watching it, would otherwise leave the job at its own LR without a word): when
#: the run folder does not exist either, and when it does (see Control._missing).
NO_FILE_WARNING = 120.0
NO_CONTROL_WARNING = 900.0

#: A file modified less than this long ago may be rewritten within the same timestamp tick
#: (coarse or 1-2 s filesystem clocks), and atomic replaces recycle inode numbers, so its
#: (inode, mtime, size) cannot prove it unchanged: the client re-reads it until it is older.
RACY_NS = 2_000_000_000


class Control:
    """Client for a training loop: ``Control(run_dir).lr(default)`` on every step.

    An unchanged file costs one ``stat`` (or nothing, within ``min_interval`` seconds of the
    last one). A malformed file or an unusable value is ignored with one warning, and the last
    good value is kept.
    """

    def __init__(self, path: str | os.PathLike, *, min_interval: float = 0.0):
        self.path = control_path(path)
        self._fspath = os.fspath(self.path)  # os.stat on a str skips Path.__fspath__ per call
        self.min_interval = float(min_interval)
        self._record: dict[str, Any] | None = None
        self._ahead: tuple[list[int], list[dict[str, Any]]] | None = None  # the record's changes ahead
        self._key: tuple[int, int, int] | None = None
        self._recheck = False  # the file is too recent for its key to prove it unchanged
        self._data: bytes | None = None  # the bytes last parsed, good or bad
        self._next_check = 0.0
        self._applied: dict[str, Any] | None = None  # the change this process applies (step mode)
        self._applied_seq = 0
        self._last_step: int | None = None
        self._missing_since: float | None = time.monotonic()  # None once a file was seen or missed aloud
        self._missing_wait = NO_FILE_WARNING

    def _refresh(self) -> None:
        if self.min_interval:
            now = time.monotonic()
            if now < self._next_check:
                return
            self._next_check = now + self.min_interval
        try:
            st = os.stat(self._fspath)
        except OSError:
            # no file yet, or it vanished: keep the last good value
            if self._missing_since is not None and time.monotonic() - self._missing_since > self._missing_wait:
                self._missing()
            return
        self._missing_since = None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._key and not self._recheck:
            return
        self._load(key, st.st_mtime_ns)

    def _missing(self) -> None:
        """Say once that no control file came: at NO_FILE_WARNING s when the run folder does not
        exist either (a misspelt path), else at NO_CONTROL_WARNING s (the daemon writes the file
        once it has seen a row of a log in the folder, which some loggers take minutes to write)."""
        if self.path.parent.is_dir() and self._missing_wait < NO_CONTROL_WARNING:
            self._missing_wait = NO_CONTROL_WARNING
            return
        self._missing_since = None
        where = ("its folder does not exist either: is the path the one the job logs in?"
                 if not self.path.parent.is_dir() else
                 "is `autolr watch` running on a folder above it, and has the job logged a row there?")
        warnings.warn(f"autolr: no control file at {self.path} after {self._missing_wait:.0f} s, the LR is your "
                      f"own; {where}", RuntimeWarning, stacklevel=5)

    def _load(self, key: tuple[int, int, int], mtime_ns: int) -> None:
        self._key = key
        self._recheck = abs(time.time_ns() - mtime_ns) < RACY_NS
        try:
            data = _read_limited(self._fspath, MAX_CONTROL_BYTES)
        except FileNotFoundError:
            self._key = None  # replaced or removed since the stat: look again next call
            return
        except OSError as exc:
            self._recheck = False  # one warning: retry only when the file changes
            warnings.warn(f"autolr: cannot read {self.path}: {exc}; keeping the last good value",
                          RuntimeWarning, stacklevel=4)
            return
        if data == self._data:
            return  # the same bytes as last time: nothing new, and no second warning
        self._data = data
        try:
            record = validate_control(parse_json(data, self.path))
        except ControlError as exc:
            warnings.warn(f"autolr: ignoring {self.path}: {exc}; keeping the last good value",
                          RuntimeWarning, stacklevel=4)
            return
        self._record = record
        self._ahead = _ahead_index(record)

    def record(self) -> dict[str, Any] | None:
        """The last good control record, or None before the first one."""
        self._refresh()
        return self._record

    def entry(self, step: int | None = None) -> dict[str, Any] | None:
        """The change in force at optimizer ``step`` (the latest one when ``step`` is None).

        With ``apply_at_step`` in the file, a change applies from that step on: every rank
        that read the file before it switches at the same step. The ``schedule`` lists recent
        changes, so a rank that missed a version of the file still picks the right one. A
        change first seen after its step applies at once, with a warning. A record without
        ``apply_at_step`` (the initial value, ``autolr set``) applies at once; the daemon lists
        both in the schedule at None (from the start). What a client applies never goes back to
        an older seq. A record's ``ahead`` list (``[[step, scale, lr], ...]``: where its schedule
        or warmup changes the LR next if no log row comes first) applies from each step on, as
        the record itself: a job that logs every N steps follows them step by step.
        """
        self._refresh()
        rec = self._record
        if rec is None or step is None:
            return rec
        chosen = None
        if rec.get("apply_at_step") is None:
            chosen = rec
            ahead = self._ahead
            if ahead is not None and step >= ahead[0][0]:
                chosen = ahead[1][bisect.bisect_right(ahead[0], step) - 1]
        else:
            for item in rec.get("schedule") or [{"at": rec["apply_at_step"], "seq": rec["seq"],
                                                  "scale": rec["scale"], "lr": rec["lr"]}]:
                if item.get("at") is None or item["at"] <= step:
                    chosen = item
        if chosen is None or chosen["seq"] < self._applied_seq:
            chosen = self._applied  # nothing newer is due yet: keep what this client applied
        elif chosen["seq"] > self._applied_seq:
            at = chosen.get("at")
            if at is not None and self._last_step is not None and self._last_step >= at:
                warnings.warn(f"autolr: change #{chosen['seq']} was due at step {at} but reached this "
                              f"process at step {step}; applied now", RuntimeWarning, stacklevel=3)
            self._applied_seq = chosen["seq"]
        self._applied, self._last_step = chosen, step
        return chosen

    def scale(self, step: int | None = None) -> float:
        """The multiplier for the loop's own base LR (1.0 before any decision)."""
        rec = self.entry(step) if step is not None else (self._refresh() or self._record)
        return rec["scale"] if rec is not None else 1.0

    def lr(self, default: float, step: int | None = None) -> float:
        """The absolute LR: the file's ``lr``, else ``default · scale``; ``default`` before any.

        Pass the optimizer ``step`` to apply changes exactly at their ``apply_at_step``.
        """
        if step is None:
            self._refresh()
            rec = self._record
        else:
            rec = self.entry(step)
        if rec is None:
            return default
        lr = rec["lr"]
        return lr if lr is not None else default * rec["scale"]

    @property
    def seq(self) -> int:
        """The sequence number of the last good record (0 before any)."""
        self._refresh()
        rec = self._record
        return rec["seq"] if rec is not None else 0
