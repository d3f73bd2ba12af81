"""Policy specs: ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` with bracketed lists.

>>> parse_spec("multistep:milestones=[30,60,90],gamma=0.1")
('multistep', {'milestones': [30, 60, 90], 'gamma': 0.1})
"""
from __future__ import annotations

import re
from typing import Any

from .policy import PolicyError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a spec into its policy name and parameter values (int, float, bool, str or list)."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise PolicyError(f"bad policy spec {spec!r}: expected NAME or NAME:KEY=VALUE,...")
    params: dict[str, Any] = {}
    for item in _split_top_level(rest, spec):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not _NAME.match(key):
            raise PolicyError(f"bad parameter {item!r} in policy spec {spec!r}: expected KEY=VALUE")
        if key in params:
            raise PolicyError(f"parameter {key!r} given twice in policy spec {spec!r}")
        params[key] = parse_value(raw.strip(), spec)
    return name, params


def parse_value(raw: str, spec: str = "") -> Any:
    """``[a,b]`` → list; ``true``/``false`` → bool; ``none`` → None; int; float; else the string."""
    if raw.startswith("["):
        if not raw.endswith("]"):
            raise PolicyError(f"unclosed list {raw!r} in policy spec {spec!r}")
        inner = raw[1:-1].strip()
        return [parse_value(v.strip(), spec) for v in _split_top_level(inner, spec)] if inner else []
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return raw


def _split_top_level(text: str, spec: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise PolicyError(f"unbalanced ']' in policy spec {spec!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise PolicyError(f"unbalanced '[' in policy spec {spec!r}")
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]
