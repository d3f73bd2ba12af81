"""What the control file's ``ahead`` list costs the daemon per published decision.

In process, ``Run.feed`` of one row a read (a live log) over 100 run folders round-robin, no
fsync, a decision on every row: CPU microseconds per row (the feed, the decision, the journal
append, the control file replaced), median of 5 rounds. Three logs:

- ``per-step``: a row every step, read as it comes (no ``ahead``: the job is a step ahead at most);
- ``every-10``: a row every 10 steps, a warmup that moves every step (``ahead`` lists ~30 steps);
- ``threshold``: ``plateau:method=threshold`` (decides rarely: the per-row path without publishing).

Compare two trees in one run, interleaved (the machine is noisy):

    for i in 1 2 3; do for t in <old tree> <new tree>; do
        PYTHONPATH=$t python -P benchmarks/bench_ahead.py; done; done
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import autolr
from autolr.config import Settings
from autolr.plugins import policy_classes
from autolr.records import Record
from autolr.run import Run
from autolr.spec import parse_spec

CASES = {  # name -> (policy, steps between rows)
    "per-step": ("step:step_size=1,gamma=0.9999", 1),
    "every-10": ("warmup:steps=100000", 10),
    "threshold": ("plateau:method=threshold", 1),
}


class _Source:
    """What ``Run.feed`` asks of a reader."""

    def __init__(self, path: Path):
        self.path, self.skipped = path, {}

    def columns(self) -> tuple[str, ...]:
        return ("loss",)


def per_row_us(spec: str, stride: int, folders: int = 100, rows: int = 30) -> float:
    """CPU µs per row fed (one row a read), after a first read of 50 rows per run."""
    tmp = Path(tempfile.mkdtemp())
    settings = Settings(policies=(parse_spec(spec),))
    registry = policy_classes()
    runs = []
    for i in range(folders):
        folder = tmp / f"r{i}"
        folder.mkdir()
        run = Run(folder, settings, registry, fsync=False)
        run.manual_by_events = True  # the daemon's inotify mode: no stat of the control file a feed
        runs.append((run, _Source(folder / "m.jsonl")))
    for run, source in runs:
        run.feed(source, [Record({"loss": 1.0}, step=s * stride) for s in range(50)])
    t0 = time.process_time()
    for s in range(50, 50 + rows):
        for run, source in runs:
            run.feed(source, [Record({"loss": 1.0}, step=s * stride)])
    return (time.process_time() - t0) / (rows * folders) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    out = {name: statistics.median(per_row_us(spec, stride) for _ in range(args.rounds))
           for name, (spec, stride) in CASES.items()}
    print(f"{Path(autolr.__file__).parent.parent}: " + ", ".join(f"{k} {v:.1f} us" for k, v in out.items()),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
