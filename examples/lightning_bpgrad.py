"""BPGrad with PyTorch Lightning: automatic optimization, mixed precision, gradient
accumulation, an LR scheduler on BPGrad's ``lr`` multiplier, checkpoints and logging.
CPU-only and synthetic data; runs in under a minute.

    python examples/lightning_bpgrad.py [--precision bf16-mixed] [--accumulate 2]
    python examples/lightning_bpgrad.py --resume lightning_logs/version_0/checkpoints/last.ckpt

See docs/integrations/lightning.md.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpgrad import BPGrad
from bpgrad.integrations.lightning import BPGradCallback


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = BPGrad(self.parameters(), lipschitz=10.0, rho=0.1, momentum=0.9)
        # Schedulers turn BPGrad's lr, a multiplier on its step size (lr=s == lipschitz=L/s).
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", default="32-true",
                        help="32-true, bf16-mixed or 16-mixed (16-mixed on CPU needs torch>=2.4)")
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--resume", default=None, help="checkpoint to resume from")
    parser.add_argument("--root", default="lightning_runs")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(2048, 20)
    y = (x @ torch.randn(20, 5)).argmax(dim=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)

    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=args.epochs, precision=args.precision,
        accumulate_grad_batches=args.accumulate, default_root_dir=args.root,
        log_every_n_steps=5, enable_progress_bar=False,
        # BPGradCallback: the loss of every optimizer step reaches BPGrad (all precisions,
        # accumulation) and bpgrad/eta, bpgrad/grad_norm, bpgrad/running_min, ... are logged.
        callbacks=[BPGradCallback(prog_bar=True), ModelCheckpoint(save_last=True)],
    )
    model = Classifier()
    trainer.fit(model, loader, ckpt_path=args.resume)
    stats = trainer.optimizers[0].stats
    print(f"done: {int(stats['steps'])} BPGrad steps, eta {float(stats['eta']):.4f}, "
          f"running min {float(stats['running_min']):.4f}; logs in {trainer.log_dir}")


if __name__ == "__main__":
    main()
