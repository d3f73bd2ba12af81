"""A chain of policies: lr = base_lr · manual · Π factor_i, clamped to [min_lr, max_lr].

The chain state is one JSON-serialisable dict. ``update(state, record)`` is a pure step: the
same records from the same state give the same decisions, which is what makes restart, replay
and rewind exact.
"""
from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .policy import (METRIC_WORDS, TRAINING_LOSSES, TRAINING_WORDS, VALIDATION_LOSSES, VALIDATION_WORDS, Observation,
                     Policy, PolicyError, State, coerce)
from .records import Record

#: Relative change below which a new LR is not a decision (floating-point noise).
REL_TOL = 1e-12


@dataclass(frozen=True)
class Decision:
    """A learning-rate change: the control file's fields plus the evidence behind it."""

    scale: float
    lr: float | None
    step: int | None
    policy: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    kind: str = "decision"


#: Each known loss name's rank (lower is better): the validation losses, then other names of a
#: validation loss, then the training losses, then other names of a training loss, then any
#: other name containing "loss", then none. A name is "other validation" when one of its
#: words (split at / _ . - or space) is val, valid, validation, eval or evaluation, and "other
#: training" for train or training: TensorBoard's ``Loss/val`` and ``Loss/train``, add_scalars'
#: ``loss/split/val``, Lightning's ``val_loss_step``.
_RANKS = {name: i for i, name in enumerate(VALIDATION_LOSSES)}
_VAL_OTHER = len(_RANKS)
_RANKS.update({name: _VAL_OTHER + 1 + i for i, name in enumerate(TRAINING_LOSSES)})
_TRAIN_OTHER = len(_RANKS) + 1
_OTHER, _NONE = _TRAIN_OTHER + 1, _TRAIN_OTHER + 2
_VALIDATION = frozenset(VALIDATION_LOSSES)


@functools.lru_cache(maxsize=4096)
def metric_rank(name: str | None) -> int:
    """Lower is better; see ``_RANKS``."""
    if name is None:
        return _NONE
    rank = _RANKS.get(name)
    if rank is not None:
        return rank
    lower = name.lower()
    if "loss" not in lower:
        return _NONE
    words = set(METRIC_WORDS.split(lower))
    return _VAL_OTHER if words & VALIDATION_WORDS else _TRAIN_OTHER if words & TRAINING_WORDS else _OTHER


def choose_metric(names: Iterable[str]) -> str | None:
    """The best-ranked loss among ``names`` (see ``_RANKS``), the first of equals; None when no
    name contains "loss"."""
    best, best_rank = None, _NONE
    for name in names:
        rank = metric_rank(name)
        if rank < best_rank:
            best, best_rank = name, rank
    return best


_ROW_BEST: dict[tuple, tuple[str | None, int]] = {}


def _row_best(columns: tuple, names: tuple) -> tuple[str | None, int]:
    """``choose_metric`` of a row's names and its rank, cached per name set (rows repeat them)."""
    key = (columns, names)
    hit = _ROW_BEST.get(key)
    if hit is None:
        if len(_ROW_BEST) >= 4096:  # a log whose rows keep inventing names
            _ROW_BEST.clear()
        best = choose_metric(columns + names)
        hit = _ROW_BEST[key] = (best, metric_rank(best))
    return hit


@dataclass(frozen=True)
class Chain:
    """Composes policies. ``base_lr`` None means only scales are known (lr is then null)."""

    policies: tuple[Policy, ...]
    base_lr: float | None = None
    min_lr: float | None = None
    max_lr: float | None = None
    metric: str | None = None
    unit: str | None = None
    #: A change no policy gave a reason for (a schedule's next step) is published only once it
    #: moves the LR by at least this fraction from the last published one; 0: every change.
    min_change: float = 0.0

    def __post_init__(self) -> None:
        for name in ("base_lr", "min_lr", "max_lr"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise PolicyError(f"{name} must be a finite number > 0, got {v!r}")
        if not (math.isfinite(self.min_change) and 0 <= self.min_change < 1):
            raise PolicyError(f"min_change must be in [0, 1), got {self.min_change!r}")
        if self.base_lr is None and (self.min_lr is not None or self.max_lr is not None):
            # Without a base LR only a scale is known: a clamp of 0.01 would cut the loop's LR 100x.
            raise PolicyError("min_lr and max_lr are learning rates: give base_lr too "
                              "(without it autolr knows only a scale of the loop's own LR)")
        if self.min_lr and self.max_lr and self.min_lr > self.max_lr:
            raise PolicyError(f"min_lr {self.min_lr} is above max_lr {self.max_lr}")
        # Only a policy that overrides holds() (a warmup) can hold the LR: the others are not asked.
        object.__setattr__(self, "_may_hold", tuple(p for p in self.policies if type(p).holds is not Policy.holds))
        # Only a policy that overrides ahead() (a schedule, a warmup) moves the LR between rows.
        object.__setattr__(self, "movers", tuple(p for p in self.policies if type(p).ahead is not Policy.ahead))

    @property
    def base(self) -> float:
        return self.base_lr if self.base_lr is not None else 1.0

    @property
    def holders(self) -> tuple[Policy, ...]:
        """The policies that can hold the LR (a warmup): those that override ``holds``."""
        return self._may_hold

    @property
    def names(self) -> str:
        return "+".join(p.name for p in self.policies) or "none"

    # ---- state -------------------------------------------------------------------------
    def init(self) -> State:
        state: State = {
            "policies": [p.init(self.base) for p in self.policies],
            "manual": 1.0,
            "rows": 0,
            "monitor": self.metric,
            "unit": self.unit,
            "progress": False,
            "scale": 1.0,
        }
        scale = self._target_scale(state)
        state["scale"] = scale if _usable(scale) else 1.0
        return state

    def scale(self, state: State) -> float:
        """The multiplier on the loop's own base LR."""
        return state["scale"]

    def lr(self, state: State) -> float | None:
        """The absolute LR, or None when no base LR is known (``base_lr``, or one learnt from a
        manual LR: see :meth:`override`)."""
        base = self.base_lr if self.base_lr is not None else state.get("base")
        return None if base is None else base * state["scale"]

    def _raw(self, state: State) -> float:
        """manual × Π factors, before the min_lr/max_lr clamp."""
        raw = state["manual"]
        for policy, pstate in zip(self.policies, state["policies"]):
            raw *= policy.value(pstate)
        return raw

    def _target_scale(self, state: State) -> float:
        lr = self.base * self._raw(state)
        if self.min_lr is not None:
            lr = max(lr, self.min_lr)
        if self.max_lr is not None:
            lr = min(lr, self.max_lr)
        return lr / self.base

    def ahead(self, state: State, start: int, stop: int, limit: int, beyond: int = 0) -> list[tuple[int, float]]:
        """The scale at steps ``start`` … ``stop`` − 1 if no row comes first (each policy's
        :meth:`~autolr.policy.Policy.ahead`, times ``manual``, clamped): ``[(step, scale), ...]``
        where it changes from ``state["scale"]``, then from the entry before (by ``min_change``
        at least, when set: the rule a published change follows); when none comes before
        ``stop``, the first one within ``beyond`` more steps (a StepLR's next step). At most
        ``limit`` entries: with more, those that move the LR most are kept (:func:`_thin`),
        each still exact at its step.
        Empty unless the run counts steps and a policy moves on its own (a schedule, a warmup);
        a value that is not finite and positive is left out, as the chain never publishes one."""
        if state.get("unit") != "step" or stop <= start or limit <= 0:
            return []
        if not self.movers:
            return []
        fixed, movers = state["manual"], []
        for policy, pstate in zip(self.policies, state["policies"]):
            if policy in self.movers:
                movers.append((policy.ahead, pstate))
            else:
                fixed *= policy.value(pstate)
        base, low, high, min_change = self.base, self.min_lr, self.max_lr, self.min_change
        last, out = state["scale"], []
        for t in range(start, stop + beyond):
            if t >= stop and out:
                break
            raw = fixed
            for ahead, pstate in movers:
                raw *= ahead(pstate, t, "step")
            lr = base * raw
            if low is not None and lr < low:
                lr = low
            if high is not None and lr > high:
                lr = high
            scale = lr / base
            if not _usable(scale):
                continue  # as a published change: never one that is not finite and positive
            if _changed(last, scale) and not (min_change and abs(scale - last) < min_change * last):
                out.append((t, scale))
                last = scale
        return _thin(out, state["scale"], limit) if len(out) > limit else out

    # ---- observation -------------------------------------------------------------------
    def _restart_schedules(self, states: list) -> list:
        """Each policy's :meth:`~autolr.policy.Policy.restart_time`: the run's time runs back
        once (its counter was just decided, or its epochs found to say where training is)."""
        return [p.restart_time(s) for p, s in zip(self.policies, states)]

    @staticmethod
    def _held_at(obs: Observation, state: State) -> Observation:
        """``obs`` with the run's last step and epoch where the row has none (a validation row
        without a step): a warmup still holds on such rows."""
        step, epoch = state.get("last_step"), state.get("last_epoch")
        if (obs.step is None and step is not None) or (obs.epoch is None and epoch is not None):
            return Observation(obs.row, step, epoch, obs.metrics, obs.lr, obs.monitor, obs.unit, obs.progress)
        return obs

    def update(
        self, state: State, record: Record, columns: Sequence[str] = ()
    ) -> tuple[State, Decision | None]:
        """Feed one log row; return the new state and the decision it caused, if any."""
        state = dict(state)
        monitor = state["monitor"]
        if self.metric is None and monitor not in _VALIDATION:
            best, rank = _row_best(tuple(columns), tuple(record.metrics))
            if rank < metric_rank(monitor):  # a better-ranked name in this row
                self._upgrade_monitor(state, best)
        step, epoch = record.step, record.epoch
        old_states = inputs = state["policies"]
        unit = state["unit"]
        if unit is None:
            # The first row with a counter decides; a log's first rows may carry none (a line of
            # hyperparameters), so "row" is settled only after UNIT_ROWS rows without one. Until
            # then rows count; schedules start over at the first counter.
            counter = "step" if step is not None else "epoch" if epoch is not None else None
            if counter is not None or state["rows"] + 1 >= UNIT_ROWS:
                state["unit"] = counter or "row"
            if counter is not None and state["rows"] > 0:
                inputs = self._restart_schedules(old_states)
            unit = counter or "row"
        progress = state.get("progress", False)
        if epoch is not None:
            if not progress and _epochs_run(state, step, epoch):
                # Epochs say where training is, not which epoch was just done; schedules start
                # over, as their time goes back by the one epoch.
                state["progress"] = progress = True
                inputs = self._restart_schedules(inputs)
            state["last_epoch"] = epoch
        if step is not None:
            state["last_step"] = step
        # (row, step, epoch, metrics, lr, monitor, unit, progress), positionally: one per row
        obs = Observation(state["rows"], step, epoch, record.metrics,
                          self.base * state["scale"], state["monitor"], unit, progress)
        if self._may_hold:
            at = obs if step is not None and (epoch is not None or "last_epoch" not in state) else self._held_at(obs, state)
            holders = [p for p in self._may_hold if p.holds(at)]
        else:
            holders = ()
        if not holders and len(inputs) == 1:  # the usual chain: one policy, nothing holding
            pstate, note = self.policies[0].update(inputs[0], obs)
            new_states, notes = [pstate], [note]
        else:
            new_states, notes = [], []
            for policy, pstate in zip(self.policies, inputs):
                if holders and policy.stateful and any(h is not policy for h in holders):  # another one's warmup
                    new_states.append(pstate)
                    notes.append(None)
                    continue
                pstate, note = policy.update(pstate, obs)
                new_states.append(pstate)
                notes.append(note)
        state["policies"] = new_states
        state["rows"] += 1
        return self._decide(state, obs, old_states, notes)

    def _upgrade_monitor(self, state: State, candidate: str | None) -> None:
        """Adopt the automatic metric; a better one seen later (a validation loss after a training
        loss) replaces it.

        Policies then restart their statistics on the new metric and keep their factors.
        """
        if candidate is None or metric_rank(candidate) >= metric_rank(state["monitor"]):
            return
        if state["monitor"] is not None:
            state["policies"] = [p.monitor_changed(s) for p, s in zip(self.policies, state["policies"])]
        state["monitor"] = candidate

    def _fold_clamp(self, state: State, old_states: list, old_scale: float) -> None:
        """A policy's decision acts on the LR in force: while ``min_lr``/``max_lr`` held the LR,
        manual takes the held ratio (scale / raw product) first, so that a cut under ``max_lr``
        lowers the LR at once instead of eating the product's excess over the clamp."""
        raw = state["manual"]
        for policy, pstate in zip(self.policies, old_states):
            raw *= policy.value(pstate)
        lr = self.base * raw
        if _usable(raw) and ((self.max_lr is not None and lr > self.max_lr)
                             or (self.min_lr is not None and lr < self.min_lr)):
            state["manual"] *= old_scale / raw

    def _decide(self, state, obs, old_states, notes) -> tuple[State, Decision | None]:
        old_scale = state["scale"]
        if (self.min_lr is not None or self.max_lr is not None) and any(notes):
            self._fold_clamp(state, old_states, old_scale)
        scale = self._target_scale(state)
        if not _changed(old_scale, scale):
            return state, None
        if self.min_change and abs(scale - old_scale) < self.min_change * old_scale and not any(notes):
            return state, None  # a schedule's small step: it waits until the steps add up to min_change
        old_values = [p.value(s) for p, s in zip(self.policies, old_states)]  # states are never modified
        changed, reasons, evidence = [], [], {}
        for policy, pstate, old, note in zip(self.policies, state["policies"], old_values, notes):
            new = policy.value(pstate)
            if not (note or _changed(old, new)):
                continue
            changed.append(policy.name)
            if note:
                reasons.append(f"{policy.name}: {note['reason']}")
                evidence[policy.name] = {k: v for k, v in note.items() if k != "reason"}
            else:
                unit = getattr(policy, "unit", "auto")
                reasons.append(f"{policy.name}: factor {old:.6g} -> {new:.6g} after "
                               f"{obs.unit if unit == 'auto' else unit} {obs.counter(unit):g}")
        if not _usable(scale):
            # Never write a NaN, infinite or non-positive LR: keep the last good one.
            return state, None
        state["scale"] = scale
        clamp = self._clamp_note(scale)
        if clamp:
            reasons.append(clamp)
        return state, Decision(
            scale=scale,
            lr=self.lr(state),
            step=_step_of(obs, state.get("last_step")),
            policy="+".join(changed) or "clamp",
            reason="; ".join(reasons) or "clamped",
            evidence=evidence,
        )

    def _clamp_note(self, scale: float) -> str:
        lr = self.base * scale
        if self.min_lr is not None and lr <= self.min_lr * (1 + REL_TOL):
            return f"clamped to min_lr {self.min_lr:g}"
        if self.max_lr is not None and lr >= self.max_lr * (1 - REL_TOL):
            return f"clamped to max_lr {self.max_lr:g}"
        return ""

    # ---- manual override ---------------------------------------------------------------
    def override(self, state: State, *, lr: float | None = None, scale: float | None = None) -> State:
        """Adopt a manual LR or scale: the LR is that value now and later policy decisions
        continue from it (a target beyond min_lr/max_lr at that bound). manual = target / Π
        factors, taken before the min_lr/max_lr clamp, so the clamp recomputed on the next
        row gives the target again; while the factors
        multiply to 0 (a cosine to ``eta_min=0``) manual = target, and the target holds until
        a policy gives a usable LR again.

        With ``base_lr`` an ``lr`` decides. Without one, ``scale`` decides (the current one
        when not given: ``autolr set --lr`` with no base LR known keeps the scale), and an
        ``lr`` teaches the chain the loop's base LR, lr / scale, so that later decisions
        publish absolute LRs continuing from the manual one."""
        if lr is None and scale is None:
            raise ValueError("give lr or scale")
        for v in (lr, scale):
            if v is not None and not _usable(v):
                raise ValueError(f"manual value must be finite and > 0, got {v!r}")
        if lr is not None and self.base_lr is not None:
            target = lr / self.base_lr
        elif scale is not None:
            target = scale
        else:  # an absolute LR and no base LR known: the scale stays, the base is learnt
            target = state["scale"]
        if not _usable(target):
            raise ValueError(f"manual value out of range: lr {lr!r} on base_lr {self.base_lr!r}")
        # a value beyond min_lr/max_lr counts at the bound: taken as is, its factor would keep
        # the clamped LR at the bound through later cuts (the LR then never moved). The scale
        # stays the value set, so the next row publishes the clamp.
        bounded = target
        if self.max_lr is not None:
            bounded = min(bounded, self.max_lr / self.base)
        if self.min_lr is not None:
            bounded = max(bounded, self.min_lr / self.base)
        state = dict(state)
        raw = self._raw(dict(state, manual=1.0))
        manual = bounded / raw if _usable(raw) else bounded
        state["manual"] = manual if _usable(manual) else bounded
        state["scale"] = target
        if lr is not None and self.base_lr is None:
            state["base"] = lr / target
        return state


#: Rows without a step or epoch after which a run's unit is "row" (see Chain.update).
UNIT_ROWS = 10


def _epochs_run(state: State, step: int | None, epoch: float) -> bool:
    """Whether the row shows that the run's epochs say where training is: a fractional epoch
    (Hugging Face's progress), or a second moment of the last row's epoch (Lightning writes the
    current epoch on every step row; its validation and epoch-end rows share one step)."""
    if math.isfinite(epoch) and not float(epoch).is_integer():
        return True
    return epoch == state.get("last_epoch") and (step is None or step != state.get("last_step"))


def _thin(changes: list[tuple[int, float]], start: float, limit: int) -> list[tuple[int, float]]:
    """At most ``limit`` of ``changes`` (``[(step, scale)]`` from scale ``start``): a change is kept
    when it moves the scale by at least x (relative) from the last one kept, with x the smallest
    of a geometric search that keeps ``limit`` or fewer; the last change is always kept. A
    StepLR's jump stays while a ramp's small steps are merged, and the LR in force is never
    more than about x from the exact one."""
    moves = sorted((abs(b - a) / a for a, b in zip([start] + [s for _, s in changes], [s for _, s in changes])),
                   reverse=True)
    x = moves[limit - 1] if limit >= 1 else math.inf
    while True:
        kept, last = [], start
        for step, scale in changes:
            if abs(scale - last) >= x * last:
                kept.append((step, scale))
                last = scale
        if len(kept) <= limit:
            break
        x *= 1.25
    if not kept or kept[-1] != changes[-1]:
        kept = (kept if len(kept) < limit else kept[:-1]) + [changes[-1]]
    return kept


def _usable(x: float) -> bool:
    return math.isfinite(x) and x > 0


def _changed(old: float, new: float) -> bool:
    if old == new:
        return False
    if not (math.isfinite(old) and math.isfinite(new)):
        return True
    return abs(new - old) > REL_TOL * max(abs(old), abs(new))


def _step_of(obs: Observation, last_step: int | None) -> int | None:
    """A decision's ``step``: the row's step, else the last step before it, else a whole epoch
    index, else the row index (progress epochs are not steps: 0.5 is no step after 1)."""
    if obs.step is not None:
        return obs.step
    if last_step is not None:
        return last_step
    if obs.epoch is not None and not obs.progress and float(obs.epoch).is_integer():
        return int(obs.epoch)
    return obs.row


def build_chain(
    specs: Sequence[tuple[str, dict[str, Any]]],
    registry: dict[str, type],
    *,
    base_lr: float | None = None,
    min_lr: float | None = None,
    max_lr: float | None = None,
    metric: str | None = None,
    mode: str | None = None,
    unit: str | None = None,
    min_change: float = 0.0,
) -> Chain:
    """Instantiate ``(name, params)`` specs; run-level metric/mode/unit fill unset parameters."""
    policies = []
    for name, params in specs:
        if name not in registry:
            raise PolicyError(f"unknown policy {name!r}; installed: {', '.join(registry)}")
        cls = registry[name]
        params = dict(params)
        fields = {f.name for f in cls.parameters()}
        hints = None
        for key, value in (("metric", metric), ("mode", mode), ("unit", unit)):
            if value is not None and key in fields and key not in params:
                hints = hints or typing.get_type_hints(cls)
                try:  # a parameter of that name but another meaning (CyclicLR's mode) keeps its own
                    coerce(value, hints[key], f"{name}:{key}")
                except PolicyError:
                    continue
                params[key] = value
        policies.append(cls.from_params(params))
    return Chain(tuple(policies), base_lr=base_lr, min_lr=min_lr, max_lr=max_lr, metric=metric, unit=unit,
                 min_change=min_change)
