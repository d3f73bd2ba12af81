"""CPU per log row of each built-in policy, and of one trend evaluation, in process.

Each policy spec is fed, through the real ``RunEngine`` and chain (as the daemon feeds it),
``--rows`` rows of one of three loss curves after ``--warm`` rows it is not timed on (the
warmup, the first windows):

* ``declining``: 1 / (1 + 0.01 · step) · (1 + 5 % noise), the curve ``bench_scale --noise 0.05``
  writes: a run that keeps improving;
* ``flat``: 1 + 5 % noise: a plateau, where the statistical policies run every test they have;
* ``clean``: 1 / (1 + 0.01 · step) without noise.

Baseline in the same run: the chain with ``constant`` (no policy work: the engine, the chain
and the Record). Figures are CPU µs per row, median of ``--repeat`` interleaved repetitions.
Then :mod:`autolr.trend`'s functions at n = 100 (the default window) and n = 1500 (the
default ``plateau`` history), µs per call (``timeit``, median of ``--repeat``).
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_revision, machine_line, md_table, median  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ["constant", "step:step_size=1000", "cosine:T_max=100000", "plateau:method=threshold",
            "auto", "plateau", "plateau:departure=false", "plateau:every=50"]
CURVES = {
    "declining": lambda s, g: 1.0 / (1.0 + 0.01 * s) * (1.0 + 0.05 * g),
    "flat": lambda s, g: 1.0 + 0.05 * g,
    "clean": lambda s, g: 1.0 / (1.0 + 0.01 * s),
}


def rows_of(curve: str, n: int):
    from autolr.records import Record

    rng = random.Random(0)
    f = CURVES[curve]
    return [Record({"loss": f(s, rng.gauss(0.0, 1.0))}, s, None) for s in range(n)]


def per_row(spec: str, rows, warm: int) -> float:
    """CPU µs per row of the rows after the first ``warm``."""
    from autolr.config import Settings, parse_policy_options
    from autolr.engine import RunEngine
    from autolr.plugins import policy_classes

    chain = Settings(policies=parse_policy_options([spec]), base_lr=0.1).chain(policy_classes())
    engine = RunEngine(chain)
    for r in rows[:warm]:
        engine.feed(r, ("loss",))
    t0 = time.process_time()
    for r in rows[warm:]:
        engine.feed(r, ("loss",))
    return 1e6 * (time.process_time() - t0) / (len(rows) - warm)


def trend_costs(repeat: int) -> list[list]:
    import numpy as np

    from autolr import trend

    rng = np.random.default_rng(0)
    out = []
    for n in (100, 1500):
        x = np.arange(n, dtype=float)
        y = 1.0 + 0.05 * rng.standard_normal(n)
        prepared = trend._normalised(y, x, 3.0)
        calls = {
            "improvement_test": lambda: trend.improvement_test(y, x),
            "improvement_tests (both directions)": lambda: trend.improvement_tests(y, x),
            "robust_reference": lambda: trend.robust_reference(y),
            "slowdown_test": lambda: trend.slowdown_test(y, x, prepared=prepared),
            "faded_test": lambda: trend.faded_test(y, x, min_recent=100, min_before=10, min_effective=10,
                                                   prepared=prepared),
            "departure_test": lambda: trend.departure_test(y, x, prepared=prepared),
            "winsorise for all (_normalised)": lambda: trend._normalised(y, x, 3.0),
        }
        for name, call in calls.items():
            times = []
            for _ in range(repeat):
                k, t = timeit.Timer(call).autorange()
                times.append(1e6 * t / k)
            out.append([name, n, f"{median(times):.1f}"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=6000, help="timed rows per policy and curve")
    ap.add_argument("--warm", type=int, default=1600, help="rows fed first, not timed (a full history)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--policy", action="append", help="a policy spec to measure (repeatable; default: "
                    + ", ".join(POLICIES) + "); include constant for the ratios")
    ap.add_argument("--out", default=str(RESULTS / "policy_cost.md"), help="markdown results file ('' to skip)")
    args = ap.parse_args()
    policies = args.policy or POLICIES
    __import__("autolr.trend")  # scipy is loaded once, outside the timings

    data = {c: rows_of(c, args.warm + args.rows) for c in CURVES}
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):  # interleaved: a load change hits every cell alike
        for curve, rows in data.items():
            for spec in policies:
                results.setdefault((spec, curve), []).append(per_row(spec, rows, args.warm))
    table = []
    for spec in policies:
        cells = []
        for curve in CURVES:
            v = median(results[(spec, curve)])
            base = median(results[("constant", curve)]) if "constant" in policies else math.nan
            cells += [f"{v:.1f}", f"{v / base:.1f}x" if base == base else "n/a"]
        table.append([f"`{spec}`", *cells])
    text = [
        "# CPU per row of each policy, and per trend evaluation",
        "",
        f"autolr {git_revision()}, {machine_line()}.",
        f"Command: `python benchmarks/bench_policy_cost.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` — "
        f"{args.rows} timed rows after {args.warm} untimed, median of {args.repeat} interleaved repetitions.",
        "",
        "## CPU µs per row through the engine and chain (and the ratio to `constant`, same run)",
        "",
        md_table(["policy", "declining", "x", "flat", "x", "clean", "x"], table),
        "",
        "## One trend evaluation, µs per call (median of timeit runs)",
        "",
        md_table(["function", "n", "µs"], trend_costs(args.repeat)),
        "",
    ]
    report = "\n".join(text)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
