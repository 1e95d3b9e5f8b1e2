"""Benchmark problems. Importing this package registers every built-in problem.

Built-in problems: ``mnist_lenet`` and ``cifar10_quick`` (the BPGrad paper's nets),
``fmnist_2c2d``, ``mnist_logreg``, ``mnist_mlp`` and ``quadratic_deep`` (DeepOBS); issue 12's
wider suite: ``mnist_canvas_fcn`` (segmentation, mean IU), ``fortunes_lstm`` (character LSTM
language model), ``segment_mlp`` (tabular) and ``teacher_student`` (known optimum).
"""

from bpgrad.bench.problems import (  # noqa: F401  (imported for their registration)
    cifar10_quick,
    fmnist_2c2d,
    fortunes_lstm,
    mnist_canvas_fcn,
    mnist_lenet,
    mnist_logreg,
    mnist_mlp,
    quadratic_deep,
    segment_mlp,
    teacher_student,
)
from bpgrad.bench.problems.base import (
    Problem,
    Split,
    Splits,
    get_problem,
    problem_names,
    register_problem,
)

__all__ = ["Problem", "Split", "Splits", "get_problem", "problem_names", "register_problem"]
