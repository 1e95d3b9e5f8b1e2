"""BPGrad from LightningCLI's command line equals the plain loop.

``--trainer.callbacks+=bpgrad.integrations.BPGradCallback`` adds the callback (jsonargparse
imports it; ``bpgrad.integrations`` exports it lazily), ``--optimizer=bpgrad.BPGrad`` builds
BPGrad for a module without ``configure_optimizers``. Without the callback, accumulation feeds
BPGrad the wrong loss, as with the plain Trainer (see docs/integrations/lightning.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from integ_helpers import BATCH, OPT_KWARGS, assert_same_training, make_data, make_net, plain_loop
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

from bpgrad import BPGrad
from bpgrad.integrations.lightning import BPGradCallback


class CLIClassifier(pl.LightningModule):
    """No configure_optimizers: LightningCLI's --optimizer builds it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*make_data()), batch_size=BATCH, shuffle=False)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI(args=...) warns when sys.argv carries arguments too (pytest's own).
    monkeypatch.setattr(sys, "argv", ["lightning-cli"])


def run_cli(tmp_path: Path, *extra: str) -> LightningCLI:
    optimizer = ["--optimizer=bpgrad.BPGrad"] + [f"--optimizer.{k}={v}" for k, v in OPT_KWARGS.items()]
    argv = [
        "fit", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=2", "--trainer.accumulate_grad_batches=5", *optimizer, *extra,
    ]
    return LightningCLI(CLIClassifier, args=argv, save_config_callback=None)


@pytest.mark.parametrize("path", ["bpgrad.integrations.BPGradCallback",
                                  "bpgrad.integrations.lightning.BPGradCallback"])
def test_callback_flag_and_optimizer_flag_equal_plain_loop(tmp_path: Path, path: str) -> None:
    cli = run_cli(tmp_path, f"--trainer.callbacks+={path}")
    assert sum(isinstance(c, BPGradCallback) for c in cli.trainer.callbacks) == 1
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, BPGrad) and opt.param_groups[0]["lipschitz"] == OPT_KWARGS["lipschitz"]
    assert_same_training(cli.model.net, opt, plain_loop(epochs=2, accum=5))


def test_without_the_callback_flag_accumulation_is_wrong(tmp_path: Path) -> None:
    cli = run_cli(tmp_path)
    ref = plain_loop(epochs=2, accum=5)
    assert float(cli.trainer.optimizers[0].stats["running_min"]) != pytest.approx(
        float(ref.opt.stats["running_min"]), rel=1e-4)
