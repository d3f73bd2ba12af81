"""Block parsing: the numbers of many fields at once with numpy, and the columnar ``Batch``.

``parse_numbers`` reads decimal numbers (``-1.5``, ``2e-05``, ``.5``) out of a byte buffer
given their start and length, all at once: a small automaton run one character position at a
time over every field, the digits gathered into an integer mantissa and a decimal exponent.
A result is exact (the value Python's ``float`` gives) when the mantissa has at most 15 digits
and the exponent at most 22: ``m * 10**e`` and ``m / 10**e`` are then one correctly rounded
operation on exact operands. Other well-formed numbers are flagged for ``float`` one by one;
anything else is flagged as not a number, for the caller's exact per-line path.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from operator import itemgetter
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..records import EPOCH_KEYS, STEP_KEYS, Record

#: Fields longer than this are left to the exact path.
MAX_FIELD = 32
#: A block is parsed this many bytes at a time (whole lines): bounded temporaries, cache-sized.
PIECE = 1 << 20

# character classes (a field is read to its length: no class marks its end)
_DIG, _DOT, _PLUS, _MINUS, _EXP, _SPACE, _OTHER, _NIL = range(1, 9)  # _NIL: the digit 0
_NCLS = 9
_CLASS = np.full(256, _OTHER, np.uint8)
_CLASS[ord("1"):ord("9") + 1] = _DIG
_CLASS[ord("0")] = _NIL
_CLASS[ord(".")] = _DOT
_CLASS[ord("+")] = _PLUS
_CLASS[ord("-")] = _MINUS
_CLASS[[ord("e"), ord("E")]] = _EXP
_CLASS[[ord(" "), ord("\t")]] = _SPACE

# states
(_START, _SIGN, _ZERO, _INT, _DOT0, _DOT1, _FRAC, _E, _ESIGN, _EXPD, _TRAIL, _DEAD) = range(12)
_ACCEPT = np.zeros(12, bool)
_ACCEPT[[_ZERO, _INT, _DOT1, _FRAC, _EXPD, _TRAIL]] = True


def _table(strict_json: bool) -> np.ndarray:
    t = np.full((12, _NCLS), _DEAD, np.uint8)
    t[_START, [_PLUS, _MINUS]] = _SIGN
    t[_START, _SPACE] = _START
    t[_START, _DIG] = _INT
    t[_START, _DOT] = _DOT0
    t[_SIGN, _DIG] = _INT
    t[_SIGN, _DOT] = _DOT0
    for s in (_ZERO, _INT):
        t[s, _DIG] = _INT
        t[s, _DOT] = _DOT1
        t[s, _EXP] = _E
    t[_DOT0, _DIG] = _FRAC
    t[_DOT1, _DIG] = _FRAC
    t[_DOT1, _EXP] = _E
    t[_FRAC, _DIG] = _FRAC
    t[_FRAC, _EXP] = _E
    t[_E, [_PLUS, _MINUS]] = _ESIGN
    t[_E, _DIG] = _EXPD
    t[_ESIGN, _DIG] = _EXPD
    t[_EXPD, _DIG] = _EXPD
    for s in (_ZERO, _INT, _DOT1, _FRAC, _EXPD, _TRAIL):
        t[s, _SPACE] = _TRAIL
    t[:, _NIL] = t[:, _DIG]
    if strict_json:  # -?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?
        t[_START, _PLUS] = t[_START, _DOT] = t[_SIGN, _DOT] = _DEAD
        t[_START, _NIL] = t[_SIGN, _NIL] = _ZERO
        t[_ZERO, _DIG] = t[_ZERO, _NIL] = _DEAD
        t[_DOT1, _EXP] = t[_DOT1, _SPACE] = _DEAD
    return t.ravel()


def _steps(strict_json: bool) -> dict[str, np.ndarray]:
    """The automaton as tables indexed by ``state * 256 + byte``: the next state (times 256)
    and what the byte does to the number being read."""
    new = _table(strict_json).reshape(12, _NCLS)[:, _CLASS]  # 12 x 256
    dig = ((_CLASS == _DIG) | (_CLASS == _NIL))[None, :]
    minus = (_CLASS == _MINUS)[None, :]
    mant = dig & np.isin(new, [_ZERO, _INT, _FRAC])
    role = np.zeros(new.shape, np.uint8)
    role[np.isin(new, [_DOT0, _DOT1, _E])] = _R_POINT
    role[dig & (new == _EXPD)] = _R_EXP
    role[minus & (new == _SIGN)] = _R_NEG
    role[minus & (new == _ESIGN)] = _R_ENEG
    accept = _ACCEPT.copy()
    if strict_json:
        accept[_DOT1] = False
    return {
        "next": (new.astype(np.int64) * 256).ravel(),
        "mul": np.where(mant, 10.0, 1.0).ravel(),
        "add": np.where(mant, np.arange(256)[None, :] - 48, 0).astype(np.float64).ravel(),
        "digit": mant.astype(np.int16).ravel(),
        "frac": (dig & (new == _FRAC)).astype(np.int16).ravel(),
        "role": role.ravel(),
        "accept": np.repeat(accept, 256),  # indexed by the final state times 256
    }


_R_POINT, _R_EXP, _R_NEG, _R_ENEG = 1, 2, 3, 4
_STEPS = {False: _steps(False), True: _steps(True)}
_POW10 = 10.0 ** np.arange(23)
NUMBER, FLOAT, BAD = 0, 1, 2


def parse_numbers(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                  strict_json: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Values and kinds of the fields ``buf[starts[i] : starts[i] + lengths[i]]``.

    Kind NUMBER: the value is exact. FLOAT: a well-formed number whose value needs ``float``
    (too many digits, a large exponent). BAD: not a plain decimal number (empty, text, ``nan``,
    underscores, a field longer than MAX_FIELD). Spaces and tabs around a number are allowed
    (not with ``strict_json``, which also accepts only JSON's number syntax).
    """
    n = len(starts)
    kinds = np.full(n, BAD, np.uint8)
    if n == 0:
        return np.zeros(0), kinds
    t = _STEPS[strict_json]
    nxt, mul, add, digit, frac_t, role_t = t["next"], t["mul"], t["add"], t["digit"], t["frac"], t["role"]
    lengths = np.asarray(lengths, np.int64)
    size = np.where(lengths <= MAX_FIELD, lengths, 0).astype(np.uint8)
    order = np.argsort(size, kind="stable")  # shortest first: the fields still being read are a suffix
    size = size[order]
    first = np.asarray(starts, np.int64)[order]
    lo = np.searchsorted(size, np.arange(MAX_FIELD + 1), side="right")
    state = np.zeros(n, np.int64)
    mant = np.zeros(n, np.float64)  # exact while it has at most 15 digits
    digits = np.zeros(n, np.int16)
    frac = np.zeros(n, np.int16)
    expo = np.zeros(n, np.int64)
    neg = np.zeros(n, bool)
    eneg = np.zeros(n, bool)
    point = np.zeros(n, bool)  # a decimal point or an exponent: not a JSON integer
    for k in range(int(size[-1])):
        a = int(lo[k])
        ix = state[a:] + buf[first[a:] + k]
        state[a:] = nxt[ix]
        m = mant[a:]
        m *= mul[ix]
        m += add[ix]
        digits[a:] += digit[ix]
        frac[a:] += frac_t[ix]
        role = role_t[ix]
        hit = np.flatnonzero(role)
        if hit.size:
            r, at = role[hit], hit + a
            point[at[r == _R_POINT]] = True
            neg[at[r == _R_NEG]] = True
            eneg[at[r == _R_ENEG]] = True
            e = at[r == _R_EXP]
            if e.size:
                d = buf[first[e] + k].astype(np.int64) - 48
                expo[e] = np.minimum(expo[e] * 10 + d, 1_000_000)
    good = t["accept"][state] & (size > 0)
    exp10 = np.where(eneg, -expo, expo) - frac
    exact = good & (digits <= 15) & ((np.abs(exp10) <= 22) | (mant == 0))
    e = np.clip(exp10, -22, 22)
    with np.errstate(all="ignore"):
        v = np.where(e >= 0, mant * _POW10[np.maximum(e, 0)], mant / _POW10[np.maximum(-e, 0)])
    v[mant == 0] = 0.0
    v[neg] = -v[neg]
    if strict_json:
        v[(mant == 0) & ~point] = 0.0  # JSON's -0 is the integer 0
    values = np.empty(n, np.float64)
    values[order] = v
    kind = np.full(n, BAD, np.uint8)
    kind[good] = FLOAT
    kind[exact] = NUMBER
    kinds[order] = kind
    return values, kinds


class Batch:
    """Rows of a log as columns, in log order.

    ``steps`` and ``epochs`` are float64 with NaN where a row has none (steps are whole
    numbers, exact up to 2**53; a CSV or JSONL step is a parsed float anyway); ``metrics``
    maps a name to its float64 column;
    ``present`` holds a boolean mask for each metric that some rows lack (a metric not in
    ``present`` is in every row). ``records()`` gives the same rows as Records.
    """

    __slots__ = ("steps", "epochs", "metrics", "present")

    def __init__(self, steps: np.ndarray, epochs: np.ndarray, metrics: dict[str, np.ndarray],
                 present: dict[str, np.ndarray] | None = None):
        self.steps = steps
        self.epochs = epochs
        self.metrics = metrics
        self.present = present or {}

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"Batch({len(self)} rows, metrics={list(self.metrics)})"

    @classmethod
    def empty(cls) -> Batch:
        return cls(np.zeros(0), np.zeros(0), {})

    def mask(self, name: str) -> np.ndarray:
        """Rows that hold metric ``name``."""
        m = self.present.get(name)
        if m is not None:
            return m
        return np.ones(len(self), bool) if name in self.metrics else np.zeros(len(self), bool)

    @classmethod
    def from_records(cls, records: Sequence[Record]) -> Batch:
        """Columns of ``records`` (their ``run`` and ``restart`` are not kept)."""
        n = len(records)
        steps = np.array([np.nan if r.step is None else float(r.step) for r in records], np.float64)
        epochs = np.array([np.nan if r.epoch is None else r.epoch for r in records], np.float64)
        names: dict[str, None] = {}
        for r in records:
            names.update(dict.fromkeys(r.metrics))
        metrics, present = {}, {}
        for name in names:
            col = np.full(n, np.nan)
            has = np.zeros(n, bool)
            for i, r in enumerate(records):
                v = r.metrics.get(name)
                if v is not None:
                    col[i], has[i] = v, True
            metrics[name] = col
            if not has.all():
                present[name] = has
        return cls(steps.reshape(n), epochs.reshape(n), metrics, present)

    @classmethod
    def concat(cls, batches: Iterable[Batch]) -> Batch:
        batches = [b for b in batches if len(b)]
        if not batches:
            return cls.empty()
        if len(batches) == 1:
            return batches[0]
        names: dict[str, None] = {}
        for b in batches:
            names.update(dict.fromkeys(b.metrics))
        metrics, present = {}, {}
        for name in names:
            metrics[name] = np.concatenate([b.metrics.get(name, np.full(len(b), np.nan)) for b in batches])
            has = np.concatenate([b.mask(name) for b in batches])
            if not has.all():
                present[name] = has
        return cls(np.concatenate([b.steps for b in batches]), np.concatenate([b.epochs for b in batches]),
                   metrics, present)

    def take(self, order: np.ndarray) -> Batch:
        """The rows at indices ``order``."""
        return Batch(self.steps[order], self.epochs[order], {k: v[order] for k, v in self.metrics.items()},
                     {k: v[order] for k, v in self.present.items()})

    def records(self) -> list[Record]:
        """The rows as Records, metrics in column order."""
        with paused_gc():
            return self._records()

    def _records(self) -> list[Record]:
        n = len(self)
        if n == 0:
            return []
        names = list(self.metrics)
        partial = [k for k in names if k in self.present]
        if not partial:
            return _records(names, [self.metrics[k] for k in names], *_counters(self.steps, self.epochs))
        if len(partial) > 60:  # too many partial columns for a bit code: row by row
            steps, epochs = _counters(self.steps, self.epochs)
            cols = {k: self.metrics[k].tolist() for k in names}
            masks = {k: self.present[k].tolist() for k in partial}
            return [Record({k: cols[k][i] for k in names if k not in masks or masks[k][i]}, steps[i], epochs[i])
                    for i in range(n)]
        codes = np.zeros(n, np.int64)  # which partial columns each row holds, as bits
        for bit, k in enumerate(partial):
            codes |= self.present[k].astype(np.int64) << bit
        kinds = np.flatnonzero(np.bincount(codes)) if len(partial) <= 16 else np.unique(codes)
        if len(kinds) == 1:
            keys = [k for k in names if k not in self.present or self.present[k][0]]
            return _records(keys, [self.metrics[k] for k in keys], *_counters(self.steps, self.epochs))
        parts, where = [], []
        for code in kinds.tolist():
            rows = np.flatnonzero(codes == code)
            keys = [k for k in names if k not in self.present or code >> partial.index(k) & 1]
            parts += _records(keys, [self.metrics[k][rows] for k in keys],
                              *_counters(self.steps[rows], self.epochs[rows]))
            where.append(rows)
        at = np.empty(n, np.int64)  # where each row's record is in ``parts``
        at[np.concatenate(where)] = np.arange(n)
        return list(itemgetter(*at.tolist())(parts))


def _counters(steps: np.ndarray, epochs: np.ndarray) -> tuple[list, list]:
    """Steps and epochs as Record fields: int or None, float or None."""
    if np.isnan(steps).any():
        s = [None if v != v else int(v) for v in steps.tolist()]
    else:
        s = steps.astype(np.int64).tolist()
    e = epochs.tolist()
    if np.isnan(epochs).any():
        e = [None if v != v else v for v in e]
    return s, e


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while many Records are built: hundreds of thousands
    of new dicts trigger collections that walk the whole heap (they make no cycles), which in a
    process with a large heap costs as much as building them."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _records(keys: list[str], cols: list[np.ndarray], steps: list, epochs: list) -> list[Record]:
    """One Record per row."""
    with paused_gc():
        return _build(keys, cols, steps, epochs)


def _build(keys: list[str], cols: list[np.ndarray], steps: list, epochs: list) -> list[Record]:
    if not keys:
        return [Record({}, s, e) for s, e in zip(steps, epochs)]
    if len(keys) == 1:
        k = keys[0]
        dicts = [{k: v} for v in cols[0].tolist()]
    else:
        dicts = list(map(dict, map(zip, [keys] * len(steps), zip(*[c.tolist() for c in cols]))))
    return list(map(Record, dicts, steps, epochs))


def pieces(block: bytes, size: int | None = None) -> list[bytes]:
    """``block`` (complete lines) cut after a newline about every ``size`` bytes (PIECE)."""
    size = size or PIECE
    if len(block) <= size:
        return [block] if block else []
    out, pos = [], 0
    while pos < len(block):
        end = block.rfind(b"\n", pos, pos + size)
        if end < 0:
            end = block.index(b"\n", pos + size)
        out.append(block[pos:end + 1])
        pos = end + 1
    return out


def interleave(fast: list[Record], fast_at: np.ndarray, slow: list[Record], slow_at: list[int]) -> list[Record]:
    """Two record lists merged by their line numbers (both ascending)."""
    if not slow:
        return fast
    out: list[Record] = []
    prev = 0
    for cut, record in zip(np.searchsorted(fast_at, slow_at).tolist(), slow):
        out += fast[prev:cut]
        out.append(record)
        prev = cut
    out += fast[prev:]
    return out


def counters(names: Sequence[str], cols: dict[str, np.ndarray], has: dict[str, np.ndarray], n: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """``split_counters`` on columns: (steps, epochs) with NaN for none. ``has[name]`` is the
    presence mask of a column (all rows when absent)."""
    steps = np.full(n, np.nan)
    epochs = np.full(n, np.nan)
    for key in STEP_KEYS:
        if key in names:
            v = cols[key]
            ok = np.isnan(steps) & (np.abs(v) < 2.0**63)  # NaN compares False
            if key in has:
                ok &= has[key]
            steps = np.where(ok, np.trunc(v), steps)
    for key in EPOCH_KEYS:
        if key in names:
            v = cols[key]
            ok = np.isnan(epochs) & ~np.isnan(v)
            if key in has:
                ok &= has[key]
            epochs = np.where(ok, v, epochs)
    return steps, epochs
