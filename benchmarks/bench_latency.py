"""Reaction latency of ``autolr watch``: from a log line written to the control file updated.

The real daemon runs as a subprocess on one run folder whose ``metrics.jsonl`` already holds
``--prefill`` rows (so the journal and the saved state have their steady-state size), with
``--policy step:step_size=1,gamma=0.999 --base-lr 0.1``: every row is a decision. The
benchmark then appends one row at a time with ``os.write`` on an ``O_APPEND`` descriptor (the
line is in the page cache when ``write`` returns, as after a training loop's ``flush``) and
times from ``write`` returning to seeing a control file whose ``step`` is that row's, detected
with inotify (``IN_MOVED_TO`` of ``autolr.json``; ``--detect stat`` spins on ``os.stat``
instead). The next row is written after a random pause once the previous one was seen (or
timed out), so writes are not phase-locked to a polling daemon.

Configurations: inotify and ``--poll 0.05``, each with fsync (default) and ``--no-fsync``;
``--poll 1`` (median only, few rows). Baselines measured in the same run, in-process: one
``ControlWriter.publish`` (journal append + atomic control-file replace), and one
``Run.feed`` of a single row (parse, policy, publish, state save: all the daemon does for a
row except the file-system event), each with fsync on and off.

Usage::

    python benchmarks/bench_latency.py                  # ~3 min
    python benchmarks/bench_latency.py --rows 100 --quick-poll1 5 --skip-poll-fsync   # ~1 min
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (IN_MOVED_TO, Daemon, Inotify, PySpy, cpu_seconds, daemon_cmd, machine_line, md_table,  # noqa: E402
                     median, percentile, read_control)

POLICY = "step:step_size=1,gamma=0.999"
BASE_LR = 0.1
TARGET_P99_MS = 20.0


def row_bytes(step: int) -> bytes:
    return (json.dumps({"step": step, "loss": round(1.0 / (1 + step) + 0.01, 6)}) + "\n").encode()


def prefill(log: Path, n: int) -> None:
    with open(log, "wb") as f:
        f.write(b"".join(row_bytes(i) for i in range(n)))


# ---- the daemon, live ------------------------------------------------------------------------

def measure_daemon(tmp: Path, name: str, daemon_args: list[str], *, rows: int, prefill_rows: int,
                   pause: tuple[float, float], timeout: float, detect: str, cmd: list[str] | None,
                   idle: float, profile: bool = False) -> dict:
    root = tmp / name
    run = root / "run"
    run.mkdir(parents=True)
    log = run / "metrics.jsonl"
    ctrl = run / "autolr.json"
    prefill(log, prefill_rows)
    daemon = Daemon(root, ["--policy", POLICY, "--base-lr", str(BASE_LR), *daemon_args], tmp / f"{name}.out", cmd)
    lat: list[float] = []
    missed = 0
    try:
        daemon.start()
        daemon.wait_for("caught up", timeout=120)
        # The catch-up's last decision is the prefill's last row.
        t_end = time.monotonic() + 30
        while (read_control(ctrl) or {}).get("step") != prefill_rows - 1:
            if time.monotonic() > t_end:
                raise TimeoutError(f"{name}: control file never reached the prefill's last step")
            time.sleep(0.01)
        time.sleep(0.5)  # let the post-catch-up flush and events settle
        c0, w0 = cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(idle)  # nothing written: what the daemon costs at rest
        idle_pct = 100 * (cpu_seconds(daemon.pid) - c0) / (time.monotonic() - w0)
        watcher = Inotify(run, IN_MOVED_TO) if detect == "inotify" else None
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        spy = PySpy(daemon.pid, tmp / f"{name}.pyspy", native=True) if profile else None
        cpu0 = cpu_seconds(daemon.pid)
        wall0 = time.monotonic()
        try:
            for i in range(rows):
                time.sleep(random.uniform(*pause))
                if watcher:
                    watcher.drain()
                step = prefill_rows + i
                line = row_bytes(step)
                os.write(fd, line)
                t0 = time.perf_counter()
                deadline = t0 + timeout
                seen = None
                if watcher:
                    while seen is None:
                        left = deadline - time.perf_counter()
                        if left <= 0:
                            break
                        names = watcher.wait(left)
                        t1 = time.perf_counter()
                        if b"autolr.json" in names and (read_control(ctrl) or {}).get("step") == step:
                            seen = t1
                else:  # spin on os.stat
                    key = None
                    while time.perf_counter() < deadline:
                        try:
                            st = os.stat(ctrl)
                        except FileNotFoundError:
                            continue
                        k = (st.st_ino, st.st_mtime_ns, st.st_size)
                        if k != key:
                            t1 = time.perf_counter()
                            key = k
                            if (read_control(ctrl) or {}).get("step") == step:
                                seen = t1
                                break
                if seen is None:
                    missed += 1
                else:
                    lat.append((seen - t0) * 1e3)
        finally:
            os.close(fd)
            if watcher:
                watcher.close()
        cpu = cpu_seconds(daemon.pid) - cpu0
        wall = time.monotonic() - wall0
        prof = None
        if spy:
            spy.stop()
            prof = spy.top(15, strip=str(Path(__file__).resolve().parent.parent) + "/")
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {"name": name, "lat": lat, "missed": missed, "rows": rows,
            "cpu_ms_per_row": 1e3 * cpu / rows, "cpu_pct": 100 * cpu / wall, "idle_pct": idle_pct,
            "profile": prof}


# ---- in-process baselines --------------------------------------------------------------------

def baseline_publish(tmp: Path, fsync: bool, n: int, prefill_n: int) -> list[float]:
    from autolr.control import ControlWriter

    run = tmp / f"publish-{fsync}"
    ControlWriter(run, fsync=False).publish_many([  # a journal of steady-state size
        {"scale": 0.5, "lr": 0.05, "step": i, "policy": "step", "reason": "prefill",
         "evidence": {"factor": 0.5}} for i in range(prefill_n)])
    writer = ControlWriter(run, fsync=fsync)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        writer.publish(scale=0.5, lr=0.05, step=prefill_n + i, policy="step",
                       reason="step: factor 0.999 -> 0.998 after step 1", evidence={"factor": 0.998})
        times.append((time.perf_counter() - t0) * 1e3)
    shutil.rmtree(run, ignore_errors=True)
    return times


def baseline_replace(tmp: Path, fsync: bool, n: int) -> list[float]:
    """The file-system floor: write a 200-byte temp file (fsync or not), ``os.replace`` it over the target."""
    folder = tmp / f"replace-{fsync}"
    folder.mkdir()
    target = folder / "target.json"
    target.write_bytes(b"{}")
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        tmpf = folder / f".tmp{i}"
        fd = os.open(tmpf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"x" * 200)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        os.replace(tmpf, target)
        times.append((time.perf_counter() - t0) * 1e3)
    shutil.rmtree(folder, ignore_errors=True)
    return times


def baseline_feed(tmp: Path, fsync: bool, n: int, prefill_n: int) -> list[float]:
    """One appended row through reader + Run.feed (policy, publish, state save), in-process."""
    from autolr.config import Settings, parse_policy_options
    from autolr.plugins import policy_classes
    from autolr.readers.jsonl import JsonlReader
    from autolr.run import Run

    folder = tmp / f"feed-{fsync}"
    folder.mkdir()
    log = folder / "metrics.jsonl"
    prefill(log, prefill_n)
    settings = Settings(policies=parse_policy_options([POLICY]), base_lr=BASE_LR)
    run = Run(folder, settings, policy_classes(), fsync=fsync)
    run.load()
    run.start()
    reader = JsonlReader(log)
    run.add_source(reader)
    while True:
        records = reader.read()
        if records:
            run.feed(reader, records)
        if not reader.more:
            break
    times = []
    with open(log, "ab", buffering=0) as f:
        for i in range(n):
            f.write(row_bytes(prefill_n + i))
            t0 = time.perf_counter()
            records = reader.read()
            run.feed(reader, records)
            times.append((time.perf_counter() - t0) * 1e3)
    assert run.last_step == prefill_n + n - 1
    shutil.rmtree(folder, ignore_errors=True)
    return times


def filesystem(path: Path) -> str:
    """The mount's type and device holding ``path`` (from /proc/mounts)."""
    best = ("", "?", "?")
    try:
        real = os.path.realpath(path)
        for line in open("/proc/mounts"):
            dev, mnt, typ = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, typ, dev)
    except OSError:
        pass
    return f"{best[1]} ({best[2]} at {best[0]})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300, help="rows timed per configuration")
    ap.add_argument("--prefill", type=int, default=2000, help="rows in the log before the daemon starts")
    ap.add_argument("--pause", type=float, nargs=2, default=(0.02, 0.05), metavar=("MIN", "MAX"),
                    help="random pause between rows, seconds")
    ap.add_argument("--timeout", type=float, default=3.0, help="seconds before a row counts as missed")
    ap.add_argument("--detect", choices=("inotify", "stat"), default="inotify",
                    help="how the benchmark sees the control file change")
    ap.add_argument("--quick-poll1", type=int, default=10, metavar="N",
                    help="rows for --poll 1 (median only; 0 skips it)")
    ap.add_argument("--skip-poll-fsync", action="store_true", help="skip --poll 0.05 with fsync")
    ap.add_argument("--configs", default="inotify-fsync,inotify-nofsync,poll-fsync,poll-nofsync,poll1",
                    help="comma-separated subset of the daemon configurations")
    ap.add_argument("--baseline-n", type=int, default=100,
                    help="in-process calls per baseline, measured next to each configuration")
    ap.add_argument("--idle", type=float, default=2.0, help="seconds of daemon CPU measured before any write")
    ap.add_argument("--dir", help="where the temporary run folders go (its file system is measured); default $TMPDIR")
    ap.add_argument("--daemon-cmd", help="command prefix instead of 'python -m autolr.cli' (to compare a build)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the daemon during the rows of the inotify configurations (pip install py-spy)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    random.seed(args.seed)

    poll_pause = (args.pause[0], args.pause[1] + 0.05)
    all_configs = {  # key: (label, daemon args, rows, pause)
        "inotify-fsync": ("inotify, fsync (default)", [], args.rows, tuple(args.pause)),
        "inotify-nofsync": ("inotify, --no-fsync", ["--no-fsync"], args.rows, tuple(args.pause)),
        "poll-fsync": ("--poll 0.05, fsync", ["--poll", "0.05"], args.rows, poll_pause),
        "poll-nofsync": ("--poll 0.05, --no-fsync", ["--poll", "0.05", "--no-fsync"], args.rows, poll_pause),
        "poll1": ("--poll 1, --no-fsync", ["--poll", "1", "--no-fsync"], args.quick_poll1, (0.05, 1.05)),
    }
    keys = [k.strip() for k in args.configs.split(",") if k.strip()]
    if args.skip_poll_fsync and "poll-fsync" in keys:
        keys.remove("poll-fsync")
    if not args.quick_poll1 and "poll1" in keys:
        keys.remove("poll1")
    unknown = set(keys) - set(all_configs)
    if unknown:
        ap.error(f"unknown --configs {sorted(unknown)}; valid: {', '.join(all_configs)}")
    configs = [all_configs[k] for k in keys]

    results = []
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="autolr-bench-latency-", dir=args.dir))
    fs = filesystem(tmp)
    try:
        base: dict[tuple[str, bool], list[float]] = {(k, f): [] for k in ("replace", "publish", "feed")
                                                      for f in (True, False)}
        for idx, (label, dargs, rows, pause) in enumerate(configs):
            t0 = time.monotonic()
            # Baselines adjacent to each configuration (the disk's speed drifts on a shared machine).
            fsync = "--no-fsync" not in dargs
            adjacent = {}
            for kind, fn in (("replace", lambda: baseline_replace(tmp, fsync, args.baseline_n)),
                             ("publish", lambda: baseline_publish(tmp, fsync, args.baseline_n, args.prefill)),
                             ("feed", lambda: baseline_feed(tmp, fsync, args.baseline_n, args.prefill))):
                xs = fn()
                base[(kind, fsync)] += xs
                adjacent[kind] = median(xs)
            res = measure_daemon(tmp, f"c{idx}", dargs, rows=rows, prefill_rows=args.prefill, pause=pause,
                                 timeout=max(args.timeout, 3.0 if "poll 1" not in label else 5.0), detect=args.detect,
                                 cmd=daemon_cmd(args.daemon_cmd), idle=args.idle,
                                 profile=args.profile and label.startswith("inotify"))
            res["label"] = label
            res["adjacent"] = adjacent
            results.append(res)
            print(f"  {label}: {len(res['lat'])}/{rows} rows seen, median {median(res['lat']):.2f} ms "
                  f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{machine_line()}; load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end. Policy `{POLICY}` (a decision per row), {args.prefill} rows prefilled, "
          f"pause {args.pause[0] * 1e3:.0f}-{args.pause[1] * 1e3:.0f} ms between rows (+ the poll interval "
          f"for polling modes), detection: {args.detect}; run folders on {fs}"
          + (f"; daemon: `{args.daemon_cmd}`" if args.daemon_cmd else "") + ".\n")
    rows_out = []
    for r in results:
        lat = r["lat"]
        is_poll1 = "poll 1" in r["label"]
        p99 = "" if is_poll1 else f"{percentile(lat, 99):.2f}"
        p90 = "" if is_poll1 else f"{percentile(lat, 90):.2f}"
        adj = r["adjacent"]
        rows_out.append([r["label"], f"{len(lat)}/{r['rows']}", f"{median(lat):.2f}", p90, p99,
                         f"{max(lat):.1f}" if lat and not is_poll1 else "",
                         f"{adj['publish']:.2f} ms / {adj['feed']:.2f} ms",
                         f"{median(lat) / adj['publish']:.1f}x",
                         f"{r['cpu_ms_per_row']:.2f}", f"{r['idle_pct']:.0f} %"])
    print("**Reaction latency** (write() returned -> control file with that row's step seen), ms:\n")
    print(md_table(["daemon", "rows seen", "median", "p90", "p99", "max",
                    "adjacent baselines: publish / feed (median)", "median / publish",
                    "daemon CPU ms per row", "daemon CPU at rest"], rows_out))
    print()
    print("**Baselines, same run, in-process** (ms per call, pooled over the runs next to each "
          "configuration):\n")
    brows = []
    for kind, label in (("replace", "bare 200-byte temp file + `os.replace` over an existing file (file-system floor)"),
                        ("publish", "`ControlWriter.publish` (journal append + atomic control replace)"),
                        ("feed", "one row through `JsonlReader.read` + `Run.feed` (policy, publish, state save)")):
        for fsync in (True, False):
            xs = base[(kind, fsync)]
            brows.append([label, "on" if fsync else "off", f"{median(xs):.3f}", f"{percentile(xs, 99):.3f}"])
    print(md_table(["operation", "fsync", "median", "p99"], brows))
    ino = [r for r in results if r["label"].startswith("inotify")]
    print()
    for r in ino:
        p99 = percentile(r["lat"], 99)
        verdict = "met" if p99 < TARGET_P99_MS and not r["missed"] else "MISSED"
        print(f"- Target p99 < {TARGET_P99_MS:.0f} ms with inotify, {r['label']}: p99 {p99:.2f} ms -> {verdict}")
    for r in results:
        if r.get("profile"):
            print(f"\npy-spy of the daemon while rows were written, {r['label']} (main thread, Python "
                  f"and native frames, idle excluded; sampling slows the daemon, so the latencies of a "
                  f"--profile run are not the figures to quote):\n\n```\n{r['profile']}\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
