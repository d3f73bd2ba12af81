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
    vice versa; without a base LR, ``--lr`` writes an absolute LR and keeps the scale.
    """
    if (lr is None) == (scale is None):
        raise ManualError("give exactly one of --lr or --scale")
    value = lr if lr is not None else scale
    if not (math.isfinite(value) and value > 0):
        raise ManualError(f"the value must be a finite number > 0, got {value}")
    run_dir = Path(run)
    if run_dir.name == CONTROL_NAME:
        run_dir = run_dir.parent
    if not run_dir.is_dir():
        raise ManualError(f"{run_dir}: no such run folder")
    writer = ControlWriter(run_dir)
    current = writer.current()
    base = known_base(current)
    if lr is not None:
        new_scale = lr / base if base else (current["scale"] if current else 1.0)
        new_lr = lr
    else:
        new_scale, new_lr = scale, (scale * base if base else None)
    return writer.publish(
        scale=new_scale, lr=new_lr, step=current.get("step") if current else None,
        policy="manual", reason=reason, kind="manual",
        evidence={"requested_lr": lr, "requested_scale": scale,
                  "previous": {k: current.get(k) for k in ("seq", "lr", "scale")} if current else None},
    )


def known_base(current: dict[str, Any] | None) -> float | None:
    """The loop's base LR a control record shows (lr / scale); None when it carries no lr."""
    if current and current.get("lr") is not None:
        return current["lr"] / current["scale"]
    return None
