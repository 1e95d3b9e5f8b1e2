"""A tiny synthetic problem for the harness's tests and the harness-overhead benchmark.

``toy_blobs`` is a 3-class Gaussian-blob classification in 16 dimensions with a small MLP that has
dropout (so that resuming must restore the torch RNG to be exact). It needs no data files and a
full epoch takes milliseconds. It lives with the tests, not in the package: importing this module
registers it (``bpgrad compare --import toy_problem`` with this folder on PYTHONPATH), so it never
shows up among the real problems.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bpgrad.bench.problems.base import Problem, Split, Splits, get_problem, register_problem


class ToyBlobs(Problem):
    """Three Gaussian blobs in 16-D, an MLP 16-32-3 with dropout."""

    name = "toy_blobs"
    description = "synthetic 3-class Gaussian blobs, MLP with dropout (tests and smoke runs)"
    batch_size = 32
    epochs = 3
    has_accuracy = True
    validation_size = 96

    n_train = 480
    n_test = 192
    dim = 16
    classes = 3

    def load(self, *, data_dir: Path | None = None, validation_size: int | None = None,
             seed: int = 0) -> Splits:
        """Draw the data from a fixed generator; ``seed`` only permutes train vs valid."""
        gen = torch.Generator().manual_seed(1234)
        centres = 2.0 * torch.randn(self.classes, self.dim, generator=gen)

        def draw(n: int) -> Split:
            y = torch.randint(0, self.classes, (n,), generator=gen)
            x = centres[y] + 1.5 * torch.randn(n, self.dim, generator=gen)
            return Split(x, y)

        full, test = draw(self.n_train), draw(self.n_test)
        n_valid = self.validation_size if validation_size is None else validation_size
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
        valid_idx, train_idx = perm[:n_valid], perm[n_valid:]
        return Splits(
            train=Split(full.inputs[train_idx], full.targets[train_idx]),
            valid=Split(full.inputs[valid_idx], full.targets[valid_idx]),
            test=test,
        )

    def make_model(self, seed: int) -> nn.Module:
        """MLP with weights drawn from ``seed`` (independent of the global RNG)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Sequential(
                nn.Linear(self.dim, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, self.classes)
            )


def ensure_registered() -> Problem:
    """Register ``toy_blobs`` (once) and return an instance."""
    try:
        return get_problem(ToyBlobs.name)
    except KeyError:
        register_problem(ToyBlobs)
        return get_problem(ToyBlobs.name)


ensure_registered()
