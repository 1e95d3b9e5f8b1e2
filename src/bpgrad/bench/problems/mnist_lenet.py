"""``mnist_lenet``: the MatConvNet MNIST LeNet used by the BPGrad paper's recognition experiment.

Layer order (MatConvNet ``cnn_mnist_init``, no batch norm)::

    conv5x5(1→20) → maxpool 2 s2 → conv5x5(20→50) → maxpool 2 s2 → conv4x4(50→500) → ReLU
    → conv1x1(500→10) → softmax loss          spatial size 28 → 24 → 12 → 8 → 4 → 1

There is no ReLU after the first two convolutions; that is MatConvNet's LeNet, not a typo.
Init: every filter 0.01·randn, every bias 0 (MatConvNet's ``f = 1/100``). 431,080 parameters.
Defaults: batch 100 and 20 epochs (MatConvNet's ``cnn_mnist``). Deviation: inputs are standardised
with MNIST's mean/std (0.1307, 0.3081) instead of MatConvNet's mean-image subtraction on 0..255.
"""

from __future__ import annotations

import torch
from torch import nn

from bpgrad.bench.problems._common import (
    ImageProblem,
    init_layers,
    normal_,
    seeded,
)
from bpgrad.bench.problems.base import register_problem

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


class LeNetMatConvNet(nn.Module):
    """MatConvNet's MNIST LeNet; outputs logits of shape (N, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 20, 5),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(20, 50, 5),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(50, 500, 4),
            nn.ReLU(),
            nn.Conv2d(500, 10, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) → (N, 10)."""
        return self.features(x).flatten(1)


@register_problem
class MnistLeNet(ImageProblem):
    """MNIST with MatConvNet's LeNet (the paper's recognition net), batch 100."""

    dataset = "mnist"
    pixel_mean = MNIST_MEAN
    pixel_std = MNIST_STD
    name = "mnist_lenet"
    description = "MNIST, MatConvNet LeNet (conv20-pool-conv50-pool-conv500-relu-conv10), batch 100"
    batch_size = 100
    epochs = 20
    has_accuracy = True
    validation_size = 5000
    reference = ("MatConvNet examples/mnist cnn_mnist_init.m (BPGrad paper, recognition); "
                 "inputs standardised with MNIST mean/std instead of mean-image subtraction")

    def make_model(self, seed: int) -> nn.Module:
        """LeNet with 0.01·N(0, 1) filters and zero biases, drawn from ``seed``."""
        with seeded(seed) as gen:
            model = LeNetMatConvNet()
            init_layers(model, lambda _m, w: normal_(w, 0.01, gen), 0.0)
        return model
