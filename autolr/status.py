"""``autolr status``: every run's state, read from its files alone."""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

from .control import CONTROL_NAME, ControlError, last_journal_entry, JOURNAL_NAME, read_json, validate_control
from .run import MAX_STATE_BYTES, STATE_NAME


def collect_status(root: Path) -> list[dict[str, Any]]:
    """A summary per run folder under ``root`` holding a control file or autolr state."""
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if CONTROL_NAME in filenames or STATE_NAME in filenames:
            rows.append(run_status(Path(dirpath)))
    return rows


def run_status(folder: Path) -> dict[str, Any]:
    """The run's summary from its files; a field of the wrong type (a damaged or hand-edited
    state) shows as unknown, never as an error."""
    control = state = None
    with contextlib.suppress(OSError, ControlError):
        control = validate_control(read_json(folder / CONTROL_NAME))
    with contextlib.suppress(OSError, ControlError):
        state = read_json(folder / STATE_NAME, MAX_STATE_BYTES)
    state = state if isinstance(state, dict) else {}
    engine = _typed(state.get("engine"), dict) or {}
    chain = _typed(engine.get("chain"), dict) or {}
    last = last_journal_entry(folder / JOURNAL_NAME)
    skipped = _typed(state.get("skipped"), dict) or {}
    return {
        "run": str(folder),
        "control": str(folder / CONTROL_NAME),
        "step": _number(state.get("last_step")),
        "unit": _typed(chain.get("unit"), str),
        "metric": _typed(chain.get("monitor"), str),
        "value": _number(state.get("last_metric")),
        "lr": control.get("lr") if control else None,
        "scale": control.get("scale") if control else 1.0,
        "seq": control.get("seq") if control else 0,
        "rows": _number(state.get("rows")) or 0,
        "last_decision": {k: last.get(k) for k in ("seq", "step", "policy", "reason")} if last else None,
        "skipped": {str(k): v for k, v in skipped.items() if type(v) is int},
        "sources": sorted(str(k) for k in (_typed(state.get("sources"), dict) or {})),
    }


def _typed(x: Any, kind: type) -> Any:
    return x if isinstance(x, kind) else None


def _number(x: Any) -> int | float | None:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None
