"""``fmnist_2c2d``: DeepOBS's Fashion-MNIST 2c2d problem (P2 of the small benchmark set).

Layer order (DeepOBS ``net_mnist_2c2d``)::

    conv5x5(1→32, same) → ReLU → maxpool 2 s2 → conv5x5(32→64, same) → ReLU → maxpool 2 s2
    → flatten (7·7·64) → FC 1024 → ReLU → FC 10 → softmax cross-entropy

Init: weights truncated normal (std 0.05, redrawn beyond 2 std), biases 0.05. 3,274,634 params.
Defaults: batch 128, 100 epochs, no weight decay, inputs scaled to [0, 1] as DeepOBS does;
DeepOBS drops the last incomplete batch and holds out 10,000 training images for validation.
"""

from __future__ import annotations

import torch
from torch import nn

from bpgrad.bench.problems._common import (
    ImageProblem,
    init_layers,
    seeded,
    truncated_normal_,
)
from bpgrad.bench.problems.base import register_problem


class Net2c2d(nn.Module):
    """DeepOBS's 2c2d network for 28×28 grey images; outputs logits (N, 10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(7 * 7 * 64, 1024), nn.ReLU(), nn.Linear(1024, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) → (N, num_classes)."""
        return self.classifier(self.features(x))


@register_problem
class FashionMnist2c2d(ImageProblem):
    """Fashion-MNIST with DeepOBS's 2c2d net, batch 128, 100 epochs."""

    dataset = "fashion_mnist"
    name = "fmnist_2c2d"
    description = "Fashion-MNIST, DeepOBS 2c2d (2 conv + 2 dense, 3.27M params), batch 128"
    batch_size = 128
    epochs = 100
    has_accuracy = True
    validation_size = 10000
    drop_last = True
    reference = "DeepOBS fmnist_2c2d (Schneider et al., ICLR 2019), PyTorch develop branch"

    def make_model(self, seed: int) -> nn.Module:
        """Truncated-normal (0.05) weights and 0.05 biases, drawn from ``seed``."""
        with seeded(seed) as gen:
            model = Net2c2d()
            init_layers(model, lambda _m, w: truncated_normal_(w, 0.05, gen), 0.05)
        return model
