"""Property tests: no input makes a reader, the spec parser, the config loader or the client raise."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from autolr.chain import build_chain
from autolr.config import ConfigError, load_config
from autolr.control import Control, ControlError, validate_control
from autolr.plugins import policy_classes, reader_classes
from autolr.policy import PolicyError
from autolr.records import Record
from autolr.spec import parse_spec

REGISTRY = policy_classes()
READERS = reader_classes()
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

# A file name each reader claims, relative to a scratch folder.
READER_FILES = {
    "csv": "m.csv",
    "jsonl": "m.jsonl",
    "fit-start": "autolr-fit.jsonl",
    "tensorboard": "events.out.tfevents.1.host",
    "text": "train.log",
    "wandb": "wandb/offline-run-20260101_000000-abc/run-abc.wandb",
    "mlflow-file": "mlruns/0/r1/metrics/loss",
    "hf-trainer-state": "out/checkpoint-10/trainer_state.json",
}


def test_every_registered_file_reader_is_fuzzed():
    assert set(READERS) - {"mlflow"} <= set(READER_FILES)


def read_all(cls, path: Path, chunks: list[bytes]) -> tuple[list[Record], int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    reader = cls(path)
    out: list[Record] = []
    for chunk in chunks:
        with open(path, "ab") as f:
            f.write(chunk)
        while True:
            out += reader.read()
            if not reader.more:
                break
    return out, sum(reader.skipped.values())


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def same(a: list[Record], b: list[Record]) -> bool:
    def key(r):
        return (r.step, r.epoch, r.run, r.restart, sorted((k, repr(v)) for k, v in r.metrics.items()))
    return [key(r) for r in a] == [key(r) for r in b]


SEEDS = {
    "csv": b"epoch,step,loss,val_loss\r\n0,1,2.5,NA\r\n0,2,nan,\r\n",
    "jsonl": b'{"step": 1, "loss": "2.5", "a": {"b": 1}}\n{"step": 2, "loss": NaN}\n',
    "fit-start": b'{"step": -1}\n{"step": 4}\n',
    "text": b"iter 100: loss 2.3450, time 12.34ms\n{'loss': '3.1', 'epoch': 0.5}\r\x1b[2K1/9 \xe2\x94\x81 - loss: 0.3\n",
    "mlflow-file": b"1700000000000 0.5 1\n1700000000001 0.4 2\n",
    "hf-trainer-state": b'{"log_history": [{"loss": 1.0, "step": 5, "epoch": 0.1}]}',
    "tensorboard": b"",
    "wandb": b":W&B\xe1\xbe\x00",
}


@pytest.mark.parametrize("name", sorted(READER_FILES))
@FUZZ
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(min_value=0), max_size=12),
       prefix=st.booleans())
def test_any_bytes_in_any_chunking(tmp_path_factory, name, data, cuts, prefix):
    """Never raises; chunked reads equal a whole read (readers with a snapshot/idle rule aside)."""
    if prefix:
        data = SEEDS[name] + data
    folder = tmp_path_factory.mktemp(name)
    cls = READERS[name]
    whole, _ = read_all(cls, folder / "a" / READER_FILES[name], [data])
    parts, _ = read_all(cls, folder / "b" / READER_FILES[name], chunked(data, cuts))
    if name != "hf-trainer-state":  # a snapshot of a half-written file is legitimately unreadable
        assert same(whole, parts)


@pytest.mark.parametrize("name", ["csv", "jsonl"])
@FUZZ
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(min_value=0), max_size=12),
       prefix=st.booleans())
def test_columns_equal_records_and_the_per_line_path(tmp_path_factory, name, data, cuts, prefix):
    """Block parsing (``read_batch`` columns, ``read`` Records) equals the per-line exact path."""
    if prefix:
        data = SEEDS[name] + data
    folder = tmp_path_factory.mktemp(name)
    exact = type("Exact", (READERS[name],), {"block_parsing": False})
    cls = type("Block", (READERS[name],), {"min_block_lines": 0})  # block parsing even for a line
    ref, ref_skips = read_all(exact, folder / "a" / READER_FILES[name], [data])
    got, skips = read_all(cls, folder / "b" / READER_FILES[name], chunked(data, cuts))
    assert same(got, ref) and skips == ref_skips
    path = folder / "c" / READER_FILES[name]
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    reader, cols = cls(path), []
    while True:
        cols += reader.read_batch().records()
        if not reader.more:
            break
    assert same(cols, ref)


@FUZZ
@given(data=st.binary(max_size=4000))
def test_mlflow_database_reader_never_raises(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("db") / "mlflow.db"
    path.write_bytes(data)
    reader = READERS["mlflow"](path)
    reader.read()
    reader.read()


@FUZZ
@given(text=st.text(max_size=200))
def test_spec_parser_raises_only_policy_errors(text):
    try:
        spec = parse_spec(text)
    except PolicyError:
        return
    try:
        build_chain([spec], REGISTRY)
    except PolicyError:
        pass


@FUZZ
@given(text=st.text(max_size=400))
def test_config_loader_raises_only_config_errors(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "autolr.toml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path)
    except ConfigError:
        return
    try:
        cfg.defaults.chain(REGISTRY)
    except PolicyError:
        pass


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=6),
                    max_leaves=20)
CONTROLISH = st.fixed_dictionaries(
    {"schema": st.sampled_from([1, 2, "1"]), "seq": st.integers(-2, 5) | st.none(),
     "scale": st.floats() | st.integers(-1, 3), "lr": st.none() | st.floats()},
    optional={"apply_at_step": st.integers() | st.none() | st.text(max_size=3), "schedule": JSON})


@FUZZ
@given(obj=JSON | CONTROLISH)
def test_validate_control_accepts_only_usable_records(obj):
    try:
        rec = validate_control(obj)
    except ControlError:
        return
    assert math.isfinite(rec["scale"]) and rec["scale"] > 0
    assert rec["lr"] is None or (math.isfinite(rec["lr"]) and rec["lr"] > 0)


@FUZZ
@given(data=st.binary(max_size=2000) | JSON.map(lambda o: json.dumps(o).encode()) | CONTROLISH.map(
    lambda o: json.dumps(o).encode()), step=st.none() | st.integers(-5, 100))
def test_control_client_never_raises_and_never_returns_a_bad_lr(tmp_path_factory, data, step):
    folder = tmp_path_factory.mktemp("ctl")
    (folder / "autolr.json").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctl = Control(folder)
        lr = ctl.lr(0.1, step=step)
        scale = ctl.scale(step=step)
    assert math.isfinite(lr) and lr > 0 and math.isfinite(scale) and scale > 0


VALUES = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -1.0, 1e308, -1e308, 1e-320])


@FUZZ
@given(values=st.lists(VALUES, min_size=1, max_size=300),
       policy=st.sampled_from(["auto", "plateau", "plateau:method=threshold,patience=1",
                               "auto:increase=true,window=8,every=1,warmup=2", "cosine:T_max=7",
                               "polynomial:total_iters=5", "exponential:gamma=1e-30"]),
       clamp=st.booleans())
def test_learning_rates_are_always_finite_positive_and_clamped(values, policy, clamp):
    chain = build_chain([parse_spec(policy)], REGISTRY, base_lr=0.1,
                        min_lr=1e-4 if clamp else None, max_lr=0.2 if clamp else None)
    state = chain.init()
    lrs = [chain.lr(state)]
    for step, value in enumerate(values):
        state, _ = chain.update(state, Record({"loss": value}, step=step))
        lrs.append(chain.lr(state))
    for lr in lrs:
        assert math.isfinite(lr) and lr > 0
        if clamp:
            assert 1e-4 * (1 - 1e-12) <= lr <= 0.2 * (1 + 1e-12)
