"""The contract every benchmark problem implements, and the problem registry.

A problem bundles data, model, loss and metrics. The runner knows nothing else about it, so a new
problem is one module that subclasses :class:`Problem` and calls :func:`register_problem`.

Conventions
-----------
* All data live in memory as tensors (every problem here fits: full MNIST is 47 MB as uint8).
* Inputs are float tensors and targets class indices (int64) unless the task needs otherwise:
  character codes as int64 inputs (``fortunes_lstm``), float regression targets
  (``teacher_student``, ``quadratic_deep``-style), uint8 per-pixel label maps widened in ``loss``
  (``mnist_canvas_fcn``). The runner only indexes them.
* ``load`` returns train / valid / test splits. The validation split is carved from the training
  set with a seeded permutation (``validation_size`` examples), never from the test set, so that
  learning-rate selection can never see the test data. ``validation_size=0`` gives an empty one.
* ``make_model(seed)`` is deterministic: the same seed gives bit-identical initial weights.
* ``loss`` returns the *mean* loss over the batch (a 0-dim tensor); that is the value BPGrad sees.
* ``batch_metrics`` returns *sums* over the batch (``loss_sum``, ``correct``, ``count``) so that
  the runner can aggregate exactly over an epoch regardless of the last batch's size.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn


@dataclass(frozen=True)
class Split:
    """One split of a data set: inputs and targets with equal first dimension."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.targets.shape[0]:
            raise ValueError(
                f"inputs and targets disagree on the number of examples: "
                f"{self.inputs.shape[0]} vs {self.targets.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass(frozen=True)
class Splits:
    """Train, validation (carved from train) and test splits."""

    train: Split
    valid: Split
    test: Split


class Problem(abc.ABC):
    """A benchmark problem: data + model + loss + metrics, deterministic given a seed.

    Subclasses set the class attributes and implement the abstract methods.
    """

    #: registry name, ``<dataset>_<model>``
    name: str = ""
    #: one sentence for ``bpgrad compare --list`` and reports
    description: str = ""
    #: default minibatch size (the paper's / DeepOBS's)
    batch_size: int = 128
    #: default epoch budget
    epochs: int = 1
    #: whether ``accuracy`` is meaningful (False for regression-like problems such as quadratic_deep)
    has_accuracy: bool = True
    #: default size of the validation split carved from the training set
    validation_size: int = 5000
    #: whether the training loop should drop the last incomplete batch of an epoch (DeepOBS does)
    drop_last: bool = False
    #: minibatch size for evaluation passes (no gradients, so larger than ``batch_size`` is fine)
    eval_batch_size: int = 1000
    #: one sentence on how the problem is evaluated (which splits, any augmentation, metrics)
    evaluation: str = (
        "after each epoch: mean loss and accuracy over the full valid and test splits in eval "
        "mode, without augmentation; train loss and accuracy are the means over the epoch's "
        "minibatches in train mode"
    )
    #: where the problem comes from (paper, code, DeepOBS) and any deliberate deviation
    reference: str = ""

    @abc.abstractmethod
    def load(self, *, data_dir: Path | None = None, validation_size: int | None = None,
             seed: int = 0) -> Splits:
        """Return the splits, preprocessed and ready to batch (float inputs, long targets).

        ``data_dir`` overrides the cache folder; ``validation_size`` overrides the class default;
        ``seed`` fixes the train/valid permutation.
        """

    @abc.abstractmethod
    def make_model(self, seed: int) -> nn.Module:
        """Build the model with weights initialised deterministically from ``seed``."""

    #: names of the whole-split metrics :meth:`split_metrics` returns (reported per evaluated
    #: split as ``valid_<name>`` and ``test_<name>``)
    split_metric_names: tuple[str, ...] = ()

    #: keys of :meth:`batch_metrics` beyond ``loss_sum``/``count``/``correct`` that
    #: :meth:`split_metrics` reads; the runner sums exactly these over ranks, so that a rank
    #: that saw no example (and so has no keys) still takes part in the same all-reduce
    split_sum_keys: tuple[str, ...] = ()

    def metric_names(self) -> tuple[str, ...]:
        """Names of the metrics the runner should report for this problem."""
        base: tuple[str, ...] = ("train_loss", "valid_loss", "test_loss")
        if self.has_accuracy:
            base = (*base, "train_accuracy", "valid_accuracy", "test_accuracy", "test_error")
        extra = tuple(f"{s}_{m}" for s in ("valid", "test") for m in self.split_metric_names)
        return (*base, *extra)

    def split_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Metrics of a whole split that are not means of per-example values (mean IU is a ratio
        of sums over the split), computed from the split's summed :meth:`batch_metrics`.

        Keys must be :attr:`split_metric_names`; the default problem has none.
        """
        del sums
        return {}

    def augment(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training-time augmentation of one minibatch (identity unless a problem overrides it).

        The runner calls it on training batches only, with a generator it seeds, so runs stay
        deterministic.
        """
        del generator
        return inputs

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch (cross-entropy unless overridden)."""
        return nn.functional.cross_entropy(outputs, targets)

    def batch_metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sums over the batch: ``loss_sum``, ``count`` and (if ``has_accuracy``) ``correct``."""
        n = targets.shape[0]
        out = {
            "loss_sum": self.loss(outputs, targets).detach() * n,
            "count": torch.tensor(float(n)),
        }
        if self.has_accuracy:
            out["correct"] = (outputs.argmax(dim=1) == targets).sum().to(torch.float64)
        return out


_REGISTRY: dict[str, Callable[[], Problem]] = {}

_F = TypeVar("_F", bound=Callable[[], Problem])


def register_problem(factory: _F) -> _F:
    """Register a problem class (or zero-argument factory) under its ``name``; usable as decorator.

    Returns ``factory`` unchanged, so a decorated class keeps its type for type checkers.
    """
    # A class carries its name as a class attribute; a plain factory has to be called once.
    name = str(getattr(factory, "name", "")) if isinstance(factory, type) else factory().name
    if not name:
        raise ValueError("a problem needs a non-empty `name` to be registered")
    if name in _REGISTRY:
        raise ValueError(f"problem {name!r} is registered twice")
    _REGISTRY[name] = factory
    return factory


def get_problem(name: str) -> Problem:
    """Instantiate the registered problem ``name``; unknown names list the known ones."""
    _import_builtin_problems()
    try:
        return _REGISTRY[name]()
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise KeyError(f"unknown problem {name!r}; known problems: {known}") from None


def problem_names() -> list[str]:
    """Names of all registered problems, sorted."""
    _import_builtin_problems()
    return sorted(_REGISTRY)


def _import_builtin_problems() -> None:
    # Importing the package runs each problem module's register_problem call.
    import bpgrad.bench.problems  # noqa: F401
