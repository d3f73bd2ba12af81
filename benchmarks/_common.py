"""Shared helpers for the daemon benchmarks: a daemon subprocess, /proc sampling, inotify, tables.

Not a benchmark itself. Linux only (``/proc``, inotify through ctypes).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- statistics ------------------------------------------------------------------------------

def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of ``xs``; NaN when empty."""
    if not xs:
        return math.nan
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: Sequence[float]) -> float:
    return percentile(xs, 50)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A markdown table; ``align`` is one char per column, 'l' or 'r' (default: first l, rest r)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def machine_line() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"autolr {git_revision()}, Python {platform.python_version()}, {platform.system()} "
            f"{platform.release()}, {os.cpu_count()} CPUs ({cpu})")


def git_revision() -> str:
    """The autolr checkout's short commit, with "+dirty" when autolr/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "autolr"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (rev or "?") + ("+dirty" if dirty else "")


def inotify_limits() -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name in ("max_user_watches", "max_user_instances", "max_queued_events"):
        try:
            out[name] = int(Path(f"/proc/sys/fs/inotify/{name}").read_text())
        except (OSError, ValueError):
            out[name] = None
    return out


# ---- /proc sampling --------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """utime and stime of the main thread (the daemon's worker) and of all other threads."""
    out = {"main user": 0.0, "main sys": 0.0, "others user": 0.0, "others sys": 0.0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                data = f.read()
        except OSError:  # the thread ended
            continue
        fields = data[data.rindex(")") + 2:].split()
        who = "main" if tid == str(pid) else "others"
        out[f"{who} user"] += int(fields[11]) / CLK_TCK
        out[f"{who} sys"] += int(fields[12]) / CLK_TCK
    return out


def children_cpu_seconds(pid: int) -> float:
    """cutime + cstime: CPU of waited-for children (not used for live processes)."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[13]) + int(fields[14])) / CLK_TCK


def run_delay_seconds(pid: int) -> float:
    """Time the process's threads spent runnable but waiting for a CPU (schedstat), seconds.

    On a shared machine this shows when the daemon was starved rather than idle.
    """
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
    return total / 1e9


def mem_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


# ---- the daemon ------------------------------------------------------------------------------

def daemon_cmd(text: str | None) -> list[str] | None:
    """``--daemon-cmd`` (a shell-like string such as "python other/cli.py") to an argv prefix."""
    import shlex

    return shlex.split(text) if text else None


class Daemon:
    """``python -m autolr.cli watch ROOT ...`` as a subprocess; output goes to a log file.

    ``cmd`` replaces the ``python -m autolr.cli`` prefix (to compare another build).
    """

    def __init__(self, root: Path, args: Sequence[str], log_path: Path, cmd: Sequence[str] | None = None):
        self.cmd = list(cmd) if cmd else [sys.executable, "-m", "autolr.cli"]
        self.root = root
        self.args = list(args)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        self._log = open(self.log_path, "wb")
        cmd = [*self.cmd, "watch", str(self.root), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def wait_for(self, text: str, timeout: float) -> float:
        """Block until ``text`` appears in the daemon's output; return the seconds waited."""
        t0 = time.monotonic()
        while True:
            if text in self.output():
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}) before {text!r}:\n{self.output()[-3000:]}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"daemon did not print {text!r} within {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (state flush), then SIGKILL of the whole session if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(Exception):
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_control(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


# ---- inotify (for the benchmark's own side) ---------------------------------------------------

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
_EVENT = struct.Struct("iIII")


class Inotify:
    """A minimal inotify instance: ``add(folder)`` returns a watch descriptor; ``wait(timeout)``
    returns the names of the events, ``wait_events(timeout)`` (wd, name) pairs."""

    def __init__(self, folder: Path | None = None, mask: int = IN_MOVED_TO):
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self.mask = mask
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        if folder is not None:
            self.add(folder)

    def add(self, folder: Path) -> int:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), self.mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {folder}: {os.strerror(err)}")
        return wd

    def wait(self, timeout: float) -> list[bytes]:
        return [name for _, name in self.wait_events(timeout)]

    def wait_events(self, timeout: float) -> list[tuple[int, bytes]]:
        if not self.poller.poll(max(0, int(timeout * 1000))):
            return []
        return self.drain_events()

    def drain(self) -> list[bytes]:
        return [name for _, name in self.drain_events()]

    def drain_events(self) -> list[tuple[int, bytes]]:
        out = []
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            i = 0
            while i < len(buf):
                wd, _, _, n = _EVENT.unpack_from(buf, i)
                out.append((wd, buf[i + 16:i + 16 + n].rstrip(b"\0")))
                i += 16 + n

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


# ---- py-spy ----------------------------------------------------------------------------------

class PySpy:
    """``py-spy record`` of a running process until ``stop()``; ``top()`` summarises own and
    cumulative time per frame (idle frames excluded, as py-spy does by default)."""

    def __init__(self, pid: int, out: Path, rate: int = 200, native: bool = False):
        self.out = out
        exe = shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        argv = [exe, "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "-o", str(out), "--threads"]
        if native:
            argv.append("--native")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def top(self, n: int = 15, strip: str = "", thread: str | None = "MainThread") -> str:
        """Own and cumulative shares of the frames of ``thread`` (the daemon's worker by default)."""
        from collections import Counter

        own: Counter[str] = Counter()
        cum: Counter[str] = Counter()
        total = 0
        try:
            lines = self.out.read_text().splitlines()
        except OSError:
            return "(no py-spy output)"
        for line in lines:
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            names = [f for f in frames if f.startswith("thread (")]
            if thread and not any(f.endswith(f": {thread}") or f.endswith(f"{thread})") or thread in f for f in names):
                continue
            frames = [f.replace(strip, "") if strip else f for f in frames
                      if not f.startswith(("thread (", "process "))]
            if not frames:
                continue
            k = int(count)
            total += k
            own[frames[-1]] += k
            for f in {re.sub(r":\d+\)$", ")", f) for f in frames}:  # per function, not per line
                cum[f] += k
        if not total:
            return "(no samples)"
        clean = (lambda f: f)
        skip = ("Daemon.run ", "Daemon.drain ", "<module>", "watch (autolr/cli.py")
        rows = [f"{100 * v / total:5.1f}%  {clean(f)}" for f, v in own.most_common(n)]
        crow = [f"{100 * v / total:5.1f}%  {clean(f)}" for f, v in cum.most_common()
                if "autolr/" in f and not f.startswith(skip)][:n]
        return (f"{total} samples of {thread or 'all threads'} (py-spy's idle frames excluded)\n\nown time:\n"
                + "\n".join(rows) + "\n\ncumulative, autolr frames:\n" + "\n".join(crow))
