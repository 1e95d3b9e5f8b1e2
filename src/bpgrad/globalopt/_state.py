"""The state of the compiled search and its queries over the samples (numba).

The state is one numba ``StructRef`` whose fields are named like the attributes of
``_reference.ReferenceSearch``, so a compiled call passes one pointer. The queries over the
samples (ball test, slope update, the bound and kept samples of a new cell) walk the tree of
cells: each sample is listed at the cell that was a leaf where it fell, each cell keeps the
largest and smallest finite value below it and the bounding box of those samples (much smaller
than the cell's box in the coordinates its subtree has not split yet), and a subtree whose box
and values show that no sample in it can reach the threshold is skipped. Those bounds carry a
relative margin, so rounding can only add a subtree to the walk, never hide a sample.

numba's disk cache tracks each file on its own: after editing this module, clear the
``__pycache__`` folder (or touch ``_engine.py``) so that the engine is compiled again.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, types
from numba.experimental import structref

from bpgrad.globalopt._reference import K_TERMS, L_GRID, SLOPE_RTOL, CellState

_K = K_TERMS
_LEAF, _SPLIT, _PRUNED, _RETIRED = map(int, CellState)  # plain ints in compiled code
_MARGIN = 1e-9  # relative safety margin of the subtree bounds

jit = njit(cache=True, nogil=True)
# The small helpers of the walks are inlined into their callers: a call that passes arrays
# takes and drops a reference to each (atomic operations), which costs more than the helper.
hot = njit(cache=True, nogil=True, inline="always")


@structref.register
class _StateType(types.StructRef):
    def preprocess_fields(self, fields: Any) -> Any:
        return tuple((name, types.unliteral(typ)) for name, typ in fields)


class _State(structref.StructRefProxy):
    """The search state (opaque in Python: only the compiled functions read it)."""


_f1, _f2, _i1, _i2 = types.float64[::1], types.float64[:, ::1], types.int64[::1], types.int64[:, ::1]
_FIELDS = [
    # the box and the settings
    ("lb", _f1), ("ub", _f1), ("width", _f1), ("diag", types.float64),
    ("known", types.boolean), ("L", types.float64), ("L_dirty", types.boolean),
    ("rho", types.float64), ("f_lower", types.float64), ("tol", types.float64),
    ("maxiter", types.int64), ("strategy", types.int64), ("seed", types.uint64),
    ("safety", types.float64),
    # samples; nxt links the samples listed at one cell (head)
    ("X", _f2), ("F", _f1), ("n", types.int64), ("best", types.int64),
    ("f_best", types.float64), ("nonfinite", types.int64), ("f_abs", types.float64),
    ("slope_max", types.float64), ("robust_slope", types.float64),
    ("nxt", _i1),
    # cells
    ("clo", _f2), ("chi", _f2), ("bound", _f1), ("value", _f1), ("size", _f1), ("key", _f1),
    ("terms", _i2), ("state", _i1), ("centre", _i1), ("child", _i1), ("sdim", _i1),
    ("depth", _i1), ("nc", types.int64), ("pruned_min", types.float64),
    # the query tree over the cells: first listed sample; largest and smallest finite value
    # below, and the bounding box of those samples
    ("head", _i1), ("cfmax", _f1), ("cfmin", _f1), ("slo", _f2), ("shi", _f2), ("stack", _i1),
    ("maxdepth", types.int64),  # the deepest cell's depth
    # lazy heap of live cells by (bound, key, cell); hull cells still to divide
    ("hb", _f1), ("hk", _f1), ("hc", _i1), ("hn", types.int64),
    ("pending", _i1), ("npend", types.int64), ("bound_turns", types.int64),
    ("hull_empty_at", types.int64),  # the sample count when the hull was last found empty
    # the division waiting for its evaluations
    ("todo", _f2), ("ntodo", types.int64), ("div_cell", types.int64), ("div_k0", types.int64),
    ("slots", _i1), ("status", types.int64),
]  # fmt: skip
_STATE = _StateType(_FIELDS)
structref.define_boxing(_StateType, _State)


# ---- small helpers ----
# Array expressions and slice assignment pull in numba's broadcasting machinery, which costs
# seconds of compile time each; the few copies and fills here are plain loops instead.
@jit
def _more_f2(a: Any, fill: float) -> Any:
    """a with twice the rows, the new ones set to fill."""
    n, d = a.shape
    out = np.empty((2 * n, d))
    for i in range(2 * n):
        for j in range(d):
            out[i, j] = a[i, j] if i < n else fill
    return out


@jit
def _more(a: Any, fill: Any) -> Any:
    """a with twice the entries, the new ones set to fill (of a's type)."""
    out = np.full(2 * a.shape[0], fill)
    for i in range(a.shape[0]):
        out[i] = a[i]
    return out


@jit
def _set_row(dst: Any, i: int, src: Any) -> None:
    for j in range(src.shape[0]):
        dst[i, j] = src[j]


@jit
def _centre(st: Any, c: int) -> Any:
    y = np.empty(st.lb.shape[0])
    for j in range(y.shape[0]):
        y[j] = 0.5 * (st.clo[c, j] + st.chi[c, j])
    return y


@jit
def _cell_key(seed: Any, c: int) -> float:
    """``_reference.cell_key``: splitmix64 of (seed, c), as a double in [0, 1)."""
    z = seed + np.uint64(c + 1) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return float(z >> np.uint64(11)) * 2.0**-53


@hot
def _dist(X: Any, i: int, y: Any) -> float:
    s = 0.0
    for c in range(y.shape[0]):
        t = X[i, c] - y[c]
        s += t * t
    return math.sqrt(s)


@hot
def _far(X: Any, i: int, lo: Any, hi: Any) -> float:
    """Distance from sample i to the farthest corner of the box [lo, hi]."""
    s = 0.0
    for c in range(lo.shape[0]):
        t = max(abs(X[i, c] - lo[c]), abs(X[i, c] - hi[c]))
        s += t * t
    return math.sqrt(s)


@hot
def _gap(lo: Any, hi: Any, c: int, y: Any, half: Any) -> float:
    """Distance from y to the box [lo[c], hi[c]], plus ``half`` per coordinate: with y the
    centre of a box of half-widths half, the least far-corner distance of a point of c's box to
    it.

    The hot helpers take arrays, not the state: each read of a state field takes and drops a
    reference to the array."""
    s = 0.0
    for j in range(y.shape[0]):
        t = max(max(lo[c, j] - y[j], y[j] - hi[c, j]), 0.0) + half[j]
        s += t * t
    return math.sqrt(s)


@hot
def _walk(state: Any, child: Any, cfmax: Any, stack: Any, c: int, out: int) -> int:
    """Push the children of cell c (if divided) that hold a finite sample onto the walk's
    stack; returns its size."""
    if state[c] == _SPLIT:
        for q in range(3):
            if cfmax[child[c] + q] > -math.inf:
                stack[out] = child[c] + q
                out += 1
    return out


@jit
def _index(st: Any, i: int) -> None:
    """List sample i at the leaf that holds it; raise the value ranges on the way."""
    c, f, x = 0, st.F[i], st.X[i]
    while True:
        if math.isfinite(f):
            st.cfmax[c] = max(st.cfmax[c], f)
            st.cfmin[c] = min(st.cfmin[c], f)
            for j in range(x.shape[0]):
                st.slo[c, j] = min(st.slo[c, j], x[j])
                st.shi[c, j] = max(st.shi[c, j], x[j])
        if st.state[c] != _SPLIT:
            break
        k, a = st.sdim[c], st.child[c]
        c = a + (1 if x[k] >= st.clo[a + 1, k] else 0) + (1 if x[k] >= st.clo[a + 2, k] else 0)
    st.nxt[i] = st.head[c]
    st.head[c] = i


@hot
def _slack(st: Any, thr: float) -> float:
    return _MARGIN * (abs(thr) + st.f_abs + st.L * st.diag) + 1e-300


# ---- samples ----
@jit
def _fhat(st: Any) -> float:
    fb = st.f_best
    if not math.isfinite(fb):
        return math.inf
    if not (st.known or st.n - st.nonfinite >= 10 * (st.X.shape[1] + 1)):
        return math.inf
    delta = st.tol
    if not math.isnan(st.f_lower):
        delta = max(delta, (1 - st.rho) * (fb - st.f_lower))
    return fb - delta


@jit
def _lower_above(st: Any, y: Any, thr: float) -> float:
    """Some ``f_i - L ||y - x_i||`` above thr if there is one (the first found), else at
    most thr: all a ball test needs."""
    best = -math.inf
    top = 1 if st.nc > 0 else 0
    F, X, L, head, nxt, cfmax = st.F, st.X, st.L, st.head, st.nxt, st.cfmax
    slo, shi, state, child, stack = st.slo, st.shi, st.state, st.child, st.stack
    zero = np.zeros(y.shape[0])
    stack[0] = 0
    while top > 0:
        top -= 1
        c = stack[top]
        if cfmax[c] - L * _gap(slo, shi, c, y, zero) < thr - _slack(st, thr):
            continue
        i = head[c]
        while i >= 0:
            if math.isfinite(F[i]):
                v = F[i] - L * _dist(X, i, y)
                if v > best:
                    best = v
                    if best > thr:
                        return best
            i = nxt[i]
        top = _walk(state, child, cfmax, stack, c, top)
    return best


@jit
def _prune_level(st: Any) -> float:
    fh = _fhat(st)
    return fh + 1e-12 * (1 + abs(fh))


@jit
def in_ball(st: Any, y: Any) -> bool:
    thr = _prune_level(st)
    return _lower_above(st, y, thr) > thr


@jit
def add(st: Any, x: Any, f: float, g: Any, has_g: bool) -> int:
    """``ReferenceSearch.add``: record a sample, update the slopes, L and the best value."""
    i = st.n
    if i == st.F.shape[0]:
        st.X = _more_f2(st.X, 0.0)
        st.F = _more(st.F, 0.0)
        st.nxt = _more(st.nxt, -1)
    finite = math.isfinite(f)
    if finite:
        smax, rob = st.slope_max, st.robust_slope
        top = 1 if st.nc > 0 else 0
        F, X, head, nxt, cfmax, cfmin = st.F, st.X, st.head, st.nxt, st.cfmax, st.cfmin
        slo, shi, state, child, stack = st.slo, st.shi, st.state, st.child, st.stack
        zero = np.zeros(x.shape[0])
        stack[0] = 0
        while top > 0:
            top -= 1
            c = stack[top]
            # can no sample below c raise the smaller of the two maxima?
            df = max(f - cfmin[c], cfmax[c] - f)
            if not df >= min(smax, rob) * (1 - _MARGIN) * _gap(slo, shi, c, x, zero):
                continue
            j = head[c]
            while j >= 0:
                dist = _dist(X, j, x)
                if dist > 0 and math.isfinite(F[j]):
                    a = abs(F[j] - f)
                    smax = max(smax, a / dist)
                    rob = max(rob, (a - SLOPE_RTOL * (abs(F[j]) + abs(f))) / dist)
                j = nxt[j]
            top = _walk(state, child, cfmax, stack, c, top)
        st.slope_max, st.robust_slope = smax, rob
    if has_g:
        s = 0.0
        for c in range(g.shape[0]):
            s += g[c] * g[c]
        if math.isfinite(s):
            gn = math.sqrt(s)
            st.slope_max = max(st.slope_max, gn)
            st.robust_slope = max(st.robust_slope, gn / (1 + SLOPE_RTOL))
    _set_row(st.X, i, x)
    st.F[i] = f
    st.n = i + 1
    if st.nc > 0:  # sample 0 is listed when the root cell is made
        _index(st, i)
    if not finite:
        st.nonfinite += 1
    else:
        st.f_abs = max(st.f_abs, abs(f))
        if f < st.f_best:
            st.f_best, st.best = f, i
    if not st.known:
        m = st.slope_max
        if m <= 0:
            scale = max(1.0, abs(st.f_best)) if math.isfinite(st.f_best) else 1.0
            new = 1e-9 * scale / st.diag
        else:
            new = st.safety * L_GRID ** float(math.ceil(math.log(m) / math.log(L_GRID)))
        if new > st.L * (1 + 1e-12) or st.n == 1:
            st.L, st.L_dirty = new, True
    return i


@jit
def _offer(F: Any, X: Any, L: float, lo: Any, hi: Any, i: int, tv: Any, ti: Any, cnt: int) -> int:
    """Put sample i among the K best terms (tv, ti) of the cell [lo, hi] unless it is there
    or worse."""
    if not math.isfinite(F[i]):
        return cnt
    v = F[i] - L * _far(X, i, lo, hi)
    if cnt == _K and (v < tv[_K - 1] or (v == tv[_K - 1] and i > ti[_K - 1])):
        return cnt
    for q in range(cnt):
        if ti[q] == i:
            return cnt
    p = cnt if cnt < _K else _K - 1
    while p > 0 and (tv[p - 1] < v or (tv[p - 1] == v and ti[p - 1] > i)):
        tv[p], ti[p] = tv[p - 1], ti[p - 1]
        p -= 1
    tv[p], ti[p] = v, i
    return min(cnt + 1, _K)


@jit
def _bound_from_all(st: Any, c: int, parent: int) -> None:
    """Exact bound of cell c from every finite sample; the K best become its terms (ties: the
    lower sample index first). The parent's terms and centre go first, so the K-th best value
    starts high and the walk skips every subtree that cannot reach it."""
    tv = np.full(_K, -math.inf)
    ti = np.full(_K, -1)
    cnt = 0
    F, X, L, head, nxt, cfmax = st.F, st.X, st.L, st.head, st.nxt, st.cfmax
    state, child, stack, slo, shi = st.state, st.child, st.stack, st.slo, st.shi
    lo, hi = st.clo[c], st.chi[c]
    if parent >= 0:
        for q in range(_K):
            if st.terms[parent, q] >= 0:
                cnt = _offer(F, X, L, lo, hi, st.terms[parent, q], tv, ti, cnt)
        if st.centre[parent] >= 0:
            cnt = _offer(F, X, L, lo, hi, st.centre[parent], tv, ti, cnt)
    y = _centre(st, c)
    half = np.empty(y.shape[0])
    for j in range(y.shape[0]):
        half[j] = 0.5 * (hi[j] - lo[j])
    top = 1
    stack[0] = 0
    while top > 0:
        top -= 1
        u = stack[top]
        if cnt == _K:
            cut = tv[_K - 1]
            if cfmax[u] - L * _gap(slo, shi, u, y, half) < cut - _slack(st, cut):
                continue
        i = head[u]
        while i >= 0:
            cnt = _offer(F, X, L, lo, hi, i, tv, ti, cnt)
            i = nxt[i]
        top = _walk(state, child, cfmax, stack, u, top)
    _set_row(st.terms, c, ti)
    st.bound[c] = tv[0]


@jit
def _new_state(
    lb: Any, ub: Any, known: bool, L: float, rho: float, f_lower: float, tol: float,
    maxiter: int, strategy: int, seed: Any, safety: float,
) -> Any:  # fmt: skip
    st: Any = structref.new(_STATE)  # type: ignore[call-arg]
    d, cap = lb.shape[0], 256
    st.lb, st.ub, st.width = lb.copy(), ub.copy(), ub.copy()
    s = 0.0
    for j in range(d):
        st.width[j] = ub[j] - lb[j]
        s += st.width[j] * st.width[j]
    st.diag = math.sqrt(s)
    st.known, st.L, st.L_dirty = known, L, False
    st.rho, st.f_lower, st.tol, st.maxiter = rho, f_lower, tol, maxiter
    st.strategy, st.seed, st.safety = strategy, seed, safety
    st.X, st.F = np.zeros((cap, d)), np.zeros(cap)
    st.n, st.best, st.f_best, st.nonfinite, st.f_abs = 0, -1, math.inf, 0, 0.0
    st.slope_max, st.robust_slope = 0.0, 0.0
    st.nxt, st.head, st.stack = np.full(cap, -1), np.full(cap, -1), np.full(cap, 0)
    st.cfmax, st.cfmin = np.full(cap, -math.inf), np.full(cap, math.inf)
    st.maxdepth = 0
    st.clo, st.chi = np.zeros((cap, d)), np.zeros((cap, d))
    st.slo, st.shi = np.full((cap, d), math.inf), np.full((cap, d), -math.inf)
    st.bound, st.value = np.full(cap, -math.inf), np.full(cap, math.inf)
    st.size, st.key = np.zeros(cap), np.zeros(cap)
    st.terms = np.full(cap * _K, -1).reshape(cap, _K)
    st.state, st.centre = np.full(cap, 0), np.full(cap, -1)
    st.child, st.sdim, st.depth = np.full(cap, -1), np.full(cap, -1), np.full(cap, 0)
    st.nc, st.pruned_min = 0, math.inf
    st.hb, st.hk, st.hc, st.hn = np.zeros(cap), np.zeros(cap), np.zeros(cap, np.int64), 0
    st.pending, st.npend, st.bound_turns = np.zeros(64, np.int64), 0, 0
    st.hull_empty_at = -1
    st.todo, st.ntodo, st.div_cell, st.div_k0 = np.zeros((2, d)), 0, -1, -1
    st.slots, st.status = np.zeros(2, np.int64), -1
    return st
