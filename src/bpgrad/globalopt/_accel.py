"""Optional compiled kernels (numba) for the sample queries of :mod:`bpgrad.globalopt._core`.

The search spends most of its bookkeeping on three exact maximum queries over the samples (is a
point in a pruning ball, the bounds of the three cells of a division, the largest observed
slope). ``_core`` answers them with NumPy; when numba is installed these kernels answer them in
one compiled call each, with the same candidate samples in the same order and the same
floating-point operations, so every decision stays bit-identical.

The one operation whose rounding is not fixed by IEEE 754 alone is the row sum of squares that
``_core`` takes with ``np.einsum("ij,ij->i", a, a)``. NumPy's einsum adds the products in two
interleaved lanes (even and odd coordinates; blocks of eight coordinates in the order 6, 4, 2, 0
and 7, 5, 3, 1), without a fused multiply-add, then adds the two lanes. ``_sumsq`` reproduces
that order, and :func:`kernels_for` checks it against ``np.einsum`` on random rows of the run's
dimension before it hands out the kernels: on a NumPy build that sums differently the search
falls back to the NumPy path instead of changing a decision.

numba is not a dependency: without it (or with ``BPGRAD_NUMBA=0`` in the environment)
:func:`kernels_for` returns None and ``_core`` uses NumPy alone.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

numba: Any  # the module, or None without it (typed loosely: the stubs differ by version)
try:  # pragma: no cover - depends on the environment
    if os.environ.get("BPGRAD_NUMBA", "1") == "0":
        raise ImportError("disabled by BPGRAD_NUMBA=0")
    import numba as _numba

    numba = _numba
    _njit: Any = numba.njit(cache=True, nogil=True)
    _njit_inline: Any = numba.njit(cache=True, nogil=True, inline="always")
except ImportError:  # pragma: no cover - depends on the environment
    numba = None
    _njit = None
    _njit_inline = None

_checked: dict[int, bool] = {}


def available() -> bool:
    return numba is not None


if numba is not None:

    @_njit_inline
    def _sumsq(p: Any, d: int) -> float:
        # np.einsum's order: two lanes, unrolled blocks of 8 added from the top pair down.
        a0 = 0.0
        a1 = 0.0
        j = 0
        while d - j >= 8:
            a0 += p[j + 6]
            a1 += p[j + 7]
            a0 += p[j + 4]
            a1 += p[j + 5]
            a0 += p[j + 2]
            a1 += p[j + 3]
            a0 += p[j]
            a1 += p[j + 1]
            j += 8
        while j < d:
            a0 += p[j]
            if j + 1 < d:
                a1 += p[j + 1]
            j += 2
        return a0 + a1

    @_njit_inline
    def _row_dist(X: Any, i: int, y: Any, p: Any, d: int) -> float:
        # ||X[i] - y|| with the squares summed in einsum's order (p is scratch of length d).
        for c in range(d):
            t = X[i, c] - y[c]
            p[c] = t * t
        return math.sqrt(_sumsq(p, d))

    @_njit_inline
    def _raise_slope(X: Any, Fb: Any, i: int, x: Any, f: float, p: Any, d: int, out: float) -> float:
        # max(out, |f - f_i| / ||x - x_i||) for one sample; a sample without a finite value, or
        # at x itself, leaves out as it is.
        if not Fb[i] > -math.inf:
            return out
        r = _row_dist(X, i, x, p, d)
        if r > 0:
            sl = abs(Fb[i] - f) / r
            if sl > out:
                return sl
        return out

    @_njit
    def rows_sumsq(A: Any) -> Any:
        m, d = A.shape
        p = np.empty(d)
        out = np.empty(m)
        for i in range(m):
            for c in range(d):
                p[c] = A[i, c] * A[i, c]
            out[i] = _sumsq(p, d)
        return out

    @_njit
    def _leaf_dist(lo: Any, hi: Any, m: int, y: Any, p: Any) -> Any:
        d = y.shape[0]
        out = np.empty(m)
        for s in range(m):
            for c in range(d):
                g = max(max(lo[s, c] - y[c], y[c] - hi[s, c]), 0.0)
                p[c] = g * g
            out[s] = math.sqrt(_sumsq(p, d))
        return out

    @_njit
    def _gather(members: Any, leaves: Any) -> Any:
        cap = members.shape[1]
        total = 0
        for s in leaves:
            for j in range(cap):
                if members[s, j] < 0:
                    break
                total += 1
        out = np.empty(total, dtype=np.int64)
        t = 0
        for s in leaves:
            for j in range(cap):
                i = members[s, j]
                if i < 0:
                    break
                out[t] = i
                t += 1
        return out

    @_njit
    def index_insert(
        i: int,
        X: Any,
        F: Any,
        lo: Any,
        hi: Any,
        fb: Any,
        fmin: Any,
        members: Any,
        count: Any,
        nodes: Any,
        split: Any,
    ) -> int:
        """``_Index.insert``: -1 once sample i is in its leaf, else the node whose leaf is full
        (the caller splits it and asks again)."""
        v = 0
        while nodes[2, v] < 0:
            v = nodes[1, v] + (1 if X[i, nodes[0, v]] > split[v] else 0)
        s = nodes[2, v]
        if count[s] >= members.shape[1]:
            return v
        members[s, count[s]] = i
        count[s] += 1
        for c in range(X.shape[1]):
            lo[s, c] = min(lo[s, c], X[i, c])
            hi[s, c] = max(hi[s, c], X[i, c])
        f = F[i]
        if math.isfinite(f):
            if f > fb[s]:
                fb[s] = f
            if f < fmin[s]:
                fmin[s] = f
        return -1

    @_njit
    def ball_max(
        X: Any,
        Fb: Any,
        n: int,
        y: Any,
        L: float,
        thr: float,
        cut: float,
        scan: bool,
        lo: Any,
        hi: Any,
        fb: Any,
        members: Any,
        m: int,
    ) -> float:
        """``_Samples.lower_above``: the largest f_i - L ||y - x_i|| over the candidates."""
        d = y.shape[0]
        p = np.empty(d)
        if scan:
            cand = np.arange(n)
        else:
            dist = _leaf_dist(lo, hi, m, y, p)
            leaves = np.empty(m, dtype=np.int64)
            nl = 0
            for s in range(m):
                if fb[s] - L * dist[s] >= cut:
                    leaves[nl] = s
                    nl += 1
            cand = _gather(members, leaves[:nl])
            if cand.shape[0] == 0:
                return -math.inf
        best = -math.inf
        for i in cand:
            v = Fb[i] - L * _row_dist(X, i, y, p, d)
            if v > best:
                best = v
        return best

    @_njit
    def slope_max(
        X: Any,
        Fb: Any,
        n: int,
        x: Any,
        f: float,
        smax: float,
        scan: bool,
        lo: Any,
        hi: Any,
        fb: Any,
        fmin: Any,
        members: Any,
        m: int,
    ) -> float:
        """The slope update of ``_Samples.add``: max(smax, |f - f_i| / ||x - x_i||)."""
        d = x.shape[0]
        p = np.empty(d)
        if scan:
            cand = np.arange(n)
        else:
            dist = _leaf_dist(lo, hi, m, x, p)
            leaves = np.empty(m, dtype=np.int64)
            nl = 0
            lim = smax * (1 - 1e-9)
            for s in range(m):
                if max(f - fmin[s], fb[s] - f) >= lim * dist[s]:
                    leaves[nl] = s
                    nl += 1
            cand = _gather(members, leaves[:nl])
        out = smax
        for i in cand:
            out = _raise_slope(X, Fb, i, x, f, p, d, out)
        return out

    @_njit
    def _far_vals(X: Any, Fb: Any, cand: Any, los: Any, his: Any, L: float, p: Any) -> Any:
        b, d = los.shape
        vals = np.empty((b, cand.shape[0]))
        for j in range(b):
            for t in range(cand.shape[0]):
                i = cand[t]
                for c in range(d):
                    p[c] = max(abs(X[i, c] - los[j, c]), abs(X[i, c] - his[j, c]))
                    p[c] = p[c] * p[c]
                vals[j, t] = Fb[i] - L * math.sqrt(_sumsq(p, d))
        return vals

    @_njit
    def split_vals(
        X: Any,
        Fb: Any,
        n: int,
        los: Any,
        his: Any,
        k: int,
        L: float,
        seeds: Any,
        K: int,
        f_abs: float,
        diag: float,
        scan: bool,
        lo: Any,
        hi: Any,
        fb: Any,
        members: Any,
        m: int,
    ) -> tuple[Any, Any]:
        """``_Samples.split_terms``: the candidates and their values on each new cell."""
        b, d = los.shape
        p = np.empty(d)
        if scan:
            cand = np.arange(n)
            return cand, _far_vals(X, Fb, cand, los, his, L, p)
        thr = -math.inf
        ns = seeds.shape[0]
        if ns >= K:
            sv = _far_vals(X, Fb, seeds, los, his, L, p)
            thr = math.inf
            for j in range(b):
                row = np.sort(sv[j])
                if row[ns - K] < thr:
                    thr = row[ns - K]
        if thr > -math.inf:
            cut = thr - (1e-9 * (abs(thr) + f_abs + L * diag) + 1e-300)
            y0 = 0.5 * (los[0] + his[0])
            half = 0.5 * (his[0] - los[0])
            ck1 = 0.5 * (los[1, k] + his[1, k])
            ck2 = 0.5 * (los[2, k] + his[2, k])
            hw1 = 0.5 * (his[1, k] - los[1, k])
            hw2 = 0.5 * (his[2, k] - los[2, k])
            leaves = np.empty(m, dtype=np.int64)
            nl = 0
            for s in range(m):
                for c in range(d):
                    g = max(max(lo[s, c] - y0[c], y0[c] - hi[s, c]), 0.0) + half[c]
                    if c == k:
                        g1 = max(max(lo[s, k] - ck1, ck1 - hi[s, k]), 0.0) + hw1
                        g2 = max(max(lo[s, k] - ck2, ck2 - hi[s, k]), 0.0) + hw2
                        g = min(g, min(g1, g2))
                    p[c] = g * g
                if fb[s] - L * math.sqrt(_sumsq(p, d)) >= cut:
                    leaves[nl] = s
                    nl += 1
            cand = _gather(members, leaves[:nl])
        else:
            cand = _gather(members, np.arange(m))
        return cand, _far_vals(X, Fb, cand, los, his, L, p)

    @_njit
    def top_terms(vals: Any, cand: Any, K: int) -> tuple[bool, Any, Any, Any]:
        """Per row of vals (b, m): the largest value, and the K largest values with their
        samples, when they are unambiguous: K < m, no two of the K + 1 largest values equal.
        Then the kept set is the one np.argpartition keeps, and the order in which the terms
        are kept changes no decision (a cell's weakest term is found by value, and only a tie
        would make the position matter). Otherwise ok is False and the caller runs
        np.argpartition itself."""
        b, m = vals.shape
        bound = np.empty(b)
        terms = np.empty((b, K), dtype=np.int64)
        tv = np.empty((b, K))
        if m <= K:
            return False, bound, terms, tv
        bv = np.empty(K + 1)
        bi = np.empty(K + 1, dtype=np.int64)
        for j in range(b):
            cnt = 0
            for t in range(m):
                v = vals[j, t]
                if cnt == K + 1 and not v > bv[K]:
                    continue
                # insert after every kept value >= v, dropping the smallest when full
                q = cnt if cnt < K + 1 else K
                while q > 0 and bv[q - 1] < v:
                    if q < K + 1:
                        bv[q] = bv[q - 1]
                        bi[q] = bi[q - 1]
                    q -= 1
                bv[q] = v
                bi[q] = cand[t]
                if cnt < K + 1:
                    cnt += 1
            for q in range(K):
                if not bv[q] > bv[q + 1]:
                    return False, bound, terms, tv
                terms[j, q] = bi[q]
                tv[j, q] = bv[q]
            bound[j] = bv[0]
        return True, bound, terms, tv


def kernels_for(d: int) -> bool:
    """Whether the compiled kernels may be used in dimension d (numba present, and its sums of
    squares bit-identical to this NumPy's einsum on random rows of width d)."""
    if numba is None:
        return False
    ok = _checked.get(d)
    if ok is None:
        rng = np.random.default_rng(12345)
        A = rng.standard_normal((4096, d)) * np.exp(rng.uniform(-30, 30, (4096, d)))
        ok = bool(np.array_equal(rows_sumsq(A), np.einsum("ij,ij->i", A, A)))
        _checked[d] = ok
    return ok
