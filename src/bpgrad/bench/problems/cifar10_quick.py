"""``cifar10_quick``: the BPGrad paper's CIFAR-10 network (MatConvNet's "lenet" CIFAR-quick net).

Layer order, exactly as the official code runs it (bpgrad-algorithm.md §3)::

    conv5x5(3→32, pad 2) → maxpool 3 s2 (pad bottom/right 1) → ReLU      32 → 16
    → conv5x5(32→32, pad 2) → ReLU → avgpool 3 s2 (pad bottom/right 1)    16 → 8
    → conv5x5(32→64, pad 2) → ReLU → avgpool 3 s2 (pad bottom/right 1)    8 → 4
    → conv4x4(64→64) → ReLU → conv1x1(64→10) → softmax loss               4 → 1

Layer 1 pools *before* its ReLU (the others after); both orders give the same values for max
pooling, but the order is kept to match the source. 145,578 parameters.
Init: N(0, 0.01²) for conv1, N(0, 0.05²) for the other filters, zero biases (the distribution of
the official ``Weights_init_cifar10.mat``; the file itself is not shipped).
Padding: max pooling pads with −inf (padding never wins); average pooling averages over the
in-image pixels only, which is how we read MatConvNet's ``vl_nnpool`` [U].
Defaults: batch 100, 100 epochs. Training augmentation: the official code flips the *whole*
minibatch horizontally with probability 0.5 (:meth:`Cifar10Quick.augment`); it also flipped
evaluation batches, which we do not. Deviation: inputs are standardised per channel with the usual
CIFAR-10 constants instead of MatConvNet's contrast normalisation + ZCA whitening.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bpgrad.bench.problems._common import ImageProblem, normal_, seeded
from bpgrad.bench.problems.base import register_problem

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class _PadBottomRightPool(nn.Module):
    """3×3 stride-2 pooling with MatConvNet's asymmetric padding: [top bottom left right] =
    [0 1 0 1]."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``x`` (N, C, H, W) → (N, C, ⌊(H−2)/2⌋+1, ⌊(W−2)/2⌋+1)."""
        if self.mode == "max":
            return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, 2)
        summed = F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 3, 2, divisor_override=1)
        ones = torch.ones((1, 1, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device)
        count = F.avg_pool2d(F.pad(ones, (0, 1, 0, 1)), 3, 2, divisor_override=1)
        return summed / count


class CifarQuickNet(nn.Module):
    """The CIFAR-quick net; outputs logits of shape (N, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2),
            _PadBottomRightPool("max"),
            nn.ReLU(),
            nn.Conv2d(32, 32, 5, padding=2),
            nn.ReLU(),
            _PadBottomRightPool("avg"),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            _PadBottomRightPool("avg"),
            nn.Conv2d(64, 64, 4),
            nn.ReLU(),
            nn.Conv2d(64, 10, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) → (N, 10)."""
        return self.features(x).flatten(1)


@register_problem
class Cifar10Quick(ImageProblem):
    """CIFAR-10 with the paper's CIFAR-quick net, batch 100, 100 epochs."""

    dataset = "cifar10"
    pixel_mean = CIFAR10_MEAN
    pixel_std = CIFAR10_STD
    name = "cifar10_quick"
    description = "CIFAR-10, the BPGrad paper's CIFAR-quick net (145,578 params), batch 100"
    batch_size = 100
    epochs = 100
    has_accuracy = True
    validation_size = 5000
    evaluation = ("after each epoch: mean loss and accuracy over the full valid and test splits, "
                  "in eval mode, without the whole-batch flip used in training; train metrics "
                  "are the means over the epoch's minibatches in train mode")
    reference = ("RyanCV/BPGrad cifar10_code (cnn_cifar_init.m, cnn_cifar_BPGrad.m); per-channel "
                 "standardisation instead of contrast normalisation + ZCA")

    def make_model(self, seed: int) -> nn.Module:
        """N(0, 0.01²) conv1, N(0, 0.05²) other filters, zero biases, drawn from ``seed``."""
        with seeded(seed) as gen:
            model = CifarQuickNet()
            convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
            with torch.no_grad():
                for k, conv in enumerate(convs):
                    normal_(conv.weight, 0.01 if k == 0 else 0.05, gen)
                    if conv.bias is not None:
                        conv.bias.zero_()
        return model

    def augment(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Flip the whole minibatch left-right with probability 0.5 (the official getBatch)."""
        if torch.rand((), generator=generator).item() < 0.5:
            return inputs.flip(-1)
        return inputs
