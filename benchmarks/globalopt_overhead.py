"""Bookkeeping overhead of ``bpgrad.minimize`` per evaluation, and its first-call compile time.

Runs a cheap objective (Rastrigin, ~15 µs per call) with ``polish=False`` so every evaluation is a
global sample, measures the process's total CPU time and subtracts the objective's own time
(timed in a separate loop over the same points). A warm-up run first loads (or compiles) the search, so
compilation is excluded. ``--compile`` instead times the first call in a fresh process with an
empty numba cache (wall and CPU seconds), then again with the cache filled. Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/globalopt_overhead.py [--max 100000]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/globalopt_overhead.py --compile

To compare with another revision, run this script with ``PYTHONPATH`` pointing at that
revision's ``src`` (e.g. ``git archive REV src | tar -x -C /tmp/old``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from bpgrad.globalopt import minimize

_FIRST_CALL = """
import time
t0, c0 = time.perf_counter(), time.process_time()
from bpgrad.globalopt import minimize
minimize(lambda x: float((x ** 2).sum()), [(-1.0, 2.0)] * 2, maxfev=300)
print(f"{time.perf_counter() - t0:.1f} {time.process_time() - c0:.1f}")
"""


def rastrigin(x: np.ndarray) -> float:
    return float(10 * x.size + np.sum(x * x - 10 * np.cos(2 * np.pi * x)))


def overhead(
    bounds: list[tuple[float, float]], n: int, **options: Any
) -> tuple[Any, float, float, float]:
    # CPU time of this (single-threaded) process: on a shared machine, wall time mostly
    # measures the other jobs.
    t0 = time.process_time()
    res = minimize(rastrigin, bounds, maxfev=n, polish=False, **options)
    total = time.process_time() - t0
    t1 = time.process_time()
    for x in res.history_x:
        rastrigin(x)
    fobj = time.process_time() - t1
    return res, total, fobj, (total - fobj) / res.nfev * 1e6


def compile_time() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        print("| numba cache | import + first minimize, wall s | CPU s |")
        print("|---|---|---|")
        for label in ("empty (compiles)", "filled (loads)"):
            out = subprocess.run(
                [sys.executable, "-c", _FIRST_CALL], env=env, check=True, capture_output=True,
                text=True,
            ).stdout.split()  # fmt: skip
            print(f"| {label} | {out[0]} | {out[1]} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max", type=int, default=100_000)
    ap.add_argument("--dims", type=int, nargs="*", default=[2, 6])
    ap.add_argument("--reps", type=int, default=1, help="runs per row; the minimum is kept")
    ap.add_argument("--compile", action="store_true", help="time the first call instead")
    ap.add_argument("--strategy", default=None,
                    help="minimize's strategy (default: its default); 'hull' compares with "
                    "revisions older than the balanced default")
    a = ap.parse_args()
    options = {} if a.strategy is None else {"strategy": a.strategy}
    if a.compile:
        compile_time()
        return 0
    overhead([(0.0, 1.0)], 100)  # load or compile the search before timing
    # Per iteration too: the strategies differ in how many cells they divide per evaluation.
    print("| d | evaluations | iterations | total CPU s | objective CPU s | overhead µs/eval | µs/iteration |")
    print("|---|---|---|---|---|---|---|")
    for d in a.dims:
        bounds = [(-5.12, 4.0 + 0.1 * i) for i in range(d)]
        n = 1000
        while n <= a.max:
            runs = [overhead(bounds, n, **options) for _ in range(a.reps)]
            res, total, fobj, over = min(runs, key=lambda r: r[3])
            per_iter = over * res.nfev / max(res.nit, 1)
            print(f"| {d} | {res.nfev} | {res.nit} | {total:.2f} | {fobj:.2f} | {over:.0f} | "
                  f"{per_iter:.1f} |", flush=True)
            n *= 10
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
