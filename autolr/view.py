"""What ``autolr watch`` prints: plain log lines, or a live table when stdout is a terminal."""
from __future__ import annotations

import logging
import shutil
import sys
import time
from typing import Any, Callable, TextIO


def fmt_lr(summary: dict[str, Any]) -> str:
    lr = summary.get("lr")
    return f"lr {lr:.4g}" if lr is not None else f"scale {summary.get('scale', 1.0):.4g}"


def run_line(s: dict[str, Any]) -> str:
    """One line per run: step, metric, current LR and last decision."""
    value = s.get("value")
    metric = f"{s.get('metric') or '-'} {value:.4g}" if value is not None else f"{s.get('metric') or '-'} -"
    last = s.get("last_decision") or {}
    decision = f"#{last.get('seq')} {last.get('policy')} @ {last.get('step')}" if last else "no decision yet"
    skipped = sum((s.get("skipped") or {}).values())
    extra = f"  skipped {skipped}" if skipped else ""
    counter = "epoch" if s.get("unit") == "epoch" else "step"  # (an epoch-level log's rows carry epochs)
    return f"{s['run']}  {counter} {s.get('step', '-')}  {metric}  {fmt_lr(s)}  [{decision}]{extra}"


#: Decision lines printed a second at most, in bursts of up to as many: a per-row schedule on
#: many runs, or catching up on a long log, decides thousands of times a second. The others
#: are counted and summed up in one line; every decision is in its run's journal.
DECISION_LINES_PER_SECOND = 20
#: Seconds between redraws of the live table at the most (a tick or the end of a catch-up
#: always redraws).
REDRAW_INTERVAL = 0.5


class View:
    """Receives daemon events; ``live`` redraws one line per run in place."""

    def __init__(self, out: TextIO = sys.stdout, live: bool | None = None,
                 summaries: Callable[[], list[dict[str, Any]]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.out = out
        self.live = out.isatty() if live is None else live
        self.summaries = summaries or (lambda: [])
        self.clock = clock
        self.drawn = 0
        self.last_draw = 0.0
        self.tokens = float(DECISION_LINES_PER_SECOND)  # decision lines that may be printed now
        self.refilled = self.clock()
        self.unshown = 0  # decisions not printed since the last summary line
        self.last_note = self.clock()

    def print(self, text: str) -> None:
        """Write a line; output that fails (a closed pipe, /dev/full) is given up, never raised:
        the daemon's work goes on and its journal has every decision."""
        if self.out is None:
            return
        try:
            if self.live and self.drawn:
                self.out.write(f"\x1b[{self.drawn}F\x1b[J")
                self.drawn = 0
            self.out.write(text + "\n")
            self.out.flush()
        except (OSError, ValueError) as exc:
            self.out = None
            logging.getLogger("autolr.view").warning("output failed (%s); printing no more", exc)

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "run":
            restored = " (resumed)" if data.get("restored") else ""
            self.print(f"run {data['run']}{restored}: policy {data['policy']}; control file {data['control']}")
        elif kind == "source":
            self.print(f"  log {data['path']} ({data['reader']})")
        elif kind == "decision":
            if self._may_print_decision():
                lr = data.get("lr")
                shown = f"lr {lr:.6g}" if lr is not None else f"scale {data['scale']:.6g}"
                self.print(f"{data['run']}: #{data['seq']} step {data['step']}: {shown} [{data['policy']}] "
                           f"{data['reason']}")
            else:
                self.unshown += 1
        elif kind == "ignored":
            self.print(f"  log {data['path']} ({data['reader']}) ignored: this run is read from its {data['kept']} logs")
        elif kind == "vanished":
            self.print(f"log vanished: {data['path']}")
        elif kind == "dropped":
            self.print(f"run dropped (its logs are gone): {data['run']}")
        elif kind == "ready":
            self.print(f"watching: {data['runs']} runs, {data['sources']} logs ({data['mode']}); catching up")
        elif kind == "caught_up":
            self.report_unshown()
            self.print(f"caught up: {data['runs']} runs")
        elif kind == "progress":
            self.print(f"catching up: {data['rows']} rows read ({data['rate']:.0f} rows/s)")
        elif kind == "stopped":
            self.report_unshown()
            self.print("stopped; state saved")
        elif kind == "tick":
            self.report_unshown()
        if self.live and (kind in ("tick", "caught_up") or (
                kind == "decision" and self.clock() - self.last_draw >= REDRAW_INTERVAL)):
            self.draw()

    def _may_print_decision(self) -> bool:
        """A token bucket: DECISION_LINES_PER_SECOND lines a second, as many in a burst."""
        now = self.clock()
        self.tokens = min(float(DECISION_LINES_PER_SECOND),
                          self.tokens + (now - self.refilled) * DECISION_LINES_PER_SECOND)
        self.refilled = now
        if self.tokens < 1.0:
            if now - self.last_note >= 1.0 and self.unshown:
                self.report_unshown()
            return False
        self.tokens -= 1.0
        return True

    def report_unshown(self) -> None:
        """One line for the decisions not printed since the last such line."""
        self.last_note = self.clock()
        if self.unshown:
            n, self.unshown = self.unshown, 0
            self.print(f"... {n} more decisions not shown (every one is in its run's autolr.decisions.jsonl)")

    def draw(self) -> None:
        if self.out is None:
            return
        width = shutil.get_terminal_size((120, 20)).columns
        lines = [run_line(s)[:width] for s in self.summaries()]
        text = (f"\x1b[{self.drawn}F\x1b[J" if self.drawn else "") + "".join(line + "\n" for line in lines)
        self.drawn = 0
        self.print(text.removesuffix("\n"))
        self.drawn = len(lines)
        self.last_draw = self.clock()
