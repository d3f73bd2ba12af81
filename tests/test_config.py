"""autolr.toml: chain, run-level options, per-run glob sections; clear errors."""
from __future__ import annotations

import pytest

from autolr.config import ConfigError, Settings, load_config
from autolr.plugins import policy_classes

from .conftest import run_cli


def write(tmp_path, text):
    path = tmp_path / "autolr.toml"
    path.write_text(text)
    return path


def test_specs_and_tables_build_the_same_chain(tmp_path):
    a = load_config(write(tmp_path, 'policy = ["warmup:steps=10", "plateau:method=threshold,patience=3"]\n')).defaults
    b = load_config(write(tmp_path, '[[policies]]\nname = "warmup"\nsteps = 10\n[[policies]]\nname = "plateau"\nmethod = "threshold"\npatience = 3\n')).defaults
    assert a.policies == b.policies
    registry = policy_classes()
    assert a.chain(registry) == b.chain(registry)


def test_run_sections_by_glob_later_wins(tmp_path):
    cfg = load_config(write(tmp_path, 'base_lr = 1.0\nmetric = "loss"\n[runs."sweep/*"]\nbase_lr = 0.5\n'
                                      '[runs."sweep/lr-*"]\nbase_lr = 0.25\n[runs."*-big"]\nbase_lr = 2.0\n'))
    assert cfg.for_run("other").base_lr == 1.0
    assert cfg.for_run("sweep/a").base_lr == 0.5
    assert cfg.for_run("sweep/lr-3").base_lr == 0.25
    assert cfg.for_run("sweep/lr-3").metric == "loss"
    assert cfg.for_run("deep/path/model-big").base_lr == 2.0  # matched on the folder name too


def test_cli_values_override_the_file(tmp_path):
    cfg = load_config(write(tmp_path, 'base_lr = 1.0\nmode = "max"\n'))
    merged = cfg.defaults.merged({"base_lr": 0.1, "mode": None})
    assert merged.base_lr == 0.1 and merged.mode == "max"


@pytest.mark.parametrize("text, message", [
    ("base_lr = -1\n", "base_lr must be a number > 0"),
    ("bse_lr = 1\n", "unknown key 'bse_lr'"),
    ("mode = 'up'\n", "mode must be"),
    ("policy = [1]\n", "spec string"),
    ("policy = ['step:step_size=[1']\n", "unbalanced"),
    ("[[policies]]\nsteps = 1\n", "need a name"),
    ("runs = 3\n", "table"),
    ("base_lr = \n", "invalid TOML"),
    ("unit = 'hour'\n", "unit must be"),
    ("min_change = 1.5\n", "min_change must be a number in"),
    ("min_change = -0.1\n", "min_change must be a number in"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_min_change_reaches_the_chain(tmp_path):
    cfg = load_config(write(tmp_path, 'min_change = 0.001\n[runs."quiet"]\nmin_change = 0\n'))
    registry = policy_classes()
    assert cfg.for_run("a").chain(registry).min_change == 0.001
    assert cfg.for_run("quiet").chain(registry).min_change == 0.0
    assert Settings().chain(registry).min_change == 0.0  # every change, by default


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_replay_uses_the_config_file(tmp_path):
    log = tmp_path / "m.csv"
    log.write_text("step,loss\n" + "".join(f"{s},1\n" for s in range(6)))
    cfg = write(tmp_path, 'base_lr = 2.0\npolicy = ["step:step_size=3,gamma=0.5"]\n')
    out = run_cli("replay", str(log), "--config", str(cfg)).stdout.splitlines()
    assert len(out) == 3 and '"lr": 1.0' in out[1] and '"step": 2' in out[1]
    bad = run_cli("replay", str(log), "--config", str(write(tmp_path, "oops = 1\n")), check=False)
    assert bad.returncode != 0 and "unknown key 'oops'" in bad.stderr


def test_default_chain_is_used_without_policies():
    assert Settings().chain(policy_classes()).names == "auto"


def test_a_bad_policy_in_a_run_section_fails_at_start_with_the_section_named(tmp_path):
    """Regression: only the defaults were checked; a run present at start died with a
    traceback, one appearing later was never tuned (an error in the daemon's log)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    (tmp_path / "autolr.toml").write_text('policy = ["constant"]\n[runs."x*"]\npolicy = ["nosuch"]\n')
    res = run_cli("watch", str(tmp_path), "--once", check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert '[runs."x*"]' in res.stderr and "nosuch" in res.stderr, res.stderr
    (tmp_path / "autolr.toml").write_text('[runs."run"]\npolicy = ["plateau:patience=5"]\n')  # trend has no patience
    res = run_cli("watch", str(tmp_path), "--once", check=False)
    assert res.returncode != 0 and '[runs."run"]' in res.stderr and "patience" in res.stderr, res.stderr
    assert not (tmp_path / "run" / "autolr.json").exists()


def _toml_blocks(text: str) -> list[str]:
    import re

    return re.findall(r"```toml\n(.*?)```", text, re.S)


def test_the_documented_config_examples_load_and_build(tmp_path):
    """The README's autolr.toml and this module's docstring example (the README's had a
    parameter its policy's default method refuses)."""
    import autolr.config
    from pathlib import Path
    import textwrap

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    doc = autolr.config.__doc__.split("``autolr.toml``::", 1)[1]
    examples = _toml_blocks(readme) + [textwrap.dedent(doc)]
    assert len(examples) >= 2
    for text in examples:
        config = load_config(write(tmp_path, text))
        config.check(policy_classes())
        assert config.defaults.policies and config.runs


@pytest.mark.parametrize("args, message", [
    (["--poll", "{root}"], "write ROOT before --poll"),  # the optional value took the folder
    (["{root}", "--poll", "0"], "finite number > 0"),
    (["{root}", "--poll", "nan"], "finite number > 0"),
    (["{root}", "--rescan", "0"], "x>=1.0"),  # 0 rescanned in a busy loop
])
def test_watch_timing_options_are_checked(tmp_path, args, message):
    res = run_cli("watch", "--once", *(a.format(root=tmp_path) for a in args), check=False)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_watch_poll_with_and_without_seconds(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    for args in (["--poll"], ["--poll", "0.5"]):
        run_cli("watch", str(tmp_path), "--once", *args)
    run_cli("watch", "--poll", "0.5", str(tmp_path), "--once")
