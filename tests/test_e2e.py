"""End to end: the real ``autolr watch`` subprocess next to real training loops."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from autolr import Control
from autolr.control import read_journal

from .conftest import run_cli


def start_daemon(root: Path, *args: str, log_name: str = "daemon.log") -> subprocess.Popen:
    out = open(root.parent / log_name, "a")
    proc = subprocess.Popen([sys.executable, "-m", "autolr.cli", "watch", str(root), *args],
                            stdout=out, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out.close()
    return proc


def wait_until(cond, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def train_linear_regression(run: Path, steps: int, base_lr: float, seed: int = 0, sleep: float = 0.004):
    """Minibatch SGD on noisy linear regression; LR read from the control file every step."""
    rng = np.random.default_rng(seed)
    dim = 20
    w_true = rng.normal(size=dim)
    x_val = rng.normal(size=(1000, dim))
    y_val = x_val @ w_true + rng.normal(size=1000)
    w = np.zeros(dim)
    ctl = Control(run)
    applied = []
    with open(run / "metrics.jsonl", "a", buffering=1) as log:
        for step in range(steps):
            rec = ctl.record()  # one refresh: lr and seq from the same file version
            lr = base_lr if rec is None else (rec["lr"] if rec["lr"] is not None else base_lr * rec["scale"])
            applied.append((step, lr, rec["seq"] if rec else 0))
            x = rng.normal(size=(32, dim))
            y = x @ w_true + rng.normal(size=32)
            err = x @ w - y
            w -= lr * x.T @ err / 32
            row = {"step": step, "loss": float(np.mean(err**2) / 2)}
            if step % 20 == 19:
                row["val_loss"] = float(np.mean((x_val @ w - y_val) ** 2) / 2)
            log.write(json.dumps(row) + "\n")
            time.sleep(sleep)
    return applied


def test_live_training_loop_follows_the_daemon(tmp_path):
    root = tmp_path / "runs"
    run = root / "exp1"
    run.mkdir(parents=True)
    (root / "autolr.toml").write_text(
        'base_lr = 0.1\npolicy = ["warmup:steps=50,start_factor=0.1", "plateau:method=threshold,patience=2,factor=0.5,threshold=0.01"]\n')
    (run / "metrics.jsonl").touch()
    daemon = start_daemon(root)
    try:
        wait_until(lambda: (run / "autolr.json").exists(), what="the initial control file")
        assert json.loads((run / "autolr.json").read_text())["lr"] == pytest.approx(0.01)
        applied = train_linear_regression(run, steps=600, base_lr=0.1)
        wait_until(lambda: json.loads((run / "autolr.json").read_text())["step"] is not None
                   and len(read_journal(run)) > 3, what="decisions")
    finally:
        stop(daemon)
    journal = read_journal(run)
    plateau = [e for e in journal if e["policy"] == "plateau"]
    assert plateau, "the LR never fell after the loss plateaued"
    assert all("val_loss" in e["reason"] for e in plateau)
    # Every LR the loop applied is exactly the journal's LR for the seq it saw.
    by_seq = {e["seq"]: e["lr"] for e in journal}
    assert all(lr == by_seq[seq] for _, lr, seq in applied if seq)
    assert any(seq >= plateau[0]["seq"] for _, _, seq in applied)
    assert applied[-1][1] < 0.1 and 0.1 in [lr for _, lr, _ in applied]  # warmup over, then cut
    status = json.loads(run_cli("status", str(root), "--json").stdout)
    control = json.loads((run / "autolr.json").read_text())
    assert len(status) == 1
    assert status[0]["lr"] == control["lr"] and status[0]["seq"] == control["seq"]
    assert status[0]["last_decision"]["seq"] == journal[-1]["seq"]
    assert status[0]["step"] == 599


def test_new_runs_are_picked_up_and_manual_override_is_adopted(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    daemon = start_daemon(root, "--policy", "step:step_size=10,gamma=0.5", "--base-lr", "1.0")
    try:
        time.sleep(0.5)
        run = root / "late" / "v0"
        run.mkdir(parents=True)
        with open(run / "m.jsonl", "w") as f:
            f.write("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(5)))
        wait_until(lambda: (run / "autolr.json").exists(), what="the new run's control file")
        run_cli("set", str(run), "--lr", "0.3")
        with open(run / "m.jsonl", "a") as f:
            f.write("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(5, 12)))
        wait_until(lambda: json.loads((run / "autolr.json").read_text())["policy"] == "step",
                   what="the step decision after the override")
    finally:
        stop(daemon)
    control = json.loads((run / "autolr.json").read_text())
    assert control["lr"] == pytest.approx(0.15)  # continued from the manual 0.3, x0.5 at t=10
    kinds = [e["kind"] for e in read_journal(run)]
    assert kinds == ["initial", "manual", "decision"]


def writer_thread(path: Path, rows: list[dict], stop_at: threading.Event, rng: random.Random):
    def run():
        with open(path, "a", buffering=1) as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                time.sleep(rng.uniform(0.0, 0.006))
        stop_at.set()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def synthetic_rows(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    loss = 2.0 * np.exp(-np.arange(n) / 150) + 0.3 + 0.05 * rng.standard_normal(n)
    return [{"step": s, "loss": float(loss[s])} for s in range(n)]


POLICY = ["--policy", "step:step_size=60,gamma=0.9", "--policy", "plateau:method=threshold,patience=8,factor=0.5",
          "--base-lr", "0.1"]


def kill_and_restart(tmp_path: Path, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    root = tmp_path / "live"
    names = ["a", "b", "c"]
    data = {n: synthetic_rows(seed + i, 700) for i, n in enumerate(names)}
    for n in names:
        (root / n).mkdir(parents=True)
    done = {n: threading.Event() for n in names}
    threads = [writer_thread(root / n / "metrics.jsonl", data[n], done[n], random.Random(rng.random()))
               for n in names]
    kills = 0
    while kills < trials:
        daemon = start_daemon(root, *POLICY)
        time.sleep(rng.uniform(0.05, 0.5))
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        kills += 1
        for n in names:  # the control file parses after every kill
            ctl = root / n / "autolr.json"
            if ctl.exists():
                json.loads(ctl.read_text())
    for t in threads:
        t.join()
    run_cli("watch", str(root), "--once", *POLICY)
    # The same logs, processed by one uninterrupted daemon.
    clean = tmp_path / "clean"
    for n in names:
        (clean / n).mkdir(parents=True)
        shutil.copy(root / n / "metrics.jsonl", clean / n / "metrics.jsonl")
    run_cli("watch", str(clean), "--once", *POLICY)
    for n in names:
        journal = read_journal(root / n)
        assert [e["seq"] for e in journal] == list(range(1, len(journal) + 1)), "duplicate or lost seq"
        strip = lambda j: [(e["step"], round(e["scale"], 12), e["policy"], e["kind"]) for e in j]
        assert strip(journal) == strip(read_journal(clean / n))
        live, ref = (json.loads((d / n / "autolr.json").read_text()) for d in (root, clean))
        assert live["lr"] == pytest.approx(ref["lr"], rel=1e-12) and live["seq"] == ref["seq"]


def test_kill_9_and_restart_gives_the_uninterrupted_decisions(tmp_path):
    kill_and_restart(tmp_path, trials=8, seed=1)


@pytest.mark.soak
def test_kill_9_and_restart_soak(tmp_path):
    kill_and_restart(tmp_path, trials=50, seed=2)


def test_a_second_daemon_on_the_same_tree_is_refused(tmp_path):
    """Regression: nothing stopped a second ``autolr watch`` on a tree already watched (or on
    a folder inside it, above it, or the same through a symlink): every decision was journaled
    twice. It now exits with the first's pid.
    After a kill -9 of the first, a new daemon starts (the lock dies with its process)."""
    root = tmp_path / "logs"
    (root / "run").mkdir(parents=True)
    (root / "run" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(5)))
    first = start_daemon(root)
    try:
        wait_until(lambda: (root / "run" / "autolr.json").exists(), what="the first daemon's control file")
        for where in (root, root / "run"):
            second = run_cli("watch", str(where), "--once", check=False)
            assert second.returncode != 0 and f"pid {first.pid}" in second.stderr, second.stderr
        above = run_cli("watch", str(tmp_path), "--once", check=False)  # a folder above: refused too
        assert above.returncode != 0 and f"pid {first.pid}" in above.stderr and "inside" in above.stderr, above.stderr
        alias = tmp_path / "alias"  # the same folder through a symlink
        alias.symlink_to(root)
        second = run_cli("watch", str(alias), "--once", check=False)
        assert second.returncode != 0 and f"pid {first.pid}" in second.stderr, second.stderr
        journal = read_journal(root / "run")
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert run_cli("watch", str(root), "--once", check=False).returncode == 0
        assert read_journal(root / "run") == journal
    finally:
        stop(first)


def test_sighup_stops_the_daemon_with_its_state_saved(tmp_path):
    """Regression: SIGHUP (the terminal closed) killed the daemon without saving its state."""
    root = tmp_path / "logs"
    (root / "run").mkdir(parents=True)
    log = root / "run" / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(5)))
    proc = start_daemon(root)
    try:
        wait_until(lambda: (root / "run" / "autolr.json").exists(), what="the control file")
        with open(log, "a") as f:
            f.write("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(5, 9)))
        wait_until(lambda: json.loads((root / "run" / "autolr.json").read_text())["step"] == 8, what="step 8")
        proc.send_signal(signal.SIGHUP)  # before the periodic save (2 s after a change)
        assert proc.wait(timeout=15) == 0
    finally:
        stop(proc)
    assert json.loads((root / "run" / "autolr.state.json").read_text())["rows"] == 9
