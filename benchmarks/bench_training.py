"""Real training on the CPU with PyTorch: autolr ``auto`` and ``plateau`` against PyTorch schedules.

Three tasks, all on data that ships inside installed packages (nothing is downloaded):

- ``mlp``: a 64-128-128-10 ReLU MLP on scikit-learn's digits (1797 8x8 images; a fixed split of
  1437 train / 360 validation), SGD with momentum 0.9, batch 32;
- ``cnn``: a two-layer CNN (16 and 32 3x3 channels, max-pool, linear) on the same digits as
  1x8x8 images, SGD with momentum 0.9, batch 32;
- ``charlm``: a one-layer pre-LN causal transformer (d=48, 4 heads, context 32) predicting the
  next character of Python's own standard-library source (a fixed list of modules, ASCII;
  every 10th 2 KiB block is validation), Adam, batch 16.

Optimiser choice: SGD with momentum is the usual baseline for small MLPs/CNNs; Adam is what
small transformers are trained with (SGD hardly trains them in a few hundred steps). The
learning-rate grid is the textbook default times {0.1, 1, 10} (SGD: 0.1; Adam: 3e-3), a 100x
span whose top value is aggressive; it was fixed before any result was seen.

Schedules, each a fresh run from the same initial weights and batch order per seed:
``constant``; ``StepLR`` (step_size = steps/3, gamma 0.1); ``CosineAnnealingLR``
(T_max = steps); ``ReduceLROnPlateau`` with PyTorch's defaults, stepped on the validation loss
at each evaluation; autolr ``plateau`` with its defaults; autolr ``auto`` with its defaults.
The autolr chains are built exactly as the daemon builds them
(``Settings(policies=...).chain(policy_classes())`` then ``RunEngine``) and fed one
``Record(metrics={"loss": ..., "val_loss": ...}, step=step)`` per optimiser step: the rows a
training log would hold (train loss every step, validation loss every ``--eval-every``
steps). Before each step the optimiser's LR is base_lr x engine.scale. The daemon runs the same
decision code and adds only file I/O; at the end the benchmark also writes a JSONL log of one
closed-loop run per autolr schedule (mlp, lr=1, seed 0: the guard acts there) and checks that
``autolr replay`` (the daemon's code path over a finished log) gives the same LR at every row.
``--schedules auto,autolr:auto:min_window=40`` runs any other autolr chain beside them
(``autolr:SPEC+SPEC``), for ablations.

Reported per task x LR x schedule: the final validation loss (median over seeds, with the
range), the steps to reach the task's target validation loss (the 25th percentile of the final
validation losses of the four PyTorch schedules over all LRs and seeds, so the target does not
move when autolr changes) and the number of diverged seeds (the loss became non-finite, or the
final validation loss is above 0.9x the initial one: no better than an untrained network; a
network killed by a too-high LR ends at the class prior, a hair below its initial loss). Verdicts:

1. ``auto`` is at least as good as ReduceLROnPlateau (median final validation loss at most
   1% above) in at least 80% of task x LR cases;
2. ``auto`` never diverges where the run could have been saved: where another schedule at the
   same LR and seed, or the constant LR at a lower grid value, did not diverge.

Results: ``benchmarks/results/training.md`` (tables), ``training.png`` (validation curves and
LR traces), ``training.json`` (every run, with autolr's decisions and their reasons). When
``benchmarks/results/training.before.json`` is present (the ``auto`` runs of an earlier
revision of the policy, ``--baseline``), a before/after section compares them with this run's.

Usage::

    python benchmarks/bench_training.py          # 3 tasks x 3 LRs x 6 schedules x 3 seeds: ~480 CPU-s, 2 workers
    python benchmarks/bench_training.py --tasks mlp --seeds 1 --no-check-replay      # ~20 s
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_revision, machine_line, md_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULES = ("constant", "step", "cosine", "rlrop", "plateau", "auto")
LABELS = {"constant": "constant", "step": "StepLR", "cosine": "CosineAnnealingLR",
          "rlrop": "ReduceLROnPlateau", "plateau": "autolr plateau", "auto": "autolr auto"}
TORCH_SCHEDULES = ("constant", "step", "cosine", "rlrop")
TOLERANCE = 0.01  # auto counts as "at least as good" up to 1% above ReduceLROnPlateau
TARGET_SHARE = 0.80
FAILED = 0.9  # a run whose final validation loss is above 0.9 x the initial one counts as diverged

# Modules whose source text is the language model's corpus (all in CPython 3.11's stdlib).
LM_MODULES = ("argparse.py", "textwrap.py", "functools.py", "dataclasses.py", "inspect.py", "pathlib.py",
              "typing.py", "json/decoder.py", "json/encoder.py", "collections/__init__.py", "shutil.py",
              "subprocess.py")


@dataclass(frozen=True)
class Task:
    name: str
    steps: int
    batch: int
    optimizer: str
    lrs: tuple[float, ...]
    what: str


TASKS = {
    "mlp": Task("mlp", 2000, 32, "sgd", (0.01, 0.1, 1.0), "MLP 64-128-128-10 on sklearn digits, SGD m=0.9"),
    "cnn": Task("cnn", 1200, 32, "sgd", (0.01, 0.1, 1.0), "CNN 16-32 ch on digits as 1x8x8, SGD m=0.9"),
    "charlm": Task("charlm", 800, 16, "adam", (3e-4, 3e-3, 3e-2),
                   "1-layer transformer char LM (d=48, ctx 32) on stdlib source, Adam"),
}


# ---- data ------------------------------------------------------------------------------------

_DATA: dict[str, tuple] = {}


def digits():
    if "digits" not in _DATA:
        import torch
        from sklearn.datasets import load_digits

        d = load_digits()
        order = np.random.default_rng(0).permutation(len(d.target))
        x = torch.tensor(d.data[order] / 16.0, dtype=torch.float32)
        y = torch.tensor(d.target[order], dtype=torch.long)
        n_val = 360
        _DATA["digits"] = (x[n_val:], y[n_val:], x[:n_val], y[:n_val])
    return _DATA["digits"]


def stdlib_text() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [(root / m).read_text(encoding="utf-8", errors="replace") for m in LM_MODULES]
    return "".join(parts)


def chars(ctx: int = 32, n_val_windows: int = 128):
    if "chars" not in _DATA:
        import torch

        text = stdlib_text()
        codes = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8).astype(np.int64)
        block = 2048
        blocks = [codes[i:i + block] for i in range(0, len(codes), block)]
        train = np.concatenate([b for i, b in enumerate(blocks) if i % 10 != 9])
        val = np.concatenate([b for i, b in enumerate(blocks) if i % 10 == 9])
        stride = (len(val) - ctx - 1) // n_val_windows
        vx = np.stack([val[i * stride:i * stride + ctx + 1] for i in range(n_val_windows)])
        _DATA["chars"] = (torch.from_numpy(train), torch.from_numpy(vx), len(text))
    return _DATA["chars"]


# ---- models ----------------------------------------------------------------------------------

def build_model(task: str):
    import torch
    from torch import nn

    if task == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    if task == "cnn":
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(32 * 4 * 4, 10))

    class CharTransformer(nn.Module):
        def __init__(self, vocab=128, d=48, heads=4, ctx=32):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
            layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
            self.body = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            self.out = nn.Linear(d, vocab)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx))

        def forward(self, x):
            t = x.shape[1]
            h = self.body(self.embed(x) + self.pos[:t], mask=self.mask[:t, :t], is_causal=True)
            return self.out(self.norm(h))

    return CharTransformer()


# ---- one run ---------------------------------------------------------------------------------

def run_one(task_name: str, lr: float, schedule: str, seed: int, steps: int, eval_every: int,
            log_path: str | None = None) -> dict:
    import torch
    from torch.nn import functional as F

    torch.set_num_threads(1)
    task = TASKS[task_name]
    torch.manual_seed(seed)
    model = build_model(task_name)
    rng = np.random.default_rng(10_000 + seed)  # batch order: same for every schedule of a seed
    if task_name == "charlm":
        train, val_windows, _ = chars()
        ctx = 32
        offsets = rng.integers(0, len(train) - ctx - 1, size=(steps, task.batch))
        ar = torch.arange(ctx + 1)

        def batch(i):
            w = train[torch.from_numpy(offsets[i])[:, None] + ar]
            return w[:, :-1], w[:, 1:]

        def loss_of(out, y):
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

        vx, vy = val_windows[:, :-1], val_windows[:, 1:]
    else:
        xtr, ytr, vx, vy = digits()
        per_epoch = len(ytr) // task.batch
        perms = [rng.permutation(len(ytr)) for _ in range(steps // per_epoch + 1)]

        def batch(i):
            e, k = divmod(i, per_epoch)
            idx = torch.from_numpy(perms[e][k * task.batch:(k + 1) * task.batch])
            return xtr[idx], ytr[idx]

        loss_of = F.cross_entropy

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            v = float(loss_of(model(vx), vy))
        model.train()
        return v

    if task.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = engine = None
    if schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(steps // 3, 1), gamma=0.1)
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    elif schedule == "rlrop":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)  # PyTorch's defaults
    elif schedule in ("plateau", "auto") or schedule.startswith("autolr:"):
        from autolr.config import Settings
        from autolr.engine import RunEngine
        from autolr.plugins import policy_classes
        from autolr.records import Record
        from autolr.spec import parse_spec

        # "autolr:SPEC+SPEC" is any chain (ablations); "plateau"/"auto" are the defaults
        specs = [parse_spec(x) for x in schedule.removeprefix("autolr:").split("+")]
        engine = RunEngine(Settings(policies=tuple(specs)).chain(policy_classes()))
    log = open(log_path, "w") if log_path else None

    init_val = evaluate()
    lrs: list[tuple[int, float]] = []  # (step, lr) at every change; the LR used from that step on
    vals: list[tuple[int, float]] = []
    train_curve: list[tuple[int, float]] = []
    decisions: list[dict] = []
    acc, n_acc = 0.0, 0
    diverged_at = None
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        step = i + 1  # the log's step: optimizer updates done after this one
        if engine is not None:
            for group in opt.param_groups:
                group["lr"] = lr * engine.scale
        cur = opt.param_groups[0]["lr"]
        if not lrs or lrs[-1][1] != cur:
            lrs.append((i, cur))
        x, y = batch(i)
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model(x), y)
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
        metrics = {"loss": loss_v}
        acc += loss_v
        n_acc += 1
        if step % eval_every == 0 or step == steps:
            v = evaluate()
            metrics["val_loss"] = v
            vals.append((step, v))
            train_curve.append((step, acc / n_acc))
            acc, n_acc = 0.0, 0
        if log is not None:
            log.write(json.dumps({"step": step, **metrics}) + "\n")
        if sched is not None:
            if schedule == "rlrop":
                if "val_loss" in metrics:
                    sched.step(metrics["val_loss"])
            else:
                sched.step()
        elif engine is not None:
            for d in engine.feed(Record(metrics=metrics, step=step)):
                decisions.append({"step": d.step, "scale": d.scale, "policy": d.policy, "reason": d.reason})
        if not math.isfinite(loss_v):
            diverged_at = step  # the weights are no longer finite: nothing can recover this run
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if log is not None:
        log.close()
    final = vals[-1][1] if vals and diverged_at is None else math.nan
    if diverged_at is not None:
        vals.append((diverged_at, math.nan))
    # diverged: non-finite, or ended no better than the untrained network (a dead network sits at
    # the class prior, a hair below the initial loss)
    diverged = not math.isfinite(final) or final > FAILED * init_val
    return {"task": task_name, "lr": lr, "schedule": schedule, "seed": seed, "steps": steps,
            "init_val": init_val, "final_val": final, "diverged": diverged, "diverged_at": diverged_at,
            "vals": vals, "train": train_curve, "lrs": lrs, "decisions": decisions, "wall": wall, "cpu": cpu}


def slim(run: dict, every: int = 25) -> dict:
    """A run for the JSON file: the LR sampled every ``every`` steps, warmup-ramp decisions
    counted rather than listed, no training curve, floats to 5 significant digits."""
    run = dict(run)
    trace, sampled, k = run["lrs"], [], 0
    for step in range(0, run["steps"], every):
        while k + 1 < len(trace) and trace[k + 1][0] <= step:
            k += 1
        if trace and (not sampled or sampled[-1][1] != trace[k][1]):
            sampled.append((step, trace[k][1]))
    run["lrs"] = sampled
    ramp = [d for d in run["decisions"] if d["reason"].startswith(f"{run['schedule']}: factor ")]
    run["decisions"] = [d for d in run["decisions"] if d not in ramp]
    run["ramp_decisions"] = len(ramp)
    run.pop("train", None)

    def r(x):
        if isinstance(x, float):
            return float(f"{x:.5g}") if math.isfinite(x) else None
        if isinstance(x, (list, tuple)):
            return [r(v) for v in x]
        if isinstance(x, dict):
            return {k: r(v) for k, v in x.items()}
        return x
    return r(run)


def unslim(run: dict) -> dict:
    """A run read back from JSON: None (a non-finite float) to NaN."""
    nan = math.nan
    return dict(run, final_val=nan if run["final_val"] is None else run["final_val"],
                vals=[(st, nan if v is None else v) for st, v in run["vals"]])


def _job(args):
    return run_one(*args)


def _init_worker():
    import torch

    from autolr.plugins import policy_classes

    torch.set_num_threads(1)
    policy_classes()  # import autolr (and scipy, for the trend test) once, outside the timed runs
    from autolr import trend  # noqa: F401


# ---- reporting -------------------------------------------------------------------------------

def schedules_of(runs) -> list[str]:
    present = {r["schedule"] for r in runs}
    return [s for s in SCHEDULES if s in present] + sorted(present - set(SCHEDULES))


def med(xs):
    xs = [x for x in xs]
    if any(not math.isfinite(x) for x in xs):
        # NaN (diverged) sorts above everything: the median of [1, 2, nan] is 2, of [1, nan, nan] nan
        xs = sorted(xs, key=lambda x: (not math.isfinite(x), x if math.isfinite(x) else 0))
        return xs[(len(xs) - 1) // 2] if len(xs) % 2 else (
            statistics.fmean(xs[len(xs) // 2 - 1:len(xs) // 2 + 1]))
    return statistics.median(xs)


def fmt(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return "diverged" if math.isnan(x) else str(x)
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def steps_to(run, target):
    for step, v in run["vals"]:
        if math.isfinite(v) and v <= target:
            return step
    return None


def analyse(runs: list[dict], tasks: list[str]) -> dict:
    out = {"targets": {}, "cells": {}, "cases": [], "saveable": []}
    by = {}
    for r in runs:
        by.setdefault((r["task"], r["lr"], r["schedule"]), []).append(r)
    for t in tasks:
        finals = [r["final_val"] for r in runs if r["task"] == t and r["schedule"] in TORCH_SCHEDULES
                  and not r["diverged"]]
        out["targets"][t] = float(np.percentile(finals, 25)) if finals else math.nan
    for (t, lr, s), rs in by.items():
        rs.sort(key=lambda r: r["seed"])
        target = out["targets"][t]
        reach = [steps_to(r, target) for r in rs]
        got = sorted(x for x in reach if x is not None)
        out["cells"][(t, lr, s)] = {
            "final": med([r["final_val"] for r in rs]),
            "lo": min((r["final_val"] for r in rs), key=lambda x: x if math.isfinite(x) else math.inf),
            "hi": max((r["final_val"] for r in rs), key=lambda x: x if math.isfinite(x) else math.inf),
            "reach": got[(len(rs) - 1) // 2] if len(got) > (len(rs) - 1) // 2 else None,
            "reached": len(got), "seeds": len(rs), "diverged": sum(r["diverged"] for r in rs),
        }
    for t in tasks:
        lrs = sorted({lr for (tt, lr, _) in by if tt == t})
        for lr in lrs:
            a, b = out["cells"].get((t, lr, "auto")), out["cells"].get((t, lr, "rlrop"))
            if a is None or b is None:
                continue
            fa, fb = a["final"], b["final"]
            ok = (math.isfinite(fa) and (not math.isfinite(fb) or fa <= fb * (1 + TOLERANCE)))
            out["cases"].append({"task": t, "lr": lr, "auto": fa, "rlrop": fb, "ok": ok})
            for r in by[(t, lr, "auto")]:
                if not r["diverged"]:
                    continue
                others = [o["schedule"] for s in schedules_of(runs) if s != "auto"
                          for o in by.get((t, lr, s), []) if o["seed"] == r["seed"] and not o["diverged"]]
                lower = [f"constant@{l:g}" for l in lrs if l < lr
                         for o in by.get((t, l, "constant"), []) if o["seed"] == r["seed"] and not o["diverged"]]
                if others or lower:
                    out["saveable"].append({"task": t, "lr": lr, "seed": r["seed"], "diverged_at": r["diverged_at"],
                                            "final_val": r["final_val"], "saved_by": others + lower})
    return out


def report(runs, res, args, wall, tasks) -> str:
    lines = [f"# Real training on the CPU: autolr vs PyTorch schedules", "",
             f"{machine_line()}, torch {__import__('torch').__version__}, {args.workers} worker processes x 1 thread.",
             f"Command: `python benchmarks/bench_training.py{(' ' + ' '.join(sys.argv[1:])) if sys.argv[1:] else ''}`"
             f" — {len(runs)} runs in {wall:.0f} s wall, {sum(r['cpu'] for r in runs):.0f} CPU-s inside the "
             f"runs (training, evaluation and autolr; about {sum(r['cpu'] for r in runs) / args.workers:.0f} s "
             f"of wall time on {args.workers} idle cores).", "",
             f"Seeds {', '.join(map(str, range(args.seeds)))}; validation every {args.eval_every} steps; "
             f"each row: median over seeds of the final validation loss [min–max], median steps to the "
             f"task's target (seeds that reached it), diverged seeds (non-finite, or final val > {FAILED:g} × initial).", ""]
    for t in tasks:
        task = TASKS[t]
        steps = next(r["steps"] for r in runs if r["task"] == t)
        init = statistics.median(r["init_val"] for r in runs if r["task"] == t)
        lines += [f"## {t}: {task.what}, {steps} steps", "",
                  f"Initial validation loss {init:.3g}; target {res['targets'][t]:.4g} (25th percentile of the "
                  f"PyTorch schedules' non-diverged final validation losses).", ""]
        rows = []
        for lr in task.lrs:
            for s in schedules_of(runs):
                c = res["cells"].get((t, lr, s))
                if c is None:
                    continue
                rng = f"[{fmt(c['lo'])}–{fmt(c['hi'])}]"
                reach = f"{c['reach']} ({c['reached']}/{c['seeds']})" if c["reach"] is not None else \
                    f"— ({c['reached']}/{c['seeds']})"
                rows.append([f"{lr:g}", LABELS.get(s, s), fmt(c["final"], 4), rng, reach, c["diverged"]])
        lines += [md_table(["LR", "schedule", "final val loss", "range", "steps to target", "diverged"], rows,
                           "llrrrr"), ""]
    cases = res["cases"]
    n_ok = sum(c["ok"] for c in cases)
    share = n_ok / len(cases) if cases else math.nan
    lines += ["## Verdicts", "",
              md_table(["task", "LR", "auto", "ReduceLROnPlateau", "auto/RLRoP", f"auto ≤ RLRoP·{1 + TOLERANCE:g}"],
                       [[c["task"], f"{c['lr']:g}", fmt(c["auto"], 4), fmt(c["rlrop"], 4),
                         fmt(c["auto"] / c["rlrop"], 3) if math.isfinite(c["auto"]) and math.isfinite(c["rlrop"])
                         else "—", "yes" if c["ok"] else "**no**"] for c in cases], "llrrrr"), "",
              f"1. `auto` at least as good as ReduceLROnPlateau (median final val loss ≤ RLRoP's × "
              f"{1 + TOLERANCE:g}) in **{n_ok}/{len(cases)} = {share:.0%}** of task × LR cases (target ≥ "
              f"{TARGET_SHARE:.0%}): **{'met' if share >= TARGET_SHARE else 'missed'}**.",
              f"2. `auto` diverged where the run could have been saved in **{len(res['saveable'])}** run(s) "
              f"(target 0): **{'met' if not res['saveable'] else 'missed'}**."]
    for s in res["saveable"]:
        how = (f"non-finite loss at step {s['diverged_at']}" if s["diverged_at"] is not None
               else f"final val loss {fmt(s['final_val'])}")
        lines.append(f"   - {s['task']} lr={s['lr']:g} seed {s['seed']}: {how}; not diverged: "
                     f"{', '.join(s['saved_by'])}")
    lines += plateau_section(res, tasks)
    lines += ["", "## autolr decisions (seed 0)", ""]
    for s in [s for s in schedules_of(runs) if s not in TORCH_SCHEDULES]:
        rs = [r for r in runs if r["schedule"] == s]
        acted = sum(any(not d["reason"].startswith(f"{s}: factor ") for d in r["decisions"]) for r in rs)
        lines.append(f"`{s}` made a decision other than a warmup step in {acted} of its {len(rs)} runs.")
    lines.append("")
    for t in tasks:
        for lr in TASKS[t].lrs:
            for s in [s for s in schedules_of(runs) if s not in TORCH_SCHEDULES]:
                r = next((r for r in runs if (r["task"], r["lr"], r["schedule"], r["seed"]) == (t, lr, s, 0)), None)
                if r is None:
                    continue
                # a warmup changes the LR on every row: summarise those
                ramp = [d for d in r["decisions"] if d["reason"].startswith(f"{s}: factor ")]
                rest = [d for d in r["decisions"] if d not in ramp]
                lines.append(f"- **{t} lr={lr:g} {s}**: {len(r['decisions'])} decision(s)"
                             + (f", {len(ramp)} of them warmup steps (last at step {ramp[-1]['step']}, scale "
                                f"{ramp[-1]['scale']:.3g})" if ramp else "")
                             + ("; the LR stayed at its initial value" if not r["decisions"] else ""))
                for d in rest[:8]:
                    lines.append(f"  - step {d['step']}: scale {d['scale']:.4g} — {d['reason'][:300]}")
                if len(rest) > 8:
                    lines.append(f"  - … {len(rest) - 8} more")
    return "\n".join(lines) + "\n"


def plateau_section(res, tasks) -> list[str]:
    """autolr ``plateau`` (defaults) beside ReduceLROnPlateau and the constant LR, per task x LR."""
    rows, ok = [], 0
    for t in tasks:
        for lr in TASKS[t].lrs:
            p, b, c = (res["cells"].get((t, lr, s)) for s in ("plateau", "rlrop", "constant"))
            if p is None or b is None:
                continue
            fp, fb = p["final"], b["final"]
            good = math.isfinite(fp) and (not math.isfinite(fb) or fp <= fb * (1 + TOLERANCE))
            ok += good
            rows.append([t, f"{lr:g}", f"{fmt(fp, 4)} ({p['diverged']})", f"{fmt(fb, 4)} ({b['diverged']})",
                         f"{fmt(c['final'], 4)} ({c['diverged']})" if c else "—",
                         fmt(fp / fb, 3) if math.isfinite(fp) and math.isfinite(fb) else "—",
                         "yes" if good else "**no**"])
    if not rows:
        return []
    return ["", "## autolr `plateau` (defaults)", "",
            "Median final validation loss over seeds (diverged seeds). No target of its own: `auto` is the "
            "default; this shows what `plateau` does on a validation loss logged every "
            "--eval-every steps.", "",
            md_table(["task", "LR", "plateau", "ReduceLROnPlateau", "constant", "plateau/RLRoP",
                      f"plateau ≤ RLRoP·{1 + TOLERANCE:g}"], rows, "llrrrrr"), "",
            f"`plateau` at least as good as ReduceLROnPlateau in {ok}/{len(rows)} task × LR cases."]


def plot(runs, res, tasks, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"constant": "0.5", "step": "tab:blue", "cosine": "tab:green", "rlrop": "tab:orange",
              "plateau": "tab:purple", "auto": "tab:red"}
    ncol = max(len(TASKS[t].lrs) for t in tasks)
    fig, axes = plt.subplots(2 * len(tasks), ncol, figsize=(4.2 * ncol, 3.0 * 2 * len(tasks)), squeeze=False)
    for ti, t in enumerate(tasks):
        for li, lr in enumerate(TASKS[t].lrs):
            ax, axl = axes[2 * ti][li], axes[2 * ti + 1][li]
            for k, s in enumerate(schedules_of(runs)):
                rs = [r for r in runs if (r["task"], r["lr"], r["schedule"]) == (t, lr, s)]
                if not rs:
                    continue
                steps = sorted({st for r in rs for st, _ in r["vals"]})
                ys = []
                for st in steps:
                    vs = [dict(r["vals"]).get(st, math.nan) for r in rs]
                    vs = [v for v in vs if math.isfinite(v)]
                    ys.append(statistics.median(vs) if len(vs) > len(rs) // 2 else math.nan)
                color = colors.get(s, f"C{k % 10}")
                ax.plot(steps, ys, color=color, lw=1.6 if s == "auto" else 1.0, label=LABELS.get(s, s))
                r0 = min(rs, key=lambda r: r["seed"])
                xs, ls = [], []
                for (st, l), nxt in zip(r0["lrs"], r0["lrs"][1:] + [(r0["steps"], None)]):
                    xs += [st, nxt[0]]
                    ls += [l, l]
                axl.plot(xs, ls, color=color, lw=1.6 if s == "auto" else 1.0)
            ax.axhline(res["targets"][t], color="k", ls=":", lw=0.8)
            ax.set_yscale("log")
            ax.set_title(f"{t}, lr={lr:g}: val loss (median of seeds)", fontsize=9)
            axl.set_yscale("log")
            axl.set_title(f"{t}, lr={lr:g}: LR (seed 0)", fontsize=9)
            axl.set_xlabel("step", fontsize=8)
            if ti == 0 and li == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def compare(runs, res, baseline, tasks) -> str:
    """Before/after for ``auto``: the baseline's auto runs against this run's (same tasks, LRs, seeds)."""
    old = [unslim(r) for r in baseline["runs"] if r["schedule"] == "auto" and r["task"] in tasks]
    if not old:
        return ""
    mixed = [r for r in runs if r["schedule"] != "auto"] + old
    before = analyse(mixed, tasks)
    lines = ["", f"## Before / after: `auto` at {baseline.get('revision', 'the baseline revision')} vs now", "",
             "Same tasks, LRs, seeds and PyTorch runs; only the `auto` runs differ. Median final validation "
             "loss over seeds (diverged seeds).", ""]
    rows = []
    for b, a in zip(before["cases"], res["cases"]):
        cb, ca = before["cells"][(b["task"], b["lr"], "auto")], res["cells"][(a["task"], a["lr"], "auto")]
        rows.append([a["task"], f"{a['lr']:g}", f"{fmt(b['auto'], 4)} ({cb['diverged']})",
                     f"{fmt(a['auto'], 4)} ({ca['diverged']})", fmt(a["rlrop"], 4),
                     "yes" if b["ok"] else "no", "yes" if a["ok"] else "no"])
    lines.append(md_table(["task", "LR", "auto before", "auto now", "ReduceLROnPlateau", "≥ RLRoP before",
                           "≥ RLRoP now"], rows, "llrrrrr"))
    nb, na = sum(c["ok"] for c in before["cases"]), sum(c["ok"] for c in res["cases"])
    lines += ["", f"Target 1 before: {nb}/{len(before['cases'])}; now: {na}/{len(res['cases'])}. "
              f"Target 2 (saveable divergences) before: {len(before['saveable'])}; now: {len(res['saveable'])}.", ""]
    return "\n".join(lines) + "\n"


# ---- replay check ----------------------------------------------------------------------------

def check_replay(task: str, lr: float, steps: int, eval_every: int) -> list[str]:
    """Run each autolr schedule once with a JSONL log; `autolr replay` must give the same LRs."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in ("plateau", "auto"):
            log = os.path.join(tmp, f"{s}.jsonl")
            r = run_one(task, lr, s, 0, steps, eval_every, log_path=log)
            cmd = [sys.executable, "-m", "autolr.cli", "replay", log, "--policy", s, "--base-lr", repr(lr),
                   "--every-row"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
            replay = {row["step"]: row["lr"] for row in rows if row.get("step") is not None}
            # in the run, the LR used at step index i (log step i+1) came from the row of step i
            trace = dict(r["lrs"])
            used, mism, cur = {}, 0, lr
            for i in range(1, r["steps"] if r["diverged_at"] is None else r["diverged_at"]):
                cur = trace.get(i, cur)
                want = replay.get(i)
                if want is None or abs(want - cur) > 1e-12 * cur:
                    mism += 1
            out.append(f"{task} lr={lr:g} {s}: {len(replay)} replayed rows, {len(r['decisions'])} decisions, "
                       f"{mism} LR mismatches between the closed loop and `autolr replay`")
    return out


# ---- main ------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every task's step count")
    ap.add_argument("--eval-every", type=int, default=25, help="validation every N optimiser steps")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="training", help="basename of the result files")
    ap.add_argument("--baseline", metavar="JSON", default=str(RESULTS / "training.before.json"),
                    help="auto runs from an earlier autolr revision, for a before/after section "
                         "(default: %(default)s, when present; '' to skip)")
    ap.add_argument("--no-check-replay", dest="check_replay", action="store_false",
                    help="skip checking `autolr replay` against the closed loop (mlp, lr=1, seed 0)")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    schedules = [s for s in args.schedules.split(",") if s]
    jobs = []
    for t in tasks:
        steps = max(int(TASKS[t].steps * args.steps_scale), args.eval_every)
        for lr in TASKS[t].lrs:
            for s in schedules:
                for seed in range(args.seeds):
                    jobs.append((t, lr, s, seed, steps, args.eval_every))
    cost = {"charlm": 5.5, "cnn": 1.9, "mlp": 0.6}  # ms per step, for load balancing: longest first
    jobs.sort(key=lambda j: -cost[j[0]] * j[4])
    t0 = time.perf_counter()
    if tasks:
        if "charlm" in tasks:
            chars()  # fail early if the stdlib source is missing
    runs = []
    with ProcessPoolExecutor(args.workers, initializer=_init_worker) as pool:
        for k, r in enumerate(pool.map(_job, jobs, chunksize=1), 1):
            runs.append(r)
            if k % 20 == 0 or k == len(jobs):
                print(f"[{time.perf_counter() - t0:6.1f}s] {k}/{len(jobs)} runs", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    res = analyse(runs, tasks)
    text = report(runs, res, args, wall, tasks)
    if args.baseline and Path(args.baseline).exists():
        text += compare(runs, res, json.loads(Path(args.baseline).read_text()), tasks)
    if args.check_replay:
        lines = check_replay("mlp", 1.0, TASKS["mlp"].steps, args.eval_every)
        text += "\n## Closed loop vs `autolr replay`\n\n" + "\n".join(f"- {x}" for x in lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(text)
    plot(runs, res, tasks, out / f"{args.name}.png")
    (out / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "revision": git_revision(), "wall": wall,
                                                      "runs": [slim(r, args.eval_every) for r in runs]}))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
