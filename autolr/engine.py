"""One run's engine: feeds log records through the chain, rewinding when steps go back.

When a record's step (or epoch) is below the last one seen, the job was resumed from an
earlier checkpoint. The history is cut at that step and the chain state rebuilt by replaying
the kept rows, so the decisions are exactly those of a run that never went past it.

Memory is bounded: the engine keeps the last ``history`` rows, reduced to the counters and the
metrics the chain reads, plus a chain-state checkpoint every ``checkpoint_every`` rows. A
rewind further back than the window restores the oldest checkpoint and says so.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import replace
from typing import Any, Sequence

from .chain import Chain, Decision
from .policy import State
from .records import Record

log = logging.getLogger("autolr.engine")


class RunEngine:
    """Feeds records of one run through ``chain``; ``feed()`` returns the decisions made."""

    def __init__(self, chain: Chain, *, history: int = 1024, checkpoint_every: int = 128):
        self.chain = chain
        self.history = max(history, checkpoint_every)
        self.checkpoint_every = checkpoint_every
        self.state: State = chain.init()
        self.rows: deque[tuple] = deque()  # (step, epoch, metrics) of the kept rows, in order
        self.checkpoints: deque[tuple[int, State]] = deque([(0, self.state)])  # (rows before, state)
        self.first_row = 0  # global index of rows[0]
        self.last_key: float | None = None
        self.rewinds = 0
        self.columns: tuple[str, ...] = ()

    # ---- observation -------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.chain.scale(self.state)

    @property
    def lr(self) -> float | None:
        return self.chain.lr(self.state)

    def feed(self, record: Record, columns: Sequence[str] = ()) -> list[Decision]:
        out: list[Decision] = []
        self.columns = tuple(columns)
        key = self._key(record)
        if key is not None and self.last_key is not None and (
                key < self.last_key or (record.restart and key <= self.last_key)):
            out.append(self._rewind(key))
        self.state, decision = self.chain.update(self.state, record, columns)
        self._remember(record)
        if key is not None:
            self.last_key = key
        if decision is not None:
            out.append(decision)
        return out

    def override(self, *, lr: float | None = None, scale: float | None = None) -> None:
        """Adopt a manual LR; the history is kept and later decisions continue from it."""
        self.state = self.chain.override(self.state, lr=lr, scale=scale)
        # Later rewinds replay from checkpoints taken before the override: carry it forward.
        manual = self.state["manual"]
        self.checkpoints = deque((n, dict(s, manual=manual)) for n, s in self.checkpoints)

    def _key(self, record: Record) -> float | None:
        unit = self.state.get("unit")
        if unit == "epoch":
            return record.epoch
        if unit == "row":
            return None
        return record.step if record.step is not None else None

    def _remember(self, record: Record) -> None:
        self.rows.append((record.step, record.epoch, record.metrics))
        n = self.first_row + len(self.rows)
        if n % self.checkpoint_every == 0:
            self.checkpoints.append((n, self.state))
        while len(self.rows) > self.history + self.checkpoint_every and len(self.checkpoints) > 1:
            drop_to = self.checkpoints[1][0]
            for _ in range(drop_to - self.first_row):
                self.rows.popleft()
            self.first_row = drop_to
            self.checkpoints.popleft()

    # ---- rewind ------------------------------------------------------------------------
    def _rewind(self, key: float) -> Decision:
        old_scale, old_key = self.scale, self.last_key
        unit = self.state.get("unit")
        keys = [(r[1] if unit == "epoch" else r[0]) for r in self.rows]
        keep = next((i for i, k in enumerate(keys) if k is not None and k >= key), len(keys))
        cut_row = self.first_row + keep
        base_rows, base_state = self.checkpoints[0]
        exact = keep > 0 or self.first_row == 0
        for n, st in self.checkpoints:
            if n <= cut_row:
                base_rows, base_state = n, st
        state = base_state
        replayed = list(self.rows)[base_rows - self.first_row : keep]
        for step, epoch, metrics in replayed:
            state, _ = self.chain.update(state, Record(metrics, step, epoch), self.columns)
        # Forget what came after the cut.
        for _ in range(len(self.rows) - keep):
            self.rows.pop()
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
            "rows": [list(r) for r in self.rows],
            "checkpoints": [[n, s] for n, s in self.checkpoints],
            "first_row": self.first_row,
            "last_key": self.last_key,
            "rewinds": self.rewinds,
        }

    def set_state(self, data: dict[str, Any]) -> None:
        self.state = data["chain"]
        self.rows = deque(tuple(r) for r in data["rows"])
        self.checkpoints = deque((int(n), s) for n, s in data["checkpoints"])
        self.first_row = int(data["first_row"])
        self.last_key = data["last_key"]
        self.rewinds = int(data.get("rewinds", 0))
