"""autolr demo: the README's first command, through the real daemon."""
from __future__ import annotations

import json
import re

from autolr.control import read_journal
from autolr.demo import constant_val_loss, train

from .conftest import run_cli


def test_demo_runs_through_the_daemon_and_leaves_the_run_folder(tmp_path):
    out = run_cli("demo", "--dir", str(tmp_path / "d"), "--steps", "450").stdout
    run = tmp_path / "d" / "run-1"
    assert "daemon watching" in out and "stalled" in out and "done:" in out
    # each decision line shows the validation loss then; the end compares with constant LRs
    assert re.search(r"lr 0\.05 -> 0\.025, val_loss \d\.\d{4} .*stalled", out), out
    final = re.search(r"final val_loss (\S+) .* at a constant lr 0\.05: (\S+); at a constant lr 0\.0005: (\S+)", out)
    assert final, out
    ours, high, low = (float(x) for x in final.groups())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert ours == round([r["val_loss"] for r in logged if "val_loss" in r][-1], 4)
    assert (high, low) == (round(constant_val_loss(0.05, steps=450, seed=0), 4),
                           round(constant_val_loss(0.0005, steps=450, seed=0), 4))
    assert ours < high < low  # a cut after the plateau beats both constant rates
    for name in ("metrics.jsonl", "autolr.json", "autolr.decisions.jsonl", "autolr.state.json"):
        assert (run / name).is_file()
    reasons = [e["reason"] for e in read_journal(run) if e["kind"] == "decision"]
    assert any("stalled" in r for r in reasons)
    control = json.loads((run / "autolr.json").read_text())
    assert control["lr"] < 0.05 and control["policy"] == "auto"
    assert "caught up" in (tmp_path / "d" / "autolr.daemon.log").read_text()
    # the daemon's own output, in the watched folder, is not taken for a training log
    assert not (tmp_path / "d" / "autolr.json").exists()
    status = json.loads(run_cli("status", str(tmp_path / "d"), "--json").stdout)
    assert [row["run"] for row in status] == [str(run)]


def test_constant_val_loss_is_the_same_training_at_a_fixed_lr():
    rows = list(train(lambda step, rows: 0.01, steps=100, seed=3))
    assert [r["lr"] for r in rows] == [0.01] * 100
    assert constant_val_loss(0.01, steps=100, seed=3) == rows[99]["val_loss"]
    assert constant_val_loss(0.01, steps=20, seed=3) is None  # no validation row yet
