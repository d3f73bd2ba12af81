"""Hugging Face Trainer: AutolrCallback on a tiny GPT-2 built from a config (no download)."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from autolr.integrations.hf import AutolrCallback  # noqa: E402

from .framework_util import MARGIN, check_applied, daemon, daemon_log, journal_summary, late_warnings, torch_threads  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

LR, STEPS, WARMUP = 1e-3, 150, 10


def linear_warmup(step: int) -> float:
    """The Trainer's own linear schedule with warmup (``get_linear_schedule_with_warmup``)."""
    if step < WARMUP:
        return step / WARMUP
    return max(0.0, (STEPS - step) / (STEPS - WARMUP))


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 16, vocab: int = 64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Probe(TrainerCallback):
    """Records, in a step pre-hook after autolr's, the LR each optimizer step really uses."""

    def __init__(self):
        self.applied: dict[int, float] = {}
        self.scheduler: dict[int, float] = {}

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        inner = optimizer.optimizer  # inside Accelerate's wrapper, as autolr's hooks are

        def record(opt, a, k):
            self.applied[state.global_step] = opt.param_groups[0]["lr"]
            self.scheduler[state.global_step] = lr_scheduler.get_last_lr()[0]
        inner.register_step_pre_hook(record)

    def on_step_end(self, args, state, control, **kwargs):
        import time
        time.sleep(0.005)  # a step that takes some time, as real ones do


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def test_hf_trainer_follows_the_daemon(tmp_path):
    root = tmp_path / "runs"
    run = root / "gpt2-tiny"
    args = TrainingArguments(output_dir=str(run), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=LR, lr_scheduler_type="linear", warmup_steps=WARMUP,
                             logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0)
    cb, probe = AutolrCallback(), Probe()
    with daemon(root), torch_threads(1):
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=RandomTokens(), callbacks=[cb, probe])
        with late_warnings() as late:
            trainer.train()
    assert cb.run_path == run  # the default: args.output_dir
    assert cb.handle is None  # detached at train end
    assert sorted(probe.applied) == list(range(STEPS))
    user = {s: LR * linear_warmup(s) for s in range(STEPS)}
    assert all(probe.scheduler[s] == pytest.approx(user[s], abs=1e-12) for s in range(STEPS))
    applied = {s: v for s, v in probe.applied.items() if user[s] > 0}
    try:
        journal = check_applied(run, applied, user, late=late)
    except AssertionError:
        print(daemon_log(root), journal_summary(run))
        raise
    decisions = [e for e in journal if e["kind"] == "decision"]
    assert all(e["apply_at_step"] >= e["step"] + MARGIN for e in decisions)
    # The daemon read the callback's JSONL: one row per Trainer log (logging_steps=1).
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(STEPS))  # the index of the step just done
    # After training, the optimizer holds the scheduler's LR, without autolr's factor.
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.lr_scheduler.get_last_lr()[0])


def test_a_warmup_is_followed_step_by_step_with_logs_every_50_steps(tmp_path):
    """``logging_steps=50``: the callback's start row lets the daemon list the warmup ahead from
    the first step, and each record lists the steps to the next logs; before, the steps up to
    the first log ran at the Trainer's own LR and the warmup moved in 50-step stairs."""
    root = tmp_path / "runs"
    run = root / "gpt2-tiny"
    warmup, steps = 80, 120
    args = TrainingArguments(output_dir=str(run), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=LR, lr_scheduler_type="constant", logging_steps=50, report_to="none",
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    cb, probe = AutolrCallback(), Probe()
    with daemon(root, "--no-fsync", "--policy", f"warmup:steps={warmup},start_factor=0.1"), torch_threads(1):
        Trainer(model=tiny_gpt2(), args=args, train_dataset=RandomTokens(), callbacks=[cb, probe]).train()
    scale = {s: probe.applied[s] / LR for s in range(steps)}
    wrong = [s for s in range(steps) if scale[s] != pytest.approx(0.1 + 0.9 * min(s, warmup) / warmup, rel=1e-9)]
    # the first steps may run before the daemon has read the fit's start (a few ms)
    assert not wrong or max(wrong) < 20, (wrong, daemon_log(root), journal_summary(run))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": -1} and [r["step"] for r in rows if "loss" in r] == [49, 99]
