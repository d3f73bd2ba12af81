"""Console text reader: real Keras 3 and transformers output, literal lines of the other formats."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autolr.readers import base as basemod, text as textmod
from autolr.readers.base import MAX_LINE
from autolr.readers.text import TextReader

KERAS_EPOCHS, KERAS_STEPS = 3, 12

KERAS_SCRIPT = textwrap.dedent(f"""
    import json, sys
    import keras, numpy as np
    keras.utils.set_random_seed(0)
    x = np.random.rand(256, 4).astype("float32")
    y = (x.sum(1) > 2).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    hist = model.fit(x, y, epochs={KERAS_EPOCHS}, batch_size=16, verbose=1, validation_split=0.25)
    sys.stdout.flush()
    json.dump(hist.history, open(sys.argv[1], "w"))
""")

HF_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import Trainer, TrainingArguments

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, labels=None):
            out = self.lin(x).squeeze(-1)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            x = torch.rand(4, generator=torch.Generator().manual_seed(i))
            return {"x": x, "labels": x.sum()}

    args = TrainingArguments(output_dir=sys.argv[2], per_device_train_batch_size=8, num_train_epochs=2,
                             logging_steps=2, report_to="none", save_strategy="no", use_cpu=True,
                             eval_strategy="epoch", disable_tqdm=False)
    trainer = Trainer(model=Model(), args=args, train_dataset=Data(), eval_dataset=Data())
    trainer.train()
    sys.stdout.flush()
    json.dump(trainer.state.log_history, open(sys.argv[1], "w"))
""")


def start_script(script: str, root: Path, *args: str, **env: str) -> subprocess.Popen:
    """Start ``script`` with stdout and stderr redirected to ``root/console.log``."""
    with open(root / "console.log", "wb") as out:
        return subprocess.Popen([sys.executable, "-c", script, *args], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **env), cwd=root)


def finish(proc: subprocess.Popen | None, root: Path):
    if proc is None:
        pytest.skip("not installed")
    assert proc.wait(timeout=180) == 0, (root / "console.log").read_text(errors="replace")[-2000:]
    return root / "console.log", json.loads((root / "history.json").read_text())


def installed(*names: str) -> bool:
    """Without importing (importing keras in this process would pick the TensorFlow backend)."""
    return all(importlib.util.find_spec(n) is not None for n in names)


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> dict:
    """Both real trainings, started together (they take seconds each, mostly imports)."""
    runs = {}
    root = tmp_path_factory.mktemp("keras")
    runs["keras"] = root, (start_script(KERAS_SCRIPT, root, str(root / "history.json"), KERAS_BACKEND="torch")
                           if installed("keras", "torch") else None)
    root = tmp_path_factory.mktemp("hf")
    runs["hf"] = root, (start_script(HF_SCRIPT, root, str(root / "history.json"), str(root / "out"),
                                     TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
                        if installed("transformers", "torch") else None)
    yield runs
    for _, proc in runs.values():
        if proc is not None and proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def keras_run(real_runs) -> tuple[Path, dict]:
    root, proc = real_runs["keras"]
    return finish(proc, root)


@pytest.fixture(scope="module")
def hf_run(real_runs) -> tuple[Path, list]:
    root, proc = real_runs["hf"]
    return finish(proc, root)


def read_all(reader: TextReader) -> list:
    out = reader.read()
    while reader.more:
        out += reader.read()
    return out


def read_text(tmp_path: Path, content: str | bytes, **kw) -> list:
    path = tmp_path / "train.log"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return read_all(TextReader(path, **kw))


def as_tuples(records) -> list[tuple]:
    return [(r.step, r.epoch, tuple(sorted((k, "nan" if v != v else v) for k, v in r.metrics.items())))
            for r in records]


def grow_and_read(content: bytes, path: Path, cuts: list[int], *, resume: bool = False) -> list:
    """Write ``content`` in pieces ending at ``cuts``, reading after each (optionally resuming
    each time from the JSON-round-tripped state of a fresh reader)."""
    path.write_bytes(b"")
    reader = TextReader(path)
    out = []
    with open(path, "ab") as f:
        for a, b in zip([0, *cuts], [*cuts, len(content)]):
            f.write(content[a:b])
            f.flush()
            if resume:
                state = json.loads(json.dumps(reader.get_state()))
                reader = TextReader(path)
                reader.set_state(state)
            out += read_all(reader)
    return out


# --- real Keras 3 output ---------------------------------------------------------------------

def test_keras_progress_bar_real_output(keras_run):
    log, history = keras_run
    raw = log.read_bytes()
    assert b"\x1b[" in raw and b"\b" in raw and b"\r" in raw and "━".encode() in raw
    records = read_all(TextReader(log))
    assert [r.epoch for r in records] == [0.0, 1.0, 2.0]
    assert [r.step for r in records] == [KERAS_STEPS * (e + 1) for e in range(KERAS_EPOCHS)]
    for e, record in enumerate(records):
        assert set(record.metrics) == set(history)
        for key, values in history.items():
            assert record.metrics[key] == pytest.approx(values[e], abs=6e-5)


def test_keras_every_split_point(keras_run, tmp_path: Path):
    log, _ = keras_run
    content = log.read_bytes()
    whole = as_tuples(read_all(TextReader(log)))
    path = tmp_path / "k.log"
    for cut in range(1, len(content)):
        assert as_tuples(grow_and_read(content, path, [cut], resume=cut % 2 == 0)) == whole, cut


# --- real transformers Trainer output -------------------------------------------------------

def test_hf_trainer_real_output(hf_run, tmp_path: Path):
    log, history = hf_run
    raw = log.read_bytes()
    assert b"\r" in raw and b"it/s]" in raw  # tqdm bars interleaved with the dict prints
    records = read_all(TextReader(log))
    assert len(records) == len(history)
    for record, entry in zip(records, history):
        entry = {k: v for k, v in entry.items() if k not in ("step", "total_flos")}  # not printed
        assert record.epoch == pytest.approx(entry.pop("epoch"))
        assert record.step is None
        assert set(record.metrics) == set(entry)
        for key, value in entry.items():
            assert record.metrics[key] == pytest.approx(value, rel=2e-3, abs=1e-4)


def test_hf_random_chunks(hf_run, tmp_path: Path):
    log, _ = hf_run
    content = log.read_bytes()
    whole = as_tuples(read_all(TextReader(log)))
    rng = random.Random(1)
    for i in range(30):
        cuts = sorted(rng.sample(range(1, len(content)), rng.randint(1, 60)))
        assert as_tuples(grow_and_read(content, tmp_path / "h.log", cuts, resume=i % 2 == 0)) == whole


# --- literal lines of the other formats -----------------------------------------------------

def test_nanogpt(tmp_path: Path):
    records = read_text(tmp_path, (
        "number of parameters: 10.65M\n"
        "step 0: train loss 4.2874, val loss 4.2823\n"
        "iter 0: loss 4.2649, time 12345.67ms, mfu -100.00%\n"
        "iter 10: loss 3.1416, time 12.34ms, mfu 1.23%\n"
        "step 500: train loss 1.2345, val loss 1.3456\n"
        "saving checkpoint to out-shakespeare-char\n"
    ))
    assert as_tuples(records) == [
        (0, None, (("train_loss", 4.2874), ("val_loss", 4.2823))),
        (0, None, (("loss", 4.2649), ("mfu", -100.0), ("time_ms", 12345.67))),
        (10, None, (("loss", 3.1416), ("mfu", 1.23), ("time_ms", 12.34))),
        (500, None, (("train_loss", 1.2345), ("val_loss", 1.3456))),
    ]


def test_hf_dicts_quoted_bare_and_ranks(tmp_path: Path):
    records = read_text(tmp_path, (
        "{'loss': 2.8485, 'grad_norm': 3.38, 'learning_rate': 4.85e-05, 'epoch': 0.03}\n"
        "{'loss': '3.106', 'grad_norm': '6.013', 'learning_rate': '4.688e-05', 'epoch': '0.25'}\n"
        "0: {'loss': nan, 'learning_rate': '1e-05', 'epoch': '0.5'}\n"
        "1: {'loss': 9.99, 'epoch': '0.5'}\n"
        "[rank1]: {'loss': 9.99, 'epoch': '0.5'}\n"
        "{'eval_loss': '3.501', 'eval_runtime': '0.0026', 'epoch': '1'}\n"
        "config: {'lr': 0.1}\n"
        "[default1]:{'loss': 9.99, 'epoch': '0.5'}\n"  # torchrun --tee: [role + local rank]:, no space
        "[default0]:{'loss': 1.5, 'epoch': '1.5'}\n"
    ))
    assert as_tuples(records) == [
        (None, 0.03, (("grad_norm", 3.38), ("learning_rate", 4.85e-05), ("loss", 2.8485))),
        (None, 0.25, (("grad_norm", 6.013), ("learning_rate", 4.688e-05), ("loss", 3.106))),
        (None, 0.5, (("learning_rate", 1e-05), ("loss", "nan"))),
        (None, 1.0, (("eval_loss", 3.501), ("eval_runtime", 0.0026))),
        (None, 1.5, (("loss", 1.5),)),
    ]


def test_fairseq_json(tmp_path: Path):
    records = read_text(tmp_path, (
        '2026-01-01 10:00:00 | INFO | fairseq_cli.train | begin training epoch 1\n'
        '2026-01-01 10:00:05 | INFO | train_inner | {"epoch": 1, "update": 0.001, "loss": "16.475", '
        '"lr": "2e-05", "num_updates": "1", "wall": "5"}\n'
        '2026-01-01 10:09:00 | INFO | valid | {"epoch": 1, "valid_loss": "9.5", "valid_ppl": "724.08", '
        '"valid_num_updates": "100"}\n'
        '2026-01-01 10:09:01 | INFO | train | {"epoch": 1, "train_loss": "10.1", "train_num_updates": "100"}\n'
        '2026-01-01 10:09:02 | INFO | broken | {"epoch": 1, "loss": \n'
    ))
    assert as_tuples(records) == [
        (1, 0.001, (("loss", 16.475), ("lr", 2e-05), ("wall", 5.0))),  # update: progress
        (100, 1.0, (("valid_loss", 9.5), ("valid_ppl", 724.08))),
        (100, 1.0, (("train_loss", 10.1),)),
    ]


def test_keras_literal_redraws_ansi_and_keras2(tmp_path: Path):
    bar = "\x1b[1m{n}/4\x1b[0m \x1b[32m━━━━\x1b[0m \x1b[1m0s\x1b[0m 3ms/step - loss: {loss}"
    content = (
        "Epoch 1/2\r\n"
        + "\r" + bar.format(n=1, loss="0.9") + "\b" * 30 + "\r" + bar.format(n=4, loss="0.5") + "\n"
        + "Epoch 2/2\n"
        + "\r" + bar.format(n=2, loss="0.45") + "\r" + bar.format(n=4, loss="0.4") + " - val_loss: 0.41\r\n"
        + "Epoch 1/1\n"  # a second fit()
        + "10/10 [==============================] - ETA: 1:23 - loss: 0.3 - lr: 1.0000e-03\n"
    )
    assert as_tuples(read_text(tmp_path, content)) == [
        (4, 0.0, (("loss", 0.5),)),
        (8, 1.0, (("loss", 0.4), ("val_loss", 0.41))),
        (10, 0.0, (("loss", 0.3), ("lr", 0.001))),
    ]


def test_user_patterns(tmp_path: Path):
    content = "E3 S120 loss=0.5 acc=n/a\n1: E3 S121 loss=0.4 acc=0.9\niter 5: loss 1.0\n"
    pattern = r"E(?P<epoch>\d+) S(?P<step>\d+) loss=(?P<train__loss>\S+) acc=(?P<acc>\S+)"
    assert as_tuples(read_text(tmp_path, content, patterns=[pattern])) == [
        (120, 3.0, (("train/loss", 0.5),)),
        (121, 3.0, (("acc", 0.9), ("train/loss", 0.4))),
        (5, None, (("loss", 1.0),)),  # the built-ins still apply
    ]
    cls = TextReader.configured([pattern])
    assert issubclass(cls, TextReader) and cls.name == "text"
    path = tmp_path / "train.log"
    assert len(read_all(cls(path))) == 3
    with pytest.raises(Exception):
        TextReader.configured(["(unclosed"])


# --- tailing, state, robustness -------------------------------------------------------------

MIXED = (
    "Epoch 1/2\r\n"
    "\r\x1b[1m1/2\x1b[0m \x1b[32m━━━━━━\x1b[0m 1s - loss: 0.9\b\b\b\b\r\x1b[1m2/2\x1b[0m ━━━━━━ 1s - loss: 0.8\r\n"
    "ünïcödé noise ━━ 100%|█████| 3/3 [00:01<00:00]\r"
    "{'loss': '3.106', 'epoch': '0.25'}\r\n"
    "iter 10: loss 3.1416, time 12.34ms, mfu 1.23%\n"
    "x | INFO | train_inner | {\"loss\": \"2.5\", \"num_updates\": \"7\"}\r\n"
    "\x1b]0;title\x07step 20: train loss 1.5, val loss 1.6\n"
).encode()


def test_mixed_file_random_and_tricky_splits(tmp_path: Path):
    whole = as_tuples(read_text(tmp_path, MIXED))
    assert len(whole) == 5
    tricky = [i for i in range(1, len(MIXED)) if MIXED[i - 1] in b"\r\x1b\xe2\x94\xc3\b" or MIXED[i] in b"\n\x1b"]
    path = tmp_path / "m.log"
    for cut in tricky:
        assert as_tuples(grow_and_read(MIXED, path, [cut], resume=True)) == whole, cut
    rng = random.Random(5)
    for i in range(100):
        cuts = sorted(rng.sample(range(1, len(MIXED)), rng.randint(1, 40)))
        assert as_tuples(grow_and_read(MIXED, path, cuts, resume=i % 3 == 0)) == whole


def test_unfinished_line_waits_for_its_newline(tmp_path: Path):
    path = tmp_path / "train.log"
    path.write_bytes(b"iter 1: loss 2.0\niter 2: loss 1.9")
    reader = TextReader(path)
    assert [r.step for r in reader.read()] == [1]
    assert reader.read() == []
    with open(path, "ab") as f:
        f.write(b"\n")
    assert [r.step for r in reader.read()] == [2]


def test_garbage_and_binary_never_raise(tmp_path: Path):
    rng = random.Random(11)
    blobs = [rng.randbytes(50_000) for _ in range(5)]
    blobs += [b"\x00" * 10_000, b"\xff\xfe" * 5000 + b"\n", b"\r" * 5000, b"\b\r\n" * 3000,
              b"\x1b[" * 5000 + b"\n", b"{'" * 3000 + b"}\n", b'{"' * 3000 + b"\n",
              b"1/2 - " * 3000 + b"\n", b"Epoch 99999999999999999999/1\n1/1 - loss: 1\n"]
    for i, blob in enumerate(blobs):
        path = tmp_path / f"g{i}.log"
        path.write_bytes(blob)
        read_all(TextReader(path))
        grow_and_read(blob, tmp_path / f"c{i}.log", sorted(rng.sample(range(1, len(blob)), 20)))


def test_over_long_lines_are_skipped_and_counted(tmp_path: Path):
    path = tmp_path / "train.log"
    big = b"x" * (MAX_LINE + 10)
    path.write_bytes(b"iter 1: loss 2.0\n" + big + b"\niter 2: loss 1.9\n" + big + b"\r" + big + b"\n")
    reader = TextReader(path)
    assert [r.step for r in read_all(reader)] == [1, 2]
    assert reader.skipped["over-long line"] >= 2
    # no line end at all: read in bounded pieces, then resumes after the next line end
    path2 = tmp_path / "t2.log"
    path2.write_bytes(big + big)
    reader = TextReader(path2)
    assert read_all(reader) == []
    with open(path2, "ab") as f:
        f.write(b"tail\niter 3: loss 1.0\n")
    assert [r.step for r in read_all(reader)] == [3]


def test_small_read_block(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(basemod, "READ_BLOCK", 50)  # the tailer is base.TextTailer
    content = b"".join(b"iter %d: loss 1.5\n" % i for i in range(100))
    path = tmp_path / "train.log"
    path.write_bytes(content)
    reader = TextReader(path)
    assert [r.step for r in read_all(reader)] == list(range(100))


def test_replaced_file_starts_over(tmp_path: Path):
    path = tmp_path / "train.log"
    path.write_bytes(b"Epoch 5/9\n4/4 - loss: 0.5\n")
    reader = TextReader(path)
    assert [(r.step, r.epoch) for r in reader.read()] == [(20, 4.0)]
    fresh = tmp_path / "fresh.log"
    fresh.write_bytes(b"4/4 - loss: 0.4\n")
    fresh.replace(path)
    assert [(r.step, r.epoch) for r in reader.read()] == [(4, None)]
    assert reader.restarted


def test_matches_and_run_dir(tmp_path: Path):
    for name in ("train.log", "slurm-123.out", "stdout.txt", "output.log", "TRAIN.LOG"):
        assert TextReader.matches(tmp_path / name), name
    for name in ("metrics.csv", "log.jsonl", "requirements.txt", "run-x.wandb", "vocab.txt"):
        assert not TextReader.matches(tmp_path / name), name
    run = tmp_path / "wandb" / "run-20260101_120000-abc123"
    assert TextReader.matches(run / "files" / "output.log")
    assert TextReader.run_dir(run / "files" / "output.log") == run
    assert not TextReader.matches(run / "files" / "notes.txt")
    assert not TextReader.matches(run / "logs" / "debug.log")
    assert not TextReader.matches(tmp_path / "wandb" / "debug-internal.log")
    assert TextReader.run_dir(tmp_path / "job" / "train.log") == tmp_path / "job"
    got = []
    textmod.register_readers(register=got.append)
    assert got == [TextReader]


def test_quick_on_noise(tmp_path: Path):
    """Many lines that match nothing go through the substring pre-checks only."""
    noise = b"".join(b"[2026-01-01 00:00:%02d] worker %d: loading shard, please wait\n" % (i % 60, i)
                     for i in range(100_000))
    path = tmp_path / "noise.log"
    path.write_bytes(noise + b"iter 7: loss 0.1\n")
    assert [r.step for r in read_all(TextReader(path))] == [7]


def test_long_line_of_short_redraws(tmp_path: Path):
    redraws = b"".join(b"\r%d/100000 - loss: 0.5" % i for i in range(100_000))
    assert len(redraws) > MAX_LINE
    records = read_text(tmp_path, redraws + b"\r100000/100000 - loss: 0.25\r\n")
    assert as_tuples(records) == [(100000, None, (("loss", 0.25),))]


def test_truncated_and_rewritten_past_the_offset(tmp_path: Path):
    """``python train.py > train.log`` run again: same inode, already longer than before."""
    path = tmp_path / "train.log"
    path.write_bytes(b"iter 1: loss 2.0\niter 2: loss 1.9\n")
    reader = TextReader(path)
    assert [r.step for r in reader.read()] == [1, 2]
    state = json.loads(json.dumps(reader.get_state()))
    with open(path, "r+b") as f:  # truncate and rewrite in place
        f.truncate(0)
        f.write(b"iter 100: loss 5.0\niter 200: loss 4.0\niter 300: loss 3.0\n")
    resumed = TextReader(path)
    resumed.set_state(state)
    assert [r.step for r in resumed.read()] == [100, 200, 300]
    assert resumed.restarted
