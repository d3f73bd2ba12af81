"""Daemon memory while one log grows to millions of rows (issue 6: "memory stays flat").

For each configuration, one run folder gets a ``metrics.jsonl`` that grows by ``chunk`` rows at
a time (a decaying, noisy loss every row; ``val_loss`` every 50 rows) while the real
``autolr watch`` subprocess tails it. After each chunk the benchmark waits until the daemon's
saved state says it has fed every row (``rows`` in ``autolr.state.json``, saved every 2 s),
then samples the daemon's ``VmRSS``. ``VmHWM`` (peak RSS) is read at the end.

Baselines in the same run: the daemon's RSS right after start-up with the run present and
empty, and its RSS after the first chunk. "Flat" means the RSS after the last chunk is within a
few MB of the RSS after the first one, whatever the number of rows: the engine keeps a bounded
history and the readers read bounded blocks.

Usage::

    python benchmarks/bench_memory.py                       # 10M rows threshold, 10M rows auto (~8 min)
    python benchmarks/bench_memory.py --rows 1000000 --auto-rows 100000   # ~2 min
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Daemon, cpu_seconds, machine_line, md_table, mem_kb  # noqa: E402


def chunk_text(start: int, n: int, rng: random.Random) -> bytes:
    """JSONL rows ``start .. start+n-1``: loss = 0.2 + 2 exp(-step / 300k) + noise."""
    out = []
    for step in range(start, start + n):
        loss = 0.2 + 2.0 * math.exp(-step / 300_000) + rng.gauss(0.0, 0.05)
        if step % 50 == 49:
            out.append(f'{{"step": {step}, "loss": {loss:.6f}, "val_loss": {loss + 0.05:.6f}}}\n')
        else:
            out.append(f'{{"step": {step}, "loss": {loss:.6f}}}\n')
    return "".join(out).encode()


def fed_rows(run: Path) -> int:
    try:
        return int(json.loads((run / "autolr.state.json").read_text())["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def measure(policy: str, rows: int, chunk: int, work: Path, timeout: float) -> dict:
    root = work / policy.replace(":", "_").replace("=", "-").replace(",", "_")
    run = root / "run"
    run.mkdir(parents=True)
    log = run / "metrics.jsonl"
    log.touch()
    rng = random.Random(0)
    samples: list[tuple[int, float, float]] = []  # (rows, RSS MB, daemon CPU s)
    with Daemon(root, ["--policy", policy, "--base-lr", "0.1", "--no-fsync"], work / f"{root.name}.log") as d:
        time.sleep(3.0)  # (the with statement started it: a second start() ran two daemons)
        start_rss = mem_kb(d.pid)["VmRSS"] / 1024
        written = 0
        t0 = time.monotonic()
        while written < rows:
            n = min(chunk, rows - written)
            with open(log, "ab") as f:
                f.write(chunk_text(written, n, rng))
            written += n
            deadline = time.monotonic() + timeout
            while fed_rows(run) < written:
                if d.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited:\n{d.output()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"daemon fed {fed_rows(run)} of {written} rows within {timeout} s")
                time.sleep(0.2)
            samples.append((written, mem_kb(d.pid)["VmRSS"] / 1024, cpu_seconds(d.pid)))
            print(f"  {policy}: {written:>10,} rows  RSS {samples[-1][1]:7.1f} MB  "
                  f"CPU {samples[-1][2]:7.1f} s", flush=True)
        wall = time.monotonic() - t0
        peak = mem_kb(d.pid)["VmHWM"] / 1024
        state_kb = (run / "autolr.state.json").stat().st_size / 1024
    return {"policy": policy, "rows": rows, "chunk": chunk, "start_rss": start_rss, "samples": samples,
            "peak": peak, "wall": wall, "log_mb": log.stat().st_size / 2**20, "state_kb": state_kb}


def report(results: list[dict], command: str) -> str:
    lines = ["# Daemon memory as one log grows", "", machine_line(), "", f"Command: `{command}`", ""]
    rows = []
    for r in results:
        s = r["samples"]
        first, last = s[0], s[-1]
        mid = s[len(s) // 2]
        cpu = last[2] - first[2]
        rows.append([r["policy"], f"{r['rows']:,}", f"{r['log_mb']:.0f}", f"{r['start_rss']:.1f}",
                     f"{first[1]:.1f} ({first[0]:,})", f"{mid[1]:.1f} ({mid[0]:,})", f"{last[1]:.1f}",
                     f"{last[1] - first[1]:+.1f}", f"{last[1] / first[1]:.3f}", f"{r['peak']:.1f}",
                     f"{r['state_kb']:.0f}", f"{(last[0] - first[0]) / cpu:,.0f}" if cpu > 0 else "n/a"])
    lines.append(md_table(["policy", "rows", "log MB", "RSS at start MB (baseline)", "RSS after 1st chunk (rows)",
                           "RSS midway (rows)", "RSS at end MB", "end − 1st chunk MB", "end / 1st chunk",
                           "peak RSS MB", "state file KB", "rows per daemon CPU-s"], rows))
    lines += ["", "Every sample (rows fed → RSS MB):", ""]
    for r in results:
        lines.append(f"- {r['policy']}: " + ", ".join(f"{n:,} → {m:.1f}" for n, m, _ in r["samples"]))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows for the cheap policy")
    ap.add_argument("--chunk", type=int, default=500_000)
    ap.add_argument("--policy", default="plateau:method=threshold")
    ap.add_argument("--auto-rows", type=int, default=10_000_000, help="rows for the stateful trend policy (0: skip)")
    ap.add_argument("--auto-chunk", type=int, default=500_000)
    ap.add_argument("--auto-policy", default="auto")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for one chunk")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "memory.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="autolr-mem-"))
    try:
        results = [measure(args.policy, args.rows, args.chunk, work, args.timeout)]
        if args.auto_rows:
            results.append(measure(args.auto_policy, args.auto_rows, args.auto_chunk, work, args.timeout))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(results, "python benchmarks/bench_memory.py " + " ".join(sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
