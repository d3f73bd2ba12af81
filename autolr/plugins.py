"""Plugin manager: built-ins, installed entry points (group ``autolr``) and ``--plugins-dir`` files."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Iterable

import pluggy

from . import hookspecs

BUILTIN_PLUGINS = (
    "autolr.policies.schedules",
    "autolr.policies.plateau",
    "autolr.policies.auto",
    "autolr.readers.csv",
    "autolr.readers.jsonl",
    "autolr.readers.tensorboard",
    "autolr.readers.mlflow",
    "autolr.readers.hf",
    "autolr.readers.wandb",
    "autolr.readers.text",
)


class PluginError(Exception):
    """A plugin could not be loaded or registered something invalid."""


def get_plugin_manager(
    plugins_dir: str | Path | None = None, *, entry_points: bool = True
) -> pluggy.PluginManager:
    """A fresh manager with the built-ins, then entry points, then the files in ``plugins_dir``.

    ``check_pending()`` runs last, so a misspelt hook name in any plugin fails loudly.
    """
    pm = pluggy.PluginManager("autolr")
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    try:
        if entry_points:
            pm.load_setuptools_entrypoints("autolr")
        if plugins_dir is not None:
            for module in load_plugin_files(plugins_dir):
                pm.register(module, name=f"plugins-dir:{module.__name__}")
        pm.check_pending()
    except pluggy.PluginValidationError as exc:  # a misspelt hook or argument name
        hooks = ", ".join(sorted(n for n, f in vars(hookspecs).items() if hasattr(f, "autolr_spec")))
        raise PluginError(f"plugin {getattr(exc.plugin, '__file__', None) or exc.plugin}: {exc} "
                          f"(autolr's hooks: {hooks})") from exc
    return pm


def load_plugin_files(plugins_dir: str | Path) -> Iterable[object]:
    """Import every ``*.py`` file (not starting with ``_``) in ``plugins_dir``, sorted by name."""
    folder = Path(plugins_dir)
    if not folder.is_dir():
        raise PluginError(f"--plugins-dir {folder}: not a directory")
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module_name = f"autolr_local_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"cannot import plugin file {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # a broken plugin file is the user's to fix: say which one
            del sys.modules[module_name]
            raise PluginError(f"plugin file {path} failed to import: {exc}") from exc
        yield module


def _collect(pm: pluggy.PluginManager, hook_name: str, kind: str) -> dict[str, type]:
    found: dict[str, type] = {}
    owners: dict[str, str] = {}

    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        owner = pm.get_name(impl.plugin) or repr(impl.plugin)

        def register(cls: type, _owner: str = owner) -> None:
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"{_owner} registered a {kind} without a name: {cls!r}")
            if name in found and found[name] is not cls:
                raise PluginError(
                    f"{kind} {name!r} is registered twice: by {owners[name]} and by {_owner}"
                )
            found[name] = cls
            owners[name] = _owner

        impl.function(register=register)
    return dict(sorted(found.items()))


def policy_classes(pm: pluggy.PluginManager | None = None) -> dict[str, type]:
    """Every registered policy class, by name."""
    return _collect(pm or get_plugin_manager(), "register_policies", "policy")


def reader_classes(pm: pluggy.PluginManager | None = None) -> dict[str, type]:
    """Every registered reader class, by name."""
    return _collect(pm or get_plugin_manager(), "register_readers", "reader")
