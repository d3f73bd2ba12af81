"""Manual overrides: ``autolr set RUN --lr X`` through the control-file protocol."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .control import CONTROL_NAME, ControlWriter


class ManualError(ValueError):
    """A manual override that cannot be applied."""


def set_manual(run: str | Path, *, lr: float | None = None, scale: float | None = None,
               reason: str = "manual override") -> dict[str, Any]:
    """Publish a manual LR (or scale) for ``run``; return the control record written.

    With ``lr`` and a known base LR (from the current control record) the scale follows, and
    vice versa, the LR held within the ``min_lr``/``max_lr`` the daemon's records carry; without
    a base LR, ``--lr`` writes an absolute LR and keeps the scale.
    """
    if (lr is None) == (scale is None):
        raise ManualError("give exactly one of --lr or --scale")
    value = lr if lr is not None else scale
    if not (math.isfinite(value) and value > 0):
        raise ManualError(f"the value must be a finite number > 0, got {value}")
    run_dir = Path(run)
    if run_dir.name == CONTROL_NAME:
        run_dir = run_dir.parent
    if run_dir.is_file():
        raise ManualError(f"{run_dir} is a file: give its run folder ({run_dir.parent})")
    if not run_dir.is_dir():
        raise ManualError(f"{run_dir}: no such run folder")
    writer = ControlWriter(run_dir)
    current = writer.current()
    if current is None:
        runs = sorted(str(p.parent.relative_to(run_dir)) for depth in (1, 2, 3)  # (runs/sweep/lr-1e-3)
                      for p in run_dir.glob("*/" * depth + CONTROL_NAME))
        if runs:
            raise ManualError(f"{run_dir} holds runs ({', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''}), "
                              "not a control file of its own: give one of them")
    base = known_base(current)
    bounds = {k: current[k] for k in ("min_lr", "max_lr") if current and current.get(k) is not None}
    if base:
        # The daemon's min_lr/max_lr (its records carry them): the loop never runs beyond them,
        # not even until the daemon's next row.
        wanted = lr if lr is not None else scale * base
        new_lr = min(max(wanted, bounds.get("min_lr", 0.0)), bounds.get("max_lr", math.inf))
        new_scale = scale if new_lr == wanted and scale is not None else new_lr / base
    else:  # no base LR known: the daemon has no bounds either (they need base_lr)
        new_lr = lr
        if lr is None:
            new_scale = scale
        else:
            new_scale = current["scale"] if current else 1.0
    return writer.publish(
        scale=new_scale, lr=new_lr, step=current.get("step") if current else None,
        policy="manual", reason=reason, kind="manual", **bounds,
        evidence={"requested_lr": lr, "requested_scale": scale,
                  "previous": {k: current.get(k) for k in ("seq", "lr", "scale")} if current else None},
    )


def known_base(current: dict[str, Any] | None) -> float | None:
    """The loop's base LR a control record shows (lr / scale); None when it carries no lr."""
    if current and current.get("lr") is not None:
        return current["lr"] / current["scale"]
    return None
