"""Benchmark problems. Importing this package registers every built-in problem."""

from bpgrad.bench.problems.base import (
    Problem,
    Split,
    Splits,
    get_problem,
    problem_names,
    register_problem,
)

__all__ = ["Problem", "Split", "Splits", "get_problem", "problem_names", "register_problem"]
