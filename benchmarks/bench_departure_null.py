"""How often does ``trend.departure_test`` say "stopped" on a loss that never stops?

The departure test (question 4 of ``plateau:method=trend``) runs at every evaluation for
every candidate break, so its per-test threshold (``trend.DEPARTURE_Z`` = 4.5) has to hold
over a whole run. This script measures that on continuing declines that are NOT the curves of
``bench_plateau.py``: a straight line (the worst case: the null parabola is exact), two power
laws and an exponential decay, in Gaussian, Student-t (3 dof), AR(1) 0.5 and AR(1) 0.9 noise
of 0.01 (marginal). Each run has 3000 rows, tested every 10 rows from row 100 on over the last
1500 (as the policy keeps them); the result per case is the share of runs in which the test
said stopped at least once, for several thresholds, and the median of the run's largest z.
The test alone, without the policy's other three questions.

Usage::

    python benchmarks/bench_departure_null.py            # 100 runs per case, 2 workers (~3 min)
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, md_table  # noqa: E402

THRESHOLDS = (3.5, 4.0, 4.5, 5.0)
SHAPES = {
    "line": lambda t: 1 + 3e-4 * (t[-1] - t),
    "power 2/sqrt(1 + t/50)": lambda t: 1 + 2 * (1 + t / 50) ** -0.5,
    "power 2/(1 + t/300)^1.5": lambda t: 1 + 2 * (1 + t / 300) ** -1.5,
    "exponential exp(-t/800)": lambda t: 1 + np.exp(-t / 800),
}
KINDS = ("gauss", "t3", "ar0.5", "ar0.9")


def noise(rng, kind, n):
    if kind == "gauss":
        return rng.standard_normal(n)
    if kind == "t3":
        return rng.standard_t(3, n) / math.sqrt(3)
    from scipy.signal import lfilter

    phi = float(kind[2:])
    e = rng.standard_normal(n) * math.sqrt(1 - phi * phi)
    e[0] = rng.standard_normal()
    return lfilter([1.0], [1.0, -phi], e)


def run(task):
    from autolr import trend

    kind, shape, i = task
    rng = np.random.default_rng([11, KINDS.index(kind), list(SHAPES).index(shape), i])
    t = np.arange(3000, dtype=float)
    y = SHAPES[shape](t) + 0.01 * noise(rng, kind, len(t))
    best = -math.inf
    for j in range(99, len(t), 10):
        lo = max(0, j + 1 - 1500)
        # z below the lowest threshold is enough: then the plain least-squares check is computed
        res = trend.departure_test(y[lo:j + 1], t[lo:j + 1], z=min(THRESHOLDS) - 0.5)
        if res is not None:
            best = max(best, res.z)
    return task, best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    start = time.perf_counter()
    tasks = [(k, s, i) for k in KINDS for s in SHAPES for i in range(args.runs)]
    with mp.get_context("fork").Pool(args.workers) as pool:
        res = pool.map(run, tasks, chunksize=5)
    best: dict = {}
    for (k, s, _), b in res:
        best.setdefault((k, s), []).append(b)
    rows = []
    for (k, s), v in best.items():
        v = np.array(v)
        rows.append([k, s] + [f"{np.mean(v > z):.0%}" for z in THRESHOLDS] + [f"{np.median(v):.2f}"])
    print(f"`python benchmarks/bench_departure_null.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))
    print()
    print(machine_line())
    print()
    print(f"{args.runs} runs per case, {time.perf_counter() - start:.0f} s. Share of runs with z above the threshold "
          "at least once (3000 rows, tested every 10 over the last 1500):")
    print()
    print(md_table(["noise", "curve"] + [f"z > {z:g}" for z in THRESHOLDS] + ["median of the largest z"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
