"""JSON Lines logs: one object per line, free-form keys, numbers possibly as strings.

Nested objects are flattened with ``/`` (``{"train": {"loss": 1}}`` gives ``train/loss``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..hookspecs import hookimpl
from ..records import Record, split_counters
from .base import Reader, TextTailer


def numeric_items(obj: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric values of a JSON object (numeric strings included), flattened with ``/``."""
    out: dict[str, float] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float):
            out[name] = value
        elif isinstance(value, int):
            try:
                out[name] = float(value)
            except OverflowError:  # an integer beyond float range, as float("1e999") would be
                out[name] = math.inf if value > 0 else -math.inf
        elif isinstance(value, str):
            try:
                out[name] = float(value)
            except ValueError:
                pass
        elif isinstance(value, dict):
            out.update(numeric_items(value, name + "/"))
    return out


class JsonlReader(Reader):
    name = "jsonl"

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.tailer = TextTailer(self.path, self)

    @classmethod
    def matches(cls, path: Path) -> bool:
        return path.suffix.lower() in (".jsonl", ".ndjson")

    def get_state(self) -> dict[str, Any]:
        return {"tail": self.tailer.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.tailer.set_state(state.get("tail", {}))

    def read(self) -> list[Record]:
        self.restarted = False
        out: list[Record] = []
        for line in self.tailer.read_lines():
            record = self.parse(line)
            if record is not None:
                out.append(record)
        return out

    def parse(self, line: bytes) -> Record | None:
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:
            self.skip("invalid JSON line", str(exc)[:80])
            return None
        if not isinstance(obj, dict):
            self.skip("JSON line that is not an object")
            return None
        return split_counters(numeric_items(obj))


@hookimpl
def register_readers(register) -> None:
    register(JsonlReader)
