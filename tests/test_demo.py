"""autolr demo: the README's first command, through the real daemon."""
from __future__ import annotations

import json

from autolr.control import read_journal

from .conftest import run_cli


def test_demo_runs_through_the_daemon_and_leaves_the_run_folder(tmp_path):
    out = run_cli("demo", "--dir", str(tmp_path / "d"), "--steps", "450").stdout
    run = tmp_path / "d" / "run-1"
    assert "daemon watching" in out and "stalled" in out and "done:" in out
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
