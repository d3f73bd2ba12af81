"""What ``autolr watch`` prints: plain log lines, or a live table when stdout is a terminal."""
from __future__ import annotations

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
    return f"{s['run']}  step {s.get('step', '-')}  {metric}  {fmt_lr(s)}  [{decision}]{extra}"


class View:
    """Receives daemon events; ``live`` redraws one line per run in place."""

    def __init__(self, out: TextIO = sys.stdout, live: bool | None = None,
                 summaries: Callable[[], list[dict[str, Any]]] | None = None):
        self.out = out
        self.live = out.isatty() if live is None else live
        self.summaries = summaries or (lambda: [])
        self.drawn = 0
        self.last_draw = 0.0

    def print(self, text: str) -> None:
        if self.live and self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0
        self.out.write(text + "\n")
        self.out.flush()

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "run":
            restored = " (resumed)" if data.get("restored") else ""
            self.print(f"run {data['run']}{restored}: policy {data['policy']}; control file {data['control']}")
        elif kind == "source":
            self.print(f"  log {data['path']} ({data['reader']})")
        elif kind == "decision":
            lr = data.get("lr")
            shown = f"lr {lr:.6g}" if lr is not None else f"scale {data['scale']:.6g}"
            self.print(f"{data['run']}: #{data['seq']} step {data['step']}: {shown} [{data['policy']}] {data['reason']}")
        elif kind == "ignored":
            self.print(f"  log {data['path']} ({data['reader']}) ignored: this run is read from its {data['kept']} logs")
        elif kind == "vanished":
            self.print(f"log vanished: {data['path']}")
        elif kind == "dropped":
            self.print(f"run dropped (its logs are gone): {data['run']}")
        elif kind == "ready":
            self.print(f"watching: {data['runs']} runs, {data['sources']} logs ({data['mode']}); catching up")
        elif kind == "caught_up":
            self.print(f"caught up: {data['runs']} runs")
        elif kind == "progress":
            self.print(f"catching up: {data['rows']} rows read ({data['rate']:.0f} rows/s)")
        elif kind == "stopped":
            self.print("stopped; state saved")
        if kind in ("tick", "decision", "caught_up") and self.live:
            self.draw()

    def draw(self) -> None:
        width = shutil.get_terminal_size((120, 20)).columns
        lines = [run_line(s)[:width] for s in self.summaries()]
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
        self.out.write("".join(line + "\n" for line in lines))
        self.out.flush()
        self.drawn = len(lines)
        self.last_draw = time.monotonic()
