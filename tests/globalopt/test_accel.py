"""The optional compiled kernels (numba) must take exactly the decisions of the NumPy path.

The digests of ``test_equivalence.py`` are checked here with the kernels forced off, so the NumPy
path stays pinned when numba is installed; with numba present they are also checked with the
kernels on, and longer runs (dimensions past numpy's 8-wide unrolled block included) must
evaluate the same points either way.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import pytest
from test_equivalence import CASES, DATA, record  # pytest puts this folder on sys.path

from bpgrad.globalopt import _accel, minimize

# CI installs the `fast` extra: there a missing numba must fail these checks, not skip them.
needs_numba = pytest.mark.skipif(
    not _accel.available() and not os.environ.get("CI"),
    reason="numba is not installed (pip install 'bpgrad[fast]')",
)


def _run(monkeypatch: pytest.MonkeyPatch, fast: bool, fn: Any) -> Any:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(_accel, "kernels_for", lambda d: False)
        return fn()


@pytest.mark.parametrize("name", sorted(CASES))
def test_numpy_path_pinned(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    want = json.loads(DATA.read_text())[name]
    got = record(_run(monkeypatch, False, CASES[name]))
    assert got == want


def _bumpy(x: np.ndarray) -> float:
    return float(np.sum(x * x) + 3 * np.sum(np.abs(np.sin(3 * x))))


def _with_nan(x: np.ndarray) -> float:
    return math.nan if x[0] > 0.5 and x[1] < -0.5 else float(np.sum((x - 0.2) ** 2))


@needs_numba
@pytest.mark.parametrize(
    ("d", "n", "kw"),
    [
        (1, 3000, {}),
        (2, 6000, {}),
        (3, 4000, {"strategy": "bound", "lipschitz": 60.0, "tol": 1e-9}),
        (6, 5000, {}),
        (9, 3000, {}),
        (17, 2000, {}),
        (2, 3000, {"jac": None, "branch": True, "f_lower": 0.0, "rho": 0.2}),
    ],
)
def test_kernels_match_numpy(
    d: int, n: int, kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    bounds = [(-3.0 - 0.1 * i, 2.5 + 0.07 * i) for i in range(d)]
    fn = _with_nan if d == 2 and kw.get("branch") else _bumpy
    runs = [
        _run(monkeypatch, fast, lambda: minimize(fn, bounds, maxfev=n, **kw))
        for fast in (False, True)
    ]
    a, b = runs
    assert np.array_equal(a.history_x, b.history_x)
    assert np.array_equal(a.history_f, b.history_f, equal_nan=True)
    assert (a.lower_bound, a.lipschitz, a.max_slope, a.nit) == (
        b.lower_bound,
        b.lipschitz,
        b.max_slope,
        b.nit,
    )


@needs_numba
@pytest.mark.parametrize("d", [1, 2, 3, 5, 6, 7, 8, 9, 16, 23])
def test_sum_of_squares_order(d: int) -> None:
    assert _accel.kernels_for(d)
    rng = np.random.default_rng(d)
    A = rng.standard_normal((2000, d)) * np.exp(rng.uniform(-5, 5, (2000, d)))
    assert np.array_equal(_accel.rows_sumsq(A), np.einsum("ij,ij->i", A, A))


def _stop_at_300(r: Any) -> bool:
    return bool(r.nit >= 300)


@needs_numba
@pytest.mark.parametrize(
    "kw",
    [
        {"callback": _stop_at_300},
        {"f_target": 0.5},
        {"maxiter": 700, "polish": False},
        {"jac": True, "branch_steps": 2},
        {"lipschitz": 40.0, "tol": 1e-3},
        {"seed": 7, "strategy": "bound"},
    ],
)
def test_compiled_loop_events_match_numpy(
    kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled search loop hands polish, branch steps, the callback and every stop back to
    Python; each hand-over must leave the run where the NumPy path is."""

    def fn(x: np.ndarray) -> Any:
        f = _bumpy(x)
        if kw.get("jac"):
            return f, 2 * x + 9 * np.cos(3 * x) * np.sign(np.sin(3 * x))
        return f

    bounds = [(-3.0, 2.5), (-2.0, 2.9), (-2.5, 2.2)]
    a, b = (
        _run(monkeypatch, fast, lambda: minimize(fn, bounds, maxfev=3000, **kw))
        for fast in (False, True)
    )
    assert np.array_equal(a.history_x, b.history_x)
    assert (a.status, a.nit, a.njev, a.lower_bound, a.lipschitz) == (
        b.status,
        b.nit,
        b.njev,
        b.lower_bound,
        b.lipschitz,
    )
