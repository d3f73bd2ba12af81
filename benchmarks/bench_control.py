"""Cost of the control-file client on the training loop's hot path.

Measures, in one process and one run (so the numbers share a machine state):

* ``Control.lr(base)`` on an unchanged control file, with ``min_interval`` 0 (one ``stat`` per
  call), 0.01 s and 0.1 s, beside two baselines: a bare ``os.stat`` of the same file and an
  empty Python method call. Median over repetitions, in ns/call and as a ratio to each baseline.
* A tiny torch training step (MLP 64->64->10, batch 32, SGD, CPU, 1 thread) with and without
  ``opt.param_groups[0]["lr"] = ctl.lr(base)`` before each step.
* ``ControlWriter.publish`` with fsync on and off, median ms per call.

Prints a markdown table. Usage::

    python benchmarks/bench_control.py            # full run (~1 min)
    python benchmarks/bench_control.py --quick    # fewer repetitions, for a smoke test
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from autolr.control import Control, ControlWriter


class _Empty:
    def call(self, default):
        return default


def time_calls(fn, arg, calls: int, reps: int) -> tuple[float, float]:
    """(median, min) ns per call of ``fn(arg)`` over ``reps`` loops of ``calls`` calls each.

    The loop overhead is included in every row alike (it is part of the baselines too).
    """
    rng = range(calls)
    per = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        for _ in rng:
            fn(arg)
        per.append((time.perf_counter_ns() - t0) / calls)
    return statistics.median(per), min(per)


def bench_client(run: Path, calls: int, reps: int) -> list[tuple[str, tuple[float, float]]]:
    path = str(run / "autolr.json")
    rows = [
        ("empty Python method call (baseline)", time_calls(_Empty().call, 0.1, calls, reps)),
        ("bare `os.stat(path)` (baseline)", time_calls(os.stat, path, calls, reps)),
    ]
    for interval in (0.0, 0.01, 0.1):
        ctl = Control(run, min_interval=interval)
        assert ctl.lr(0.1) == 0.05, "the control file was not read"
        rows.append((f"`Control.lr(base)`, min_interval={interval:g}", time_calls(ctl.lr, 0.1, calls, reps)))
    return rows


def bench_torch(run: Path, steps: int, reps: int) -> dict[str, float] | None:
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    loss_fn = torch.nn.CrossEntropyLoss()
    base = 0.1

    def plain(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

    def controlled(ctl):
        def loop(n):
            for _ in range(n):
                opt.param_groups[0]["lr"] = ctl.lr(base)
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()
        return loop

    variants = {"plain": plain, "0": controlled(Control(run)),  # one stat per step
                "0.01": controlled(Control(run, min_interval=0.01))}
    times = {k: [] for k in variants}
    for fn in variants.values():
        fn(200)  # warm up
    for r in range(reps):  # interleaved, order alternating, so drift hits all alike
        for k in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            t0 = time.perf_counter_ns()
            variants[k](steps)
            times[k].append((time.perf_counter_ns() - t0) / steps)
    assert opt.param_groups[0]["lr"] == 0.05
    med = {k: statistics.median(v) / 1e3 for k, v in times.items()}
    return {"us": med, "torch": torch.__version__}


def bench_publish(folder: Path, n_nofsync: int, n_fsync: int) -> dict[str, float]:
    out = {}
    for fsync, n in ((False, n_nofsync), (True, n_fsync)):
        run = folder / f"publish-fsync-{fsync}"
        writer = ControlWriter(run, fsync=fsync)
        writer.publish(scale=1.0, lr=None, step=0, policy="bench", reason="warm-up")
        times = []
        for i in range(n):
            t0 = time.perf_counter_ns()
            writer.publish(scale=0.5, lr=None, step=i, policy="bench", reason="benchmark decision",
                           evidence={"value": 1.0 / (i + 1)})
            times.append((time.perf_counter_ns() - t0) / 1e6)
        out[fsync] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200_000, help="calls per repetition")
    ap.add_argument("--reps", type=int, default=7, help="repetitions (median reported)")
    ap.add_argument("--steps", type=int, default=2000, help="training steps per repetition")
    ap.add_argument("--quick", action="store_true", help="20k calls, 3 reps, 300 steps")
    args = ap.parse_args()
    if args.quick:
        args.calls, args.reps, args.steps = 20_000, 3, 300

    with tempfile.TemporaryDirectory(prefix="autolr-bench-") as tmp:
        run = Path(tmp) / "run"
        ControlWriter(run).publish(scale=0.5, lr=None, step=0, policy="bench", reason="fixture")
        # An unchanged file: make it old, as a control file is between decisions.
        old = time.time() - 3600
        os.utime(run / "autolr.json", (old, old))

        client = bench_client(run, args.calls, args.reps)
        torch_row = bench_torch(run, args.steps, args.reps)
        publish = bench_publish(Path(tmp), n_nofsync=300, n_fsync=50)

    empty_ns, stat_ns = client[0][1][0], client[1][1][0]
    print(f"Python {platform.python_version()}, {platform.system()} {platform.release()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
          f"{args.reps} repetitions x {args.calls} calls, median.\n")
    print("| what | median cost | vs empty call | vs os.stat | best repetition |")
    print("|---|---:|---:|---:|---:|")
    for name, (ns, best) in client:
        print(f"| {name} | {ns:.0f} ns/call | {ns / empty_ns:.1f}x | {ns / stat_ns:.2f}x | {best:.0f} ns/call |")
    if torch_row:
        us = torch_row["us"]
        print(f"| tiny torch step (MLP 64-64-10, batch 32, SGD, 1 thread), plain | {us['plain']:.1f} us/step | | | |")
        for interval in ("0", "0.01"):
            pct = 100 * (us[interval] - us["plain"]) / us["plain"]
            print(f"| same step + `opt.param_groups[0][\"lr\"] = ctl.lr(base)`, min_interval={interval} "
                  f"| {us[interval]:.1f} us/step ({pct:+.2f} %) | | | |")
    print(f"| `ControlWriter.publish`, fsync=False | {publish[False]:.3f} ms | | | |")
    print(f"| `ControlWriter.publish`, fsync=True | {publish[True]:.3f} ms | | | |")
    if torch_row:
        print(f"\ntorch {torch_row['torch']}, {args.reps} interleaved repetitions x {args.steps} steps, median.")


if __name__ == "__main__":
    sys.exit(main())
