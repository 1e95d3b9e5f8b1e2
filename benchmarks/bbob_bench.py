"""BBOB (COCO) noiseless suite for ``bpgrad.minimize`` against its peers (issue 13, part 4).

Problems come from ``cocoex`` (``coco-experiment``, a benchmark-only optional dependency of the
``globalopt-bench`` extra): the 24 noiseless ``bbob`` functions on the box [-5, 5]^d, the suite's
standard instances (the current default list has 15: 1-5 and 71-80; ``--instances N`` takes the
first N of them). f_opt is f at the instance's x_opt (``problem._best_parameter``).

Scoring as COCO's runtime ECDF: every (function, instance, target) triple with the 51 targets
f - f_opt <= 10^2, 10^1.8, ..., 10^-8 is a pair; a run solves a pair at the first evaluation
whose best-so-far value is within the target. The table gives, per solver and dimension, the
normalised area under the ECDF over log10(evaluations / d) in [0, log10(B / d)] (1 = every pair
solved within d evaluations) and the fraction of pairs solved at the budget B. cocopp is not used:
its reference data downloads, and this machine is offline.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bbob_bench.py --dims 2 3 5 \
        --budget 100 --instances 5 --jobs 2                                # resumable
    .venv/bin/python benchmarks/bbob_bench.py --first-instance 6 --instances 15 ...  # 71-80 only
    .venv/bin/python benchmarks/bbob_bench.py --no-run --dims 2 3 5 --budget 100 --instances 5 \
        --report runs/bbob/tables.md --plot docs/img/bbob_ecdf.png
    .venv/bin/python benchmarks/bbob_bench.py --quick     # d = 2, 3 instances, 20 d evaluations

Runs are cached one JSON per (function, instance, dimension, solver, seed, budget) under
``runs/bbob/cache`` (git-ignored, atomic writes); a rerun skips them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bbob_gkls_common as common
from globalopt_problems import Problem

CACHE = common.ROOT / "runs" / "bbob" / "cache"
# The solvers run on BBOB: the est.-L bpgrad is the one with documented defaults; a "known L" from
# gradients over the box is meaningless for the discontinuous and badly scaled BBOB functions.
DEFAULT_SOLVERS = [s for s in common.DEFAULT_SOLVERS if s != "bpgrad (known L)"]
GROUPS = {  # COCO's function groups
    "separable": range(1, 6),
    "low/moderate cond.": range(6, 10),
    "high cond.": range(10, 15),
    "multimodal": range(15, 20),
    "weakly structured": range(20, 25),
}


def key(f: int, i: int, d: int) -> str:
    return f"f{f:02d}_i{i:02d}_d{d:02d}"


def _problem(spec: dict[str, Any]) -> Any:
    import cocoex

    opts = f"dimensions:{spec['d']} function_indices:{spec['f']} instance_indices:{spec['i']}"
    return cocoex.Suite("bbob", "", opts).next_problem()


def _fopt(p: Any) -> dict[str, Any]:
    """f_opt = f(x_opt); cocoex writes x_opt to a file in the working directory."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            p._best_parameter("print")
            xopt = np.loadtxt("._bbob_problem_best_parameter.txt", ndmin=1)
        finally:
            os.chdir(cwd)
    return {"fopt": float(p(xopt)), "xopt": xopt.tolist(), "instance": int(p.id_instance)}


def build(spec: dict[str, Any]) -> tuple[Problem, np.ndarray, np.ndarray, dict[str, Any]]:
    p = _problem(spec)
    k = key(spec["f"], spec["i"], spec["d"])
    info = common.cached_setup(CACHE / k / "setup.json", lambda: _fopt(p))
    lb, ub = np.array(p.lower_bounds, dtype=float), np.array(p.upper_bounds, dtype=float)
    prob = Problem(k, lambda x, xp: float(p(x)), tuple(lb), tuple(ub), tuple(info["xopt"]),
                   info["fopt"])
    return prob, lb, ub, info


def worker(task: common.Task) -> dict[str, Any]:
    prob, lb, ub, info = build(task.spec)
    rec = common.execute(task, prob, lb, ub, None)
    rec.update(f=task.spec["f"], instance=info["instance"])
    return rec


def per_dim_hits(recs: list[dict[str, Any]], budget_mult: int) -> list[float | None]:
    """Evaluations/d to each of the 51 targets for every record (None: not within the budget)."""
    out: list[float | None] = []
    for r in recs:
        b = budget_mult * r["dim"]
        for t in common.bbob_targets():
            h = common.first_hit(r["trace"], r["fstar"], float(t))
            out.append(None if h is None or h > b else h / r["dim"])
    return out


def pick(recs: list[dict[str, Any]], budget_mult: int) -> list[dict[str, Any]]:
    """Records answering budget ``budget_mult·d``: the run made for it (budget-aware solvers),
    else the run at the largest budget, read from its trace."""
    return [
        r for r in recs
        if (r["budget"] == budget_mult * r["dim"]) or (
            not common.SOLVERS[r["solver"]].budget_aware and r["budget"] >= budget_mult * r["dim"]
        )
    ]


def common_problems(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the problems that every solver present has finished (a partial run's
    table compares like with like)."""
    solvers = {r["solver"] for r in recs}
    if not solvers:
        return []
    keys = set.intersection(*({r["key"] for r in recs if r["solver"] == s} for s in solvers))
    return [r for r in recs if r["key"] in keys]


def summarize(recs: list[dict[str, Any]], dims: list[int], budget_mult: int) -> str:
    recs = common_problems(pick(recs, budget_mult))
    solvers = [s for s in common.SOLVERS if any(r["solver"] == s for r in recs)]
    head = "| solver | " + " | ".join(f"d={d} area | d={d} solved" for d in dims) + " |"
    lines = [
        f"ECDF area over log10(evals/d) in [0, log10 {budget_mult}] and fraction of "
        f"(function, instance, target) pairs solved at {budget_mult}·d evaluations; bold: best.",
        "",
        head,
        "|---|" + "---|---|" * len(dims),
    ]
    table: dict[tuple[str, int], tuple[float, float, int]] = {}
    for s in solvers:
        for d in dims:
            rs = [r for r in recs if r["solver"] == s and r["dim"] == d]
            hits = per_dim_hits(rs, budget_mult)
            area = common.ecdf_area(hits, budget_mult) if hits else float("nan")
            frac = float(np.mean([h is not None for h in hits])) if hits else float("nan")
            table[(s, d)] = (area, frac, len(rs))
    best = {d: max((table[(s, d)][0] for s in solvers if table[(s, d)][2]), default=np.nan)
            for d in dims}
    for s in solvers:
        cells = []
        for d in dims:
            area, frac, n = table[(s, d)]
            if not n:
                cells += ["-", "-"]
                continue
            a = f"{area:.3f}"
            cells += [f"**{a}**" if area >= best[d] - 1e-12 else a, f"{100 * frac:.0f} %"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    # by function group, all dimensions together
    lines += ["", f"ECDF area by function group (all listed d, {budget_mult}·d):", "",
              "| solver | " + " | ".join(GROUPS) + " | runs | errors |",
              "|---|" + "---|" * (len(GROUPS) + 2)]
    for s in solvers:
        rs = [r for r in recs if r["solver"] == s and r["dim"] in dims]
        cells = []
        for fs in GROUPS.values():
            hits = per_dim_hits([r for r in rs if r["f"] in fs], budget_mult)
            cells.append(f"{common.ecdf_area(hits, budget_mult):.3f}" if hits else "-")
        errs = sum(r["error"] is not None for r in rs)
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {len(rs)} | {errs} |")
    return "\n".join(lines)


def paired(recs: list[dict[str, Any]], dims: list[int], budget_mult: int, base: str,
           resamples: int = 10_000) -> str:
    """Area of ``base`` minus each other solver's, paired over the (function, instance) problems
    both ran: the mean difference and a 95 % bootstrap interval (percentile, fixed seed). The
    ECDF area is the mean over problems of each problem's area, so the mean difference is the
    difference of the table's areas."""
    recs = common_problems(pick(recs, budget_mult))
    solvers = [s for s in common.SOLVERS if s != base and any(r["solver"] == s for r in recs)]
    lines = [f"Paired area difference, {base} minus each solver (95 % bootstrap interval over "
             f"problems, {resamples} resamples):", "",
             "| solver | " + " | ".join(f"d={d}" for d in dims) + " |",
             "|---|" + "---|" * len(dims)]
    rng = np.random.default_rng(0)

    def area_by_key(solver: str, d: int) -> dict[str, float]:
        return {r["key"]: common.ecdf_area(per_dim_hits([r], budget_mult), budget_mult)
                for r in recs if r["solver"] == solver and r["dim"] == d}

    mine_by_dim = {d: area_by_key(base, d) for d in dims}  # the base's areas, once per d
    for s in solvers:
        cells = []
        for d in dims:
            mine, theirs = mine_by_dim[d], area_by_key(s, d)
            keys = sorted(mine.keys() & theirs.keys())
            if not keys:
                cells.append("-")
                continue
            diff = np.array([mine[k] - theirs[k] for k in keys])
            boot = diff[rng.integers(0, diff.size, (resamples, diff.size))].mean(axis=1)
            lo, hi = np.percentile(boot, [2.5, 97.5])
            cells.append(f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(recs: list[dict[str, Any]], dims: list[int], budget_mult: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = common_problems(pick(recs, budget_mult))
    solvers = [s for s in common.SOLVERS if any(r["solver"] == s for r in recs)]
    fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 4.2), sharey=True)
    axes = np.atleast_1d(axes)
    grid = np.logspace(0, np.log10(budget_mult), 150)
    for ax, d in zip(axes, dims, strict=True):
        for s in solvers:
            rs = [r for r in recs if r["solver"] == s and r["dim"] == d]
            if not rs:
                continue
            bp = s.startswith("bpgrad")
            ax.step(grid, common.ecdf_curve(per_dim_hits(rs, budget_mult), grid), where="post",
                    label=s, lw=2.2 if bp else 1.2, ls="-" if bp else "--")
        ax.set_xscale("log")
        ax.set_xlabel("evaluations / d")
        n_inst = len({r["instance"] for r in recs if r["dim"] == d})
        ax.set_title(f"BBOB f1-f24, d = {d}, {n_inst} instances, 51 targets 1e2..1e-8",
                     fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of (function, instance, target) pairs")
    axes[-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    global CACHE  # --cache: the workers (forked) read the module's CACHE
    common.env_threads()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solvers", nargs="*", default=DEFAULT_SOLVERS)
    ap.add_argument("--dims", nargs="*", type=int, default=[2, 3, 5, 10])
    ap.add_argument("--functions", nargs="*", type=int, default=list(range(1, 25)))
    ap.add_argument("--instances", type=int, default=15,
                    help="the first N of the suite's 15 standard instances")
    ap.add_argument("--first-instance", type=int, default=1,
                    help="start at the K-th of them (6: the instances 71-80 alone)")
    ap.add_argument("--budget", type=int, default=1000, help="budget as a multiple of d")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0],
                    help="seeds of stochastic solvers (each instance is another problem)")
    ap.add_argument("--quick", action="store_true", help="d = 2, 3 instances, budget 20·d")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=CACHE,
                    help="cache folder (another one reruns a solver, e.g. after a code change)")
    ap.add_argument("--no-run", action="store_true", help="only summarise the cache")
    ap.add_argument("--report", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--paired", metavar="SOLVER",
                    help="add paired bootstrap intervals of SOLVER's area minus each other's")
    a = ap.parse_args()
    CACHE = a.cache
    if a.quick:
        a.dims, a.instances, a.budget = [2], min(a.instances, a.first_instance + 2), 20
    probs = [  # instance-major order: an interrupted run holds whole instances
        (key(f, i, d), {"f": f, "i": i, "d": d})
        for i in range(a.first_instance, a.instances + 1) for d in a.dims for f in a.functions
    ]
    if not a.no_run:
        for _, spec in probs:  # f_opt in this process (cocoex writes a file in the cwd)
            build(spec)
        solvers = common.available(a.solvers)
        tasks = []
        for k, spec in probs:
            tasks += common.tasks_for([(k, spec)], solvers, [a.budget * spec["d"]], a.seeds,
                                      "bbob")

        def log(r: dict[str, Any]) -> str:
            h = common.first_hit(r["trace"], r["fstar"], 1e-8)
            return (f"{r['key']} {r['solver']:22s} s{r['seed']} b{r['budget']} hit1e-8@{h} "
                    f"f-fopt={r['best'] - r['fstar']:.2e} {r['wall_s']:.2f}s"
                    + (f" ERR {r['error']}" if r["error"] else ""))

        common.run_tasks(tasks, CACHE, worker, a.jobs, log)
    keys = {k for k, _ in probs}
    recs = [r for r in common.load_cache(CACHE) if r["key"] in keys and r["solver"] in a.solvers]
    text = summarize(recs, a.dims, a.budget)
    if a.paired:
        text += "\n\n" + paired(recs, a.dims, a.budget, a.paired)
    text += f"\n\n(table written at commit {common.git_commit()})\n"
    print(text)
    if a.report:
        a.report.parent.mkdir(parents=True, exist_ok=True)
        a.report.write_text(text)
    if a.plot and recs:
        plot(recs, a.dims, a.budget, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
