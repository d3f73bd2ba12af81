"""How fast could any detector see the plateau? An oracle beside the plateau benchmark's target.

``bench_plateau.py`` asks ``plateau:method=trend`` for a median delay at most half the best
threshold rule's, at a false-positive rate (FPR) of 5% or less. Where it misses, is the
method slow or is the target out of reach? This script runs, on the very same curves (same
seeds, cells and onsets as ``bench_plateau.py`` with its defaults), a detector that is told
what no real one knows:

* the noise model: Gaussian, or AR(1) with its true phi, and the true sigma;
* the curve before the onset, continued past it (the slope and the level it is heading for);

and not the onset itself. At every row it computes the generalised likelihood ratio of "the
decline stopped m rows ago" against "it goes on", maximised over m = 1..``--max-lag``, on
prewhitened residuals (u_t = r_t - phi r_{t-1}; after a stop at row t0 the residual mean grows
by s per row, s(j·(1 - phi) + phi) after whitening). That is the most powerful test of the
stop at each lag. Its alarm threshold is then set with hindsight, per cell, on the curves
themselves, so that exactly the allowed 5% of them alarm before their onset: no real detector
can be calibrated that well. Its median delay (over the other curves) is a lower bound, up to
one approximation, on what any detector with FPR <= 5% can reach on these curves: on the
exponential curves (half of them) it models the departure as linear in the lag (the exact one
needs the onset: it is within j/(2·tau) <= 10% of linear over the first 100 lags).

For Student-t and spike noise a Gaussian likelihood is not the optimal test, so only the
Gaussian and AR(1) cells are computed. The threshold rule's best delay (PyTorch's rule,
patience 10..400, threshold 1e-4 and 0) is recomputed on the same curves, so the target
(half of it) is exact.

Usage::

    python benchmarks/bench_plateau_oracle.py          # the 18 Gaussian and AR(1) cells, 60 curves (~2 min)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, md_table  # noqa: E402
from bench_plateau import FPR_MAX, KINDS, LEVEL, PATIENCES, first_threshold, make_curve  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "plateau_oracle.md"


def continued(kind_shape: str, slope: float, t0: int, n: int) -> np.ndarray:
    """The curve's mean as if the decline went on past the onset (what the oracle is told)."""
    d = t0 - np.arange(n, dtype=float)  # negative after the onset
    if kind_shape == "linear":
        return LEVEL + slope * d
    tau = t0 / 2.0
    return LEVEL + slope * tau * np.expm1(d / tau)


def glr(y: np.ndarray, mean: np.ndarray, slope: float, phi: float, sigma: float, max_lag: int) -> np.ndarray:
    """Per row n: max over m = 1..max_lag of the log-likelihood ratio "stopped m rows ago"."""
    r = y - mean
    u = np.empty_like(r)
    u[0] = r[0] * math.sqrt(1 - phi * phi)
    u[1:] = r[1:] - phi * r[:-1]
    var = sigma * sigma * (1 - phi * phi)
    n = len(u)
    t = np.arange(n, dtype=float)
    s0 = np.concatenate([[0.0], np.cumsum(u)])  # s0[k] = sum of u[:k]
    s1 = np.concatenate([[0.0], np.cumsum(t * u)])
    a = 1.0 - phi
    m = np.arange(1, max_lag + 1, dtype=float)
    e2 = slope * slope * np.cumsum((a * m + phi) ** 2)  # sum of squared whitened departures, lags 1..m
    best = np.full(n, -np.inf)
    for lag in range(1, max_lag + 1):  # the stop happened between rows n-lag and n-lag+1
        hi = np.arange(lag, n)  # rows n with a window of `lag` rows ending at n
        lo = hi - lag  # the last row before the stop
        su0 = s0[hi + 1] - s0[lo + 1]
        su1 = s1[hi + 1] - s1[lo + 1]
        cross = slope * (a * (su1 - lo * su0) + phi * su0)  # sum of u_t · e(t - lo)
        llr = (cross - 0.5 * e2[lag - 1]) / var
        np.maximum(best[lag:], llr, out=best[lag:])
    return best


def cell_result(kind: str, sigma: float, slope: float, ci: int, curves: int, seed: int, t0_min: int,
                t0_max: int, after: int, max_lag: int) -> dict:
    phi = float(kind[2:]) if kind.startswith("ar") else 0.0
    pre, stats, t0s, thresholds = [], [], [], []
    for i in range(curves):
        rng = np.random.default_rng([seed, ci, i])  # exactly bench_plateau's curve i of cell ci
        t0 = int(rng.integers(t0_min, t0_max + 1))
        shape = "linear" if i % 2 == 0 else "exponential"
        y = make_curve(rng, kind, sigma, slope, shape, t0, after)
        g = glr(y, continued(shape, slope, t0, len(y)), slope, phi, sigma, max_lag)
        pre.append(float(g[:t0].max()))
        stats.append(g)
        t0s.append(t0)
        ys = y.tolist()
        thresholds.append({thr: first_threshold(ys, thr) for thr in (1e-4, 0.0)})
    # The alarm level with hindsight: the allowed share of curves alarm before their onset.
    allowed = int(math.floor(FPR_MAX * curves))
    h = sorted(pre)[-(allowed + 1)]
    delays, fp = [], 0
    for g, t0, p in zip(stats, t0s, pre):
        if p > h:
            fp += 1
            continue
        over = np.flatnonzero(g[t0:] > h)
        delays.append(int(over[0]) if over.size else after)
    oracle = float(np.median(delays))
    best = None
    for thr in (1e-4, 0.0):
        for pat in PATIENCES:
            firsts = [res[thr][pat] for res in thresholds]
            n_fp = sum(1 for f, t0 in zip(firsts, t0s) if f is not None and f < t0)
            ds = [(after if f is None else f - t0) for f, t0 in zip(firsts, t0s) if f is None or f >= t0]
            if n_fp / curves <= FPR_MAX and ds:
                med = float(np.median(ds))
                if best is None or med < best[0]:
                    best = (med, f"p={pat} thr={thr:g}")
    return {"kind": kind, "sigma": sigma, "slope": slope, "oracle": oracle, "oracle_fpr": fp / curves,
            "best": best, "h": h}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--curves", type=int, default=60, help="curves per cell (bench_plateau.py's default)")
    ap.add_argument("--kinds", default="gauss,ar0.5,ar0.9")
    ap.add_argument("--sigmas", default="0.01,0.05")
    ap.add_argument("--slopes", default="1e-4,3e-4,1e-3")
    ap.add_argument("--t0-min", type=int, default=1000)
    ap.add_argument("--t0-max", type=int, default=3000)
    ap.add_argument("--after", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-lag", type=int, default=1500)
    ap.add_argument("--out", default=str(RESULTS), help="markdown output ('' to skip)")
    args = ap.parse_args()
    # Cell numbers as bench_plateau.py gives them with its default kinds, sigmas and slopes.
    sigmas = [float(v) for v in args.sigmas.split(",")]
    slopes = [float(v) for v in args.slopes.split(",")]
    all_cells = [(k, s, sl) for k in KINDS for s in sigmas for sl in slopes]
    wanted = args.kinds.split(",")
    t_start = time.perf_counter()
    rows = []
    for ci, (kind, sigma, slope) in enumerate(all_cells):
        if kind not in wanted:
            continue
        r = cell_result(kind, sigma, slope, ci, args.curves, args.seed, args.t0_min, args.t0_max, args.after,
                        args.max_lag)
        target = 0.5 * r["best"][0] if r["best"] else None
        rows.append([kind, f"{sigma:g}", f"{slope:g}", f"{slope * 100 / sigma:.2g}",
                     r["best"][1] if r["best"] else "none", f"{r['best'][0]:.0f}" if r["best"] else "-",
                     f"{target:.0f}" if target is not None else "-", f"{r['oracle']:.0f}",
                     "no" if target is not None and r["oracle"] > target else "yes"])
        print(" | ".join(rows[-1]), flush=True)
    cmd = "python benchmarks/bench_plateau_oracle.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# Plateau detection: an oracle's delay beside the target", "", f"`{cmd.strip()}`", "", machine_line(), "",
        f"The curves of `bench_plateau.py` (seed {args.seed}, {args.curves} per cell). Oracle: the likelihood-ratio "
        "test of a stop at every lag up to "
        f"{args.max_lag}, told the noise model and the curve before the onset, its alarm level set with hindsight "
        "so that 5% of the curves alarm before their onset; median delay over the other curves. "
        f"{time.perf_counter() - t_start:.0f} s.", "",
        md_table(["noise", "sigma", "slope", "decline per 100 rows (sigma)", "best threshold (FPR <= 5%)",
                  "its delay", "target (half)", "oracle delay", "target reachable by the oracle"], rows,
                 "llrrlrrrl"), ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
