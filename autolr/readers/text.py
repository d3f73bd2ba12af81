"""Plain console logs (``*.log``, ``*.txt``, ``*.out``, W&B's ``files/output.log``).

A line is the text up to ``\\n``. Progress bars redraw a line with ``\\r`` (tqdm, Keras) and
``\\b`` runs (Keras 3): only a line's final state counts, i.e. its last non-blank piece
between ``\\r``/``\\b``/``\\n``, with ANSI escape codes removed. The tailer consumes up to the
last ``\\n`` or ``\\r`` and keeps the latest redraw of an unfinished line in its state.

Built-in formats (each with a cheap substring check before its regex):

* nanoGPT ``iter 100: loss 2.3450, time 12.34ms, mfu 1.23%`` (metrics ``loss``, ``time_ms``,
  ``mfu``) and ``step 500: train loss 1.2345, val loss 1.3456`` (``train_loss``, ``val_loss``).
* Hugging Face Trainer prints ``{'loss': 2.8485, 'learning_rate': 4.85e-05, 'epoch': 0.03}``,
  numbers bare or quoted (5.x); no step in these lines.
* JSON objects after a prefix, e.g. fairseq ``... | INFO | train_inner | {"epoch": 1,
  "update": 0.001, "loss": "16.475", "num_updates": "1"}``; ``num_updates`` (or
  ``<split>_num_updates``) is the step, and fairseq's ``update`` (the epoch's progress) is the
  epoch of its ``train_inner`` lines.
* Keras progress bars ``1875/1875 ━━━━ 2s 1ms/step - accuracy: 0.8658 - loss: 0.3749``; the
  preceding ``Epoch 3/10`` gives epoch 2 (Keras' 0-based index, as in its CSVLogger) and the
  step is ``epoch * steps_per_epoch + batch``. One record per epoch: the line's final state.

A rank label (``0: ``, ``[rank1]: ``) in front of a line is removed; lines of other ranks than 0
are ignored. User patterns (``patterns=``) are regexes with named groups, tried first on the
whole line (rank label included), searched anywhere in it:
``step`` and ``epoch`` are the counters, every other group a metric (``__`` in a group name
stands for ``/``); groups that are not numbers are ignored.

In a W&B run folder only ``files/output.log`` is read; its run folder is the ``offline-run-...``
folder, so it is a second source of the run whose ``.wandb`` file the W&B reader reads.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

from ..hookspecs import hookimpl
from ..records import STEP_KEYS, Record, split_counters
from .base import MAX_LINE, Reader, TextTailer
from .jsonl import numeric_items

#: A redraw kept in the state while its line is unfinished is at most this long.
MAX_PENDING = 64 << 10
SUFFIXES = frozenset({".log", ".txt", ".out"})
#: Text files that are never training logs.
NOT_LOGS = frozenset({"requirements.txt", "vocab.txt", "merges.txt", "license.txt", "readme.txt",
                      "cmakelists.txt", "top_level.txt", "dependency_links.txt", "sources.txt"})
WANDB_RUN = re.compile(r"(?:offline-)?run-\d{8}_\d{6}-\w+")

ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
REDRAW = re.compile(rb"[\r\b]+")
NUM = r"[-+]?(?:\d*\.?\d+(?:[eE][-+]?\d+)?|nan|inf(?:inity)?)"
#: A rank label: ``[rank1]: ``, ``[1]: ``, ``1: ``, and torchrun's ``--tee`` ``[default1]:`` (role
#: name and local rank, no space).
RANK = re.compile(r"^\s*(?:\[(?:rank\s*|[A-Za-z_][\w-]*?)?(\d+)\]:\s*|(\d{1,4}):\s)")
NANO_ITER = re.compile(rf"\biter (\d+): loss ({NUM})(?:, time ({NUM})ms)?(?:, mfu ({NUM})%)?", re.I)
NANO_EVAL = re.compile(rf"\bstep (\d+): train loss ({NUM}), val loss ({NUM})", re.I)
HF_DICT = re.compile(r"^\{'.*\}$")
HF_PAIR = re.compile(r"'([^'\\]+)':\s*'?([^',}]*)")
KERAS_EPOCH = re.compile(r"^Epoch (\d+)/(\d+)$")
KERAS_BAR = re.compile(r"^(\d+)/(\d+|Unknown)\s")
KERAS_PAIR = re.compile(rf"\s-\s([A-Za-z_][\w/.]*):\s*({NUM})(?![\w:])")


def _float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def clean(piece: bytes) -> str:
    """A redraw piece as text: decoded, ANSI codes removed, whitespace stripped."""
    text = piece.decode("utf-8", "replace")
    if "\x1b" in text:
        text = ANSI.sub("", text)
    return text.strip()


def final_state(line: bytes) -> str:
    """The last non-blank piece of a line redrawn with ``\\r``/``\\b`` ('' when none)."""
    if b"\r" not in line and b"\b" not in line:
        return clean(line)
    for piece in reversed(REDRAW.split(line)):
        text = clean(piece)
        if text:
            return text
    return ""


class RedrawTailer(TextTailer):
    """Byte-offset tailer that consumes up to the last ``\\n`` or ``\\r``.

    Yields the final state of every line finished by ``\\n``; the latest redraw of the
    unfinished line is kept in ``pending``. Restarts, the mark and the kept descriptor are
    ``TextTailer``'s; pieces longer than ``MAX_LINE`` are skipped and counted.
    """

    def __init__(self, path: Path, reader: Reader):
        super().__init__(path, reader)
        self.pending = ""  # the latest redraw of the unfinished line

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "pending": self.pending}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self.pending = str(state.get("pending", ""))

    def restart(self) -> None:
        super().restart()
        self.pending = ""

    def _split(self, data: bytes) -> list[str]:
        return self._take(data)

    def _take(self, data: bytes) -> list[str]:
        end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        if end == 0:
            if len(data) > MAX_LINE:  # no line end in sight: discard, bounded
                self.offset += len(data)
                self._over_long(f"> {MAX_LINE} bytes")
                self.skipping = True
            return []
        self.offset += end
        tail, data = len(data) - end, data[:end]
        if self.skipping:  # the first piece is the tail of an over-long one
            cut = min(i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0)
            if data[cut] == 0x0A:
                self.pending = ""
            data, self.skipping = data[cut:], False
        lines = data.split(b"\n")
        out = []
        for line in lines[:-1]:
            text = self._final(line) or self.pending
            self.pending = ""
            if text:
                out.append(text)
        if lines[-1]:
            self.pending = self._final(lines[-1]) or self.pending
            if len(self.pending) > MAX_PENDING:
                self._over_long(f"{len(self.pending)} characters")
                self.pending = ""
        if tail > MAX_LINE:  # the unfinished piece is already over-long: discard it now
            self.offset += tail
            self._over_long(f"> {MAX_LINE} bytes")
            self.skipping = True
        return out

    def _final(self, line: bytes) -> str:
        if len(line) <= MAX_LINE:
            return final_state(line)
        for piece in reversed(REDRAW.split(line)):  # a long line of short redraws is fine
            if len(piece) > MAX_LINE:
                self._over_long(f"{len(piece)} bytes")
                return ""
            text = clean(piece)
            if text:
                return text
        return ""

    def _over_long(self, detail: str) -> None:
        if not self.skipping:
            self.reader.skip("over-long line", detail)


# --- line parsers ---------------------------------------------------------------------------

def _record(values: dict[str, float], step: int | None = None, epoch: float | None = None) -> Record | None:
    if not values and step is None and epoch is None:
        return None
    return Record(values, step, epoch)


def parse_nanogpt_iter(text: str) -> Record | None:
    m = NANO_ITER.search(text)
    if m is None:
        return None
    names = ("loss", "time_ms", "mfu")
    values = {n: v for n, g in zip(names, m.groups()[1:]) if (v := _float(g)) is not None}
    return _record(values, int(m.group(1)))


def parse_nanogpt_eval(text: str) -> Record | None:
    m = NANO_EVAL.search(text)
    if m is None:
        return None
    return _record({"train_loss": float(m.group(2)), "val_loss": float(m.group(3))}, int(m.group(1)))


def parse_hf_dict(text: str) -> Record | None:
    """A printed Python dict of numbers (bare or quoted), e.g. a Trainer log line."""
    if HF_DICT.match(text) is None:
        return None
    values = {k: v for k, raw in HF_PAIR.findall(text) if (v := _float(raw.strip())) is not None}
    return split_counters(values) if values else None


def parse_json_object(text: str) -> Record | None:
    """A JSON object at the end of a line, after any prefix (fairseq's ``| train_inner |``)."""
    start = text.find('{"')
    try:
        obj = json.loads(text[start:])
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    values = numeric_items(obj)
    if not values:
        return None
    if not any(k in values for k in STEP_KEYS):  # fairseq's valid_num_updates, train_num_updates
        split = [k for k in values if k.endswith("_num_updates")]
        if split:
            values["num_updates"] = values.pop(split[0])
    elif "update" in values and "epoch" in values and "num_updates" in values:
        # fairseq's train_inner: "epoch" counts from 1 during the epoch, "update" is the
        # progress (epoch - 1 + fraction done), as its end-of-epoch lines' "epoch" is.
        values["epoch"] = values.pop("update")
    return split_counters(values)


# --- the reader -----------------------------------------------------------------------------

class TextReader(Reader):
    """Console output of a training script; see the module docstring for the formats."""

    name = "text"
    priority = -10
    #: User regexes tried before the built-ins (set by ``configured``).
    patterns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, path: str | Path, patterns: Iterable[str] | None = None):
        super().__init__(path)
        self.tailer = RedrawTailer(self.path, self)
        sources = self.patterns if patterns is None else tuple(patterns)
        self.regexes = [re.compile(p) for p in sources]
        self.epoch: int | None = None  # Keras: index of the epoch being trained

    @classmethod
    def configured(cls, patterns: Iterable[str]) -> type[TextReader]:
        """A subclass whose instances use ``patterns`` (for a registry that calls ``cls(path)``).

        Raises ``re.error`` for an invalid pattern.
        """
        patterns = tuple(patterns)
        for p in patterns:
            re.compile(p)
        return type(cls.__name__, (cls,), {"patterns": patterns, "__module__": cls.__module__})

    @classmethod
    def matches(cls, path: Path) -> bool:
        if path.suffix.lower() not in SUFFIXES or path.name.lower() in NOT_LOGS:
            return False
        parent = path.parent
        if parent.name == "wandb" or WANDB_RUN.fullmatch(parent.name) or "latest-run" in path.parts[-4:-1]:
            return False  # wandb/debug.log, a run folder's own logs, the wandb/latest-run symlink
        if WANDB_RUN.fullmatch(parent.parent.name) or WANDB_RUN.fullmatch(parent.parent.parent.name):
            return path.name == "output.log" and parent.name == "files"
        return True

    @classmethod
    def run_dir(cls, path: Path) -> Path:
        """The file's folder; for W&B's ``files/output.log`` the run folder above it."""
        if path.name == "output.log" and path.parent.name == "files" \
                and WANDB_RUN.fullmatch(path.parent.parent.name):
            return path.parent.parent
        return path.parent

    def get_state(self) -> dict[str, Any]:
        return {"tail": self.tailer.get_state(), "epoch": self.epoch}

    def set_state(self, state: dict[str, Any]) -> None:
        self.tailer.set_state(state.get("tail", {}))
        epoch = state.get("epoch")
        self.epoch = None if epoch is None else int(epoch)

    def read(self) -> list[Record]:
        self.restarted = False
        lines = self.tailer.read_lines()
        if self.restarted:
            self.epoch = None
        out = []
        for text in lines:
            record = self.parse(text)
            if record is not None:
                out.append(record)
        return out

    def parse(self, text: str) -> Record | None:
        """The record in one line's final state, or None when it holds none."""
        for regex in self.regexes:  # on the whole line: a user pattern may see the rank label
            m = regex.search(text)
            if m is not None:
                return self._from_groups(m.groupdict())
        m = RANK.match(text)
        if m is not None:
            if int(next(g for g in m.groups() if g is not None)) != 0:
                return None
            text = text[m.end():].lstrip()
        for trigger, parser in BUILTIN:
            if trigger in text:
                record = parser(self, text)
                if record is not None:
                    return record
        return None

    @staticmethod
    def _from_groups(groups: dict[str, str | None]) -> Record | None:
        values = {k.replace("__", "/"): v for k, raw in groups.items() if (v := _float(raw)) is not None}
        step = values.pop("step", None)
        epoch = values.pop("epoch", None)
        step = int(step) if step is not None and step == step and abs(step) < 2**63 else None
        return _record(values, step, epoch)

    def _keras_epoch(self, text: str) -> None:
        m = KERAS_EPOCH.match(text)
        if m is not None:
            self.epoch = int(m.group(1)) - 1
        return None

    def _keras_bar(self, text: str) -> Record | None:
        m = KERAS_BAR.match(text)
        if m is None:
            return None
        values = {k: float(v) for k, v in KERAS_PAIR.findall(text) if k != "ETA"}
        if not values:
            return None
        step = None
        if m.group(2) != "Unknown":
            step = int(m.group(1)) + (self.epoch or 0) * int(m.group(2))
        return _record(values, step, None if self.epoch is None else float(self.epoch))


def _static(parser: Callable[[str], Record | None]) -> Callable[[TextReader, str], Record | None]:
    return lambda reader, text: parser(text)


#: (substring that must occur, parser), tried in order.
BUILTIN: tuple[tuple[str, Callable[[TextReader, str], Record | None]], ...] = (
    ("iter ", _static(parse_nanogpt_iter)),
    (" val loss ", _static(parse_nanogpt_eval)),
    ("{'", _static(parse_hf_dict)),
    ('{"', _static(parse_json_object)),
    ("Epoch ", TextReader._keras_epoch),
    (" - ", TextReader._keras_bar),
)


@hookimpl
def register_readers(register) -> None:
    register(TextReader)
