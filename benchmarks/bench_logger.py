"""Speed of ``autolr.log`` / ``autolr.Logger`` beside hand-written JSONL logging.

In one process and one run (the rows share a machine state), each timed loop writes
``calls`` lines of ``{"step", "loss", "lr", "grad_norm"}`` to a file in a temporary folder;
the median over ``reps`` repetitions (rows interleaved round-robin) is reported in calls/s
and as a ratio to the baseline ``f.write(json.dumps(row) + "\\n"); f.flush()``.

Rows: the baseline; ``Logger(path)(step, ...)`` with Python floats; ``autolr.log`` (the
module-level default logger); ``Logger`` with 0-d torch tensors as values (converted with
``.item()`` inside; the baseline equivalent calls ``.item()`` itself), when torch is installed.

Usage::

    python benchmarks/bench_logger.py            # ~10 s
    python benchmarks/bench_logger.py --quick    # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import autolr
from autolr.logger import Logger


def loop_baseline(path: Path, calls: int) -> float:
    with open(path, "a") as f:
        t0 = time.perf_counter()
        for step in range(calls):
            f.write(json.dumps({"step": step, "loss": 0.5 + step * 1e-6, "lr": 3e-4, "grad_norm": 1.25}) + "\n")
            f.flush()
        return time.perf_counter() - t0


def loop_logger(path: Path, calls: int) -> float:
    with Logger(path) as log:
        t0 = time.perf_counter()
        for step in range(calls):
            log(step, loss=0.5 + step * 1e-6, lr=3e-4, grad_norm=1.25)
        return time.perf_counter() - t0


def loop_autolr_log(path: Path, calls: int) -> float:
    autolr.init(path.parent, path.name)
    log = autolr.log
    t0 = time.perf_counter()
    for step in range(calls):
        log(step, loss=0.5 + step * 1e-6, lr=3e-4, grad_norm=1.25)
    return time.perf_counter() - t0


def loop_baseline_torch(path: Path, calls: int, torch) -> float:
    loss, gn = torch.tensor(0.5), torch.tensor(1.25)
    with open(path, "a") as f:
        t0 = time.perf_counter()
        for step in range(calls):
            f.write(json.dumps({"step": step, "loss": loss.item(), "lr": 3e-4, "grad_norm": gn.item()}) + "\n")
            f.flush()
        return time.perf_counter() - t0


def loop_logger_torch(path: Path, calls: int, torch) -> float:
    loss, gn = torch.tensor(0.5), torch.tensor(1.25)
    with Logger(path) as log:
        t0 = time.perf_counter()
        for step in range(calls):
            log(step, loss=loss, lr=3e-4, grad_norm=gn)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.calls, args.reps = 2000, 3
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        torch = None

    rows = [("`f.write(json.dumps(row)+\"\\n\"); f.flush()` (baseline)", loop_baseline, ()),
            ("`Logger(path)(step, **floats)`", loop_logger, ()),
            ("`autolr.log(step, **floats)`", loop_autolr_log, ())]
    if torch is not None:
        rows += [("baseline with `tensor.item()`", loop_baseline_torch, (torch,)),
                 ("`Logger(path)(step, **tensors)`", loop_logger_torch, (torch,))]
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for i, (name, fn, extra) in enumerate(rows):
                path = Path(tmp) / f"r{rep}-{i}.jsonl"
                times[name].append(fn(path, args.calls, *extra))
                lines = path.read_text().splitlines()
                assert len(lines) == args.calls and json.loads(lines[-1])["step"] == args.calls - 1
                path.unlink()
    base = statistics.median(times[rows[0][0]])
    base_t = statistics.median(times[rows[3][0]]) if torch is not None else None
    print(f"# autolr.log speed: {args.calls} calls x {args.reps} reps, median; "
          f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| writer | calls/s | µs/call | vs its baseline |")
    print("|---|---:|---:|---:|")
    for i, (name, _, _) in enumerate(rows):
        t = statistics.median(times[name])
        ref = base_t if i >= 3 else base
        print(f"| {name} | {args.calls / t:,.0f} | {t / args.calls * 1e6:.2f} | {ref / t:.2f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
