"""BPGrad under PyTorch Lightning (automatic optimization) equals the plain loop.

Needs the ``integrations`` extra (``pip install -e .[integrations]``); a missing ``lightning``
is an import error, not a skip.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from integ_helpers import BATCH, OPT_KWARGS, assert_same_training, make_data, make_net, plain_loop
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

import bpgrad
from bpgrad import BPGrad, MissingLossError
from bpgrad.integrations.lightning import BPGradCallback


def step_lr(opt: BPGrad) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


class Classifier(pl.LightningModule):
    def __init__(self, scheduler: bool = True) -> None:
        super().__init__()
        self.net = make_net()
        self.scheduler = scheduler

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = BPGrad(self.parameters(), **OPT_KWARGS)
        if not self.scheduler:
            return opt
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": step_lr(opt), "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*make_data()), batch_size=BATCH, shuffle=False)


class ListLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))


def make_trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("callbacks", [BPGradCallback()])
    return pl.Trainer(
        accelerator="cpu", devices=1, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        num_sanity_val_steps=0, **kwargs,
    )


def test_fp32_accumulation_scheduler_and_logging(tmp_path: Path) -> None:
    # 12 batches per epoch, accumulate 5: windows 5, 5, 2 per epoch (the short one too).
    logger = ListLogger()
    model = Classifier()
    trainer = make_trainer(tmp_path, max_epochs=2, accumulate_grad_batches=5, logger=logger)
    trainer.fit(model)
    ref = plain_loop(epochs=2, accum=5, scheduler=step_lr)
    opt = trainer.optimizers[0]
    assert_same_training(model.net, opt, ref)
    assert opt.param_groups[0]["lr"] == ref.opt.param_groups[0]["lr"] < 1.0  # scheduler ran
    logged = [m["bpgrad/eta"] for _, m in logger.rows if "bpgrad/eta" in m]
    assert len(logged) == len(ref.etas) == 6
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(ref.etas), atol=1e-6, rtol=1e-5)
    assert logged[-1] == float(opt.stats["eta"])
    last = next(m for _, m in reversed(logger.rows) if "bpgrad/eta" in m)
    assert last["bpgrad/running_min"] == float(opt.stats["running_min"])
    assert last["bpgrad/grad_norm"] == float(opt.stats["grad_norm"])


def test_without_callback_accumulation_would_be_wrong(tmp_path: Path) -> None:
    # Documents why the callback exists: Lightning's closure returns only the last
    # micro-batch's loss / N, so BPGrad without the callback diverges from the plain loop.
    # Not silently: BPGrad warns once, naming the callback.
    model = Classifier(scheduler=False)
    trainer = make_trainer(tmp_path, max_epochs=1, accumulate_grad_batches=4, callbacks=[],
                           logger=False)
    with pytest.warns(UserWarning, match="accumulate_grad_batches=4 but without") as caught:
        trainer.fit(model)
    assert sum("BPGradCallback" in str(w.message) for w in caught) == 1
    ref = plain_loop(epochs=1, accum=4)
    assert float(trainer.optimizers[0].stats["running_min"]) != pytest.approx(
        float(ref.opt.stats["running_min"]), rel=1e-4)


def test_bf16_mixed(tmp_path: Path) -> None:
    model = Classifier(scheduler=False)
    trainer = make_trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2,
                           precision="bf16-mixed", logger=False)
    trainer.fit(model)
    ref = plain_loop(epochs=1, accum=2, autocast=torch.bfloat16)
    assert_same_training(model.net, trainer.optimizers[0], ref, atol=1e-5, rtol=1e-4)


def test_16_mixed_with_grad_scaler(tmp_path: Path) -> None:
    # Lightning's 16-mixed runs the closure, then scaler.step(optimizer) with no loss: only the
    # callback's hook gets the (unscaled) loss to BPGrad. CPU autocast supports float16 and
    # torch.amp.GradScaler("cpu") scales for real, so this is Lightning's GPU code path.
    scale = 2.0**10
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    model = Classifier(scheduler=False)
    trainer = make_trainer(tmp_path, max_epochs=1, accumulate_grad_batches=3, plugins=[plugin],
                           logger=False)
    trainer.fit(model)
    ref = plain_loop(epochs=1, accum=3, autocast=torch.float16,
                     scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    assert_same_training(model.net, trainer.optimizers[0], ref, atol=1e-5, rtol=1e-4)
    assert float(trainer.optimizers[0].stats["loss"]) == pytest.approx(ref.losses[-1], rel=1e-4)


def test_16_mixed_without_callback_fails_loudly(tmp_path: Path) -> None:
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = make_trainer(tmp_path, max_steps=1, plugins=[plugin], callbacks=[], logger=False)
    with pytest.raises(MissingLossError):
        trainer.fit(Classifier(scheduler=False))


class ManualClassifier(Classifier):
    def __init__(self) -> None:
        super().__init__(scheduler=False)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.manual_backward(loss)
        opt.step()  # bare: the callback's hook hands BPGrad the loss
        opt.zero_grad()
        return loss


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_manual_optimization(tmp_path: Path, precision: str) -> None:
    model = ManualClassifier()
    plugins = []
    if precision == "16-mixed":
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    trainer = make_trainer(tmp_path, max_epochs=1, logger=False, plugins=plugins)
    trainer.fit(model)
    if precision == "16-mixed":
        ref = plain_loop(epochs=1, autocast=torch.float16, scaler=torch.amp.GradScaler("cpu"))
        assert_same_training(model.net, trainer.optimizers[0], ref, atol=1e-5, rtol=1e-4)
    else:
        assert_same_training(model.net, trainer.optimizers[0], plain_loop(epochs=1))


class ManualSetLoss(ManualClassifier):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()  # a LightningOptimizer around BPGrad
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.manual_backward(loss)
        if self.how == "set_loss":
            opt.set_loss(loss)
            opt.step()
        elif self.how == "bpgrad.set_loss":
            bpgrad.set_loss(opt, loss)
            opt.step()
        else:
            opt.step(loss=loss)
        opt.zero_grad()
        return loss


# Without BPGradCallback, manual optimization passes the loss itself: LightningOptimizer.step
# always hands BPGrad a closure that returns None, and BPGrad then takes the loss from loss= or
# set_loss.
@pytest.mark.parametrize("how", ["set_loss", "bpgrad.set_loss", "loss_kwarg"])
def test_manual_optimization_without_callback(tmp_path: Path, how: str) -> None:
    model = ManualSetLoss(how)
    trainer = make_trainer(tmp_path, max_epochs=1, logger=False, callbacks=[])
    trainer.fit(model)
    assert_same_training(model.net, trainer.optimizers[0], plain_loop(epochs=1))


def test_checkpoint_resume_continues_identically(tmp_path: Path) -> None:
    full = Classifier()
    make_trainer(tmp_path / "full", max_epochs=4, accumulate_grad_batches=5,
                 logger=False).fit(full)

    first = Classifier()
    trainer = make_trainer(tmp_path / "a", max_epochs=2, accumulate_grad_batches=5, logger=False)
    trainer.fit(first)
    ckpt = tmp_path / "two_epochs.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = Classifier()  # fresh weights and a fresh BPGrad: everything comes from ckpt
    trainer2 = make_trainer(tmp_path / "b", max_epochs=4, accumulate_grad_batches=5,
                            logger=False)
    trainer2.fit(resumed, ckpt_path=ckpt)

    for p, q in zip(resumed.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    a, b = trainer2.optimizers[0], full.trainer.optimizers[0]
    for key in ("steps", "running_min", "eta", "skipped_steps"):
        torch.testing.assert_close(a.stats[key], b.stats[key], atol=0, rtol=0)
    assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"]


class SelfContainedClassifier(Classifier):
    """Brings its BPGradCallback along: no Trainer argument to forget."""

    def configure_callbacks(self) -> list[pl.Callback]:
        return [BPGradCallback()]


@pytest.mark.parametrize("trainer_callbacks", [[], [BPGradCallback()]])
def test_callback_from_configure_callbacks(tmp_path: Path, trainer_callbacks: list[Any]) -> None:
    # A callback from configure_callbacks replaces a Trainer callback of the same type, so the
    # loss is fed once whether or not the Trainer also has one.
    model = SelfContainedClassifier()
    trainer = make_trainer(tmp_path, max_epochs=2, accumulate_grad_batches=5, logger=False,
                           callbacks=trainer_callbacks)
    trainer.fit(model)
    assert sum(isinstance(c, BPGradCallback) for c in trainer.callbacks) == 1
    assert_same_training(model.net, trainer.optimizers[0],
                         plain_loop(epochs=2, accum=5, scheduler=step_lr))


def clipping_warnings(tmp_path: Path, model: pl.LightningModule, **kwargs: Any) -> list[str]:
    callback = BPGradCallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # the same callback in a second fit: still one warning
            make_trainer(tmp_path, max_steps=2, logger=False, callbacks=[callback],
                         **kwargs).fit(model)
    return [str(w.message) for w in caught if str(w.message).startswith("BPGradCallback")]


class NoDecayClassifier(Classifier):
    def configure_optimizers(self) -> Any:
        return BPGrad(self.parameters(), lipschitz=20.0)


@pytest.mark.parametrize(
    ("model", "algorithm", "expected"),
    [(Classifier, "norm", "weight_decay > 0"),
     (NoDecayClassifier, "value", "clipping by value"),
     (NoDecayClassifier, "norm", None)],  # cancels out in BPGrad's normalisation: silent
)
def test_gradient_clipping_that_changes_bpgrads_step_warns_once(
    tmp_path: Path, model: type[Classifier], algorithm: str, expected: str | None,
) -> None:
    messages = clipping_warnings(tmp_path, model(), gradient_clip_val=0.1,
                                 gradient_clip_algorithm=algorithm)
    if expected is None:
        assert messages == []
    else:
        assert len(messages) == 1, messages
        assert expected in messages[0] and "Leave gradient_clip_val unset" in messages[0]
