"""One run's engine: feeds log records through the chain, rewinding when steps go back.

When a record's step (or epoch) is below the last one seen, the job was resumed from an
earlier checkpoint. The history is cut at that step and the chain state rebuilt by replaying
the kept rows, so the decisions are exactly those of a run that never went past it.

Memory is bounded: the engine keeps the last ``history`` rows (at most ``history`` +
``checkpoint_every``) in column arrays (``History``, 9 bytes a row with one metric and a
regular step), plus a chain-state checkpoint every ``checkpoint_every`` rows (default
``history // 2``: three checkpoints, since a policy state with its windows is the larger part
of a run's memory; a rewind replays at most ``checkpoint_every`` rows from the checkpoint
before it). Checkpoints are held as ``marshal`` bytes of the state (exact, a quarter of the
live objects' size; made and read only in this process). A rewind further back than the
window restores the oldest checkpoint and says so.
"""
from __future__ import annotations

import base64
import logging
import marshal
import math
import sys
from array import array
from collections import deque
from typing import Any, Sequence

from .chain import Chain, Decision
from .policy import State
from .records import Record

log = logging.getLogger("autolr.engine")


class History:
    """The kept rows, column-wise: 9 bytes a row with one metric, not ~300 as tuples and dicts.

    ``flags`` (bit 0: a step, bit 1: an epoch) has one entry per row, ``epochs`` (float64) too
    once a row has an epoch. Steps cost nothing while every kept row has one and they go up by
    a fixed stride (the usual log): row i's step is ``step0 + stride · i`` and ``steps`` is
    None; the first row that breaks the pattern turns ``steps`` into an int64 array. The
    metric values of all rows follow each other in ``values``; their names are a shared tuple,
    ``keysets[0]`` while every row has the same names (a row's values then start at
    ``i * len(names)``). Once names differ, ``keys`` gives each row's name set and ``offsets``
    where its values start (minus ``base``, the offset of ``values[0]``). A row that does not
    fit (a step beyond int64, a value that is not a float) is kept whole in ``odd``, by its
    index among the rows ever appended.
    """

    def __init__(self) -> None:
        self.steps: array | None = None  # None: row i's step is step0 + stride * i
        self.step0 = 0
        self.stride = 0
        self.flags = bytearray()
        self.values = array("d")
        self.epochs: array | None = None
        self.keys: array | None = None
        self.offsets: array | None = None
        self.base = 0
        self.keysets: list[tuple[str, ...]] = []
        self.keyset_ids: dict[tuple[str, ...], int] = {}
        self.odd: dict[int, tuple] = {}
        self.first = 0  # index of row 0 among the rows ever appended

    def __len__(self) -> int:
        return len(self.flags)

    def append(self, step: int | None, epoch: float | None, metrics: dict[str, float]) -> None:
        if epoch is None and self.keys is None and self.epochs is None and type(step) is int \
                and self.keysets and -2**63 <= step < 2**63 and tuple(metrics) == self.keysets[0]:
            # The usual row: a step, the same float metrics as row 0, no epoch column yet.
            vals = tuple(metrics.values())
            for v in vals:
                if type(v) is not float:
                    break
            else:
                steps = self.steps
                if steps is not None:
                    steps.append(step)
                elif step != self.step0 + self.stride * len(self.flags):
                    self._push_step(step)
                self.flags.append(1)
                self.values.extend(vals)
                return
        n = len(self.flags)
        fits = (step is None or type(step) is int) and (epoch is None or type(epoch) is float)
        vals = tuple(metrics.values())
        for v in vals:
            if type(v) is not float:
                fits = False
        if fits and step is not None and not -2**63 <= step < 2**63:
            fits = False
        if fits:
            names = tuple(metrics)
            self._push_step(step)
        else:
            self.odd[self.first + n] = (step, epoch, dict(metrics))
            self._push_step(None)
            names, vals = (), ()
        if epoch is not None and fits:
            if self.epochs is None:
                self.epochs = array("d", bytes(8 * n))
            self.epochs.append(epoch)
        elif self.epochs is not None:
            self.epochs.append(0.0)
        kid = self.keyset_ids.get(names)
        if kid is None:
            kid = self.keyset_ids[names] = len(self.keysets)
            self.keysets.append(names)
        if self.keys is None and kid != 0:  # names differ from now on: per-row name sets
            width = len(self.keysets[0])
            self.keys = array("I", bytes(4 * n))
            self.offsets = array("Q", range(0, n * width, width) if width else bytes(8 * n))
            self.base = 0
        if self.keys is not None:
            self.keys.append(kid)
            self.offsets.append(self.base + len(self.values))
        self.flags.append((step is not None) | (epoch is not None) << 1)
        self.values.extend(vals)

    def _push_step(self, step: int | None) -> None:
        """Record the step of the row about to be appended (None: the row has none; int64)."""
        n = len(self.flags)
        if self.steps is None:
            if step is not None and n == 0:
                self.step0 = step
                return
            if step is not None and n == 1 and -2**63 <= step - self.step0 < 2**63:
                self.stride = step - self.step0
                return
            if step is not None and step == self.step0 + self.stride * n:
                return
            self.steps = array("q", [self.step0 + self.stride * i for i in range(n)])
        self.steps.append(0 if step is None else step)

    def _step(self, i: int) -> int:
        steps = self.steps
        return self.step0 + self.stride * i if steps is None else steps[i]

    def _span(self, i: int) -> tuple[tuple[str, ...], int]:
        if self.keys is None:
            names = self.keysets[0]
            return names, i * len(names)
        return self.keysets[self.keys[i]], self.offsets[i] - self.base

    def row(self, i: int) -> tuple[int | None, float | None, dict[str, float]]:
        odd = self.odd.get(self.first + i)
        if odd is not None:
            return odd
        f = self.flags[i]
        names, at = self._span(i)
        return (self._step(i) if f & 1 else None, self.epochs[i] if f & 2 else None,
                dict(zip(names, self.values[at : at + len(names)])))

    def key(self, i: int, unit: str | None) -> float | None:
        """Row i's epoch (unit "epoch") or step, None when it has none."""
        odd = self.odd.get(self.first + i)
        if odd is not None:
            return odd[1] if unit == "epoch" else odd[0]
        if unit == "epoch":
            return self.epochs[i] if self.flags[i] & 2 else None
        return self._step(i) if self.flags[i] & 1 else None

    def _columns(self) -> list:
        return [a for a in (self.steps, self.flags, self.epochs, self.keys, self.offsets) if a is not None]

    def drop_front(self, n: int) -> None:
        if n <= 0:
            return
        if n < len(self.flags):
            _, cut = self._span(n)
        else:
            cut = len(self.values)
        del self.values[:cut]
        if self.keys is not None:
            self.base += cut
        for a in self._columns():
            del a[:n]
        self.step0 += self.stride * n
        self.first += n
        if self.odd:
            self.odd = {k: v for k, v in self.odd.items() if k >= self.first}

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` rows."""
        if n >= len(self.flags):
            return
        _, cut = self._span(n)
        del self.values[cut:]
        for a in self._columns():
            del a[n:]
        if self.odd:
            end = self.first + n
            self.odd = {k: v for k, v in self.odd.items() if k < end}

    def get_state(self) -> dict[str, Any]:
        """The arrays as base64 of their bytes, in the machine's byte order (``byteorder``); the
        steps as ``step_run`` [step0, stride] while they need no array."""
        b64 = lambda a: None if a is None else base64.b64encode(bytes(a)).decode("ascii")  # noqa: E731
        return {"format": 2, "byteorder": sys.byteorder, "keysets": [list(k) for k in self.keysets],
                "steps": b64(self.steps), "step_run": [self.step0, self.stride] if self.steps is None else None,
                "flags": b64(self.flags), "epochs": b64(self.epochs),
                "keys": b64(self.keys), "values": b64(self.values),
                "odd": [[i - self.first, *row] for i, row in sorted(self.odd.items())]}

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> "History":
        """Rebuild from ``get_state()``; ValueError when the parts do not agree."""
        h = cls()
        h.keysets = [tuple(k) for k in data["keysets"]]
        h.keyset_ids = {k: i for i, k in enumerate(h.keysets)}
        h.flags = bytearray(base64.b64decode(data["flags"]))
        n = len(h.flags)
        for name, code in (("steps", "q"), ("values", "d"), ("epochs", "d"), ("keys", "I")):
            if data.get(name) is None:
                continue
            a = array(code, base64.b64decode(data[name]))
            if data.get("byteorder", sys.byteorder) != sys.byteorder:
                a.byteswap()
            setattr(h, name, a)
        if h.steps is None:
            run = data.get("step_run")
            if not (isinstance(run, list) and len(run) == 2 and all(type(v) is int for v in run)) \
                    or 0 in h.flags or 2 in h.flags:  # a row without a step needs the array
                raise ValueError("inconsistent engine history")
            h.step0, h.stride = run
            if n and not (-2**63 <= h.step0 < 2**63 and -2**63 <= h.step0 + h.stride * (n - 1) < 2**63):
                raise ValueError("inconsistent engine history")
        if (h.steps is not None and len(h.steps) != n) or (h.epochs is not None and len(h.epochs) != n):
            raise ValueError("inconsistent engine history")
        if h.keys is None:
            width = len(h.keysets[0]) if h.keysets else 0
            if len(h.values) != n * width or (n and not h.keysets):
                raise ValueError("inconsistent engine history")
        else:
            if len(h.keys) != n or any(k >= len(h.keysets) for k in h.keys):
                raise ValueError("inconsistent engine history")
            h.offsets = array("Q")
            at = 0
            for k in h.keys:
                h.offsets.append(at)
                at += len(h.keysets[k])
            if at != len(h.values):
                raise ValueError("inconsistent engine history")
        h.odd = {int(i): (step, epoch, dict(metrics)) for i, step, epoch, metrics in data.get("odd", [])}
        return h


class RunEngine:
    """Feeds records of one run through ``chain``; ``feed()`` returns the decisions made."""

    def __init__(self, chain: Chain, *, history: int = 1024, checkpoint_every: int | None = None):
        if checkpoint_every is None:
            checkpoint_every = max(history // 2, 1)
        self.chain = chain
        self.history = max(history, checkpoint_every)
        self.checkpoint_every = checkpoint_every
        self.state: State = chain.init()
        self.rows = History()  # the kept rows, in order
        # (rows before, the state then, packed: see _pack)
        self.checkpoints: deque[tuple[int, bytes | State]] = deque([(0, _pack(self.state))])
        self.last_key: float | None = None
        self.lanes: dict[str, float] = {}  # a source folder -> its last key (see feed)
        self.last_lane: str | None = None  # the folder of the row that set last_key
        self.rewinds = 0
        self.columns: tuple[str, ...] = ()

    # ---- observation -------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.chain.scale(self.state)

    @property
    def lr(self) -> float | None:
        return self.chain.lr(self.state)

    @property
    def first_row(self) -> int:
        """Index of the oldest kept row among all rows fed."""
        return self.rows.first

    def key_of(self, record: Record) -> float | None:
        """The row's key for rewinds: its epoch, step, or none, by the run's unit."""
        unit = self.state["unit"]
        return record.epoch if unit == "epoch" else None if unit == "row" else record.step

    def feed(self, record: Record, columns: Sequence[str] = (), lane: str | None = None) -> list[Decision]:
        """Feed one row; a key below the last one rewinds (a resumed job).

        ``lane`` names the folder of the row's file. Files in two folders of one run are
        written side by side (add_scalars, Keras's train/ and validation/), so one folder's
        rows may come after the other's later ones: a row below the last key from another
        folder than the one ahead, and not below its own folder's last key, is late. It is fed
        as it is, without a rewind, and the last key stays."""
        out: list[Decision] = []
        if type(columns) is not tuple:
            columns = tuple(columns)
        self.columns = columns
        unit = self.state["unit"]  # key_of(record), inline: one call less a row
        key = record.epoch if unit == "epoch" else None if unit == "row" else record.step
        late = False
        if key is not None and self.last_key is not None and (
                key < self.last_key or (record.restart and key <= self.last_key)):
            lanes = self.lanes
            # (no last_lane: a state saved before folders were kept, where any step back rewound)
            if (lane is not None and self.last_lane is not None and lane != self.last_lane
                    and not record.restart and key >= lanes.get(lane, -math.inf)):
                late = True
            else:
                out.append(self._rewind(key, record.epoch))
                for other, last in lanes.items():  # the resumed job: every folder from here on
                    if last > key:
                        lanes[other] = key
        self.state, decision = self.chain.update(self.state, record, columns)
        self._remember(record)
        if key is not None:
            if lane is not None:
                self.lanes[lane] = key
            if not late:
                self.last_key, self.last_lane = key, lane
        if decision is not None:
            out.append(decision)
        return out

    def override(self, *, lr: float | None = None, scale: float | None = None) -> None:
        """Adopt a manual LR; the history is kept and later decisions continue from it."""
        self.state = self.chain.override(self.state, lr=lr, scale=scale)
        # A later rewind replaying rows past it takes it again at the same row; one to before
        # it takes it where the job resumes (_rewind).
        self.state["manual_set"] = [lr, scale, self.rows.first + len(self.rows)]

    def _set_again(self, state: State, manual: list) -> State:
        """``state`` with the manual set ``manual`` ([lr, scale, row]) taken (see override)."""
        return dict(self.chain.override(state, lr=manual[0], scale=manual[1]), manual_set=manual)

    def _remember(self, record: Record) -> None:
        rows = self.rows
        rows.append(record.step, record.epoch, record.metrics)
        kept = len(rows.flags)
        n = rows.first + kept
        if n % self.checkpoint_every == 0:
            self.checkpoints.append((n, _pack(self.state)))
        while len(rows.flags) > self.history + self.checkpoint_every and len(self.checkpoints) > 1:
            drop_to = self.checkpoints[1][0]
            rows.drop_front(drop_to - rows.first)
            self.checkpoints.popleft()

    # ---- rewind ------------------------------------------------------------------------
    def _rewind(self, key: float, epoch: float | None = None) -> Decision:
        old_scale, old_key = self.scale, self.last_key
        unit = self.state.get("unit")
        rows = self.rows
        last_epoch = rows.key(len(rows) - 1, "epoch") if len(rows) else None
        keys = [rows.key(i, unit) for i in range(len(rows))]
        keep = next((i for i, k in enumerate(keys) if k is not None and k >= key), len(keys))
        cut_row = self.first_row + keep
        base_rows, base_state = self.checkpoints[0]
        exact = keep > 0 or self.first_row == 0
        for n, st in self.checkpoints:
            if n <= cut_row:
                base_rows, base_state = n, st
        state = _unpack(base_state)
        replayed = [rows.row(i) for i in range(base_rows - self.first_row, keep)]
        # The last manual set (autolr set), when the checkpoint predates it: taken again at its
        # row, or where the job resumes when it came after the rows kept (the LR is the value
        # set, later decisions continue from it). Its factor, carried back instead, is relative
        # to the policies' factors when it was set: a 0.3 set after ten halvings was 9.6 times
        # the base LR at a resume five halvings earlier.
        manual = self.state.get("manual_set")
        if manual is not None and state.get("manual_set") == manual:
            manual = None
        for i, (step, epoch, metrics) in enumerate(replayed):
            if manual is not None and manual[2] == base_rows + i:
                state, manual = self._set_again(state, manual), None
            state, _ = self.chain.update(state, Record(metrics, step, epoch), self.columns)
        if manual is not None:
            state = self._set_again(state, manual)
        # Forget what came after the cut.
        rows.truncate(keep)
        while len(self.checkpoints) > 1 and self.checkpoints[-1][0] > cut_row:
            self.checkpoints.pop()
        self.state = state
        self.last_key = keys[keep - 1] if keep else None
        self.rewinds += 1
        reason = (
            f"rewind: {unit} went back from {old_key:g} to {key:g} (resumed from a checkpoint); "
            f"state rebuilt by replaying {len(replayed)} rows"
        )
        if not exact:
            reason += " (older than the history window: restored the oldest checkpoint)"
            log.warning("%s", reason)
        if unit == "step" and epoch is not None and last_epoch is not None and epoch > last_epoch:
            # A resumed job goes back in epochs too: this log's step may count within each epoch.
            reason += (f"; but the epoch advanced ({last_epoch:g} -> {epoch:g}): if the log's step restarts "
                       f"every epoch, log a global step, or watch with --unit epoch or --unit row")
            log.warning("%s", reason)
        return Decision(
            scale=self.scale,
            lr=self.lr,
            step=int(key) if float(key).is_integer() else None,
            policy="rewind",
            reason=reason,
            evidence={"from": old_key, "to": key, "replayed_rows": len(replayed), "exact": exact,
                      "previous_scale": old_scale},
            kind="rewind",
        )

    # ---- persistence -------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        return {
            "chain": self.state,
            "history": self.rows.get_state(),
            "checkpoints": [[n, _unpack(s)] for n, s in self.checkpoints],
            "first_row": self.first_row,
            "last_key": self.last_key,
            "lanes": self.lanes,
            "last_lane": self.last_lane,
            "rewinds": self.rewinds,
        }

    def set_state(self, data: dict[str, Any]) -> None:
        """Restore :meth:`get_state`'s output; all or nothing (a damaged state raises and
        leaves the engine as it was)."""
        chain_state = data["chain"]
        if not isinstance(chain_state, dict):
            raise TypeError("the chain's state is not an object")
        if "history" in data:
            rows = History.from_state(data["history"])
        else:  # the first format: a list of [step, epoch, metrics]
            rows = History()
            for step, epoch, metrics in data["rows"]:
                rows.append(step, epoch, metrics)
        rows.first = int(data["first_row"])
        rows.odd = {k + rows.first: v for k, v in rows.odd.items()}
        checkpoints = deque((int(n), _pack(s)) for n, s in data["checkpoints"])
        last_key = data["last_key"]
        lanes = {str(k): v for k, v in dict(data.get("lanes") or {}).items() if type(v) in (int, float)}
        rewinds = int(data.get("rewinds", 0))
        self.state, self.rows, self.checkpoints, self.last_key = chain_state, rows, checkpoints, last_key
        self.lanes, self.rewinds = lanes, rewinds
        self.last_lane = data.get("last_lane") if isinstance(data.get("last_lane"), str) else None


def _pack(state: State) -> bytes | State:
    """A checkpoint's state as ``marshal`` bytes: exact (floats bit for bit) and about a quarter
    of the live dicts, lists and floats. A state holding a type marshal refuses (a subclass of
    a builtin, say) is kept as it is."""
    try:
        return marshal.dumps(state)
    except ValueError:
        return state


def _unpack(packed: bytes | State) -> State:
    """The state :func:`_pack` stored; a fresh copy each time (never shared with another)."""
    return marshal.loads(packed) if type(packed) is bytes else packed
