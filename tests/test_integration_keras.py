"""Keras 3 (torch backend): AutolrCallback while the real daemon reads the callback's per-batch log."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
pytest.importorskip("torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() not in ("torch", "tensorflow"):
    pytest.skip(f"Keras backend {keras.backend.backend()} is not supported by the callback", allow_module_level=True)

from autolr.integrations.keras import AutolrCallback, ScaledSchedule  # noqa: E402

from .framework_util import check_applied, daemon, daemon_log, journal_summary, late_warnings, torch_threads, wait_control  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BASE_LR = 0.05
EPOCHS, BATCHES = 10, 15  # 150 optimizer steps


class RecordingSGD(keras.optimizers.SGD):
    """SGD that records, inside ``apply``, the LR each update uses."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[int, float] = {}

    def apply(self, grads, trainable_variables=None):
        self.seen[int(self.iterations.numpy())] = float(keras.ops.convert_to_numpy(self.learning_rate))
        return super().apply(grads, trainable_variables)


class Pace(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.008)  # a batch that takes some time, as real ones do


def user_epoch_lr(epoch: int) -> float:
    return BASE_LR * 0.9 ** epoch


def fit(run, optimizer, extra_callbacks=()):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCHES * 16, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    cb = AutolrCallback(run, log_metrics=True)
    model.fit(x, y, batch_size=16, epochs=EPOCHS, verbose=0, shuffle=False,
              callbacks=[*extra_callbacks, cb, Pace()])
    return model, cb


@pytest.mark.parametrize("lr_kind", ["float", "schedule"])
def test_keras_callback_follows_the_daemon(tmp_path, lr_kind):
    root = tmp_path / "runs"
    run = root / "exp"
    if lr_kind == "float":  # the user's own per-epoch scheduler keeps working: both multiply
        optimizer = RecordingSGD(BASE_LR, momentum=0.9)
        # Relative to the LR it reads: it must read the user's LR, not autolr's scaled one.
        extra = [keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.9 if epoch else lr)]
        user = {s: user_epoch_lr(s // BATCHES) for s in range(EPOCHS * BATCHES)}
    else:
        schedule = keras.optimizers.schedules.ExponentialDecay(BASE_LR, decay_steps=50, decay_rate=0.5)
        optimizer = RecordingSGD(schedule)
        extra = []
        user = {s: float(keras.ops.convert_to_numpy(schedule(s))) for s in range(EPOCHS * BATCHES)}
    with daemon(root), torch_threads(1):
        with late_warnings() as late:
            model, cb = fit(run, optimizer, extra)
        wait_control(run)
    assert sorted(optimizer.seen) == list(range(EPOCHS * BATCHES))
    try:
        check_applied(run, optimizer.seen, user, late=late)
    except AssertionError:
        print(daemon_log(root), journal_summary(run))
        raise
    # After the fit the optimizer holds the user's LR (or schedule) again, without autolr's factor.
    if lr_kind == "float":
        assert float(optimizer.learning_rate.numpy()) == pytest.approx(user_epoch_lr(EPOCHS - 1))
    else:
        assert optimizer._learning_rate is schedule
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == EPOCHS * BATCHES


def test_base_lr_with_a_schedule_is_refused(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)),
                  loss="mse")
    with pytest.raises(ValueError, match="base_lr"):
        model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0,
                  callbacks=[AutolrCallback(tmp_path / "run", base_lr=0.1)])


def test_scaled_schedule_serialises(tmp_path):
    inner = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    wrapped = ScaledSchedule(inner)
    wrapped.scale.assign(0.5)
    assert float(keras.ops.convert_to_numpy(wrapped(10))) == pytest.approx(0.025)
    back = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(wrapped))
    assert isinstance(back, ScaledSchedule)
    assert float(keras.ops.convert_to_numpy(back(10))) == pytest.approx(0.05)  # the scale starts at 1


def test_logged_loss_is_each_batch_own_not_the_running_mean(tmp_path):
    """Keras's batch logs carry the epoch's running mean; the log holds each batch's own loss.

    A model that predicts 0 and never changes (SGD at LR 0) makes every batch's MSE known in
    advance: mean(y_batch²). (``steps_per_execution`` > 1, where a call covers several batches,
    is refused by the torch backend; :func:`batch_loss`'s arithmetic for it is checked below.)
    """
    from autolr.integrations.keras import batch_loss

    run = tmp_path / "run"
    rng = np.random.default_rng(1)
    batch, batches, epochs = 8, 12, 3
    x = rng.normal(size=(batch * batches, 4)).astype("float32")
    y = (rng.normal(size=(batch * batches, 1)) * np.linspace(0.5, 3.0, batch * batches)[:, None]).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, kernel_initializer="zeros", use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    seen = []

    class Running(keras.callbacks.Callback):
        def on_train_batch_end(self, b, logs=None):
            seen.append(float(logs["loss"]))

    with torch_threads(1):
        model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=False,
                  callbacks=[AutolrCallback(run, log_metrics=True), Running()])
    own = (y.reshape(batches, batch) ** 2).mean(axis=1)  # each batch's MSE of a zero prediction
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in rows if "loss" in r]
    assert len(logged) == epochs * batches
    assert np.allclose(logged, np.tile(own, epochs), rtol=1e-5)
    # ... where Keras itself reports the running mean, which the check above would fail on
    running = np.cumsum(own) / np.arange(1, batches + 1)
    assert np.allclose(seen, np.tile(running, epochs), rtol=1e-5)
    assert not np.allclose(seen, np.tile(own, epochs), rtol=1e-2)
    # the arithmetic alone: equal batches, every batch, then a block of 2
    assert batch_loss(2.0, 0, None) == (2.0, (0, 2.0))
    assert batch_loss(3.0, 1, (0, 2.0))[0] == pytest.approx(4.0)  # (2·3 - 1·2) / 1
    assert batch_loss(5.0, 3, (1, 3.0))[0] == pytest.approx(7.0)  # (4·5 - 2·3) / 2


def test_auto_on_a_keras_csvlogger_log_works_in_epochs(tmp_path):
    """Keras's CSVLogger writes one row per epoch and no step: `auto`'s counter is the epoch.
    Its warmup is then the first epoch (it was 100 epochs: after 30 the LR was at 37 %), and it
    decides over ``epoch_window`` epochs (it needed 100 rows before its first test)."""
    from autolr.config import Settings
    from autolr.plugins import policy_classes, reader_classes
    from autolr.replay import replay_log

    rng = np.random.default_rng(2)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1)) + 0.5 * rng.normal(size=(256, 1))).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    log = tmp_path / "run" / "training.csv"
    log.parent.mkdir()
    with torch_threads(1):
        model.fit(x, y, batch_size=32, epochs=40, verbose=0, validation_split=0.25,
                  callbacks=[keras.callbacks.CSVLogger(str(log))])
    lines = list(replay_log(log, Settings(), policy_classes(), reader_classes(), every_row=True))
    scales = [line["scale"] for line in lines[1:]]  # after each epoch's row
    assert len(scales) == 40 and lines[0]["scale"] == pytest.approx(0.1)  # epoch 0 at warmup_start
    assert scales[0] == 1.0  # the warmup ended with the first epoch
    # a linear model converges within a few epochs: its val_loss is flat noise from then on,
    # and auto decays it, at the earliest once epoch_window epochs are in its window
    cuts = [i for i in range(1, 40) if scales[i] < scales[i - 1]]
    assert cuts and cuts[0] >= 10
