"""The search's decisions are pinned: fixed runs must evaluate exactly the same points.

Speed-ups of the bookkeeping (spatial index, batched random keys, cached bounds) must not change
which points ``minimize`` evaluates. Each case below runs 2000 evaluations and compares SHA-256
digests of the exact bytes of ``history_x``, ``history_f`` and ``history_kind`` and the exact
reprs of the scalar results against ``data/equivalence.json``, recorded with the plain O(n)
implementation. The objectives use only correctly rounded float operations (no ``cos``), so the
digests do not depend on the platform's libm.

Regenerate (only when a change of the algorithm's decisions is intended)::

    .venv/bin/python tests/globalopt/test_equivalence.py --regenerate
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bpgrad.globalopt import minimize

DATA = Path(__file__).parent / "data" / "equivalence.json"
SCALARS = ("nfev", "njev", "nit", "status", "fun", "lower_bound", "lipschitz", "max_slope")


def styblinski_tang(x: np.ndarray) -> float:
    return 0.5 * sum(float(v) ** 4 - 16 * float(v) ** 2 + 5 * float(v) for v in x)


def six_hump(x: np.ndarray) -> float:
    a, b = float(x[0]), float(x[1])
    return (4 - 2.1 * a * a + a**4 / 3) * a * a + a * b + (-4 + 4 * b * b) * b * b


def rosenbrock(x: np.ndarray) -> tuple[float, np.ndarray]:
    v = [float(t) for t in x]
    f = sum(100 * (v[i + 1] - v[i] ** 2) ** 2 + (1 - v[i]) ** 2 for i in range(len(v) - 1))
    g = [0.0] * len(v)
    for i in range(len(v) - 1):
        g[i] += -400 * v[i] * (v[i + 1] - v[i] ** 2) - 2 * (1 - v[i])
        g[i + 1] += 200 * (v[i + 1] - v[i] ** 2)
    return f, np.array(g)


def egg_crate(x: np.ndarray) -> float:
    # Rastrigin-like: a bowl plus a triangle wave of period 1 in every coordinate.
    return sum(float(v) ** 2 + 10 * abs(float(v) - math.floor(float(v)) - 0.5) for v in x)


def holey(x: np.ndarray) -> float:
    # NaN in one corner, a non-negative bowl elsewhere (exercises f_lower, rho and NaN paths).
    a, b = float(x[0]), float(x[1])
    if a > 1.5 and b > 1.5:
        return math.nan
    return (a - 0.7) ** 2 + 2 * (b + 0.3) ** 2 + abs(a * b)


CASES: dict[str, Callable[[], Any]] = {
    "styblinski_tang_d2_hull": lambda: minimize(
        styblinski_tang, [(-5.0, 4.3), (-4.6, 5.0)], maxfev=2000, tol=1e-12
    ),
    "six_hump_d2_bound_known_L": lambda: minimize(
        six_hump,
        [(-2.0, 2.1), (-1.1, 1.0)],
        lipschitz=200.0,
        strategy="bound",
        maxfev=2000,
        tol=1e-9,
    ),
    "rosenbrock_d3_jac_branch": lambda: minimize(
        rosenbrock, [(-2.0, 2.5), (-1.5, 2.0), (-2.2, 2.0)], jac=True, maxfev=2000, tol=1e-12
    ),
    "egg_crate_d6_nopolish": lambda: minimize(
        egg_crate, [(-5.12, 4.0 + 0.1 * i) for i in range(6)], maxfev=2000, polish=False
    ),
    "holey_d2_flower_nan": lambda: minimize(
        holey, [(-2.0, 2.0), (-2.0, 2.2)], f_lower=0.0, rho=0.3, maxfev=2000, tol=1e-12
    ),
}


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def record(res: Any) -> dict[str, Any]:
    out: dict[str, Any] = {k: repr(res[k]) for k in SCALARS}
    out["x"] = repr([float(v) for v in res.x])
    for key in ("history_x", "history_f", "history_kind"):
        out[key] = _digest(res[key])
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_unchanged(name: str) -> None:
    want = json.loads(DATA.read_text())[name]
    got = record(CASES[name]())
    diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    assert not diff, f"{name}: the search took different decisions: {diff}"


if __name__ == "__main__":
    if "--regenerate" not in sys.argv:
        raise SystemExit("usage: test_equivalence.py --regenerate")
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps({k: record(f()) for k, f in CASES.items()}, indent=1) + "\n")
    print(f"wrote {DATA}")
