"""Times and rows of a policy's kept observations, stored as arithmetic runs.

A run ``[t0, dt, r0, dr, start, stop]`` holds the observations k = start..stop-1 at time
t0 + dt·k and row r0 + dr·k: one run for a metric logged at a fixed stride (every row, every
25 steps) instead of two numbers per observation. A run only grows when t0 + dt·k reproduces
the time exactly, so the expansion gives back the very same numbers. The functions return new
lists and never modify their arguments: policy states are not changed in place.
"""
from __future__ import annotations


def push(runs: list, t: float, row: int) -> list:
    """``runs`` with one more observation at time ``t`` and row ``row``."""
    if runs:
        t0, dt, r0, dr, start, stop = runs[-1]
        if stop - start == 1 and start == 0 and row > r0 and t0 + (t - t0) * 1 == t:
            return runs[:-1] + [[t0, t - t0, r0, row - r0, 0, 2]]
        if stop - start > 1 and t0 + dt * stop == t and r0 + dr * stop == row:
            return runs[:-1] + [[t0, dt, r0, dr, start, stop + 1]]
    return runs + [[t, 0, row, 0, 0, 1]]


def slide(runs: list, t: float, row: int, drop: int) -> list:
    """``push(runs, t, row)`` without its ``drop`` oldest observations (a window sliding on)."""
    if drop == 1 and len(runs) == 1:  # the usual row of a regular log: one run moves on
        t0, dt, r0, dr, start, stop = runs[0]
        if stop - start > 1 and t0 + dt * stop == t and r0 + dr * stop == row:
            return [[t0, dt, r0, dr, start + 1, stop + 1]]
    runs = push(runs, t, row)
    return drop_first(runs, drop) if drop > 0 else runs


def drop_through(runs: list, row: int) -> tuple[list, int]:
    """``runs`` without the observations at rows <= ``row``, and how many were dropped."""
    out, dropped = list(runs), 0
    while out:
        t0, dt, r0, dr, start, stop = out[0]
        if r0 + dr * start > row:
            break
        k = stop if dr == 0 else min(stop, (row - r0) // dr + 1)  # first k with r0 + dr·k > row
        dropped += k - start
        if k >= stop:
            out.pop(0)
        else:
            out[0] = [t0, dt, r0, dr, k, stop]
            break
    return out, dropped


def drop_first(runs: list, m: int) -> list:
    """``runs`` without their ``m`` oldest observations."""
    out = list(runs)
    while m > 0 and out:
        t0, dt, r0, dr, start, stop = out[0]
        if stop - start <= m:
            m -= stop - start
            out.pop(0)
        else:
            out[0] = [t0, dt, r0, dr, start + m, stop]
            break
    return out


def count_after(runs: list, row: int) -> int:
    """How many observations are at rows > ``row``."""
    n = 0
    for t0, dt, r0, dr, start, stop in reversed(runs):
        if r0 + dr * (stop - 1) <= row:
            break
        k = start if dr == 0 or r0 + dr * start > row else (row - r0) // dr + 1
        n += stop - max(k, start)
    return n


def times(runs: list):
    """The times of all observations, as one float array: ``float(t)`` of each time pushed."""
    import numpy as np

    if not runs:
        return np.empty(0)
    parts = []
    for t0, dt, _, _, start, stop in runs:
        if type(t0) is int and type(dt) is int and abs(t0) + abs(dt) * stop >= 2**53:
            # Python's exact integers, then one rounding each (float arithmetic would round twice)
            parts.append(np.array([float(t0 + dt * k) for k in range(start, stop)]))
        else:
            parts.append(t0 + dt * np.arange(start, stop, dtype=float))
    return np.concatenate(parts)


def times_list(runs: list, last: int) -> list:
    """The times of the ``last`` newest observations, as the very numbers pushed."""
    out: list = []
    for t0, dt, _, _, start, stop in reversed(runs):
        first = max(start, stop - (last - len(out)))
        if type(t0) is int and type(dt) is int and dt:
            part = list(range(t0 + dt * first, t0 + dt * stop, dt))  # steps: a C loop
        else:
            part = [t0 + dt * k for k in range(first, stop)]
        if not out:
            out = part
        else:
            out[:0] = part
        if len(out) >= last:
            break
    return out


def from_lists(times: list, rows: list) -> list:
    """Runs holding the observations of two parallel lists (an older state's layout)."""
    runs: list = []
    for t, row in zip(times, rows):
        runs = push(runs, t, row)
    return runs
