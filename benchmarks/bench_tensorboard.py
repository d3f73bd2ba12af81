"""Reading speed of autolr's TensorBoard reader against the tensorboard package's own loaders.

Writes one event file with torch's ``SummaryWriter`` (``--events`` scalar events, 4 tags per
step: ``train/loss``, ``train/acc``, ``lr``, ``epoch``), then reads it whole, in one process:

* autolr ``TensorBoardReader`` (``read()`` while ``more``), ``--reps`` runs;
* tensorboard ``EventFileLoader`` (what TensorBoard's backend uses: pure-Python CRC, protobuf
  parse, simple_value migrated to tensors) and ``LegacyEventFileLoader`` (the same without the
  migration), ``--tb-reps`` runs each. Their values are only counted, not decoded.

Runs are interleaved (one of each in turn) so a busy machine slows all alike. The table gives
process CPU time (steadier on a shared machine) and wall time, median and minimum; rows/s and
the speed-up use the CPU medians.

Rows are scalar values. Also prints the share of autolr's time spent on CRC32C (headers and
data, numpy lanes) and what a pure-Python table CRC would cost on the same records.

Usage::

    python benchmarks/bench_tensorboard.py                 # 200k events, about 2 minutes
    python benchmarks/bench_tensorboard.py --events 20000  # smoke test
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from autolr.readers import tensorboard as tbmod
from autolr.readers.tensorboard import TensorBoardReader

warnings.filterwarnings("ignore")


def generate(folder: Path, events: int) -> Path:
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(str(folder), max_queue=1000, flush_secs=3600)
    for step in range(events // 4):
        w.add_scalar("train/loss", 1.0 / (step + 1), step)
        w.add_scalar("train/acc", step * 1e-6, step)
        w.add_scalar("lr", 0.1 * 0.999 ** (step % 1000), step)
        w.add_scalar("epoch", step // 1000, step)
    w.close()
    return next(folder.glob("*tfevents*"))


def read_autolr(path: Path) -> int:
    reader = TensorBoardReader(path)
    reader.idle_seconds = 0
    values = 0
    while True:
        for r in reader.read():
            values += len(r.metrics) + (r.epoch is not None)
        if not reader.more:
            break
    assert not reader.skipped
    return values


def read_tensorboard(path: Path, legacy: bool) -> int:
    from tensorboard.backend.event_processing import event_file_loader as efl
    loader = efl.LegacyEventFileLoader(str(path)) if legacy else efl.EventFileLoader(str(path))
    values = 0
    for event in loader.Load():
        for v in event.summary.value:
            if v.WhichOneof("value") in ("simple_value", "tensor"):
                values += 1
    return values


def timed(loaders: dict, reps: dict) -> tuple[dict, dict, dict]:
    """Wall and CPU seconds per run of each loader, runs interleaved (one of each in turn)."""
    wall: dict = {name: [] for name in loaders}
    cpu: dict = {name: [] for name in loaders}
    rows: dict = {}
    for i in range(max(reps.values())):
        for name, fn in loaders.items():
            if i < reps[name]:
                t, c = time.perf_counter(), time.process_time()
                rows[name] = fn()
                cpu[name].append(time.process_time() - c)
                wall[name].append(time.perf_counter() - t)
    return wall, cpu, rows


def crc_figures(path: Path) -> tuple[float, float, int]:
    """(numpy CRC CPU seconds for all headers+data, pure-Python estimate, records)."""
    data = path.read_bytes()
    arr = np.frombuffer(data, dtype=np.uint8)
    starts, pos = [], 0
    while pos + 12 <= len(data):
        starts.append(pos)
        pos += 16 + struct.unpack_from("<Q", data, pos)[0]
    s = np.array(starts, dtype=np.int64)
    n = tbmod._stored_u64(arr, s)
    t = time.process_time()
    tbmod.masked_crcs(arr, s, np.full(len(s), 8))
    tbmod.masked_crcs(arr, s + 12, n)
    numpy_s = time.process_time() - t
    sample = starts[: min(len(starts), 20000)]
    t = time.process_time()
    for p in sample:
        length = struct.unpack_from("<Q", data, p)[0]
        tbmod.masked_crc32c(data[p : p + 8])
        tbmod.masked_crc32c(data[p + 12 : p + 12 + length])
    python_s = (time.process_time() - t) * len(starts) / len(sample)
    return numpy_s, python_s, len(starts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tb-reps", type=int, default=3)
    args = ap.parse_args()
    import tensorboard
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = generate(Path(tmp), args.events)
        gen_s = time.perf_counter() - t
        size = os.path.getsize(path)
        loaders = {
            "autolr TensorBoardReader": lambda: read_autolr(path),
            "tensorboard LegacyEventFileLoader": lambda: read_tensorboard(path, True),
            "tensorboard EventFileLoader": lambda: read_tensorboard(path, False),
        }
        reps = dict.fromkeys(loaders, args.tb_reps)
        reps["autolr TensorBoardReader"] = args.reps
        wall, cpu, counts = timed(loaders, reps)
        crc_np, crc_py, records = crc_figures(path)
    rows = args.events // 4 * 4
    assert set(counts.values()) == {rows}, counts
    ours = statistics.median(cpu["autolr TensorBoardReader"])
    print(f"python {platform.python_version()}, numpy {np.__version__}, tensorboard {tensorboard.__version__}, "
          f"torch {torch.__version__}, {platform.machine()} {os.cpu_count()} CPUs; "
          f"{rows} scalar events, {records} records, {size / 1e6:.1f} MB (written in {gen_s:.0f} s)\n")
    print("| loader | runs | CPU s median (min) | wall s median (min) | rows/s (CPU median) | autolr speed-up (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in loaders:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        print(f"| {name} | {len(cpu[name])} | {c:.2f} ({min(cpu[name]):.2f}) | {w:.2f} ({min(wall[name]):.2f}) "
              f"| {rows / c:,.0f} | {c / ours:.1f}x |")
    print(f"\nCRC32C of all {records} headers and payloads: {crc_np:.2f} CPU s with numpy lanes "
          f"(~{crc_np / ours:.0%} of autolr's read); a pure-Python table loop would take ~{crc_py:.1f} s.")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
