"""The ``auto`` divergence guard on synthetic loss curves: false fires and detection delay.

Every series is fed row by row through the real ``auto`` policy (``Auto.init`` /
``Auto.update`` with an ``Observation`` per row, defaults: warmup 100, window 100, every 10,
spike_sigmas 8) except ``min_factor=1e-300``, open loop: the simulated loss does not react to
the LR, so a flat loss is decayed every ~100 rows and would reach the default floor (1e-3)
after ten decays, where no decision is published any more; the tiny floor keeps every guard
event visible and changes none of the guard's statistics. A guard fire is a
decision of kind ``guard``; its rule is read from the reason: ``non-finite``, ``jump``
(spike), ``level shift``, ``rises significantly`` (sustained rise), ``escalates`` (during the
cooldown).

**Not diverging** (false fires). ``--rows`` rows per series, loss ``m(t) · (1 + sigma · e_t)``
with noise relative to the level:

* shapes: ``flat`` m(t) = 1; ``decreasing`` m(t) = 1 + exp(-t / 1500) (from 2 to ~1.14 over
  3000 rows, the slow tail of a training curve);
* noise e_t of unit standard deviation: ``gauss``; ``t3`` (Student t, 3 dof, scaled);
  ``ar0.5`` and ``ar0.9`` (stationary AR(1), phi 0.5 / 0.9, unit marginal deviation);
* sigma 0.05, 0.15, 0.30.

Reported per cell: guard fires per 10,000 rows (all rules, and the level-shift rule alone) and
the share of series with at least one fire.

**Diverging** (detection). A flat loss 1 · (1 + sigma · e_t) with ``gauss`` or ``ar0.9`` noise at
sigma 0.05 / 0.15 / 0.30 until an onset T0 (uniform in [400, 1500]), then:

* ``x3``, ``x5``, ``x10``: the level jumps to 3, 5, 10 and stays (same relative noise);
* ``ramp3``, ``ramp5``: the level climbs linearly to 3 / 5 over 30 rows and stays (no single
  jump for the spike rule: the level-shift rule's case, like a loss climbing back at the edge
  of stability);
* ``exp``: the level grows as exp((t - T0) / 30) (x2.7 every 30 rows);
* ``nan``: every value from T0 on is NaN.

Reported: the share of series with a guard fire in [T0, T0 + 300) (detected), the median and
90th percentile delay in rows of the first such fire, the rule that fired first, and the share
of series with a fire before T0.

Before / after, in the same run: ``old`` is ``auto`` with the level-shift standard error as it
was before (``1.2533 · trend.noise_level(guard window) / sqrt(every)``: first differences,
blind to autocorrelation), copied here as a subclass; ``new`` is the ``auto`` of this
checkout. Only ``_level_shift`` differs between the two.

Usage::

    python benchmarks/bench_guard.py            # 24 cells x 40 series x 3000 rows + 42 diverging cells x 40 (~4 min)
    python benchmarks/bench_guard.py --quick    # 10 series per cell, 2000 rows (~1 min)
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, md_table  # noqa: E402

from autolr.policies.auto import Auto, _trend  # noqa: E402
from autolr.policy import Observation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class OldAuto(Auto):
    """``auto`` with the level-shift rule's standard error as before: from first differences, as
    if the noise were white (the rest of the guard is the same code)."""

    def _level_se(self, state):
        se = 1.2533 * _trend().noise_level(state["guard_values"]) / math.sqrt(self.every)
        return se, "first differences"


METHODS = {"old": OldAuto, "new": Auto}
RULES = [("non-finite", "non-finite"), ("jump", "spike"), ("level shift", "level shift"),
         ("rises significantly", "sustained rise"), ("escalates", "escalation")]


def rule_of(reason: str) -> str:
    for key, name in RULES:
        if key in reason:
            return name
    return "other"


def noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gauss":
        return rng.standard_normal(n)
    if kind == "t3":
        return rng.standard_t(3, n) / math.sqrt(3.0)
    if kind.startswith("ar"):
        phi = float(kind[2:])
        e = rng.standard_normal(n) * math.sqrt(1 - phi * phi)
        x = np.empty(n)
        x[0] = rng.standard_normal()
        for i in range(1, n):
            x[i] = phi * x[i - 1] + e[i]
        return x
    raise ValueError(kind)


def run_policy(cls, values) -> list[tuple[int, str]]:
    """Feed ``values`` (one row each) to a fresh ``cls()``; the (row, rule) of every guard fire."""
    policy = cls(min_factor=1e-300)
    state = policy.init(1.0)
    fires = []
    for i, v in enumerate(values):
        obs = Observation(row=i, step=i, epoch=None, metrics={"loss": float(v)}, lr=policy.value(state),
                          monitor="loss", unit="step")
        state, note = policy.update(state, obs)
        if note is not None and note.get("kind") == "guard":
            fires.append((i, rule_of(note["reason"])))
    return fires


def null_series(shape: str, kind: str, sigma: float, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    m = np.ones(rows) if shape == "flat" else 1.0 + np.exp(-t / 1500.0)
    return m * (1.0 + sigma * noise(kind, rows, rng))


def diverging_series(kind: str, sigma: float, event: str, seed: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    t0 = int(rng.integers(400, 1501))
    rows = t0 + 300
    m = np.ones(rows)
    t = np.arange(rows)
    if event.startswith("x"):
        m[t0:] = float(event[1:])
    elif event.startswith("ramp"):
        top = float(event[4:])
        m[t0:] = np.minimum(1.0 + (top - 1.0) * (t[t0:] - t0 + 1) / 30.0, top)
    elif event == "exp":
        m[t0:] = np.exp((t[t0:] - t0) / 30.0)
    y = m * (1.0 + sigma * noise(kind, rows, rng))
    if event == "nan":
        y[t0:] = math.nan
    return y, t0


def _warm() -> None:
    """Imports (scipy) and first-call costs out of the timed runs."""
    y = null_series("flat", "gauss", 0.15, 300, 0)
    for cls in METHODS.values():
        run_policy(cls, y)


def null_job(args):
    shape, kind, sigma, rows, seed = args
    y = null_series(shape, kind, sigma, rows, seed)
    out, cost = {}, {}
    for name, cls in METHODS.items():
        c0 = time.process_time()
        out[name] = run_policy(cls, y)
        cost[name] = time.process_time() - c0
    out["cost"] = cost
    return out


def div_job(args):
    kind, sigma, event, seed = args
    y, t0 = diverging_series(kind, sigma, event, seed)
    out = {}
    for name, cls in METHODS.items():
        fires = run_policy(cls, y)
        before = any(r < t0 for r, _ in fires)
        after = [(r - t0, rule) for r, rule in fires if r >= t0]
        out[name] = (before, after[0] if after else None)
    return out


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 series per cell, 2000 rows (about a minute)")
    ap.add_argument("--series", type=int, default=None, help="series per cell (default 40, quick 10)")
    ap.add_argument("--rows", type=int, default=None, help="rows per non-diverging series (default 3000, quick 2000)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(RESULTS / "guard.md"), help="markdown results file ('' to skip)")
    args = ap.parse_args()
    series = args.series or (10 if args.quick else 40)
    rows = args.rows or (2000 if args.quick else 3000)

    shapes, kinds, sigmas = ["flat", "decreasing"], ["gauss", "t3", "ar0.5", "ar0.9"], [0.05, 0.15, 0.30]
    null_cells = [(s, k, g) for s in shapes for k in kinds for g in sigmas]
    div_kinds, div_sigmas = ["gauss", "ar0.9"], [0.05, 0.15, 0.30]
    events = ["x3", "x5", "x10", "ramp3", "ramp5", "exp", "nan"]
    div_cells = [(k, g, e) for k in div_kinds for g in div_sigmas for e in events]

    start = time.time()
    null_jobs = [(s, k, g, rows, 1000 * i + j) for i, (s, k, g) in enumerate(null_cells) for j in range(series)]
    div_jobs = [(k, g, e, 100_000 + 1000 * i + j) for i, (k, g, e) in enumerate(div_cells) for j in range(series)]
    with ProcessPoolExecutor(args.workers, initializer=_warm) as pool:
        null_out = list(pool.map(null_job, null_jobs, chunksize=4))
        div_out = list(pool.map(div_job, div_jobs, chunksize=4))
    wall = time.time() - start

    # ---- false fires
    table = []
    totals = {m: [0, 0, 0] for m in METHODS}  # fires, level-shift fires, rows
    for i, (s, k, g) in enumerate(null_cells):
        res = null_out[i * series:(i + 1) * series]
        row = [s, k, f"{g:.0%}"]
        for m in METHODS:
            fires = sum(len(r[m]) for r in res)
            shifts = sum(1 for r in res for _, rule in r[m] if rule == "level shift")
            hit = sum(1 for r in res if r[m]) / series
            totals[m][0] += fires
            totals[m][1] += shifts
            totals[m][2] += series * rows
            row += [f"{1e4 * fires / (series * rows):.2f}", f"{1e4 * shifts / (series * rows):.2f}", pct(hit)]
        table.append(row)
    row = ["all", "", ""]
    for m in METHODS:
        f, sh, n = totals[m]
        row += [f"**{1e4 * f / n:.2f}**", f"**{1e4 * sh / n:.2f}**", ""]
    table.append(row)
    cost = {m: 1e6 * sum(r["cost"][m] for r in null_out) / sum(j[3] for j in null_jobs) for m in METHODS}
    headers = ["shape", "noise", "sigma"]
    for m in METHODS:
        headers += [f"{m}: fires/10k rows", f"{m}: level shift/10k", f"{m}: series fired"]
    null_md = md_table(headers, table)

    # ---- detection
    dtable = []
    for i, (k, g, e) in enumerate(div_cells):
        res = div_out[i * series:(i + 1) * series]
        row = [k, f"{g:.0%}", e]
        for m in METHODS:
            det = [r[m][1] for r in res if r[m][1] is not None]
            delays = sorted(d for d, _ in det)
            rules = {}
            for _, rule in det:
                rules[rule] = rules.get(rule, 0) + 1
            early = sum(1 for r in res if r[m][0]) / series
            med = f"{statistics.median(delays):.0f}" if delays else "—"
            p90 = f"{delays[min(len(delays) - 1, int(math.ceil(0.9 * len(delays))) - 1)]:.0f}" if delays else "—"
            first = ", ".join(f"{r} {c}" for r, c in sorted(rules.items(), key=lambda kv: -kv[1]))
            row += [pct(len(det) / series), med, p90, first or "—", pct(early)]
        dtable.append(row)
    dheaders = ["noise", "sigma", "event"]
    for m in METHODS:
        dheaders += [f"{m}: detected", f"{m}: median delay", f"{m}: p90 delay", f"{m}: first rule",
                     f"{m}: fired before T0"]
    div_md = md_table(dheaders, dtable)

    cmd = "python benchmarks/bench_guard.py" + "".join(f" {a}" for a in sys.argv[1:])
    text = (
        "# The `auto` divergence guard: false fires and detection\n\n"
        f"{machine_line()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n"
        f"Command: `{cmd}` — {wall:.0f} s wall, {args.workers} workers "
        f"({len(null_jobs)} non-diverging series of {rows} rows, {len(div_jobs)} diverging series, each fed to both "
        "methods).\n\n"
        "`old`: the level-shift standard error before this change (first differences, blind to autocorrelation); "
        "`new`: this checkout's `auto`. Everything else in the guard is the same code. See the docstring of "
        "`benchmarks/bench_guard.py` for the series.\n\n"
        f"## Not diverging: guard fires per 10,000 rows ({series} series per cell, {rows} rows each)\n\n"
        f"{null_md}\n\n"
        "CPU per row of the whole `auto` policy (guard, decay tests every 10 rows, Python overhead) on these "
        "series: " + ", ".join(f"{m} {c:.1f} µs" for m, c in cost.items()) + ".\n\n"
        f"## Diverging at T0 (uniform in [400, 1500]): detected within 300 rows, delay in rows ({series} series "
        "per cell)\n\n"
        f"{div_md}\n"
    )
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
