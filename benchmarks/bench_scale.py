"""CPU, memory and lag of one ``autolr watch`` daemon with many live runs.

For each configuration (``--runs`` counts x fsync on/off), ``N`` run folders each get a
``metrics.jsonl`` holding ``--prefill`` rows; the real daemon starts as a subprocess
(inotify, ``--policy step:step_size=1,gamma=0.9999 --base-lr 0.1``: a decision on every
row) and catches up. Then:

1. **idle** for ``--idle`` seconds: runs present, nothing written (baseline);
2. **write** for ``--duration`` seconds: ``--writers`` processes append ``{"step", "loss"}``
   rows round-robin over their share of the runs, ``--rate`` rows/s per run, in ticks of
   ``--tick`` seconds (cheap writers: one ``os.write`` per row, no sleep per row);
3. **drain**: after the writers stop, the time until every control file holds its run's last
   step.

Measured: daemon CPU (% of one core, utime+stime from ``/proc/<pid>/stat``) averaged over each
phase and over 1-s samples; RSS (``VmRSS``, and ``VmHWM`` as the peak) during and at the end;
**lag**: for ``--sample`` runs spread over the range, every row's time from its ``write``
returning (in the writer) to the control file first showing a step >= that row's, seen through
inotify in the benchmark process (``CLOCK_MONOTONIC`` is shared between processes). Baselines in
the same run: the writers' own CPU (from ``wait4``), and the idle daemon.

Usage::

    python benchmarks/bench_scale.py                                   # 100 and 1000 runs (~5 min)
    python benchmarks/bench_scale.py --runs 100 --duration 20 --idle 5 --fsync-runs ''   # ~1 min
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (IN_MOVED_TO, Daemon, Inotify, PySpy, cpu_seconds, daemon_cmd, inotify_limits,  # noqa: E402
                     machine_line, md_table, median, mem_kb, percentile, read_control, run_delay_seconds,
                     thread_cpu_seconds)

POLICY = "step:step_size=1,gamma=0.9999"
TARGET_CPU = 25.0  # % of one core, 1000 runs (issue 6)
TARGET_RSS = 100.0  # MB, 1000 runs
TARGET_LAG = 100.0  # ms, p99


# ---- writer process --------------------------------------------------------------------------

def _loss_curve(noise: float, seed: int = 0):
    """loss(step) = 1 / (1 + 0.01 · step) · (1 + noise · N(0, 1)): noiseless by default."""
    if not noise:
        return lambda step: 1.0 / (1.0 + 0.01 * step)
    gauss = random.Random(seed).gauss
    return lambda step: 1.0 / (1.0 + 0.01 * step) * (1.0 + noise * gauss(0.0, 1.0))


def writer_main(spec_path: str) -> int:
    """Append rows round-robin to the given logs; record write times of the sampled ones."""
    spec = json.loads(Path(spec_path).read_text())
    paths, sampled = spec["paths"], set(spec["sampled"])
    rate, tick, duration, start_step = spec["rate"], spec["tick"], spec["duration"], spec["start_step"]
    fds = [os.open(p, os.O_WRONLY | os.O_APPEND) for p in paths]
    n = len(fds)
    starts = [start_step + o for o in spec.get("offsets") or [0] * n]
    per_second = n * rate
    times: dict[int, list] = {i: [] for i in range(n) if i in sampled}
    written = 0
    t_start = time.monotonic()
    end = t_start + duration
    write, mono, sleep = os.write, time.monotonic, time.sleep
    loss = _loss_curve(spec.get("noise", 0.0), seed=spec.get("seed", 0))
    while True:
        now = mono()
        if now >= end:
            break
        due = int((now - t_start) * per_second) + 1  # rows that should be out by now
        while written < due:
            i = written % n
            step = starts[i] + written // n
            write(fds[i], b'{"step": %d, "loss": %.6f}\n' % (step, loss(step)))
            if i in times:
                times[i].append((step, mono()))
            written += 1
        sleep(max(0.0, min(tick, end - mono())))
    for fd in fds:
        os.close(fd)
    last = {i: starts[i] + (written - 1 - i) // n for i in range(min(n, written))}
    Path(spec["out"]).write_text(json.dumps({"times": {paths[i]: v for i, v in times.items()},
                                             "last": {paths[i]: s for i, s in last.items()},
                                             "written": written, "elapsed": mono() - t_start}))
    return 0


# ---- one configuration -----------------------------------------------------------------------

class Sampler:
    """Daemon CPU and memory, sampled about once a second."""

    def __init__(self, pid: int):
        self.pid = pid
        # (monotonic, cpu s, mem, run delay s, per-thread user/sys s)
        self.samples: list[tuple[float, float, dict, float, dict]] = []
        self.sample()

    def sample(self) -> None:
        self.samples.append((time.monotonic(), cpu_seconds(self.pid), mem_kb(self.pid), run_delay_seconds(self.pid),
                             thread_cpu_seconds(self.pid)))

    def since(self, k: int) -> dict:
        """Averages from sample k to the last."""
        s = self.samples[k:]
        t0, c0, _, d0, th0 = s[0]
        t1, c1, m1, d1, th1 = s[-1]
        per = [100 * (b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(s, s[1:]) if b[0] > a[0]]
        return {"cpu": 100 * (c1 - c0) / max(t1 - t0, 1e-9), "cpu_p90": percentile(per, 90),
                "rss": max(x[2]["VmRSS"] for x in s) / 1024, "hwm": m1["VmHWM"] / 1024,
                "rss_end": m1["VmRSS"] / 1024, "secs": t1 - t0,
                "waiting": 100 * (d1 - d0) / max(t1 - t0, 1e-9),
                "threads": {k: 100 * (th1[k] - th0[k]) / max(t1 - t0, 1e-9) for k in th1}}


def run_config(tmp: Path, n_runs: int, fsync: bool, args, cmd) -> dict:
    name = f"{n_runs}-{'fsync' if fsync else 'nofsync'}"
    root = tmp / name
    runs = [root / f"run{i:04d}" for i in range(n_runs)]
    for k, run in enumerate(runs):
        run.mkdir(parents=True)
        loss = _loss_curve(args.noise, seed=1000 + k)
        with open(run / "metrics.jsonl", "w") as f:
            f.write("".join(f'{{"step": {s}, "loss": {loss(s):.6f}}}\n' for s in range(args.prefill)))
    logs = [str(r / "metrics.jsonl") for r in runs]
    n_sample = min(args.sample, n_runs)
    sampled = sorted({i * n_runs // n_sample for i in range(n_sample)})
    daemon = Daemon(root, ["--policy", args.policy, "--base-lr", "0.1", *([] if fsync else ["--no-fsync"])],
                    tmp / f"{name}.out", cmd)
    writers: list[subprocess.Popen] = []
    watcher = Inotify(mask=IN_MOVED_TO)
    out: dict = {"name": name, "runs": n_runs, "fsync": fsync}
    try:
        t0 = time.monotonic()
        daemon.start()
        daemon.wait_for("caught up", timeout=600)
        out["startup"] = time.monotonic() - t0
        out["mode"] = "poll" if "(poll" in daemon.output() else "inotify"
        # every run has its initial decisions out: wait for the prefill's last step everywhere
        deadline = time.monotonic() + (120 if args.policy == POLICY else 0)
        pending = set(range(n_runs))
        while pending and time.monotonic() < deadline:
            pending = {i for i in pending if (read_control(runs[i] / "autolr.json") or {}).get("step") != args.prefill - 1}
            time.sleep(0.1)
        time.sleep(1.0)
        sampler = Sampler(daemon.pid)

        # 1. idle
        t_end = time.monotonic() + args.idle
        while time.monotonic() < t_end:
            time.sleep(min(1.0, max(0.0, t_end - time.monotonic())))
            sampler.sample()
        out["idle"] = sampler.since(0)

        # 2. write
        wd_run = {watcher.add(runs[i]): i for i in sampled}
        seen: dict[int, list[tuple[float, int]]] = {i: [] for i in sampled}
        n_writers = min(args.writers, n_runs)
        specs = []
        for w in range(n_writers):
            mine = list(range(w, n_runs, n_writers))
            # --phase spread: run i's steps start i*K/N later, so that its deciding rows (every
            # K-th step) are not those of every other run: independent runs are not in lockstep
            offsets = [i * args.decide_every // n_runs if args.phase == "spread" else 0 for i in mine]
            spec = {"paths": [logs[i] for i in mine], "sampled": [k for k, i in enumerate(mine) if i in seen],
                    "rate": args.rate, "tick": args.tick, "duration": args.duration,
                    "start_step": args.prefill, "offsets": offsets, "out": str(tmp / f"{name}-w{w}.json"),
                    "noise": args.noise, "seed": w}
            path = tmp / f"{name}-w{w}.spec.json"
            path.write_text(json.dumps(spec))
            specs.append(spec)
        k0 = len(sampler.samples) - 1
        spy = PySpy(daemon.pid, tmp / f"{name}.pyspy", rate=100) if args.profile else None
        for spec_i, spec in enumerate(specs):
            writers.append(subprocess.Popen([sys.executable, __file__, "--writer", str(tmp / f"{name}-w{spec_i}.spec.json")]))
        next_sample = time.monotonic() + 1.0
        writer_cpu = 0.0
        alive = list(writers)
        while alive:
            for wd, fname in watcher.wait_events(max(0.0, min(0.05, next_sample - time.monotonic()))):
                if fname == b"autolr.json" and wd in wd_run:
                    t = time.monotonic()
                    step = (read_control(runs[wd_run[wd]] / "autolr.json") or {}).get("step")
                    if isinstance(step, int):
                        seen[wd_run[wd]].append((t, step))
            if time.monotonic() >= next_sample:
                sampler.sample()
                next_sample += 1.0
            for p in list(alive):
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    p.returncode = os.waitstatus_to_exitcode(status)
                    writer_cpu += usage.ru_utime + usage.ru_stime
                    alive.remove(p)
        t_stop = time.monotonic()
        sampler.sample()
        out["write"] = sampler.since(k0)
        if spy is not None:
            spy.stop()
            out["profile"] = {t: spy.top(25, strip=str(Path(__file__).resolve().parents[1]) + "/", thread=t)
                              for t in ("MainThread", None)}
        results = [json.loads(Path(s["out"]).read_text()) for s in specs]
        written = sum(r["written"] for r in results)
        elapsed = max(r["elapsed"] for r in results)
        out["rows_written"] = written
        out["rows_per_s"] = written / elapsed
        out["writer_cpu"] = 100 * writer_cpu / elapsed

        # 3. drain: every control file at its run's last step
        last = {}
        write_times: dict[int, list] = {}
        for r in results:
            last.update(r["last"])
            for p, v in r["times"].items():
                write_times[logs.index(p)] = v
        behind = [p for p, s in last.items() if (read_control(Path(p).parent / "autolr.json") or {}).get("step") != s]
        if args.policy != POLICY:
            behind = []  # the control file's step follows decisions only
        out["behind_at_stop"] = len(behind)
        deadline = t_stop + args.drain_timeout
        while behind and time.monotonic() < deadline:
            for wd, fname in watcher.drain_events():
                if fname == b"autolr.json" and wd in wd_run:
                    t = time.monotonic()
                    step = (read_control(runs[wd_run[wd]] / "autolr.json") or {}).get("step")
                    if isinstance(step, int):
                        seen[wd_run[wd]].append((t, step))
            behind = [p for p in behind if (read_control(Path(p).parent / "autolr.json") or {}).get("step") != last[p]]
            if behind:
                time.sleep(0.05)
        out["drain"] = time.monotonic() - t_stop if not behind else None
        out["behind_after_drain"] = len(behind)
        for wd, fname in watcher.drain_events():  # late events of the sampled runs
            if fname == b"autolr.json" and wd in wd_run:
                step = (read_control(runs[wd_run[wd]] / "autolr.json") or {}).get("step")
                if isinstance(step, int):
                    seen[wd_run[wd]].append((time.monotonic(), step))
        sampler.sample()
        out["final"] = sampler.samples[-1][2]

        # lag per sampled row: first sighting of a step >= the row's. With a policy that decides
        # when the data say so (--policy other than the step schedules), only the rows that were
        # decided on have a lag: the others would count the wait for the next decision.
        exact = args.policy != POLICY and args.decide_every == 1
        lags, unseen = [], 0
        for i, writes in write_times.items():
            obs = seen.get(i, [])
            decided = {s for _, s in obs}
            j = 0
            for step, tw in writes:
                if (step + 1) % args.decide_every or (exact and step not in decided):
                    continue  # only the rows that make a decision have a lag
                while j < len(obs) and obs[j][1] < step:
                    j += 1
                if j < len(obs):
                    lags.append(1e3 * max(0.0, obs[j][0] - tw))
                else:
                    unseen += 1
        out["lags"] = lags
        out["unseen"] = unseen
    finally:
        for p in writers:
            if p.poll() is None:
                p.kill()
                p.wait()
        watcher.close()
        daemon.stop(timeout=60)
        shutil.rmtree(root, ignore_errors=True)
    return out


def engine_memory(policies: list[str], rows: int, engines: int = 10) -> dict[str, float]:
    """KiB per run held by ``RunEngine`` after ``rows`` rows (tracemalloc), per policy spec.

    The live phase is too short for a run's history to reach its bound (``history`` rows plus
    a checkpoint every 128); this gives the steady-state per-run cost to project from.
    """
    import tracemalloc

    from autolr.config import Settings, parse_policy_options
    from autolr.engine import RunEngine
    from autolr.plugins import policy_classes
    from autolr.records import Record

    registry = policy_classes()
    out = {}
    for spec in policies:
        settings = Settings(policies=parse_policy_options([spec]), base_lr=0.1)
        # One engine first, untraced: the modules a policy imports on first use (scipy for the
        # trend tests, ~15 MB) are the daemon's once, not a run's.
        warm = RunEngine(settings.chain(registry), history=settings.history)
        for i in range(min(rows, 500)):
            warm.feed(Record({"loss": 1.0 / (1 + 0.01 * i)}, i, None), ())
        del warm
        tracemalloc.start()
        keep = []
        for _ in range(engines):
            engine = RunEngine(settings.chain(registry), history=settings.history)
            for i in range(rows):
                engine.feed(Record({"loss": 1.0 / (1 + 0.01 * i)}, i, None), ())
            keep.append(engine)
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[spec] = current / engines / 1024
        del keep
    return out


def per_line_daemon(argv: list[str]) -> int:
    """The daemon with the JSONL reader's per-line path (``block_parsing = False``): a diagnostic
    that separates the reader's cost on small tail reads from the daemon's own."""
    from autolr.cli import main as cli_main
    from autolr.readers.jsonl import JsonlReader

    JsonlReader.block_parsing = False
    sys.argv = ["autolr", *argv]
    cli_main()
    return 0


def publish_cost(folders: int, writes: int, tmp: Path) -> dict[str, float]:
    """CPU µs per ``ControlWriter.publish`` (no fsync) and per bare atomic replace, round-robin
    over ``folders`` run folders: the kernel's share of a decision, which no Python change removes."""
    from autolr.control import ControlWriter, atomic_write_json

    root = Path(tempfile.mkdtemp(prefix="publish-", dir=tmp))
    dirs = [root / f"r{i:04d}" for i in range(folders)]
    writers = []
    for d in dirs:
        d.mkdir()
        writers.append(ControlWriter(d, fsync=False))
        writers[-1].publish(scale=1.0, lr=0.1, step=0, policy="step", reason="initial")
    out = {}
    for what in ("replace", "publish"):
        c0 = time.process_time()
        for k in range(writes):
            i = k % folders
            if what == "replace":
                atomic_write_json(dirs[i] / "x.json", {"seq": k, "scale": 0.5}, fsync=False)
            else:
                writers[i].publish(scale=0.9 ** (k % 50 + 1), lr=0.1, step=k + 1, policy="step", reason="r")
        out[what] = 1e6 * (time.process_time() - c0) / writes
    shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--writer":
        return writer_main(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "--per-line-daemon":
        return per_line_daemon(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="100,1000", help="comma-separated run counts (with --no-fsync)")
    ap.add_argument("--fsync-runs", default="100", help="run counts also measured with fsync (default daemon); '' for none")
    ap.add_argument("--rate", type=float, default=10.0, help="rows per second per run")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of writing")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle baseline")
    ap.add_argument("--writers", type=int, default=4, help="writer processes")
    ap.add_argument("--tick", type=float, default=0.01, help="writer tick, seconds")
    ap.add_argument("--sample", type=int, default=20, help="runs whose every row's lag is measured")
    ap.add_argument("--prefill", type=int, default=20, help="rows per log before the daemon starts")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="relative Gaussian noise on the written loss 1/(1 + 0.01·step) (with a statistical "
                         "policy such as auto: a noiseless decline never reaches its tests)")
    ap.add_argument("--drain-timeout", type=float, default=60.0)
    ap.add_argument("--steady-rows", type=int, default=3000,
                    help="rows fed in-process per engine for the steady-state memory projection (0 skips)")
    ap.add_argument("--publish-writes", type=int, default=3000,
                    help="in-process: CPU per publish / atomic replace over 1 and 1000 folders (0 skips)")
    ap.add_argument("--policy", default=POLICY,
                    help="daemon policy; lag needs a decision on every row (the default); with a policy that "
                         "rarely decides only CPU and memory are meaningful")
    ap.add_argument("--decide-every", type=int, default=1, metavar="K",
                    help="policy step:step_size=K,gamma=0.9999 (a decision every K rows of each run); the lag is "
                         "measured on the deciding rows: from the row's write to the control file showing it")
    ap.add_argument("--phase", choices=["spread", "locked"], default="spread",
                    help="with --decide-every K: spread (run i's steps start i*K/N later: the runs decide at "
                         "different moments, 10*N/K decisions a second evenly) or locked (every run at the same "
                         "step: all N decide within the same 1/rate seconds, the worst case)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the daemon during the write phase; print the top frames (worker, all threads)")
    ap.add_argument("--per-line-jsonl", action="store_true",
                    help="diagnostic: the daemon with JsonlReader.block_parsing = False (see per_line_daemon)")
    ap.add_argument("--dir", help="where the temporary run folders go; default $TMPDIR")
    ap.add_argument("--daemon-cmd", help="command prefix instead of 'python -m autolr.cli'")
    args = ap.parse_args()
    if args.decide_every > 1:
        args.policy = f"step:step_size={args.decide_every},gamma=0.9999"
    cmd = daemon_cmd(args.daemon_cmd)
    if args.per_line_jsonl:
        cmd = [*(cmd[:-2] if cmd and cmd[-2:] == ["-m", "autolr.cli"] else cmd or [sys.executable]),
               str(Path(__file__).resolve()), "--per-line-daemon"]
    configs = [(int(n), False) for n in args.runs.split(",") if n.strip()]
    configs += [(int(n), True) for n in args.fsync_runs.split(",") if n.strip()]
    configs.sort(key=lambda c: (c[0], not c[1]))
    limits = inotify_limits()
    load0 = os.getloadavg()

    results = []
    tmp = Path(tempfile.mkdtemp(prefix="autolr-bench-scale-", dir=args.dir))
    try:
        for n, fsync in configs:
            t0 = time.monotonic()
            r = run_config(tmp, n, fsync, args, cmd)
            results.append(r)
            print(f"  {r['name']}: write CPU {r['write']['cpu']:.0f} %, idle CPU {r['idle']['cpu']:.0f} %, "
                  f"p99 lag {percentile(r['lags'], 99):.0f} ms ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{machine_line()}; load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end. "
          f"inotify limits: max_user_watches {limits['max_user_watches']}, max_user_instances "
          f"{limits['max_user_instances']}, max_queued_events {limits['max_queued_events']}. Policy `{args.policy}`"
          f"{' (a decision per row)' if args.policy == POLICY else ''}"
          f"{f', runs {args.phase} in phase' if args.decide_every > 1 else ''}, {args.rate:g} rows/s per run for {args.duration:g} s from {args.writers} writer "
          f"processes, idle baseline {args.idle:g} s"
          + (f"; daemon: `{args.daemon_cmd}`" if args.daemon_cmd else "")
          + ("; JSONL reader's per-line path (`--per-line-jsonl`)" if args.per_line_jsonl else "") + ".\n")
    rows = []
    for r in results:
        w, i = r["write"], r["idle"]
        lags = r["lags"]
        rows.append([
            f"{r['runs']} runs, {'fsync' if r['fsync'] else '--no-fsync'} ({r['mode']})",
            f"{r['rows_per_s']:,.0f}",
            f"**{w['cpu']:.1f}**", f"{w['cpu_p90']:.0f}", f"{w['waiting']:.0f}",
            f"{i['cpu']:.1f}", f"{r['writer_cpu']:.1f}",
            f"**{r['final']['VmHWM'] / 1024:.0f}**", f"{r['final']['VmRSS'] / 1024:.0f}", f"{i['rss']:.0f}",
            *((f"{median(lags):.1f}", f"**{percentile(lags, 99):.1f}**", f"{max(lags):.0f}") if lags
              else ("n/a", "n/a", "n/a")),
            f"{len(lags)}" + (f" (+{r['unseen']} unseen)" if r["unseen"] else ""),
            f"{r['behind_at_stop']}", f"{r['drain']:.2f}" if r["drain"] is not None else f"> {args.drain_timeout:g} ({r['behind_after_drain']} left)",
            f"{r['startup']:.1f}",
        ])
    print(md_table(["configuration", "rows/s written", "daemon CPU % (writing)", "p90 of 1-s CPU %",
                    "daemon threads runnable but waiting for a CPU, % (sum)",
                    "daemon CPU % idle (baseline)", "writers' CPU % (baseline)", "peak RSS MB (VmHWM)", "RSS after drain MB",
                    "RSS idle MB", "lag median ms", "lag p99 ms", "lag max ms", "lag samples",
                    "runs behind at stop", "drain s", "startup + catch-up s"], rows))
    if args.steady_rows:
        mem = engine_memory([POLICY, "auto", "plateau", "plateau:method=threshold"], args.steady_rows)
        print(f"\n**Steady-state engine memory per run** (in-process, tracemalloc, after {args.steady_rows} rows "
              f"of one metric; the live phase above ends at about {args.prefill + int(args.rate * args.duration)} "
              f"rows per run, short of the bounded history):\n")
        prow = []
        for spec, kib in mem.items():
            prow.append([f"`{spec}`", f"{kib:.0f} KiB", f"{kib * 100 / 1024:.0f} MB", f"{kib * 1000 / 1024:.0f} MB"])
        print(md_table(["policy", "per run", "x 100 runs", "x 1000 runs"], prow))
    if args.publish_writes:
        tmp = Path(tempfile.mkdtemp(prefix="autolr-bench-publish-", dir=args.dir))
        try:
            cost = {n: publish_cost(n, args.publish_writes, tmp) for n in (1, 1000)}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"\n**Cost of one decision's file work** (in-process, CPU µs, {args.publish_writes} writes "
              f"round-robin over the folders, no fsync):\n")
        print(md_table(["folders", "atomic replace of a small JSON file", "`ControlWriter.publish` (journal + control file)"],
                       [[f"{n}", f"{c['replace']:.0f}", f"{c['publish']:.0f}"] for n, c in cost.items()]))
    print("\n**Where the daemon's CPU goes while writing** (% of one core, from /proc/<pid>/task; the main "
          "thread is the worker, the others the inotify reader):\n")
    print(md_table(["configuration", "worker user", "worker system", "other threads user", "other threads system"],
                   [[f"{r['runs']} runs, {'fsync' if r['fsync'] else '--no-fsync'}",
                     *(f"{r['write']['threads'][k]:.1f}" for k in ("main user", "main sys", "others user", "others sys"))]
                    for r in results]))
    print()
    for r in results:
        for thread, text in r.get("profile", {}).items():
            print(f"\n**py-spy, {r['name']}, {thread or 'all threads'}:**\n\n```\n{text}\n```\n")
    for r in results:
        if r["runs"] != 1000:
            continue
        w = r["write"]
        peak = r["final"]["VmHWM"] / 1024
        if r["lags"]:
            p99 = percentile(r["lags"], 99)
            lag = (f"p99 lag {p99:.1f} ms (< {TARGET_LAG:g} ms: "
                   f"{'met' if p99 < TARGET_LAG and not r['unseen'] else 'MISSED'})")
        else:
            lag = "no decision on a sampled row to time"
        print(f"- Targets (issue 6), 1000 runs, {'fsync' if r['fsync'] else '--no-fsync'}: CPU {w['cpu']:.1f} % "
              f"(< {TARGET_CPU:g} %: {'met' if w['cpu'] < TARGET_CPU else 'MISSED'}), peak RSS {peak:.0f} MB "
              f"(< {TARGET_RSS:g} MB: {'met' if peak < TARGET_RSS else 'MISSED'}), {lag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
