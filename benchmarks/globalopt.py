"""Benchmark ``bpgrad.minimize`` against scipy and optional peers on 26 standard test functions.

Protocol (issue 4, docs/globalopt.md): every problem gets ``--boxes`` (default 3) asymmetric boxes
that still hold x* (``lb' = lb + a (x* - lb)``, ``ub' = ub - b (ub - x*)``, ``a, b ~ U(0, 0.3)^d``
seeded by the problem name and the box number) so no optimum sits at the box centre. Every solver sees the objective through a
wrapper that counts calls (a gradient costs ``d`` more, the f-equivalent cost of a forward
difference), records the best-so-far trace and stops the run at the largest budget. Success at a
budget B: the best value within the first B counted evaluations is within
``1e-4 * max(1, |f*|)`` of f*. Budgets ``200 d`` and ``2000`` are read from one trace (no solver
here changes its schedule with the budget). Stochastic solvers run 5 seeds.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/globalopt.py            # run (resumable) + print
    .venv/bin/python benchmarks/globalopt.py --report runs/globalopt/tables.md \
        --plot docs/img/globalopt_profile.png
    .venv/bin/python benchmarks/globalopt.py --install-peers               # pip install dlib-bin, nlopt

Results are cached per (problem, box, solver, seed) under ``runs/globalopt/cache`` (git-ignored,
atomic writes); a rerun skips finished entries.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from globalopt_problems import Problem, problems  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "runs" / "globalopt" / "cache"
MAX_BUDGET = 2000
SEEDS = (0, 1, 2, 3, 4)
SUCCESS_RTOL = 1e-4


class BudgetExhausted(Exception):
    pass


class Counted:
    """Counts f-equivalent evaluations, clips to the box, keeps the best-so-far trace."""

    def __init__(self, prob: Problem, lb: np.ndarray, ub: np.ndarray, budget: int) -> None:
        self.prob, self.lb, self.ub, self.budget = prob, lb, ub, budget
        self.cost = 0
        self.best = math.inf
        self.trace: list[tuple[int, float]] = []  # (cost, best) at each improvement

    def _charge(self, n: int) -> None:
        if self.cost + n > self.budget:
            raise BudgetExhausted
        self.cost += n

    def _note(self, v: float) -> None:
        if math.isfinite(v) and v < self.best:
            self.best = v
            self.trace.append((self.cost, v))

    def f(self, x: Any) -> float:
        self._charge(1)
        x = np.clip(np.asarray(x, dtype=np.float64).reshape(-1), self.lb, self.ub)
        v = float(self.prob.fn(x, np))
        self._note(v)
        return v

    def grad(self, x: Any) -> np.ndarray:
        import torch

        self._charge(self.prob.dim)
        x = np.clip(np.asarray(x, dtype=np.float64).reshape(-1), self.lb, self.ub)
        t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        self.prob.fn(t, torch).backward()
        assert t.grad is not None
        return t.grad.numpy().copy()


def asym_box(prob: Problem, box: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Box ``box`` of ``prob``; box 0 keeps the seed of the one-box protocol, so its cache holds."""
    lb, ub, xs = np.array(prob.lb), np.array(prob.ub), np.array(prob.xstar)
    tag = prob.name if box == 0 else f"{prob.name}:box{box}"
    seed = int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    while True:
        a, b = rng.uniform(0, 0.3, prob.dim), rng.uniform(0, 0.3, prob.dim)
        lo, hi = lb + a * (xs - lb), ub - b * (ub - xs)
        off = np.abs(xs - 0.5 * (lo + hi)) / (hi - lo)
        if off.max() > 0.05:  # the optimum is off the centre in at least one coordinate
            return lo, hi


def ref_fstar(prob: Problem, lb: np.ndarray, ub: np.ndarray) -> float:
    """Lowest of the listed f*, f(x*) and a bounded local polish from x*."""
    from scipy.optimize import minimize as sp_min

    xs = np.array(prob.xstar)
    vals = [prob.fstar, float(prob.fn(xs, np))]
    r = sp_min(
        lambda x: float(prob.fn(x, np)),
        xs,
        method="L-BFGS-B",
        bounds=list(zip(lb, ub, strict=True)),
        options={"ftol": 1e-15, "gtol": 1e-12},
    )
    vals.append(float(r.fun))
    return min(vals)


def lipschitz_estimate(prob: Problem, lb: np.ndarray, ub: np.ndarray) -> float:
    """1.1 * max ||grad f|| over 4096 Sobol points of the box (the protocol's known-L track)."""
    import torch
    from scipy.stats import qmc

    pts = qmc.Sobol(prob.dim, seed=123).random(4096) * (ub - lb) + lb
    g_max = 0.0
    for p in pts:
        t = torch.tensor(p, dtype=torch.float64, requires_grad=True)
        prob.fn(t, torch).backward()
        assert t.grad is not None
        g_max = max(g_max, float(t.grad.norm()))
    return 1.1 * g_max


# ---------------------------------------------------------------- solvers
def run_bpgrad(
    c: Counted, seed: int, *, L: float | None, grad: bool, **options: Any
) -> None:
    """``bpgrad.minimize`` at its defaults; ``options`` (e.g. ``strategy``) only for studies.

    ``maxfev`` is the budget, as a user would pass it, so the default ``maxiter`` (10·maxfev
    with an estimated L, 100·maxfev with a known one) bounds the work between evaluations as it
    does for them; the wrapper still counts a
    gradient as d evaluations and stops the run at the budget."""
    from bpgrad.globalopt import minimize

    bounds = list(zip(c.lb, c.ub, strict=True))
    minimize(
        c.f, bounds, jac=c.grad if grad else None, lipschitz=L, maxfev=c.budget, tol=1e-12,
        seed=seed, **options,
    )


def run_direct(c: Counted, seed: int) -> None:
    from scipy.optimize import direct

    direct(
        c.f,
        list(zip(c.lb, c.ub, strict=True)),
        maxfun=c.budget,
        maxiter=10**6,
        vol_tol=0.0,
        len_tol=1e-12,
    )


def run_shgo(c: Counted, seed: int) -> None:
    from scipy.optimize import shgo

    shgo(c.f, list(zip(c.lb, c.ub, strict=True)), n=128, iters=8, sampling_method="sobol")


def run_da(c: Counted, seed: int) -> None:
    from scipy.optimize import dual_annealing

    dual_annealing(c.f, list(zip(c.lb, c.ub, strict=True)), maxfun=c.budget, rng=seed)


def run_de(c: Counted, seed: int) -> None:
    from scipy.optimize import differential_evolution

    differential_evolution(c.f, list(zip(c.lb, c.ub, strict=True)), tol=0, rng=seed, maxiter=10**6)


def run_dlib(c: Counted, seed: int) -> None:
    import dlib

    def f(*xs: float) -> float:
        return c.f(np.array(xs))

    dlib.find_min_global(f, list(map(float, c.lb)), list(map(float, c.ub)), c.budget)


def _nlopt(alg_name: str) -> Callable[[Counted, int], None]:
    def run(c: Counted, seed: int) -> None:
        import nlopt

        nlopt.srand(seed + 1)
        o = nlopt.opt(getattr(nlopt, alg_name), c.prob.dim)
        o.set_lower_bounds(list(c.lb))
        o.set_upper_bounds(list(c.ub))
        o.set_min_objective(lambda x, g: c.f(x))
        o.set_maxeval(c.budget)
        o.optimize(list(0.5 * (c.lb + c.ub)))

    return run


# name -> (runner, seeds, needs module, kwargs)
SOLVERS: dict[str, tuple[Callable[..., None], tuple[int, ...], str | None, dict[str, Any]]] = {
    "bpgrad (known L)": (run_bpgrad, (0,), None, {"L": "known", "grad": False}),
    "bpgrad (est. L)": (run_bpgrad, (0,), None, {"L": None, "grad": False}),
    "bpgrad+grad (known L)": (run_bpgrad, (0,), None, {"L": "known", "grad": True}),
    "bpgrad+grad (est. L)": (run_bpgrad, (0,), None, {"L": None, "grad": True}),
    "scipy direct": (run_direct, (0,), None, {}),
    "scipy shgo": (run_shgo, (0,), None, {}),
    "scipy dual_annealing": (run_da, SEEDS, None, {}),
    "scipy differential_evolution": (run_de, SEEDS, None, {}),
    "dlib find_min_global": (run_dlib, (0,), "dlib", {}),
    "nlopt DIRECT-L": (_nlopt("GN_DIRECT_L"), (0,), "nlopt", {}),
    "nlopt CRS2": (_nlopt("GN_CRS2_LM"), SEEDS, "nlopt", {}),
}
DEFAULT_SOLVERS = list(SOLVERS)
# Other settings of bpgrad, for studies of its defaults (not run unless named with --solvers).
SOLVERS.update({
    f"bpgrad (est. L, strategy={s})": (run_bpgrad, (0,), None, {"L": None, "grad": False, "strategy": s})
    for s in ("hull", "bound", "balanced")
})  # fmt: skip


def _box_tag(box: int) -> str:
    return "" if box == 0 else f"__box{box}"


def _key(prob: str, solver: str, seed: int, box: int = 0) -> Path:
    safe = "".join(ch if ch.isalnum() else "_" for ch in solver)
    return CACHE / f"{prob}{_box_tag(box)}__{safe}__{seed}.json"


def _write_atomic(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def setup(prob: Problem, box: int = 0) -> dict[str, Any]:
    path = CACHE / f"{prob.name}{_box_tag(box)}__setup.json"
    if path.exists():
        return json.loads(path.read_text())
    lb, ub = asym_box(prob, box)
    info = {
        "lb": lb.tolist(),
        "ub": ub.tolist(),
        "fstar": ref_fstar(prob, lb, ub),
        "L": lipschitz_estimate(prob, lb, ub),
    }
    _write_atomic(path, info)
    return info


def one_run(
    prob: Problem, info: dict[str, Any], solver: str, seed: int, box: int = 0
) -> dict[str, Any]:
    runner, _, _, kw = SOLVERS[solver]
    lb, ub = np.array(info["lb"]), np.array(info["ub"])
    c = Counted(prob, lb, ub, MAX_BUDGET)
    kwargs = dict(kw)
    if kwargs.get("L") == "known":
        kwargs["L"] = info["L"]
    error = None
    t0 = time.perf_counter()
    try:
        runner(c, seed, **kwargs)
    except BudgetExhausted:
        pass
    except Exception as exc:  # a peer failing is data, not a crash of the benchmark
        if "BudgetExhausted" not in repr(exc):
            error = repr(exc)[:300]
    wall = time.perf_counter() - t0
    return {
        "problem": prob.name,
        "dim": prob.dim,
        "solver": solver,
        "seed": seed,
        "box": box,
        "fstar": info["fstar"],
        "cost": c.cost,
        "best": c.best,
        "trace": c.trace,
        "wall_s": wall,
        "error": error,
    }


def hit_cost(rec: dict[str, Any]) -> int | None:
    tol = SUCCESS_RTOL * max(1.0, abs(rec["fstar"]))
    for cost, best in rec["trace"]:
        if best - rec["fstar"] <= tol:
            return int(cost)
    return None


def run_all(
    solvers: list[str], probs: list[Problem], boxes: int = 3, only_box: int | None = None
) -> None:
    # Box by box, so that an interrupted run has whole boxes of every problem to summarise.
    order = range(boxes) if only_box is None else [only_box]
    for box, prob in ((b, p) for b in order for p in probs):
        info = setup(prob, box)
        for solver in solvers:
            _, seeds, module, _ = SOLVERS[solver]
            if module is not None:
                try:
                    __import__(module)
                except ImportError:
                    print(f"skip {solver}: `{module}` not installed (--install-peers)")
                    continue
            for seed in seeds:
                path = _key(prob.name, solver, seed, box)
                if path.exists():
                    continue
                rec = one_run(prob, info, solver, seed, box)
                _write_atomic(path, rec)
                h = hit_cost(rec)
                print(
                    f"{prob.name:16s} box={box} {solver:28s} seed={seed} hit@{h} "
                    f"best-f*={rec['best'] - rec['fstar']:.2e} {rec['wall_s']:.2f}s"
                    + (f" ERROR {rec['error']}" if rec["error"] else ""),
                    flush=True,
                )


def load(boxes: int = 3) -> list[dict[str, Any]]:
    out = []
    for p in sorted(CACHE.glob("*.json")):
        if p.name.endswith("__setup.json"):
            continue
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        rec.setdefault("box", 0)  # records of the one-box protocol
        if rec["box"] < boxes:
            out.append(rec)
    return out


def summarize(recs: list[dict[str, Any]]) -> str:
    solvers = [s for s in SOLVERS if any(r["solver"] == s for r in recs)]
    probs = sorted({r["problem"] for r in recs})
    lines = [
        "| solver | runs | success @200·d | success @2000 | median evals to success "
        "| d=1 | d=2 | d=3-6 | mean wall s/run | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in solvers:
        rs = [r for r in recs if r["solver"] == s]
        hits = [hit_cost(r) for r in rs]
        ok_small = [h is not None and h <= 200 * r["dim"] for h, r in zip(hits, rs, strict=True)]
        ok_big = [h is not None for h in hits]
        med = np.median([h for h in hits if h is not None]) if any(ok_big) else float("nan")

        def rate(
            sel: Callable[[int], bool], rs: list[dict[str, Any]] = rs, ok: list[bool] = ok_big
        ) -> str:
            idx = [i for i, r in enumerate(rs) if sel(r["dim"])]
            return f"{100 * np.mean([ok[i] for i in idx]):.0f}" if idx else "-"

        lines.append(
            f"| {s} | {len(rs)} | {100 * np.mean(ok_small):.0f} % | {100 * np.mean(ok_big):.0f} % "
            f"| {med:.0f} | {rate(lambda d: d == 1)} | {rate(lambda d: d == 2)} "
            f"| {rate(lambda d: d >= 3)} | {np.mean([r['wall_s'] for r in rs]):.3f} "
            f"| {sum(r['error'] is not None for r in rs)} |"
        )
    # per-problem table: success fraction at 2000 (and 200·d) per solver
    lines += [
        "",
        "Per problem: runs solved at 2000 evaluations / runs over boxes and seeds (first hit, "
        "median over hits).",
        "",
    ]
    lines.append("| problem | d | " + " | ".join(solvers) + " |")
    lines.append("|---|---|" + "---|" * len(solvers))
    for p in probs:
        row = []
        dim = next(r["dim"] for r in recs if r["problem"] == p)
        for s in solvers:
            rs = [r for r in recs if r["solver"] == s and r["problem"] == p]
            hs = [hit_cost(r) for r in rs]
            good = [h for h in hs if h is not None]
            cell = f"{len(good)}/{len(rs)}" + (f" ({int(np.median(good))})" if good else "")
            row.append(cell)
        lines.append(f"| {p} | {dim} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_profile(recs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solvers = [s for s in SOLVERS if any(r["solver"] == s for r in recs)]
    fig, ax = plt.subplots(figsize=(8, 5))
    grid = np.unique(np.round(np.logspace(0, math.log10(MAX_BUDGET), 200)))
    for s in solvers:
        rs = [r for r in recs if r["solver"] == s]
        hits = np.array([hit_cost(r) or np.inf for r in rs], dtype=float)
        frac = [(hits <= g).mean() for g in grid]
        ls = "-" if s.startswith("bpgrad") else "--"
        ax.step(grid, frac, where="post", label=s, ls=ls, lw=2 if s.startswith("bpgrad") else 1.2)
    ax.set_xscale("log")
    ax.set_xlabel("f-equivalent evaluations (gradient = d evaluations)")
    ax.set_ylabel("fraction of (problem, seed) runs solved")
    n_probs = len({r["problem"] for r in recs})
    n_boxes = len({r["box"] for r in recs})
    ax.set_title(f"Data profile, {n_probs} problems in 1-6 d x {n_boxes} asymmetric boxes, "
                 "tol 1e-4·max(1,|f*|)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solvers", nargs="*", default=DEFAULT_SOLVERS)
    ap.add_argument("--problems", nargs="*", default=None)
    ap.add_argument("--no-run", action="store_true", help="only summarise the cache")
    ap.add_argument("--boxes", type=int, default=3,
                    help="asymmetric boxes per problem (the protocol's 3; box 0 is the 1-box run)")
    ap.add_argument("--only-box", type=int, default=None,
                    help="run just this box (processes for different boxes can run side by side)")
    ap.add_argument("--report", type=Path, help="write the markdown tables here")
    ap.add_argument("--plot", type=Path, help="write the data-profile PNG here")
    ap.add_argument("--install-peers", action="store_true")
    a = ap.parse_args()
    if a.install_peers:
        subprocess.run([sys.executable, "-m", "pip", "install", "dlib-bin", "nlopt"], check=False)
    probs = [p for p in problems() if a.problems is None or p.name in a.problems]
    if not a.no_run:
        run_all(a.solvers, probs, a.boxes, a.only_box)
    recs = [
        r
        for r in load(a.boxes)
        if r["solver"] in a.solvers and (a.problems is None or r["problem"] in a.problems)
    ]
    table = summarize(recs)
    print(table)
    if a.report:
        a.report.parent.mkdir(parents=True, exist_ok=True)
        a.report.write_text(table + "\n")
    if a.plot:
        plot_profile(recs, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
