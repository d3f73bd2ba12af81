"""Start ``autolr watch`` from Python: for examples, notebooks and one-process setups.

    with autolr.spawn.watching("runs/", "--policy", "auto"):
        train()

The daemon runs as its own process (exactly the CLI); its output is relayed line by line
through ``echo``; the call returns once it is watching, and the daemon gets SIGTERM (state
flushed) when the block ends.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator


def say(text: str) -> None:
    """One write per line, so relayed daemon lines and the caller's lines never mix."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def start_watch(root: str | os.PathLike, *args: str, echo: Callable[[str], None] | None = say,
                prefix: str = "  [autolr watch] ", timeout: float = 60.0) -> subprocess.Popen:
    """Start ``autolr watch root *args``; return once it prints that it is watching."""
    cmd = [sys.executable, "-m", "autolr.cli", "watch", str(Path(root)), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    ready, watching_seen = threading.Event(), threading.Event()

    def relay() -> None:
        for line in proc.stdout:
            if echo is not None:
                echo(prefix + line.rstrip())
            if line.startswith("watching"):
                watching_seen.set()
                ready.set()
        ready.set()  # exited: do not wait any longer

    proc.relay = threading.Thread(target=relay, daemon=True)  # joined by stop_watch: no line lost
    proc.relay.start()
    if not ready.wait(timeout) or not watching_seen.is_set():
        stop_watch(proc)
        raise RuntimeError(f"autolr watch did not start (exit code {proc.returncode})")
    return proc


def stop_watch(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM (the daemon flushes its state), then SIGKILL if it does not exit in time.

    Returns after the daemon's last output lines have been relayed.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    relay = getattr(proc, "relay", None)
    if relay is not None:
        relay.join(timeout)


@contextlib.contextmanager
def watching(root: str | os.PathLike, *args: str, **kwargs) -> Iterator[subprocess.Popen]:
    """Run ``autolr watch root *args`` for the duration of the block."""
    proc = start_watch(root, *args, **kwargs)
    try:
        yield proc
    finally:
        stop_watch(proc)
