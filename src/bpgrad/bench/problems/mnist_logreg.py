"""``mnist_logreg``: DeepOBS's multinomial logistic regression on MNIST.

Model: flatten → linear 784→10 → softmax cross-entropy; weights and biases start at zero (as in
DeepOBS), so every seed gives the same initial point. Defaults: batch 128, 50 epochs, inputs scaled
to [0, 1], 10,000 training images held out for validation, last incomplete batch dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bpgrad.bench.problems._common import load_image_splits, seeded
from bpgrad.bench.problems.base import Problem, Splits, register_problem


@register_problem
class MnistLogReg(Problem):
    """MNIST logistic regression (convex), batch 128, 50 epochs."""

    name = "mnist_logreg"
    description = "MNIST, multinomial logistic regression 784→10 (convex), batch 128"
    batch_size = 128
    epochs = 50
    has_accuracy = True
    validation_size = 10000
    drop_last = True
    reference = "DeepOBS mnist_logreg (Schneider et al., ICLR 2019)"

    def load(self, *, data_dir: Path | None = None, validation_size: int | None = None,
             seed: int = 0) -> Splits:
        """MNIST 60k/10k in [0, 1]; valid is carved from the 60k."""
        v = self.validation_size if validation_size is None else validation_size
        return load_image_splits("mnist", data_dir=data_dir, validation_size=v, seed=seed,
                                 mean=None, std=None)

    def make_model(self, seed: int) -> nn.Module:
        """Flatten + Linear(784, 10), all zeros (``seed`` is accepted for the contract)."""
        with seeded(seed):
            model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
        return model
