"""The examples run as users run them (one command each), with the real daemon they start."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autolr.control import ControlWriter, read_journal

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
HAS_JQ = shutil.which("jq") is not None


def run_example(cmd: list[str], env: dict | None = None, timeout: float = 120) -> str:
    full_env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    # the `autolr` command of this interpreter first on PATH
    full_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full_env.get("PATH", "")])
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_plain_torch_example(tmp_path):
    pytest.importorskip("torch")
    run = tmp_path / "exp1"
    out = run_example([sys.executable, str(EXAMPLES / "plain_torch" / "train.py"), "--run", str(run),
                       "--steps", "200"])
    lines = re.findall(r"step +(\d+): lr ([\d.]+) = yours ([\d.]+) x scale ([\d.e-]+) \(decision #(\d+)\)", out)
    assert len(lines) >= 3, out  # the initial value and at least two changes applied
    scale_of = {e["seq"]: e["scale"] for e in read_journal(run)}
    for step, lr, yours, scale, seq in lines:
        assert float(scale) == pytest.approx(scale_of[int(seq)], rel=1e-3)
        assert float(lr) == pytest.approx(float(yours) * scale_of[int(seq)], rel=1e-3, abs=1e-5)
    assert [int(s) for _, _, _, _, s in lines] == sorted(int(s) for _, _, _, _, s in lines)
    assert "done: 200 steps" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(200))


@pytest.mark.parametrize("reader", ["python", pytest.param("jq", marks=pytest.mark.skipif(
    not HAS_JQ, reason="jq is not installed"))])
def test_shell_example(tmp_path, reader):
    run = tmp_path / "shell-run"
    out = run_example(["bash", str(EXAMPLES / "shell" / "train.sh"), str(run)],
                      env={"AUTOLR_READER": reader, "STEPS": "160"})
    changes = [(int(s), float(lr)) for s, lr in re.findall(r"step (\d+): lr ([\d.e-]+)", out)]
    assert len(changes) >= 3, out
    assert [lr for _, lr in changes] == pytest.approx([0.1 * 0.5 ** k for k in range(len(changes))], rel=1e-12)
    # every LR the loop logged is one the daemon published
    published = {e["lr"] for e in read_journal(run)}
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 160 and {r["lr"] for r in logged} <= published
    assert "done: 160 steps" in out


@pytest.mark.parametrize("reader", ["python", pytest.param("jq", marks=pytest.mark.skipif(
    not HAS_JQ, reason="jq is not installed"))])
def test_read_lr_script(tmp_path, reader):
    script = ["bash", str(EXAMPLES / "shell" / "read_lr.sh")]

    def read(target, base):
        return float(run_example([*script, str(target), base], env={"AUTOLR_READER": reader}))

    run = tmp_path / "run"
    run.mkdir()
    assert read(run, "3e-4") == 3e-4  # no decision yet: the base LR
    writer = ControlWriter(run, fsync=False)
    writer.publish(scale=0.5, lr=None, step=10, policy="plateau", reason="r")
    assert read(run, "3e-4") == pytest.approx(1.5e-4, rel=1e-12)  # no base LR known: base x scale
    writer.publish(scale=0.25, lr=0.025, step=20, policy="plateau", reason="r")
    assert read(run, "3e-4") == 0.025  # the absolute LR wins
    assert read(run / "autolr.json", "1") == 0.025
