"""``autolr.log`` / ``autolr.init`` / ``autolr.Logger``: lines autolr reads, visible at once."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import autolr
from autolr import logger as logger_mod
from autolr.readers.jsonl import JsonlReader

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_default(monkeypatch):
    """No default logger (as in a new process); closed again after the test."""
    monkeypatch.setattr(logger_mod, "_default_logger", None)
    monkeypatch.delenv("AUTOLR_RUN_DIR", raising=False)
    yield
    if logger_mod._default_logger is not None:
        logger_mod._default_logger.close()


def test_lines_are_read_back_by_autolrs_jsonl_reader_with_every_value_kind(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "m.jsonl"
    with autolr.Logger(path) as log:
        log(0, loss=0.5, acc=np.float32(0.25), n=np.int64(7), lr=np.float64(3e-4))
        log(torch.tensor(1), loss=torch.tensor(0.75), grad=torch.tensor([1.0, 2.0]), note="text", ok=True)
        log(2, loss=math.nan, up=math.inf, down=-math.inf, val={"loss": torch.tensor(math.nan)}, epoch=0.5)
        log(3, loss=None)
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    for line in lines:  # strict JSON: no bare NaN / Infinity tokens
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c} in {line}"))
    assert json.loads(lines[0]) == {"step": 0, "loss": 0.5, "acc": 0.25, "n": 7, "lr": 3e-4}
    records = JsonlReader(path).read()
    assert [r.step for r in records] == [0, 1, 2, 3]
    assert records[0].metrics == {"loss": 0.5, "acc": 0.25, "n": 7.0, "lr": 3e-4}
    assert records[1].metrics == {"loss": 0.75}  # lists and strings are not metrics
    m = records[2].metrics
    assert math.isnan(m["loss"]) and m["up"] == math.inf and m["down"] == -math.inf and math.isnan(m["val/loss"])
    assert records[2].epoch == 0.5
    assert records[3].metrics == {}


def test_each_line_is_in_the_file_when_the_call_returns_seen_from_another_process(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, autolr\n"
         f"log = autolr.Logger({str(path)!r})\n"
         "for line in sys.stdin:\n"
         "    log(int(line), loss=1.0 / (1 + int(line)))\n"
         "    print('ok', flush=True)\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for step in range(5):
            writer.stdin.write(f"{step}\n")
            writer.stdin.flush()
            assert writer.stdout.readline() == "ok\n"
            # the writer still runs with the file open: the line must already be there
            lines = path.read_text().splitlines()
            assert len(lines) == step + 1 and json.loads(lines[-1])["step"] == step
    finally:
        writer.stdin.close()
        writer.wait(timeout=30)


def test_init_sets_the_default_file_and_creates_the_folder(tmp_path, fresh_default):
    run = tmp_path / "a" / "b"
    logger = autolr.init(run)
    autolr.log(1, loss=2.0)
    assert logger.path == run / "metrics.jsonl"
    assert (run / "metrics.jsonl").read_text() == '{"step":1,"loss":2.0}\n'
    autolr.init(run, filename="other.jsonl")  # replaces (and closes) the previous default
    autolr.log(2, loss=1.0)
    assert (run / "other.jsonl").read_text() == '{"step":2,"loss":1.0}\n'
    with pytest.raises(ValueError):
        logger(3, loss=0.0)


def test_without_init_the_env_folder_then_the_working_directory(tmp_path, fresh_default, monkeypatch):
    monkeypatch.setenv("AUTOLR_RUN_DIR", str(tmp_path / "env-run"))
    autolr.log(0, loss=1.0)
    assert (tmp_path / "env-run" / "metrics.jsonl").read_text() == '{"step":0,"loss":1.0}\n'
    logger_mod._default_logger.close()
    monkeypatch.setattr(logger_mod, "_default_logger", None)
    monkeypatch.delenv("AUTOLR_RUN_DIR")
    monkeypatch.chdir(tmp_path)
    autolr.log(0, loss=1.0)
    assert (tmp_path / "metrics.jsonl").exists()


def test_appends_to_an_existing_log(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0, "loss": 3.0}\n')
    with autolr.Logger(path) as log:
        log(1, loss=2.0)
    assert [r.step for r in JsonlReader(path).read()] == [0, 1]


def test_concurrent_writers_never_interleave_within_a_line(tmp_path):
    path = tmp_path / "m.jsonl"
    loggers = [autolr.Logger(path) for _ in range(4)]
    pad = "x" * 500

    def write(k):
        for step in range(500):
            loggers[k](step, writer=k, pad=pad)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2000
    for k in range(4):
        assert [r["step"] for r in rows if r["writer"] == k] == list(range(500))
    for lg in loggers:
        lg.close()


def test_a_value_json_cannot_hold_is_an_error_and_writes_nothing(tmp_path):
    path = tmp_path / "m.jsonl"
    with autolr.Logger(path) as log:
        with pytest.raises(TypeError, match="cannot write"):
            log(0, loss=object())
    assert path.read_text() == ""


def test_benchmark_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_logger.py"), "--quick"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "`Logger(path)(step, **floats)`" in out.stdout and "calls/s" in out.stdout
