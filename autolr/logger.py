"""A tiny JSON Lines metrics writer for loops that log nothing yet: ``autolr.log(step, loss=...)``.

Each call writes one line ``{"step": 12, "loss": 0.53}`` with a single ``write`` on a file
opened ``O_APPEND`` and unbuffered, so the line is in the file (and visible to ``autolr watch``
and any other reader) when the call returns. Several processes may append to one file: each
line is one ``write``.

Values: numbers, strings, bools, None and nested dicts (autolr flattens them with ``/``).
Tensors and numpy values are converted with ``.item()`` when they hold one element, else
``.tolist()``.
NaN and infinities are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, so
every line is strict JSON (jq, JavaScript, Go); autolr's reader reads them back as numbers.

Where ``autolr.log`` writes: the file set by ``autolr.init(run_dir)`` (``run_dir/metrics.jsonl``);
without it ``$AUTOLR_RUN_DIR/metrics.jsonl`` when that variable is set; else
``./metrics.jsonl``. The file is opened on the first call. Use ``Logger(path)`` for several
files in one process.
"""
from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

DEFAULT_FILENAME = "metrics.jsonl"
ENV_RUN_DIR = "AUTOLR_RUN_DIR"


def _default(obj: Any) -> Any:
    """JSON for values the encoder does not know: tensors, numpy scalars and arrays.

    A one-element tensor or array is written as its number, a larger one as a list.
    """
    try:
        return obj.item()  # 0-d or one-element tensors and arrays, numpy scalars
    except (AttributeError, TypeError, ValueError, RuntimeError):
        pass
    tolist = getattr(obj, "tolist", None)
    if tolist is not None:
        return tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"autolr.log: cannot write a value of type {type(obj).__name__}")


# One encoder, built once: json.dumps with keyword arguments would build one per call.
_STRICT = json.JSONEncoder(allow_nan=False, default=_default, separators=(",", ":"))


def _finite(obj: Any) -> Any:
    """``obj`` with non-finite floats as the strings NaN / Infinity / -Infinity (slow path)."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "NaN" if obj != obj else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if obj is None or isinstance(obj, (str, int)):
        return obj
    return _finite(_default(obj))


def encode(row: dict[str, Any]) -> str:
    """One strict-JSON line (with its newline) for ``row``."""
    try:
        return _STRICT.encode(row) + "\n"
    except ValueError:  # a NaN or an infinity somewhere: rare, so checked only on failure
        return _STRICT.encode(_finite(row)) + "\n"


class Logger:
    """Appends one JSON line per call to ``path``; ``Logger(path)(step, loss=0.5)``.

    The folder is created if needed. Usable as a context manager; ``close()`` releases the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                                       0o644)

    def __call__(self, step: Any, **metrics: Any) -> None:
        """Write ``{"step": step, **metrics}`` as one line; it is in the file on return."""
        data = encode({"step": step, **metrics}).encode()
        fd = self._fd
        if fd is None:
            raise ValueError(f"autolr.Logger({str(self.path)!r}) is closed")
        written = os.write(fd, data)
        while written < len(data):  # a short write (signal, full disk): finish the line
            written += os.write(fd, data[written:])

    log = __call__

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"autolr.Logger({str(self.path)!r})"


_lock = threading.Lock()
_default_logger: Logger | None = None


def init(run_dir: str | os.PathLike, filename: str = DEFAULT_FILENAME) -> Logger:
    """Make ``autolr.log`` write to ``run_dir/filename`` (the folder is created); return the Logger."""
    global _default_logger
    logger = Logger(Path(run_dir) / filename)
    with _lock:
        old, _default_logger = _default_logger, logger
    if old is not None:
        old.close()
    return logger


def default_path() -> Path:
    """Where ``autolr.log`` writes without ``init``: ``$AUTOLR_RUN_DIR/metrics.jsonl`` or ``./metrics.jsonl``."""
    run_dir = os.environ.get(ENV_RUN_DIR)
    return Path(run_dir) / DEFAULT_FILENAME if run_dir else Path(DEFAULT_FILENAME)


def log(step: Any, **metrics: Any) -> None:
    """Append ``{"step": step, **metrics}`` to the run's metrics file, flushed on return.

    The file: the one ``autolr.init`` set, else ``$AUTOLR_RUN_DIR/metrics.jsonl``, else
    ``./metrics.jsonl`` (opened on the first call). In data-parallel jobs call it on one rank.
    """
    global _default_logger
    logger = _default_logger
    if logger is None:
        with _lock:
            if _default_logger is None:
                _default_logger = Logger(default_path())
            logger = _default_logger
    logger(step, **metrics)
