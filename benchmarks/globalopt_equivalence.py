"""Check that ``bpgrad.minimize`` evaluates exactly the points a reference revision evaluates.

Loads ``src/bpgrad/globalopt/_core.py`` as it is at a git revision (default: 9ab99bb, the plain
O(n)-scan implementation) into a private module and runs both on the same problems with the same
settings; the full ``history_x``/``history_f``/``history_kind`` arrays must be bit-identical.
``tests/globalopt/test_equivalence.py`` pins smaller runs without git. Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/globalopt_equivalence.py [--rev REV] [--n 2000]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bpgrad.globalopt import minimize

ROOT = Path(__file__).resolve().parents[1]


def load_reference(rev: str) -> Any:
    src = subprocess.run(
        ["git", "show", f"{rev}:src/bpgrad/globalopt/_core.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "_core_ref.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("bpgrad.globalopt._core_ref", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def rastrigin(x: np.ndarray) -> float:
    return float(10 * x.size + np.sum(x * x - 10 * np.cos(2 * np.pi * x)))


def ackley(x: np.ndarray) -> float:
    d = x.size
    return float(
        -20 * np.exp(-0.2 * np.sqrt(np.sum(x * x) / d))
        - np.exp(np.sum(np.cos(2 * np.pi * x)) / d)
        + 20
        + np.e
    )


def branin(x: np.ndarray) -> float:
    b, c, t = 5.1 / (4 * np.pi**2), 5 / np.pi, 1 / (8 * np.pi)
    return float((x[1] - b * x[0] ** 2 + c * x[0] - 6) ** 2 + 10 * (1 - t) * np.cos(x[0]) + 10)


def griewank(x: np.ndarray) -> float:
    i = np.arange(1, x.size + 1)
    return float(1 + np.sum(x * x) / 4000 - np.prod(np.cos(x / np.sqrt(i))))


def cases(n: int) -> list[tuple[str, Any, list[tuple[float, float]], dict[str, Any]]]:
    def box(d: int) -> list[tuple[float, float]]:
        return [(-5.12, 4.0 + 0.1 * i) for i in range(d)]

    return [
        ("rastrigin d=2 polish=False", rastrigin, box(2), {"maxfev": n, "polish": False}),
        ("rastrigin d=6 polish=False", rastrigin, box(6), {"maxfev": n, "polish": False}),
        ("ackley d=3 default", ackley, box(3), {"maxfev": n, "tol": 1e-12}),
        (
            "branin d=2 L=60 bound",
            branin,
            [(-5.0, 10.0), (0.0, 15.0)],
            {"maxfev": n, "lipschitz": 60.0, "strategy": "bound", "tol": 1e-9},
        ),
        (
            "griewank d=4 f_lower=0",
            griewank,
            [(-30.0, 40.0)] * 4,
            {"maxfev": n, "f_lower": 0.0, "tol": 1e-12},
        ),
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", default="9ab99bb")
    ap.add_argument("--n", type=int, default=2000)
    a = ap.parse_args()
    ref = load_reference(a.rev)
    bad = 0
    for name, f, bounds, kw in cases(a.n):
        t0 = time.perf_counter()
        r_new = minimize(f, bounds, **kw)
        t1 = time.perf_counter()
        r_ref = ref.minimize(f, bounds, **kw)
        t2 = time.perf_counter()
        same = all(
            np.array_equal(r_new[k], r_ref[k]) for k in ("history_x", "history_f", "history_kind")
        ) and all(
            r_new[k] == r_ref[k] for k in ("nfev", "nit", "status", "lower_bound", "max_slope")
        )
        bad += not same
        print(
            f"{name:32s} nfev={r_new.nfev:6d} nit={r_new.nit:6d} "
            f"{'IDENTICAL' if same else 'DIFFERENT'}  new {t1 - t0:6.2f} s, ref {t2 - t1:6.2f} s",
            flush=True,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
