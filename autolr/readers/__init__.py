"""Log readers. Each is a plugin registered through ``register_readers``."""
from __future__ import annotations

from pathlib import Path

#: autolr's own files in a run folder; never read as logs.
OWN_FILES = frozenset({"autolr.json", "autolr.decisions.jsonl", "autolr.state.json", "autolr.lock", "autolr.toml"})


def is_own_file(path: Path) -> bool:
    name = path.name
    return name in OWN_FILES or name.startswith(".autolr")


def reader_for(path: Path, readers: dict[str, type]):
    """The registered reader class that owns ``path`` (highest ``priority`` first), or None."""
    if is_own_file(path):
        return None
    for cls in sorted(readers.values(), key=lambda c: -getattr(c, "priority", 0)):
        try:
            if cls.matches(path):
                return cls
        except OSError:
            continue
    return None
