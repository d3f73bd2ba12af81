"""The framework examples, each run as its users run it: one command, the daemon it starts itself."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autolr.control import read_journal

ROOT = Path(__file__).resolve().parent.parent

EXAMPLES = {  # example -> (modules it needs, the run folder under --dir)
    "lightning": (["torch", "lightning"], "lightning/version_0"),
    "keras": (["torch", "keras"], "keras"),
    "hf_trainer": (["torch", "transformers", "accelerate"], "gpt2-tiny"),
    "optax": (["jax", "optax"], "optax"),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_and_applies_changes(tmp_path, name):
    modules, run_rel = EXAMPLES[name]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    env = dict(os.environ, KERAS_BACKEND="torch", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name / "train.py"), "--dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    applied = re.findall(r"^step +(\d+): LR (\S+) = your (\S+) x autolr scale (\S+) \(control file #(\d+)\)$",
                         proc.stdout, re.M)
    assert len(applied) >= 2, out  # several changes reached the framework during training
    run = tmp_path / "runs" / run_rel
    journal = {e["seq"]: e for e in read_journal(run)}
    for step, lr, yours, scale, seq in applied:
        assert float(lr) == pytest.approx(float(yours) * float(scale), rel=1e-4)
        # the scale the journal holds, or a change that control record listed ahead: the examples'
        # step:step_size=40,gamma=0.5 at that very step
        assert float(scale) in (pytest.approx(journal[int(seq)]["scale"]), pytest.approx(0.5 ** (int(step) // 40)))
        # Applied after the row it followed: step s of every integration's log is the s-th step
        # (0-based; the HF callback logs the Trainer's global_step - 1), so s + 1 at the earliest.
        # (The initial record follows no row: what it lists ahead applies at its own step.)
        followed = journal[int(seq)]["step"]
        assert int(step) >= (0 if followed is None else followed + 1)
    assert re.search(rf"{len(applied)} LR changes applied", proc.stdout), out
    assert "stopped; state saved" in proc.stdout, out  # the example stopped its daemon cleanly
