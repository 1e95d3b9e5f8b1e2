"""``quadratic_deep``: DeepOBS's 100-D noisy quadratic (P1 of the small benchmark set).

Per-example loss ``0.5 (θ − x)ᵀ Q (θ − x)``, averaged over the batch, with

* ``Q = Rᵀ D R``: D holds 90 eigenvalues ~ U(0, 1) and 10 ~ U(30, 60) (the "deep learning"
  spectrum DeepOBS cites), R a Haar-random rotation; both come from ``numpy.random.RandomState(42)``
  and are fixed for every seed and run, so runs share one problem.
* data ``x ~ N(0, 0.6² I)``: DeepOBS's ``quadratic`` data set (``noise_level=0.6``), 1,000 fixed
  training draws (RandomState(42) stream) and 1,000 fixed test draws (RandomState(43) stream).
  Validation draws are *fresh* (RandomState(44) stream) instead of carved from the 1,000, so the
  training set stays DeepOBS's size; ``validation_size`` sets their number.
* θ starts at all ones (DeepOBS ``net_quadratic_deep``), for every seed.

Deviation: DeepOBS builds R with its own subgroup-algorithm code; we draw R as the Q factor of a
Gaussian matrix with the sign fix (also Haar-distributed), so the spectrum matches DeepOBS's in
distribution but the matrix is not bit-identical. Targets are dummy zeros (the loss ignores them).
Defaults: batch 128, 100 epochs, last incomplete batch dropped (7 steps per epoch), as DeepOBS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bpgrad.bench.problems._common import seeded
from bpgrad.bench.problems.base import Problem, Split, Splits, register_problem

DIM = 100
NOISE_LEVEL = 0.6
TRAIN_SIZE = 1000
TEST_SIZE = 1000


def deep_hessian(dim: int = DIM, seed: int = 42) -> np.ndarray:
    """The fixed Hessian ``Rᵀ D R`` (float64, symmetric positive definite)."""
    if dim % 10:
        raise ValueError(f"dim must be a multiple of 10 (90%/10% split), got {dim}")
    rng = np.random.RandomState(seed)
    small = rng.uniform(0.0, 1.0, dim * 9 // 10)
    large = rng.uniform(30.0, 60.0, dim // 10)
    eigenvalues = np.concatenate([small, large])
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    rotation = q * np.sign(np.diag(r))  # the sign fix makes the QR factor Haar-distributed
    hessian = rotation.T @ np.diag(eigenvalues) @ rotation
    return 0.5 * (hessian + hessian.T)


def _noise(seed: int, n: int) -> torch.Tensor:
    draws = np.random.RandomState(seed).normal(0.0, NOISE_LEVEL, (n, DIM))
    return torch.from_numpy(draws.astype(np.float32))


class NoisyQuadratic(nn.Module):
    """θ ∈ R^dim; ``forward(x)`` returns the per-example losses 0.5 (θ−x)ᵀQ(θ−x), shape (N,)."""

    hessian: torch.Tensor

    def __init__(self, hessian: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.ones(hessian.shape[0]))
        self.register_buffer("hessian", hessian)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-example losses for a batch ``x`` of shape (N, dim)."""
        diff = self.theta - x
        return 0.5 * ((diff @ self.hessian) * diff).sum(dim=1)


@register_problem
class QuadraticDeep(Problem):
    """DeepOBS's 100-D noisy quadratic; needs no data download."""

    name = "quadratic_deep"
    description = "DeepOBS 100-D noisy quadratic, 90% eigenvalues in (0,1), 10% in (30,60)"
    batch_size = 128
    epochs = 100
    has_accuracy = False
    validation_size = 1000
    drop_last = True
    evaluation = ("after each epoch: mean loss over the validation draws and the 1,000 test "
                  "draws; train loss is the mean over the epoch's minibatches; no accuracy")
    reference = "DeepOBS quadratic_deep (Schneider et al., ICLR 2019); rotation drawn differently"

    def load(self, *, data_dir: Path | None = None, validation_size: int | None = None,
             seed: int = 0) -> Splits:
        """Fixed noise draws; ``data_dir`` and ``seed`` are unused (the data never change)."""
        del data_dir, seed
        v = self.validation_size if validation_size is None else validation_size
        if v < 0:
            raise ValueError(f"validation_size must be >= 0, got {v}")

        def split(x: torch.Tensor) -> Split:
            return Split(x, torch.zeros(x.shape[0], dtype=torch.int64))

        return Splits(train=split(_noise(42, TRAIN_SIZE)), valid=split(_noise(44, v)),
                      test=split(_noise(43, TEST_SIZE)))

    def make_model(self, seed: int) -> nn.Module:
        """θ = ones(100) and the fixed Hessian (float32); identical for every seed."""
        with seeded(seed):
            return NoisyQuadratic(torch.from_numpy(deep_hessian().astype(np.float32)))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean of the per-example quadratic losses (``targets`` are ignored)."""
        del targets
        return outputs.mean()
