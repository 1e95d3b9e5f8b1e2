"""The search of :func:`bpgrad.minimize` written plainly in NumPy: the test oracle.

This is the readable statement of the branch-and-prune search that ``_engine.py`` compiles. It
makes the same decisions (which cell to divide, which centres to evaluate, which cells to prune)
with plain O(n) scans over the samples and a list of cells, and is only used by the tests, which
run both side by side and demand the same evaluated points up to floating-point tolerance.

Both are driven by ``_core._Run`` through the interface ``_core.Search`` describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from numpy.typing import NDArray

from bpgrad.globalopt._result import Status

FloatArray = NDArray[np.float64]

__all__ = ["K_TERMS", "L_GRID", "MIN_REL_SIZE", "MIN_SIDE_RATIO", "SLOPE_RTOL", "CellState", "Event",
           "ReferenceSearch", "Strategy", "cell_key"]  # fmt: skip

K_TERMS = 4  # samples kept per cell, to recompute its bound cheaply when L changes
L_GRID = 1.1  # an estimated L is rounded up to a power of this, so the bounds rarely change
MIN_REL_SIZE = 1e-12  # a cell whose sides are all below this fraction of the box is retired
# A side shorter than this fraction of its cell's longest side is not split: it changes the
# far-corner distance of the bound by 1e-4 relative at most, so splitting it would only multiply
# cells whose centres share one pruning ball (on a 1000 x 0.001 box that never ended). Boxes with
# sides within a factor 30 of each other are divided exactly as DIRECT does.
MIN_SIDE_RATIO = 0.01
# Rounding allowance of the certificate's slope check: a pair of samples contradicts L only if
# |f_i - f_j| > L ||x_i - x_j|| + SLOPE_RTOL (|f_i| + |f_j|) (see ``robust_slope``).
SLOPE_RTOL = 1e-10


class Event(IntEnum):
    """What ``advance`` asks the driver to do next."""

    EVAL = 0
    DONE = 1
    BRANCH = 2
    STOP = 3


class Strategy(IntEnum):
    """Which live cell an iteration divides (``minimize``'s ``strategy``)."""

    BOUND = 0  # the cell of lowest bound
    HULL = 1  # DIRECT's potentially optimal cells, one hull after another
    BALANCED = 2  # a hull, then as many cells of lowest bound as the hull had cells


class CellState(IntEnum):
    LEAF = 0  # live: may be divided
    SPLIT = 1  # divided into three children
    PRUNED = 2  # its bound exceeds f̂* (may come back when L grows)
    RETIRED = 3  # too small to divide; its bound stays in the lower bound


_MASK = (1 << 64) - 1


def _rownorm(D: FloatArray) -> FloatArray:
    """Euclidean norm of each row, summed coordinate by coordinate like the compiled loop."""
    return np.sqrt(np.sum(D * D, axis=1))


def cell_key(seed: int, c: int) -> float:
    """The seeded tie-break key of cell c in [0, 1): splitmix64 of (seed, c)."""
    z = (seed + (c + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return (z >> 11) * 2.0**-53


@dataclass
class _Cell:
    lo: FloatArray
    hi: FloatArray
    depth: int
    key: float
    bound: float = -math.inf
    terms: list[int] = field(default_factory=list)  # at most K_TERMS sample indices
    state: CellState = CellState.LEAF
    centre: int = -1  # sample index of the centre, -1 while it lies in a pruning ball
    value: float = math.inf  # centre value, or the centre's Lipschitz lower estimate
    child: int = -1
    sdim: int = -1
    size: float = 0.0  # half-diagonal in box-normalised coordinates


class ReferenceSearch:
    """Branch-and-prune over a box with plain scans (see the module docstring)."""

    def __init__(
        self, lb: FloatArray, ub: FloatArray, *, lipschitz: float | None, rho: float,
        f_lower: float | None, tol: float, maxiter: int, strategy: int, seed: int, safety: float,
    ) -> None:  # fmt: skip
        self.lb, self.ub, self.width = lb, ub, ub - lb
        self.d = lb.size
        self.diag = math.sqrt(float(np.sum(self.width * self.width)))
        self.known_L = lipschitz
        self.L = lipschitz if lipschitz is not None else 1.0
        self.L_dirty = False
        self.rho, self.f_lower, self.tol = rho, f_lower, tol
        self.maxiter, self.strategy, self.seed, self.safety = maxiter, strategy, seed, safety
        self.X = np.empty((0, self.d))
        self.F = np.empty(0)
        self.best, self.f_best, self.nonfinite = -1, math.inf, 0
        self.slope_max = 0.0  # largest |f_i - f_j| / ||x_i - x_j|| (and gradient norm) seen
        self.robust_slope = 0.0  # the same, less the rounding allowance SLOPE_RTOL
        self.cells: list[_Cell] = []
        self.pruned_min = math.inf  # smallest bound among pruned and retired cells
        self.pending: list[int] = []  # hull cells still to divide, the next one last
        self.bound_turns = 0  # balanced: lowest-bound divisions still owed after the last hull
        self.status = -1
        self._todo: list[FloatArray] = []
        self._div: tuple[int, int, list[int]] | None = None  # the division asking

    # ---- samples ----
    @property
    def n(self) -> int:
        return self.F.size

    def _fb(self) -> FloatArray:
        """Values with -inf for non-finite ones: a NaN sample bounds nothing."""
        return np.where(np.isfinite(self.F), self.F, -math.inf)

    def add(self, x: FloatArray, f: float, g: FloatArray | None) -> int:
        if math.isfinite(f) and self.n > 0:
            fin = np.isfinite(self.F)
            dist = _rownorm(self.X[fin] - x)
            df = np.abs(self.F[fin] - f)
            ok = dist > 0
            if ok.any():
                self.slope_max = max(self.slope_max, float((df[ok] / dist[ok]).max()))
                slack = SLOPE_RTOL * (np.abs(self.F[fin]) + abs(f))
                rob = (df[ok] - slack[ok]) / dist[ok]
                self.robust_slope = max(self.robust_slope, float(rob.max()))
        if g is not None and np.all(np.isfinite(g)):
            gn = math.sqrt(float(np.sum(g * g)))
            self.slope_max = max(self.slope_max, gn)
            self.robust_slope = max(self.robust_slope, gn / (1 + SLOPE_RTOL))
        self.X = np.vstack([self.X, x[None]])
        self.F = np.append(self.F, f)
        i = self.n - 1
        if not math.isfinite(f):
            self.nonfinite += 1
        elif f < self.f_best:
            self.f_best, self.best = f, i
        if self.known_L is None:
            self._estimate_L()
        return i

    def _estimate_L(self) -> None:
        m = self.slope_max
        if m <= 0:
            # No slope yet (one point, or a constant function): a tiny L, so the bounds follow
            # the data until a slope appears.
            scale = max(1.0, abs(self.f_best)) if math.isfinite(self.f_best) else 1.0
            new = 1e-9 * scale / self.diag
        else:
            new = self.safety * L_GRID ** math.ceil(math.log(m) / math.log(L_GRID))
        if new > self.L * (1 + 1e-12) or self.n == 1:
            self.L, self.L_dirty = new, True

    def lower_above(self, y: FloatArray) -> float:
        """``max_i f_i - L ||y - x_i||``: f(y) is at least this."""
        if self.n == 0:
            return -math.inf
        return float((self._fb() - self.L * _rownorm(self.X - y)).max())

    def may_conclude(self) -> bool:
        # An estimated L resting on few samples can be tiny and close the gap falsely.
        return self.known_L is not None or self.n - self.nonfinite >= 10 * (self.d + 1)

    def fhat(self) -> float:
        """The pruning level f̂* (inf: nothing is pruned yet)."""
        if not math.isfinite(self.f_best) or not self.may_conclude():
            return math.inf
        delta = self.tol
        if self.f_lower is not None:
            delta = max(delta, (1 - self.rho) * (self.f_best - self.f_lower))
        return self.f_best - delta

    def in_ball(self, y: FloatArray) -> bool:
        """Whether y lies in a pruning ball (its lower estimate exceeds f̂*, with a rounding
        margin so a point on a ball's surface counts as outside)."""
        fh = self.fhat()
        return self.lower_above(y) > fh + 1e-12 * (1 + abs(fh))

    # ---- cell bounds ----
    def _far(self, idx: list[int] | NDArray[np.int64], c: _Cell) -> FloatArray:
        """Distance from each sample in idx to the farthest corner of cell c."""
        X = self.X[idx]
        return _rownorm(np.maximum(np.abs(X - c.lo), np.abs(X - c.hi)))

    def _term_values(self, c: _Cell) -> FloatArray:
        return self._fb()[c.terms] - self.L * self._far(c.terms, c)

    def _bound_from_all(self, c: _Cell) -> None:
        """Exact bound of c from every finite sample; keep the K best as its terms (ties:
        lower sample index first)."""
        fin = np.flatnonzero(np.isfinite(self.F))
        if fin.size == 0:
            c.bound, c.terms = -math.inf, []
            return
        vals = self.F[fin] - self.L * self._far(fin, c)
        order = np.lexsort((fin, -vals))[:K_TERMS]
        c.terms = fin[order].tolist()
        c.bound = float(vals[order[0]])

    def add_term(self, ci: int, i: int) -> None:
        """Tighten cell ci's bound with sample i; i replaces the weakest kept term if better."""
        if not math.isfinite(self.F[i]):
            return
        c = self.cells[ci]
        val = float(self.F[i] - self.L * self._far([i], c)[0])
        if val > c.bound:
            c.bound = val
        if len(c.terms) < K_TERMS:
            c.terms.append(i)
            return
        tv = self._term_values(c)
        j = int(np.argmin(tv))
        if val > tv[j]:
            c.terms[j] = i

    def leaf_of(self, x: FloatArray) -> int:
        ci = 0
        while self.cells[ci].state == CellState.SPLIT:
            c = self.cells[ci]
            k, a = c.sdim, c.child
            ci = a + int(x[k] >= self.cells[a + 1].lo[k]) + int(x[k] >= self.cells[a + 2].lo[k])
        return ci

    def insert_term(self, i: int) -> None:
        self.add_term(self.leaf_of(self.X[i]), i)

    def _refresh_L(self) -> None:
        """After L grew: every undivided cell's bound from its kept terms; pruned cells live."""
        if not self.L_dirty:
            return
        self.L_dirty = False
        self.pruned_min = math.inf
        for c in self.cells:
            if c.state == CellState.SPLIT:
                continue
            c.bound = float(self._term_values(c).max()) if c.terms else -math.inf
            if c.state == CellState.PRUNED:
                c.state = CellState.LEAF
            elif c.state == CellState.RETIRED:
                self.pruned_min = min(self.pruned_min, c.bound)

    def _live(self) -> list[int]:
        return [i for i, c in enumerate(self.cells) if c.state == CellState.LEAF]

    def _lowest(self) -> int:
        """The live cell with the lowest bound (ties: key, then index), or -1."""
        live = self._live()
        if not live:
            return -1
        return min(live, key=lambda i: (self.cells[i].bound, self.cells[i].key, i))

    def lower_bound(self) -> float:
        top = self._lowest()
        live = self.cells[top].bound if top >= 0 else math.inf
        return min(live, self.pruned_min)

    def _hull_cells(self) -> list[int]:
        """DIRECT's potentially optimal cells: per depth the live cell of lowest centre value,
        then the lower-right convex hull of (size, value) from the lowest value onwards."""
        best: dict[int, int] = {}
        for i in self._live():
            c = self.cells[i]
            if c.centre < 0 or not math.isfinite(self.F[c.centre]):
                continue
            j = best.get(c.depth)
            if j is None or (c.value, c.key, i) < (self.cells[j].value, self.cells[j].key, j):
                best[c.depth] = i
        pts = sorted((self.cells[i].size, self.cells[i].value, i) for i in best.values())
        if not pts:
            return []
        j0 = min(range(len(pts)), key=lambda j: (pts[j][1], -pts[j][0]))
        chain: list[tuple[float, float, int]] = []
        for p in pts[j0:]:
            while len(chain) >= 2:
                (x1, y1, _), (x2, y2, _) = chain[-2], chain[-1]
                if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                    chain.pop()  # the middle point is on or above the segment
                else:
                    break
            chain.append(p)
        return [c[2] for c in chain]

    # ---- the loop ----
    def start(self) -> None:
        """The root cell: the box, its centre already evaluated as sample 0."""
        root = _Cell(self.lb.copy(), self.ub.copy(), 0, cell_key(self.seed, 0), centre=0)
        self.cells.append(root)
        self._refresh_L()
        self._bound_from_all(root)
        self._place(0, self.fhat())

    def _place(self, ci: int, fh: float) -> None:
        """Set a new cell's ranking value and size; prune it or leave it live."""
        c = self.cells[ci]
        fc = self.F[c.centre] if c.centre >= 0 else math.nan
        c.value = fc  # only cells with a finite centre value compete in the hull
        rel = (c.hi - c.lo) / self.width
        c.size = 0.5 * math.sqrt(float(np.sum(rel * rel)))
        if c.bound > fh:
            c.state = CellState.PRUNED
            self.pruned_min = min(self.pruned_min, c.bound)

    def _stop(self, status: Status) -> Event:
        self.status = int(status)
        return Event.STOP

    def advance(self, queued: bool, nit: int, limit: int) -> tuple[Event, int, FloatArray]:
        """Iterations until one asks something of the driver, or ``limit`` of them ran:
        (the last one's event, how many ``DONE`` iterations came before it, its points)."""
        k = 0
        while True:
            ev = self._iterate(queued, nit + k)
            if ev != Event.DONE or k + 1 >= limit:
                return ev, k, self.points()
            k += 1

    def take(
        self, x: FloatArray, f: float, g: FloatArray | None, queued: bool, nit: int, limit: int
    ) -> tuple[Event, int, FloatArray]:
        """``add`` the last point of a division, ``finish`` the division, then ``advance``."""
        n = len(self._todo)
        i = self.add(x, f, g)
        self.finish(list(range(i - n + 1, i + 1)))
        return self.advance(queued, nit, limit)

    def _iterate(self, queued: bool, nit: int) -> Event:
        self._refresh_L()
        lower = self.lower_bound()
        if math.isfinite(self.f_best) and self.may_conclude() and self.f_best - lower <= self.tol:
            return self._stop(Status.GAP)
        if nit >= self.maxiter:
            return self._stop(Status.MAXITER)
        if queued:
            return Event.BRANCH
        fh = self.fhat()
        ci = self._lowest()
        if ci < 0 or self.cells[ci].bound > fh:
            return self._stop(Status.GAP if self.f_best - lower <= self.tol else Status.COVERED)
        if self.strategy != Strategy.BOUND:
            while self.pending and self.cells[self.pending[-1]].state != CellState.LEAF:
                self.pending.pop()
            if not self.pending and self.bound_turns > 0:
                self.bound_turns -= 1  # balanced: ci stays the cell of lowest bound
            else:
                if not self.pending:
                    self.pending = self._hull_cells()[::-1]
                    if self.strategy == Strategy.BALANCED:
                        self.bound_turns = len(self.pending)
                if self.pending:
                    ci = self.pending.pop()
        c = self.cells[ci]
        if c.bound > fh:
            c.state = CellState.PRUNED
            self.pruned_min = min(self.pruned_min, c.bound)
            return Event.DONE
        return self._divide(ci)

    def _divide(self, ci: int) -> Event:
        c = self.cells[ci]
        if c.centre < 0:
            # The centre was in a pruning ball when the cell was made; balls move with f̂*, L.
            y = 0.5 * (c.lo + c.hi)
            if not self.in_ball(y):
                self._todo, self._div = [y], (ci, -1, [])
                return Event.EVAL
        w = c.hi - c.lo
        rel = w / self.width
        if float(rel.max()) < MIN_REL_SIZE:
            c.state = CellState.RETIRED  # its (valid) bound stays in the certificate
            self.pruned_min = min(self.pruned_min, c.bound)
            return Event.DONE
        # the longest side relative to the box, among sides not much shorter than the longest
        k = int(np.argmax(np.where(w >= w.max() * MIN_SIDE_RATIO, rel, -1.0)))
        a, b = c.lo[k] + w[k] / 3, c.lo[k] + 2 * w[k] / 3
        k0 = len(self.cells)
        for j, (lo_k, hi_k) in enumerate(((c.lo[k], a), (a, b), (b, c.hi[k]))):
            lo, hi = c.lo.copy(), c.hi.copy()
            lo[k], hi[k] = lo_k, hi_k
            kid = _Cell(lo, hi, c.depth + 1, cell_key(self.seed, k0 + j))
            self._bound_from_all(kid)
            self.cells.append(kid)
        c.child, c.sdim, c.state = k0, k, CellState.SPLIT
        self.cells[k0 + 1].centre = c.centre
        self._todo, slots = [], []
        fh = self.fhat()
        thr = fh + 1e-12 * (1 + abs(fh))
        for j in (0, 2):
            kid = self.cells[k0 + j]
            y = 0.5 * (kid.lo + kid.hi)
            if not self.lower_above(y) > thr:  # outside every ball: evaluate it
                self._todo.append(y)
                slots.append(j)
        self._div = (ci, k0, slots)
        if self._todo:
            return Event.EVAL
        self.finish([])
        return Event.DONE

    def points(self) -> FloatArray:
        """The points ``advance`` asked to evaluate (rows, in order)."""
        return np.array(self._todo).reshape(-1, self.d)

    def finish(self, idx: list[int]) -> None:
        """Take the samples of the points asked for (``-1`` for any not evaluated because
        the run stopped) into their cells."""
        assert self._div is not None
        ci, k0, slots = self._div
        self._div = None
        new = [i for i in idx if i >= 0]
        if k0 < 0:  # a re-evaluated centre
            if new:
                c = self.cells[ci]
                c.centre = new[0]
                self.add_term(ci, new[0])
                if math.isfinite(self.F[new[0]]):
                    c.value = float(self.F[new[0]])
            return
        for j, i in zip(slots, idx, strict=False):
            if i >= 0:
                self.cells[k0 + j].centre = i
                self.add_term(k0 + j, i)
        fh = self.fhat()
        for j in range(3):
            self._place(k0 + j, fh)

    def info(self) -> tuple[float, float, float, float, float, int]:
        """(L, f̂*, lower bound, largest slope, robust slope, status)."""
        lower = self.lower_bound()
        return self.L, self.fhat(), lower, self.slope_max, self.robust_slope, self.status
