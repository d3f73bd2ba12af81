"""Daemon restart cost against the length of a run's journal (issue 6: kill and restart).

A per-row schedule (``step:step_size=1,gamma=0.99999``: a decision on every row, as cosine,
exponential or a warmup make) journals one entry per log row, so a long run's journal holds
millions of entries. For journals of each size N, one run folder is prepared once (N JSONL
rows, caught up by ``autolr watch --once``), copied, and restarted with ``autolr watch --once
--no-fsync`` (a real subprocess; CPU and peak RSS from ``wait4``):

* **state kept, 100 new rows**: the usual restart. The saved state's seq locates the entries
  to match from the journal's end; the cost should not grow with N.
* **state lost**: ``autolr.state.json`` deleted (a crash before the first save, an upgrade
  that changes the state format): the whole log is replayed and matched against the whole
  journal, so no decision is published twice. CPU grows with N; memory should not.

Baselines in the same run: ``python -c "import autolr.cli"`` (the interpreter and imports), and,
with ``--before REV``, the same restarts by the code of git revision REV (a ``git archive``
snapshot run with ``PYTHONPATH``), interleaved with the current tree's. Median of ``--repeat``.

Usage::

    python benchmarks/bench_restart.py --before 410b2dc          # ~4 min
    python benchmarks/bench_restart.py --sizes 10000,100000 --repeat 1   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_revision, machine_line, md_table, median  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
POLICY = "step:step_size=1,gamma=0.99999"
#: The child reports its own peak RSS (VmHWM of its own memory map) at exit: wait4's maxrss
#: would also count the benchmark's memory, which a forked child holds until its exec.
_PEAK = "import atexit, sys; atexit.register(lambda: sys.stderr.write('\\n' + open('/proc/self/status').read()))"
WATCH = ["-c", _PEAK + "; from autolr.cli import main; main(sys.argv[1:], prog_name='autolr')",
         "watch", "--once", "--no-fsync", "--policy", POLICY, "--base-lr", "0.1"]
IMPORTS = ["-c", _PEAK + "; import autolr.cli"]


def rows_text(start: int, n: int) -> bytes:
    return "".join(f'{{"step": {s}, "loss": {1.0 / (1.0 + 0.001 * s):.6f}}}\n' for s in range(start, start + n)).encode()


def timed(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; its CPU seconds (wait4), peak RSS (MB, its VmHWM) and wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} failed:\n{err[-2000:]}")
    peak = [line.split()[1] for line in err.splitlines() if line.startswith("VmHWM:")]
    return {"cpu": usage.ru_utime + usage.ru_stime, "rss": int(peak[-1]) / 1024, "wall": wall}


def _link_log(src: str, dst: str) -> None:
    if os.path.basename(src) == "metrics.jsonl":
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def journal_lines(run: Path) -> list[bytes]:
    return (run / "autolr.decisions.jsonl").read_bytes().splitlines()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="journal entries (log rows), comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--before", help="git revision to compare with, in the same run")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "restart.md")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="autolr-restart-"))
    trees = {"now": ROOT}
    if args.before:
        snap = work / "before"
        snap.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "autolr"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
        trees[f"before ({args.before})"] = snap
    envs = {name: dict(os.environ, PYTHONPATH=str(tree)) for name, tree in trees.items()}
    py = [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]
    results: dict[tuple, list[dict]] = {}
    try:
        for name, env in envs.items():
            for _ in range(args.repeat):
                results.setdefault(("imports", name, 0), []).append(timed([*py, *IMPORTS], env))
        for n in sizes:
            ready = work / f"ready-{n}"
            (ready / "run").mkdir(parents=True)
            (ready / "run" / "metrics.jsonl").write_bytes(rows_text(0, n))
            built = timed([*py, *WATCH, str(ready)], envs["now"])
            print(f"N={n:,}: first catch-up {built['cpu']:.1f} s CPU, {built['rss']:.0f} MB", flush=True)
            size = (ready / "run" / "metrics.jsonl").stat().st_size
            reference = journal_lines(ready / "run")
            assert len(reference) == n + 1, len(reference)
            for rep in range(args.repeat):
                for name, env in envs.items():  # interleaved: the machine's drift hits both alike
                    for case in ("state kept, 100 new rows", "state lost"):
                        root = work / f"case-{n}-{rep}"
                        shutil.rmtree(root, ignore_errors=True)
                        # The log hard-linked (the saved state knows its inode: a copy would be
                        # a replaced log, read again from the start), the run's own files copied.
                        shutil.copytree(ready, root, copy_function=_link_log)
                        if case == "state lost":
                            (root / "run" / "autolr.state.json").unlink()
                        else:
                            with open(root / "run" / "metrics.jsonl", "ab") as f:
                                f.write(rows_text(n, 100))
                        try:
                            r = timed([*py, *WATCH, str(root)], env)
                        finally:
                            os.truncate(root / "run" / "metrics.jsonl", size)  # the shared log as it was
                        got = journal_lines(root / "run")
                        want = n + 1 + (100 if case != "state lost" else 0)
                        seqs = [json.loads(x)["seq"] for x in got]
                        r["ok"] = len(got) == want and seqs == list(range(1, want + 1)) and got[: n + 1] == reference
                        results.setdefault((case, name, n), []).append(r)
                        print(f"  {name:>20} {case:>26}: {r['cpu']:6.2f} s CPU {r['rss']:7.1f} MB "
                              f"{'ok' if r['ok'] else 'JOURNAL WRONG'}", flush=True)
                        shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = []
    base = {name: median([r["rss"] for r in results[("imports", name, 0)]]) for name in envs}
    for (case, name, n), rs in results.items():
        cpu, rss = median([r["cpu"] for r in rs]), median([r["rss"] for r in rs])
        ok = "" if case == "imports" else ("yes" if all(r["ok"] for r in rs) else "**no**")
        table.append([case, name, f"{n:,}" if n else "", f"{cpu:.2f}", f"{rss:.1f}", f"{rss - base[name]:+.1f}", ok])
    command = "python benchmarks/bench_restart.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# Restart cost against the journal's length", "", machine_line(), "",
        f"autolr {git_revision()}. Command: `{command}`. Policy `{POLICY}` (a decision on every row); "
        f"median of {args.repeat}.", "",
        md_table(["restart", "code", "journal entries", "CPU s", "peak RSS MB", "over the imports MB",
                  "journal exact"], table), "",
        "\"journal exact\": every entry once, seqs 1..n in order, the old entries byte for byte.", ""])
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
