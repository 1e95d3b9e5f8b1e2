"""How many iterations ``bpgrad.minimize`` makes per evaluation of budget, on BBOB and GKLS.

An iteration divides or prunes one cell; most divide a cell and evaluate new centres, but a cell
whose new centres lie in pruning balls is divided without an evaluation. Those silent divisions
cost time and memory (each makes three cells) and are bounded only by ``maxiter``, whose default
is a multiple of ``maxfev``. This script runs the search with estimated L (with ``--suite26``
also the 26-function suite with its known L), ``maxfev`` = the budget, ``tol`` = 1e-12 as in the
suites' runs and ``maxiter`` = 100·maxfev (the default with a known L, and before December 2026
for every run) on the suites' problems, and records per run ``nit``, ``nfev``, the status and
the wall time. A run whose final ``nit`` is below ``C · maxfev`` makes exactly the same decisions
under a cap of ``C · maxfev`` (the cap is only compared with ``nit``), so one run per problem
tells which runs any smaller cap would change.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/iteration_survey.py \\
        --out runs/iteration_survey.jsonl --gkls-functions 100 --suite26   # resumable
    .venv/bin/python benchmarks/iteration_survey.py --out runs/iteration_survey.jsonl \\
        --gkls-functions 100 --suite26 --no-run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bbob_bench
import bbob_gkls_common as common
import gkls_bench
import globalopt_problems

import globalopt

CAPS = (1, 2, 5, 10, 20, 50)
# The cap the survey runs under: the default with a known L (and, before December 2026, the
# default for every run), so that it sees how many iterations the runs ask for.
SURVEY_CAP = 100


def problems(a: argparse.Namespace) -> list[tuple[str, str, dict[str, Any], int]]:
    """(suite, key, spec, budget) for every run of the survey."""
    out = []
    for mult in a.budgets:
        for i in range(1, a.bbob_instances + 1):
            for d in a.bbob_dims:
                for f in range(1, 25):
                    out.append(("bbob", bbob_bench.key(f, i, d), {"f": f, "i": i, "d": d},
                                mult * d))
        for diff, d in gkls_bench.CLASSES:
            for k in range(1, a.gkls_functions + 1):
                spec = {"difficulty": diff, "d": d, "k": k}
                out.append(("gkls", gkls_bench.class_key(diff, d, k), spec, mult * d))
    # the 26-function suite of results.md §4: three boxes, estimated and known L, its budget 2000
    for prob in globalopt_problems.problems() if a.suite26 else []:
        for box in range(3):
            for known in (False, True):
                key = f"{prob.name}:box{box}:{'known' if known else 'est'}"
                spec = {"name": prob.name, "box": box, "known": known}
                out.append(("suite26", key, spec, globalopt.MAX_BUDGET))
    return out


def run_one(suite: str, spec: dict[str, Any], budget: int) -> dict[str, Any]:
    from bpgrad.globalopt import minimize

    L = None
    if suite == "bbob":
        prob, lb, ub, _ = bbob_bench.build(spec)
    elif suite == "gkls":
        prob, lb, ub, _ = gkls_bench.build(spec)
    else:
        prob = next(p for p in globalopt_problems.problems() if p.name == spec["name"])
        info = globalopt.setup(prob, spec["box"])
        lb, ub = np.array(info["lb"]), np.array(info["ub"])
        prob = dataclasses.replace(prob, fstar=info["fstar"])
        L = info["L"] if spec["known"] else None
    t0 = time.perf_counter()
    res = minimize(lambda x: prob.fn(x, np), list(zip(lb, ub, strict=True)), maxfev=budget,
                   tol=1e-12, lipschitz=L, maxiter=SURVEY_CAP * budget)
    return {"nit": int(res.nit), "nfev": int(res.nfev), "status": int(res.status),
            "best_gap": float(res.fun - prob.fstar), "wall_s": time.perf_counter() - t0}


def _quantiles(rows: list[dict[str, Any]], title: str) -> list[str]:
    ratio = np.array([r["nit"] / r["budget"] for r in rows])
    lines = [f"{title}: {len(rows)} runs, iterations per evaluation of budget (nit / maxfev); "
             "runs a cap of C·maxfev would stop early:", "",
             "| 50 % | 90 % | 99 % | max | " + " | ".join(f"C = {c}" for c in CAPS) + " |",
             "|---|---|---|---|" + "---|" * len(CAPS),
             "| " + " | ".join(f"{np.quantile(ratio, q):.2f}" for q in (0.5, 0.9, 0.99, 1.0))
             + " | " + " | ".join(str(int((ratio >= c).sum())) for c in CAPS) + " |"]
    return lines


def report(rows: list[dict[str, Any]]) -> str:
    known = [r for r in rows if r["key"].endswith(":known")]
    estimated = [r for r in rows if not r["key"].endswith(":known")]
    lines = _quantiles(estimated, "Estimated L")
    if known:
        lines += ["", *_quantiles(known, "Known L")]
    lines += ["", "Runs at or above 5·maxfev:", "", "| suite | problem | budget | nit | nfev | "
              "status | wall s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["nit"] / r["budget"]):
        if r["nit"] >= 5 * r["budget"]:
            lines.append(f"| {r['suite']} | {r['key']} | {r['budget']} | {r['nit']} | "
                         f"{r['nfev']} | {r['status']} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    common.env_threads()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, one per run (resumable)")
    ap.add_argument("--budgets", nargs="*", type=int, default=[100, 1000], help="multiples of d")
    ap.add_argument("--bbob-dims", nargs="*", type=int, default=[2, 3, 5])
    ap.add_argument("--bbob-instances", type=int, default=5)
    ap.add_argument("--gkls-functions", type=int, default=20)
    ap.add_argument("--suite26", action="store_true", help="add the 26-function suite's runs")
    ap.add_argument("--no-run", action="store_true")
    a = ap.parse_args()
    done = set()
    if a.out.exists():
        done = {(r["key"], r["budget"]) for r in map(json.loads, a.out.read_text().splitlines())}
    if not a.no_run:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        for suite, key, spec, budget in problems(a):
            if (key, budget) in done:
                continue
            rec = {"suite": suite, "key": key, "budget": budget, **run_one(suite, spec, budget)}
            with a.out.open("a") as fh:  # one line per run: an interrupted survey resumes
                fh.write(json.dumps(rec) + "\n")
            print(f"{key} b{budget} nit={rec['nit']} nfev={rec['nfev']} "
                  f"status={rec['status']} {rec['wall_s']:.1f}s", flush=True)
    wanted = {(key, budget) for _, key, _, budget in problems(a)}
    rows = [r for r in map(json.loads, a.out.read_text().splitlines())
            if (r["key"], r["budget"]) in wanted]
    print(report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
