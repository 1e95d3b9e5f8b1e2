"""``mnist_mlp``: DeepOBS's multilayer perceptron on MNIST.

Model: flatten → FC 784→1000 → ReLU → FC 1000→500 → ReLU → FC 500→100 → ReLU → FC 100→10
→ softmax cross-entropy. Init: weights truncated normal (std 3e-2, redrawn beyond 2 std), biases 0.
1,336,610 parameters. Defaults: batch 128, 100 epochs, inputs scaled to [0, 1], 10,000 training
images held out for validation, last incomplete batch dropped.
"""

from __future__ import annotations

from torch import nn

from bpgrad.bench.problems._common import (
    ImageProblem,
    init_layers,
    seeded,
    truncated_normal_,
)
from bpgrad.bench.problems.base import register_problem


@register_problem
class MnistMlp(ImageProblem):
    """MNIST with DeepOBS's 4-layer ReLU MLP, batch 128, 100 epochs."""

    dataset = "mnist"
    name = "mnist_mlp"
    description = "MNIST, DeepOBS MLP 784-1000-500-100-10 with ReLU (1.34M params), batch 128"
    batch_size = 128
    epochs = 100
    has_accuracy = True
    validation_size = 10000
    drop_last = True
    reference = "DeepOBS mnist_mlp (Schneider et al., ICLR 2019)"

    def make_model(self, seed: int) -> nn.Module:
        """Truncated-normal (3e-2) weights and zero biases, drawn from ``seed``."""
        with seeded(seed) as gen:
            model = nn.Sequential(
                nn.Flatten(),
                nn.Linear(784, 1000), nn.ReLU(),
                nn.Linear(1000, 500), nn.ReLU(),
                nn.Linear(500, 100), nn.ReLU(),
                nn.Linear(100, 10),
            )
            init_layers(model, lambda _m, w: truncated_normal_(w, 3e-2, gen), 0.0)
        return model
