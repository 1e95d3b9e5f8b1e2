"""The search of :func:`bpgrad.minimize`, compiled with numba.

The same search as ``_reference.py`` (read that first: it is the readable statement, and the
tests demand that both evaluate the same points), over the state and queries of ``_state.py``.
Each entry point is compiled once, for one signature, and cached on disk (``cache=True``).
Besides the queries (see ``_state.py``), one thing differs from the reference without changing
a decision: the live cells sit in a lazy binary heap ordered by (bound, key, cell) instead of
being scanned (stale entries are dropped when they reach the top).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bpgrad.globalopt._reference import MIN_REL_SIZE, MIN_SIDE_RATIO, Event, Strategy
from bpgrad.globalopt._result import Status
from bpgrad.globalopt._state import (
    _K,
    _LEAF,
    _PRUNED,
    _RETIRED,
    _SPLIT,
    _bound_from_all,
    _cell_key,
    _centre,
    _far,
    _fhat,
    _index,
    _lower_above,
    _more,
    _more_f2,
    _new_state,
    _prune_level,
    _set_row,
    add,
    hot,
    in_ball,
    jit,
)

__all__ = ["CompiledSearch"]

_EVAL, _DONE, _BRANCH, _STOP = map(int, Event)  # plain ints in compiled code
_GAP, _COVERED, _MAXITER = int(Status.GAP), int(Status.COVERED), int(Status.MAXITER)
_BOUND, _BALANCED = int(Strategy.BOUND), int(Strategy.BALANCED)


# ---- cells ----
@hot
def _entry(st: Any, q: int) -> tuple[float, float, int]:
    """Heap entry q as its sort key (bound, key, cell)."""
    return st.hb[q], st.hk[q], st.hc[q]


@hot
def _hull_order(st: Any, c: int) -> tuple[float, float, int]:
    """Cell c's place in the hull's (size, value, cell) order."""
    return st.size[c], st.value[c], c


@jit
def _push(st: Any, c: int) -> None:
    if st.hn == st.hb.shape[0]:
        st.hb = _more(st.hb, 0.0)
        st.hk = _more(st.hk, 0.0)
        st.hc = _more(st.hc, 0)
    v, k = st.bound[c], st.key[c]
    q = st.hn
    st.hn += 1
    while q > 0:
        p = (q - 1) >> 1
        if (v, k, c) < _entry(st, p):
            st.hb[q], st.hk[q], st.hc[q] = st.hb[p], st.hk[p], st.hc[p]
            q = p
        else:
            break
    st.hb[q], st.hk[q], st.hc[q] = v, k, c


@jit
def _pop(st: Any) -> None:
    st.hn -= 1
    n = st.hn
    v, k, c = st.hb[n], st.hk[n], st.hc[n]
    q = 0
    while True:
        a = 2 * q + 1
        if a >= n:
            break
        if a + 1 < n and _entry(st, a + 1) < _entry(st, a):
            a += 1
        if _entry(st, a) < (v, k, c):
            st.hb[q], st.hk[q], st.hc[q] = st.hb[a], st.hk[a], st.hc[a]
            q = a
        else:
            break
    if n > 0:
        st.hb[q], st.hk[q], st.hc[q] = v, k, c


@jit
def _lowest(st: Any) -> int:
    while st.hn > 0:
        c = st.hc[0]
        if st.state[c] == _LEAF and st.bound[c] == st.hb[0]:
            return c
        _pop(st)
    return -1


@jit
def _lower_bound(st: Any) -> float:
    top = _lowest(st)
    live = st.bound[top] if top >= 0 else math.inf
    return min(live, st.pruned_min)


@jit
def _new_cell(st: Any, lo: Any, hi: Any, depth: int) -> int:
    c = st.nc
    if c == st.bound.shape[0]:
        st.clo = _more_f2(st.clo, 0.0)
        st.chi = _more_f2(st.chi, 0.0)
        st.slo = _more_f2(st.slo, math.inf)
        st.shi = _more_f2(st.shi, -math.inf)
        st.bound = _more(st.bound, -math.inf)
        st.value = _more(st.value, math.inf)
        st.size = _more(st.size, 0.0)
        st.key = _more(st.key, 0.0)
        st.head = _more(st.head, -1)
        st.cfmax = _more(st.cfmax, -math.inf)
        st.cfmin = _more(st.cfmin, math.inf)
        st.stack = _more(st.stack, 0)
        terms = np.empty((2 * c, _K), np.int64)
        for i in range(2 * c):
            for q in range(_K):
                terms[i, q] = st.terms[i, q] if i < c else -1
        st.terms = terms
        st.state = _more(st.state, _LEAF)
        st.centre = _more(st.centre, -1)
        st.child = _more(st.child, -1)
        st.sdim = _more(st.sdim, -1)
        st.depth = _more(st.depth, 0)
    st.nc = c + 1
    _set_row(st.clo, c, lo)
    _set_row(st.chi, c, hi)
    st.depth[c] = depth
    st.maxdepth = max(st.maxdepth, depth)
    st.key[c] = _cell_key(st.seed, c)
    return c


@jit
def _add_term(st: Any, c: int, i: int) -> None:
    """``ReferenceSearch.add_term``."""
    if not math.isfinite(st.F[i]):
        return
    val = st.F[i] - st.L * _far(st.X, i, st.clo[c], st.chi[c])
    if val > st.bound[c]:
        st.bound[c] = val
        if st.state[c] == _LEAF:
            _push(st, c)
    j, jv = -1, math.inf
    for q in range(_K):
        t = st.terms[c, q]
        if t < 0:
            st.terms[c, q] = i
            return
        v = st.F[t] - st.L * _far(st.X, t, st.clo[c], st.chi[c])
        if v < jv:
            j, jv = q, v
    if val > jv:
        st.terms[c, j] = i


@jit
def insert_term(st: Any, i: int) -> None:
    """A sample that is no cell's centre tightens the bound of the leaf that holds it."""
    c = 0
    x = st.X[i]
    while st.state[c] == _SPLIT:
        k, a = st.sdim[c], st.child[c]
        c = a + (1 if x[k] >= st.clo[a + 1, k] else 0) + (1 if x[k] >= st.clo[a + 2, k] else 0)
    _add_term(st, c, i)


@jit
def _refresh_L(st: Any) -> None:
    if not st.L_dirty:
        return
    st.L_dirty = False
    st.pruned_min = math.inf
    st.hn = 0
    for c in range(st.nc):
        if st.state[c] == _SPLIT:
            continue
        b = -math.inf
        for q in range(_K):
            t = st.terms[c, q]
            if t >= 0:
                b = max(b, st.F[t] - st.L * _far(st.X, t, st.clo[c], st.chi[c]))
        st.bound[c] = b
        if st.state[c] == _PRUNED:
            st.state[c] = _LEAF
        if st.state[c] == _RETIRED:
            st.pruned_min = min(st.pruned_min, b)
        elif st.state[c] == _LEAF:
            _push(st, c)


@jit
def _hull_cells(st: Any) -> None:
    """``ReferenceSearch._hull_cells`` onto ``pending`` (the first to divide last)."""
    maxd = st.maxdepth
    best = np.full(maxd + 1, -1)  # per depth, the live cell of lowest centre value
    # Every live cell is in the heap once with its current bound (the other entries are stale):
    # scanning the heap, not all cells, keeps this O(live) when most cells are pruned.
    for q in range(st.hn):
        c = st.hc[q]
        i = st.centre[c]
        stale = st.bound[c] != st.hb[q]
        if stale or st.state[c] != _LEAF or i < 0 or not math.isfinite(st.F[i]):
            continue
        j = best[st.depth[c]]
        if j < 0 or (st.value[c], st.key[c], c) < (st.value[j], st.key[j], j):
            best[st.depth[c]] = c
    m = 0
    pts = np.empty(maxd + 1, np.int64)
    for j in best:
        if j < 0:
            continue
        q = m  # insertion into (size, value, cell) order
        while q > 0 and _hull_order(st, j) < _hull_order(st, pts[q - 1]):
            pts[q] = pts[q - 1]
            q -= 1
        pts[q] = j
        m += 1
    st.npend = 0
    if m == 0:
        return
    j0 = 0
    for q in range(1, m):
        a, b = pts[q], pts[j0]
        if st.value[a] < st.value[b] or (st.value[a] == st.value[b] and st.size[a] > st.size[b]):
            j0 = q
    chain = np.empty(m, np.int64)
    nch = 0
    for q in range(j0, m):
        p = pts[q]
        while nch >= 2:
            c1, c2 = chain[nch - 2], chain[nch - 1]
            x1, y1, x2, y2 = st.size[c1], st.value[c1], st.size[c2], st.value[c2]
            if (y2 - y1) * (st.size[p] - x1) >= (st.value[p] - y1) * (x2 - x1):
                nch -= 1
            else:
                break
        chain[nch] = p
        nch += 1
    if st.pending.shape[0] < nch:
        st.pending = np.empty(2 * nch, np.int64)
    for t in range(nch):
        st.pending[t] = chain[nch - 1 - t]
    st.npend = nch


@jit
def _place(st: Any, c: int, fh: float) -> None:
    i = st.centre[c]
    fc = st.F[i] if i >= 0 else math.nan
    st.value[c] = fc  # only cells with a finite centre value compete in the hull
    s = 0.0
    for j in range(st.width.shape[0]):
        r = (st.chi[c, j] - st.clo[c, j]) / st.width[j]
        s += r * r
    st.size[c] = 0.5 * math.sqrt(s)
    if st.bound[c] > fh:
        st.state[c] = _PRUNED
        st.pruned_min = min(st.pruned_min, st.bound[c])
    else:
        _push(st, c)


@jit
def start(st: Any) -> None:
    """The root cell: the box, its centre already evaluated as sample 0."""
    c = _new_cell(st, st.lb, st.ub, np.int64(0))
    st.centre[c] = 0
    _index(st, 0)
    _refresh_L(st)
    _bound_from_all(st, c, -1)
    _place(st, c, _fhat(st))


@jit
def finish(st: Any, idx: Any) -> int:
    """``ReferenceSearch.finish``; returns how many of idx are new samples."""
    ci, k0 = st.div_cell, st.div_k0
    st.ntodo = 0
    new = 0
    for i in idx:
        if i >= 0:
            new += 1
    if k0 < 0:
        if new > 0:
            s = idx[0]
            st.centre[ci] = s
            _add_term(st, ci, s)
            if math.isfinite(st.F[s]):
                st.value[ci] = st.F[s]
        return new
    for q in range(idx.shape[0]):
        if idx[q] >= 0:
            j = st.slots[q]
            st.centre[k0 + j] = idx[q]
            _add_term(st, k0 + j, idx[q])
    fh = _fhat(st)
    for j in range(3):
        _place(st, k0 + j, fh)
    return new


@jit
def _divide(st: Any, ci: int) -> int:
    d = st.lb.shape[0]
    lo, hi = st.clo[ci].copy(), st.chi[ci].copy()
    st.ntodo = 0
    if st.centre[ci] < 0:
        y = _centre(st, ci)
        if not in_ball(st, y):
            _set_row(st.todo, 0, y)
            st.ntodo, st.div_cell, st.div_k0 = 1, ci, -1
            return _EVAL
    k, big, wmax = 0, -1.0, 0.0
    for j in range(d):
        wmax = max(wmax, hi[j] - lo[j])
    for j in range(d):
        r = (hi[j] - lo[j]) / st.width[j]
        if r > big and hi[j] - lo[j] >= wmax * MIN_SIDE_RATIO:
            k, big = j, r
    if big < MIN_REL_SIZE:
        st.state[ci] = _RETIRED
        st.pruned_min = min(st.pruned_min, st.bound[ci])
        return _DONE
    wk = hi[k] - lo[k]
    a, b = lo[k] + wk / 3, lo[k] + 2 * wk / 3
    k0 = st.nc
    for j in range(3):
        klo, khi = lo.copy(), hi.copy()
        klo[k] = lo[k] if j == 0 else (a if j == 1 else b)
        khi[k] = a if j == 0 else (b if j == 1 else hi[k])
        c = _new_cell(st, klo, khi, st.depth[ci] + 1)
        _bound_from_all(st, c, ci)
    st.child[ci], st.sdim[ci], st.state[ci] = k0, k, _SPLIT
    st.centre[k0 + 1] = st.centre[ci]
    thr = _prune_level(st)
    for j in (0, 2):
        y = _centre(st, k0 + j)
        if not _lower_above(st, y, thr) > thr:
            _set_row(st.todo, st.ntodo, y)
            st.slots[st.ntodo] = j
            st.ntodo += 1
    st.div_cell, st.div_k0 = ci, k0
    if st.ntodo > 0:
        return _EVAL
    finish(st, np.empty(0, np.int64))
    return _DONE


@jit
def _info(st: Any) -> tuple[float, float, float, float, float, int]:
    return st.L, _fhat(st), _lower_bound(st), st.slope_max, st.robust_slope, st.status


@jit
def _points(st: Any) -> Any:
    out = np.empty((st.ntodo, st.lb.shape[0]))
    for i in range(st.ntodo):
        for j in range(st.lb.shape[0]):
            out[i, j] = st.todo[i, j]
    return out


@jit
def _iterate(st: Any, queued: bool, nit: int) -> int:
    """``ReferenceSearch._iterate``: one iteration."""
    _refresh_L(st)
    lower = _lower_bound(st)
    may = st.known or st.n - st.nonfinite >= 10 * (st.X.shape[1] + 1)
    if math.isfinite(st.f_best) and may and st.f_best - lower <= st.tol:
        st.status = _GAP
        return _STOP
    if nit >= st.maxiter:
        st.status = _MAXITER
        return _STOP
    if queued:
        return _BRANCH
    fh = _fhat(st)
    ci = _lowest(st)
    if ci < 0 or st.bound[ci] > fh:
        st.status = _GAP if st.f_best - lower <= st.tol else _COVERED
        return _STOP
    if st.strategy != _BOUND:
        while st.npend > 0 and st.state[st.pending[st.npend - 1]] != _LEAF:
            st.npend -= 1
        if st.npend == 0 and st.bound_turns > 0:
            st.bound_turns -= 1  # balanced: ci stays the cell of lowest bound
        else:
            # no sample since the hull was last found empty: it still is (a cell gets an
            # evaluated centre, or comes back when L grows, only after a new sample)
            if st.npend == 0 and st.hull_empty_at != st.n:
                _hull_cells(st)
                st.hull_empty_at = st.n if st.npend == 0 else -1
                if st.strategy == _BALANCED:
                    st.bound_turns = st.npend
            if st.npend > 0:
                st.npend -= 1
                ci = st.pending[st.npend]
    if st.bound[ci] > fh:
        st.state[ci] = _PRUNED
        st.pruned_min = min(st.pruned_min, st.bound[ci])
        return _DONE
    return _divide(st, ci)


@jit
def step(
    st: Any, x: Any, f: float, g: Any, has_g: bool, take: bool, queued: bool, nit: int, limit: int
) -> tuple[int, int, Any]:
    """``ReferenceSearch.take`` (``take``) or ``advance``: one entry point for both, so that
    numba compiles the search's iterations once."""
    if take:
        i = add(st, x, f, g, has_g)
        idx = np.empty(st.ntodo, np.int64)
        for q in range(st.ntodo):
            idx[q] = i - st.ntodo + 1 + q
        finish(st, idx)
    k = 0
    while True:
        ev = _iterate(st, queued, nit + k)
        if ev != _DONE or k + 1 >= limit:
            return ev, k, _points(st)
        k += 1


class CompiledSearch:
    """``ReferenceSearch``'s interface over the compiled functions above."""

    def __init__(
        self, lb: Any, ub: Any, *, lipschitz: float | None, rho: float, f_lower: float | None,
        tol: float, maxiter: int, strategy: int, seed: int, safety: float,
    ) -> None:  # fmt: skip
        self.st = _new_state(
            np.ascontiguousarray(lb, dtype=np.float64), np.ascontiguousarray(ub, dtype=np.float64),
            lipschitz is not None, 1.0 if lipschitz is None else lipschitz, rho,
            math.nan if f_lower is None else f_lower, tol, maxiter, strategy, np.uint64(seed),
            safety,
        )  # fmt: skip
        self._nog = np.zeros(lb.size)

    def add(self, x: Any, f: float, g: Any) -> int:
        return int(add(self.st, x, f, self._nog if g is None else g, g is not None))

    def insert_term(self, i: int) -> None:
        insert_term(self.st, i)

    def in_ball(self, y: Any) -> bool:
        return bool(in_ball(self.st, y))

    def start(self) -> None:
        start(self.st)

    def advance(self, queued: bool, nit: int, limit: int) -> tuple[int, int, Any]:
        return step(self.st, self._nog, 0.0, self._nog, False, False, queued, nit, limit)

    def take(
        self, x: Any, f: float, g: Any, queued: bool, nit: int, limit: int
    ) -> tuple[int, int, Any]:
        has_g = g is not None
        return step(self.st, x, f, g if has_g else self._nog, has_g, True, queued, nit, limit)

    def finish(self, idx: list[int]) -> None:
        finish(self.st, np.array(idx, dtype=np.int64))

    def info(self) -> tuple[float, float, float, float, float, int]:
        """(L, f̂*, lower bound, largest slope, robust slope, status)."""
        L, fh, lower, smax, rob, status = _info(self.st)
        return float(L), float(fh), float(lower), float(smax), float(rob), int(status)
