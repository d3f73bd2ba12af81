"""Run settings: the policy chain and run-level options, from ``autolr.toml`` and CLI flags.

``autolr.toml``::

    base_lr = 0.1              # optional; without it the control file carries only a scale
    metric = "val_loss"        # optional; default a validation loss (val_loss, eval_loss, ...), else a training loss
    mode = "min"               # optional; default min unless the metric name contains "acc"
    unit = "step"              # optional; default step, else epoch, else row
    min_lr = 1e-6              # optional clamp
    max_lr = 1.0               # optional clamp
    apply_margin = 20          # optional: changes apply 20 steps after the last logged step
    min_change = 0.001         # optional: a schedule's change is published once it moves the LR 0.1 %
    policy = ["warmup:steps=200", "plateau:method=threshold,patience=20"]

    [[policies]]               # the same chain as tables, if preferred
    name = "warmup"
    steps = 200

    [runs."sweep-*/lr-0.1"]     # per-run overrides, matched by glob on the run's path
    base_lr = 0.1
"""
from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .chain import Chain, build_chain
from .policy import PolicyError
from .spec import parse_spec

DEFAULT_POLICIES: tuple[str, ...] = ("auto",)
RUN_KEYS = ("base_lr", "min_lr", "max_lr", "metric", "mode", "unit", "history", "apply_margin", "min_change")


class ConfigError(ValueError):
    """An invalid config file or option; the message names the file and key."""


@dataclass(frozen=True)
class Settings:
    """Everything needed to build a run's chain."""

    policies: tuple[tuple[str, dict[str, Any]], ...] = ()
    base_lr: float | None = None
    min_lr: float | None = None
    max_lr: float | None = None
    metric: str | None = None
    mode: str | None = None
    unit: str | None = None
    history: int = 1024
    #: Publish changes to apply this many steps after the last logged step (multi-rank).
    apply_margin: int | None = None
    #: A change without a policy's reason (a schedule's step) is published once it moves the
    #: LR by this fraction since the last publish (0: every change).
    min_change: float = 0.0

    def chain(self, registry: dict[str, type]) -> Chain:
        specs = self.policies or tuple(parse_spec(s) for s in DEFAULT_POLICIES)
        return build_chain(
            specs, registry, base_lr=self.base_lr, min_lr=self.min_lr, max_lr=self.max_lr,
            metric=self.metric, mode=self.mode, unit=self.unit, min_change=self.min_change,
        )

    def merged(self, overrides: Mapping[str, Any]) -> "Settings":
        """These settings with the non-None values of ``overrides`` on top."""
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in overrides.items() if k in known and v is not None})


@dataclass(frozen=True)
class Config:
    """A loaded ``autolr.toml``: defaults plus per-run sections matched by glob."""

    defaults: Settings = field(default_factory=Settings)
    runs: tuple[tuple[str, Mapping[str, Any]], ...] = ()

    def check(self, registry: dict[str, type], overrides: Mapping[str, Any] | None = None) -> None:
        """Build the chain of the defaults and of every ``[runs."glob"]`` section on top of
        them, ``overrides`` (the CLI flags) last: a bad spec or parameter fails at start with
        the section named, not when a matching run appears."""
        overrides = overrides or {}
        self.defaults.merged(overrides).chain(registry)
        for pattern, section in self.runs:
            try:
                self.defaults.merged(section).merged(overrides).chain(registry)
            except PolicyError as exc:
                raise PolicyError(f'[runs."{pattern}"]: {exc}') from exc

    def for_run(self, run: str) -> Settings:
        """Settings for a run path (relative to the watched root); later globs win."""
        settings = self.defaults
        for pattern, section in self.runs:
            if fnmatch.fnmatch(run, pattern) or fnmatch.fnmatch(Path(run).name, pattern):
                settings = settings.merged(section)
        return settings


def load_config(path: str | Path | None) -> Config:
    """Load ``autolr.toml``; None gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    runs = data.pop("runs", {})
    if not isinstance(runs, dict):
        raise ConfigError(f"{path}: [runs] must be a table of glob = {{...}} sections")
    defaults = Settings().merged(_section(data, path, "top level"))
    sections = tuple((glob, _section(dict(sec), path, f"runs.{glob!r}")) for glob, sec in runs.items()
                     if _is_table(sec, path, glob))
    return Config(defaults, sections)


def _is_table(section: Any, path: Path, glob: str) -> bool:
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: runs.{glob!r} must be a table")
    return True


def _section(data: dict[str, Any], path: Path, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    specs: list[tuple[str, dict[str, Any]]] = []
    for key, value in data.items():
        if key == "policy":
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in items):
                raise ConfigError(f"{path} ({where}): policy must be a spec string or a list of them")
            try:
                specs += [parse_spec(v) for v in items]
            except PolicyError as exc:
                raise ConfigError(f"{path} ({where}): {exc}") from exc
        elif key == "policies":
            if not isinstance(value, list) or not all(isinstance(v, dict) and "name" in v for v in value):
                raise ConfigError(f"{path} ({where}): [[policies]] tables each need a name")
            specs += [(v["name"], {k: x for k, x in v.items() if k != "name"}) for v in value]
        elif key in RUN_KEYS:
            out[key] = _check_value(key, value, path, where)
        else:
            raise ConfigError(
                f"{path} ({where}): unknown key {key!r}; valid: policy, policies, runs, {', '.join(RUN_KEYS)}"
            )
    if specs:
        out["policies"] = tuple(specs)
    return out


def _check_value(key: str, value: Any, path: Path, where: str) -> Any:
    if key in ("base_lr", "min_lr", "max_lr"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{path} ({where}): {key} must be a number > 0, got {value!r}")
        return float(value)
    if key == "min_change":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"{path} ({where}): min_change must be a number in [0, 1), got {value!r}")
        return float(value)
    if key in ("history", "apply_margin"):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "history" else 0):
            raise ConfigError(f"{path} ({where}): {key} must be an integer >= {1 if key == 'history' else 0}")
        return value
    if key == "mode" and value not in ("min", "max"):
        raise ConfigError(f"{path} ({where}): mode must be 'min' or 'max', got {value!r}")
    if key == "unit" and value not in ("step", "epoch", "row"):
        raise ConfigError(f"{path} ({where}): unit must be step, epoch or row, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{path} ({where}): {key} must be a string")
    return value


def parse_policy_options(specs: Sequence[str]) -> tuple[tuple[str, dict[str, Any]], ...]:
    """``--policy`` values to ``(name, params)`` pairs."""
    return tuple(parse_spec(s) for s in specs)
