"""Catch-up speed: rows per second when ``autolr watch`` starts on large existing logs.

Files (generated in a temporary folder, deleted afterwards):

* CSV, Lightning CSVLogger style: ``epoch,step,train_loss,val_loss``; every row has
  ``train_loss`` and an empty ``val_loss`` except one row in ``--val-every`` holding only
  ``val_loss`` (an empty ``train_loss``): the sparse cells Lightning writes.
* JSONL: ``{"step": i, "loss": x}`` per line.
* TensorBoard (when ``autolr/readers/tensorboard.py`` exists): one event file written by
  tensorboardX, scalar ``loss`` every step and ``val_loss`` every ``--val-every`` steps
  (fewer rows by default: tensorboardX writes only ~20k scalars/s).

Measured per format, median of ``--reps`` repetitions:

(a) the reader to columns: ``reader.read_batch()`` (a ``Batch``: steps, epochs, one float64
    array per metric) looped until ``more`` is False, no policy (CSV and JSONL);
(b) the reader to Records: ``reader.read()`` looped the same way, what the daemon calls today;
    for CSV and JSONL also with block parsing off (every line parsed alone by ``csv.reader`` /
    ``json.loads``: the exact path, as the readers worked before block parsing);
(c) the whole ``autolr watch ROOT --once --policy P --no-fsync`` as a subprocess on the first
    ``--watch-rows`` rows of the same log, for ``P`` = ``plateau`` (its default method) and
    ``plateau:method=threshold``: wall time from spawn to exit, its CPU time and peak RSS;
    "net" subtracts the median wall time of the same command on an empty root (interpreter
    start, imports), measured in the same run. A policy import done lazily on first use
    (numpy/scipy for the trend test) is not part of that startup.

Baselines in the same run, on the same files: ``pandas.read_csv`` and
``pandas.read_json(lines=True)``; plain-Python loops ``csv.reader`` + ``float()`` of the
non-empty cells and ``json.loads`` per line (for TensorBoard: tensorboard's own
``EventFileLoader`` iterating events). ``--profile`` adds a cProfile of one reader pass per
format (``read_batch`` where the reader has it; top functions by own time).

Usage::

    python benchmarks/bench_catchup.py                      # 1M CSV + 1M JSONL + 100k TB rows, 3 reps (~6 min)
    python benchmarks/bench_catchup.py --rows 200000 --reps 3 --profile
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import csv
import io
import json
import math
import os
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import daemon_cmd, machine_line, md_table, median, mem_kb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1_000_000  # rows/s, issue 6


# ---- data ------------------------------------------------------------------------------------

def loss_at(i: int, rng: random.Random) -> float:
    return round(2.0 / math.sqrt(1 + i / 50) + 0.05 * rng.random(), 6)


def write_csv(path: Path, rows: int, val_every: int, steps_per_epoch: int = 1000) -> int:
    """Lightning-style metrics.csv; returns the number of data rows."""
    rng = random.Random(1)
    with open(path, "w", newline="") as f:
        f.write("epoch,step,train_loss,val_loss\n")
        buf = []
        for i in range(rows):
            epoch = i // steps_per_epoch
            if i % val_every == val_every - 1:
                buf.append(f"{epoch},{i},,{loss_at(i, rng) + 0.1}\n")
            else:
                buf.append(f"{epoch},{i},{loss_at(i, rng)},\n")
            if len(buf) >= 100_000:
                f.write("".join(buf))
                buf.clear()
        f.write("".join(buf))
    return rows


def write_jsonl(path: Path, rows: int) -> int:
    rng = random.Random(2)
    with open(path, "w") as f:
        buf = []
        for i in range(rows):
            buf.append(f'{{"step": {i}, "loss": {loss_at(i, rng)}}}\n')
            if len(buf) >= 100_000:
                f.write("".join(buf))
                buf.clear()
        f.write("".join(buf))
    return rows


def write_tensorboard(folder: Path, rows: int, val_every: int) -> tuple[Path, int]:
    """One tensorboardX event file; returns (path, expected rows = distinct steps)."""
    from tensorboardX import SummaryWriter

    rng = random.Random(3)
    w = SummaryWriter(str(folder), flush_secs=3600, max_queue=10_000)
    for i in range(rows):
        w.add_scalar("loss", loss_at(i, rng), i)
        if i % val_every == val_every - 1:
            w.add_scalar("val_loss", loss_at(i, rng) + 0.1, i)
    w.close()
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    old = time.time() - 3600  # a finished file: the reader emits the last open group too
    os.utime(files[0], (old, old))
    return files[0], rows


# ---- measurements ----------------------------------------------------------------------------

def reader_pass(cls, path: Path, method: str = "read") -> int:
    reader = cls(path)
    read = getattr(reader, method)
    n = 0
    while True:
        n += len(read())
        if not reader.more:
            reader.close()
            return n


def exact_path(cls):
    """The reader with block parsing off: every line parsed alone (the path before it)."""
    return type(f"Exact{cls.__name__}", (cls,), {"block_parsing": False})


def timed(fn, *args):
    """(wall seconds, CPU seconds of this process, result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0, out


def csv_loop(path: Path) -> int:
    n = 0
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows)
        for row in rows:
            {k: float(v) for k, v in zip(header, row) if v}
            n += 1
    return n


def json_loop(path: Path) -> int:
    n = 0
    loads = json.loads
    with open(path, "rb") as f:
        for line in f:
            loads(line)
            n += 1
    return n


def pandas_csv(path: Path) -> int:
    import pandas as pd

    return len(pd.read_csv(path))


def pandas_jsonl(path: Path) -> int:
    import pandas as pd

    return len(pd.read_json(path, lines=True))


def tb_loader(path: Path) -> int:
    """tensorboard's EventFileLoader: protobuf events, counting distinct scalar steps."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    steps = set()
    for event in LegacyEventFileLoader(str(path)).Load():
        if event.HasField("summary"):
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    steps.add(event.step)
    return len(steps)


def watch_once(root: Path, cmd: list[str], extra: list[str]) -> dict:
    """Run ``autolr watch ROOT --once ...``; wall seconds, CPU seconds, peak RSS (MB).

    The peak RSS is the child's VmHWM sampled every 10 ms (``ru_maxrss`` would include this
    big parent's RSS, inherited through vfork + exec).
    """
    argv = [*cmd, "watch", str(root), "--once", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hwm = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        with contextlib.suppress(OSError, KeyError):
            hwm = max(hwm, mem_kb(proc.pid)["VmHWM"])
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": hwm / 1024}


def clean_run(folder: Path) -> None:
    """Remove autolr's own files so the next --once starts from scratch."""
    for p in folder.iterdir():
        if p.name.startswith("autolr.") or p.name.startswith(".autolr"):
            p.unlink()


def profile_reader(cls, path: Path, top: int) -> str:
    method = "read_batch" if hasattr(cls, "read_batch") else "read"
    pr = cProfile.Profile()
    pr.enable()
    reader_pass(cls, path, method)
    pr.disable()
    out = io.StringIO()
    st = pstats.Stats(pr, stream=out)
    st.sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return "\n".join(lines[start - 1:start + top + 1]).replace(str(ROOT) + "/", "")


# ---- main ------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows in the CSV and JSONL logs")
    ap.add_argument("--tb-rows", type=int, default=100_000, help="steps in the TensorBoard file (0 skips it)")
    ap.add_argument("--val-every", type=int, default=100, help="a val_loss row every N rows")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (median reported)")
    ap.add_argument("--formats", default="csv,jsonl,tensorboard", help="comma-separated subset")
    ap.add_argument("--no-watch", action="store_true", help="skip (c), the whole daemon --once")
    ap.add_argument("--watch-rows", type=int, default=100_000,
                    help="(c) runs on the first N rows of each log (the policy, not the reader, sets its pace)")
    ap.add_argument("--policy", action="append", dest="policies", metavar="SPEC",
                    help="policy for (c), repeat for several variants (default: plateau, and "
                         "plateau:method=threshold)")
    ap.add_argument("--profile", action="store_true", help="cProfile one reader pass per format")
    ap.add_argument("--top", type=int, default=12, help="functions shown per profile")
    ap.add_argument("--dir", help="where the temporary files go; default $TMPDIR")
    ap.add_argument("--daemon-cmd", help="command prefix instead of 'python -m autolr.cli'")
    args = ap.parse_args()
    args.policies = args.policies or ["plateau", "plateau:method=threshold"]

    from autolr.plugins import reader_classes

    readers = reader_classes()
    tb_shim = False
    if "tensorboard" not in readers:
        try:  # written but not yet registered as a built-in: use the class, and a plugin file for (c)
            from autolr.readers.tensorboard import TensorBoardReader

            readers["tensorboard"] = TensorBoardReader
            tb_shim = True
        except ImportError:
            pass
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if "tensorboard" in formats and ("tensorboard" not in readers or not args.tb_rows):
        print("(TensorBoard skipped: no tensorboard reader or --tb-rows 0)", file=sys.stderr)
        formats.remove("tensorboard")
    cmd = daemon_cmd(args.daemon_cmd) or [sys.executable, "-m", "autolr.cli"]
    load0 = os.getloadavg()

    tmp = Path(tempfile.mkdtemp(prefix="autolr-bench-catchup-", dir=args.dir))
    results: dict[str, dict] = {}
    profiles: dict[str, str] = {}
    try:
        empty = tmp / "empty"
        empty.mkdir()
        shim_args: list[str] = []
        if tb_shim:
            plugdir = tmp / "plugins"
            plugdir.mkdir()
            (plugdir / "tensorboard_reader.py").write_text(
                "from autolr.readers.tensorboard import register_readers  # noqa: F401\n")
            shim_args = ["--plugins-dir", str(plugdir)]
            cmd = [*cmd, *shim_args]
        startup = []
        files: dict[str, tuple[Path, int, list]] = {}
        for fmt in formats:
            run = tmp / fmt / "run"
            run.mkdir(parents=True)
            t0 = time.perf_counter()
            if fmt == "csv":
                path, n = run / "metrics.csv", write_csv(run / "metrics.csv", args.rows, args.val_every)
                base = [("`csv.reader` + `float()` loop", csv_loop), ("`pandas.read_csv`", pandas_csv)]
            elif fmt == "jsonl":
                path, n = run / "metrics.jsonl", write_jsonl(run / "metrics.jsonl", args.rows)
                base = [("`json.loads` loop", json_loop), ("`pandas.read_json(lines=True)`", pandas_jsonl)]
            elif fmt == "tensorboard":
                path, n = write_tensorboard(run, args.tb_rows, args.val_every)
                base = [("tensorboard `EventFileLoader` loop", tb_loader)]
            else:
                raise SystemExit(f"unknown format {fmt}")
            # (c)'s log: the first --watch-rows rows, in a run folder of its own
            wroot = tmp / f"{fmt}-watch"
            wrun = wroot / "run"
            wrun.mkdir(parents=True)
            wn = min(n, args.watch_rows)
            if fmt == "csv":
                wpath = wrun / path.name
                write_csv(wpath, wn, args.val_every)
            elif fmt == "jsonl":
                wpath = wrun / path.name
                write_jsonl(wpath, wn)
            elif wn == n:
                wpath = wrun / path.name
                shutil.copy2(path, wpath)
            else:
                wpath, wn = write_tensorboard(wrun, wn, args.val_every)
            files[fmt] = (path, n, base, wroot, wpath, wn)
            print(f"  wrote {fmt}: {n} rows, {path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)

        for fmt in formats:
            path, n, base, wroot, wpath, wn = files[fmt]
            cls = readers[fmt]
            columnar = hasattr(cls, "read_batch")
            passes = {"records": (cls, "read")}
            if columnar:
                passes = {"columns": (cls, "read_batch"), **passes, "exact": (exact_path(cls), "read")}
            res = {"rows": n, "size": path.stat().st_size, "reader": {k: [] for k in passes},
                   "base": {b: [] for b, _ in base}, "watch": {p: [] for p in args.policies}, "watch_rows": wn}
            for c, m in passes.values():
                reader_pass(c, path, m)  # warm the page cache and imports
            for rep in range(args.reps):
                # interleave: every measurement of a repetition sees the same machine state
                for what, (c, m) in passes.items():
                    wall, cpu, got = timed(reader_pass, c, path, m)
                    res["reader"][what].append((wall, cpu))
                    res[f"n_{what}"] = got
                res["records"] = res["n_records"]
                for name, fn in base:
                    wall, cpu, got = timed(fn, path)
                    res["base"][name].append((wall, cpu))
                if not args.no_watch:
                    for pol in args.policies:
                        clean_run(wpath.parent)
                        res["watch"][pol].append(watch_once(wroot, cmd, ["--policy", pol, "--no-fsync"]))
                    startup.append(watch_once(empty, cmd, ["--policy", args.policies[0], "--no-fsync"]))
                print(f"  {fmt} rep {rep + 1}: " + ", ".join(
                    f"{what} {n / xs[-1][1]:,.0f} rows/CPU-s" for what, xs in res["reader"].items()),
                    file=sys.stderr)
            if args.profile:
                profiles[fmt] = profile_reader(cls, path, args.top)
            results[fmt] = res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    start_wall = median([x["wall"] for x in startup]) if startup else 0.0
    start_cpu = median([x["cpu"] for x in startup]) if startup else 0.0
    print(f"{machine_line()}; load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end. "
          f"Median of {args.reps} interleaved repetitions. On a shared machine wall time depends on the "
          f"other load; CPU time (this process, or the daemon's own from wait4) much less, so rows per "
          f"CPU-second is the figure to compare, and the ratios use it.\n")
    table = []
    verdicts = []
    for fmt, res in results.items():
        n, mb = res["rows"], res["size"] / 1e6
        pandas_name = next((b for b in res["base"] if "pandas" in b), None)
        pandas_cpu = n / median([c for _, c in res["base"][pandas_name]]) if pandas_name else None

        def row(what, wall, cpu, extra="", rows=n):
            rate_cpu = rows / max(cpu, 1e-9)
            ratio = f"{rate_cpu / pandas_cpu:.2f}x" if pandas_cpu else ""
            table.append([fmt, what, f"{wall:.2f}", f"{rows / max(wall, 1e-9):,.0f}", f"{rate_cpu:,.0f}",
                          f"{rate_cpu / TARGET:.2f}", ratio, extra])
            return rate_cpu

        labels = {"columns": "**(a) autolr reader → columns** (`read_batch`)",
                  "records": "**(b) autolr reader → Records** (`read`)",
                  "exact": "(b) autolr reader → Records, block parsing off (per-line exact path, as before)"}
        rates = {}
        for what, xs in res["reader"].items():
            rates[what] = row(labels[what], median([w for w, _ in xs]), median([c for _, c in xs]),
                              f"{res['n_' + what]:,} rows from {n:,} log rows, {mb:.0f} MB")
        reader_rate = rates.get("columns", rates["records"])
        wn = res["watch_rows"]
        full = []
        for pol, runs in res["watch"].items():
            if not runs:
                continue
            w = median([x["wall"] for x in runs])
            cpu = median([x["cpu"] for x in runs])
            rss = max(x["rss_mb"] for x in runs)
            r = row(f"**(c) `autolr watch --once --policy {pol} --no-fsync`**, net of startup",
                    max(w - start_wall, 1e-9), max(cpu - start_cpu, 1e-9),
                    f"first {wn:,} rows; whole process {w:.2f} s wall, {cpu:.2f} s CPU, peak RSS {rss:.0f} MB",
                    rows=wn)
            full.append(f"{pol} {r:,.0f}")
        for name, xs in res["base"].items():
            row(f"baseline: {name}", median([w for w, _ in xs]), median([c for _, c in xs]))
        if fmt in ("csv", "jsonl"):
            verdicts.append(f"- Target (issue 6) >= 1,000,000 rows/s, {fmt}: reader to columns {reader_rate:,.0f} "
                            f"rows per CPU-s; to Records {rates['records']:,.0f}"
                            + (f"; whole daemon {'; '.join(full)}" if full else "")
                            + f" -> {'met' if reader_rate >= TARGET else 'NOT met'}")
    print(md_table(["format", "what", "wall s", "rows/s (wall)", "rows per CPU-s", "vs 1M rows/s target (CPU)",
                    "vs pandas (CPU)", "notes"], table, "llrrrrrl"))
    print(f"\n(c) is net of the same command on an empty root, measured in the same run: {start_wall:.2f} s "
          f"wall, {start_cpu:.2f} s CPU (interpreter, imports).\n")
    print("\n".join(verdicts))
    for fmt, text in profiles.items():
        print(f"\ncProfile of one `{fmt}` reader pass (top {args.top} by own time; cProfile inflates "
              f"per-call costs):\n\n```\n{text}\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
