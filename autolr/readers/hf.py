"""Hugging Face Trainer state: ``trainer_state.json`` snapshots of ``log_history``.

The Trainer writes ``output_dir/checkpoint-<step>/trainer_state.json`` at every checkpoint save
(``trainer.save_state()`` writes ``output_dir/trainer_state.json``), each time the whole
history, with a plain ``json.dump`` into a file opened "w": a reader can see it half-written.
``log_history`` holds training entries ``{loss, grad_norm, learning_rate, epoch, step}``, eval
entries ``{eval_loss, eval_runtime, ..., epoch, step}`` and a final summary (``train_runtime``,
``train_loss``, ...). Each entry becomes one Record: ``step``, ``epoch``, the other numbers as
metrics. ``save_total_limit`` deletes old checkpoint folders: a vanished file reads as empty.

All snapshots of one run (the ``output_dir``, the parent of ``checkpoint-*``) share one
in-process *mark*, also saved in each reader's state (the newest saved one is restored): the
last delivered position ``(step, n-th entry at that step)`` plus fingerprints of the last
``FP_WINDOW`` delivered entries. Each reader delivers only the entries of its snapshot
past the mark, so successive checkpoints and rewrites never repeat a record, whichever reader
sees them first. A snapshot whose delivered part disagrees with the fingerprints belongs to
another history:

* newer (mtime) than the snapshot that set the mark: the job was resumed from an earlier
  checkpoint (or restarted in the same folder). Delivery starts again at the first differing
  step, with ``restart=True`` on that record; its step is below the steps already delivered,
  so the engine cuts the run there and replays, and the decisions equal those of a run that
  never went past that step.
* older: a stale copy (an old checkpoint of the abandoned branch); it is ignored.

A resumed run whose entries are identical to the abandoned branch (fully deterministic
training) is indistinguishable from it and is not rewound; neither is one resumed from further
back than the fingerprint window.

A snapshot that does not parse is retried on every read while it keeps changing; the same
unparseable file older than ``GRACE_NS`` is counted once as bad input.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import weakref
import zlib
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

from ..hookspecs import hookimpl
from ..records import Record, split_counters
from .base import Reader
from .jsonl import numeric_items

log = logging.getLogger("autolr.readers")

STATE_NAME = "trainer_state.json"
CHECKPOINT_DIR = re.compile(r"(tmp-)?checkpoint-\d+")
#: Delivered entries whose fingerprints are kept to recognise a resumed branch.
FP_WINDOW = 1024
#: Runs whose marks are kept in memory (least recently opened dropped first).
MAX_MARKS = 256
#: Records returned per ``read()`` at most; ``more`` says when there are further ones.
MAX_BATCH = 20_000
#: Larger snapshots are skipped (and counted), never loaded.
MAX_BYTES = 256 << 20
#: A file modified this recently may change again within one mtime tick at the same size: its
#: signature cannot prove it unchanged, so it is parsed again.
RACY_NS = 2 * 10**9
#: An unparseable snapshot this much older than now is bad input, not a write in progress.
GRACE_NS = 10 * 10**9

Pos = tuple[int, int]  # (step, index among the entries at that step)


class RunMark:
    """What has been delivered from one run's snapshots; shared by that run's readers."""

    def __init__(self) -> None:
        self.pos: Pos | None = None  # the last delivered position
        self.mtime_ns = 0  # newest snapshot consistent with the delivered history
        self.seq = 0  # bumped on every change; the highest wins when states are restored
        self.prints: deque[tuple[int, int, int]] = deque(maxlen=FP_WINDOW)  # (step, index, crc)

    def to_json(self) -> dict[str, Any]:
        return {"pos": self.pos, "mtime_ns": self.mtime_ns, "seq": self.seq, "prints": list(self.prints)}

    def load(self, data: dict[str, Any]) -> None:
        pos = data.get("pos")
        self.pos = (int(pos[0]), int(pos[1])) if pos else None
        self.mtime_ns = int(data.get("mtime_ns", 0))
        self.seq = int(data.get("seq", 0))
        prints = data.get("prints", [])
        self.prints = deque(((int(s), int(i), int(c)) for s, i, c in prints), maxlen=FP_WINDOW)

    def cut(self, pos: Pos, before: Pos | None) -> None:
        """Forget everything delivered at or after ``pos``."""
        while self.prints and (self.prints[-1][0], self.prints[-1][1]) >= pos:
            self.prints.pop()
        self.pos = before

    def advance(self, pos: Pos, crc: int) -> None:
        self.pos = pos
        self.prints.append((pos[0], pos[1], crc))


#: One mark per run folder. Kept after its readers are gone: a daemon drops the reader of a
#: deleted checkpoint before it meets the next one, which must continue from the same mark.
MARKS: OrderedDict[str, RunMark] = OrderedDict()
#: Every mark a live reader holds, however many runs were opened since (past MAX_MARKS, the
#: next checkpoint's reader of a live run got a fresh mark and delivered its history again).
LIVE: weakref.WeakValueDictionary[str, RunMark] = weakref.WeakValueDictionary()


def mark_for(folder: Path, registry: dict[str, RunMark] | None = None) -> RunMark:
    """The shared mark of the run in ``folder`` (from ``registry``, default :data:`MARKS`)."""
    marks = MARKS if registry is None else registry
    key = os.path.abspath(folder)
    mark = marks.pop(key, None) or (LIVE.get(key) if registry is None else None) or RunMark()
    marks[key] = mark  # most recent last
    if registry is None:
        LIVE[key] = mark
    while len(marks) > MAX_MARKS:
        marks.pop(next(iter(marks)))
    return mark


def fingerprint(entry: Any) -> int:
    return zlib.crc32(json.dumps(entry, sort_keys=True, default=str).encode())


def entry_step(entry: Any) -> int | None:
    step = entry.get("step") if isinstance(entry, dict) else None
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        return None
    if isinstance(step, float) and not step.is_integer():
        return None
    return int(step)


def positions(history: list[Any]) -> list[Pos]:
    """Each entry's position; an entry without a usable step sits at the previous one's."""
    out: list[Pos] = []
    counts: dict[int, int] = {}
    step = 0
    for entry in history:
        s = entry_step(entry)
        step = s if s is not None else step
        n = counts.get(step, 0)
        counts[step] = n + 1
        out.append((step, n))
    return out


class HfTrainerStateReader(Reader):
    """Reads the new ``log_history`` entries of a ``trainer_state.json`` snapshot."""

    name = "hf-trainer-state"

    def __init__(self, path: str | Path, *, marks: dict[str, RunMark] | None = None):
        super().__init__(path)
        self.mark = mark_for(self.run_dir(self.path), marks)
        self.done: tuple | None = None  # signature of the snapshot fully taken
        self.bad: tuple | None = None  # signature of the snapshot counted as bad input

    @classmethod
    def matches(cls, path: Path) -> bool:
        return path.name == STATE_NAME

    @classmethod
    def run_dir(cls, path: Path) -> Path:
        parent = path.parent
        return parent.parent if CHECKPOINT_DIR.fullmatch(parent.name) else parent

    def get_state(self) -> dict[str, Any]:
        return {"done": self.done, "bad": self.bad, "mark": self.mark.to_json()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.done = tuple(state["done"]) if state.get("done") else None
        self.bad = tuple(state["bad"]) if state.get("bad") else None
        mark = state.get("mark") or {}
        if int(mark.get("seq", 0)) > self.mark.seq:
            self.mark.load(mark)

    def read(self) -> list[Record]:
        self.restarted = False
        self.more = False
        snap = self._snapshot()
        if snap is None:
            return []
        history, signature = snap
        records = self._take(history, signature[3])
        if not self.more:
            self.done = signature
        return records

    # ---- loading -----------------------------------------------------------------------
    def _snapshot(self) -> tuple[list[Any], tuple] | None:
        """The parsed ``log_history`` and the file's signature, or None (nothing to do now)."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                age = time.time_ns() - st.st_mtime_ns
                if signature == self.bad or (signature == self.done and age > RACY_NS):
                    return None
                if st.st_size > MAX_BYTES:
                    return self._bad(signature, "over-large trainer_state.json", f"{st.st_size} bytes")
                data = f.read(MAX_BYTES + 1)
        except OSError:  # vanished (save_total_limit) or unreadable: nothing to read now
            return None
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            if age < GRACE_NS:
                return None  # most likely being written right now: look again next time
            return self._bad(signature, "unparseable trainer_state.json", str(exc)[:80])
        history = obj.get("log_history") if isinstance(obj, dict) else None
        if not isinstance(history, list):
            return self._bad(signature, "trainer_state.json without a log_history list")
        return history, signature

    def _bad(self, signature: tuple, what: str, detail: str = "") -> None:
        self.bad = signature
        self.skip(what, detail)
        return None

    # ---- delivery ----------------------------------------------------------------------
    def _take(self, history: list[Any], mtime_ns: int) -> list[Record]:
        mark = self.mark
        pos = positions(history)
        differ = self._first_difference(history, pos)
        restart = differ is not None
        if restart:
            if mtime_ns < mark.mtime_ns:
                return []  # an outdated snapshot of an abandoned branch
            start = next(i for i, p in enumerate(pos) if p[0] == pos[differ][0])
            log.info("%s: history differs from step %d on: resumed run", self.path, pos[start][0])
            mark.cut(pos[start], pos[start - 1] if start else None)
            mark.mtime_ns = mtime_ns
        new = [i for i, p in enumerate(pos) if mark.pos is None or p > mark.pos]
        if len(new) > MAX_BATCH:
            new, self.more = new[:MAX_BATCH], True
        mark.mtime_ns = max(mark.mtime_ns, mtime_ns)
        if new or restart:
            mark.seq += 1
        out: list[Record] = []
        for i in new:
            record = self._record(history[i], pos[i][0], restart and not out)
            mark.advance(pos[i], fingerprint(history[i]))
            if record is not None:
                out.append(record)
        return out

    def _first_difference(self, history: list[Any], pos: list[Pos]) -> int | None:
        """Index of the first delivered entry whose fingerprint differs from what was delivered."""
        prints = {(s, i): crc for s, i, crc in self.mark.prints}
        if not prints:
            return None
        for k, p in enumerate(pos):
            crc = prints.get(p)
            if crc is not None and fingerprint(history[k]) != crc:
                return k
        return None

    def _record(self, entry: Any, step: int, restart: bool) -> Record | None:
        if entry_step(entry) is None:
            self.skip("log_history entry without a step", repr(entry)[:80])
            return None
        r = split_counters(numeric_items(entry))
        return Record(r.metrics, step, r.epoch, None, restart)


@hookimpl
def register_readers(register) -> None:
    register(HfTrainerStateReader)
