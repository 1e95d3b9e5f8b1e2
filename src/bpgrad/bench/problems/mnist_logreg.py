"""``mnist_logreg``: DeepOBS's multinomial logistic regression on MNIST.

Model: flatten → linear 784→10 → softmax cross-entropy; weights and biases start at zero (as in
DeepOBS), so every seed gives the same initial point. Defaults: batch 128, 50 epochs, inputs scaled
to [0, 1], 10,000 training images held out for validation, last incomplete batch dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from bpgrad.bench.problems._common import ImageProblem, seeded
from bpgrad.bench.problems.base import register_problem


@register_problem
class MnistLogReg(ImageProblem):
    """MNIST logistic regression (convex), batch 128, 50 epochs."""

    dataset = "mnist"
    name = "mnist_logreg"
    description = "MNIST, multinomial logistic regression 784→10 (convex), batch 128"
    batch_size = 128
    epochs = 50
    has_accuracy = True
    validation_size = 10000
    drop_last = True
    reference = "DeepOBS mnist_logreg (Schneider et al., ICLR 2019)"

    def make_model(self, seed: int) -> nn.Module:
        """Flatten + Linear(784, 10), all zeros (``seed`` is accepted for the contract)."""
        with seeded(seed):
            model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
        return model
