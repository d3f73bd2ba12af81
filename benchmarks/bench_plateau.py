"""Plateau detection on synthetic loss curves with a known plateau onset.

Each curve is a per-step loss that declines until a known onset step ``T0`` and is flat
afterwards, plus noise; one row per step, ``T0 + --after`` rows::

    linear:       y(t) = L + s · max(T0 - t, 0)
    exponential:  y(t) = L + s · tau · (exp(max(T0 - t, 0) / tau) - 1),   tau = T0 / 2

so ``s`` is the slope (loss per step) just before the onset for both shapes; the exponential
curve is steeper earlier (7.4·s at t = 0) and decelerates all the way to the onset. L = 1,
T0 uniform in [--t0-min, --t0-max], shapes alternate within a cell. Noise of standard
deviation ``sigma`` (relative to L = 1):

* ``gauss``: Gaussian;
* ``t3``: Student t with 3 degrees of freedom, scaled to standard deviation sigma;
* ``ar0.5``, ``ar0.9``: stationary AR(1) with phi 0.5 / 0.9, marginal standard deviation sigma;
* ``spikes``: Gaussian plus, on 1% of the steps, an upward spike of U(5, 10)·sigma.

A cell is (noise kind, sigma, s); ``s·100/sigma`` (the decline over the last 100 rows before
the onset, in noise sigmas) is what makes a cell easy or hard.

Detectors: autolr's ``plateau`` policy, built by ``autolr.chain.build_chain`` with base LR 1:

* ``method=trend`` at its defaults (window 100, history 1500, slowdown on, every 10,
  confidence 0.95): the headline row;
* ``method=trend`` with ``history=100,slowdown=false``: the method as it was before the
  slowdown / faded tests and the long history (the plain test over the last 100 rows), for
  before/after numbers in the same run;
* ``--trend PARAMS`` adds other ``method=trend`` settings (e.g. ``window=300``), labelled;
* ``method=threshold`` (PyTorch's ReduceLROnPlateau rule) at patience 10, 50, 100, 200, 400
  with PyTorch's default ``threshold=1e-4`` (rel), and the same with ``threshold=0``.

Per curve and detector the benchmark records the first step at which the LR is reduced. A
reduction before ``T0`` is a false positive; otherwise the delay is (first reduction - T0). A
curve with no reduction within the run is a miss: it is counted in the miss rate and its delay
is censored at ``--after`` (a median shown as ">=N" is censored). Median delays are over the
curves without a false positive.

Target (issue): for each cell, among the threshold configurations with FPR <= 5% take the
smallest median delay; the target is met when trend's default has FPR <= 5% and a median delay
<= half of that. A cell where no threshold configuration reaches FPR <= 5% is "no baseline":
met when trend's FPR <= 5%.

Engines. ``--engine chain`` feeds every curve row by row through ``Chain.update`` for every
detector (the real policies: ~7 µs/row for threshold, ~10 µs/row plus the tests for trend).
``--engine fast`` (default) computes the same first-reduction steps with less overhead: the
threshold rule by one pass of PyTorch's recurrence per threshold value (all patiences at
once), the trend method by calling the policy's own ``Plateau.trend_decision`` only on the rows
where the policy tests (every ``every`` rows once ``window`` rows are seen) with the rows it
keeps then. ``--verify K`` (default 1) also runs the real chain on the first K curves of every
cell for every detector and stops with an error if any first-reduction step differs.

Also measured, in the same run: the cost of one trend evaluation (``improvement_test``,
``slowdown_test`` and the policy's whole decision at n = 100 and n = history) beside
``numpy.polyfit`` (degree 1) on the same window, median of repetitions.

Usage::

    python benchmarks/bench_plateau.py                       # 30 cells x 60 curves, 2 workers (~5 min)
    python benchmarks/bench_plateau.py --curves 200          # the results file (~15 min)
    python benchmarks/bench_plateau.py --curves 50 --kinds gauss,ar0.9 --trend window=300
    python benchmarks/bench_plateau.py --engine chain --curves 10
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, md_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "plateau.md"
KINDS = ("gauss", "t3", "ar0.5", "ar0.9", "spikes")
PATIENCES = (10, 50, 100, 200, 400)
FPR_MAX = 0.05
LEVEL = 1.0


# ---- curves --------------------------------------------------------------------------------

def noise(rng: np.random.Generator, kind: str, n: int, sigma: float) -> np.ndarray:
    """``n`` noise values of standard deviation ``sigma`` (marginal, for AR(1))."""
    if kind == "gauss":
        return sigma * rng.standard_normal(n)
    if kind == "t3":
        return sigma * rng.standard_t(3, n) / math.sqrt(3.0)
    if kind.startswith("ar"):
        from scipy.signal import lfilter

        phi = float(kind[2:])
        e = rng.standard_normal(n) * math.sqrt(1 - phi * phi)
        e[0] = rng.standard_normal()  # stationary start
        return sigma * lfilter([1.0], [1.0, -phi], e)
    if kind == "spikes":
        z = sigma * rng.standard_normal(n)
        hit = rng.random(n) < 0.01
        z[hit] += sigma * rng.uniform(5, 10, int(hit.sum()))
        return z
    raise ValueError(f"unknown noise kind {kind!r}")


def make_curve(rng: np.random.Generator, kind: str, sigma: float, slope: float, shape: str,
               t0: int, after: int) -> np.ndarray:
    d = np.maximum(t0 - np.arange(t0 + after, dtype=float), 0.0)
    if shape == "linear":
        mean = LEVEL + slope * d
    else:
        tau = t0 / 2.0
        mean = LEVEL + slope * tau * np.expm1(d / tau)
    return mean + noise(rng, kind, len(d), sigma)


# ---- detectors -----------------------------------------------------------------------------

def parse_params(text: str) -> dict:
    """``"window=400,slowdown=false"`` -> {"window": 400, "slowdown": False}."""
    out: dict = {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        low = raw.strip().lower()
        if low in ("true", "false"):
            out[key.strip()] = low == "true"
        else:
            try:
                out[key.strip()] = int(raw)
            except ValueError:
                out[key.strip()] = float(raw)
    return out


OLD_TREND = {"history": 100, "slowdown": False}  # the method before the slowdown test: last 100 rows only


def detectors(extra: list[dict]) -> list[tuple[str, dict]]:
    """(label, plateau params) of every detector: trend's default first, then the old method."""
    out = [("trend (default)", {}), ("trend, old method (history=100 slowdown=false)", dict(OLD_TREND))]
    for params in extra:
        out.append(("trend " + " ".join(f"{k}={v}" for k, v in params.items()), params))
    for thr in (1e-4, 0.0):
        for p in PATIENCES:
            params = {"method": "threshold", "patience": p}
            if thr != 1e-4:
                params["threshold"] = thr
            out.append((f"threshold p={p} thr={thr:g}", params))
    return out


def first_chain(y: np.ndarray, params: dict) -> int | None:
    """The first step at which the real chain reduces the LR, or None."""
    from autolr.chain import build_chain
    from autolr.records import Record

    chain = build_chain([("plateau", params)], _registry(), base_lr=1.0)
    state = chain.init()
    update = chain.update
    for t, v in enumerate(y.tolist()):
        state, decision = update(state, Record(metrics={"loss": v}, step=t))
        if decision is not None:
            return t
    return None


_REG = None


def _registry():
    global _REG
    if _REG is None:
        from autolr import plugins

        _REG = plugins.policy_classes()
    return _REG


def first_threshold(ys: list[float], threshold: float, patiences=PATIENCES) -> dict[int, int | None]:
    """PyTorch's rule (mode min, rel, cooldown 0), first reduction for every patience at once.

    best starts at +inf; better = y < best · (1 - threshold); num_bad counts rows since the
    last better one; the first reduction for patience p is the first row with num_bad > p.
    """
    pats = sorted(patiences)
    out: dict[int, int | None] = {p: None for p in pats}
    c = 1.0 - threshold
    best, bad, k = math.inf, 0, 0
    nxt = pats[0]
    for i, v in enumerate(ys):
        if v < best * c:
            best, bad = v, 0
        else:
            bad += 1
            if bad > nxt:
                out[nxt] = i
                k += 1
                if k == len(pats):
                    break
                nxt = pats[k]
    return out


def first_trend(y: np.ndarray, params: dict) -> int | None:
    """Plateau method=trend's first reduction: the policy's own ``trend_decision`` called only
    on the rows where it tests (every ``every`` rows once ``window`` rows are seen; one
    observation per row here), on the rows it keeps then (the last ``history``)."""
    from autolr.policies.plateau import Plateau

    pol = Plateau.from_params(params)
    kept, w, every = pol.kept, pol.window, pol.every
    steps = np.arange(len(y), dtype=float)
    for i in range(max(w, every) - 1, len(y), every):
        lo = max(0, i + 1 - kept)
        if pol.trend_decision(y[lo:i + 1], steps[lo:i + 1], "min") is not None:
            return i
    return None


# ---- one chunk of one cell -----------------------------------------------------------------

def run_chunk(task: dict) -> dict:
    kind, sigma, slope = task["kind"], task["sigma"], task["slope"]
    dets = detectors(task["extra"])
    firsts = {label: [] for label, _ in dets}
    t0s = []
    mismatches = []
    verified = 0
    for i in range(task["start"], task["stop"]):
        rng = np.random.default_rng([task["seed"], task["cell"], i])
        t0 = int(rng.integers(task["t0_min"], task["t0_max"] + 1))
        shape = "linear" if i % 2 == 0 else "exponential"
        y = make_curve(rng, kind, sigma, slope, shape, t0, task["after"])
        t0s.append(t0)
        if task["engine"] == "chain":
            got = {label: first_chain(y, params) for label, params in dets}
        else:
            ys = y.tolist()
            got = {}
            for thr in (1e-4, 0.0):
                res = first_threshold(ys, thr)
                for p in PATIENCES:
                    got[f"threshold p={p} thr={thr:g}"] = res[p]
            for label, params in dets:
                if not params.get("method") == "threshold":
                    got[label] = first_trend(y, params)
            if i < task["verify"]:
                verified += 1
                for label, params in dets:
                    real = first_chain(y, params)
                    if real != got[label]:
                        mismatches.append((kind, sigma, slope, i, label, got[label], real))
        for label, _ in dets:
            firsts[label].append(got[label])
    return {"cell": task["cell"], "t0s": t0s, "firsts": firsts, "mismatches": mismatches,
            "verified": verified}


# ---- statistics ----------------------------------------------------------------------------

def summarise(t0s: list[int], firsts: list[int | None], after: int) -> dict:
    n = len(t0s)
    fp = sum(1 for t0, f in zip(t0s, firsts) if f is not None and f < t0)
    delays = [(after if f is None else f - t0) for t0, f in zip(t0s, firsts) if f is None or f >= t0]
    miss = sum(1 for f in firsts if f is None)
    med = float(np.median(delays)) if delays else math.nan
    return {"n": n, "fpr": fp / n, "miss": miss / n, "median": med,
            "censored": bool(delays) and med >= after,
            "p90": float(np.percentile(delays, 90)) if delays else math.nan}


def fmt_delay(s: dict, after: int) -> str:
    if math.isnan(s["median"]):
        return "-"
    return f">={after}" if s["censored"] else f"{s['median']:.0f}"


def judge(stats: dict[str, dict], label_trend: str) -> dict:
    """Best eligible threshold configuration and whether the trend detector meets the target."""
    eligible = [(s["median"], label) for label, s in stats.items()
                if label.startswith("threshold") and s["fpr"] <= FPR_MAX and not math.isnan(s["median"])]
    tr = stats[label_trend]
    out = {"trend": tr, "best": None, "best_label": None}
    if eligible:
        med, label = min(eligible)
        out["best"], out["best_label"] = stats[label], label
        out["met"] = tr["fpr"] <= FPR_MAX and tr["median"] <= 0.5 * med
        out["verdict"] = "met" if out["met"] else "missed"
    else:
        out["met"] = tr["fpr"] <= FPR_MAX
        out["verdict"] = "met (no baseline)" if out["met"] else "missed (no baseline)"
    return out


# ---- cost of one trend evaluation ----------------------------------------------------------

def eval_cost(reps: int) -> list[tuple[str, float]]:
    """Median µs of one trend evaluation and of numpy.polyfit on the same window."""
    from autolr import trend
    from autolr.policies.plateau import Plateau

    pol = Plateau()
    rng = np.random.default_rng(0)
    out = []
    for n in (100, pol.kept):
        x = np.arange(n, dtype=float)
        y = 1.0 + 0.001 * (n - x) + 0.01 * rng.standard_normal(n)
        cases = [(f"`trend.improvement_test`, n={n}", lambda: trend.improvement_test(y, x)),
                 (f"`trend.slowdown_test`, n={n}", lambda: trend.slowdown_test(y, x)),
                 (f"`trend.departure_test`, n={n}", lambda: trend.departure_test(y, x)),
                 (f"`Plateau.trend_decision` (all tests), n={n}", lambda: pol.trend_decision(y, x, "min")),
                 (f"`numpy.polyfit(x, y, 1)`, n={n}", lambda: np.polyfit(x, y, 1))]
        for label, f in cases:
            for _ in range(20):
                f()
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            out.append((label, float(np.median(ts)) * 1e6))
    return out


# ---- main ----------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--curves", type=int, default=60, help="curves per cell (default 60: ~5 min on 2 cores)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="noise kinds, comma-separated")
    ap.add_argument("--sigmas", default="0.01,0.05", help="noise standard deviations (L = 1)")
    ap.add_argument("--slopes", default="1e-4,3e-4,1e-3", help="slopes just before the onset, per step")
    ap.add_argument("--trend", action="append", default=[], metavar="PARAMS",
                    help="an extra method=trend detector, e.g. 'window=400' (repeatable)")
    ap.add_argument("--t0-min", type=int, default=1000)
    ap.add_argument("--t0-max", type=int, default=3000)
    ap.add_argument("--after", type=int, default=1500, help="rows after the onset")
    ap.add_argument("--engine", choices=("fast", "chain"), default="fast")
    ap.add_argument("--verify", type=int, default=1, help="curves per cell checked against the real chain (fast engine)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=10, help="curves per task")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cost-reps", type=int, default=2000)
    ap.add_argument("--out", default=str(RESULTS), help="markdown output ('' to skip)")
    args = ap.parse_args()

    kinds = [k for k in args.kinds.split(",") if k]
    sigmas = [float(v) for v in args.sigmas.split(",") if v]
    slopes = [float(v) for v in args.slopes.split(",") if v]
    extra = [parse_params(t) for t in args.trend]
    dets = detectors(extra)
    default_label = dets[0][0]
    cells = [(k, s, sl) for k in kinds for s in sigmas for sl in slopes]

    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    costs = eval_cost(args.cost_reps)
    tasks = []
    for ci, (kind, sigma, slope) in enumerate(cells):
        for start in range(0, args.curves, args.chunk):
            tasks.append({"cell": ci, "kind": kind, "sigma": sigma, "slope": slope, "start": start,
                          "stop": min(start + args.chunk, args.curves), "seed": args.seed,
                          "t0_min": args.t0_min, "t0_max": args.t0_max, "after": args.after,
                          "engine": args.engine, "extra": extra,
                          "verify": args.verify if args.engine == "fast" else 0})
    tasks.sort(key=lambda t: (t["start"], t["cell"]))  # interleave cells: even load on the workers
    t0s = {ci: [] for ci in range(len(cells))}
    firsts = {ci: {label: [] for label, _ in dets} for ci in range(len(cells))}
    mismatches, verified = [], 0
    cpu0 = os.times()
    ctx = mp.get_context("fork")
    with ctx.Pool(args.workers) as pool:
        for res in pool.imap_unordered(run_chunk, tasks):
            mismatches += res["mismatches"]
            verified += res["verified"]
            ci = res["cell"]
            t0s[ci] += res["t0s"]
            for label in firsts[ci]:
                firsts[ci][label] += res["firsts"][label]
        pool.close()
        pool.join()
    cpu1 = os.times()
    cpu = (cpu1.children_user + cpu1.children_system) - (cpu0.children_user + cpu0.children_system)
    elapsed = time.perf_counter() - t_start
    load_after = os.getloadavg()[0]

    stats = {ci: {label: summarise(t0s[ci], firsts[ci][label], args.after) for label, _ in dets}
             for ci in range(len(cells))}
    old_label = dets[1][0]
    verdicts = {ci: judge(stats[ci], default_label) for ci in range(len(cells))}
    old_verdicts = {ci: judge(stats[ci], old_label) for ci in range(len(cells))}

    cmd = "python benchmarks/bench_plateau.py " + " ".join(sys.argv[1:])
    lines = ["# Plateau detection on synthetic curves with a known onset", "",
             f"`{cmd.strip()}`", "", machine_line(), "",
             f"{len(cells)} cells x {args.curves} curves, T0 uniform in [{args.t0_min}, {args.t0_max}], "
             f"{args.after} rows after the onset, L = 1, shapes alternating linear / exponential "
             f"(tau = T0/2); engine {args.engine}"
             + (f", {verified} curves x {len(dets)} detectors checked against the real chain: "
                f"{'all identical' if not mismatches else f'{len(mismatches)} MISMATCHES'}" if args.engine == "fast" else "")
             + f". {elapsed:.0f} s wall with {args.workers} workers ({cpu:.0f} s CPU in the workers; "
             f"load average {load_before:.1f} before, {load_after:.1f} after).", "",
             "Cost of one evaluation (median of repetitions, this run):", "",
             md_table(["call", "µs"], [(label, f"{us:.0f}") for label, us in costs]), "",
             "FPR: share of curves whose first LR reduction comes before the onset. Delay: first reduction - T0, "
             "median over the curves without a false positive; misses (no reduction in the run) are censored at "
             f"{args.after}. Target: trend's default has FPR <= 5% and a median delay <= half the "
             "best median delay among the threshold configurations with FPR <= 5% (\"no baseline\": none has; "
             "then met when trend's FPR <= 5%). \"old method\" is method=trend as it was before the slowdown "
             "test and the long history (`history=100,slowdown=false`: the plain test over the last 100 rows).", ""]

    lines += ["## Summary", ""]
    rows = []
    for ci, (kind, sigma, slope) in enumerate(cells):
        v, o = verdicts[ci], old_verdicts[ci]
        tr, best, old = v["trend"], v["best"], o["trend"]
        rows.append([kind, f"{sigma:g}", f"{slope:g}", f"{slope * 100 / sigma:.2g}",
                     f"{tr['fpr']:.1%}", fmt_delay(tr, args.after),
                     f"{old['fpr']:.1%}", fmt_delay(old, args.after),
                     v["best_label"].replace("threshold ", "") if best else "none",
                     f"{best['fpr']:.1%}" if best else "-", fmt_delay(best, args.after) if best else "-",
                     f"{0.5 * best['median']:.0f}" if best else "-", v["verdict"], o["verdict"]])
    lines.append(md_table(["noise", "sigma", "slope", "decline per 100 rows (sigma)", "trend FPR", "trend delay",
                           "old FPR", "old delay", "best threshold", "its FPR", "its delay", "target delay",
                           "target (trend)", "target (old method)"], rows, "llrrrrrrlrrrll"))
    lines += ["", "Target met, by noise kind:", ""]
    rows = []
    for kind in kinds + ["all"]:
        cis = [ci for ci, c in enumerate(cells) if kind in ("all", c[0])]
        rows.append([kind, f"{sum(verdicts[ci]['met'] for ci in cis)}/{len(cis)}",
                     f"{sum(old_verdicts[ci]['met'] for ci in cis)}/{len(cis)}",
                     sum(verdicts[ci]["best"] is None for ci in cis)])
    lines.append(md_table(["noise", "trend (default)", "old method", "cells without a threshold baseline"], rows))

    lines += ["", "## Per cell: FPR / median delay (miss rate when > 0)", ""]
    for kind in kinds:
        cis = [ci for ci, c in enumerate(cells) if c[0] == kind]
        headers = ["detector"] + [f"sigma={cells[ci][1]:g} s={cells[ci][2]:g}" for ci in cis]
        rows = []
        for label, _ in dets:
            row = [label]
            for ci in cis:
                s = stats[ci][label]
                cell = f"{s['fpr']:.1%} / {fmt_delay(s, args.after)}"
                if s["miss"] > 0:
                    cell += f" (miss {s['miss']:.0%})"
                row.append(cell)
            rows.append(row)
        lines += [f"### {kind}", "", md_table(headers, rows), ""]
    if mismatches:
        lines += ["## Mismatches against the real chain", ""]
        lines += [f"- {m}" for m in mismatches[:50]]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
