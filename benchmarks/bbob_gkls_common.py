"""Shared parts of ``benchmarks/bbob_bench.py`` and ``benchmarks/gkls_bench.py`` (issue 13, part 4).

The protocol is the one of ``benchmarks/globalopt.py`` (docs/results.md §4): every solver sees the
objective through its :class:`~globalopt.Counted` wrapper (clips to the box, counts every call,
records the best-so-far trace and stops the run at the budget), ``bpgrad.minimize`` runs with its
documented defaults (``lipschitz=None``; only the budget plumbing ``maxfev``/``tol`` of
``globalopt.run_bpgrad``), and the peers run at their defaults with the budget passed in.

This module adds what the two standard suites need on top: three more peers (ECP and AdaLIPO+
from ``globe-opti``, CMA-ES from ``cma``), a cached, resumable task runner with ``--jobs``, the
per-target first-hit times, and the COCO-style ECDF area. Nothing here imports an optional
package at module level, so the pure parts are testable without the ``globalopt-bench`` extra.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from globalopt_problems import Problem

from globalopt import (
    SOLVERS as GO_SOLVERS,
)
from globalopt import (
    BudgetExhausted,
    Counted,
    _write_atomic,
    run_bpgrad,
)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- peers new to this benchmark
def _bounds_array(c: Counted) -> np.ndarray:
    return np.column_stack([c.lb, c.ub]).astype(np.float64)


def run_ecp(c: Counted, seed: int) -> None:
    """ECP+TR (Serré et al., AISTATS 2025) from ``globe-opti``, defaults, budget = ``n_eval``."""
    from globe.optimizers import ECP

    opt = ECP(_bounds_array(c), n_eval=c.budget)
    # asked for, but in globe-opti 0.0.14 repeated runs still differ (checked): one draw per run
    opt.set_seed(seed)
    opt.minimize(lambda x: c.f(x))


def run_adalipo(c: Counted, seed: int) -> None:
    """AdaLIPO+TR from ``globe-opti``, defaults, budget = ``n_eval``."""
    from globe.optimizers import AdaLIPO_P

    opt = AdaLIPO_P(_bounds_array(c), n_eval=c.budget)
    opt.set_seed(seed)  # not reproducible either (see run_ecp)
    opt.minimize(lambda x: c.f(x))


def run_cma(c: Counted, seed: int) -> None:
    """CMA-ES (``cma.fmin2``) with IPOP restarts on the box mapped to [0, 1]^d.

    x0 uniform in the box (seeded), sigma0 = 0.3 of the unit box, bounds by the package's default
    boundary handling; restarts until the budget is spent (``maxfevals``).
    """
    import cma

    w = c.ub - c.lb
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(0.0, 1.0, c.prob.dim)
    opts = {
        "bounds": [0.0, 1.0],
        "maxfevals": c.budget,
        "verbose": -9,
        "seed": seed + 1,
        "verb_log": 0,
        "verb_disp": 0,
    }
    cma.fmin2(lambda z: c.f(c.lb + np.asarray(z) * w), x0, 0.3, opts, restarts=9)


@dataclass(frozen=True)
class Solver:
    """One solver entry: how to call it, and whether its schedule depends on the budget."""

    runner: Callable[..., None]
    module: str | None = None  # an optional package it needs
    stochastic: bool = False
    # budget-aware solvers (their schedule uses the budget) run once per reported budget; the
    # others run once at the largest budget and every smaller budget is read from the trace
    budget_aware: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


def _go(name: str) -> Callable[..., None]:
    return GO_SOLVERS[name][0]


SOLVERS: dict[str, Solver] = {
    "bpgrad": Solver(run_bpgrad, kwargs={"L": None, "grad": False}),
    "bpgrad (known L)": Solver(run_bpgrad, kwargs={"L": "known", "grad": False}),
    "ECP": Solver(run_ecp, "globe", stochastic=True, budget_aware=True),
    "AdaLIPO+": Solver(run_adalipo, "globe", stochastic=True, budget_aware=True),
    "CMA-ES": Solver(run_cma, "cma", stochastic=True),
    "scipy direct": Solver(_go("scipy direct")),
    "scipy dual_annealing": Solver(_go("scipy dual_annealing"), stochastic=True),
    "scipy shgo": Solver(_go("scipy shgo")),
    "nlopt DIRECT-L": Solver(_go("nlopt DIRECT-L"), "nlopt"),
    "dlib find_min_global": Solver(_go("dlib find_min_global"), "dlib"),
}
# Other settings of bpgrad, for studies of its defaults; not in the suites' default solver lists.
VARIANTS: dict[str, Solver] = {
    f"bpgrad (strategy={s})": Solver(run_bpgrad, kwargs={"L": None, "grad": False, "strategy": s})
    for s in ("hull", "bound", "balanced")
}
DEFAULT_SOLVERS = list(SOLVERS)
SOLVERS.update(VARIANTS)


def available(names: Iterable[str]) -> list[str]:
    """The solvers among ``names`` whose optional package imports; prints the ones skipped."""
    out = []
    for s in names:
        mod = SOLVERS[s].module
        if mod is not None:
            try:
                __import__(mod)
            except ImportError:
                print(f"skip {s}: `{mod}` not installed (pip install -e '.[globalopt-bench]')")
                continue
        out.append(s)
    return out


# ---------------------------------------------------------------- pure scoring
def first_hit(trace: Sequence[Sequence[float]], fstar: float, tol: float) -> int | None:
    """Evaluations until the best-so-far value is within ``tol`` of ``fstar`` (None: never).

    ``trace`` holds ``(cost, best)`` pairs at each improvement, as :class:`Counted` records them.
    """
    for cost, best in trace:
        if best - fstar <= tol:
            return int(cost)
    return None


def bbob_targets() -> np.ndarray:
    """COCO's 51 absolute targets on f - f_opt: 10^2, 10^1.8, ..., 10^-8."""
    return 10.0 ** np.linspace(2.0, -8.0, 51)


def ecdf_area(hits_per_dim: Sequence[float | None], max_per_dim: float) -> float:
    """Normalised area under the runtime ECDF on a log10 axis from 1 to ``max_per_dim`` evals/d.

    Each entry is the evaluations/d a (problem, target) pair needed (None: not solved within the
    budget). The ECDF at u is the fraction of pairs with log10(hits/d) <= u; its area over
    ``u in [0, U]``, ``U = log10(max_per_dim)``, divided by U, is the mean over pairs of
    ``(U - max(0, log10 h))_+ / U``: 1 when every pair is solved within d evaluations, 0 when none
    is solved, and larger when pairs are solved earlier (the "area" COCO's ECDF plots rank by).
    """
    if max_per_dim <= 1.0:
        raise ValueError("max_per_dim must exceed 1 (one evaluation per dimension)")
    if not hits_per_dim:
        return float("nan")
    u_max = math.log10(max_per_dim)
    tot = 0.0
    for h in hits_per_dim:
        if h is None or h > max_per_dim:
            continue
        tot += (u_max - max(0.0, math.log10(h))) / u_max
    return tot / len(hits_per_dim)


def ecdf_curve(hits_per_dim: Sequence[float | None], grid: np.ndarray) -> np.ndarray:
    """Fraction of pairs solved within each ``grid`` value of evaluations/d."""
    h = np.array([np.inf if v is None else v for v in hits_per_dim], dtype=float)
    if h.size == 0:
        return np.full(grid.shape, np.nan)
    return (h[None, :] <= grid[:, None]).mean(axis=1)


# ---------------------------------------------------------------- running with a cache
@dataclass(frozen=True)
class Task:
    """One run: a problem (built lazily in the worker), a solver, a seed and a budget."""

    suite: str  # "bbob" or "gkls"
    key: str  # problem key, e.g. "f03_i01_d02" or "simple_d2_f007"
    solver: str
    seed: int
    budget: int
    spec: dict[str, Any]  # what the suite needs to rebuild the problem in a worker

    def path(self, cache: Path) -> Path:
        safe = "".join(ch if ch.isalnum() else "_" for ch in self.solver)
        return cache / self.key / f"{safe}__s{self.seed}__b{self.budget}.json"


def tasks_for(
    problems: Sequence[tuple[str, dict[str, Any]]],
    solvers: Sequence[str],
    budgets: Sequence[int],
    seeds: Sequence[int],
    suite: str,
) -> list[Task]:
    """Every (problem, solver, seed, budget) run the protocol needs.

    Deterministic solvers run seed ``seeds[0]`` only; budget-aware ones once per budget, the
    others once at ``max(budgets)``.
    """
    out = []
    for key, spec in problems:
        for s in solvers:
            sol = SOLVERS[s]
            for seed in seeds if sol.stochastic else seeds[:1]:
                for b in sorted(set(budgets)) if sol.budget_aware else [max(budgets)]:
                    out.append(Task(suite, key, s, seed, b, spec))
    return out


class WallTimeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise WallTimeout


def execute(
    task: Task,
    prob: Problem,
    lb: np.ndarray,
    ub: np.ndarray,
    L: float | None,
    max_wall_s: int = 600,
) -> dict[str, Any]:
    """Run one task through the counting wrapper; a peer's exception is data, not a crash.

    A run that exceeds ``max_wall_s`` seconds is stopped (recorded as an error "timeout"; its trace
    up to then counts), so one stuck peer cannot hold a worker for the rest of the night.
    """
    import signal

    sol = SOLVERS[task.solver]
    c = Counted(prob, lb, ub, task.budget)
    kwargs = dict(sol.kwargs)
    if kwargs.get("L") == "known":
        kwargs["L"] = L
    error = None
    t0 = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max_wall_s)
    try:
        sol.runner(c, task.seed, **kwargs)
    except BudgetExhausted:
        pass
    except WallTimeout:
        error = f"timeout after {max_wall_s} s"
    except Exception as exc:
        if "BudgetExhausted" not in repr(exc):
            error = repr(exc)[:300]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return {
        "key": task.key,
        "solver": task.solver,
        "seed": task.seed,
        "budget": task.budget,
        "fstar": prob.fstar,
        "dim": prob.dim,
        "cost": c.cost,
        "best": c.best,
        "trace": c.trace,
        "wall_s": time.perf_counter() - t0,
        "error": error,
    }


ENVIRONMENT_ERRORS = ("ImportError", "ModuleNotFoundError", "AttributeError", "NameError",
                      "SyntaxError")


def is_environment_error(error: str | None) -> bool:
    """Whether a recorded error is about the installed code rather than about the run."""
    return error is not None and error.startswith(ENVIRONMENT_ERRORS)


def run_tasks(
    tasks: Sequence[Task],
    cache: Path,
    worker: Callable[[Task], dict[str, Any]],
    jobs: int = 1,
    log: Callable[[dict[str, Any]], str] | None = None,
) -> None:
    """Run the tasks not yet in ``cache`` (one JSON per run, atomic writes), ``jobs`` at a time."""
    todo = [t for t in tasks if not t.path(cache).exists()]
    print(f"{len(tasks) - len(todo)} of {len(tasks)} runs cached, {len(todo)} to run", flush=True)

    def done(t: Task, rec: dict[str, Any]) -> None:
        # a broken environment (say, bpgrad mid-refactor in this shared tree) is not a result:
        # such a run is logged but not cached, so that the next invocation retries it
        if not is_environment_error(rec.get("error")):
            _write_atomic(t.path(cache), rec)
        if log is not None:
            print(log(rec), flush=True)

    if jobs <= 1:
        for t in todo:
            done(t, worker(t))
        return
    import multiprocessing as mp

    # long-lived workers: bpgrad's compiled search loads (or compiles) once per process
    with mp.get_context("fork").Pool(jobs) as pool:
        for t, rec in zip(todo, pool.imap(worker, todo, chunksize=1), strict=True):
            done(t, rec)


def load_cache(cache: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(cache.glob("*/*.json")):
        if p.name == "setup.json":
            continue
        try:
            out.append(json.loads(p.read_text()))
        except (json.JSONDecodeError, OSError):
            continue
    return out


def cached_setup(path: Path, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Per-problem set-up (f*, L, ...) computed once and cached atomically."""
    if path.exists():
        return json.loads(path.read_text())
    info = make()
    _write_atomic(path, info)
    return info


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def lipschitz_from_grad(grad: Callable[[np.ndarray], Any], lb: np.ndarray, ub: np.ndarray) -> float:
    """``globalopt.lipschitz_estimate``'s rule: 1.1 max ||grad f|| over 4096 Sobol points."""
    from scipy.stats import qmc

    pts = qmc.Sobol(len(lb), seed=123).random(4096) * (ub - lb) + lb
    return 1.1 * max(float(np.linalg.norm(np.asarray(grad(p), dtype=float))) for p in pts)


def env_threads() -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, "1")
