"""TensorBoard event files (``events.out.tfevents.*``), decoded without TensorFlow or protobuf.

Format. Each record is ``u64 length | u32 mcrc(length bytes) | data | u32 mcrc(data)``,
little-endian, with ``mcrc(x) = (rotr15(crc32c(x)) + 0xA282EAD8) mod 2**32``. ``data`` is an
``Event``: step=2 (int64, absent when 0), summary=5, session_log=7 (status=1; START=1).
Summary: value=1 (repeated). Value: tag=1, simple_value=2 (float32), tensor=8, metadata=9
(plugin_data=1 -> plugin_name=1). TensorProto: dtype=1 (FLOAT=1, DOUBLE=2, BFLOAT16=14,
HALF=19), tensor_content=4 (raw little-endian), float_val=5, double_val=6, half_val=13 (the
16-bit pattern). A scalar is a ``simple_value`` (torch, tensorboardX) or a one-element float
tensor (TF2, torch ``new_style``); images, histograms, text and graphs are ignored silently.

Reading. From a saved record-boundary offset; a record not complete yet is retried from its
start next time. Damage is skipped and counted, never raised:

* data CRC wrong, header CRC right: the record is skipped by its declared length;
* header CRC wrong: the length is untrustworthy, so the reader scans forward byte by byte to
  the next offset whose 8 length bytes match the CRC after them (a false match has odds of
  2**-32 per offset); one skip is counted per damaged stretch;
* declared length above ``MAX_RECORD``: skipped unread once the file holds it all.

Data CRCs are checked only for records that yield something (scalars, plugin metadata, a
session START); the rest is parsed shallowly and dropped. CRC32C runs in numpy with one lane
per record (records padded to a common width, 2 bytes per step through a 64K-entry table);
records over 4 KiB that need a check use a pure-Python table loop. The commonest records
(``simple_value``; one-element tensors as torch ``new_style`` and TF2 write them) are
recognised and decoded in numpy for a whole block; the rest goes through ``parse_event``.

Rows. Consecutive scalar events with the same step form one Record. The group closes at a
boundary (the step changes, a tag repeats, a session START) or as soon as it holds every tag
that earlier boundary-closed groups starting with the same tag held: after the first step, a
complete step is emitted at once. A group still open at the end of the data waits for what
closes it, except once the file has been idle for ``idle_seconds`` (a finished file).
Everything but that idle rule depends only on the bytes, so any chunking of a growing file
gives the same records as one whole read (live and replay agree). A tag ``epoch`` becomes
``Record.epoch``. After a session START at step T (torch ``purge_step=T``) the next Record has
``restart=True``: the run's history from step T on is to be dropped.

Layout. Keras writes ``log_dir/train/`` and ``log_dir/validation/``: the run is ``log_dir``,
and metric names from ``validation/`` get the prefix ``val_``. In Keras's own files (TF2
writers, names ending in ``.v2``) ``epoch_*`` tags are per-epoch values logged at step=epoch:
they lose the ``epoch_`` prefix and come as ``Record(epoch=step, step=None)``, so the names
match Keras's History and CSVLogger (``loss``, ``val_loss``, ``val_accuracy``). torch's
``add_scalars(main, {key: v})`` writes tag ``main`` into ``<run>/<main with / as _>_<key>/``
(tensorboardX: ``<run>/<main>/<key>/``): such a folder belongs to the nearest ancestor (up to
3 levels) holding an event file of the same writer (same host and process id in the file name;
tensorboardX names carry only the host), and its metrics are named ``<main>/<key>``.
"""
from __future__ import annotations

import os
import re
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..hookspecs import hookimpl
from ..records import EPOCH_KEYS, Record
from .base import PARSE_BLOCK, Reader

#: Declared record lengths above this are skipped without being read.
MAX_RECORD = 64 << 20
#: A group still open is emitted once the file has not changed for this many seconds.
IDLE_SECONDS = 10.0
#: Bounds on per-file memory: metrics in one record, remembered tags.
MAX_GROUP = 10_000
MAX_TAGS = 10_000
#: Records longer than this get their CRC in pure Python (numpy lanes cost a step per byte).
NUMPY_CRC_MAX = 4096
KERAS_FOLDERS = ("train", "validation")
_HEADER = struct.Struct("<QI")
_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")
_F16 = struct.Struct("<e")
_DECODE_ERRORS = (ValueError, IndexError, struct.error, OverflowError)

# ---- CRC32C (Castagnoli, reflected polynomial 0x82F63B78) ------------------------------------


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


CRC_TABLE = _crc_table()
_NP_TABLE = np.array(CRC_TABLE, dtype=np.uint32)


def crc32c(data: bytes) -> int:
    """CRC32C of ``data``: register starts at ~0, ``r = T[(r ^ b) & 255] ^ (r >> 8)``, result ~r."""
    crc, table = 0xFFFFFFFF, CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """TFRecord's masking: rotate right by 15, add 0xA282EAD8, mod 2**32."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    return mask_crc(crc32c(data))


def _crc_table16() -> np.ndarray:
    """T16[i]: the register ``i`` (16 bits) moved through 16 zero bits; 2 bytes per lookup."""
    r = np.arange(1 << 16, dtype=np.uint32)
    for _ in range(2):
        r = _NP_TABLE[r & 0xFF] ^ (r >> 8)
    return r


_NP_TABLE16 = _crc_table16()
#: Bytes gathered per batch of lanes (keeps the working set in cache).
_LANE_BATCH = 1 << 18


def masked_crcs(arr: np.ndarray, starts, lengths) -> np.ndarray:
    """``masked_crc32c(arr[s:s+n])`` for every (s, n), many records at once (one lane each).

    Rows are left-padded with zeros to a common width (``_widths``): from a zero register, leading
    zeros leave it at zero, and starting from ~0 instead equals inverting the first 4 data
    bytes. Each step consumes 2 bytes of every lane: ``r = T16[(r ^ w) & 0xFFFF] ^ (r >> 16)``.
    """
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.empty(len(starts), dtype=np.uint32)
    small = (lengths >= 4) & (lengths <= NUMPY_CRC_MAX)
    for i in np.nonzero(~small)[0]:
        s, n = int(starts[i]), int(lengths[i])
        out[i] = masked_crc32c(arr[s : s + n].tobytes())
    if not small.any():
        return out
    width = _widths(lengths)
    padded = np.concatenate([np.zeros(NUMPY_CRC_MAX, dtype=np.uint8), arr])
    windows = {}
    for w in np.unique(width[small]).tolist():
        sel = np.nonzero(small & (width == w))[0]
        windows[w] = sliding_window_view(padded, w)
        for part in np.array_split(sel, -(-len(sel) * w // _LANE_BATCH)):
            out[part] = _crc_lanes(windows[w], starts[part], lengths[part], w)
    return out


def _widths(lengths: np.ndarray) -> np.ndarray:
    """Lane widths: multiples of 16 up to 256 bytes, then powers of two (bounded padding)."""
    pow2 = 1 << np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    return np.where(lengths <= 256, np.maximum(8, (lengths + 15) // 16 * 16), pow2)


def _crc_lanes(windows: np.ndarray, starts: np.ndarray, lengths: np.ndarray, w: int) -> np.ndarray:
    pad = w - lengths
    rows = windows[starts - pad + NUMPY_CRC_MAX]  # (lanes, w) copy, data right-aligned
    rel = np.arange(w) - pad[:, None]  # position within the data; negative in the padding
    rows *= rel >= 0
    rows ^= ((rel >= 0) & (rel < 4)).view(np.uint8) * np.uint8(0xFF)
    lanes = np.ascontiguousarray(rows.view("<u2").T)
    crc = np.zeros(len(starts), dtype=np.uint32)
    table = _NP_TABLE16
    for word in lanes:
        crc = table[(crc ^ word) & 0xFFFF] ^ (crc >> 16)
    crc ^= np.uint32(0xFFFFFFFF)
    return ((crc >> 15) | (crc << 17)) + np.uint32(0xA282EAD8)


def _stored_u32(arr: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The little-endian u32 at each offset in ``pos``."""
    b = [arr[pos + k].astype(np.uint32) for k in range(4)]
    return b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24)


def _stored_u64(arr: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The little-endian u64 at each offset in ``pos``, as int64 (callers keep it small)."""
    return (_stored_u32(arr, pos).astype(np.int64) | (_stored_u32(arr, pos + 4).astype(np.int64) << 32))


# ---- protobuf, the few fields needed -------------------------------------------------------


def _varint(d: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = d[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(d: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, a, b) per field of the message ``d[pos:end]``.

    Varint: a is the value. Fixed64/fixed32/length-delimited: ``d[a:b]`` holds the payload.
    """
    while pos < end:
        key = d[pos]
        pos += 1
        if key >= 0x80:
            key, pos = _varint(d, pos - 1)
        wt = key & 7
        if wt == 0:
            value, pos = _varint(d, pos)
            yield key >> 3, 0, value, pos
            continue
        if wt == 2:
            n, pos = _varint(d, pos)
            a, pos = pos, pos + n
        elif wt == 1:
            a, pos = pos, pos + 8
        elif wt == 5:
            a, pos = pos, pos + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if pos > end:
            raise ValueError("field runs past its message")
        yield key >> 3, wt, a, pos
    if pos != end:
        raise ValueError("varint runs past its message")


#: ``SummaryMetadata{plugin_data{plugin_name: "scalars"}}`` as torch writes it on every
#: ``new_style`` event (field 9 of the Value).
_SCALARS_METADATA = b"\x4a\x0b\x0a\x09\x0a\x07scalars"
#: One-element tensors the fast path knows: (leading bytes, item size); the value follows.
#: dtype=1/2 then float_val=5 / double_val=6 packed (torch), or tensor_shape={} then
#: tensor_content=4 (TF2).
_TENSOR_FORMS = (
    (b"\x08\x01\x2a\x04", 4),
    (b"\x08\x02\x32\x08", 8),
    (b"\x08\x01\x12\x00\x22\x04", 4),
    (b"\x08\x02\x12\x00\x22\x08", 8),
)


def fast_events(arr: np.ndarray, a: np.ndarray, e: np.ndarray):
    """Vectorised fast path for the commonest records, one scalar event each in ``arr[a:e]``:
    ``09 f64 [10 step-varint] 2a S 0a V 0a T tag VALUE`` with one-byte lengths S = V + 2 and
    VALUE either ``15 f32`` (simple_value) or ``42 L tensor [scalars metadata]`` with a tensor
    of ``_TENSOR_FORMS``. Anything else (TF2's metadata on a tag's first event, other
    summaries) is left to ``parse_event``.

    Returns per record: (matches, step, value, tag start, tag end, value came from a tensor).
    """
    with np.errstate(invalid="ignore"):  # float32 -> float64 of signalling NaNs in garbage
        return _fast_events(arr, a, e)


def _fast_events(arr: np.ndarray, a: np.ndarray, e: np.ndarray):
    if len(arr) < 17:  # shorter than any record it takes; keeps the clipped indexing valid
        arr = np.zeros(17, dtype=np.uint8)
        e = np.minimum(e, 0)
    last = len(arr) - 1

    def at(pos: np.ndarray) -> np.ndarray:
        return arr[np.clip(pos, 0, last)].astype(np.int64)

    ok = (e - a >= 17) & (at(a) == 0x09)
    steps, n_step = _step_varints(arr, a + 10)
    has_step = at(a + 9) == 0x10
    ok &= ~has_step | (n_step > 0)
    steps = np.where(has_step, steps, 0)
    q = a + 9 + np.where(has_step, 1 + n_step, 0)
    s_len, v_len = at(q + 1), at(q + 3)
    ok &= (at(q) == 0x2A) & (at(q + 2) == 0x0A) & (at(q + 4) == 0x0A) & (at(q + 5) < 0x80)
    ok &= (s_len == e - q - 2) & (v_len == e - q - 4) & (s_len < 0x80)
    t_end = q + 6 + at(q + 5)
    simple = (at(t_end) == 0x15) & (e - t_end == 5)
    values = _stored_u32(arr, np.clip(t_end + 1, 0, max(last - 3, 0))).view(np.float32).astype(np.float64)
    tensor = (at(t_end) == 0x42) & ~simple
    x = t_end + 2  # the tensor's first byte
    y = x + at(t_end + 1)  # its end: then nothing, or the scalars metadata
    tensor &= (y == e) | ((e - y == len(_SCALARS_METADATA)) & _bytes_equal(arr, y, _SCALARS_METADATA))
    matched = np.zeros(len(a), dtype=bool)
    for lead, size in _TENSOR_FORMS:
        form = tensor & (y - x == len(lead) + size) & _bytes_equal(arr, x, lead)
        pos = np.clip(x + len(lead), 0, max(last - size + 1, 0))
        raw = _stored_u32(arr, pos)
        if size == 8:
            hi = _stored_u32(arr, pos + 4)
            form_values = (raw.astype(np.uint64) | (hi.astype(np.uint64) << np.uint64(32))).view(np.float64)
        else:
            form_values = raw.view(np.float32).astype(np.float64)
        values = np.where(form, form_values, values)
        matched |= form
    ok &= simple | matched
    return ok, steps, values, q + 6, t_end, matched


def _step_varints(arr: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int64 value, byte count; 0 when over 10 bytes) of the varint at each offset."""
    last = len(arr) - 1
    raw = arr[np.minimum(pos[:, None] + np.arange(10), last)]
    alive = np.cumprod(raw >= 0x80, axis=1)  # alive[:, k]: bytes 0..k all continue
    count = np.where(alive[:, 9] > 0, 0, 1 + alive[:, :9].sum(axis=1))
    parts = (raw & 0x7F).astype(np.uint64) << (7 * np.arange(10)).astype(np.uint64)
    parts[np.arange(10) >= count[:, None]] = 0
    return np.bitwise_or.reduce(parts, axis=1).view(np.int64), count


def _bytes_equal(arr: np.ndarray, pos: np.ndarray, expect: bytes) -> np.ndarray:
    """Whether ``arr[p : p + len(expect)] == expect`` at each offset (False past the end)."""
    ok = pos + len(expect) <= len(arr)
    for k, byte in enumerate(expect):
        ok &= arr[np.clip(pos + k, 0, len(arr) - 1)] == byte
    return ok


#: Lightning's TensorBoardLogger writes ``hp_metric = -1`` at step 0 whenever a fit starts with
#: hyperparameters (the hparams tab's placeholder), a resumed fit too: read, that row takes the
#: run back to step 0 and throws its history away. That exact value at step 0 is left out.
_HP_METRIC = b"hp_metric"

#: One summary value: (tag bytes, scalar or None, came from a tensor, plugin name or None).
Value = tuple[bytes, "float | None", bool, "bytes | None"]


def parse_event(d: bytes) -> tuple[int, list[Value], bool]:
    """(step, summary values, is a session START) of one serialized ``Event``."""
    step, values, start = 0, [], False
    for f, wt, a, b in _fields(d, 0, len(d)):
        if f == 2 and wt == 0:
            a &= (1 << 64) - 1  # int64: two's complement in 64 bits
            step = a - (1 << 64) if a >= 1 << 63 else a
        elif f == 5 and wt == 2:
            for vf, vwt, va, vb in _fields(d, a, b):
                if vf == 1 and vwt == 2:
                    values.append(_parse_value(d, va, vb))
        elif f == 7 and wt == 2:
            start = any(sf == 1 and swt == 0 and sa == 1 for sf, swt, sa, _ in _fields(d, a, b))
    return step, values, start


def _parse_value(d: bytes, pos: int, end: int) -> Value:
    tag, value, tensor, plugin = b"", None, False, None
    for f, wt, a, b in _fields(d, pos, end):
        if f == 1 and wt == 2:
            tag = d[a:b]
        elif f == 2 and wt == 5:
            value, tensor = _F32.unpack_from(d, a)[0], False
        elif f == 8 and wt == 2:
            value, tensor = _tensor_scalar(d, a, b), True
        elif f == 9 and wt == 2:
            plugin = _plugin_name(d, a, b)
    return tag, value, tensor, plugin


def _plugin_name(d: bytes, pos: int, end: int) -> bytes | None:
    for f, wt, a, b in _fields(d, pos, end):
        if f == 1 and wt == 2:
            for g, gwt, p, q in _fields(d, a, b):
                if g == 1 and gwt == 2:
                    return d[p:q]
    return None


#: dtype -> (item size in tensor_content, the repeated field holding its values)
_FLOAT_DTYPES = {1: (4, 5), 2: (8, 6), 14: (2, 13), 19: (2, 13)}
#: repeated value field -> (wire type when unpacked, item size when packed or 0 for varints)
_VALUE_FIELDS = {5: (5, 4), 6: (1, 8), 13: (0, 0)}


def _tensor_scalar(d: bytes, pos: int, end: int) -> float | None:
    """The value of a one-element float tensor, else None (histograms, strings, ints...)."""
    dtype, content, count, first = 0, b"", {}, {}
    for f, wt, a, b in _fields(d, pos, end):
        if f == 1 and wt == 0:
            dtype = a
        elif f == 4 and wt == 2:
            content = d[a:b]
        elif f >= 5:  # float_val=5, double_val=6, half_val=13; other *_val fields count too
            n, v = _repeated_first(d, f, wt, a, b) if f in _VALUE_FIELDS else (2, None)
            count[f] = count.get(f, 0) + n
            if v is not None:
                first.setdefault(f, v)
    if dtype not in _FLOAT_DTYPES:
        return None
    size, field = _FLOAT_DTYPES[dtype]
    if content:
        return _decode_scalar(dtype, content) if len(content) == size and not count else None
    if list(count.items()) != [(field, 1)] or field not in first:
        return None
    if field == 13:
        return _decode_scalar(dtype, (first[field] & 0xFFFF).to_bytes(2, "little"))
    return float(first[field])


def _repeated_first(d: bytes, f: int, wt: int, a: int, b: int) -> tuple[int, float | int | None]:
    """(element count, first element) of one occurrence of a repeated value field, packed
    (wire type 2) or not."""
    plain_wt, size = _VALUE_FIELDS[f]
    if wt == plain_wt:
        if wt == 0:
            return 1, a
        return 1, (_F32 if size == 4 else _F64).unpack_from(d, a)[0]
    if wt != 2:
        raise ValueError(f"field {f} with wire type {wt}")
    if size == 0:  # packed varints
        n, pos, value = 0, a, None
        while pos < b:
            v, pos = _varint(d, pos)
            value = v if value is None else value
            n += 1
        return n, value
    if (b - a) % size:
        raise ValueError("packed values of a ragged length")
    n = (b - a) // size
    return n, (_F32 if size == 4 else _F64).unpack_from(d, a)[0] if n else None


def _decode_scalar(dtype: int, raw: bytes) -> float:
    if dtype == 1:
        return _F32.unpack(raw)[0]
    if dtype == 2:
        return _F64.unpack(raw)[0]
    if dtype == 19:
        return _F16.unpack(raw)[0]
    return _F32.unpack(b"\x00\x00" + raw)[0]  # bfloat16: the high half of a float32


# ---- run layout and metric names -----------------------------------------------------------

_TORCH_NAME = re.compile(r"tfevents\.\d+\.(.+\.\d+)\.\d+(?:\..*)?$")
_RUN_DIRS: dict[Path, tuple[Path, str | None]] = {}


def _writer_key(name: str) -> str | None:
    """What identifies the writing process in an event file name: host.pid (torch, TF) or host."""
    m = _TORCH_NAME.search(name)
    if m:
        return m.group(1)
    _, _, rest = name.partition("tfevents.")
    _, _, host = rest.partition(".")
    return host or None


def _layout(path: Path) -> tuple[Path, str | None]:
    """(run folder, the file's folder relative to it): None for a run's own folder, the
    add_scalars subfolder path, or ``train``/``validation`` for Keras's layout (TF2's ``.v2``
    files only: a torch writer's ``train/`` is a run of its own, Lightning's ``sub_dir``)."""
    cached = _RUN_DIRS.get(path)
    if cached is not None:
        return cached
    folder = path.parent
    result: tuple[Path, str | None] = (folder, None)
    key = _writer_key(path.name)
    for up in list(folder.parents)[:3]:
        if key and _holds_writer(up, key):
            result = (up, folder.relative_to(up).as_posix())
            break
    else:
        if folder.name in KERAS_FOLDERS and path.name.endswith(".v2"):  # Keras (TF2) writes .v2
            result = (folder.parent, folder.name)
    if len(_RUN_DIRS) > 65536:
        _RUN_DIRS.clear()
    _RUN_DIRS[path] = result
    return result


def _holds_writer(folder: Path, key: str) -> bool:
    try:
        with os.scandir(folder) as it:
            return any("tfevents" in e.name and _writer_key(e.name) == key and e.is_file() for e in it)
    except OSError:
        return False


def _scalars_name(tag: str, sub: str) -> str:
    """``main/key`` for add_scalars output: torch folder ``main_key`` (``/`` as ``_``), tbX ``main/key``."""
    for head in (tag.replace("/", "_") + "_", tag + "/"):
        if sub.startswith(head) and len(sub) > len(head):
            return f"{tag}/{sub[len(head):]}"
    return f"{sub}/{tag}"


# ---- grouping into rows --------------------------------------------------------------------


class _Grouper:
    """Joins consecutive scalars of one step into one Record (the rules: module docstring)."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch_kind = False  # the step counts epochs (Keras epoch_* tags)
        self.first = ""
        self.metrics: dict[str, float] = {}
        self.shape: set[str] | None = None  # what groups starting with ``first`` held before
        self.hits = 0  # metrics of the open group that are in its shape
        self.shapes: dict[str, set[str]] = {}
        self.restart = False
        self.out: list[Record] = []

    def add(self, step: int, epoch_kind: bool, name: str, value: float) -> None:
        metrics = self.metrics
        if metrics and (step != self.step or epoch_kind != self.epoch_kind or name in metrics
                        or len(metrics) >= MAX_GROUP):
            self.close(learn=True)
            metrics = self.metrics
        if not metrics:
            self.step, self.epoch_kind, self.first, self.hits = step, epoch_kind, name, 0
            self.shape = self.shapes.get(name)
        metrics[name] = value
        if self.shape is not None and name in self.shape:
            self.hits += 1
            if self.hits == len(self.shape):
                self.close(learn=False)

    def session_start(self) -> None:
        self.close(learn=True)
        self.restart = True

    def close(self, learn: bool) -> None:
        if not self.metrics:
            return
        metrics, self.metrics = self.metrics, {}
        if learn and (self.first in self.shapes or len(self.shapes) < MAX_TAGS):
            self.shapes.setdefault(self.first, set()).update(metrics)
        step, epoch = self.step, None
        for key in EPOCH_KEYS:
            v = metrics.pop(key, None)
            if epoch is None and v is not None and v == v:
                epoch = v
        if self.epoch_kind:
            step, epoch = None, float(step)
        self.out.append(Record(metrics, step, epoch, restart=self.restart))
        self.restart = False

    def get_state(self) -> dict[str, Any]:
        return {
            "key": [self.step, self.epoch_kind],
            "first": self.first,
            "metrics": {k: v.hex() for k, v in self.metrics.items()},  # JSON has no nan/inf
            "shapes": {k: sorted(v) for k, v in self.shapes.items()},
            "restart": self.restart,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        step, epoch_kind = state.get("key", (0, False))
        self.step, self.epoch_kind = int(step), bool(epoch_kind)
        self.first = str(state.get("first", ""))
        self.metrics = {k: float.fromhex(v) for k, v in state.get("metrics", {}).items()}
        self.shapes = {k: set(v) for k, v in state.get("shapes", {}).items()}
        self.shape = self.shapes.get(self.first)
        self.hits = sum(1 for k in self.metrics if k in (self.shape or ()))
        self.restart = bool(state.get("restart", False))


# ---- the reader ----------------------------------------------------------------------------


class TensorBoardReader(Reader):
    """Scalars of one TensorBoard event file, read incrementally (format: module docstring)."""

    name = "tensorboard"
    idle_seconds: float = IDLE_SECONDS

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.offset = 0
        self.identity: tuple[int, int] | None = None
        self.scanning = False  # inside a damaged stretch, looking for the next record
        self.group = _Grouper()
        self.non_scalar: set[bytes] = set()  # tags whose plugin metadata says "not scalars"
        _, sub = _layout(self.path)
        keras = sub in KERAS_FOLDERS
        self.sub = None if keras else sub  # an add_scalars subfolder
        self.prefix = "val_" if sub == "validation" else ""
        self.keras = keras and self.path.name.endswith(".v2")
        self._names: dict[bytes, tuple[str, bool]] = {}

    @classmethod
    def matches(cls, path: Path) -> bool:
        return "tfevents" in path.name

    @classmethod
    def run_dir(cls, path: Path) -> Path:
        """``log_dir`` for Keras's ``train/``, ``validation/`` and add_scalars subfolders."""
        return _layout(Path(path))[0]

    # ---- state -----------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "identity": self.identity,
            "scanning": self.scanning,
            "group": self.group.get_state(),
            "non_scalar": sorted(t.decode("utf-8", "surrogateescape") for t in self.non_scalar),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.offset = int(state.get("offset", 0))
        ident = state.get("identity")
        self.identity = tuple(ident) if ident else None
        self.scanning = bool(state.get("scanning", False))
        self.group = _Grouper()
        self.group.set_state(state.get("group", {}))
        self.non_scalar = {t.encode("utf-8", "surrogateescape") for t in state.get("non_scalar", ())}

    # ---- reading ---------------------------------------------------------------------------
    def read(self) -> list[Record]:
        self.restarted = self.more = False
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                self._check_identity((st.st_dev, st.st_ino), st.st_size)
                begin = self.offset
                if st.st_size > begin:
                    buf = self._load(f, st.st_size)
                    self._consume(buf, st.st_size)
                    self.more = begin + len(buf) < st.st_size and self.offset > begin
        except FileNotFoundError:
            return []
        if not self.more and time.time() - st.st_mtime >= self.idle_seconds:
            self.group.close(learn=False)
        out, self.group.out = self.group.out, []
        return out

    def _check_identity(self, identity: tuple[int, int], size: int) -> None:
        """A replaced or shrunk file is a new log: read it from the start."""
        if (self.identity is not None and identity != self.identity) or size < self.offset:
            self.offset, self.scanning = 0, False
            self.group, self.non_scalar = _Grouper(), set()
            self.restarted = True
        self.identity = identity

    def _load(self, f, size: int) -> bytes:
        """Up to PARSE_BLOCK bytes from the offset, more if the first record is longer (the
        Records of one read are live at once; 256 KiB reads as fast as 2 MiB, or faster)."""
        f.seek(self.offset)
        buf = f.read(min(PARSE_BLOCK, size - self.offset))
        if len(buf) >= 12:
            length, hcrc = _HEADER.unpack_from(buf, 0)
            need = length + 16
            if len(buf) < need and length <= MAX_RECORD and self.offset + need <= size \
                    and masked_crc32c(buf[:8]) == hcrc:
                buf += f.read(need - len(buf))
        return buf

    def _consume(self, buf: bytes, size: int) -> None:
        """Frame, parse, check and group the records in ``buf`` (read at ``self.offset``)."""
        arr = np.frombuffer(buf, dtype=np.uint8)
        starts, resume = self._frame(buf, arr, size)
        a = starts + 12
        e = a + _stored_u64(arr, starts)
        fast = fast_events(arr, a, e)
        slow: dict[int, Any] = {}
        for i in np.nonzero(~fast[0])[0].tolist():
            event = self._decode(buf, int(a[i]), int(e[i]))
            if event is not True:  # holds something: to be checked and delivered
                slow[i] = event
        keep = fast[0].copy()
        keep[list(slow)] = True
        idx = np.nonzero(keep)[0]
        good = masked_crcs(arr, a[idx], e[idx] - a[idx]) == _stored_u32(arr, e[idx])
        self._deliver(buf, starts.tolist(), idx.tolist(), good.tolist(), fast, slow)
        self.offset += resume

    def _deliver(self, buf: bytes, starts: list[int], idx: list[int], good: list[bool], fast, slow) -> None:
        """Feed the checked records, in file order, to the grouper."""
        _, steps, values, tag_at, tag_end, tensor = (x.tolist() for x in fast)
        add, names, non_scalar = self.group.add, self._names, self.non_scalar
        for i, ok in zip(idx, good):
            if not ok:
                self.skip("corrupt record (data CRC mismatch)", f"at byte {self.offset + starts[i]}")
            elif i in slow:
                self._dispatch(slow[i], self.offset + starts[i])
            else:
                tag = buf[tag_at[i] : tag_end[i]]
                if tensor[i] and tag in non_scalar:
                    continue
                name, epoch_kind = names.get(tag) or self._metric_name(tag)
                if tag == _HP_METRIC and values[i] == -1.0 and steps[i] == 0:
                    continue
                add(steps[i], epoch_kind, name, values[i])

    def _decode(self, buf: bytes, start: int, end: int):
        """The parsed event; True when it holds nothing of interest; None when malformed."""
        try:
            step, values, session_start = parse_event(buf[start:end])
        except _DECODE_ERRORS:
            return None
        if session_start or any(v[1] is not None or v[3] is not None for v in values):
            return step, values, session_start
        return True

    def _dispatch(self, event, where: int) -> None:
        if event is None:
            self.skip("malformed event", f"at byte {where}")
            return
        step, values, session_start = event
        if session_start:
            self.group.session_start()
        for tag, value, tensor, plugin in values:
            if plugin is not None:
                self._note_plugin(tag, plugin)
            if value is None or (tensor and tag in self.non_scalar):
                continue
            if tag == _HP_METRIC and value == -1.0 and step == 0:
                continue
            name, epoch_kind = self._names.get(tag) or self._metric_name(tag)
            self.group.add(step, epoch_kind, name, value)

    def _note_plugin(self, tag: bytes, plugin: bytes) -> None:
        if plugin == b"scalars":
            self.non_scalar.discard(tag)
        elif len(self.non_scalar) < MAX_TAGS:
            self.non_scalar.add(tag)

    def _metric_name(self, tag: bytes) -> tuple[str, bool]:
        """(metric name, the step is an epoch) of a tag; layout rules in the module docstring."""
        cached = self._names.get(tag)
        if cached is not None:
            return cached
        name = tag.decode("utf-8", "replace")
        epoch_kind = self.keras and name.startswith("epoch_") and len(name) > 6
        if epoch_kind:
            name = name[6:]
        if self.sub is not None:
            name = _scalars_name(name, self.sub)
        result = (self.prefix + name, epoch_kind)
        if len(self._names) >= MAX_TAGS:
            self._names.clear()
        self._names[tag] = result
        return result

    # ---- framing ---------------------------------------------------------------------------
    def _frame(self, buf: bytes, arr: np.ndarray, size: int) -> tuple[np.ndarray, int]:
        """Starts of the complete records in ``buf`` whose headers check out, and the position
        in ``buf`` to resume from (past ``buf`` after skipping an over-long record)."""
        found: list[np.ndarray] = []
        pos = 0
        while True:
            walked, end = _walk(buf, pos)
            s = np.array(walked + ([end] if end + 12 <= len(buf) else []), dtype=np.int64)
            good = masked_crcs(arr, s, np.full(len(s), 8)) == _stored_u32(arr, s + 8)
            bad = None if good.all() else int(np.argmin(good))
            if len(s) and bad != 0:
                self.scanning = False
            found.append(s[: len(walked) if bad is None else min(bad, len(walked))])
            if bad is None:
                pos = self._stop_at(buf, end, size)
                if pos == end or pos + 12 > len(buf):
                    return np.concatenate(found), pos
                continue  # skipped an over-long record that lies inside buf
            pos = self._resync(arr, int(s[bad]))
            if pos is None:
                return np.concatenate(found), max(int(s[bad]) + 1, len(buf) - 11)

    def _resync(self, arr: np.ndarray, at: int) -> int | None:
        """The next plausible record start after the bad header at ``at``; counts the damage."""
        found = _next_header(arr, at + 1)
        if not self.scanning:
            where = f"at byte {self.offset + at}"
            self.skip("corrupt record header", where if found is None else f"{found - at} bytes skipped {where}")
        self.scanning = found is None
        return found

    def _stop_at(self, buf: bytes, end: int, size: int) -> int:
        """Where framing stops when every header checked out: an incomplete record is retried
        from its start; an over-long one is skipped, unread, once the file holds all of it."""
        if end + 12 <= len(buf):
            length = _HEADER.unpack_from(buf, end)[0]
            if length > MAX_RECORD and self.offset + end + 16 + length <= size:
                self.skip("over-long record", f"{length} bytes at byte {self.offset + end}")
                return end + 16 + length
        return end


def _walk(buf: bytes, pos: int) -> tuple[list[int], int]:
    """Follow the declared lengths from ``pos``, headers unchecked: the starts of the complete
    records, and where the walk stopped (a partial or over-long record, or the end)."""
    starts: list[int] = []
    unpack, n = _HEADER.unpack_from, len(buf)
    while pos + 12 <= n:
        length = unpack(buf, pos)[0]
        if length > MAX_RECORD or pos + 16 + length > n:
            break
        starts.append(pos)
        pos += 16 + length
    return starts, pos


def _next_header(arr: np.ndarray, lo: int, window: int = 1 << 20) -> int | None:
    """The first offset >= ``lo`` whose 8 bytes are followed by their masked CRC32C."""
    last = len(arr) - 12  # the last offset with a whole header
    while lo <= last:
        hi = min(lo + window, last + 1)
        pos = np.arange(lo, hi, dtype=np.int64)
        hit = np.nonzero(masked_crcs(arr, pos, np.full(len(pos), 8)) == _stored_u32(arr, pos + 8))[0]
        if len(hit):
            return lo + int(hit[0])
        lo = hi
    return None


@hookimpl
def register_readers(register) -> None:
    register(TensorBoardReader)
