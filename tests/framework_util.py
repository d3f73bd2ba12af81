"""Helpers for the framework integration tests: the real daemon, and the applied-LR check."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

from autolr.control import read_journal

#: Every test daemon: a decision every STEP_SIZE logged steps, applied MARGIN steps after the
#: last step it has read (apply_at_step), so the step a change lands at is known in advance.
STEP_SIZE = 25
MARGIN = 12
POLICY = ["--no-fsync", "--policy", f"step:step_size={STEP_SIZE},gamma=0.5", "--apply-margin", str(MARGIN)]


def start_daemon(root: Path, *args: str) -> subprocess.Popen:
    out = open(root.parent / "daemon.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "autolr.cli", "watch", str(root), *(args or POLICY)],
                            stdout=out, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out.close()
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def daemon(root: Path, *args: str) -> Iterator[subprocess.Popen]:
    """The daemon on ``root``, up and watching: a probe run under it has got its control file.

    Training starts only then, so a slow daemon start on a loaded machine cannot leave the
    whole run unwatched; the run folders the frameworks create afterwards are found live.
    """
    probe = root / "_ready"
    probe.mkdir(parents=True, exist_ok=True)
    (probe / "m.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    proc = start_daemon(root, *args)
    try:
        wait_until(lambda: (probe / "autolr.json").exists() or proc.poll() is not None, 60, "the daemon to start")
        assert proc.poll() is None, daemon_log(root)
        yield proc
    finally:
        stop(proc)


def wait_until(cond, timeout: float = 30.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def wait_control(run: Path, timeout: float = 30.0) -> None:
    wait_until(lambda: (run / "autolr.json").exists(), timeout, f"the control file in {run}")


def daemon_log(root: Path) -> str:
    with contextlib.suppress(OSError):
        return (root.parent / "daemon.log").read_text()
    return ""


@contextlib.contextmanager
def late_warnings() -> Iterator[list]:
    """Record autolr's 'change was due at step N but reached this process later' warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        late: list[str] = []
        yield late
        late.extend(str(w.message) for w in caught if "was due at step" in str(w.message))


def in_force(journal: list[dict], step: int) -> dict:
    """The journal entry in force at optimizer ``step`` under apply_at_step (the initial one first)."""
    chosen = journal[0]
    for entry in journal:
        at = entry.get("apply_at_step")
        if at is None or at <= step:
            chosen = entry
    return chosen


def check_applied(run: Path, applied: dict[int, float], user_lr: dict[int, float], *,
                  late: list[str], rel: float = 1e-6, min_changes: int = 3) -> list[dict]:
    """Assert the LR applied at each step = the user's LR × the scale the journal puts in force.

    ``applied`` and ``user_lr`` map optimizer steps to LRs. A change the daemon published too
    late for its ``apply_at_step`` (a loaded machine) may land later; the client then warns,
    and only then are such steps allowed to use the entry in force before it (never a later
    one). Returns the journal.
    """
    journal = read_journal(run)
    assert journal and journal[0]["kind"] == "initial", journal[:1]
    assert [e["seq"] for e in journal] == list(range(1, len(journal) + 1))
    scales = [e["scale"] for e in journal]
    mismatched = []
    for step in sorted(applied):
        entry = in_force(journal, step)
        want = user_lr[step] * entry["scale"]
        if abs(applied[step] - want) <= rel * abs(want):
            continue
        # Only a late change may explain a difference: the step used an earlier entry's scale.
        earlier = [e for e in journal if e["seq"] < entry["seq"]
                   and abs(applied[step] - user_lr[step] * e["scale"]) <= rel * abs(want)]
        assert earlier and late, (f"step {step}: applied {applied[step]!r}, want {want!r} "
                                  f"(user {user_lr[step]!r} x scale {entry['scale']} of #{entry['seq']}); "
                                  f"journal scales {scales}; late warnings {late}")
        mismatched.append(step)
    last = max(applied)
    landed = [e for e in journal[1:] if e.get("apply_at_step") is not None and e["apply_at_step"] <= last]
    assert len(landed) >= min_changes, f"only {len(landed)} changes landed during training: {journal}"
    ratios = {round(applied[s] / user_lr[s], 9) for s in applied}
    assert len(ratios) >= min_changes + 1, ratios
    assert len(mismatched) <= len(applied) // 4, f"too many late steps: {mismatched}"
    return journal


def journal_summary(run: Path) -> str:
    return json.dumps([{k: e.get(k) for k in ("seq", "kind", "step", "scale", "apply_at_step")}
                       for e in read_journal(run)])


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Tiny models run fastest on one intra-op thread; several spin badly on a loaded machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
