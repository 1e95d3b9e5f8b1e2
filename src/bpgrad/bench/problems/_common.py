"""Helpers shared by the problem modules: splits from arrays, seeded init, a flatten layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bpgrad.bench.data import load_arrays
from bpgrad.bench.problems.base import Problem, Split, Splits


def carve_validation(
    inputs: torch.Tensor, targets: torch.Tensor, validation_size: int, seed: int
) -> tuple[Split, Split]:
    """Split off ``validation_size`` examples chosen by a permutation seeded with ``seed``.

    The training part keeps its original order (the runner shuffles per epoch with its own seed).
    """
    n = int(inputs.shape[0])
    if not 0 <= validation_size < n:
        raise ValueError(f"validation_size must be in [0, {n}), got {validation_size}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    valid_idx = perm[:validation_size].sort().values
    train_idx = perm[validation_size:].sort().values
    return (Split(inputs[train_idx], targets[train_idx]),
            Split(inputs[valid_idx], targets[valid_idx]))


def images_to_tensor(
    images: np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None
) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, C, H, W) → float32 NCHW scaled to [0, 1], then optionally
    standardised per channel with fixed constants (fixed so that no statistic leaks from the
    validation or test split)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        x = (x - m) / s
    return x


def image_splits(
    arrays: dict[str, np.ndarray],
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    validation_size: int,
    seed: int,
) -> Splits:
    """Build :class:`Splits` from the ``x_train, y_train, x_test, y_test`` arrays of a data set."""
    x_train = images_to_tensor(arrays["x_train"], mean, std)
    y_train = torch.from_numpy(arrays["y_train"].astype(np.int64))
    train, valid = carve_validation(x_train, y_train, validation_size, seed)
    test = Split(images_to_tensor(arrays["x_test"], mean, std),
                 torch.from_numpy(arrays["y_test"].astype(np.int64)))
    return Splits(train=train, valid=valid, test=test)


def load_image_splits(
    dataset: str,
    *,
    data_dir: Path | None,
    validation_size: int,
    seed: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> Splits:
    """Verified arrays of ``dataset`` from the cache (fetched on first use) → :class:`Splits`."""
    arrays = load_arrays(dataset, data_dir=data_dir, download=True)
    return image_splits(arrays, mean=mean, std=std, validation_size=validation_size, seed=seed)


class ImageProblem(Problem):
    """A problem on one of the cached image data sets: ``load`` is the same for all of them.

    Subclasses name the data set and the per-channel normalisation (``None`` keeps the pixels in
    [0, 1], as DeepOBS does); the validation split is carved from the training images.
    """

    #: data set name in :mod:`bpgrad.bench.data` (``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``)
    dataset: str = ""
    #: per-channel mean and std subtracted / divided after scaling to [0, 1]
    pixel_mean: Sequence[float] | None = None
    pixel_std: Sequence[float] | None = None

    def load(self, *, data_dir: Path | None = None, validation_size: int | None = None,
             seed: int = 0) -> Splits:
        """Train / valid (carved from train) / test of ``dataset``, fetched into the cache on
        first use (CIFAR-10 needs internet for that)."""
        v = self.validation_size if validation_size is None else validation_size
        return load_image_splits(self.dataset, data_dir=data_dir, validation_size=v, seed=seed,
                                 mean=self.pixel_mean, std=self.pixel_std)


@contextmanager
def seeded(seed: int) -> Iterator[torch.Generator]:
    """Seed torch's global CPU RNG for model construction without disturbing the caller's RNG,
    and yield a generator (seeded from ``seed`` too) for explicit initialisers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield torch.Generator().manual_seed(int(seed))


def init_layers(
    model: nn.Module,
    weight_init: Callable[[nn.Module, torch.Tensor], None],
    bias_value: float,
) -> None:
    """Apply ``weight_init(module, weight)`` and a constant bias to every conv and linear layer,
    in module order (so the draw order, hence the weights, is fixed for a given seed)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                weight_init(module, module.weight)
                if module.bias is not None:
                    module.bias.fill_(bias_value)


def truncated_normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """TensorFlow's ``truncated_normal``: N(0, std²) redrawn outside ±2 std."""
    nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std, generator=generator)


def normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """N(0, std²) drawn from ``generator``."""
    nn.init.normal_(tensor, mean=0.0, std=std, generator=generator)
