"""``teacher_student``: a realizable two-layer ReLU regression whose global minimum is known (0).

The paper's title claim is "towards global optimality". On a real network the global minimum of
the training loss is unknown, so whether a solver gets there cannot be checked. Here it is known:

* a fixed random **teacher** ``t(x) = a^T relu(W x + b) + c`` with ``m = 4`` hidden units on
  ``x in R^d``, ``d = 8``, labels every input exactly (no noise);
* the **student** is the same architecture with ``k = 8 >= m`` hidden units. Copying the
  teacher's units into ``m`` of them and giving the other ``k - m`` units output weight 0 gives
  the teacher exactly (:func:`embed_teacher`), so ``min_theta L(theta) = 0`` for the
  mean-squared-error training loss ``L``, and ``L >= 0`` everywhere (BPGrad's ``f >= 0``).

"Reached the global minimum" means: full-batch training loss at the final parameters below
:data:`GLOBAL_TOL` = 1e-4 (:func:`reached_global`). For scale, the targets' mean square is about
0.10 (measured on the training inputs), so 1e-4 is 0.1 % of the loss of predicting 0.

Splits, deliberately unlike the image problems (this problem measures optimisation, not
generalisation): ``train`` holds the ``N_TRAIN`` fixed inputs; ``valid`` is **the training set
itself** (same inputs, same targets), so ``valid_loss`` is the full-batch training loss at the
end of each epoch and ``valid_reached_global`` the criterion; ``test`` holds ``N_TEST`` fresh inputs
from the same distribution. The teacher and all inputs are fixed draws (seeded by a constant), so
every trial seed sees the same data; the trial seed only changes the student's initialisation and
the minibatch order. No data file is needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from bpgrad.bench.problems._common import seeded
from bpgrad.bench.problems.base import Problem, Split, Splits, register_problem

#: full-batch training loss below which the global minimum (0) counts as reached
GLOBAL_TOL = 1e-4
INPUT_DIM = 8
TEACHER_WIDTH = 4
STUDENT_WIDTH = 8
N_TRAIN = 1000
N_TEST = 1000
#: constant seed of the teacher and the inputs (the data are part of the problem's definition)
DATA_SEED = 20181118


def reached_global(train_loss: float | None, tol: float = GLOBAL_TOL) -> bool:
    """Whether a full-batch training loss counts as the global minimum 0: ``0 <= loss < tol``.

    ``None`` (no evaluation) and non-finite values (a diverged run) are not a minimum.
    """
    if train_loss is None or not math.isfinite(train_loss):
        return False
    return 0.0 <= train_loss < tol


def _linears(net: nn.Sequential) -> tuple[nn.Linear, nn.Linear]:
    """The hidden and the output layer of a ``Linear, ReLU, Linear`` network."""
    hidden, out = net[0], net[2]
    if not (isinstance(hidden, nn.Linear) and isinstance(out, nn.Linear)):
        raise TypeError("expected nn.Sequential(Linear, ReLU, Linear)")
    return hidden, out


def make_teacher() -> nn.Sequential:
    """The fixed teacher ``a^T relu(W x + b) + c`` (weights drawn from ``DATA_SEED``)."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    teacher = nn.Sequential(nn.Linear(INPUT_DIM, TEACHER_WIDTH), nn.ReLU(),
                            nn.Linear(TEACHER_WIDTH, 1))
    hidden, out = _linears(teacher)
    with torch.no_grad():
        # Rows of W ~ N(0, I/d) keep pre-activations O(1) for x ~ N(0, I); output weights
        # ~ N(0, 4/m) give targets of mean square about 0.1.
        hidden.weight.copy_(torch.randn(TEACHER_WIDTH, INPUT_DIM, generator=gen)
                            / math.sqrt(INPUT_DIM))
        hidden.bias.copy_(0.1 * torch.randn(TEACHER_WIDTH, generator=gen))
        out.weight.copy_(2.0 * torch.randn(1, TEACHER_WIDTH, generator=gen)
                         / math.sqrt(TEACHER_WIDTH))
        out.bias.zero_()
    teacher.requires_grad_(False)
    return teacher


def embed_teacher(student: nn.Sequential, teacher: nn.Sequential) -> None:
    """Set ``student`` (width ``k >= m``) to compute exactly the teacher's function: its first
    ``m`` units copy the teacher's, the others get output weight 0. The witness that the global
    minimum of the training loss is 0."""
    t_hidden, t_out = _linears(teacher)
    s_hidden, s_out = _linears(student)
    m = t_hidden.out_features
    if s_hidden.out_features < m:
        raise ValueError(f"student width {s_hidden.out_features} < teacher width {m}: "
                         f"the teacher is not realizable")
    with torch.no_grad():
        s_hidden.weight[:m].copy_(t_hidden.weight)
        s_hidden.bias[:m].copy_(t_hidden.bias)
        s_out.weight.zero_()
        s_out.weight[:, :m].copy_(t_out.weight)
        s_out.bias.copy_(t_out.bias)


def make_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed training and test inputs, ``x ~ N(0, I_d)``."""
    gen = torch.Generator().manual_seed(DATA_SEED + 1)
    x_train = torch.randn(N_TRAIN, INPUT_DIM, generator=gen)
    x_test = torch.randn(N_TEST, INPUT_DIM, generator=gen)
    return x_train, x_test


@register_problem
class TeacherStudent(Problem):
    """Realizable ReLU teacher (width 4) and student (width 8): global minimum 0 is known."""

    name = "teacher_student"
    description = ("known optimum: 2-layer ReLU student (width 8) fits a random ReLU teacher "
                   "(width 4) on 1000 fixed inputs; min training MSE is exactly 0")
    batch_size = 50
    epochs = 100
    has_accuracy = False
    validation_size = N_TRAIN  # valid *is* the training set (see the module docstring)
    eval_batch_size = N_TRAIN
    split_metric_names = ("reached_global",)
    evaluation = ("after each epoch: full-batch MSE on valid = the training set itself (the "
                  "training loss at the current parameters; valid_reached_global = it is "
                  "< 1e-4) and on 1000 fresh test inputs; train loss is the epoch's minibatch mean")
    reference = ("teacher-student setting of Safran & Shamir (ICML 2018, 'Spurious local minima "
                 "are common in two-layer ReLU networks'), over-parameterised student (k = 2m); "
                 "issue 12's known-optimum check of BPGrad's 'towards global optimality'")

    def load(self, *, data_dir: Path | None = None, validation_size: int | None = None,
             seed: int = 0) -> Splits:
        """Fixed inputs labelled by the teacher; ``valid`` is the training set (the
        ``validation_size`` and ``seed`` arguments are accepted and ignored: the data are part of
        the problem's definition)."""
        del data_dir, validation_size, seed
        teacher = make_teacher()
        x_train, x_test = make_inputs()
        train = Split(x_train, teacher(x_train))
        return Splits(train=train, valid=train, test=Split(x_test, teacher(x_test)))

    def make_model(self, seed: int) -> nn.Module:
        """The student, PyTorch's default (Kaiming-uniform) initialisation drawn from ``seed``."""
        with seeded(seed):
            return nn.Sequential(nn.Linear(INPUT_DIM, STUDENT_WIDTH), nn.ReLU(),
                                 nn.Linear(STUDENT_WIDTH, 1))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean squared error ``mean_i (s(x_i) - t(x_i))^2`` (>= 0, minimum 0)."""
        return nn.functional.mse_loss(outputs, targets)

    def split_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """``reached_global``: 1.0 when the split's mean loss is below :data:`GLOBAL_TOL`."""
        count = sums.get("count", 0.0)
        loss = sums["loss_sum"] / count if count else None
        return {"reached_global": float(reached_global(loss))}
