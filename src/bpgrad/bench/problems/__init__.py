"""Benchmark problems. Importing this package registers every built-in problem.

Built-in problems: ``mnist_lenet`` and ``cifar10_quick`` (the BPGrad paper's nets),
``fmnist_2c2d``, ``mnist_logreg``, ``mnist_mlp`` and ``quadratic_deep`` (DeepOBS).
"""

from bpgrad.bench.problems import (  # noqa: F401  (imported for their registration)
    cifar10_quick,
    fmnist_2c2d,
    mnist_lenet,
    mnist_logreg,
    mnist_mlp,
    quadratic_deep,
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
