"""The ``autolr`` command line."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .config import ConfigError, load_config, parse_policy_options
from .control import ControlError
from .plugins import PluginError, get_plugin_manager, policy_classes, reader_classes
from .policy import PolicyError


class Registry:
    """The plugin manager and what it registered, built once per command."""

    def __init__(self, plugins_dir: str | None):
        self.pm = get_plugin_manager(plugins_dir)
        self.policies = policy_classes(self.pm)
        self.readers = reader_classes(self.pm)


def settings_options(func):
    """The options every command that builds a chain shares."""
    options = [
        click.option("--policy", "policies", multiple=True, metavar="SPEC",
                     help="NAME or NAME:KEY=VALUE,... ; repeat to chain (factors multiply)."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False), help="autolr.toml with the chain and options."),
        click.option("--base-lr", type=float, help="The loop's base LR; without it only a scale is written."),
        click.option("--metric", help="Monitored metric (default: a validation loss such as val_loss or eval_loss, else a training loss, else a *loss* column)."),
        click.option("--mode", type=click.Choice(["min", "max"]), help="Default: min unless the metric name contains 'acc'."),
        click.option("--unit", type=click.Choice(["step", "epoch", "row"]), help="Time unit (default: step, else epoch, else row)."),
        click.option("--min-lr", type=float, help="Clamp the chain's LR from below (an LR: needs --base-lr)."),
        click.option("--max-lr", type=float, help="Clamp the chain's LR from above (an LR: needs --base-lr)."),
        click.option("--apply-margin", type=click.IntRange(min=0), metavar="STEPS",
                     help="Changes apply STEPS after the last logged step (apply_at_step; multi-rank)."),
        click.option("--min-change", type=click.FloatRange(0, 1, max_open=True), metavar="FRACTION",
                     help="Publish a schedule's per-step change only once the LR has moved by FRACTION "
                          "(e.g. 0.001) since the last publish: far fewer writes for cosine, exponential, "
                          "warmup on every row. Default 0: every change."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def cli_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    out = {k: kw.pop(k) for k in ("base_lr", "metric", "mode", "unit", "min_lr", "max_lr", "apply_margin",
                                  "min_change")}
    specs = kw.pop("policies")
    if specs:
        out["policies"] = parse_policy_options(specs)
    return out


def fail(message: str) -> None:
    raise click.ClickException(message)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="autolr")
@click.option("--plugins-dir", type=click.Path(file_okay=False), help="Load plugin *.py files from this folder.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def main(ctx: click.Context, plugins_dir: str | None, verbose: int) -> None:
    """autolr: tune a running job's learning rate from the logs it already writes.

    A policy chain reads the training log, decides learning-rate changes and writes them
    atomically to autolr.json in the run folder; the training loop polls that file.
    """
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="autolr: %(message)s",
    )
    try:
        ctx.obj = Registry(plugins_dir)
    except (PluginError, PolicyError) as exc:
        fail(str(exc))


@main.command()
@click.argument("logs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@settings_options
@click.option("--every-row", is_flag=True, help="One line per observed row, not only per change.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw metric, fitted trend and LR to this PNG (needs matplotlib; one log).")
@click.pass_obj
def replay(reg: Registry, logs: tuple[str, ...], config_path: str | None, every_row: bool,
           plot_path: str | None, **kw) -> None:
    """Run a policy chain over finished logs, exactly as the daemon would live.

    Prints one JSON object per line: {"log", "step", "lr", "scale", "policy", "reason"}; the
    first line of each log is the initial value (step null).
    """
    from .replay import ReplayError, replay_log

    try:
        config, overrides = load_config(config_path), cli_overrides(kw)
        config.check(reg.policies, overrides)  # fail on bad specs before any output
        if plot_path and len(logs) != 1:
            fail("--plot draws one log; give exactly one")
        for log in logs:
            # the log's run as the daemon would see it, with the config's folder as the root
            settings = config.for_run(_run_key(Path(log), config_path, reg.readers)).merged(overrides)
            for line in replay_log(log, settings, reg.policies, reg.readers, every_row=every_row,
                                   on_warning=lambda message: click.echo(f"warning: {message}", err=True)):
                click.echo(json.dumps(line))
        if plot_path:
            from .plot import PlotError, plot_replay

            try:
                click.echo(f"plot written to {plot_replay(logs[0], plot_path, settings, reg.policies, reg.readers)}", err=True)
            except PlotError as exc:
                fail(str(exc))
    except (ConfigError, PolicyError, ReplayError) as exc:
        fail(str(exc))


def _run_key(log: Path, config_path: str | None, readers: dict[str, type]) -> str:
    """The run folder of ``log`` relative to the config file's folder (the daemon matches a
    ``[runs."glob"]`` section against the run's path under its root, or its name)."""
    from .readers import reader_for

    cls = reader_for(log, readers)
    folder = Path(cls.run_dir(log) if cls is not None else log.parent).resolve()
    root = Path(config_path).resolve().parent if config_path else Path.cwd().resolve()
    try:
        return str(folder.relative_to(root))
    except ValueError:
        return str(folder)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def policies(reg: Registry, as_json: bool) -> None:
    """List every installed policy with its parameters, defaults and description."""
    rows = []
    for name, cls in reg.policies.items():
        params = []
        own = [f for f in cls.parameters() if f.name != "unit"]
        unit = [f for f in cls.parameters() if f.name == "unit"]
        for f in own + unit:
            default = None if f.default is dataclasses.MISSING else f.default
            params.append({"name": f.name, "default": default, "required": f.default is dataclasses.MISSING})
        rows.append({"name": name, "doc": cls.doc(), "module": cls.__module__, "parameters": params})
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=list))
        return
    for row in rows:
        click.echo(f"{row['name']:<14} {row['doc']}")
        rendered = [p["name"] + ("=<required>" if p["required"] else f"={_show(p['default'])}") for p in row["parameters"]]
        click.echo(f"{'':<14}   {', '.join(rendered) or '(no parameters)'}")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


@main.command()
@click.pass_obj
def readers(reg: Registry) -> None:
    """List every installed log reader."""
    modules = [cls.__module__ for cls in reg.readers.values()]
    for name, cls in reg.readers.items():
        # the module's summary; the class's own when the module holds several readers
        source = cls if modules.count(cls.__module__) > 1 and cls.__doc__ else sys.modules[cls.__module__]
        doc = (source.__doc__ or "").strip().splitlines()
        click.echo(f"{name:<14} {doc[0] if doc else ''}")


@main.command(name="set")
@click.argument("run", type=click.Path())
@click.option("--lr", type=float, help="Set this absolute learning rate.")
@click.option("--scale", type=float, help="Set this multiplier on the loop's base LR.")
@click.option("--reason", default="manual override", show_default=True)
@click.pass_obj
def set_lr(reg: Registry, run: str, lr: float | None, scale: float | None, reason: str) -> None:
    """Change the LR of a live job now, through its control file.

    RUN is the run folder (or its autolr.json). The change is recorded in the journal, and
    the daemon's later decisions continue from it. With no base LR known (the daemon runs
    without --base-lr), --lr is written as an absolute LR with the scale unchanged: loops that
    read the scale (the torch, Lightning, Hugging Face and optax integrations) keep their LR;
    use --scale for them.
    """
    from .control import ControlWriter, control_path
    from .manual import ManualError, known_base, set_manual

    folder = control_path(run).parent
    before = ControlWriter(folder).current() if folder.is_dir() else None
    try:
        record = set_manual(run, lr=lr, scale=scale, reason=reason)
    except (ManualError, ControlError) as exc:
        fail(str(exc))
    click.echo(json.dumps(record))
    if before is None:
        click.echo(f"note: no daemon has published for {folder} yet: the job must read this folder's "
                   f"autolr.json (its run folder), and a daemon started later takes this value over", err=True)
    wanted = lr  # the LR asked for, to say when the daemon's bounds held it
    if lr is None and record["lr"] is not None:
        wanted = scale * record["lr"] / record["scale"]
    if wanted is not None and not math.isclose(record["lr"], wanted, rel_tol=1e-12):
        bound = "max_lr" if record["lr"] < wanted else "min_lr"
        click.echo(f"warning: lr {wanted:g} is beyond the daemon's {bound} {record[bound]:g} for this run: "
                   f"set to {record['lr']:g}", err=True)
    if lr is not None and known_base(before) is None:
        click.echo(f"warning: no base LR is known for this run, so lr {lr:g} went out with the scale "
                   f"unchanged ({record['scale']:g}): loops that read the scale (autolr's torch, "
                   f"Lightning, Hugging Face and optax integrations) keep their LR. Use --scale for "
                   f"them, or give the daemon --base-lr.", err=True)


class _Seconds(click.ParamType):
    """A positive number of seconds; ``--poll``'s value is optional, so a folder after it is
    taken for its value: say so, instead of "'runs' is not a valid float"."""

    name = "seconds"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            seconds = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number of seconds (--poll takes an optional SECONDS: "
                      f"write ROOT before --poll, or --poll 1 ROOT)", param, ctx)
        if not (math.isfinite(seconds) and seconds > 0):
            self.fail(f"{value!r}: the seconds must be a finite number > 0", param, ctx)
        return seconds


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@settings_options
@click.option("--poll", type=_Seconds(), is_flag=False, flag_value=1.0, default=None, metavar="[SECONDS]",
              help="Poll instead of inotify (NFS/SMB/Lustre); every SECONDS, default 1.")
@click.option("--once", is_flag=True, help="Process everything present, then exit (cron, tests).")
@click.option("--follow-symlinks", is_flag=True, help="Follow symlinks that lead outside ROOT.")
@click.option("--rescan", type=click.FloatRange(min=1.0), default=30.0, show_default=True,
              help="Seconds between safety-net rescans (at least 1).")
@click.option("--no-fsync", is_flag=True, help="Skip fsync on writes (faster; less durable on power loss).")
@click.pass_obj
def watch(reg: Registry, root: str, config_path: str | None, poll: float | None, once: bool,
          follow_symlinks: bool, rescan: float, no_fsync: bool, **kw) -> None:
    """Watch ROOT's runs, tune their learning rates live (the main job).

    A run is a folder holding a recognised log. Settings come from ROOT/autolr.toml (or
    --config), per-run [runs."glob"] sections, then these flags. Each run gets autolr.json
    (control file), autolr.decisions.jsonl (journal) and autolr.state.json (resume state).
    """
    from .daemon import Daemon, DaemonLocked, Options
    from .view import View

    root_path = Path(root)
    try:
        default_cfg = root_path / "autolr.toml"
        config = load_config(config_path or (default_cfg if default_cfg.is_file() else None))
        overrides = cli_overrides(kw)
        config.check(reg.policies, overrides)
    except (ConfigError, PolicyError) as exc:
        fail(str(exc))
    options = Options(poll=poll, once=once, follow_symlinks=follow_symlinks, rescan=rescan, fsync=not no_fsync)
    view = View()
    daemon = Daemon(root_path, config, overrides, reg.policies, reg.readers, options, on_event=view)
    view.summaries = lambda: [r.summary() for r in daemon.runs.values()]
    daemon.install_signal_handlers()
    try:
        daemon.run()
    except DaemonLocked as exc:
        fail(str(exc))


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="A JSON array, one object per run.")
def status(root: str, as_json: bool) -> None:
    """Show every run under ROOT from its files (no daemon needed)."""
    from .status import collect_status
    from .view import run_line

    rows = collect_status(Path(root))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no autolr runs under {root} (a run is a folder where `autolr watch` has written autolr.json)")
    for row in rows:
        click.echo(run_line(row))


@main.command()
@click.option("--dir", "folder", default="autolr-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo run folder is left.")
@click.option("--steps", default=1500, show_default=True, help="Simulated optimizer steps.")
@click.option("--seed", default=0, show_default=True)
def demo(folder: str, steps: int, seed: int) -> None:
    """Simulate a training run and let autolr tune it live.

    A noisy SGD loop writes metrics.jsonl; the default policy, auto (a warmup, then a cut
    each time the training loss stops improving significantly, and a divergence guard), reacts
    to it; the loop applies the new rates from autolr.json. Each decision prints as it happens
    with the validation loss, and the end compares the final validation loss with constant
    learning rates on the same data.
    """
    from .demo import run_demo

    run_demo(Path(folder), steps=steps, seed=seed, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
