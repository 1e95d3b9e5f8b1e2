"""``segment_mlp``: tabular classification, UCI Image Segmentation (river's copy), a small MLP.

Data: :data:`bpgrad.bench.data.sources.RIVER_SEGMENT` — 2310 rows of 18 numeric features
describing 3x3 regions of outdoor images, 7 balanced classes (brickface, cement, foliage, grass,
path, sky, window), shipped inside the ``river`` 0.26.1 wheel and sha256-pinned. The test split is
fixed (66 rows per class, constant seed); the validation split is carved from the 1848 training
rows with the trial's seed.

Preprocessing: each feature standardised with the mean and standard deviation of the *training
part after the validation split is carved* (so neither valid nor test statistics leak; a feature
with zero spread is left centred). Model: 18 -> 64 -> 64 -> 7, ReLU, PyTorch's default init.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bpgrad.bench.problems import _common
from bpgrad.bench.problems._common import carve_validation, seeded
from bpgrad.bench.problems.base import Problem, Split, Splits, register_problem

N_FEATURES = 18
N_CLASSES = 7


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre and scale every column by the statistics of ``train`` (std 0 → scale 1)."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(t - mean) / std for t in (train, *others)]


@register_problem
class SegmentMLP(Problem):
    """UCI Image Segmentation (7 classes, 18 features), 2-hidden-layer MLP."""

    name = "segment_mlp"
    description = ("tabular: UCI Image Segmentation from the river wheel (2310 rows, 18 features, "
                   "7 classes), MLP 18-64-64-7")
    batch_size = 32
    epochs = 20
    validation_size = 300
    eval_batch_size = 1000
    reference = ("UCI Image Segmentation (Brodley 1990) as shipped by river 0.26.1; the tabular "
                 "member of issue 12's wider suite")

    def load(self, *, data_dir: Path | None = None, validation_size: int | None = None,
             seed: int = 0) -> Splits:
        """Standardised float32 features, int64 labels; valid carved from train with ``seed``."""
        v = self.validation_size if validation_size is None else validation_size
        arrays = _common.load_arrays("river_segment", data_dir=data_dir, download=True)
        x_all = torch.from_numpy(np.asarray(arrays["x_train"], dtype=np.float32))
        y_all = torch.from_numpy(np.asarray(arrays["y_train"], dtype=np.int64))
        train, valid = carve_validation(x_all, y_all, v, seed)
        x_test = torch.from_numpy(np.asarray(arrays["x_test"], dtype=np.float32))
        xs = standardise(train.inputs, valid.inputs, x_test)
        return Splits(train=Split(xs[0], train.targets), valid=Split(xs[1], valid.targets),
                      test=Split(xs[2], torch.from_numpy(
                          np.asarray(arrays["y_test"], dtype=np.int64))))

    def make_model(self, seed: int) -> nn.Module:
        """The MLP, PyTorch's default initialisation drawn from ``seed``."""
        with seeded(seed):
            return nn.Sequential(nn.Linear(N_FEATURES, 64), nn.ReLU(), nn.Linear(64, 64),
                                 nn.ReLU(), nn.Linear(64, N_CLASSES))
