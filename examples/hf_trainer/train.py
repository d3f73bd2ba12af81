"""Hugging Face Trainer + autolr: a tiny GPT-2 (built from a config, nothing downloaded) whose LR
the ``autolr watch`` daemon steers live.

    python examples/hf_trainer/train.py           # starts the daemon itself, on a temp folder

Two-terminal form (the daemon runs on its own, as it would for real jobs)::

    autolr watch runs/ --policy step:step_size=40,gamma=0.5        # terminal 1
    python examples/hf_trainer/train.py --dir runs/ --no-daemon      # terminal 2

What it shows: ``AutolrCallback()`` uses ``args.output_dir`` as its run folder and appends
the Trainer's logs there as ``metrics.jsonl`` (``logging_steps=1``: the daemon sees every
step; ``trainer_state.json`` would only come with checkpoints). Every optimizer step uses the
LR of the Trainer's own linear-warmup schedule × the control file's scale. Each change the
training applied is printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from autolr.integrations.hf import AutolrCallback  # noqa: E402
from autolr.spawn import say, start_watch, stop_watch

DEFAULT_POLICY = ["step:step_size=40,gamma=0.5"]


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 256, length: int = 32, vocab: int = 128):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class PrintChanges(TrainerCallback):
    """Prints each change of autolr's scale, as the optimizer step applied it."""

    def __init__(self, autolr_cb):
        self.autolr_cb, self.scale, self.changes = autolr_cb, 1.0, 0

    def on_step_end(self, args, state, control, **kwargs):
        handle = self.autolr_cb.handle  # what the step just taken used
        if handle is not None and handle.scale != self.scale:
            self.scale = handle.scale
            self.changes += 1
            lr = handle.last_lrs[0]
            say(f"step {state.global_step - 1:4d}: LR {lr:.6g} = your {lr / handle.scale:.6g} x autolr scale "
                  f"{handle.scale:g} (control file #{handle.seq})")



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="folder the daemon watches (default: a new temporary folder)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--policy", action="append", help=f"daemon policy SPEC, repeatable (default {DEFAULT_POLICY})")
    ap.add_argument("--no-daemon", action="store_true", help="an `autolr watch` on --dir is already running")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="autolr-hf-"))
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    daemon = None if args.no_daemon else start_watch(root, "--no-fsync", *[a for spec in args.policy or DEFAULT_POLICY for a in ("--policy", spec)])
    try:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                           bos_token_id=0, eos_token_id=0))
        training_args = TrainingArguments(
            output_dir=str(root / "gpt2-tiny"), max_steps=args.steps, per_device_train_batch_size=8,
            learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=20,
            logging_steps=1,  # a log row per step: what the daemon decides from
            report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
        autolr_cb = AutolrCallback()  # run folder: args.output_dir
        printer = PrintChanges(autolr_cb)
        trainer = Trainer(model=model, args=training_args, train_dataset=RandomTokens(),
                          callbacks=[autolr_cb, printer])
        trainer.remove_callback(PrinterCallback)  # its per-step log dicts would drown the output
        trainer.train()
        print(f"run folder {training_args.output_dir}: {printer.changes} LR changes applied; "
              f"control file {Path(training_args.output_dir) / 'autolr.json'}")
    finally:
        if daemon is not None:
            stop_watch(daemon)
    return 0


if __name__ == "__main__":
    sys.exit(main())
