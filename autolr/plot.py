"""``autolr replay --plot``: the metric, the fitted trend and the LR over steps, decisions marked.

matplotlib is an optional extra (``pip install 'autolr[plot]'``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import Settings
from .engine import RunEngine
from .replay import open_reader


class PlotError(RuntimeError):
    """matplotlib missing, or nothing to plot."""


def collect(path: Path, settings: Settings, registry: dict, readers: dict):
    """Replay ``path``; return the monitored series, the LR series and the decisions."""
    reader = open_reader(path, readers)
    engine = RunEngine(settings.chain(registry), history=settings.history)
    series: dict[str, tuple[list, list]] = {}
    lr_x, lr_y, decisions = [0.0], [engine.lr or engine.scale], []
    while True:
        for record in reader.read():
            made = engine.feed(record, reader.columns())
            t = record.step if record.step is not None else (record.epoch if record.epoch is not None
                                                               else engine.state["rows"] - 1)
            for name, value in record.metrics.items():
                if np.isfinite(value):
                    xs, ys = series.setdefault(name, ([], []))
                    xs.append(float(t))
                    ys.append(float(value))
            lr_x.append(float(t))
            lr_y.append(engine.lr if engine.lr is not None else engine.scale)
            monitor = engine.state.get("monitor")
            seen = len(series.get(monitor, ((), ()))[0])
            decisions += [(float(t), d, seen) for d in made]
        if not reader.more:
            break
    xs, ys = series.get(engine.state.get("monitor"), ([], []))  # the metric the policies ended on
    return engine, np.array(xs), np.array(ys), np.array(lr_x), np.array(lr_y), decisions


def plot_replay(path: str | Path, out: str | Path, settings: Settings, registry: dict, readers: dict) -> Path:
    """Write a PNG of one replayed log to ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotError("--plot needs matplotlib: pip install 'autolr[plot]'") from exc
    engine, xs, ys, lr_x, lr_y, decisions = collect(Path(path), settings, registry, readers)
    if len(lr_x) < 2:
        raise PlotError(f"{path}: no rows to plot")
    fig, (ax, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=(10, 6.5), height_ratios=[3, 2])
    monitor = engine.state.get("monitor") or "metric"
    ax.plot(xs, ys, lw=0.6, color="0.55", label=monitor)
    if len(ys) >= 20:  # a running median shows the level through the noise
        k = max(5, len(ys) // 100) | 1
        pad = np.pad(ys, k // 2, mode="edge")
        smooth = np.median(np.lib.stride_tricks.sliding_window_view(pad, k), axis=1)
        ax.plot(xs, smooth, lw=1.2, color="tab:blue", label=f"running median ({k})")
    for t, d, n in decisions:
        window = int((d.evidence.get(d.policy.split("+")[0]) or {}).get("n") or 0)
        if window and n >= window:  # the least-squares line the trend test saw
            wx, wy = xs[n - window:n], ys[n - window:n]
            a, b = np.polyfit(wx, wy, 1)
            ax.plot(wx, a * wx + b, color="tab:red", lw=2, alpha=0.8)
        colour = {"rewind": "tab:purple", "manual": "tab:green"}.get(d.kind, "tab:red")
        for axis in (ax, ax_lr):
            axis.axvline(t, color=colour, lw=0.8, ls="--", alpha=0.6)
        ax_lr.annotate(d.policy, (t, d.lr if d.lr is not None else d.scale), fontsize=7, rotation=90,
                       va="bottom", ha="right", color=colour)
    ax.set_ylabel(monitor)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{Path(path).name}: {engine.chain.names} ({len(decisions)} decisions; red: fitted trend)")
    ax_lr.step(lr_x, lr_y, where="post", color="tab:orange")
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("lr" if engine.lr is not None else "scale")
    ax_lr.set_xlabel("step" if engine.state.get("unit") == "step" else engine.state.get("unit") or "row")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
