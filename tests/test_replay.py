"""autolr replay: output format, several logs, --every-row, metric and mode defaults."""
from __future__ import annotations

import json

import pytest

from autolr.policy import METRIC_UNSEEN_ROWS, missing_metric

from .conftest import run_cli


def lines(*args):
    return [json.loads(x) for x in run_cli("replay", *args).stdout.splitlines()]


def test_first_line_is_the_initial_value_then_one_per_change(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(10)))
    out = lines(str(log), "--policy", "step:step_size=4,gamma=0.5", "--base-lr", "0.8")
    assert out[0] == {"log": str(log), "step": None, "lr": 0.8, "scale": 1.0, "policy": "step", "reason": "initial"}
    assert [(x["step"], x["lr"]) for x in out[1:]] == [(3, 0.4), (7, 0.2)]
    assert set(out[1]) == {"log", "step", "lr", "scale", "policy", "reason"}


def test_without_base_lr_only_the_scale_is_known(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(5)))
    out = lines(str(log), "--policy", "step:step_size=2")
    assert all(x["lr"] is None for x in out) and out[-1]["scale"] == pytest.approx(0.01)


def test_every_row_and_several_logs(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.jsonl"
    a.write_text("epoch,loss\n0,1\n1,1\n2,1\n")
    b.write_text("".join(json.dumps({"iter": s, "loss": 1.0}) + "\n" for s in range(4)))
    out = lines(str(a), str(b), "--policy", "step:step_size=2,gamma=0.1", "--every-row")
    by_log = {str(a): [], str(b): []}
    for x in out:
        by_log[x["log"]].append(x)
    assert [x["step"] for x in by_log[str(a)]] == [None, 0, 1, 2]
    assert [x["step"] for x in by_log[str(b)]] == [None, 0, 1, 2, 3]
    assert [x["policy"] for x in by_log[str(b)][1:]] == [None, "step", None, "step"]


def test_metric_defaults_and_max_mode_for_accuracy(tmp_path):
    log = tmp_path / "m.csv"
    rows = "".join(f"{e},{0.5},{0.9}\n" for e in range(20))
    log.write_text("epoch,loss,val_acc\n" + rows)
    out = lines(str(log), "--policy", "plateau:method=threshold,patience=2", "--metric", "val_acc")
    assert "val_acc" in out[1]["reason"] and "mode max" in out[1]["reason"]
    out = lines(str(log), "--policy", "plateau:method=threshold,patience=2")
    assert "plateau: loss" in out[1]["reason"]


def test_sparse_rows_wait_for_the_metric(tmp_path):
    log = tmp_path / "metrics.csv"
    body = "".join(f"0,{s},{1.0},\n" if s % 5 else f"0,{s},,{1.0}\n" for s in range(60))
    log.write_text("epoch,step,train_loss,val_loss\n" + body)
    out = lines(str(log), "--policy", "plateau:method=threshold,patience=2")
    # val_loss arrives every 5th row: 3 bad observations after the first need rows 5, 10, 15
    assert out[1]["step"] == 15 and "val_loss" in out[1]["reason"]


def test_warmup_then_plateau_waits_for_warmup(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(40)))
    out = lines(str(log), "--policy", "warmup:steps=20", "--policy", "plateau:method=threshold,patience=3", "--base-lr", "1")
    plateau = [x for x in out if x["policy"] == "plateau"]
    # counts start at row 20: best at 20, bad 21..24 -> fires after step 24
    assert plateau[0]["step"] == 24


def test_replay_errors(tmp_path):
    proc = run_cli("replay", str(tmp_path / "none.csv"), check=False)
    assert proc.returncode != 0 and "no such file" in proc.stderr
    (tmp_path / "x.bin").write_bytes(b"\x00")
    proc = run_cli("replay", str(tmp_path / "x.bin"), check=False)
    assert proc.returncode != 0 and "no reader recognises" in proc.stderr


def test_replaying_twice_gives_identical_output(tmp_path):
    log = tmp_path / "m.jsonl"
    import random
    rng = random.Random(3)
    log.write_text("".join(json.dumps({"step": s, "loss": 1 / (1 + s) + rng.random() * 0.1}) + "\n" for s in range(500)))
    args = (str(log), "--policy", "warmup:steps=50", "--policy", "plateau:method=threshold,patience=5", "--base-lr", "0.1")
    first = [{k: v for k, v in x.items()} for x in lines(*args)]
    assert first == lines(*args)


def test_plot_writes_a_png_with_the_decisions(tmp_path):
    pytest.importorskip("matplotlib")
    import random
    rng = random.Random(0)
    log = tmp_path / "m.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 0.3 + 2 / (1 + s / 50) + 0.05 * rng.random()}) + "\n"
                           for s in range(1500)))
    out = tmp_path / "p.png"
    proc = run_cli("replay", str(log), "--base-lr", "0.1", "--metric", "loss", "--plot", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert "plot written" in proc.stderr
    two = run_cli("replay", str(log), str(log), "--plot", str(out), check=False)
    assert two.returncode != 0 and "exactly one" in two.stderr


@pytest.mark.parametrize("name, text", [
    ("log.csv", "step,loss\n0,1\n1,1\n2,1\n3,0.5"),
    ("log.csv", "step,loss\r\n0,1\r\n1,1\r\n2,1\r\n3,0.5"),
    ("metrics.jsonl", '{"step": 0, "loss": 1}\n{"step": 1, "loss": 1}\n{"step": 2, "loss": 1}\n{"step": 3, "loss": 0.5}'),
])
def test_replay_reads_a_finished_logs_last_line_without_its_newline(tmp_path, name, text):
    """Regression: replay left out a finished log's unterminated last line (and its decision);
    the daemon, tailing a live log, still waits for the newline."""
    from autolr.config import Settings, parse_policy_options
    from autolr.plugins import get_plugin_manager, policy_classes, reader_classes
    from autolr.readers import reader_for
    from autolr.replay import replay_log

    pm = get_plugin_manager(entry_points=False)
    POLICIES, READERS = policy_classes(pm), reader_classes(pm)

    cut, whole = tmp_path / "cut" / name, tmp_path / "whole" / name
    for path, body in ((cut, text), (whole, text + "\n")):
        path.parent.mkdir()
        path.write_bytes(body.encode())
    settings = Settings(policies=parse_policy_options(["step:step_size=1,gamma=0.5"]))
    got = [dict(x, log=None) for x in replay_log(cut, settings, POLICIES, READERS)]
    want = [dict(x, log=None) for x in replay_log(whole, settings, POLICIES, READERS)]
    assert got == want and got[-1]["step"] == 3
    live = reader_for(cut, READERS)(cut)
    assert [r.step for r in live.read()] == [0, 1, 2] and live.read() == []  # still waits for it


def test_a_misspelt_metric_is_reported(tmp_path):
    """Regression (a helper's audit): ``--metric val_los`` on a log with ``val_loss`` ran to
    the end silently, the plateau never able to fire."""
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,loss,val_loss\n" + "".join(f"{e},{e},1.0,0.9\n" for e in range(6)))
    spelt = run_cli("replay", str(log), "--metric", "val_los", "--policy", "plateau:method=threshold,patience=3")
    assert "did you mean 'val_loss'" in spelt.stderr, spelt.stderr
    right = run_cli("replay", str(log), "--metric", "val_loss", "--policy", "plateau:method=threshold,patience=3")
    assert "warning" not in right.stderr and len(right.stdout.splitlines()) > 1  # it decided


@pytest.mark.parametrize("args,said", [
    (["--policy", "plateau:method=threshold,metric=losss"], "plateau:metric 'losss' is in none of 30 rows read"),
    (["--policy", "auto:guard_metric=losss"], "auto:guard_metric 'losss'"),
    (["--policy", "step:step_size=5", "--unit", "epoch"], "--unit epoch: none of 30 rows read has an epoch"),
    (["--policy", "step:step_size=5,unit=epoch"], "step:unit epoch: none of 30 rows"),
])
def test_a_policys_misspelt_metric_or_a_unit_no_row_has_is_reported(tmp_path, args, said):
    """Regression (a helper's audit): a metric misspelt inside a policy spec (the plateau never
    fires, auto's guard is off) and ``--unit epoch`` on a log without epochs (the schedules
    never move) were never reported, in replay or by the daemon."""
    log = tmp_path / "m.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(30)))
    assert said in run_cli("replay", str(log), *args).stderr
    assert "warning" not in run_cli("replay", str(log), "--policy", "step:step_size=5,unit=step").stderr


def test_missing_metric_waits_for_rows_unless_a_near_name_is_logged():
    assert missing_metric("val_los", {"loss", "val_loss"}, 3) is not None
    assert missing_metric("val_loss", {"loss", "val_loss"}, 10**6) is None
    assert missing_metric("val_acc", {"loss"}, 100) is None  # a validation metric may come later
    assert "'loss'" in missing_metric("val_acc", {"loss"}, METRIC_UNSEEN_ROWS)
    assert missing_metric("val_acc", {"loss"}, 100, finished=True) is not None
    # a validation metric after many rows of its training twin is no misspelling (a helper's audit)
    for metric, logged in (("val_accuracy", "accuracy"), ("val_loss_epoch", "train_loss_epoch"),
                           ("val_loss", "val_loss_step"), ("epoch_val_loss", "epoch_train_loss")):
        assert missing_metric(metric, {"loss", logged}, 50) is None, metric
    assert "did you mean 'val_loss'" in missing_metric("val_los", {"loss", "val_loss"}, 50)


def test_a_metric_after_a_thousand_other_names_is_seen():
    """Regression (a helper's audit): once 1000 names were kept for spelling suggestions, rows
    were no longer looked at, and val_loss, in every later row, was reported missing."""
    from autolr.chain import Chain
    from autolr.policy import UnseenNames
    from autolr.records import Record

    unseen = UnseenNames(Chain(policies=(), metric="val_loss"))
    unseen.see([Record({f"grad_norm/layer{i}": 0.1 for i in range(1200)}, 0)])
    unseen.see([Record({"loss": 1.0, "val_loss": 1.0}, s) for s in range(1, METRIC_UNSEEN_ROWS)])
    assert not unseen and unseen.warnings() == []


def test_replay_takes_the_configs_run_sections_as_the_daemon_does(tmp_path):
    """Regression (a helper's audit): ``replay --config`` used the top-level settings only, so
    a run under ``[runs."sweep-*/lr-1e-3"]`` replayed at another base LR than the daemon's."""
    (tmp_path / "autolr.toml").write_text('base_lr = 3e-4\npolicy = ["step:step_size=4,gamma=0.5"]\n'
                                           '[runs."sweep-*/lr-1e-3"]\nbase_lr = 1e-3\n')
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(6))
    for run in ("sweep-a/lr-1e-3", "sweep-a/lr-3e-4"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "m.jsonl").write_text(rows)
    run_cli("watch", str(tmp_path), "--once")
    config = str(tmp_path / "autolr.toml")
    for run, base in (("sweep-a/lr-1e-3", 1e-3), ("sweep-a/lr-3e-4", 3e-4)):
        out = lines(str(tmp_path / run / "m.jsonl"), "--config", config)
        assert [x["lr"] for x in out] == pytest.approx([base, base / 2])
        journal = [json.loads(x) for x in (tmp_path / run / "autolr.decisions.jsonl").read_text().splitlines()]
        assert [x["lr"] for x in out] == [e["lr"] for e in journal]
