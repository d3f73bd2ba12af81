"""The hooks an autolr plugin can implement.

A plugin is a module or object with functions decorated by ``autolr.hookimpl`` and named
like the specs below. Built-in policies and readers are plugins of exactly this kind.
"""
from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("autolr")
hookimpl = pluggy.HookimplMarker("autolr")


@hookspec
def register_policies(register: Callable[[type], None]) -> None:
    """Register learning-rate policies.

    Call ``register(PolicyClass)`` once for each policy the plugin provides. A policy class
    subclasses :class:`autolr.policy.Policy` (a frozen dataclass whose fields are its
    parameters) and sets a unique ``name``, the word users type in ``--policy NAME:...``.
    """


@hookspec
def register_readers(register: Callable[[type], None]) -> None:
    """Register log readers.

    Call ``register(ReaderClass)`` once for each reader the plugin provides. A reader class
    subclasses :class:`autolr.readers.base.Reader`, sets a unique ``name`` and implements
    ``matches(path)`` (does this reader own that file?) and ``read()`` (the new records since
    the last call, resuming from a stored offset).
    """
