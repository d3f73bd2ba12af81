"""One watched run: its log sources, its engine, its control file and its persisted state.

State (``autolr.state.json`` in the run folder) holds the engine state, each source's read
position and the seq of the last decision published. It is written atomically right after
every publish and periodically otherwise. After a crash, decisions the journal holds beyond
the saved seq are matched, in order, against the ones re-derived from the re-read records,
so none is published twice and none is lost.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from .chain import Decision
from .config import Settings
from .control import (MAX_AHEAD, ControlConflict, ControlError, ControlWriteError, ControlWriter, JournalCursor,
                      atomic_write_json, path_identity, read_json, scheduled_with)
from .engine import RunEngine
from .policy import Observation, UnseenNames
from .readers.base import Reader

log = logging.getLogger("autolr.run")

STATE_NAME = "autolr.state.json"
STATE_VERSION = 1
MAX_STATE_BYTES = 256 << 20
#: Decisions of one read published together at most: catching up on a log where every row
#: decides (a per-step schedule) holds this many, not one per row of the read (~50k).
PUBLISH_CHUNK = 1024
#: Steps ahead a control file plans changes for (Chain.ahead): twice the steps one read of the
#: log brings (a logger flushing every N steps) plus the rows' stride, within these bounds; and
#: when no change comes that soon, the next one within AHEAD_MAX steps.
AHEAD_MIN, AHEAD_MAX = 8, 4096
#: Decisions a run publishes before the daemon checks whether most rows decide (see min_change).
HINT_ROWS = 1000


class Run:
    """A run folder: sources feed records to one engine; decisions go to the control file."""

    def __init__(self, folder: Path, settings: Settings, registry: dict[str, type], *,
                 fsync: bool = True, on_decision: Callable[["Run", dict], None] | None = None,
                 create_folder: bool = True):
        self.folder = folder
        self.settings = settings
        self.engine = RunEngine(settings.chain(registry), history=settings.history)
        # create_folder=False: the folder was there before us (a log's), and a user who deletes
        # it means it: the writer never creates it again
        self.writer = ControlWriter(folder, fsync=fsync, create_dir=create_folder)
        self.folder_identity = path_identity(folder)  # a folder deleted and made again is another run's
        self.fsync = fsync
        self.sources: dict[Path, Reader] = {}
        self.seq = 0
        self.pending = JournalCursor(self.writer.journal, 0, 0)  # journal entries beyond the saved state
        self.unpublished: list[Decision] = []  # decisions a failing disk refused; retried
        self.needs_repair = False  # journal ahead of the control file after a failed write
        self.schedule: list[dict[str, Any]] = []  # recent changes with their apply_at_step
        self.max_step: int | None = None
        self.read_span = 0  # steps the last read that moved max_step on brought (see _ahead)
        # (seq, unit) the control file's changes ahead were last worked out for, and whether a
        # policy of the chain can move on its own (a schedule, a warmup) at all
        self.ahead_key: tuple[int, str | None] | None = None
        self.ahead_end: tuple[int, int] | None = None  # (from, to): the steps the last list covered
        self.moves = bool(self.engine.chain.movers)
        self.last_step: int | float | None = None
        self.last_metric: float | None = None
        self.last_decision: dict[str, Any] | None = None
        self.rows = 0
        self.dirty = False
        self.saved_at = 0.0  # time.monotonic() of the last state save
        self.errors: Counter[str] = Counter()
        self.skipped_before: Counter[str] = Counter()  # counted before the last restart (saved state)
        self._lane_names: dict[Path, str] = {}
        self.on_decision = on_decision
        self.restored = False
        self.published = 0  # decisions this process published (the min_change hint)
        self.save_after_feed = False  # a manual override adopted mid-feed: save once the feed is done
        self.ahead_since: float | None = None  # since when the journal looks ahead of the log (live reads)
        self.unseen = UnseenNames(self.engine.chain)  # a --metric or unit no row has: said once
        # True when the daemon's inotify reader reports every change of the control file and
        # the journal (it calls adopt_manual() then): feed() need not stat both every time.
        self.manual_by_events = False

    # ---- sources -------------------------------------------------------------------------
    def add_source(self, reader: Reader, saved: dict[str, Any] | None = None) -> None:
        if saved and saved.get("reader") == reader.name:
            with contextlib.suppress(Exception):
                reader.set_state(saved["state"])
        self.sources[reader.path] = reader

    def lane_of(self, reader: Reader) -> str:
        """The folder of ``reader``'s file, relative to the run's: files in one folder follow
        each other (a resumed job's new file), files in two are written side by side. A
        companion (a callback's fit starts) is a lane of its own: read when the daemon gets to
        it (after a whole log, when catching up), its rows below the last step are late rows,
        never a rewind that would drop the run's history; the resumed fit's rows rewind."""
        name = self._lane_names.get(reader.path)
        if name is None:
            name = _rel(reader.path.parent, self.folder)
            if getattr(reader, "companion", False):
                name += "#" + reader.name
            self._lane_names[reader.path] = name
        return name

    def logs(self) -> int:
        """The run's log sources, a companion (a callback's fit starts) not counted."""
        return sum(not getattr(r, "companion", False) for r in self.sources.values())

    def skipped(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for reader in self.sources.values():
            total.update(reader.skipped)
        total.update(self.errors)
        total.update(self.skipped_before)
        return total

    # ---- processing ----------------------------------------------------------------------
    def feed(self, reader: Reader, records) -> None:
        """Feed records read from ``reader`` through the engine and publish the decisions.

        The decisions of one batch are published together (PUBLISH_CHUNK at most): one journal
        write and fsync, then one control-file replace holding the last. The state is saved
        only once the whole batch is fed, so the stored read positions never run ahead of the
        engine; a crash between the publish and the save is covered by the journal match at
        restart.
        """
        if not self.manual_by_events:
            self.adopt_manual(save=False)  # (the batch is read, not fed: saved once it is)
        columns = tuple(reader.columns())
        max_before = self.max_step
        first_read = self.rows == 0
        batch: list[Decision] = []
        engine = self.engine
        lane = self.lane_of(reader)
        for record in records:
            try:
                decisions = engine.feed(record, columns, lane)
            except Exception as exc:  # a policy bug must not kill the daemon
                self._report("policy error", logging.ERROR, "policy error on a record: %s", exc, exc_info=True)
                continue
            self.rows += 1
            self.dirty = True
            step = record.step
            if step is not None:
                self.last_step = step
                if self.max_step is None or step > self.max_step or (
                        decisions and any(d.kind == "rewind" for d in decisions)):
                    self.max_step = step  # after a rewind: the resumed job's step, not the old branch's
            elif record.epoch is not None:
                self.last_step = _int_if_whole(record.epoch)
            monitor = engine.state["monitor"]
            if monitor in record.metrics:
                self.last_metric = record.metrics[monitor]
            if decisions:
                if self.pending:  # a restart re-deriving what the journal holds: matched one by one, so
                    decisions = self._match_pending(decisions)  # a manual entry between two is adopted in its place
                batch += decisions
                if len(batch) >= PUBLISH_CHUNK:  # a decision on every row of a long log
                    self.publish(batch)
                    batch = []
        if first_read and records and not getattr(reader, "companion", False):
            self._warn_warmup_unseen(records[0])
        if max_before is None and records and type(records[0].step) is int:
            max_before = records[0].step - 1  # a first read: from its own first step
        if max_before is not None and self.max_step is not None and self.max_step > max_before:
            self.read_span = self.max_step - max_before
        elif max_before is not None and self.max_step is not None and self.max_step < max_before:
            self.read_span = 0  # a rewind: the reads before say nothing of the resumed job's
        if batch:
            # The state is saved by the daemon's flush timer, not here: a crash in between is
            # covered by matching the journal at restart, and a save per batch cost more than
            # the decision itself.
            self.publish(batch)
        if self.unseen:
            self.unseen.see(records, columns)
            for message in self.unseen.warnings():
                log.warning("%s: %s", self.folder, message)
        if self.moves and (self.seq, engine.state.get("unit")) != self.ahead_key:
            self._relist_ahead()
        if self.save_after_feed:  # the journal cannot say where in the rows the override came
            self.save_after_feed = False
            self.save()

    def _match_pending(self, decisions: list[Decision]) -> list[Decision]:
        """The decisions the journal beyond the saved state does not hold yet (re-derived after a
        crash: each one it holds is taken as published, and the manual entries after it adopted)."""
        fresh = []
        for decision in decisions:
            if self.pending and not _same_decision(self.pending.peek(), decision):
                self._skip_lost(decision)
            if self.pending and _same_decision(self.pending.peek(), decision):
                entry = self.pending.pop()
                self.seq = entry["seq"]
                self._schedule(entry)
                self._adopt_pending_manuals()
                continue
            if self.pending:
                log.warning("%s: journal after the saved state disagrees with the replay; "
                            "publishing anew", self.folder)
                for entry in self.pending:  # superseded by the replay's decisions
                    self.seq = max(self.seq, entry["seq"])
            fresh.append(decision)
        return fresh

    def check_journal_ahead(self, settle: float = 0.0) -> None:
        """Called once the run's logs are read to their end while journal entries beyond the
        saved state are still unmatched: when the next is a decision at a step beyond every row
        read, the journal is not this log's (a run folder copied with its files to start a new
        run, a log replaced while no daemon ran). Its entries are taken as superseded and a
        rewind to the LR the log gives is published: before, the job kept the copied run's LR.
        ``settle``: only once that has held for so many seconds (a live read's end of the log may
        be the end of a copy still under way, which the journal came with)."""
        entry = self.pending.peek()
        if (entry is None or entry.get("kind") not in ("decision", "rewind") or self.max_step is None
                or self.engine.state.get("unit") != "step" or not isinstance(entry.get("step"), (int, float))
                or entry["step"] <= self.max_step):
            self.ahead_since = None
            return
        if settle:
            now = time.monotonic()
            if self.ahead_since is None:
                self.ahead_since = now
            if now - self.ahead_since < settle:
                return
        for later in self.pending:
            self.seq = max(self.seq, later["seq"])
        log.warning("%s: the journal holds decisions up to step %s beyond the log's last step %s (a copied "
                    "run folder, or a log replaced while no daemon ran): the LR continues from the log",
                    self.folder, entry["step"], self.max_step)
        engine = self.engine
        self.publish([Decision(scale=engine.scale, lr=engine.lr, step=self.max_step, policy="rewind",
                               reason=f"the journal's decisions from step {entry['step']} on are not this "
                                      f"log's (its last step is {self.max_step}); the LR continues from the log",
                               evidence={"journal_step": entry["step"], "log_step": self.max_step},
                               kind="rewind")])
        self.dirty = True

    def _skip_lost(self, decision: Decision) -> None:
        """Take as published the journal's decisions at steps before ``decision``'s: the replay
        will not derive them again, their rows are gone (written, before the crash, into a log
        that was then rotated to a name no reader takes, or deleted). They stay as they were;
        matching goes on from ``decision`` (before, all that followed was journaled again)."""
        step = decision.step
        while isinstance(step, (int, float)):
            entry = self.pending.peek()
            if (entry is None or entry.get("kind") != "decision" or not isinstance(entry.get("step"), (int, float))
                    or entry["step"] >= step):
                return
            self.pending.pop()
            self.seq = entry["seq"]
            self._schedule(entry)
            self._adopt_pending_manuals()

    def publish(self, decisions: list[Decision]) -> bool:
        """Publish decisions not already in the journal; True when something was written.

        A manual entry (``autolr set``) written since our last publish wins over the decisions
        derived before we saw it: it is adopted and they are dropped, never published over it."""
        fresh = self.unpublished + self._match_pending(decisions)
        if not fresh:
            return len(decisions) > 0
        batch, last_at = [], (self.schedule[-1]["at"] if self.schedule else None)
        for d in fresh:
            fields = self._control_fields(d, last_at)
            last_at = fields.get("apply_at_step", last_at)
            batch.append(fields)
        ahead = self._ahead() if self.moves else []
        try:
            records = self.writer.publish_many(batch, schedule=self.schedule, after_seq=self.seq, now=self._now(),
                                               ahead=ahead)
        except ControlConflict:
            self.unpublished = []
            if self._adopt_foreign():
                log.info("%s: %d decision(s) derived before a manual override dropped", self.folder, len(fresh))
                self.save_after_feed = True
                return False
            return self.publish(fresh)  # another writer's decisions (not ours to adopt): ours follow
        except ControlWriteError as exc:
            # Journaled: they count as published; the control file is repaired from the journal.
            self.needs_repair = True
            self._report("control write failed", logging.ERROR, "%s", exc)
            records = exc.records
        except (OSError, ValueError) as exc:
            # A failing disk: the last good control file stays; the decisions wait, in order,
            # and go out with the next batch or flush. State is not saved past them.
            self.unpublished = fresh
            self._report("control write failed", logging.ERROR,
                         "could not write the control file (%d decisions queued): %s", len(fresh), exc)
            return False
        self.unpublished = []
        self._hint_min_change(len(records))
        self.schedule = records[-1].get("schedule", self.schedule)
        self.seq = records[-1]["seq"]
        self.ahead_key = (self.seq, self.engine.state.get("unit"))
        self.last_decision = records[-1]
        self.dirty = True
        if self.on_decision:
            for record in records:
                self.on_decision(self, record)
        return True

    def _ahead(self) -> list[tuple[int, float, float | None]]:
        """The changes the chain would publish at the next steps if no row came first, for the
        control file to list (a job logging every N steps, or a logger that flushes late, then
        follows a warmup or a schedule step by step): from the last step on, as far as twice
        the steps a read brings plus the rows' stride (AHEAD_MIN … AHEAD_MAX; AHEAD_MAX from a
        first row) and at least as far as the list before, or to the next change. Empty with
        ``--apply-margin``, whose changes the ``schedule`` lists, and while each read brings the
        one row of a log written every step (a daemon that falls behind reads several at once,
        and lists them again)."""
        engine = self.engine
        state = engine.state
        last = state.get("last_step")
        if self.settings.apply_margin is not None or state.get("unit") != "step" or type(last) is not int:
            return []
        rows = engine.rows
        stride = rows.stride if rows.steps is None and rows.stride > 0 else 1
        if self.rows <= 1:
            reach = AHEAD_MAX  # the first row (a callback's at the start of a fit): no cadence known yet
        elif stride == 1 and self.read_span <= 1:
            return []  # a row every step, read as it comes: the job is a step or two ahead at most
        else:
            reach = min(max(2 * max(self.read_span, stride) + stride, AHEAD_MIN), AHEAD_MAX)
        if self.ahead_end is not None and self.ahead_end[0] > last:
            self.ahead_end = None  # the job went back (a resumed checkpoint): the list before is void
        if self.ahead_end is not None and self.ahead_end[1] - last > reach:
            # as far as a list before went: the job may be there already (a daemon catching
            # up), and a shorter list would take its LR back to the factor of an earlier step
            reach = min(self.ahead_end[1] - last, AHEAD_MAX)
        self.ahead_end = (last, last + reach)
        chain = engine.chain
        plan = chain.ahead(state, last + 1, last + 1 + reach, MAX_AHEAD, beyond=AHEAD_MAX - reach)
        base = chain.base_lr if chain.base_lr is not None else state.get("base")
        return [(at, scale, None if base is None else base * scale) for at, scale in plan]

    def _warn_warmup_unseen(self, first: Any) -> None:
        """Say once when a run's first row comes after its warmup was over (a logger that writes
        its first rows late: a SummaryWriter flushes every 2 minutes, a Trainer logs every 500
        steps): the steps before it ran at the LR in force before, not the warmup's."""
        step = first.step
        if type(step) is not int or step <= 0 or self.engine.state.get("unit") != "step":
            return
        at_start, at_first = (Observation(0, s, None, {}, 1.0, None, "step", False) for s in (0, step))
        for policy in self.engine.chain.holders:
            if policy.holds(at_start) and not policy.holds(at_first):
                log.warning("%s: the first row came at step %d, after the warmup (%s) was over: the steps before it "
                            "ran at the LR in force before (the job's own, or the initial value). Log from the "
                            "first steps (the Lightning and Hugging Face callbacks note where a fit starts; a "
                            "SummaryWriter: flush_secs=1 at first)", self.folder, step, policy.name)
                return

    def _relist_ahead(self) -> None:
        """List the changes ahead in the control record in force when it was published without
        them: the run's unit was not known yet (its initial value), a manual set, or a restart.
        Its seq stays; nothing is journaled. A failing disk only costs the list."""
        self.ahead_key = (self.seq, self.engine.state.get("unit"))
        ahead = self._ahead()
        if ahead and not (self.unpublished or self.needs_repair or self.pending):
            try:
                self.writer.relist(self.seq, ahead)
            except (OSError, ValueError) as exc:
                log.warning("%s: the changes ahead were not listed in the control file: %s", self.folder, exc)

    def _hint_min_change(self, n: int) -> None:
        """Say once when most rows publish a decision (a per-step schedule) and min_change is 0."""
        before, self.published = self.published, self.published + n
        if before < HINT_ROWS <= self.published and self.published > self.rows // 2 and not self.settings.min_change:
            log.warning("%s: %d decisions in %d rows (a schedule that changes the LR on every row); each is a "
                        "journal entry and a control-file write. --min-change 0.001 (or min_change in "
                        "autolr.toml) publishes one per 0.1 %% of LR change instead.", self.folder, self.published,
                        self.rows)

    def adopt_manual(self, save: bool = True) -> None:
        """Continue from an ``autolr set`` made since our last publish; the state is saved at
        once (between two reads, so it is whole): after a crash the restart adopts the set at
        this same row, not at the row of an older save (where a chain whose factor moves
        without publishing, ``--min-change``, would take another manual factor). ``save=False``
        within a feed, whose batch is read but not fed yet: saved at its end."""
        if self.pending:
            return
        current = self.writer.current()
        if current is None or current["seq"] <= self.seq:
            return
        self.seq = current["seq"]
        self.last_decision = current
        self.dirty = True
        if current.get("policy") == "manual" and self._override(current):
            self._schedule(dict(current, kind="manual"))
            log.info("%s: adopted manual override seq %d (scale %g, lr %s)", self.folder,
                     current["seq"], current["scale"], current.get("lr"))
            if save:
                self.save()
            else:
                self.save_after_feed = True

    def _adopt_foreign(self) -> bool:
        """Take the journal entries written since our seq by another writer; True when one was
        a manual override (adopted)."""
        manual = False
        for entry in JournalCursor.after(self.writer.journal, self.seq):
            if entry["seq"] <= self.seq:
                continue
            self.seq = entry["seq"]
            self.last_decision = entry
            if entry.get("kind") == "manual" and self._override(entry):
                self._schedule(entry)
                manual = True
                log.info("%s: adopted manual override seq %d (scale %s, lr %s)", self.folder,
                         entry["seq"], entry.get("scale"), entry.get("lr"))
        current = self.writer.current()  # a control file ahead of the journal (written by hand)
        if current is not None and current["seq"] > self.seq:
            self.seq = current["seq"]
        self.dirty = True
        return manual

    def _adopt_pending_manuals(self) -> None:
        while self.pending and self.pending.peek().get("kind") == "manual":
            entry = self.pending.pop()
            if self._override(entry):
                self._schedule(entry)
            self.seq = entry["seq"]

    def _scheduled(self, schedule: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
        """``schedule`` with a journal entry, when the control file lists one (--apply-margin):
        a change with its ``apply_at_step``, a manual override in force at once."""
        if "apply_at_step" in entry or (entry.get("kind") == "manual" and self.settings.apply_margin is not None):
            return scheduled_with(schedule, entry, self._now())
        return schedule

    def _now(self) -> int | float | None:
        """The counter ``apply_at_step`` counts in, where the job is: the last step, else epoch."""
        return self.max_step if self.max_step is not None else self.last_step

    def _schedule(self, entry: dict[str, Any]) -> None:
        self.schedule = self._scheduled(self.schedule, entry)

    def _override(self, entry: dict[str, Any]) -> bool:
        """Continue from a manual control record or journal entry (its lr decides when the
        chain knows a base LR; without one its scale, and its lr teaches the base). A value
        the chain cannot take is logged and left out: it never stops the run."""
        try:
            self.engine.override(lr=entry.get("lr"), scale=entry.get("scale"))
        except (ValueError, TypeError, ArithmeticError) as exc:
            log.warning("%s: manual override seq %s not adopted: %s", self.folder, entry.get("seq"), exc)
            return False
        return True

    # ---- persistence ---------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.folder / STATE_NAME

    def _control_fields(self, d: Decision, last_at: int | None) -> dict[str, Any]:
        fields = {"scale": d.scale, "lr": d.lr, "step": d.step, "policy": d.policy,
                  "reason": d.reason, "evidence": d.evidence, "kind": d.kind}
        chain = self.engine.chain
        for key in ("min_lr", "max_lr"):  # for `autolr set`, which has no other way to know them
            if getattr(chain, key) is not None:
                fields[key] = getattr(chain, key)
        margin = self.settings.apply_margin
        if margin is None:
            return fields
        if d.kind == "initial":
            fields["apply_at_step"] = None  # in force from the start
            return fields
        if d.kind == "rewind" and isinstance(d.step, int):
            last_at = None  # the job resumed at d.step: earlier announcements are void
            base = d.step
        else:
            base = self.max_step if self.max_step is not None else (d.step if isinstance(d.step, int) else 0)
        at = base + margin
        fields["apply_at_step"] = at if last_at is None else max(at, last_at)
        return fields

    def retry(self) -> None:
        """Publish decisions a failing disk refused earlier; repair a control file left behind."""
        if self.unpublished and self.publish([]):
            self.save()
        if self.needs_repair:
            try:
                self.writer.repair(schedule=self.schedule)
                self.needs_repair = False
            except OSError as exc:
                self._report("control write failed", logging.ERROR, "control file still not written: %s", exc)

    def save(self) -> None:
        if self.unpublished:
            return  # saving now would lose the queued decisions after a crash
        if not self.writer.create_dir and not self.folder_unchanged():
            return  # its user deleted the run folder (and perhaps made a new one for a new run)
        data = {
            "version": STATE_VERSION,
            "seq": self.seq,
            "chain": self.engine.chain.names,
            "engine": self.engine.get_state(),
            "sources": {
                _rel(path, self.folder): {"reader": r.name, "state": r.get_state()}
                for path, r in self.sources.items()
            },
            "rows": self.rows,
            "schedule": self.schedule,
            "max_step": self.max_step,
            "last_step": self.last_step,
            "last_metric": _finite_or_none(self.last_metric),
            "skipped": dict(self.skipped()),
            "saved_at": time.time(),
        }
        try:
            atomic_write_json(self.state_path, data, fsync=self.fsync, allow_nan=True)
            self.dirty = False
            self.saved_at = time.monotonic()
        except (OSError, ValueError) as exc:
            self._report("state write failed", logging.ERROR, "could not save state: %s", exc)

    def folder_unchanged(self) -> bool:
        """The run folder is the one this run was opened in: not deleted, not made anew (a new
        folder may get the deleted one's inode number at once; it has no journal of ours)."""
        return (self.folder_identity is not None and path_identity(self.folder) == self.folder_identity
                and (not self.seq or os.path.exists(self.writer.journal)))

    def _report(self, what: str, level: int, message: str, *args: Any, exc_info: bool = False) -> None:
        """Count a failure; log its first three, then its 10th, 100th, 1000th...: a failing
        disk retried every quarter second, or a policy failing on every row, fills no log."""
        n = self.errors[what] = self.errors[what] + 1
        if n <= 3 or (n >= 10 and str(n).rstrip("0") == "1"):
            suffix = f" ({what}: {n} times so far)" if n > 3 else ""
            log.log(level, "%s: " + message + suffix, self.folder, *args, exc_info=exc_info and n <= 3)

    def clean_temp_files(self, older_than: float = 60.0) -> None:
        """Remove ``.autolr-*.tmp`` files a writer killed mid-write left behind."""
        now = time.time()
        with contextlib.suppress(OSError):
            for path in self.folder.glob(".autolr-*.tmp"):
                with contextlib.suppress(OSError):
                    if now - path.stat().st_mtime > older_than:
                        path.unlink()

    def load(self) -> dict[str, dict[str, Any]]:
        """Restore the saved state; return the saved source states by absolute path."""
        self.clean_temp_files()
        try:
            data = read_json(self.state_path, MAX_STATE_BYTES)
        except FileNotFoundError:
            data = None
        except (OSError, ControlError) as exc:
            log.warning("%s: ignoring unreadable state (%s); starting over", self.folder, exc)
            data = None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            self._resume_from_journal()
            return {}
        names = self.engine.chain.names
        if data.get("chain", names) != names:
            log.warning("%s: the policy chain changed from %s to %s; starting the run over", self.folder,
                        data["chain"], names)
            self._resume_from_journal()
            return {}
        try:  # a damaged or hand-edited state is one run's problem, never the daemon's
            seq, rows = int(data.get("seq", 0)), int(data.get("rows", 0))
            schedule = [dict(entry) for entry in data.get("schedule") or []]
            sources = dict(data.get("sources") or {})
            if not all(isinstance(v, dict) and "state" in v for v in sources.values()):
                raise ValueError("a log's saved position is damaged")  # (read from 0: the engine too)
            for key in ("max_step", "last_step"):  # compared with every row's step
                if not (data.get(key) is None or type(data[key]) in (int, float) and math.isfinite(data[key])):
                    raise ValueError(f"{key} is not a number")
            self.engine.set_state(data["engine"])
        except Exception as exc:  # any shape of damage (the engine is left as it was)
            log.warning("%s: ignoring incompatible state (%s); starting over", self.folder, exc)
            self._resume_from_journal()
            return {}
        self.seq, self.rows = seq, rows
        self.schedule = schedule
        self.max_step = data.get("max_step")
        self.last_step = data.get("last_step")
        self.last_metric = data.get("last_metric")
        # the readers resume past what they skipped: their counts carry on from the saved ones
        saved = data.get("skipped")
        if isinstance(saved, dict):
            self.skipped_before = Counter({str(k): v for k, v in saved.items() if type(v) is int and v > 0})
        self.restored = True
        if self.rows:
            self.unseen = UnseenNames(None)  # (checked, and said if need be, before the restart)
        self.pending = JournalCursor.after(self.writer.journal, self.seq)
        self._adopt_pending_manuals()
        schedule = self.schedule  # the control file a crash left behind the journal lists them all
        for entry in JournalCursor.after(self.writer.journal, seq):
            schedule = self._scheduled(schedule, entry)
        self.writer.repair(schedule=schedule)
        return {str(self.folder / rel): v for rel, v in sources.items()}

    def _resume_from_journal(self) -> None:
        """No usable state: re-derive everything, matching what the journal already holds."""
        self.pending = JournalCursor(self.writer.journal)
        self.seq = 0
        if self.pending and self.pending.peek().get("kind") == "initial":
            self.seq = self.pending.pop()["seq"]
        self._adopt_pending_manuals()

    def start(self) -> None:
        """Publish the chain's initial value for a run seen for the first time."""
        if self.restored or self.seq or self.pending:
            return
        current = self.writer.current()
        if current is not None:  # a control file from elsewhere (autolr set before the daemon)
            self.adopt_manual()
            return
        engine = self.engine
        if self.publish([Decision(scale=engine.scale, lr=engine.lr, step=None, policy=engine.chain.names,
                                  reason="initial value of the chain", kind="initial")]):
            self.save()

    # ---- reporting -----------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        last = self.last_decision or {}
        return {
            "run": str(self.folder),
            "control": str(self.writer.path),
            "step": self.last_step,
            "unit": self.engine.state.get("unit"),
            "metric": self.engine.state.get("monitor"),
            "value": _finite_or_none(self.last_metric),
            "lr": self.engine.lr,
            "scale": self.engine.scale,
            "seq": self.seq,
            "rows": self.rows,
            "last_decision": {k: last.get(k) for k in ("seq", "step", "policy", "reason")} if last else None,
            "skipped": dict(self.skipped()),
            "sources": sorted(_rel(p, self.folder) for p in self.sources),
        }


def _same_decision(entry: dict[str, Any], decision: Decision) -> bool:
    return (entry.get("step") == decision.step and entry.get("policy") == decision.policy
            and isinstance(entry.get("scale"), (int, float))
            and math.isclose(entry["scale"], decision.scale, rel_tol=1e-12))


def _rel(path: Path, folder: Path) -> str:
    try:
        return os.path.relpath(path, folder)
    except ValueError:
        return str(path)


def _finite_or_none(x: Any) -> Any:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x
