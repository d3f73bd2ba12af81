"""PyTorch integration with the real daemon: the LR each ``optimizer.step()`` used follows the file.

One ``autolr watch`` subprocess watches a folder; each test trains a tiny float64 MLP with two
param groups in its own run folder, logging with ``autolr.log``, while the daemon's ``step``
policy halves the scale every 20 logged steps. A step pre-hook registered before ``attach``
sees the user's LR (own scheduler included), one registered after it the LR the step uses.
Asserted per step: used LR = user LR × the journal scale of the entry applied; the user's
scheduler runs exactly as without autolr; with plain SGD the parameter update itself shows
the used LR; with ``apply_margin`` each change lands exactly at its ``apply_at_step``.
"""
from __future__ import annotations

import json

import math
import time
from pathlib import Path

import pytest

import autolr
from autolr.control import read_journal

from .test_e2e import start_daemon, stop, wait_until

torch = pytest.importorskip("torch")
from autolr.integrations.torch import attach  # noqa: E402

STEP_SIZE = 20
MARGIN = 15
GROUP_RATIO = 0.3  # second group's LR relative to the first


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch") / "runs"
    root.mkdir()
    (root / "autolr.toml").write_text(
        f'policy = ["step:step_size={STEP_SIZE},gamma=0.5"]\n\n'
        f'[runs."margin-*"]\napply_margin = {MARGIN}\n')
    daemon = start_daemon(root, "--no-fsync")
    log = root.parent / "daemon.log"
    try:
        wait_until(lambda: log.exists() and "caught up" in log.read_text(), what="the daemon to start watching")
        yield root
    finally:
        stop(daemon)
        autolr.init(root.parent, "unused.jsonl")  # release the test's metrics file


SCHEDULERS = {
    None: lambda s: 1.0,
    "StepLR": lambda s: 0.8 ** (s // 7),
    "LambdaLR": lambda s: 1.0 / (1.0 + 0.05 * s),
}


def make(opt_name: str, sched_name: str | None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    base = 0.05 if opt_name == "SGD" else 0.01
    groups = [{"params": model[0].parameters(), "lr": base},
              {"params": model[2].parameters(), "lr": base * GROUP_RATIO}]
    opt = torch.optim.SGD(groups, lr=base) if opt_name == "SGD" else torch.optim.Adam(groups, lr=base)
    sched = None
    if sched_name == "StepLR":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.8)
    elif sched_name == "LambdaLR":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.05 * s))
    return model, opt, sched, base


def train(run: Path, opt_name: str, sched_name: str | None, *, steps: int = 100, sync: bool = True,
          until_changes: int = 0, timeout: float = 30.0) -> dict:
    """Train while the daemon runs; return per-step records.

    ``sync``: after logging each step that triggers a decision, wait (with a timeout) until
    the daemon has journaled it, so changes land at known steps. Otherwise the loop runs free
    and keeps going past ``steps`` until ``until_changes`` changes were applied (or timeout).
    """
    model, opt, sched, base = make(opt_name, sched_name)
    rec: dict[str, list] = {"user": [], "used": [], "seq": [], "scale": [], "sgd": []}
    opt.register_step_pre_hook(lambda o, a, k: rec["user"].append([g["lr"] for g in o.param_groups]))
    handle = attach(opt, run)

    def after_attach(o, args, kwargs) -> None:  # runs after attach's hook: sees what the step uses
        rec["used"].append([g["lr"] for g in o.param_groups])
        rec["seq"].append(handle.seq)
        rec["scale"].append(handle.scale)

    opt.register_step_pre_hook(after_attach)
    autolr.init(run)
    wait_until(lambda: (run / "autolr.json").exists(), what="the run's initial control file")
    gen = torch.Generator().manual_seed(1)
    w_true = torch.randn(10, 1, generator=gen, dtype=torch.float64)
    deadline = time.monotonic() + timeout
    step = 0
    while step < steps or (len(set(rec["seq"])) <= until_changes and time.monotonic() < deadline):
        x = torch.randn(64, 10, generator=gen, dtype=torch.float64)
        y = x @ w_true + 0.1 * torch.randn(64, 1, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        probes = [(g["params"][0], g["params"][0].detach().clone(), g["params"][0].grad.clone())
                  for g in opt.param_groups]
        opt.step()
        if opt_name == "SGD":  # p_new = p_old - lr * grad: read the LR off the update itself
            rec["sgd"].append([_lr_from_update(p, before, grad) for p, before, grad in probes])
        if sched is not None:
            sched.step()
        autolr.log(step, loss=loss.detach())
        if sync and step % STEP_SIZE == STEP_SIZE - 1:
            # the control file, not the journal: the journal is written first, by design
            wait_until(lambda: _control_step(run) == step, what=f"the decision after step {step}")
        if not sync:
            time.sleep(0.002)
        step += 1
    rec.update(opt=opt, sched=sched, base=base, handle=handle, steps=step)
    handle.detach()
    return rec


def _control_step(run: Path):
    try:
        return json.loads((run / "autolr.json").read_text()).get("step")
    except (OSError, ValueError):
        return None


def _lr_from_update(p, before, grad) -> float:
    mask = grad.abs() > 1e-3
    ratios = ((before - p.detach()) / grad)[mask]
    assert ratios.numel() > 0
    assert float(ratios.max() - ratios.min()) <= 1e-6 * float(ratios.abs().max())
    return float(ratios.mean())


def check_common(run: Path, rec: dict, sched_name: str | None) -> dict[int, float]:
    journal = read_journal(run)
    scale_of = {e["seq"]: e["scale"] for e in journal}
    n = rec["steps"]
    assert len(rec["used"]) == len(rec["user"]) == n
    # the user's own LR: exactly the scheduler's, as if autolr were not there
    factor = SCHEDULERS[sched_name]
    for s, user in enumerate(rec["user"]):
        assert user == pytest.approx([rec["base"] * factor(s), rec["base"] * GROUP_RATIO * factor(s)], rel=1e-12)
    # the LR each step used: user LR x the scale of the control entry applied at that step
    for s, (user, used, seq, scale) in enumerate(zip(rec["user"], rec["used"], rec["seq"], rec["scale"])):
        # the entry's own scale, or a change it listed ahead (the step schedule's, at its step)
        assert seq in scale_of and scale in (scale_of[seq], 0.5 ** (s // STEP_SIZE)), (s, seq)
        assert used == [u * scale for u in user], s
    assert rec["seq"] == sorted(rec["seq"])  # never back to an older decision
    for used, sgd in zip(rec["used"], rec["sgd"]):
        assert sgd == pytest.approx(used, rel=1e-6)
    # after training the groups hold the user's LRs again; the scheduler's state is its own
    opt, sched = rec["opt"], rec["sched"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [rec["base"] * factor(n), rec["base"] * GROUP_RATIO * factor(n)], rel=1e-12)
    if sched is not None:
        assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]
    return scale_of


@pytest.mark.parametrize("opt_name, sched_name",
                         [("SGD", None), ("SGD", "StepLR"), ("Adam", None), ("Adam", "LambdaLR")])
def test_lr_used_by_each_step_follows_the_control_file(root, opt_name, sched_name):
    run = root / f"{opt_name}-{sched_name}"
    run.mkdir()
    rec = train(run, opt_name, sched_name)
    check_common(run, rec, sched_name)
    # the decision after step 20k-1 is in force from step 20k on (the loop waited for it)
    assert rec["scale"] == [0.5 ** (s // STEP_SIZE) for s in range(rec["steps"])]


def test_with_apply_margin_each_change_lands_at_its_apply_at_step(root):
    run = root / "margin-Adam"
    run.mkdir()
    rec = train(run, "Adam", "StepLR")
    check_common(run, rec, "StepLR")
    decisions = [e for e in read_journal(run) if e["kind"] == "decision"]
    assert decisions and all(e["apply_at_step"] == e["step"] + MARGIN for e in decisions)
    changes = [s for s in range(1, rec["steps"]) if rec["scale"][s] != rec["scale"][s - 1]]
    assert changes == [e["apply_at_step"] for e in decisions if e["apply_at_step"] < rec["steps"]]
    assert len(changes) >= 3


def test_free_running_loop_follows_the_daemon_live(root):
    run = root / "free"
    run.mkdir()
    rec = train(run, "SGD", "LambdaLR", steps=100, sync=False, until_changes=3)
    check_common(run, rec, "LambdaLR")
    assert len(set(rec["seq"])) > 3, "fewer than 3 decisions reached the loop during training"


def test_a_log_flushed_every_100_steps_still_gets_every_step_of_a_warmup_and_a_cosine(tmp_path):
    """A logger that writes its rows every N steps (Lightning's CSVLogger flushes every 100, a
    Trainer logs every ``logging_steps``): the daemon sees step 99 only at step 100, yet each
    step from there on runs at the schedule's own factor, from the changes the control file
    lists ahead. Before the first rows, the chain's start value (the warmup's 0.1)."""
    warmup, t_max, flush = 300, 2000, 100
    root = tmp_path / "runs"
    run = root / "sparse"
    run.mkdir(parents=True)
    log_path = run / "metrics.jsonl"
    log_path.touch()  # the logger's file exists from the start: the daemon publishes the start value
    daemon = start_daemon(root, "--no-fsync", "--policy", f"warmup:steps={warmup},start_factor=0.1",
                          "--policy", f"cosine:T_max={t_max}")
    try:
        wait_until(lambda: (run / "autolr.json").exists(), what="the start value")
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        handle = attach(opt, run)
        used = []
        with open(log_path, "a") as log:
            for step in range(600):
                x = torch.randn(8, 4, dtype=torch.float64)
                opt.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                opt.step()
                used.append(handle.scale)
                log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
                if step % flush == flush - 1:
                    log.flush()
                    wait_until(lambda: _control_step(run) == step, what=f"the decision after step {step}")
        handle.detach()
    finally:
        stop(daemon)

    def factor(s: int) -> float:
        return (0.1 + 0.9 * min(s, warmup) / warmup) * (1 + math.cos(math.pi * s / t_max)) / 2

    assert used[:flush] == [0.1] * flush
    wrong = [(s, used[s], factor(s)) for s in range(flush, 600) if not math.isclose(used[s], factor(s), rel_tol=1e-12)]
    assert not wrong, wrong[:5]
    assert "ahead" not in read_journal(run)[-1] and len(read_journal(run)) == 1 + 600 // flush * flush


def test_without_a_control_file_attach_changes_nothing(tmp_path):
    model, opt, sched, base = make("SGD", "StepLR")
    handle = attach(opt, tmp_path)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    for _ in range(10):
        model(torch.zeros(2, 10, dtype=torch.float64)).sum().backward()
        opt.step()
        sched.step()
    assert seen == pytest.approx([base * 0.8 ** (s // 7) for s in range(10)], rel=1e-15)
    assert handle.seq == 0 and handle.scale == 1.0 and handle.step == 10


def test_a_step_that_raises_does_not_leave_the_scaled_lr_behind(tmp_path):
    from autolr.control import ControlWriter

    ControlWriter(tmp_path, fsync=False).publish(scale=0.5, lr=None, step=1, policy="t", reason="r")
    model, opt, _, base = make("SGD", None)
    handle = attach(opt, tmp_path)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))

    def bad_closure():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        opt.step(bad_closure)  # the post-hook never runs
    model(torch.zeros(2, 10, dtype=torch.float64)).sum().backward()
    opt.step()
    assert seen == [base * 0.5, base * 0.5]  # not 0.25: the user's LR was restored first
    assert opt.param_groups[0]["lr"] == base
    assert handle.last_lrs == [base * 0.5, base * GROUP_RATIO * 0.5]
    assert handle.effective_lrs() == handle.last_lrs
    assert not math.isnan(handle.scale)


def test_effective_lrs_reads_the_scale_the_next_step_will_use(tmp_path):
    from autolr.control import ControlWriter

    model, opt, _, base = make("Adam", None)
    handle = attach(opt, tmp_path)
    assert handle.effective_lrs() == [base, base * GROUP_RATIO]
    ControlWriter(tmp_path, fsync=False).publish(scale=0.5, lr=None, step=1, policy="t", reason="r")
    assert handle.effective_lrs() == [base * 0.5, base * GROUP_RATIO * 0.5]
    assert [g["lr"] for g in opt.param_groups] == [base, base * GROUP_RATIO]  # nothing changed yet
