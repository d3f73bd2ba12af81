"""Lightning: AutolrCallback while the real daemon reads the Lightning CSVLogger's metrics.csv."""
from __future__ import annotations

import time
import warnings

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from autolr.control import ControlWriter, read_journal  # noqa: E402
from autolr.integrations.lightning import AutolrCallback  # noqa: E402

from .framework_util import MARGIN, check_applied, daemon, daemon_log, journal_summary, late_warnings, torch_threads  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

BASE_LR = 0.05


def user_lambda(step: int) -> float:
    """The user's own in-process schedule (a LambdaLR stepped every optimizer step)."""
    return 1.0 / (1.0 + 0.01 * step)


class Regression(L.LightningModule):
    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.lin = torch.nn.Linear(8, 1)
        self.delay = delay

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.lin(x), y)
        self.log("loss", loss)
        if self.delay:
            time.sleep(self.delay)  # a step that takes some time, as real ones do
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=BASE_LR, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, user_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Probe(L.Callback):
    """Records the LR each optimizer step really uses: a step pre-hook after autolr's."""

    def __init__(self):
        self.applied: dict[int, float] = {}

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        opt.register_step_pre_hook(
            lambda o, args, kwargs: self.applied.__setitem__(trainer.global_step, o.param_groups[0]["lr"]))


def data(n: int = 4096) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)


def trainer(root, callbacks, max_steps: int, **kw) -> L.Trainer:
    kw = {"enable_checkpointing": False, **kw}
    return L.Trainer(max_steps=max_steps, callbacks=callbacks,
                     logger=CSVLogger(root, name="exp", version=0, flush_logs_every_n_steps=1),
                     log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", devices=1, **kw)


def test_lightning_callback_follows_the_daemon(tmp_path):
    root = tmp_path / "runs"
    steps = 160
    with daemon(root), torch_threads(1):
        cb, probe = AutolrCallback(), Probe()
        t = trainer(root, [cb, probe], steps)
        with late_warnings() as late:
            t.fit(Regression(delay=0.008), data())
        run = root / "exp" / "version_0"
        assert cb.run_path == run  # the default: the logger's folder, where metrics.csv is
        assert (run / "metrics.csv").exists()
    assert cb.handles == []  # detached at the end of the fit
    user = {s: BASE_LR * user_lambda(s) for s in range(steps)}
    assert sorted(probe.applied) == list(range(steps))
    try:
        journal = check_applied(run, probe.applied, user, late=late)
    except AssertionError:
        print(daemon_log(root), journal_summary(run))
        raise
    # The daemon decided from Lightning's own CSV rows: step-policy decisions every 25 steps.
    decisions = [e for e in journal if e["kind"] == "decision"]
    assert all(e["policy"] == "step" for e in decisions)
    assert all(e["apply_at_step"] >= e["step"] + MARGIN for e in decisions)
    # After the fit the optimizer holds the user's LR, without autolr's factor.
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(BASE_LR * user_lambda(steps))


def test_resumed_fit_keeps_the_step_clock(tmp_path):
    """A fit resumed from a checkpoint starts the clock at its global step: changes land on time."""
    run = tmp_path / "run"
    writer = ControlWriter(run, fsync=False)
    writer.publish_many([  # as the daemon publishes them: the file's schedule lists both changes
        dict(scale=1.0, lr=None, step=None, policy="", reason="initial", kind="initial", apply_at_step=None),
        dict(scale=0.5, lr=None, step=20, policy="step", reason="test", apply_at_step=25),
        dict(scale=0.25, lr=None, step=30, policy="step", reason="test", apply_at_step=35)])
    model = Regression()
    first = trainer(tmp_path / "logs", [AutolrCallback(run)], 20, enable_checkpointing=True,
                    default_root_dir=tmp_path)
    first.fit(model, data())
    ckpt = tmp_path / "first.ckpt"
    first.save_checkpoint(ckpt)
    cb, probe = AutolrCallback(run), Probe()
    second = trainer(tmp_path / "logs", [cb, probe], 40)
    second.fit(Regression(), data(), ckpt_path=ckpt)
    assert sorted(probe.applied) == list(range(20, 40))
    scale = {s: probe.applied[s] / (BASE_LR * user_lambda(s)) for s in probe.applied}
    assert all(scale[s] == pytest.approx(1.0) for s in range(20, 25))
    assert all(scale[s] == pytest.approx(0.5) for s in range(25, 35))
    assert all(scale[s] == pytest.approx(0.25) for s in range(35, 40))
    # each fit noted where it starts: the last step done (a new fit: -1)
    assert (run / "autolr-fit.jsonl").read_text().split() == ['{"step":-1}', '{"step":19}']


class TwoOptimizers(L.LightningModule):
    """Manual optimization, a GAN's shape: A steps once a batch, B (the critic) three times."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for opt, lin, times in ((opt_a, self.a, 1), (opt_b, self.b, 3)):
            for _ in range(times):
                loss = torch.nn.functional.mse_loss(lin(x), y)
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
        self.log("loss", loss)

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=BASE_LR), torch.optim.SGD(self.b.parameters(), lr=BASE_LR)]


def test_two_optimizers_take_each_change_at_the_logged_step(tmp_path):
    """Regression (a helper's audit): with manual optimization and two optimizers each handle
    counted its own steps from ``global_step`` (which counts both optimizers' steps: 2 a batch
    and more), while the rows carry one step a batch: changes landed early (by 10 batches of a
    critic stepping 3 times a batch), and after a resume at twice the step. Every step now
    takes the change in force at the step Lightning logs for its batch, in a resumed fit too."""
    run = tmp_path / "run"
    ControlWriter(run, fsync=False).publish_many([
        dict(scale=1.0, lr=None, step=None, policy="", reason="initial", kind="initial", apply_at_step=None),
        dict(scale=0.5, lr=None, step=5, policy="step", reason="test", apply_at_step=10),
        dict(scale=0.25, lr=None, step=20, policy="step", reason="test", apply_at_step=25)])
    used: list[tuple[int, int, float]] = []

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            for k, opt in enumerate(trainer.optimizers):
                opt.register_step_pre_hook(lambda o, args, kwargs, k=k: used.append(
                    (k, trainer.fit_loop.epoch_loop._batches_that_stepped, o.param_groups[0]["lr"] / BASE_LR)))

    first = trainer(tmp_path / "logs", [AutolrCallback(run), Record()], -1, max_epochs=1, limit_train_batches=15,
                    enable_checkpointing=True, default_root_dir=tmp_path)
    first.fit(TwoOptimizers(), data())
    first.save_checkpoint(tmp_path / "first.ckpt")
    trainer(tmp_path / "logs", [AutolrCallback(run), Record()], -1, max_epochs=2, limit_train_batches=15).fit(
        TwoOptimizers(), data(), ckpt_path=tmp_path / "first.ckpt")
    want = {b: 1.0 if b < 10 else 0.5 if b < 25 else 0.25 for b in range(30)}
    assert sorted({b for _, b, _ in used}) == list(range(30))
    assert [(k, b, scale) for k, b, scale in used if scale != pytest.approx(want[b])] == []
    assert sum(k == 1 for k, _, _ in used) == 3 * sum(k == 0 for k, _, _ in used)
    # each fit noted where it starts in the logged steps (a helper's audit: the resumed fit's
    # was one step early, read at train start, before Lightning sets the resumed batch count)
    assert (run / "autolr-fit.jsonl").read_text().split() == ['{"step":-1}', '{"step":14}']


def test_a_fit_resumed_mid_epoch_notes_where_it_starts_in_logged_steps(tmp_path):
    """Regression (a helper's audit): with manual optimization the start row of a fit resumed
    from a mid-epoch checkpoint was one step early (read at train start, before Lightning sets
    the resumed batch count), and the daemon saw a rewind that was not there."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    run = tmp_path / "run"
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=40, save_top_k=-1)
    first = trainer(tmp_path / "logs", [AutolrCallback(run), ckpts], 40, limit_train_batches=15,
                    enable_checkpointing=True, default_root_dir=tmp_path)
    first.fit(TwoOptimizers(), data())  # 10 batches of 4 optimizer steps: a checkpoint mid-epoch
    (ckpt,) = (tmp_path / "ck").iterdir()
    logged = []

    class FirstBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            logged.append(trainer.fit_loop.epoch_loop._batches_that_stepped)

    trainer(tmp_path / "logs", [AutolrCallback(run), FirstBatch()], -1, max_epochs=1, limit_train_batches=15).fit(
        TwoOptimizers(), data(), ckpt_path=ckpt)
    assert logged[0] == 10
    assert (run / "autolr-fit.jsonl").read_text().split() == ['{"step":-1}', '{"step":9}']


@pytest.mark.parametrize("version", [None, 0])
def test_a_resume_into_a_new_log_folder_is_warned_of(tmp_path, version):
    """Regression (two helpers' audits): a fit resumed with the README's ``CSVLogger("runs")``
    logs into a new version_N folder, a new run for the daemon (its policies start over, the LR
    back at full); nothing said so. The callback warns; with the first fit's version it does not."""
    def fit(max_steps, logger_version, ckpt=None):
        t = L.Trainer(max_steps=max_steps, callbacks=[AutolrCallback()], logger=CSVLogger(tmp_path, name="exp",
                      version=logger_version), enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, accelerator="cpu", devices=1, default_root_dir=tmp_path)
        t.fit(Regression(), data(), ckpt_path=ckpt)
        return t
    first = fit(5, None)
    ControlWriter(first.log_dir, fsync=False).publish(scale=0.5, lr=None, step=4, policy="step", reason="test")
    first.save_checkpoint(tmp_path / "first.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(10, version, ckpt=tmp_path / "first.ckpt")
    said = [str(w.message) for w in caught if "resumes from a checkpoint" in str(w.message)]
    assert len(said) == (version is None), said


def test_imports_are_lazy():
    """Importing autolr (and this integration module) imports no framework."""
    import subprocess
    import sys
    code = ("import sys, autolr, autolr.integrations, autolr.integrations.lightning, autolr.integrations.torch\n"
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'keras', 'transformers', 'jax', 'optax') "
            "if m in sys.modules]\nassert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pytorch_lightning_package(tmp_path):
    """The same callback for the ``pytorch_lightning`` package: PLAutolrCallback."""
    pl = pytest.importorskip("pytorch_lightning")
    from autolr.integrations.lightning import PLAutolrCallback

    run = tmp_path / "run"
    ControlWriter(run, fsync=False).publish_many([
        dict(scale=1.0, lr=None, step=None, policy="", reason="initial", kind="initial", apply_at_step=None),
        dict(scale=0.5, lr=None, step=3, policy="step", reason="test", apply_at_step=5)])

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.lin(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_pre_hook(
                lambda o, a, k: seen.__setitem__(trainer.global_step, o.param_groups[0]["lr"]))

    trainer = pl.Trainer(max_steps=10, callbacks=[PLAutolrCallback(run), Probe()], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accelerator="cpu", devices=1)
    trainer.fit(Module(), data(256))
    assert [seen[s] for s in range(10)] == [pytest.approx(0.1)] * 5 + [pytest.approx(0.05)] * 5


@pytest.mark.parametrize("kind", ["mlflow-file", "mlflow-sqlite", "wandb"])
def test_the_callback_reads_the_control_file_of_the_first_loggers_run(tmp_path, kind, monkeypatch):
    """Regression: with MLFlowLogger or WandbLogger the callback read <save_dir>/autolr.json,
    which never exists: the daemon writes into the MLflow run's or the W&B run's folder."""
    from autolr.config import load_config, parse_policy_options
    from autolr.daemon import Daemon, Options
    from autolr.plugins import get_plugin_manager, policy_classes, reader_classes

    root = tmp_path / "runs"
    root.mkdir()
    if kind == "wandb":
        pytest.importorskip("wandb")
        from lightning.pytorch.loggers import WandbLogger

        monkeypatch.setenv("WANDB_SILENT", "true")
        logger = WandbLogger(save_dir=str(root), offline=True, project="p")
    else:
        pytest.importorskip("mlflow")
        from lightning.pytorch.loggers import MLFlowLogger

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x refuses a new file store by default
        uri = f"file:{root / 'mlruns'}" if kind == "mlflow-file" else f"sqlite:///{root / 'mlflow.db'}"
        logger = MLFlowLogger(experiment_name="e", tracking_uri=uri)
    cb = AutolrCallback()
    t = L.Trainer(max_steps=30, callbacks=[cb], logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    t.fit(Regression(), data(512))
    if kind == "wandb":
        import wandb

        wandb.finish()
    pm = get_plugin_manager(entry_points=False)
    Daemon(root, load_config(None), {"policies": parse_policy_options(["constant"])}, policy_classes(pm),
           reader_classes(pm), Options(once=True, fsync=False)).run()
    controls = sorted(p.parent for p in root.rglob("autolr.json"))
    assert controls == [cb.run_path], (controls, cb.run_path)


def test_a_warmup_is_followed_from_the_first_steps_although_the_csv_comes_every_100(tmp_path):
    """Lightning's defaults: a row every 50 steps, written at every 100th. The callback's row in
    autolr-fit.jsonl (the step the fit starts at) lets the daemon list the warmup ahead from the
    first step, read beside metrics.csv; before, the first 100 steps ran at the user's own LR
    and the warmup moved in 50-step stairs."""
    root = tmp_path / "runs"
    warmup, steps = 150, 300
    with daemon(root, "--no-fsync", "--policy", f"warmup:steps={warmup},start_factor=0.1"), torch_threads(1):
        cb, probe = AutolrCallback(), Probe()
        t = L.Trainer(max_steps=steps, callbacks=[cb, probe], logger=CSVLogger(root, name="exp", version=0),
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      accelerator="cpu", devices=1)
        t.fit(Regression(delay=0.005), data())
    run = root / "exp" / "version_0"
    scale = {s: probe.applied[s] / (BASE_LR * user_lambda(s)) for s in range(steps)}
    want = {s: 0.1 + 0.9 * min(s, warmup) / warmup for s in range(steps)}
    wrong = [s for s in range(steps) if not scale[s] == pytest.approx(want[s], rel=1e-9)]
    # the first steps may run before the daemon has read the fit's start (a few ms)
    assert not wrong or max(wrong) < 30, (wrong, daemon_log(root), journal_summary(run))
    assert (run / "autolr-fit.jsonl").read_text() == '{"step":-1}\n'
    # the daemon read Lightning's CSV too: the warmup's decisions at its rows
    assert [e["step"] for e in read_journal(run) if e["kind"] == "decision"] == [49, 99, 149]
