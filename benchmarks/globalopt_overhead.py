"""Bookkeeping overhead of ``bpgrad.minimize`` per evaluation, for 10^3-10^5 evaluations.

Runs a cheap objective (Rastrigin, ~15 µs per call) with ``polish=False`` so every evaluation is a
global sample, measures total wall time and subtracts the objective's own time (timed in a
separate loop over the same points). Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/globalopt_overhead.py [--max 100000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bpgrad.globalopt import minimize


def rastrigin(x: np.ndarray) -> float:
    return float(10 * x.size + np.sum(x * x - 10 * np.cos(2 * np.pi * x)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max", type=int, default=100_000)
    ap.add_argument("--dims", type=int, nargs="*", default=[2, 6])
    a = ap.parse_args()
    print("| d | evaluations | total s | objective s | overhead µs/eval |")
    print("|---|---|---|---|---|")
    for d in a.dims:
        bounds = [(-5.12, 4.0 + 0.1 * i) for i in range(d)]
        n = 1000
        while n <= a.max:
            t0 = time.perf_counter()
            res = minimize(rastrigin, bounds, maxfev=n, polish=False)
            total = time.perf_counter() - t0
            t1 = time.perf_counter()
            for x in res.history_x:
                rastrigin(x)
            fobj = time.perf_counter() - t1
            over = (total - fobj) / res.nfev * 1e6
            print(f"| {d} | {res.nfev} | {total:.2f} | {fobj:.2f} | {over:.0f} |", flush=True)
            n *= 10
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
