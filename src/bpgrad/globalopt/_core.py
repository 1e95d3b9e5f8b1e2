"""``minimize``: validation, the calls of ``func``, polish, branch steps, callbacks and the
result. The search (cells, bounds, pruning, the next cell) is ``_engine.py``, driven through the
interface described in ``_reference.py``; this module is the only one that calls user code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bpgrad.globalopt._checks import (
    as_gradient,
    as_value,
    check_callable,
    lipschitz_arg,
    parse_bounds,
    positive_int,
    real_arg,
    seed_arg,
)
from bpgrad.globalopt._reference import Event, Strategy
from bpgrad.globalopt._result import STATUS_MESSAGES, SUCCESS_STATUSES, OptimizeResult, Status

__all__ = ["KIND_NAMES", "minimize"]

FloatArray = NDArray[np.float64]

# Why each sample was taken (``res.history_kind`` holds these codes).
GLOBAL, BRANCH, POLISH, FD = 0, 1, 2, 3
KIND_NAMES: tuple[str, ...] = ("global", "branch", "polish", "fd")


class Search(Protocol):
    """What the driver needs of a search (``_engine.CompiledSearch``, ``ReferenceSearch``).

    ``add`` records a sample (and updates L and the best value); ``insert_term`` lets one that
    is no cell's centre tighten its cell's bound. ``advance`` runs iterations (at most
    ``limit``) up to one that needs the driver: its event, how many iterations without
    evaluation ran before it, the points to evaluate. ``EVAL``: ``add`` each and hand their
    indices to ``finish``; ``BRANCH``: one queued branch step; ``DONE``: nothing; ``STOP``:
    ``info()[5]`` is the status. ``take`` is ``add``, ``finish`` and ``advance`` in one call.
    """

    def add(self, x: FloatArray, f: float, g: FloatArray | None) -> int: ...
    def insert_term(self, i: int) -> None: ...
    def in_ball(self, y: FloatArray) -> bool: ...
    def start(self) -> None: ...
    def advance(self, queued: bool, nit: int, limit: int) -> tuple[int, int, FloatArray]: ...
    def take(
        self, x: FloatArray, f: float, g: FloatArray | None, queued: bool, nit: int, limit: int
    ) -> tuple[int, int, FloatArray]: ...
    def finish(self, idx: list[int]) -> None: ...
    def info(self) -> tuple[float, float, float, float, float, int]: ...


def _compiled_search() -> Callable[..., Search]:
    try:
        from bpgrad.globalopt._engine import CompiledSearch
    except ImportError as exc:  # numba missing or broken
        raise ImportError(
            "bpgrad.minimize needs numba, which the 'globalopt' extra installs: "
            "pip install 'bpgrad[globalopt]'"
        ) from exc
    return CompiledSearch


_NO_LIMIT = 2**62  # iterations per ``advance`` call when no callback needs each one

# Which search ``minimize`` runs; the tests swap in ``ReferenceSearch`` here.
search_factory: Callable[[], Callable[..., Search]] = _compiled_search


class _Stop(Exception):
    """Internal: unwinds the search; ``args[0]`` is the status."""


def minimize(
    func: Callable[..., Any],
    bounds: Any,
    *,
    args: tuple[Any, ...] = (),
    jac: Callable[..., ArrayLike] | bool | None = None,
    lipschitz: float | str | None = None,
    rho: float = 0.1,
    f_lower: float | None = None,
    tol: float = 1e-6,
    maxfev: int | None = None,
    maxiter: int | None = None,
    f_target: float | None = None,
    polish: bool = True,
    polish_maxfev: int | None = None,
    branch: bool | None = None,
    branch_steps: int = 4,
    lipschitz_safety: float = 2.0,
    strategy: str = "balanced",
    callback: Callable[[OptimizeResult], Any] | None = None,
    seed: int | np.random.Generator | None = None,
) -> OptimizeResult:
    r"""Globally minimize ``func`` over a box with BPGrad's branch-and-prune (Algorithm 1).

    ``f`` is taken to be L-Lipschitz on the box X (Euclidean norm), so a sample
    :math:`(x_i, f_i)` gives :math:`f(x) \ge f_i - L\|x - x_i\|` and the ball of radius
    :math:`(f_i - \hat f^*)/L` around :math:`x_i` holds no point below the pruning level

    .. math:: \hat f^* = f_b - \max\bigl(\mathrm{tol},\ (1-\rho)(f_b - f_\mathrm{lower})\bigr)

    (:math:`f_b` the best value: BPGrad's :math:`\rho f_b` when ``f_lower=0``, :math:`f_b -
    \mathrm{tol}` without ``f_lower``). The box is kept as cells (a cell's longest side, relative
    to the box, is trisected); a cell's bound :math:`\max_i f_i - L\,\mathrm{far}(x_i,
    \text{cell})`, far the distance to its farthest corner, is a lower bound of f on it. DIRECT's
    potentially optimal cells and as many cells of lowest bound are divided in turn (``strategy``);
    new centres are evaluated only outside every ball, so those samples are tol/L apart and
    finitely many; a cell whose bound exceeds :math:`\hat f^*` is pruned. With a gradient,
    BPGrad's branch step :math:`x_{t+1} = \Pi_X(x_t - r_t g_t/\|g_t\|)` follows a new sample up
    to ``branch_steps`` times; a projected BFGS polish (Armijo backtracking, at most
    ``polish_maxfev`` calls) starts from each new best point.

    ``res.lower_bound`` is the least bound of all cells: :math:`\min_X f \ge` ``lower_bound``
    when ``lipschitz`` is a true constant and every value was finite (``res.certified``). Two
    samples contradict L only if :math:`|f_i - f_j| > L\|x_i - x_j\| + \epsilon(|f_i| + |f_j|)`,
    :math:`\epsilon = 10^{-10}` (a gradient only if its norm exceeds :math:`(1+\epsilon)L`), so
    rounding does not refuse a true, tight L. With ``lipschitz=None``, :math:`\hat L = s \cdot
    1.1^{\lceil\log_{1.1} m\rceil}` (m the largest slope or gradient norm seen, s =
    ``lipschitz_safety``) only grows, and nothing is certified. ``docs/globalopt.md`` has the
    full statement.

    Args:
        func: ``func(x, *args) -> float`` for a 1-D float array ``x``; with ``jac=True`` it
            returns ``(value, gradient)``. The value must be a real number (a Python or NumPy
            int or float, or a one-element real array or tensor); anything else (``None``, a
            string, a complex number, a longer array) raises ``TypeError``. Exceptions from
            ``func`` propagate unchanged.
        bounds: a sequence of ``(low, high)`` pairs or an object with ``lb`` and ``ub``
            (``scipy.optimize.Bounds``). Finite, ``low < high``, each side between 1e-100 and
            1e100 long (rescale the variables otherwise).
        args: extra positional arguments for ``func`` and ``jac``.
        jac: gradient callable ``jac(x, *args)`` (counted in ``njev``), ``True`` when ``func``
            returns the gradient too, or ``None``: then the polish uses forward differences
            (``d`` calls each, counted in ``nfev``, kind ``"fd"``) and the branch is off unless
            ``branch=True`` (then its direction also comes from forward differences).
        lipschitz: a Lipschitz constant L of ``func`` on the box (Euclidean norm); ``None``
            (or ``"auto"``, the optimizer's spelling) estimates it from the data (no
            certificate).
        rho: BPGrad's ratio in [0, 1): only used together with ``f_lower``.
        f_lower: a known lower bound on f (BPGrad assumes 0); with ``rho`` it sets how
            aggressively balls prune (see the pruning level above).
        tol: absolute gap: stop when best value minus lower bound is at most ``tol``.
        maxfev: budget of ``func`` calls (default ``1000 d``).
        maxiter: budget of iterations (one cell division, one pruned cell, one branch step with
            its polish, or one re-evaluated cell centre each). Cells whose centres lie in
            pruning balls are divided without an evaluation; that work closes the gap of a
            certificate, so the default is ``100 maxfev`` with a ``lipschitz`` and ``10 maxfev``
            without one (no certificate to build: of 2.4k estimated-L runs on BBOB, GKLS and
            the 26-function suite, all but BBOB's linear slope made < ``1.2 maxfev`` iterations).
        f_target: stop as soon as a value ``<= f_target`` is seen.
        polish: run the local polish from each new best point.
        polish_maxfev: evaluations per polish run (default ``50 (d + 1)``).
        branch: take BPGrad branch steps; default True when ``jac`` is given.
        branch_steps: longest chain of branch steps from one re-sampled point.
        lipschitz_safety: the factor s of the L estimate (>= 1).
        strategy: ``"balanced"``: one hull of DIRECT's potentially optimal cells, then the cell
            of lowest bound as often as the hull had cells, and again; ``"hull"``: hulls only;
            ``"bound"``: the cell of lowest bound only (best-first).
        callback: ``callback(intermediate_result)`` after every iteration, with ``x, fun,
            nfev, njev, nit, lower_bound, lipschitz``; returning ``True`` or raising
            ``StopIteration`` ends the run with status 4. It gets a copy: changing it has no
            effect.
        seed: seeds the only random choice, the order of cells with exactly equal bounds (an
            integer, or anything ``numpy.random.default_rng`` takes, from which one integer is
            drawn); ``None`` means 0, so a run is reproducible by default.

    Raises:
        ImportError: if numba (the ``globalopt`` extra) is not installed.

    Returns:
        An :class:`OptimizeResult` with ``x, fun, nfev, njev, nit, status, success, message``,
        ``lower_bound, gap, certified, lipschitz, lipschitz_estimated, fhat`` (the final pruning
        level), ``nonfinite`` (count of NaN/inf values), and the history ``history_x`` (n, d),
        ``history_f`` (n,), ``history_kind`` (n,) codes into ``kind_names``. Status codes and
        messages: :data:`bpgrad.globalopt.STATUS_MESSAGES`. Non-finite values (NaN, ±inf) are
        recorded and counted but never become the best point and carry no bound information.
    """
    # ---- validation: every argument checked before the first evaluation ----
    check_callable("func", func)
    lb, ub = parse_bounds(bounds)
    d = lb.size
    if not isinstance(args, tuple):
        args = (args,)
    if jac is not None and jac is not True and not callable(jac):
        raise TypeError("jac must be a callable, True (func returns (value, gradient)) or None.")
    if jac is False:
        jac = None
    lipschitz = lipschitz_arg(lipschitz)
    rho = real_arg("rho", rho, lambda v: 0 <= v < 1, "a number in [0, 1)")
    if f_lower is not None:
        f_lower = real_arg("f_lower", f_lower, math.isfinite, "a finite number or None")
    tol = real_arg("tol", tol, lambda v: 0 < v < math.inf, "a finite number > 0")
    maxfev = 1000 * d if maxfev is None else positive_int("maxfev", maxfev)
    if maxiter is None:  # see the docstring: iterations without evaluation build certificates
        maxiter = (100 if lipschitz is not None else 10) * maxfev
    else:
        maxiter = positive_int("maxiter", maxiter)
    if f_target is not None:
        f_target = real_arg("f_target", f_target, lambda v: not math.isnan(v), "a number or None")
    polish_maxfev = (
        50 * (d + 1) if polish_maxfev is None else positive_int("polish_maxfev", polish_maxfev)
    )
    branch_steps = positive_int("branch_steps", branch_steps, allow_zero=True)
    lipschitz_safety = real_arg(
        "lipschitz_safety", lipschitz_safety, lambda v: 1 <= v < math.inf, "a finite number >= 1"
    )
    if strategy not in ("balanced", "hull", "bound"):
        raise ValueError(f"strategy must be 'balanced', 'hull' or 'bound', got {strategy!r}.")
    if callback is not None:
        check_callable("callback", callback)
    seed = seed_arg(seed)
    search = search_factory()(
        lb, ub, lipschitz=lipschitz, rho=rho, f_lower=f_lower,
        tol=tol, maxiter=maxiter, strategy=int(Strategy[strategy.upper()]), seed=seed,
        safety=lipschitz_safety,
    )  # fmt: skip
    run = _Run(
        search, func=func, args=args, jac=jac, lb=lb, ub=ub, known_L=lipschitz, maxfev=maxfev,
        f_target=f_target, do_polish=bool(polish),
        polish_maxfev=polish_maxfev, callback=callback, branch_steps=branch_steps,
        do_branch=(jac is not None) if branch is None else bool(branch),
    )  # fmt: skip
    return run.solve()


@dataclass
class _Run:
    """One call of :func:`minimize`: evaluations, polish, branch steps, callback, result."""

    search: Search
    func: Callable[..., Any]
    args: tuple[Any, ...]
    jac: Any
    lb: FloatArray
    ub: FloatArray
    known_L: float | None
    maxfev: int
    f_target: float | None
    do_polish: bool
    polish_maxfev: int
    do_branch: bool
    branch_steps: int
    callback: Callable[[OptimizeResult], Any] | None

    def __post_init__(self) -> None:
        lb, ub = self.lb, self.ub
        self.d = lb.size
        self.diag = float(np.linalg.norm(ub - lb))
        self.nfev = self.njev = self.nit = 0
        self.queue: list[tuple[int, int]] = []  # (sample, depth) to branch from, the next last
        self.X: list[FloatArray] = []
        self.F: list[float] = []
        self.kind: list[int] = []
        self.G: dict[int, FloatArray] = {}
        self.best, self.f_best, self.nonfinite = -1, math.inf, 0
        self.fd_step = 1.5e-8 * np.maximum(np.maximum(np.abs(lb), np.abs(ub)), ub - lb)

    # ---- evaluation: the only place that calls user code ----
    def evaluate(self, x: FloatArray, kind: int, want_grad: bool) -> int:
        i, f, g = self._observe(x, kind, want_grad)
        self.search.add(self.X[i], f, g)
        if self._hit(f):
            raise _Stop(Status.TARGET)
        return i

    def _observe(
        self, x: FloatArray, kind: int, want_grad: bool
    ) -> tuple[int, float, FloatArray | None]:
        """Call func at x and record the sample here (the caller hands it to the search)."""
        if self.nfev >= self.maxfev:
            raise _Stop(Status.MAXFEV)
        x = np.array(x, dtype=np.float64)
        self.nfev += 1
        f, g = self._call(x, want_grad)
        i = len(self.F)
        self.X.append(x)
        self.F.append(f)
        self.kind.append(kind)
        if g is not None and np.all(np.isfinite(g)):
            self.G[i] = g
        if not math.isfinite(f):
            self.nonfinite += 1
        elif f < self.f_best:
            self.best, self.f_best = i, f
        return i, f, g

    def _hit(self, f: float) -> bool:
        return self.f_target is not None and f <= self.f_target

    def _call(self, x: FloatArray, want_grad: bool) -> tuple[float, FloatArray | None]:
        """func (and jac when asked) at x: the value and the gradient or None."""
        g: FloatArray | None = None
        if self.jac is True:
            out = self.func(x.copy(), *self.args)
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise ValueError("with jac=True, func must return a pair (value, gradient).")
            f = as_value(out[0])
            g = as_gradient(out[1], self.d)
        else:
            f = as_value(self.func(x.copy(), *self.args))
            if want_grad and callable(self.jac) and math.isfinite(f):
                self.njev += 1
                g = as_gradient(self.jac(x.copy(), *self.args), self.d)
        return f, g

    def gradient(self, i: int) -> FloatArray | None:
        """Gradient at sample i: stored, from ``jac``, or by forward differences (counted)."""
        if i in self.G:
            return self.G[i].copy()
        if not math.isfinite(self.F[i]):
            return None
        x = self.X[i]
        if callable(self.jac):
            self.njev += 1
            gv = as_gradient(self.jac(x.copy(), *self.args), self.d)
            if not np.all(np.isfinite(gv)):
                return None
            self.G[i] = gv
            return gv.copy()
        g = np.empty(self.d)
        for j in range(self.d):
            h = float(self.fd_step[j])
            xj = x.copy()
            if x[j] + h > self.ub[j]:
                h = -h
            xj[j] = x[j] + h
            k = self.evaluate(xj, FD, False)
            self.search.insert_term(k)
            g[j] = (self.F[k] - self.F[i]) / h
        if not np.all(np.isfinite(g)):
            return None
        self.G[i] = g
        return g.copy()

    # ---- the loop ----
    def solve(self) -> OptimizeResult:
        status = -1
        S = self.search
        limit = 1 if self.callback is not None else _NO_LIMIT
        try:
            self.evaluate(0.5 * (self.lb + self.ub), GLOBAL, self.do_branch)
            S.start()
            self._after_sample(0, 0)
            step: tuple[int, int, FloatArray] | None = S.advance(bool(self.queue), self.nit, limit)
            while step is not None:
                ev, k, points = step
                self.nit += k  # iterations without evaluation that ran inside advance
                if ev == Event.STOP:
                    status = S.info()[5]
                    break
                step = None
                if ev == Event.BRANCH:
                    self._branch(*self.queue.pop())
                elif ev == Event.EVAL:
                    step = self._evaluate_points(points, merge=limit == _NO_LIMIT)
                self.nit += 1
                if self._call_back():
                    status = Status.CALLBACK
                    break
                if step is None:
                    step = S.advance(bool(self.queue), self.nit, limit)
        except _Stop as stop:
            status = stop.args[0]
        if self.nonfinite == len(self.F):
            status = Status.NONFINITE
        return self._result(status)

    def _evaluate_points(
        self, points: FloatArray, merge: bool
    ) -> tuple[int, int, FloatArray] | None:
        """Evaluate the centres a division asked for and hand them back to it, also when the
        run stops half way (the cells must still be placed for the lower bound to hold). With
        ``merge`` (no callback), if no new sample starts a polish or a branch chain or reaches
        f_target, the last one goes to the search with ``take``, whose next step is returned."""
        idx = [-1] * len(points)
        step = None
        try:
            for j, y in enumerate(points):
                i, f, g = self._observe(y, GLOBAL, self.do_branch)
                if merge and j == len(points) - 1 and not self._hit(f):
                    if not any(self._acts(q) for q in [*idx[:j], i]):
                        step = self.search.take(
                            self.X[i], f, g, bool(self.queue), self.nit + 1, _NO_LIMIT
                        )
                        return step
                self.search.add(self.X[i], f, g)
                if self._hit(f):
                    raise _Stop(Status.TARGET)
                idx[j] = i
        finally:
            if step is None:
                self.search.finish(idx)
        for i in idx:
            self._after_sample(i, 0)
        return None

    def _acts(self, i: int, depth: int = 0) -> bool:
        """Whether ``_after_sample(i, depth)`` would polish or queue a branch step."""
        polish = i == self.best and self.do_polish
        branch = self.do_branch and depth < self.branch_steps
        return math.isfinite(self.F[i]) and (polish or branch)

    def _after_sample(self, i: int, depth: int) -> None:
        """A branch or re-sampling evaluation: polish a new best point, else branch from it."""
        if not math.isfinite(self.F[i]):
            return
        if i == self.best and self.do_polish:
            self._polish(i)
        elif self.do_branch and depth < self.branch_steps:
            self.queue.append((i, depth))

    def _branch(self, i: int, depth: int) -> None:
        g = self.gradient(i)
        if g is None:
            return
        gn = float(np.linalg.norm(g))
        L, fhat = self.search.info()[:2]
        r = (self.F[i] - fhat) / L
        if gn == 0 or not math.isfinite(r) or r <= 0:
            return
        x = self.X[i]
        y = np.clip(x - (r / gn) * g, self.lb, self.ub)
        if np.linalg.norm(y - x) <= 1e-9 * self.diag or self.search.in_ball(y):
            return
        k = self.evaluate(y, BRANCH, True)
        self.search.insert_term(k)
        self._after_sample(k, depth + 1)

    def _polish(self, i0: int) -> None:
        """Projected BFGS with Armijo backtracking from sample i0, at most polish_maxfev calls."""
        stop_at = self.nfev + self.polish_maxfev
        x, f = self.X[i0].copy(), self.F[i0]
        g = self.gradient(i0)
        if g is None:
            return
        H: FloatArray | None = None
        step0 = 0.1 * self.diag / math.sqrt(self.d)
        want = self.jac is not None
        for _ in range(100 * self.d + 100):
            free = ~(((x <= self.lb) & (g > 0)) | ((x >= self.ub) & (g < 0)))
            pg = np.where(free, g, 0.0)
            gnorm = float(np.linalg.norm(pg))
            if gnorm <= 1e-14 * (1 + abs(f)) * self.search.info()[0]:
                return
            p = -pg * (step0 / gnorm) if H is None else np.where(free, -(H @ pg), 0.0)
            if float(p @ pg) >= 0:
                H = None
                p = -pg * (step0 / gnorm)
            alpha, accepted = 1.0, -1
            for _ls in range(40):
                if self.nfev >= stop_at:
                    return
                xn = np.clip(x + alpha * p, self.lb, self.ub)
                s = xn - x
                if float(np.linalg.norm(s)) <= 1e-13 * self.diag:
                    return
                k = self.evaluate(xn, POLISH, want)
                self.search.insert_term(k)
                fn = self.F[k]
                if math.isfinite(fn) and fn <= f + 1e-4 * float(g @ s):
                    accepted = k
                    break
                alpha *= 0.25 if not math.isfinite(fn) else 0.5
            if accepted < 0 or self.nfev >= stop_at:
                return
            gn = self.gradient(accepted)
            if gn is None:
                return
            s = self.X[accepted] - x
            yv = gn - g
            sy = float(s @ yv)
            if sy > 1e-12 * float(np.linalg.norm(s)) * float(np.linalg.norm(yv)):
                if H is None:
                    H = np.eye(self.d) * (sy / float(yv @ yv))
                rho_ = 1.0 / sy
                Hy = H @ yv
                H = (
                    H
                    - rho_ * (np.outer(s, Hy) + np.outer(Hy, s))
                    + (rho_ * rho_ * float(yv @ Hy) + rho_) * np.outer(s, s)
                )
            f_old = f
            x, f, g = self.X[accepted].copy(), self.F[accepted], gn
            if f_old - f <= 1e-15 * (1 + abs(f)):
                return

    # ---- callback and result ----
    def _snapshot(self) -> OptimizeResult:
        has = self.best >= 0
        L, _, lower, *_ = self.search.info()
        return OptimizeResult(
            x=self.X[self.best].copy() if has else 0.5 * (self.lb + self.ub),
            fun=self.f_best if has else math.nan,
            nfev=self.nfev,
            njev=self.njev,
            nit=self.nit,
            lower_bound=lower if has else -math.inf,
            lipschitz=L,
        )

    def _call_back(self) -> bool:
        if self.callback is None:
            return False
        try:
            out = self.callback(self._snapshot())
        except StopIteration:
            return True
        return bool(out) if isinstance(out, (bool, np.bool_)) else False

    def _result(self, status: int) -> OptimizeResult:
        res = self._snapshot()
        _, fhat, _, slope_max, robust, _ = self.search.info()
        violated = self.known_L is not None and robust > self.known_L
        certified = (
            self.known_L is not None and not violated and self.nonfinite == 0 and self.best >= 0
        )
        message = STATUS_MESSAGES[status]
        if status in (Status.GAP, Status.COVERED) and not certified:
            message += " The lower bound rests on an estimated or violated L: not a certificate."
        if violated:
            message += f" Warning: an observed slope {robust:.6g} exceeds lipschitz={self.known_L}."
        n = len(self.F)
        res.update(
            status=Status(status),
            success=status in SUCCESS_STATUSES,
            message=message,
            gap=res.fun - res.lower_bound if self.best >= 0 else math.inf,
            certified=certified,
            lipschitz_estimated=self.known_L is None,
            max_slope=slope_max,
            fhat=fhat,
            nonfinite=self.nonfinite,
            history_x=np.array(self.X).reshape(n, self.d),
            history_f=np.array(self.F, dtype=np.float64),
            history_kind=np.array(self.kind, dtype=np.int8),
            kind_names=KIND_NAMES,
        )
        return res
