"""The plugin system: hooks, built-ins registered like plugins, --plugins-dir, entry points."""
from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from autolr import hookspecs
from autolr.plugins import PluginError, get_plugin_manager, policy_classes, reader_classes

from .conftest import ROOT, run_cli

HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
         if hasattr(fn, "autolr_spec")]


def test_hooks_are_discovered():
    assert set(HOOKS) >= {"register_policies", "register_readers"}


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_docstring(hook):
    doc = getattr(hookspecs, hook).__doc__
    assert doc and len(doc.strip()) > 40, f"hook {hook} needs a docstring"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_exercised_by_a_test(hook):
    """Meta-test: a plugin file in some test implements each hook."""
    sources = [p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_plugins.py"]
    sources.append(PLUGIN_FILE)
    assert any(f"def {hook}(" in s for s in sources), f"no test implements hook {hook}"


def test_builtins_are_registered_as_plugins():
    pm = get_plugin_manager(entry_points=False)
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert "autolr.policies.schedules" in names and "autolr.readers.csv" in names
    policies = policy_classes(pm)
    for expected in ("constant", "step", "multistep", "exponential", "inverse_time", "cosine",
                     "linear", "polynomial", "warmup", "plateau"):
        assert expected in policies
    assert {"csv", "jsonl"} <= set(reader_classes(pm))


def test_each_call_gets_a_fresh_manager():
    assert get_plugin_manager() is not get_plugin_manager()


PLUGIN_FILE = textwrap.dedent('''
    from dataclasses import dataclass
    from autolr import hookimpl
    from autolr.policies.schedules import Schedule
    from autolr.readers.jsonl import JsonlReader

    @dataclass(frozen=True, kw_only=True)
    class Halve(Schedule):
        """Halve the LR once, after `at`."""
        name = "halve"
        at: int = 2
        def factor_at(self, t, base_lr):
            return 0.5 if t >= self.at else 1.0

    class LogLinesReader(JsonlReader):
        name = "loglines"
        @classmethod
        def matches(cls, path):
            return path.suffix == ".loglines"

    @hookimpl
    def register_policies(register):
        register(Halve)

    @hookimpl
    def register_readers(register):
        register(LogLinesReader)
''')


@pytest.fixture
def plugin_dir(tmp_path):
    folder = tmp_path / "myplugins"
    folder.mkdir()
    (folder / "halve.py").write_text(PLUGIN_FILE)
    return folder


def test_plugins_dir_policy_and_reader_through_cli(plugin_dir, tmp_path):
    log = tmp_path / "run.loglines"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(5)))
    out = run_cli("--plugins-dir", str(plugin_dir), "replay", str(log), "--policy", "halve:at=3",
                  "--base-lr", "0.2").stdout.splitlines()
    lines = [json.loads(x) for x in out]
    assert lines[0]["lr"] == 0.2 and lines[0]["step"] is None
    assert [(x["step"], x["lr"], x["policy"]) for x in lines[1:]] == [(2, 0.1, "halve")]
    listing = run_cli("--plugins-dir", str(plugin_dir), "policies").stdout
    assert "halve" in listing and "Halve the LR once" in listing


def test_misspelt_hook_fails_loudly(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "typo.py").write_text(
        "from autolr import hookimpl\n@hookimpl\ndef register_policy(register):\n    pass\n")
    with pytest.raises(PluginError, match="typo.py.*register_policy.*hooks: register_policies, register_readers"):
        get_plugin_manager(folder)
    proc = run_cli("--plugins-dir", str(folder), "policies", check=False)
    # a clear one-line error naming the valid hooks, not a traceback (a helper's audit)
    assert proc.returncode != 0 and "register_policy" in proc.stderr and "register_policies" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_broken_plugin_file_names_the_file(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "oops.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(PluginError, match="oops.py"):
        get_plugin_manager(folder)


def test_duplicate_policy_name_is_an_error(tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    (folder / "dup.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from autolr import hookimpl
        from autolr.policies.schedules import Schedule
        @dataclass(frozen=True, kw_only=True)
        class Step(Schedule):
            """Another step."""
            name = "step"
            def factor_at(self, t, base_lr):
                return 1.0
        @hookimpl
        def register_policies(register):
            register(Step)
    '''))
    with pytest.raises(PluginError, match="registered twice"):
        policy_classes(get_plugin_manager(folder))


def test_missing_plugins_dir_is_a_clear_error(tmp_path):
    proc = run_cli("--plugins-dir", str(tmp_path / "nope"), "policies", check=False)
    assert proc.returncode != 0 and "not a directory" in proc.stderr


@pytest.fixture(scope="module")
def installed_cyclic(tmp_path_factory):
    """Really install the example plugin package (into a target folder) with pip."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "autolr-cyclic"
    shutil.copytree(ROOT / "plugins" / "autolr-cyclic", source)  # keep build files out of the repo
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return target


def test_installed_example_plugin_is_used_through_entry_point(installed_cyclic, tmp_path):
    env = {"PYTHONPATH": str(installed_cyclic)}
    assert "cyclic" in run_cli("policies", env=env).stdout
    assert "cyclic" not in run_cli("policies").stdout  # only through the install
    log = tmp_path / "m.csv"
    log.write_text("step,loss\n" + "".join(f"{s},1.0\n" for s in range(12)))
    out = run_cli("replay", str(log), "--policy", "cyclic:max_factor=3,step_size_up=4",
                  "--base-lr", "0.1", "--every-row", env=env).stdout.splitlines()
    lrs = [json.loads(x)["lr"] for x in out]
    # after row t the factor is f(t+1): up over 4 steps to 3x, down over 4, repeat.
    expected = [0.1 * (1 + 2 * min(k % 8, 8 - k % 8) / 4) for k in range(13)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_example_plugin_matches_torch_cycliclr(tmp_path):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "plugins" / "autolr-cyclic"))
    try:
        import autolr_cyclic
    finally:
        sys.path.pop(0)
    for mode, gamma in (("triangular", 1.0), ("triangular2", 1.0), ("exp_range", 0.997)):
        policy = autolr_cyclic.Cyclic(max_factor=5.0, step_size_up=7, step_size_down=11, mode=mode, gamma=gamma)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.02, max_lr=0.1, step_size_up=7,
                                                  step_size_down=11, mode=mode, gamma=gamma,
                                                  cycle_momentum=False)
        for t in range(120):
            assert 0.02 * policy.factor_at(t, 0.02) == pytest.approx(sched.get_last_lr()[0], rel=1e-9)
            opt.step()
            sched.step()


def test_readers_lists_each_reader_with_its_own_summary():
    """Regression (a helper's audit): ``autolr readers`` gave mlflow and mlflow-file the same
    line (their module's summary)."""
    from click.testing import CliRunner

    from autolr.cli import main

    lines = dict(line.split(None, 1) for line in CliRunner().invoke(main, ["readers"]).stdout.splitlines())
    assert {"csv", "jsonl", "mlflow", "mlflow-file", "tensorboard"} <= set(lines)
    assert lines["mlflow"] != lines["mlflow-file"] and "file store" in lines["mlflow-file"]
