"""Log readers. Each is a plugin registered through ``register_readers``."""
from __future__ import annotations

from pathlib import Path

#: autolr's own files in a run folder; never read as logs.
#: Files of autolr's own, never read as logs; ``autolr.daemon.log`` is the name to give the
#: daemon's output when it goes into the watched tree (``autolr demo`` does).
OWN_FILES = frozenset({"autolr.json", "autolr.decisions.jsonl", "autolr.state.json", "autolr.lock", "autolr.toml",
                       "autolr.daemon.log"})

#: Where a framework callback notes the step each fit starts at (``{"step": s}``, the last step
#: done): read beside the run's own log of any kind (see ``FitStartReader``).
FIT_START_FILE = "autolr-fit.jsonl"


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
