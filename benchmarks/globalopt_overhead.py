"""Bookkeeping overhead of ``bpgrad.minimize`` per evaluation, for 10^3-10^5 evaluations.

Runs a cheap objective (Rastrigin, ~15 µs per call) with ``polish=False`` so every evaluation is a
global sample, measures total wall time and subtracts the objective's own time (timed in a
separate loop over the same points). With ``--rev REV`` it also loads ``_core.py`` as it is at
that git revision and runs both versions back to back in this one process, ``--reps`` times each
(the minimum is kept), so machine load affects both alike; the evaluated points must be
identical. The working tree uses the compiled search loop of ``_engine.py`` (and the kernels of
``_accel.py``) when numba can be imported (``BPGRAD_NUMBA=0`` times the NumPy path); the first
line printed says which. Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/globalopt_overhead.py [--max 100000]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/globalopt_overhead.py --rev b802414 --reps 3
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bpgrad.globalopt import _accel, minimize

# The same loader the equivalence check uses: _core.py of another git revision, as a module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from globalopt_equivalence import load_reference


def rastrigin(x: np.ndarray) -> float:
    return float(10 * x.size + np.sum(x * x - 10 * np.cos(2 * np.pi * x)))


def overhead(
    fn: Callable[..., Any], bounds: list[tuple[float, float]], n: int
) -> tuple[Any, float, float, float]:
    t0 = time.perf_counter()
    res = fn(rastrigin, bounds, maxfev=n, polish=False)
    total = time.perf_counter() - t0
    t1 = time.perf_counter()
    for x in res.history_x:
        rastrigin(x)
    fobj = time.perf_counter() - t1
    return res, total, fobj, (total - fobj) / res.nfev * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max", type=int, default=100_000)
    ap.add_argument("--dims", type=int, nargs="*", default=[2, 6])
    ap.add_argument("--rev", default=None, help="also time _core.py at this git revision")
    ap.add_argument("--reps", type=int, default=1)
    a = ap.parse_args()
    ref = None if a.rev is None else load_reference(a.rev)
    path = "numba (compiled loop)" if _accel.available() else "NumPy only"
    print(f"working tree: {path}\n")
    if ref is None:
        print("| d | evaluations | total s | objective s | overhead µs/eval |")
        print("|---|---|---|---|---|")
    else:
        print(f"| d | evaluations | {a.rev} µs/eval | working tree µs/eval | ratio |")
        print("|---|---|---|---|---|")
    for d in a.dims:
        bounds = [(-5.12, 4.0 + 0.1 * i) for i in range(d)]
        n = 1000
        while n <= a.max:
            if ref is None:
                res, total, fobj, over = overhead(minimize, bounds, n)
                print(f"| {d} | {res.nfev} | {total:.2f} | {fobj:.2f} | {over:.0f} |", flush=True)
            else:
                before, after = [], []
                for _ in range(a.reps):
                    r_ref, *_, o_ref = overhead(ref.minimize, bounds, n)
                    r_new, *_, o_new = overhead(minimize, bounds, n)
                    if not np.array_equal(r_ref.history_x, r_new.history_x):
                        raise SystemExit(f"d={d} n={n}: the two versions evaluated other points")
                    before.append(o_ref)
                    after.append(o_new)
                b, w = min(before), min(after)
                print(f"| {d} | {r_new.nfev} | {b:.0f} | {w:.0f} | {b / w:.2f} |", flush=True)
            n *= 10
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
