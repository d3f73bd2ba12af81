"""Security: nothing in the watched tree runs; symlinks stay inside; files are not world-writable."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from .test_daemon import write_jsonl

TRAPS = ("autolr_plugin.py", "conftest.py", "sitecustomize.py", "usercustomize.py", "click.py",
         "numpy.py", "pluggy.py", "json.py", "setup.py", "__init__.py", "plugin.py")


def plant(folder, marker):
    code = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    for name in TRAPS:
        (folder / name).write_text(code)
    (folder / "evil.pth").write_text(f"import os; {code}")


def test_nothing_in_the_watched_tree_is_imported_or_executed(tmp_path):
    root = tmp_path / "runs"
    run = root / "exp"
    write_jsonl(run / "metrics.jsonl", [{"step": s, "loss": 1.0} for s in range(30)])
    plant(root, tmp_path / "MARKER")
    plant(run, tmp_path / "MARKER")
    (run / "autolr.toml").write_text('policy = ["step:step_size=5"]\n')  # only the root's is read
    exe = shutil.which("autolr")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from autolr.cli import main; sys.exit(main())"]
    proc = subprocess.run([*cmd, "watch", str(root), "--once", "--policy", "step:step_size=10"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "MARKER").exists(), (tmp_path / "MARKER").read_text()
    assert json.loads((run / "autolr.json").read_text())["scale"] == pytest.approx(0.001)  # 0.1^3: the flags, not the run folder's file


def test_symlinked_folder_outside_the_root_is_not_followed_through_the_cli(tmp_path):
    outside = tmp_path / "outside" / "run"
    write_jsonl(outside / "m.jsonl", [{"step": 0, "loss": 1.0}])
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    os.symlink(outside / "m.jsonl", root / "m.jsonl")  # a log too
    skipped = subprocess.run([sys.executable, "-m", "autolr.cli", "watch", str(root), "--once"], check=True,
                             capture_output=True, text=True, timeout=120)
    assert not (outside / "autolr.json").exists()
    # said, once each (a helper's audit: the runs vanished without a word)
    for link in ("link", "m.jsonl"):
        assert skipped.stderr.count(f"{root / link} leads out of the watched root") == 1, skipped.stderr
    assert "--follow-symlinks follows it" in skipped.stderr
    followed = subprocess.run([sys.executable, "-m", "autolr.cli", "watch", str(root), "--once", "--follow-symlinks"],
                              check=True, capture_output=True, text=True, timeout=120)
    assert (outside / "autolr.json").exists() and "leads out" not in followed.stderr


def test_a_followed_symlinked_log_outside_the_root_is_read_live(tmp_path):
    """With --follow-symlinks, rows appended to a symlinked log whose file lies outside the root
    are decided at once. Before, inotify watched only folders under the root, so they waited
    for the periodic rescan (30 s; here 300 s)."""
    from .test_e2e import start_daemon, stop, wait_until

    outside = tmp_path / "outside"
    write_jsonl(outside / "m.jsonl", [{"step": 0, "loss": 1.0}])
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    os.symlink(outside / "m.jsonl", run / "m.jsonl")
    daemon = start_daemon(run.parent, "--follow-symlinks", "--rescan", "300", "--base-lr", "1",
                          "--policy", "step:step_size=5,gamma=0.5")
    try:
        wait_until(lambda: (run / "autolr.json").exists(), what="the run's control file")
        with open(outside / "m.jsonl", "a") as f:
            f.write("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
        wait_until(lambda: json.loads((run / "autolr.json").read_text())["lr"] == 0.5, timeout=20,
                   what="the decision after step 4")
    finally:
        stop(daemon)


def test_daemon_files_are_not_group_or_world_writable(tmp_path):
    run = tmp_path / "run"
    write_jsonl(run / "m.jsonl", [{"step": s, "loss": 1.0} for s in range(20)])
    old = os.umask(0)
    try:
        subprocess.run([sys.executable, "-m", "autolr.cli", "watch", str(tmp_path), "--once",
                        "--policy", "step:step_size=3"], check=True, capture_output=True, timeout=120)
    finally:
        os.umask(old)
    for name in ("autolr.json", "autolr.decisions.jsonl", "autolr.state.json", "autolr.lock"):
        mode = stat.S_IMODE((run / name).stat().st_mode)
        assert not mode & (stat.S_IWGRP | stat.S_IWOTH), (name, oct(mode))
