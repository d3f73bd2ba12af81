"""HfTrainerStateReader against real transformers Trainer checkpoints."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer requires it

from autolr.chain import Chain  # noqa: E402
from autolr.engine import RunEngine  # noqa: E402
from autolr.policies.plateau import Plateau  # noqa: E402
from autolr.readers.hf import MARKS, STATE_NAME, HfTrainerStateReader  # noqa: E402

OLD = 10**9  # an mtime far in the past: an unparseable file that old is bad input


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 64, (n, 16), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class Daemon:
    """Polls every trainer_state.json under a folder, one reader per file, like the daemon."""

    def __init__(self, root: Path, marks: dict | None = None):
        self.root, self.marks = root, {} if marks is None else marks
        self.readers: dict[Path, HfTrainerStateReader] = {}
        self.records: list = []

    def poll(self, reverse: bool = False) -> list:
        got = []
        for path in sorted(self.root.rglob(STATE_NAME), reverse=reverse):
            if path not in self.readers:
                self.readers[path] = HfTrainerStateReader(path, marks=self.marks)
        for reader in self.readers.values():
            got += reader.read()
        self.records += got
        return got


class PollOnSave(transformers.TrainerCallback):
    """After each checkpoint is written: keep a copy of its snapshot and let the daemon poll."""

    def __init__(self, daemon: Daemon, snapshots: dict):
        self.daemon, self.snapshots = daemon, snapshots

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_NAME
        self.snapshots[state.global_step] = path.read_bytes()
        self.daemon.poll()


def train(out: Path, daemon: Daemon, snapshots: dict, *, data_seed: int = 0, resume: str | None = None,
          save_total_limit: int | None = 2) -> list:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=12, per_device_train_batch_size=4, logging_steps=2,
        save_steps=4, eval_strategy="steps", eval_steps=4, save_total_limit=save_total_limit,
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=Tokens(64, data_seed),
        eval_dataset=Tokens(8, 1), callbacks=[PollOnSave(daemon, snapshots)],
    )
    trainer.train(resume_from_checkpoint=resume)
    return list(trainer.state.log_history)


def expected(history: list) -> list[tuple]:
    out = []
    for entry in history:
        metrics = {k: float(v) for k, v in entry.items() if k not in ("step", "epoch")}
        out.append((entry["step"], entry.get("epoch"), metrics))
    return out


def triples(records) -> list[tuple]:
    return [(r.step, r.epoch, r.metrics) for r in records]


def effective(records) -> list[tuple]:
    """The history the records describe: a ``restart`` record cuts what came at its step or later."""
    kept: list = []
    for r in records:
        if r.restart:
            kept = [k for k in kept if k.step < r.step]
        kept.append(r)
    return triples(kept)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real training run: 12 steps, checkpoints every 4, two kept, save_state at the end."""
    out = tmp_path_factory.mktemp("hf") / "out"
    daemon, snapshots = Daemon(out), {}
    train(out, daemon, snapshots)
    final = json.loads((out / "checkpoint-12" / STATE_NAME).read_text())["log_history"]
    return {"out": out, "daemon": daemon, "snapshots": snapshots, "final": final}


def write_snapshot(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_live_checkpoints_deliver_each_entry_once(run):
    daemon = run["daemon"]
    assert sorted(run["snapshots"]) == [4, 8, 12]
    assert not (run["out"] / "checkpoint-4").exists()  # removed by save_total_limit
    assert triples(daemon.records) == expected(run["final"])
    assert len({(r.step, tuple(r.metrics)) for r in daemon.records}) == len(daemon.records)
    assert not any(r.restart for r in daemon.records)
    assert daemon.poll() == []  # the deleted checkpoint is just gone
    assert all(not r.skipped for r in daemon.readers.values())
    assert any("eval_loss" in r.metrics for r in daemon.records)


def test_save_state_adds_the_summary_entry(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    daemon = Daemon(out)
    daemon.poll()
    summary = dict(run["final"][-1], train_runtime=1.5, train_loss=3.9, total_flos=1.0)
    top = json.loads((out / "checkpoint-12" / STATE_NAME).read_text())
    top["log_history"].append(summary)
    write_snapshot(out / STATE_NAME, json.dumps(top, indent=2).encode())  # what save_state() writes
    got = daemon.poll()
    assert [r.metrics.get("train_runtime") for r in got] == [1.5] and got[0].step == 12


def test_run_dir_and_matches(run):
    out = run["out"]
    ckpt = out / "checkpoint-12" / STATE_NAME
    assert HfTrainerStateReader.matches(ckpt)
    assert not HfTrainerStateReader.matches(out / "checkpoint-12" / "config.json")
    assert HfTrainerStateReader.run_dir(ckpt) == out
    assert HfTrainerStateReader.run_dir(out / STATE_NAME) == out
    assert HfTrainerStateReader(ckpt, marks={}).folder_for(None) == out


@pytest.mark.parametrize("order", [[12, 8, 4], [8, 4, 12], [4, 12, 8]])
def test_any_snapshot_order_gives_the_history_once(run, tmp_path, order):
    for step in order:  # a daemon started late finds several checkpoints at once
        write_snapshot(tmp_path / f"checkpoint-{step}" / STATE_NAME, run["snapshots"][step])
    marks: dict = {}
    readers = [HfTrainerStateReader(tmp_path / f"checkpoint-{s}" / STATE_NAME, marks=marks) for s in order]
    records = [r for reader in readers for r in reader.read()]
    assert sorted(triples(records), key=lambda t: t[0]) == expected(run["final"])


def test_state_round_trip(run, tmp_path):
    snaps = run["snapshots"]
    first = write_snapshot(tmp_path / "checkpoint-8" / STATE_NAME, snaps[8])
    reader = HfTrainerStateReader(first, marks={})
    got = reader.read()
    state = json.loads(json.dumps(reader.get_state()))
    # A restarted daemon: fresh readers, states restored, then the next checkpoint arrives.
    marks: dict = {}
    again = HfTrainerStateReader(first, marks=marks)
    again.set_state(state)
    assert again.read() == []
    later = HfTrainerStateReader(write_snapshot(tmp_path / "checkpoint-12" / STATE_NAME, snaps[12]), marks=marks)
    got += later.read()
    assert triples(got) == expected(run["final"])


def test_half_written_snapshot_is_retried(run, tmp_path):
    full = run["snapshots"][12]
    path = write_snapshot(tmp_path / "checkpoint-12" / STATE_NAME, full[: len(full) // 2])
    reader = HfTrainerStateReader(path, marks={})
    assert reader.read() == [] and reader.read() == []
    assert not reader.skipped  # a write in progress is not bad input
    path.write_bytes(full)
    assert triples(reader.read()) == expected(run["final"])
    assert reader.read() == []
    path.write_bytes(full[:100])  # being rewritten again, then complete: nothing twice
    assert reader.read() == []
    path.write_bytes(full)
    assert reader.read() == [] and not reader.skipped


def test_stale_unparseable_snapshot_counted_once(run, tmp_path):
    full = run["snapshots"][8]
    path = write_snapshot(tmp_path / "checkpoint-8" / STATE_NAME, full[:-40])
    os.utime(path, ns=(OLD, OLD))
    reader = HfTrainerStateReader(path, marks={})
    assert reader.read() == [] and reader.read() == []
    assert sum(reader.skipped.values()) == 1


@pytest.mark.parametrize("content", [
    b"\x00\xff garbage \x89PNG",
    b"",
    b"[]",
    b'{"log_history": 5}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"log_history": [' + b"[" * 50_000 + b"]" * 50_000 + b"]}",
], ids=["binary", "empty", "list", "not-a-list", "deep", "deep-entry"])
def test_garbage_never_raises(tmp_path, content):
    path = write_snapshot(tmp_path / "checkpoint-2" / STATE_NAME, content)
    os.utime(path, ns=(OLD, OLD))
    reader = HfTrainerStateReader(path, marks={})
    assert reader.read() == [] and reader.read() == []
    assert sum(reader.skipped.values()) <= 1


def test_odd_entries(tmp_path):
    history = [1, "x", {"loss": 1.0}, {"step": "a", "loss": 2.0}, {"step": 3, "loss": "nan", "note": "hi"},
               {"step": 4, "loss": float("nan"), "epoch": 0.5, "flag": True}, {"step": 4.0, "eval_loss": 1e308}]
    path = write_snapshot(tmp_path / STATE_NAME, json.dumps({"log_history": history}).encode())
    reader = HfTrainerStateReader(path, marks={})
    got = reader.read()
    assert [(r.step, r.epoch) for r in got] == [(3, None), (4, 0.5), (4, None)]
    assert math.isnan(got[0].metrics["loss"]) and math.isnan(got[1].metrics["loss"])
    assert got[2].metrics == {"eval_loss": 1e308}
    assert sum(reader.skipped.values()) == 4


def test_resumed_from_an_earlier_checkpoint(tmp_path):
    """Train to 12, resume from checkpoint-4 on other data: decisions equal a straight run's."""
    out = tmp_path / "out"
    daemon, snaps = Daemon(out), {}
    train(out, daemon, snaps, save_total_limit=None)
    first_branch = len(daemon.records)
    old_branch, old_mtime = snaps[12], (out / "checkpoint-12" / STATE_NAME).stat().st_mtime_ns
    history = train(out, daemon, snaps, data_seed=7, resume=str(out / "checkpoint-4"), save_total_limit=None)
    daemon.poll()
    resumed = daemon.records[first_branch:]
    assert resumed[0].restart and resumed[0].step == 6
    assert sum(r.restart for r in daemon.records) == 1
    final = json.loads((out / "checkpoint-12" / STATE_NAME).read_text())["log_history"]
    assert final == history[:-1]  # the summary entry is only in save_state()'s file
    assert effective(daemon.records) == expected(final)

    def chain_state(records):
        chain = Chain((Plateau(metric="loss"),), base_lr=5e-5)
        engine = RunEngine(chain)
        for record in records:
            engine.feed(record)
        return engine.state, engine.rewinds

    live, rewinds = chain_state(daemon.records)
    straight, _ = chain_state(HfTrainerStateReader(out / "checkpoint-12" / STATE_NAME, marks={}).read())
    assert rewinds == 1 and live == straight

    # A stale copy of the abandoned branch (its save_state() file), seen by a daemon started
    # now: whichever it reads first, it ends on the resumed branch, the newest snapshots.
    stale = write_snapshot(out / STATE_NAME, old_branch)
    os.utime(stale, ns=(old_mtime, old_mtime))
    for reverse in (False, True):
        late = Daemon(out)
        late.poll(reverse)
        assert effective(late.records) == expected(final)


def run_daemon(root: Path):
    """``autolr watch --once`` in process, with this reader installed."""
    from autolr.config import load_config, parse_policy_options
    from autolr.daemon import Daemon, Options
    from autolr.plugins import get_plugin_manager, policy_classes, reader_classes

    pm = get_plugin_manager(entry_points=False)
    readers = {**reader_classes(pm), HfTrainerStateReader.name: HfTrainerStateReader}
    overrides = {"policies": parse_policy_options(["plateau"]), "base_lr": 5e-5}
    daemon = Daemon(root, load_config(None), overrides, policy_classes(pm), readers, Options(once=True, fsync=False))
    daemon.run()
    return daemon


def test_daemon_reads_all_checkpoints_as_one_run(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    daemon = run_daemon(tmp_path)
    assert set(daemon.runs) == {out}
    engine = daemon.runs[out].engine
    assert engine.state["rows"] == len(run["final"]) and engine.rewinds == 0
    assert (out / "autolr.json").is_file()
    MARKS.clear()  # a new daemon process: what was delivered comes from the saved state
    again = run_daemon(tmp_path)
    assert again.runs[out].engine.state["rows"] == len(run["final"])


def test_a_live_runs_mark_outlives_many_other_runs(tmp_path, monkeypatch):
    """Regression: past MAX_MARKS (256) runs, a live run's mark was dropped from the registry
    and its next checkpoint's reader started from a fresh one: every entry delivered again."""
    from autolr.readers import hf

    monkeypatch.setattr(hf, "MAX_MARKS", 4)
    entries = [{"step": s, "loss": 1.0 / s} for s in range(1, 5)]
    first = write_snapshot(tmp_path / "run" / "checkpoint-2" / STATE_NAME,
                           json.dumps({"log_history": entries[:2]}).encode())
    reader = HfTrainerStateReader(first)
    assert [r.step for r in reader.read()] == [1, 2]
    for i in range(6):  # other runs opened meanwhile
        HfTrainerStateReader(write_snapshot(tmp_path / f"other{i}" / STATE_NAME, b'{"log_history": []}'))
    second = write_snapshot(tmp_path / "run" / "checkpoint-4" / STATE_NAME,
                            json.dumps({"log_history": entries}).encode())
    assert [r.step for r in HfTrainerStateReader(second).read()] == [3, 4]
    assert reader.mark is hf.LIVE[os.path.abspath(tmp_path / "run")]
