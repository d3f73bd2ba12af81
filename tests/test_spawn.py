"""autolr.spawn: starting and stopping the real daemon from Python."""
from __future__ import annotations

import json
import time

import pytest

from autolr.spawn import watching


def test_watching_runs_the_daemon_for_the_block(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    lines: list[str] = []
    with watching(tmp_path, "--policy", "step:step_size=2", "--no-fsync", echo=lines.append) as proc:
        (run / "m.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1}) + "\n" for s in range(4)))
        end = time.monotonic() + 30
        while not (run / "autolr.json").exists() or json.loads((run / "autolr.json").read_text())["seq"] < 3:
            assert time.monotonic() < end, lines
            time.sleep(0.02)
    assert proc.returncode == 0
    assert any("watching" in line for line in lines) and any("stopped" in line for line in lines)


def test_a_daemon_that_cannot_start_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="did not start"):
        with watching(tmp_path, "--policy", "nope", echo=None):
            pass
