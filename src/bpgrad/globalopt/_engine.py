"""The search of :func:`bpgrad.minimize`, compiled with numba.

The same search as ``_reference.py`` (read that first: it is the readable statement, and the
tests demand that both evaluate the same points), with the state in one numba ``StructRef``
whose fields are named like the reference's attributes, so a call passes one pointer. Each
entry point is compiled once, for one signature, and cached on disk (``cache=True``).

Two things differ from the reference, neither changes a decision:

* the live cells sit in a lazy binary heap ordered by (bound, key, cell) instead of being
  scanned, and stale entries (the cell was divided, pruned, or its bound changed) are dropped
  when they reach the top;
* the queries over the samples (ball test, slope update, the bounds of new cells) walk the
  tree of cells: each sample is listed at the cell that was a leaf where it fell, each cell
  keeps the largest and smallest finite value below it, and a subtree whose box and values
  show that no sample in it can reach the threshold is skipped. Those bounds carry a relative
  margin, so rounding can only add a subtree to the walk, never hide a sample.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, types
from numba.experimental import structref

from bpgrad.globalopt._reference import K_TERMS, L_GRID, MIN_REL_SIZE, MIN_SIDE_RATIO, SLOPE_RTOL

__all__ = ["CompiledSearch"]

_K = K_TERMS
_LEAF, _SPLIT, _PRUNED, _RETIRED = 0, 1, 2, 3
_EVAL, _DONE, _BRANCH, _STOP = 0, 1, 2, 3
_GAP, _COVERED, _MAXITER = 0, 1, 3
_MARGIN = 1e-9  # relative safety margin of the subtree bounds

jit = njit(cache=True, nogil=True)


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
    ("maxiter", types.int64), ("hull", types.boolean), ("seed", types.uint64),
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
    # the query tree over the cells: first listed sample, largest and smallest finite value below
    ("head", _i1), ("cfmax", _f1), ("cfmin", _f1), ("stack", _i1),
    # per depth: its cells (linked by dnext), and the best hull candidate unless dirty
    ("dhead", _i1), ("dnext", _i1), ("dbest", _i1), ("ddirty", _i1),
    # lazy heap of live cells by (bound, key, cell); hull cells still to divide
    ("hb", _f1), ("hk", _f1), ("hc", _i1), ("hn", types.int64),
    ("pending", _i1), ("npend", types.int64),
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


@jit
def _dist(X: Any, i: int, y: Any) -> float:
    s = 0.0
    for c in range(y.shape[0]):
        t = X[i, c] - y[c]
        s += t * t
    return math.sqrt(s)


@jit
def _far(X: Any, i: int, lo: Any, hi: Any) -> float:
    """Distance from sample i to the farthest corner of the box [lo, hi]."""
    s = 0.0
    for c in range(lo.shape[0]):
        t = max(abs(X[i, c] - lo[c]), abs(X[i, c] - hi[c]))
        s += t * t
    return math.sqrt(s)


@jit
def _gap(clo: Any, chi: Any, c: int, y: Any, half: Any) -> float:
    """Distance from y to cell c's box, plus ``half`` per coordinate: with y the centre of a
    box of half-widths half, the least far-corner distance of a point of c's box to it.

    The hot helpers take arrays, not the state: each read of a state field takes and drops a
    reference to the array (two atomic operations), which in inner loops costs more than the
    arithmetic."""
    s = 0.0
    for j in range(y.shape[0]):
        t = max(max(clo[c, j] - y[j], y[j] - chi[c, j]), 0.0) + half[j]
        s += t * t
    return math.sqrt(s)


@jit
def _walk(state: Any, child: Any, stack: Any, c: int, out: int) -> int:
    """Push the children of cell c (if divided) onto the walk's stack; returns its size."""
    if state[c] == _SPLIT:
        for q in range(3):
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
        if st.state[c] != _SPLIT:
            break
        k, a = st.sdim[c], st.child[c]
        c = a + (1 if x[k] >= st.clo[a + 1, k] else 0) + (1 if x[k] >= st.clo[a + 2, k] else 0)
    st.nxt[i] = st.head[c]
    st.head[c] = i


@jit
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
    clo, chi, state, child, stack = st.clo, st.chi, st.state, st.child, st.stack
    zero = np.zeros(y.shape[0])
    stack[0] = 0
    while top > 0:
        top -= 1
        c = stack[top]
        if cfmax[c] - L * _gap(clo, chi, c, y, zero) < thr - _slack(st, thr):
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
        top = _walk(state, child, stack, c, top)
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
        clo, chi, state, child, stack = st.clo, st.chi, st.state, st.child, st.stack
        zero = np.zeros(x.shape[0])
        stack[0] = 0
        while top > 0:
            top -= 1
            c = stack[top]
            # can no sample below c raise the smaller of the two maxima?
            df = max(f - cfmin[c], cfmax[c] - f)
            if not df >= min(smax, rob) * (1 - _MARGIN) * _gap(clo, chi, c, x, zero):
                continue
            j = head[c]
            while j >= 0:
                dist = _dist(X, j, x)
                if dist > 0 and math.isfinite(F[j]):
                    a = abs(F[j] - f)
                    smax = max(smax, a / dist)
                    rob = max(rob, (a - SLOPE_RTOL * (abs(F[j]) + abs(f))) / dist)
                j = nxt[j]
            top = _walk(state, child, stack, c, top)
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


# ---- cells ----
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
        if (v, k, c) < (st.hb[p], st.hk[p], st.hc[p]):
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
        if a + 1 < n and (st.hb[a + 1], st.hk[a + 1], st.hc[a + 1]) < (st.hb[a], st.hk[a], st.hc[a]):
            a += 1
        if (st.hb[a], st.hk[a], st.hc[a]) < (v, k, c):
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
        st.bound = _more(st.bound, -math.inf)
        st.value = _more(st.value, math.inf)
        st.size = _more(st.size, 0.0)
        st.key = _more(st.key, 0.0)
        st.head = _more(st.head, -1)
        st.cfmax = _more(st.cfmax, -math.inf)
        st.cfmin = _more(st.cfmin, math.inf)
        st.stack = _more(st.stack, 0)
        st.dnext = _more(st.dnext, -1)
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
    while depth >= st.dhead.shape[0]:
        st.dhead, st.dbest = _more(st.dhead, -1), _more(st.dbest, -1)
        st.ddirty = _more(st.ddirty, 0)
    st.dnext[c], st.dhead[depth] = st.dhead[depth], c
    st.key[c] = _cell_key(st.seed, c)
    return c


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
    clo, chi, state, child, stack = st.clo, st.chi, st.state, st.child, st.stack
    lo, hi = clo[c], chi[c]
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
            if cfmax[u] - L * _gap(clo, chi, u, y, half) < cut - _slack(st, cut):
                continue
        i = head[u]
        while i >= 0:
            cnt = _offer(F, X, L, lo, hi, i, tv, ti, cnt)
            i = nxt[i]
        top = _walk(state, child, stack, u, top)
    _set_row(st.terms, c, ti)
    st.bound[c] = tv[0]


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
    for t in range(st.ddirty.shape[0]):
        st.ddirty[t] = 1  # pruned cells return
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
def _eligible(st: Any, c: int) -> bool:
    i = st.centre[c]
    return st.state[c] == _LEAF and i >= 0 and math.isfinite(st.F[i])


@jit
def _better(st: Any, c: int, j: int) -> bool:
    return j < 0 or (st.value[c], st.key[c], c) < (st.value[j], st.key[j], j)


@jit
def _offer_hull(st: Any, c: int) -> None:
    """Cell c may now compete in the hull: keep its depth's best up to date."""
    t = st.depth[c]
    if _eligible(st, c) and st.ddirty[t] == 0 and _better(st, c, st.dbest[t]):
        st.dbest[t] = c


@jit
def _depth_best(st: Any, t: int) -> int:
    """The best hull candidate of depth t; a stale one is found again from the depth's list,
    which drops its divided and retired cells (they never return) on the way."""
    j = st.dbest[t]
    if st.ddirty[t] == 0 and (j < 0 or _eligible(st, j)):
        return j
    j, prev, c = -1, -1, st.dhead[t]
    while c >= 0:
        nxt = st.dnext[c]
        if st.state[c] == _SPLIT or st.state[c] == _RETIRED:
            if prev < 0:
                st.dhead[t] = nxt
            else:
                st.dnext[prev] = nxt
        else:
            if _eligible(st, c) and _better(st, c, j):
                j = c
            prev = c
        c = nxt
    st.dbest[t], st.ddirty[t] = j, 0
    return j


@jit
def _hull_cells(st: Any) -> None:
    """``ReferenceSearch._hull_cells`` onto ``pending`` (the first to divide last)."""
    maxd = st.dhead.shape[0] - 1
    best = np.full(maxd + 1, -1)
    for t in range(maxd + 1):
        best[t] = _depth_best(st, t)
    m = 0
    pts = np.empty(maxd + 1, np.int64)
    for j in best:
        if j < 0:
            continue
        q = m  # insertion into (size, value, cell) order
        while q > 0 and (st.size[j], st.value[j], j) < (st.size[pts[q - 1]], st.value[pts[q - 1]], pts[q - 1]):
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
        _offer_hull(st, c)


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
                _offer_hull(st, ci)
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
def advance(st: Any, queued: bool, nit: int) -> int:
    """``ReferenceSearch.advance``: one iteration up to the next point where Python acts."""
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
    if st.hull:
        while st.npend > 0 and st.state[st.pending[st.npend - 1]] != _LEAF:
            st.npend -= 1
        if st.npend == 0:
            _hull_cells(st)
        if st.npend > 0:
            st.npend -= 1
            ci = st.pending[st.npend]
    if st.bound[ci] > fh:
        st.state[ci] = _PRUNED
        st.pruned_min = min(st.pruned_min, st.bound[ci])
        return _DONE
    return _divide(st, ci)


@jit
def _new_state(
    lb: Any, ub: Any, known: bool, L: float, rho: float, f_lower: float, tol: float,
    maxiter: int, hull: bool, seed: Any, safety: float,
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
    st.hull, st.seed, st.safety = hull, seed, safety
    st.X, st.F = np.zeros((cap, d)), np.zeros(cap)
    st.n, st.best, st.f_best, st.nonfinite, st.f_abs = 0, -1, math.inf, 0, 0.0
    st.slope_max, st.robust_slope = 0.0, 0.0
    st.nxt, st.head, st.stack = np.full(cap, -1), np.full(cap, -1), np.full(cap, 0)
    st.cfmax, st.cfmin = np.full(cap, -math.inf), np.full(cap, math.inf)
    st.dhead, st.dnext, st.dbest = np.full(64, -1), np.full(cap, -1), np.full(64, -1)
    st.ddirty = np.full(64, 0)
    st.clo, st.chi = np.zeros((cap, d)), np.zeros((cap, d))
    st.bound, st.value = np.full(cap, -math.inf), np.full(cap, math.inf)
    st.size, st.key = np.zeros(cap), np.zeros(cap)
    st.terms = np.full(cap * _K, -1).reshape(cap, _K)
    st.state, st.centre = np.full(cap, 0), np.full(cap, -1)
    st.child, st.sdim, st.depth = np.full(cap, -1), np.full(cap, -1), np.full(cap, 0)
    st.nc, st.pruned_min = 0, math.inf
    st.hb, st.hk, st.hc, st.hn = np.zeros(cap), np.zeros(cap), np.zeros(cap, np.int64), 0
    st.pending, st.npend = np.zeros(64, np.int64), 0
    st.todo, st.ntodo, st.div_cell, st.div_k0 = np.zeros((2, d)), 0, -1, -1
    st.slots, st.status = np.zeros(2, np.int64), -1
    return st


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


class CompiledSearch:
    """``ReferenceSearch``'s interface over the compiled functions above."""

    def __init__(
        self,
        lb: Any,
        ub: Any,
        *,
        lipschitz: float | None,
        rho: float,
        f_lower: float | None,
        tol: float,
        maxiter: int,
        hull: bool,
        seed: int,
        safety: float,
    ) -> None:
        self.st = _new_state(
            np.ascontiguousarray(lb, dtype=np.float64), np.ascontiguousarray(ub, dtype=np.float64),
            lipschitz is not None, 1.0 if lipschitz is None else lipschitz, rho,
            math.nan if f_lower is None else f_lower, tol, maxiter, hull, np.uint64(seed), safety,
        )  # fmt: skip
        self._nog = np.zeros(lb.size)

    def add(self, x: Any, f: float, g: Any, kind: int) -> int:
        return int(add(self.st, x, f, self._nog if g is None else g, g is not None))

    def insert_term(self, i: int) -> None:
        insert_term(self.st, i)

    def in_ball(self, y: Any) -> bool:
        return bool(in_ball(self.st, y))

    def start(self) -> None:
        start(self.st)

    def advance(self, queued: bool, nit: int) -> int:
        return int(advance(self.st, queued, nit))

    def points(self) -> Any:
        return _points(self.st)

    def finish(self, idx: list[int]) -> None:
        finish(self.st, np.array(idx, dtype=np.int64))

    def info(self) -> tuple[float, float, float, float, float, int]:
        """(L, f̂*, lower bound, largest slope, robust slope, status)."""
        L, fh, lower, smax, rob, status = _info(self.st)
        return float(L), float(fh), float(lower), float(smax), float(rob), int(status)
