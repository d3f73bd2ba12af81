"""Offline replay: run a policy chain over a finished log exactly as the daemon runs it live."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from .config import Settings
from .engine import RunEngine
from .policy import UnseenNames
from .readers import reader_for


class ReplayError(ValueError):
    """A log that cannot be replayed (missing, or no reader recognises it)."""


def open_reader(path: Path, readers: dict[str, type]):
    """An instance of the reader that owns ``path``; a clear error when none does."""
    if not path.is_file():
        raise ReplayError(f"{path}: no such file")
    cls = reader_for(path, readers)
    if cls is None:
        raise ReplayError(f"{path}: no reader recognises this file; installed readers: {', '.join(readers)}")
    return cls(path)


def replay_log(
    path: str | Path,
    settings: Settings,
    registry: dict[str, type],
    readers: dict[str, type],
    *,
    every_row: bool = False,
    on_warning: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the initial value, then one line per LR change (or per row with ``every_row``).
    ``on_warning``: told when a metric or unit the chain names is in no row of the log."""
    path = Path(path)
    reader = open_reader(path, readers)
    engine = RunEngine(settings.chain(registry), history=settings.history)
    name = str(path)
    yield _line(name, None, engine.lr, engine.scale, engine.chain.names, "initial")
    finishing = False
    unseen = UnseenNames(engine.chain)
    while True:
        records = reader.read()
        if unseen:
            unseen.see(records, reader.columns())
        for record in records:
            decisions = engine.feed(record, reader.columns())
            if every_row:
                last = decisions[-1] if decisions else None
                step = last.step if last else _counter(record, engine)
                yield _line(name, step, engine.lr, engine.scale,
                            last.policy if last else None, last.reason if last else None)
            else:
                for d in decisions:
                    yield _line(name, d.step, d.lr, d.scale, d.policy, d.reason)
        if not reader.more:
            if finishing:
                break
            reader.finish()  # a finished log: one more read takes a last line without its newline
            finishing = True
    if on_warning is not None:
        for message in unseen.warnings(finished=True):
            on_warning(f"{path}: {message}")


def _counter(record, engine: RunEngine) -> int | float | None:
    if record.step is not None:
        return record.step
    if record.epoch is not None:
        return int(record.epoch) if float(record.epoch).is_integer() else record.epoch
    return engine.state["rows"] - 1


def _line(log, step, lr, scale, policy, reason) -> dict[str, Any]:
    return {"log": log, "step": step, "lr": lr, "scale": scale, "policy": policy, "reason": reason}
