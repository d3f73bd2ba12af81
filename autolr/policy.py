"""The policy interface.

A policy maps a stream of observations to a multiplicative factor on the base learning rate.
Its state is explicit and JSON-serialisable: ``init() -> state``,
``update(state, obs) -> (state, note)`` and ``value(state) -> factor``. Nothing is hidden in
the object, so a chain can be saved, restored, replayed and rewound to the same numbers.

A policy class is a frozen dataclass: its fields are its public parameters, with PyTorch's
names where PyTorch has the same knob.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Sequence

UNITS = ("auto", "step", "epoch", "row")
State = dict[str, Any]
Note = dict[str, Any]


class PolicyError(ValueError):
    """Invalid policy name or parameters; the message says what is valid."""


@dataclass(frozen=True, slots=True, init=False)
class Observation:
    """One log row as a policy sees it.

    ``lr`` is the learning rate the chain had set while the row was produced: absolute when the
    base LR is known, else a scale on the loop's own base LR. ``monitor`` is the run's
    monitored metric name (None until the log shows one) and ``unit`` the run's default unit.
    ``progress`` says the run's epochs tell where training is (Hugging Face: 0.5 = half of the
    first epoch done; Lightning: the current epoch on every step row), not the index of the
    epoch just done (Keras's CSVLogger: 0 after the first epoch); set once a row shows a
    fractional epoch or a second moment of one epoch (see ``chain._epochs_run``).
    """

    row: int
    step: int | None
    epoch: float | None
    metrics: Mapping[str, float]
    lr: float
    monitor: str | None = None
    unit: str = "row"
    progress: bool = False

    def __init__(self, row: int, step: int | None, epoch: float | None, metrics: Mapping[str, float],
                 lr: float, monitor: str | None = None, unit: str = "row", progress: bool = False):
        # The slot setters directly (one Observation per row): a frozen dataclass's own
        # __init__ goes through object.__setattr__ for each field.
        _obs_set[0](self, row)
        _obs_set[1](self, step)
        _obs_set[2](self, epoch)
        _obs_set[3](self, metrics)
        _obs_set[4](self, lr)
        _obs_set[5](self, monitor)
        _obs_set[6](self, unit)
        _obs_set[7](self, progress)

    def counter(self, unit: str) -> float | None:
        """The row's step, epoch or row index as logged (``auto``: the run's default unit)."""
        if unit == "auto":
            unit = self.unit
        return self.step if unit == "step" else self.epoch if unit == "epoch" else self.row

    def time(self, unit: str) -> float | None:
        """The row's time t in ``unit``, an index: the LR set after this row applies from t + 1.

        The counter as logged, but a progress epoch e is t = e − 1 (the LR after the row at
        e = 1.0, the first epoch done, applies from epoch index 1)."""
        if unit == "auto":
            unit = self.unit
        if unit == "epoch" and self.progress and self.epoch is not None:
            return self.epoch - 1.0
        return self.step if unit == "step" else self.epoch if unit == "epoch" else self.row

    def per_epoch(self, unit: str) -> bool:
        """Whether ``unit`` is an index epoch: one row an epoch (Keras's CSVLogger)."""
        return (self.unit if unit == "auto" else unit) == "epoch" and not self.progress


_obs_set = tuple(Observation.__dict__[f.name].__set__ for f in dataclasses.fields(Observation))


#: Names of a validation loss, in order of preference: Keras's and Lightning's ``val_loss``,
#: Hugging Face's ``eval_loss`` (``eval/loss`` in its TensorBoard and W&B logs), and the
#: slash and long spellings. Monitored first when no ``--metric`` is given.
VALIDATION_LOSSES = ("val_loss", "eval_loss", "val/loss", "eval/loss", "validation/loss", "valid_loss",
                     "validation_loss", "valid/loss", "val_loss_epoch")
#: Names of a per-step training loss, in order of preference: monitored next, and watched by
#: ``auto``'s divergence guard.
TRAINING_LOSSES = ("loss", "train_loss", "train/loss", "training_loss", "loss_step", "train_loss_step",
                   "train/loss_step")

#: A metric name's words (split at / _ . - or space), and those that name a validation or a
#: training split (``Loss/val``, ``val_loss_step``, ``train_loss_epoch``).
METRIC_WORDS = re.compile(r"[/_.\-\s]+")
VALIDATION_WORDS = frozenset({"val", "valid", "validation", "eval", "evaluation"})
TRAINING_WORDS = frozenset({"train", "training"})

#: Rows after which a ``--metric`` never seen is reported even without a near spelling (a
#: validation metric logged once an epoch can take thousands of per-step rows to appear).
METRIC_UNSEEN_ROWS = 5000


def missing_metric(metric: str, names: set[str], rows: int, *, finished: bool = False,
                   label: str = "--metric") -> str | None:
    """A warning for a ``--metric`` (or a policy's ``label``, such as ``plateau:metric``) no
    row has held so far: at once when a logged name is a near spelling of it, after
    METRIC_UNSEEN_ROWS rows (or at the end of a ``finished`` log) otherwise; None when none is
    due."""
    import difflib

    if metric in names or not rows:
        return None
    # (not a sibling, the same name but for its split or its epoch/step suffix: val_accuracy,
    # once an epoch, comes after many rows of accuracy; val_loss_epoch after train_loss_epoch)
    near = [n for n in difflib.get_close_matches(metric, sorted(names), n=3, cutoff=0.75)
            if _stem(n) != _stem(metric)]
    if not near and rows < METRIC_UNSEEN_ROWS and not finished:
        return None
    blind = "the policies never see it" if label == "--metric" else f"{label.split(':')[0]} never sees it"
    message = f"{label} {metric!r} is in none of {rows} rows read{'' if finished else ' so far'} ({blind})"
    if near:
        return f"{message}; did you mean {' or '.join(map(repr, near))}?"
    return f"{message}; the log has {', '.join(map(repr, sorted(names)[:12]))}"


_SPLIT_WORDS = VALIDATION_WORDS | TRAINING_WORDS | {"test", "epoch", "step"}


def _stem(name: str) -> tuple[str, ...]:
    """A metric name without its split and epoch/step words (``val_loss_epoch`` -> loss)."""
    return tuple(w for w in METRIC_WORDS.split(name.lower()) if w and w not in _SPLIT_WORDS)


class UnseenNames:
    """What a chain names that no row has held yet, each reported once (see ``warnings``):
    ``--metric`` and the policies' ``metric`` and ``guard_metric`` (misspelt, a policy is blind:
    a plateau that never fires, a guard that is off), and a ``unit`` of step or epoch that no
    row carries (the schedules never move)."""

    MAX_NAMES = 1000  # distinct names kept to suggest a spelling from

    def __init__(self, chain: Any | None) -> None:
        self.metrics: dict[str, str] = {}
        self.units: dict[str, str] = {}
        self.names: set[str] = set()
        self.rows = 0
        if chain is None:  # nothing to check
            return
        if chain.metric:
            self.metrics[chain.metric] = "--metric"
        if chain.unit in ("step", "epoch"):
            self.units[chain.unit] = "--unit"
        for policy in chain.policies:
            for key in ("metric", "guard_metric"):
                name = getattr(policy, key, None)
                if isinstance(name, str) and name:
                    self.metrics.setdefault(name, f"{policy.name}:{key}")
            unit = getattr(policy, "unit", None)
            if unit in ("step", "epoch"):
                self.units.setdefault(unit, f"{policy.name}:unit")

    def __bool__(self) -> bool:
        return bool(self.metrics or self.units)

    def see(self, records: Sequence[Any], columns: Sequence[str] = ()) -> None:
        """Take a batch of rows (``Record``s) and the log's column names."""
        self.rows += len(records)
        if self.metrics:
            names, wanted = self.names, self.metrics
            for record in records:
                if len(names) < self.MAX_NAMES:  # (kept to suggest a spelling from)
                    names.update(record.metrics)
                for metric in [m for m in wanted if m in record.metrics]:
                    del wanted[metric]
            for metric in [m for m in wanted if m in columns]:
                del wanted[metric]
        for unit in [u for u in self.units if any(getattr(r, u) is not None for r in records)]:
            del self.units[unit]

    def warnings(self, finished: bool = False) -> list[str]:
        """The warnings due now (``finished``: the log is complete); each is given once."""
        out = []
        for metric, label in list(self.metrics.items()):
            message = missing_metric(metric, self.names, self.rows, finished=finished, label=label)
            if message:
                out.append(message)
                del self.metrics[metric]
        if self.rows and (finished or self.rows >= METRIC_UNSEEN_ROWS):
            for unit, label in self.units.items():
                other = "epoch" if unit == "step" else "step"
                out.append(f"{label} {unit}: none of {self.rows} rows read has a{'n' if unit == 'epoch' else ''} "
                           f"{unit} (the schedules never move); use the {other} or the row as the unit")
            self.units.clear()
        return out


@functools.lru_cache(maxsize=1024)
def default_mode(metric: str | None) -> str:
    """``max`` for accuracy-like metrics (name contains ``acc``), else ``min``."""
    return "max" if metric and "acc" in metric.lower() else "min"


@dataclass(frozen=True)
class Policy:
    """Base class. Subclasses set ``name`` and implement ``init``, ``update`` and ``value``."""

    name: ClassVar[str] = ""
    #: Stateful policies react to the metric. They are not updated while a schedule in the
    #: chain ``holds`` (a warmup in progress), so their counts start after it.
    stateful: ClassVar[bool] = False

    def init(self, base_lr: float = 1.0) -> State:
        """The state before any observation. ``base_lr`` is 1.0 when only scales are known."""
        raise NotImplementedError

    def update(self, state: State, obs: Observation) -> tuple[State, Note | None]:
        """Return the new state and an optional note ``{"reason": str, ...evidence}``.

        ``state`` itself is never modified (return a new dict): the chain still reads it."""
        raise NotImplementedError

    def value(self, state: State) -> float:
        """The factor on the base learning rate for what follows."""
        raise NotImplementedError

    def ahead(self, state: State, t: int, unit: str) -> float:
        """The factor at step ``t`` (after the last row's step) if no other row comes first:
        what ``value`` would give after a row at t − 1 that brings nothing but the time.
        ``unit`` is the run's unit. Default ``value(state)``: a policy that reacts to the metric
        holds until a row says otherwise; a schedule (a pure function of time) overrides it, and
        the control file then lists its changes ahead for the job to take between log rows."""
        return self.value(state)

    def monitor_changed(self, state: State) -> State:
        """The run's automatic metric changed (val_loss appeared): restart metric statistics."""
        return state

    def holds(self, obs: Observation) -> bool:
        """True while this policy owns the LR at ``obs`` (a warmup in progress)."""
        return False

    def restart_time(self, state: State) -> State:
        """The state to go on from when the run's time runs back once because its reading
        changed (the first step after rows without one; epochs found to say where training
        is). Default: the state as it is; a schedule, a pure function of time, starts over."""
        return state

    # ---- construction from user input -------------------------------------------------
    @classmethod
    def doc(cls) -> str:
        """The one-line description: the first line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def parameters(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "Policy":
        """Build from user-supplied values, coercing types; unknown names are clear errors."""
        fields = {f.name: f for f in cls.parameters()}
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise PolicyError(
                f"policy {cls.name!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(fields) or '(none)'}"
            )
        missing = [name for name, f in fields.items() if name not in params
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            example = ",".join(f"{name}=..." for name in missing)
            raise PolicyError(f"policy {cls.name!r} needs {', '.join(map(repr, missing))} "
                              f"(e.g. --policy {cls.name}:{example})")
        values = {k: coerce(v, hints[k], f"{cls.name}:{k}") for k, v in params.items()}
        try:
            return cls(**values)
        except TypeError as exc:
            raise PolicyError(f"policy {cls.name!r}: {exc}") from exc


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Coerce ``value`` to the type ``hint`` (int, float, bool, str, Literal, Optional, tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except PolicyError as exc:
                errors.append(str(exc))
        raise PolicyError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise PolicyError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [value]
        item_hint = args[0] if args else Any
        return tuple(coerce(v, item_hint, where) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise PolicyError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
            raise PolicyError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PolicyError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise PolicyError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise PolicyError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def check(condition: bool, policy: str, message: str) -> None:
    """Raise a PolicyError unless ``condition``."""
    if not condition:
        raise PolicyError(f"policy {policy!r}: {message}")
