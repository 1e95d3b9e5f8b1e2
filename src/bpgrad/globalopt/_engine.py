"""The search loop of :func:`bpgrad.minimize` as one compiled state machine (numba, optional).

With the kernels of :mod:`_accel` alone, every cell division still paid for a few hundred lines
of Python (heaps, the hull, the trisection tree, cell records) and for several compiled calls,
each with its own argument handling. Here the whole loop between two evaluations runs in one
compiled call: :func:`step` divides cells until it needs ``func`` at a point (or Python must
act: polish, branch, callback, growing the arrays) and returns an event code; the caller
evaluates and calls :func:`step` again with the value. All state lives in preallocated arrays
(the tuple built by :func:`new_state`), so one call costs one argument conversion per array.

Every operation is the one ``_core`` performs, in the same order and with the same rounding,
so the same points are evaluated: the heaps return the smallest ``(value, key, cell)`` like
``heapq``, the random tie-break keys are consumed in the same order, the sums of squares follow
``np.einsum`` (``_accel._sumsq``) and the dot products follow the BLAS ``ddot`` that ``@`` calls
(a fused multiply-add per coordinate, checked against ``@`` before use by :func:`usable`).

The queries over the samples use a second k-d tree (leaves of ``_FCAP``) whose nodes keep their
box and their largest and smallest finite value, so whole subtrees are skipped; the 32-sample
leaf index of ``_core`` is still maintained, because when a new cell's kept samples tie,
``np.argpartition`` decides among them in that index's candidate order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bpgrad.globalopt import _accel

# Event codes returned by step().
EV_EVAL, EV_STOP, EV_AFTER, EV_BRANCH, EV_ITER, EV_GROW, EV_PART = range(7)
# Phases of the state machine (where step() resumes).
PH_START, PH_ROOT, PH_LOOP, PH_REEVAL, PH_PART, PH_DIV0, PH_DIV2, PH_AFTER = range(8)

# Float scalars (fs).
F_L, F_FBEST, F_FABS, F_SLOPE, F_PMIN, F_TOL, F_RHO, F_FLOWER = range(8)
F_SAFETY, F_KNOWNL, F_DIAG, F_MAXITER, F_FTARGET, F_LOW0, F_LOW1, F_LOW2 = range(8, 16)
# Int scalars (ist).
I_N, I_BEST, I_NONFIN, I_NFEV, I_NIT, I_MAXFEV, I_TN, I_M = range(8)
I_NN, I_HN, I_KPOS, I_KLEN, I_NCLS, I_POOL, I_PHASE, I_LEAF = range(8, 16)
I_K0, I_NEW0, I_NEW1, I_NNEW, I_APOS, I_PEND, I_LDIRTY, I_STRAT = range(16, 24)
I_AFTER, I_CALLBACK, I_BQ, I_STATUS, I_EVKIND, I_EVWANT, I_EVIDX, I_MAXCC = range(24, 32)
I_HASL, I_NPART, I_WANT, I_FN = range(32, 36)
# Rows of the work array W.
W_LB, W_UB, W_WIDTH, W_XQ, W_GQ, W_LOS, W_HIS, W_REL = 0, 1, 2, 3, 4, 5, 8, 11

_LEAF, _SPLIT, _PRUNED, _RETIRED = 0, 1, 2, 3
_dot_checked: dict[int, bool] = {}
_K = 4
_CAP = 32
_FCAP = 8
_SCAN_MAX = 256
_L_GRID = 1.1
GLOBAL = 0

# Positions in the state tuple.
(X_, G_, SF_, KIND_, ILO_, IHI_, IF_, IMEM_, ICNT_, NODES_, NSPLIT_, TLO_, THI_, TF_, TVAL_, TI_,
 TTERMS_, HF_, HC_, CI_, PF_, PC_, KEYS_, PEND_, FS_, IST_, W_, CAND_, VALS_, FLO_, FHI_, FF_, FI_,
 FSPL_, FMEM_) = range(35)  # fmt: skip
# Rows of TF (floats per cell) and TI (ints per cell).
TF_BOUND, TF_VALUE, TF_SIZE, TF_TVL = range(4)
TI_CHILD, TI_SDIM, TI_CENTER, TI_STATE = range(4)


def new_state(d: int, lb: Any, ub: Any) -> list[Any]:
    """The engine's arrays at their initial sizes (``grow`` doubles them)."""
    s, lc, nc, cc, hc, kc, pc = 256, 64, 64, 256, 512, 0, 1024
    st: list[Any] = [None] * 35
    st[X_] = np.empty((s, d))
    st[G_] = np.full((s, d), np.nan)
    st[SF_] = np.empty((2, s))
    st[KIND_] = np.empty(s, dtype=np.int8)
    st[ILO_] = np.full((lc, d), math.inf)
    st[IHI_] = np.full((lc, d), -math.inf)
    st[IF_] = np.empty((2, lc))
    st[IF_][0] = -math.inf
    st[IF_][1] = math.inf
    st[IMEM_] = np.full((lc, _CAP), -1, dtype=np.int64)
    st[ICNT_] = np.zeros(lc, dtype=np.int64)
    st[NODES_] = np.zeros((4, nc), dtype=np.int64)
    st[NSPLIT_] = np.zeros(nc)
    st[TLO_] = np.zeros((cc, d))
    st[THI_] = np.zeros((cc, d))
    st[TF_] = np.empty((4, cc))
    st[TF_][TF_BOUND] = -math.inf
    st[TF_][TF_VALUE] = math.inf
    st[TF_][TF_SIZE] = 0.0
    st[TF_][TF_TVL] = math.nan
    st[TVAL_] = np.zeros((cc, _K))
    st[TI_] = np.empty((4, cc), dtype=np.int64)
    st[TI_][TI_CHILD] = -1
    st[TI_][TI_SDIM] = 0
    st[TI_][TI_CENTER] = -1
    st[TI_][TI_STATE] = _LEAF
    st[TTERMS_] = np.full((cc, _K), -1, dtype=np.int64)
    st[HF_] = np.zeros((2, hc))
    st[HC_] = np.zeros(hc, dtype=np.int64)
    st[CI_] = np.zeros((4, 64), dtype=np.int64)
    st[PF_] = np.zeros((2, pc))
    st[PC_] = np.zeros(pc, dtype=np.int64)
    st[KEYS_] = np.zeros(kc)
    st[PEND_] = np.zeros(64, dtype=np.int64)
    st[FS_] = np.zeros(16)
    st[IST_] = np.zeros(40, dtype=np.int64)
    st[W_] = np.zeros((14, d))
    st[W_][W_LB] = lb
    st[W_][W_UB] = ub
    st[W_][W_WIDTH] = ub - lb
    st[CAND_] = np.zeros(s, dtype=np.int64)
    st[VALS_] = np.zeros((3, s))
    # The query tree: a k-d tree over the samples (leaves of at most _FCAP) whose every node
    # keeps the box and the largest and smallest finite value of the samples below it, so a
    # query skips whole subtrees. Fewer than s nodes: every leaf holds at least _FCAP / 2.
    st[FLO_] = np.full((s, d), math.inf)
    st[FHI_] = np.full((s, d), -math.inf)
    st[FF_] = np.empty((2, s))
    st[FF_][0] = -math.inf
    st[FF_][1] = math.inf
    st[FI_] = np.zeros((3, s), dtype=np.int64)  # rows: split coordinate, left child, count
    st[FSPL_] = np.zeros(s)
    st[FMEM_] = np.full((s, _FCAP), -1, dtype=np.int64)
    return st


def _grown(old: Any, axis: int, fill: Any) -> Any:
    shape = list(old.shape)
    n = shape[axis]
    shape[axis] = 2 * n
    new = np.full(shape, fill, dtype=old.dtype)
    if axis == 0:
        new[:n] = old
    else:
        new[:, :n] = old
    return new


def grow(st: list[Any], need_keys: int, rng: Any) -> None:
    """Double every array that ``step`` might overflow before its next safe point, and draw
    more tie-break keys (the generator's stream in order, as ``_Tree.key`` draws it)."""
    ist = st[IST_]
    n, m, nn, tn = int(ist[I_N]), int(ist[I_M]), int(ist[I_NN]), int(ist[I_TN])
    while n + 3 > st[X_].shape[0]:
        st[X_] = _grown(st[X_], 0, 0.0)
        st[G_] = _grown(st[G_], 0, math.nan)
        st[SF_] = _grown(st[SF_], 1, 0.0)
        st[KIND_] = _grown(st[KIND_], 0, 0)
        st[CAND_] = _grown(st[CAND_], 0, 0)
        st[FLO_] = _grown(st[FLO_], 0, math.inf)
        st[FHI_] = _grown(st[FHI_], 0, -math.inf)
        ff = _grown(st[FF_], 1, -math.inf)
        ff[1, ff.shape[1] // 2 :] = math.inf
        st[FF_] = ff
        st[FI_] = _grown(st[FI_], 1, 0)
        st[FSPL_] = _grown(st[FSPL_], 0, 0.0)
        st[FMEM_] = _grown(st[FMEM_], 0, -1)
        st[VALS_] = _grown(st[VALS_], 1, 0.0)
    while m + 3 > st[ILO_].shape[0]:
        st[ILO_] = _grown(st[ILO_], 0, math.inf)
        st[IHI_] = _grown(st[IHI_], 0, -math.inf)
        f = _grown(st[IF_], 1, -math.inf)
        f[1, f.shape[1] // 2 :] = math.inf
        st[IF_] = f
        st[IMEM_] = _grown(st[IMEM_], 0, -1)
        st[ICNT_] = _grown(st[ICNT_], 0, 0)
    while nn + 6 > st[NODES_].shape[1]:
        st[NODES_] = _grown(st[NODES_], 1, 0)
        st[NSPLIT_] = _grown(st[NSPLIT_], 0, 0.0)
    while tn + 6 > st[TLO_].shape[0]:
        st[TLO_] = _grown(st[TLO_], 0, 0.0)
        st[THI_] = _grown(st[THI_], 0, 0.0)
        tf = _grown(st[TF_], 1, 0.0)
        h = tf.shape[1] // 2
        tf[TF_BOUND, h:], tf[TF_VALUE, h:], tf[TF_TVL, h:] = -math.inf, math.inf, math.nan
        st[TF_] = tf
        st[TVAL_] = _grown(st[TVAL_], 0, 0.0)
        ti = _grown(st[TI_], 1, 0)
        ti[TI_CHILD, h:], ti[TI_CENTER, h:] = -1, -1
        st[TI_] = ti
        st[TTERMS_] = _grown(st[TTERMS_], 0, -1)
    # The heap holds at most one entry per push; a rebound rebuilds it with one per live cell.
    while int(ist[I_HN]) + tn + 32 > st[HC_].shape[0]:
        st[HF_] = _grown(st[HF_], 1, 0.0)
        st[HC_] = _grown(st[HC_], 0, 0)
    ncls = int(ist[I_NCLS])
    while ncls + 8 > st[CI_].shape[1] or ncls + 8 > st[PEND_].shape[0]:
        if ncls + 8 > st[CI_].shape[1]:
            st[CI_] = _grown(st[CI_], 1, 0)
        if ncls + 8 > st[PEND_].shape[0]:
            st[PEND_] = _grown(st[PEND_], 0, 0)
    # A size class that fills moves to the end of the pool with twice its room; a rebound
    # restarts the pool. Room for three moves of the largest class, or a rebuild, suffices.
    want = max(int(ist[I_POOL]) + 6 * int(ist[I_MAXCC]) + 64, 2 * tn + 16 * (ncls + 8) + 64)
    while want > st[PC_].shape[0]:
        st[PF_] = _grown(st[PF_], 1, 0.0)
        st[PC_] = _grown(st[PC_], 0, 0)
    left = int(ist[I_KLEN]) - int(ist[I_KPOS])
    if left < need_keys:
        rest = st[KEYS_][int(ist[I_KPOS]) : int(ist[I_KLEN])]
        more = rng.random(max(1024, need_keys - left))
        st[KEYS_] = np.concatenate([rest, more])
        ist[I_KPOS] = 0
        ist[I_KLEN] = st[KEYS_].shape[0]


def keys_needed(st: list[Any]) -> int:
    """Keys one step may draw before its next check: a division's pushes, or a rebound."""
    ist = st[IST_]
    return 16 + (2 * int(ist[I_TN]) if ist[I_LDIRTY] else 0)


def capacity_ok(st: list[Any]) -> bool:
    ist = st[IST_]
    tn = int(ist[I_TN])
    return (
        int(ist[I_N]) + 3 <= st[X_].shape[0]
        and int(ist[I_M]) + 3 <= st[ILO_].shape[0]
        and int(ist[I_NN]) + 6 <= st[NODES_].shape[1]
        and tn + 6 <= st[TLO_].shape[0]
        and int(ist[I_HN]) + tn + 32 <= st[HC_].shape[0]
        and int(ist[I_NCLS]) + 8 <= min(st[CI_].shape[1], st[PEND_].shape[0])
        and max(int(ist[I_POOL]) + 6 * int(ist[I_MAXCC]) + 64, 2 * tn + 16 * (int(ist[I_NCLS]) + 8) + 64)
        <= st[PC_].shape[0]
        and int(ist[I_KLEN]) - int(ist[I_KPOS]) >= keys_needed(st)
    )  # fmt: skip


if _accel.numba is not None:
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    njit = _accel._njit
    # Helpers called per node, per sample or several times per division are inlined into
    # their callers: a call that is not inlined takes and drops a reference to every array it
    # is given (two atomic operations each; the whole state is 35 arrays), which costs more
    # than most helpers themselves.
    inline = _accel._njit_inline
    _sumsq = _accel._sumsq
    _row_dist = _accel._row_dist
    _raise_slope = _accel._raise_slope

    def _fma_typer(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
        sig = types.float64(types.float64, types.float64, types.float64)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            dbl = ir.DoubleType()
            fnty = ir.FunctionType(dbl, [dbl, dbl, dbl])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.f64")
            return builder.call(fn, args)

        return sig, codegen

    def _borrow_typer(typingctx: Any, arr: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            ary = context.make_array(signature.args[0])(context, builder, value=args[0])
            ary.meminfo = cgutils.get_null_value(ary.meminfo.type)
            ary.parent = cgutils.get_null_value(ary.parent.type)
            return ary._getvalue()

        return arr(arr), codegen

    # The same array without its reference count (a null meminfo, so numba's incref and decref
    # of it do nothing). step() works on borrowed views of the state: every helper that is
    # handed the state tuple would otherwise take and drop a reference to each of its 35
    # arrays, two atomic operations each, which perf showed as a third of the run time. Safe
    # because the caller's tuple keeps the arrays alive for the whole call and nothing inside
    # keeps a view past it (the arrays only ever grow in Python, between calls).
    _borrow: Any = intrinsic(_borrow_typer)

    # fma(a, b, c) = a * b + c rounded once: how the BLAS kernel behind `@` accumulates.
    _fma: Any = intrinsic(_fma_typer)

    @inline
    def _dot(p: Any, d: int) -> float:
        # BLAS ddot below 16 coordinates: one fused multiply-add per coordinate, in order.
        s = 0.0
        for c in range(d):
            s = _fma(p[c], p[c], s)
        return s

    @njit
    def dot_rows(A: Any) -> Any:
        out = np.empty(A.shape[0])
        for i in range(A.shape[0]):
            out[i] = _dot(A[i], A.shape[1])
        return out

    @njit
    def _lpow(e: float) -> float:
        return _L_GRID**e

    # ---- heaps: the smallest (value, key, cell) first, as heapq orders its tuples ----
    @inline
    def _lt(v1: float, k1: float, c1: int, v2: float, k2: float, c2: int) -> bool:
        if v1 != v2:
            return v1 < v2
        if k1 != k2:
            return k1 < k2
        return c1 < c2

    @inline
    def _hpush(HF: Any, HC: Any, base: int, n: int, v: float, k: float, c: int) -> None:
        q = n
        while q > 0:
            p = (q - 1) >> 1
            if _lt(v, k, c, HF[0, base + p], HF[1, base + p], HC[base + p]):
                HF[0, base + q] = HF[0, base + p]
                HF[1, base + q] = HF[1, base + p]
                HC[base + q] = HC[base + p]
                q = p
            else:
                break
        HF[0, base + q] = v
        HF[1, base + q] = k
        HC[base + q] = c

    @inline
    def _hpop(HF: Any, HC: Any, base: int, n: int) -> None:
        """Remove the top of a heap of n > 0 entries."""
        n -= 1
        v, k, c = HF[0, base + n], HF[1, base + n], HC[base + n]
        q = 0
        while True:
            a = 2 * q + 1
            if a >= n:
                break
            b = a + 1
            if b < n and _lt(HF[0, base + b], HF[1, base + b], HC[base + b],
                             HF[0, base + a], HF[1, base + a], HC[base + a]):  # fmt: skip
                a = b
            if _lt(HF[0, base + a], HF[1, base + a], HC[base + a], v, k, c):
                HF[0, base + q] = HF[0, base + a]
                HF[1, base + q] = HF[1, base + a]
                HC[base + q] = HC[base + a]
                q = a
            else:
                break
        if n > 0:
            HF[0, base + q] = v
            HF[1, base + q] = k
            HC[base + q] = c

    @inline
    def _key(keys: Any, ist: Any) -> float:
        k = keys[ist[I_KPOS]]
        ist[I_KPOS] += 1
        return k

    @inline
    def _push(HF: Any, HC: Any, bound: Any, keys: Any, ist: Any, c: int) -> None:
        """Push cell c on the lazy heap of bounds (its arrays only: see ``inline``)."""
        _hpush(HF, HC, 0, ist[I_HN], bound[c], _key(keys, ist), c)
        ist[I_HN] += 1

    @inline
    def _push_size(st: Any, c: int) -> None:
        ist = st[IST_]
        CI = st[CI_]
        key = np.int64(np.rint(st[TF_][TF_SIZE, c] * 1e12))
        j = 0
        while j < ist[I_NCLS] and CI[0, j] != key:
            j += 1
        if j == ist[I_NCLS]:
            CI[0, j], CI[1, j], CI[2, j], CI[3, j] = key, ist[I_POOL], 0, 8
            ist[I_POOL] += 8
            ist[I_NCLS] += 1
        PF, PC = st[PF_], st[PC_]
        if CI[2, j] == CI[3, j]:
            # full: move to the end of the pool with twice the room
            start, cnt = CI[1, j], CI[2, j]
            new = ist[I_POOL]
            for t in range(cnt):
                PF[0, new + t] = PF[0, start + t]
                PF[1, new + t] = PF[1, start + t]
                PC[new + t] = PC[start + t]
            CI[1, j] = new
            CI[3, j] = 2 * cnt
            ist[I_POOL] += 2 * cnt
            if 2 * cnt > ist[I_MAXCC]:
                ist[I_MAXCC] = 2 * cnt
        _hpush(PF, PC, CI[1, j], CI[2, j], st[TF_][TF_VALUE, c], _key(st[KEYS_], ist), c)
        CI[2, j] += 1

    @inline
    def _peek(st: Any) -> int:
        ist = st[IST_]
        HF, HC, TF, TI = st[HF_], st[HC_], st[TF_], st[TI_]
        while ist[I_HN] > 0:
            i = HC[0]
            if TI[TI_STATE, i] == _LEAF and TF[TF_BOUND, i] == HF[0, 0]:
                return i
            _hpop(HF, HC, 0, ist[I_HN])
            ist[I_HN] -= 1
        return -1

    @inline
    def lower_bound(st: Any) -> float:
        top = _peek(st)
        live = st[TF_][TF_BOUND, top] if top >= 0 else math.inf
        pm = st[FS_][F_PMIN]
        return pm if pm < live else live

    @njit
    def _hull(st: Any) -> int:
        """DIRECT's potentially optimal cells (``_Tree.hull``) onto the pending stack, the
        first to divide on top; returns how many."""
        ist, CI, PF, PC, TF, TI = st[IST_], st[CI_], st[PF_], st[PC_], st[TF_], st[TI_]
        nc = ist[I_NCLS]
        ps = np.empty(nc)
        pv = np.empty(nc)
        pi = np.empty(nc, dtype=np.int64)
        n = 0
        for j in range(nc):
            base = CI[1, j]
            while CI[2, j] > 0:
                c = PC[base]
                if TI[TI_STATE, c] != _LEAF or TF[TF_VALUE, c] != PF[0, base]:
                    _hpop(PF, PC, base, CI[2, j])
                    CI[2, j] -= 1
                else:
                    break
            if CI[2, j] == 0:
                continue
            c = PC[base]
            # insertion into (size, value, cell) order
            s, v = TF[TF_SIZE, c], PF[0, base]
            q = n
            while q > 0 and _lt(s, v, c, ps[q - 1], pv[q - 1], pi[q - 1]):
                ps[q], pv[q], pi[q] = ps[q - 1], pv[q - 1], pi[q - 1]
                q -= 1
            ps[q], pv[q], pi[q] = s, v, c
            n += 1
        pend = st[PEND_]
        if n == 0:
            return 0
        nu = 0
        for q in range(n):
            if pv[q] == -math.inf:
                nu += 1
        if nu > 0:
            t = 0
            for q in range(n - 1, -1, -1):
                if pv[q] == -math.inf:
                    pend[t] = pi[q]
                    t += 1
            return nu
        j0 = 0
        for q in range(1, n):
            if pv[q] < pv[j0] or (pv[q] == pv[j0] and -ps[q] < -ps[j0]):
                j0 = q
        cx = np.empty(n)
        cy = np.empty(n)
        ci = np.empty(n, dtype=np.int64)
        nch = 0
        for q in range(j0, n):
            px, py = ps[q], pv[q]
            while nch >= 2:
                x1, y1, x2, y2 = cx[nch - 2], cy[nch - 2], cx[nch - 1], cy[nch - 1]
                if (y2 - y1) * (px - x1) >= (py - y1) * (x2 - x1):
                    nch -= 1
                else:
                    break
            cx[nch], cy[nch], ci[nch] = px, py, pi[q]
            nch += 1
        for t in range(nch):
            pend[t] = ci[nch - 1 - t]
        return nch

    # ---- the query tree ----
    @njit
    def _fnode_set(st: Any, v: int, mem: Any, cnt: int) -> None:
        X, F, FLO, FHI, FF = st[X_], st[SF_][0], st[FLO_], st[FHI_], st[FF_]
        d = X.shape[1]
        FLO[v] = math.inf
        FHI[v] = -math.inf
        FF[0, v], FF[1, v] = -math.inf, math.inf
        st[FMEM_][v] = -1
        for q in range(cnt):
            i = mem[q]
            st[FMEM_][v, q] = i
            for c in range(d):
                FLO[v, c] = min(FLO[v, c], X[i, c])
                FHI[v, c] = max(FHI[v, c], X[i, c])
            f = F[i]
            if math.isfinite(f):
                FF[0, v] = max(FF[0, v], f)
                FF[1, v] = min(FF[1, v], f)
        st[FI_][2, v] = cnt

    @njit
    def _ftree_insert(st: Any, i: int) -> None:
        ist, X, F = st[IST_], st[X_], st[SF_][0]
        FLO, FHI, FF, FI, FSPL, FMEM = st[FLO_], st[FHI_], st[FF_], st[FI_], st[FSPL_], st[FMEM_]
        d = X.shape[1]
        f = F[i]
        fin = math.isfinite(f)
        v = 0
        grown = True
        while True:
            if grown:
                for c in range(d):
                    FLO[v, c] = min(FLO[v, c], X[i, c])
                    FHI[v, c] = max(FHI[v, c], X[i, c])
                if fin:
                    FF[0, v] = max(FF[0, v], f)
                    FF[1, v] = min(FF[1, v], f)
            grown = True
            cnt = FI[2, v]
            if cnt < 0:
                v = FI[1, v] + (1 if X[i, FI[0, v]] > FSPL[v] else 0)
                continue
            if cnt < _FCAP:
                FMEM[v, cnt] = i
                FI[2, v] = cnt + 1
                return
            # full leaf: halve it at the median of its widest side, then go on below it
            k = 0
            for c in range(1, d):
                if FHI[v, c] - FLO[v, c] > FHI[v, k] - FLO[v, k]:
                    k = c
            mem = FMEM[v].copy()
            for a in range(1, _FCAP):
                o = mem[a]
                q = a
                while q > 0 and X[mem[q - 1], k] > X[o, k]:
                    mem[q] = mem[q - 1]
                    q -= 1
                mem[q] = o
            h = _FCAP // 2
            left = ist[I_FN]
            ist[I_FN] += 2
            _fnode_set(st, left, mem[:h], h)
            _fnode_set(st, left + 1, mem[h:], _FCAP - h)
            FI[0, v], FI[1, v], FI[2, v] = k, left, -1
            FSPL[v] = X[mem[h - 1], k]
            FMEM[v] = -1
            grown = False  # v's box and values already hold sample i

    @inline
    def _fdist(FLO: Any, FHI: Any, v: int, y: Any, p: Any) -> float:
        d = y.shape[0]
        for c in range(d):
            g = max(max(FLO[v, c] - y[c], y[c] - FHI[v, c]), 0.0)
            p[c] = g * g
        return math.sqrt(_sumsq(p, d))

    @njit
    def _fball(
        X: Any, Fb: Any, FLO: Any, FHI: Any, FF: Any, FI: Any, FMEM: Any, fn: int,
        y: Any, L: float, thr: float, cut: float,
    ) -> float:  # fmt: skip
        """Some value f_i - L ||y - x_i|| above thr if there is one, else at most thr: the
        caller only asks whether y is in a ball (likelier subtrees first, stop at the first).
        It takes the arrays it reads, not the state: see ``inline`` above."""
        d = X.shape[1]
        p = np.empty(d)
        sv = np.empty(fn + 1, dtype=np.int64)
        sv[0] = 0
        top = 1
        best = -math.inf
        while top > 0:
            top -= 1
            v = sv[top]
            cnt = FI[2, v]
            if cnt < 0:
                a = FI[1, v]
                ba = FF[0, a] - L * _fdist(FLO, FHI, a, y, p)
                bb = FF[0, a + 1] - L * _fdist(FLO, FHI, a + 1, y, p)
                if ba >= cut and bb >= cut:
                    if ba > bb:
                        sv[top], sv[top + 1] = a + 1, a
                    else:
                        sv[top], sv[top + 1] = a, a + 1
                    top += 2
                elif ba >= cut:
                    sv[top] = a
                    top += 1
                elif bb >= cut:
                    sv[top] = a + 1
                    top += 1
                continue
            for q in range(cnt):
                i = FMEM[v, q]
                val = Fb[i] - L * _row_dist(X, i, y, p, d)
                if val > best:
                    best = val
                    if val > thr:
                        return val
        return best

    @njit
    def _fslope(st: Any, x: Any, f: float, smax: float) -> float:
        """max(smax, |f - f_i| / ||x - x_i||) over the samples: a maximum, so the order in
        which subtrees are visited and the rising cut change no bit of it."""
        ist, X, Fb = st[IST_], st[X_], st[SF_][1]
        FLO, FHI, FF, FI, FMEM = st[FLO_], st[FHI_], st[FF_], st[FI_], st[FMEM_]
        d = X.shape[1]
        p = np.empty(d)
        sv = np.empty(ist[I_FN] + 1, dtype=np.int64)
        sd = np.empty(ist[I_FN] + 1)  # the node's box distance, with its largest |f - f_i|
        sf = np.empty(ist[I_FN] + 1)
        sv[0], sd[0], sf[0] = 0, 0.0, math.inf
        top = 1
        out = smax
        while top > 0:
            top -= 1
            v = sv[top]
            if not sf[top] >= out * (1 - 1e-9) * sd[top]:
                continue
            cnt = FI[2, v]
            if cnt < 0:
                a = FI[1, v]
                for u in (a + 1, a):
                    sv[top] = u
                    sd[top] = _fdist(FLO, FHI, u, x, p)
                    sf[top] = max(f - FF[1, u], FF[0, u] - f)
                    top += 1
                continue
            for q in range(cnt):
                out = _raise_slope(X, Fb, FMEM[v, q], x, f, p, d, out)
        return out

    # ---- samples ----
    @inline
    def lower_above(st: Any, y: Any, thr: float) -> float:
        """``_Samples.lower_above``."""
        ist, fs = st[IST_], st[FS_]
        n = ist[I_N]
        if n == 0 or not thr < math.inf:
            return -math.inf
        scan = n <= _SCAN_MAX
        L = fs[F_L]
        cut = 0.0 if scan else thr - (1e-9 * (abs(thr) + fs[F_FABS] + L * fs[F_DIAG]) + 1e-300)
        if not scan:
            return _fball(
                st[X_], st[SF_][1], st[FLO_], st[FHI_], st[FF_], st[FI_], st[FMEM_], ist[I_FN],
                y, L, thr, cut,
            )  # fmt: skip
        return _accel.ball_max(
            st[X_], st[SF_][1], n, y, L, thr, cut, scan,
            st[ILO_], st[IHI_], st[IF_][0], st[IMEM_], ist[I_M],
        )  # fmt: skip

    @inline
    def _fh(fs: Any, ist: Any, d: int) -> float:
        """``_Run.fhat`` from the scalars alone (see ``inline``)."""
        fb = fs[F_FBEST]
        if not math.isfinite(fb):
            return math.inf
        if not (ist[I_HASL] == 1 or ist[I_N] - ist[I_NONFIN] >= 10 * (d + 1)):
            return math.inf
        delta = fs[F_TOL]
        if not math.isnan(fs[F_FLOWER]):
            t = (1 - fs[F_RHO]) * (fb - fs[F_FLOWER])
            if t > delta:
                delta = t
        return fb - delta

    @inline
    def _pl(fs: Any, ist: Any, d: int) -> float:
        """``_Run._prune_level``."""
        fh = _fh(fs, ist, d)
        return fh + 1e-12 * (1 + abs(fh))

    @njit
    def fhat(st: Any) -> float:
        return _fh(st[FS_], st[IST_], st[X_].shape[1])

    @njit
    def _split_leaf(st: Any, v: int) -> None:
        """``_Index._split``: the full leaf of node v splits at the median of its widest side."""
        ist, X, F = st[IST_], st[X_], st[SF_][0]
        lo, hi, IF, mem, cnt = st[ILO_], st[IHI_], st[IF_], st[IMEM_], st[ICNT_]
        nodes, split = st[NODES_], st[NSPLIT_]
        d = X.shape[1]
        s = nodes[2, v]
        old = mem[s].copy()
        k = 0
        best = hi[s, 0] - lo[s, 0]
        for c in range(1, d):
            w = hi[s, c] - lo[s, c]
            if w > best:
                best, k = w, c
        # stable sort of the members by coordinate k (insertion sort: 32 entries)
        order = np.arange(_CAP)
        for a in range(1, _CAP):
            o = order[a]
            q = a
            while q > 0 and X[old[order[q - 1]], k] > X[old[o], k]:
                order[q] = order[q - 1]
                q -= 1
            order[q] = o
        half = _CAP // 2
        t = ist[I_M]
        ist[I_M] += 1
        for leaf, a0 in ((s, 0), (t, half)):
            mem[leaf] = -1
            fmax, fmn = -math.inf, math.inf
            for q in range(half):
                i = old[order[a0 + q]]
                mem[leaf, q] = i
                for c in range(d):
                    if q == 0 or X[i, c] < lo[leaf, c]:
                        lo[leaf, c] = X[i, c]
                    if q == 0 or X[i, c] > hi[leaf, c]:
                        hi[leaf, c] = X[i, c]
                f = F[i]
                if math.isfinite(f):
                    if f > fmax:
                        fmax = f
                    if f < fmn:
                        fmn = f
            cnt[leaf] = half
            IF[0, leaf], IF[1, leaf] = fmax, fmn
        left = ist[I_NN]
        ist[I_NN] += 2
        for u, leaf in ((left, s), (left + 1, t)):
            nodes[0, u], nodes[1, u], nodes[2, u] = 0, -1, leaf
            split[u] = 0.0
        nodes[0, v], nodes[1, v], nodes[2, v] = k, left, -1
        split[v] = X[old[order[half - 1]], k]

    @njit
    def add_sample(st: Any, f: float, has_g: bool, kind: int) -> int:
        """``_Samples.add`` of the point W[W_XQ] (gradient W[W_GQ]) and ``_Run._update_L``."""
        ist, fs, X, W = st[IST_], st[FS_], st[X_], st[W_]
        x = W[W_XQ]
        d = X.shape[1]
        i = ist[I_N]
        Fb = st[SF_][1]
        finite = math.isfinite(f)
        if finite and i > _SCAN_MAX:
            fs[F_SLOPE] = _fslope(st, x, f, fs[F_SLOPE])
        elif finite and i > 0:
            fs[F_SLOPE] = _accel.slope_max(
                X, Fb, i, x, f, fs[F_SLOPE], i <= _SCAN_MAX,
                st[ILO_], st[IHI_], st[IF_][0], st[IF_][1], st[IMEM_], ist[I_M],
            )  # fmt: skip
        if has_g:
            g = W[W_GQ]
            ok = True
            for c in range(d):
                if not math.isfinite(g[c]):
                    ok = False
            if ok:
                st[G_][i] = g
                gn = math.sqrt(_dot(g, d))
                if gn > fs[F_SLOPE]:
                    fs[F_SLOPE] = gn
        X[i] = x
        st[SF_][0, i] = f
        Fb[i] = f if finite else -math.inf
        st[KIND_][i] = kind
        ist[I_N] += 1
        while True:
            v = _accel.index_insert(
                i, X, st[SF_][0], st[ILO_], st[IHI_], st[IF_][0], st[IF_][1], st[IMEM_],
                st[ICNT_], st[NODES_], st[NSPLIT_],
            )  # fmt: skip
            if v < 0:
                break
            _split_leaf(st, v)
        _ftree_insert(st, i)
        if not finite:
            ist[I_NONFIN] += 1
        else:
            if abs(f) > fs[F_FABS]:
                fs[F_FABS] = abs(f)
            if f < fs[F_FBEST]:
                fs[F_FBEST] = f
                ist[I_BEST] = i
        if ist[I_HASL] == 0:
            m = fs[F_SLOPE]
            if m <= 0:
                fb = fs[F_FBEST]
                scale = 1.0
                if math.isfinite(fb) and abs(fb) > 1.0:
                    scale = abs(fb)
                new = 1e-9 * scale / fs[F_DIAG]
            else:
                new = fs[F_SAFETY] * _lpow(float(math.ceil(math.log(m) / math.log(_L_GRID))))
            if new > fs[F_L] * (1 + 1e-12) or ist[I_N] == 1:
                fs[F_L] = new
                ist[I_LDIRTY] = 1
        return i

    # ---- cells ----
    @inline
    def add_term(st: Any, leaf: int, idx: int) -> None:
        """``_Tree.add_term``."""
        fb = st[SF_][1, idx]
        if not math.isfinite(fb):
            return
        X, TF, TI, terms, tval = st[X_], st[TF_], st[TI_], st[TTERMS_], st[TVAL_]
        lo, hi = st[TLO_][leaf], st[THI_][leaf]
        d = X.shape[1]
        L = st[FS_][F_L]
        p = np.empty(d)
        for c in range(d):
            p[c] = max(abs(X[idx, c] - lo[c]), abs(X[idx, c] - hi[c]))
        val = fb - L * math.sqrt(_dot(p, d))
        if val > TF[TF_BOUND, leaf]:
            TF[TF_BOUND, leaf] = val
            if TI[TI_STATE, leaf] == _LEAF:
                _push(st[HF_], st[HC_], st[TF_][TF_BOUND], st[KEYS_], st[IST_], leaf)
        for q in range(_K):
            if terms[leaf, q] == -1:
                terms[leaf, q] = idx
                TF[TF_TVL, leaf] = math.nan
                return
        tv = np.empty(_K)
        if TF[TF_TVL, leaf] == L:
            for q in range(_K):
                tv[q] = tval[leaf, q]
        else:
            Fb = st[SF_][1]
            for q in range(_K):
                t = terms[leaf, q]
                for c in range(d):
                    a = max(abs(X[t, c] - lo[c]), abs(X[t, c] - hi[c]))
                    p[c] = a * a
                tv[q] = Fb[t] - L * math.sqrt(_sumsq(p, d))
        j = 0
        for q in range(1, _K):
            if tv[q] < tv[j]:
                j = q
        if val > tv[j]:
            terms[leaf, j] = idx
            TF[TF_TVL, leaf] = math.nan

    @njit
    def leaf_of(st: Any, x: Any) -> int:
        TI, lo, hi = st[TI_], st[TLO_], st[THI_]
        i = 0
        while TI[TI_STATE, i] == _SPLIT:
            k = TI[TI_SDIM, i]
            t = (x[k] - lo[i, k]) / (hi[i, k] - lo[i, k])
            i = TI[TI_CHILD, i] + (0 if t < 1 / 3 else 1 if t < 2 / 3 else 2)
        return i

    @njit
    def insert_term(st: Any, i: int) -> None:
        """``_Run._insert``: a non-centre sample tightens the bound of its cell."""
        add_term(st, leaf_of(st, st[X_][i]), i)

    @inline
    def _place(st: Any, c: int, lower: float, has_lower: bool, fh: float, rel: Any) -> None:
        """``_Run._place``."""
        TF, TI, fs = st[TF_], st[TI_], st[FS_]
        d = rel.shape[0]
        i = TI[TI_CENTER, c]
        fc = st[SF_][0, i] if i >= 0 else math.nan
        finite = math.isfinite(fc)
        if finite:
            TF[TF_VALUE, c] = fc
        elif has_lower:
            TF[TF_VALUE, c] = lower
        else:
            y = 0.5 * (st[TLO_][c] + st[THI_][c])
            TF[TF_VALUE, c] = lower_above(st, y, -math.inf)
        TF[TF_SIZE, c] = 0.5 * math.sqrt(_dot(rel, d))
        bound = TF[TF_BOUND, c]
        if bound > fh:
            TI[TI_STATE, c] = _PRUNED
            if bound < fs[F_PMIN]:
                fs[F_PMIN] = bound
        else:
            _push(st[HF_], st[HC_], st[TF_][TF_BOUND], st[KEYS_], st[IST_], c)
            if finite:
                _push_size(st, c)

    @njit
    def _rebound(st: Any) -> None:
        """``_Tree.rebound``: every leaf's bound for the new L from its kept terms."""
        ist, fs, TF, TI, terms = st[IST_], st[FS_], st[TF_], st[TI_], st[TTERMS_]
        X, Fb, F = st[X_], st[SF_][1], st[SF_][0]
        d = X.shape[1]
        L = fs[F_L]
        p = np.empty(d)
        tn = ist[I_TN]
        for c in range(tn):
            if TI[TI_STATE, c] == _SPLIT:
                continue
            lo, hi = st[TLO_][c], st[THI_][c]
            b = -math.inf
            for q in range(_K):
                t = terms[c, q]
                if t < 0:
                    continue
                for j in range(d):
                    a = max(abs(X[t, j] - lo[j]), abs(X[t, j] - hi[j]))
                    p[j] = a * a
                v = Fb[t] - L * math.sqrt(_sumsq(p, d))
                if v > b:
                    b = v
            TF[TF_BOUND, c] = b
        pm = math.inf
        for c in range(tn):
            s = TI[TI_STATE, c]
            if s == _PRUNED:
                TI[TI_STATE, c] = _LEAF
            elif s == _RETIRED and TF[TF_BOUND, c] < pm:
                pm = TF[TF_BOUND, c]
        fs[F_PMIN] = pm
        ist[I_HN] = 0
        for c in range(tn):
            if TI[TI_STATE, c] == _LEAF:
                _push(st[HF_], st[HC_], st[TF_][TF_BOUND], st[KEYS_], st[IST_], c)
        ist[I_NCLS] = 0
        ist[I_POOL] = 0
        ist[I_MAXCC] = 0
        for c in range(tn):
            if TI[TI_STATE, c] == _LEAF:
                ctr = TI[TI_CENTER, c]
                if ctr >= 0 and math.isfinite(F[ctr]):
                    _push_size(st, c)

    @inline
    def _request(st: Any, y: Any, phase: int, want: int) -> int:
        """Ask the caller for f(y): EV_EVAL, or EV_STOP with status 2 at the budget."""
        ist = st[IST_]
        if ist[I_NFEV] >= ist[I_MAXFEV]:
            ist[I_STATUS] = 2
            return EV_STOP
        ist[I_NFEV] += 1
        st[W_][W_XQ] = y
        ist[I_EVKIND] = GLOBAL
        ist[I_EVWANT] = want
        ist[I_PHASE] = phase
        return EV_EVAL

    @inline
    def _after(st: Any, i: int, phase: int) -> int:
        """``_Run._after_sample`` needs Python (polish or branch) only for a finite sample."""
        ist = st[IST_]
        if ist[I_AFTER] == 1 and math.isfinite(st[SF_][0, i]):
            ist[I_EVIDX] = i
            ist[I_PHASE] = phase
            return EV_AFTER
        return -1

    @inline
    def _terms_trivial(st: Any, k0: int, cand: Any, vals: Any) -> None:
        m = cand.shape[0]
        TF, terms = st[TF_], st[TTERMS_]
        for j in range(3):
            b = vals[j, 0]
            for t in range(1, m):
                if vals[j, t] > b:
                    b = vals[j, t]
            TF[TF_BOUND, k0 + j] = b
            for q in range(_K):
                terms[k0 + j, q] = cand[q] if q < m else -1

    @inline
    def _top_insert(bv: Any, bi: Any, j: int, cnt: int, v: float, i: int) -> int:
        """Keep the K + 1 largest values of row j as ``_accel.top_terms`` does; new count."""
        K1 = bv.shape[1]
        if cnt == K1 and not v > bv[j, K1 - 1]:
            return cnt
        q = cnt if cnt < K1 else K1 - 1
        while q > 0 and bv[j, q - 1] < v:
            if q < K1:
                bv[j, q] = bv[j, q - 1]
                bi[j, q] = bi[j, q - 1]
            q -= 1
        bv[j, q] = v
        bi[j, q] = i
        return cnt + 1 if cnt < K1 else cnt

    @inline
    def _fsplit_bound(
        FLO: Any, FHI: Any, fb: Any, v: int, los: Any, his: Any, k: int, L: float, p: Any
    ) -> float:
        """``_accel.split_vals``'s leaf bound on a query-tree node, for the three cells at once."""
        d = p.shape[0]
        for c in range(d):
            y0 = 0.5 * (los[0, c] + his[0, c])
            g = max(max(FLO[v, c] - y0, y0 - FHI[v, c]), 0.0) + 0.5 * (his[0, c] - los[0, c])
            if c == k:
                for j in (1, 2):
                    ck = 0.5 * (los[j, k] + his[j, k])
                    gj = max(max(FLO[v, k] - ck, ck - FHI[v, k]), 0.0) + 0.5 * (
                        his[j, k] - los[j, k]
                    )
                    g = min(g, gj)
            p[c] = g * g
        return fb[v] - L * math.sqrt(_sumsq(p, d))

    @njit
    def _split_best_first(st: Any, los: Any, his: Any, k: int, L: float, seeds: Any) -> bool:
        """The kept samples of the three new cells (``_accel.split_vals`` + ``top_terms``)
        without visiting most candidates: the seeds first, then only query-tree nodes, and then
        samples, whose bound reaches every cell's current K-th best value. A sample left out is
        strictly below the final K-th best value of every cell, so it can neither be kept nor
        tie with a kept value: the kept set and the tie test are those of the full candidate
        set. Returns False on a tie (the caller then takes the old path: np.argpartition's
        choice among ties depends on its candidate order)."""
        ist, fs, TF = st[IST_], st[FS_], st[TF_]
        X, Fb = st[X_], st[SF_][1]
        FI, FMEM, FLO, FHI, FB = st[FI_], st[FMEM_], st[FLO_], st[FHI_], st[FF_][0]
        d = X.shape[1]
        p = np.empty(d)
        K1 = _K + 1
        bv = np.full((3, K1), -math.inf)
        bi = np.full((3, K1), -1, dtype=np.int64)
        nb = np.zeros(3, dtype=np.int64)
        ns = seeds.shape[0]
        for t in range(ns):
            i = seeds[t]
            for j in range(3):
                for c in range(d):
                    a = max(abs(X[i, c] - los[j, c]), abs(X[i, c] - his[j, c]))
                    p[c] = a * a
                nb[j] = _top_insert(bv, bi, j, nb[j], Fb[i] - L * math.sqrt(_sumsq(p, d)), i)
        slack = 1e-9 * (fs[F_FABS] + L * fs[F_DIAG]) + 1e-300
        cuts = np.empty(3)
        sv = np.empty(ist[I_FN] + 1, dtype=np.int64)
        sb = np.empty(ist[I_FN] + 1)
        sv[0], sb[0] = 0, math.inf
        top = 1
        while top > 0:
            # each cell's K-th best so far, less the rounding slack of the bounds
            for j in range(3):
                t = bv[j, _K - 1]
                cuts[j] = t - (1e-9 * abs(t) + slack) if t > -math.inf else -math.inf
            cut = min(cuts[0], min(cuts[1], cuts[2]))
            top -= 1
            v = sv[top]
            if not sb[top] >= cut:
                continue
            cnt = FI[2, v]
            if cnt < 0:
                a = FI[1, v]
                ba = _fsplit_bound(FLO, FHI, FB, a, los, his, k, L, p)
                bb = _fsplit_bound(FLO, FHI, FB, a + 1, los, his, k, L, p)
                if ba > bb:
                    sv[top], sb[top], sv[top + 1], sb[top + 1] = a + 1, bb, a, ba
                else:
                    sv[top], sb[top], sv[top + 1], sb[top + 1] = a, ba, a + 1, bb
                top += 2
                continue
            for q in range(cnt):
                i = FMEM[v, q]
                seen = False
                for t in range(ns):
                    if seeds[t] == i:
                        seen = True
                if seen:
                    continue
                # a cheap estimate first: the cells differ only along k
                common = 0.0
                for c in range(d):
                    if c != k:
                        a = max(abs(X[i, c] - los[0, c]), abs(X[i, c] - his[0, c]))
                        common += a * a
                for j in range(3):
                    a = max(abs(X[i, k] - los[j, k]), abs(X[i, k] - his[j, k]))
                    if Fb[i] - L * math.sqrt(common + a * a) * (1 - 1e-12) < cuts[j]:
                        continue
                    for c in range(d):
                        a = max(abs(X[i, c] - los[j, c]), abs(X[i, c] - his[j, c]))
                        p[c] = a * a
                    v2 = Fb[i] - L * math.sqrt(_sumsq(p, d))
                    nb[j] = _top_insert(bv, bi, j, nb[j], v2, i)
                    t = bv[j, _K - 1]
                    cuts[j] = t - (1e-9 * abs(t) + slack) if t > -math.inf else -math.inf
        k0 = ist[I_K0]
        for j in range(3):
            if nb[j] < _K:
                return False
            for q in range(_K - 1):
                if not bv[j, q] > bv[j, q + 1]:
                    return False
            if nb[j] > _K and not bv[j, _K - 1] > bv[j, _K]:
                return False
        for j in range(3):
            TF[TF_BOUND, k0 + j] = bv[j, 0]
            TF[TF_TVL, k0 + j] = L
            for q in range(_K):
                st[TTERMS_][k0 + j, q] = bi[j, q]
                st[TVAL_][k0 + j, q] = bv[j, q]
        return True

    @njit
    def _split_cell(st: Any, leaf: int) -> int:
        """The division of ``_Run._divide`` up to the new cells' bounds. Returns -1 when done
        (bounds set), -2 when the cell was retired, or EV_PART when np.argpartition must choose
        the kept samples (candidates in CAND, values in VALS)."""
        ist, fs, W, TF, TI = st[IST_], st[FS_], st[W_], st[TF_], st[TI_]
        d = W.shape[1]
        lo, hi = st[TLO_][leaf].copy(), st[THI_][leaf].copy()
        width = W[W_WIDTH]
        w = hi - lo
        rel = w / width
        k = 0
        for c in range(1, d):
            if rel[c] > rel[k]:
                k = c
        if rel[k] < 1e-12:
            TI[TI_STATE, leaf] = _RETIRED
            if TF[TF_BOUND, leaf] < fs[F_PMIN]:
                fs[F_PMIN] = TF[TF_BOUND, leaf]
            return -2
        a, b = lo[k] + w[k] / 3, lo[k] + 2 * w[k] / 3
        los = W[W_LOS : W_LOS + 3]
        his = W[W_HIS : W_HIS + 3]
        for j in range(3):
            los[j] = lo
            his[j] = hi
        los[1, k], los[2, k] = a, b
        his[0, k], his[1, k] = a, b
        k0 = ist[I_TN]
        ist[I_TN] += 3
        for j in range(3):
            st[TLO_][k0 + j] = los[j]
            st[THI_][k0 + j] = his[j]
        ctr = TI[TI_CENTER, leaf]
        TI[TI_CHILD, leaf] = k0
        TI[TI_SDIM, leaf] = k
        TI[TI_STATE, leaf] = _SPLIT
        TI[TI_CENTER, k0 + 1] = ctr
        ist[I_K0] = k0
        ist[I_LEAF] = leaf
        ist[I_NNEW] = 0
        # lowers[1] of _divide: the parent's value when its centre was never evaluated
        fs[F_LOW1] = TF[TF_VALUE, leaf]
        seeds = np.empty(_K + 1, dtype=np.int64)
        ns = 0
        for q in range(_K + 1):
            j = st[TTERMS_][leaf, q] if q < _K else ctr
            if j < 0:
                continue
            dup = False
            for t in range(ns):
                if seeds[t] == j:
                    dup = True
            if not dup:
                seeds[ns] = j
                ns += 1
        seeds = np.sort(seeds[:ns])
        n = ist[I_N]
        L = fs[F_L]
        if n > _SCAN_MAX and _split_best_first(st, los, his, k, L, seeds):
            return -1
        cand, vals = _accel.split_vals(
            st[X_], st[SF_][1], n, los, his, k, L, seeds, _K, fs[F_FABS], fs[F_DIAG],
            n <= _SCAN_MAX, st[ILO_], st[IHI_], st[IF_][0], st[IMEM_], ist[I_M],
        )  # fmt: skip
        ok, bound, terms, tv = _accel.top_terms(vals, cand, _K)
        if ok:
            for j in range(3):
                TF[TF_BOUND, k0 + j] = bound[j]
                TF[TF_TVL, k0 + j] = L
                for q in range(_K):
                    st[TTERMS_][k0 + j, q] = terms[j, q]
                    st[TVAL_][k0 + j, q] = tv[j, q]
            return -1
        m = cand.shape[0]
        if m <= _K:
            _terms_trivial(st, k0, cand, vals)
            return -1
        st[CAND_][:m] = cand
        st[VALS_][:, :m] = vals
        ist[I_NPART] = m
        return EV_PART

    @inline
    def _ball_child(st: Any, j: int, phase: int) -> int:
        """Ask whether new cell j's centre lies in a ball; request it when it does not."""
        W, fs = st[W_], st[FS_]
        y = 0.5 * (W[W_LOS + j] + W[W_HIS + j])
        thr = _pl(st[FS_], st[IST_], st[X_].shape[1])
        lower = lower_above(st, y, thr)
        fs[F_LOW0 + j] = lower
        if not lower > thr:
            return _request(st, y, phase, st[IST_][I_WANT])
        return -1

    @inline
    def _ball_children(st: Any) -> int:
        """The ball tests of a division's two outer cells, then the placement of all three.

        Returns the event of the first centre that must be evaluated (the division resumes in
        PH_DIV0 / PH_DIV2 after it), or -1 once the cells are placed."""
        ev = _ball_child(st, 0, PH_DIV0)
        if ev >= 0:
            return ev
        ev = _ball_child(st, 2, PH_DIV2)
        if ev >= 0:
            return ev
        _place_all(st)
        return -1

    @inline
    def _want(st: Any) -> int:
        return st[IST_][I_WANT]

    @inline
    def _place_all(st: Any) -> None:
        ist, fs, W, TI = st[IST_], st[FS_], st[W_], st[TI_]
        k0 = ist[I_K0]
        fh = _fh(st[FS_], st[IST_], st[X_].shape[1])
        rel = W[W_REL]
        parent_ctr_missing = TI[TI_CENTER, k0 + 1] < 0
        for j in range(3):
            rel[:] = (W[W_HIS + j] - W[W_LOS + j]) / W[W_WIDTH]
            has = j != 1 or parent_ctr_missing
            _place(st, k0 + j, fs[F_LOW0 + j], has, fh, rel)

    @njit
    def step(st0: Any, f: float, has_g: bool) -> int:
        """Run the search until Python must act; returns an event code (see module top)."""
        st = (
            _borrow(st0[0]),
            _borrow(st0[1]),
            _borrow(st0[2]),
            _borrow(st0[3]),
            _borrow(st0[4]),
            _borrow(st0[5]),
            _borrow(st0[6]),
            _borrow(st0[7]),
            _borrow(st0[8]),
            _borrow(st0[9]),
            _borrow(st0[10]),
            _borrow(st0[11]),
            _borrow(st0[12]),
            _borrow(st0[13]),
            _borrow(st0[14]),
            _borrow(st0[15]),
            _borrow(st0[16]),
            _borrow(st0[17]),
            _borrow(st0[18]),
            _borrow(st0[19]),
            _borrow(st0[20]),
            _borrow(st0[21]),
            _borrow(st0[22]),
            _borrow(st0[23]),
            _borrow(st0[24]),
            _borrow(st0[25]),
            _borrow(st0[26]),
            _borrow(st0[27]),
            _borrow(st0[28]),
            _borrow(st0[29]),
            _borrow(st0[30]),
            _borrow(st0[31]),
            _borrow(st0[32]),
            _borrow(st0[33]),
            _borrow(st0[34]),
        )  # fmt: skip
        ist, fs, W, TF, TI = st[IST_], st[FS_], st[W_], st[TF_], st[TI_]
        ph = ist[I_PHASE]
        if ph == PH_START:
            # the root cell and its centre
            ist[I_TN] = 1
            st[TLO_][0] = W[W_LB]
            st[THI_][0] = W[W_UB]
            return _request(st, 0.5 * (W[W_LB] + W[W_UB]), PH_ROOT, st[IST_][I_WANT])
        if ph == PH_ROOT or ph == PH_REEVAL or ph == PH_DIV0 or ph == PH_DIV2:
            i = add_sample(st, f, has_g, GLOBAL)
            if f <= fs[F_FTARGET]:
                ist[I_STATUS] = 5
                return EV_STOP
            if ph == PH_ROOT:
                TI[TI_CENTER, 0] = i
                if ist[I_LDIRTY] == 1:
                    ist[I_LDIRTY] = 0
                    _rebound(st)
                # box_terms of the whole box from the one sample
                p = np.empty(W.shape[1])
                for c in range(W.shape[1]):
                    a = max(abs(st[X_][i, c] - W[W_LB, c]), abs(st[X_][i, c] - W[W_UB, c]))
                    p[c] = a * a
                TF[TF_BOUND, 0] = st[SF_][1, i] - fs[F_L] * math.sqrt(_sumsq(p, W.shape[1]))
                st[TTERMS_][0, 0] = i
                rel = W[W_REL]
                rel[:] = (W[W_UB] - W[W_LB]) / W[W_WIDTH]
                _place(st, 0, 0.0, False, _fh(st[FS_], st[IST_], st[X_].shape[1]), rel)
                ev = _after(st, i, PH_LOOP)
                if ev >= 0:
                    return ev
            elif ph == PH_REEVAL:
                leaf = ist[I_LEAF]
                TI[TI_CENTER, leaf] = i
                add_term(st, leaf, i)
                if math.isfinite(st[SF_][0, i]):
                    TF[TF_VALUE, leaf] = st[SF_][0, i]
                    _push_size(st, leaf)
                # its after-sample event, then the end of the iteration (PH_AFTER, no samples)
                ist[I_NNEW] = 0
                ist[I_APOS] = 0
                ev = _after(st, i, PH_AFTER)
                if ev >= 0:
                    return ev
                ph = PH_AFTER
            else:
                k0 = ist[I_K0]
                j = 0 if ph == PH_DIV0 else 2
                TI[TI_CENTER, k0 + j] = i
                add_term(st, k0 + j, i)
                if ist[I_NNEW] == 0:
                    ist[I_NEW0] = i
                else:
                    ist[I_NEW1] = i
                ist[I_NNEW] += 1
                if ph == PH_DIV0:
                    ev = _ball_child(st, 2, PH_DIV2)
                    if ev >= 0:
                        return ev
                ph = PH_AFTER
                _place_all(st)
                ist[I_APOS] = 0
        elif ph == PH_PART:
            ev = _ball_children(st)
            if ev >= 0:
                return ev
            ph = PH_AFTER
            ist[I_APOS] = 0
        if ph == PH_AFTER:
            # the after-sample events of the division's new samples, then the iteration ends
            while ist[I_APOS] < ist[I_NNEW]:
                s = ist[I_NEW0] if ist[I_APOS] == 0 else ist[I_NEW1]
                ist[I_APOS] += 1
                ev = _after(st, s, PH_AFTER)
                if ev >= 0:
                    return ev
            ist[I_NIT] += 1
            if ist[I_CALLBACK] == 1:
                ist[I_PHASE] = PH_LOOP
                return EV_ITER
        # ---- the loop of _Run.solve ----
        ist[I_PHASE] = PH_LOOP
        while True:
            tn = ist[I_TN]
            if (
                ist[I_N] + 3 > st[X_].shape[0]
                or ist[I_M] + 3 > st[ILO_].shape[0]
                or ist[I_NN] + 6 > st[NODES_].shape[1]
                or tn + 6 > st[TLO_].shape[0]
                or ist[I_HN] + tn + 32 > st[HC_].shape[0]
                or ist[I_NCLS] + 8 > st[CI_].shape[1]
                or ist[I_NCLS] + 8 > st[PEND_].shape[0]
                or max(ist[I_POOL] + 6 * ist[I_MAXCC] + 64, 2 * tn + 16 * (ist[I_NCLS] + 8) + 64)
                > st[PC_].shape[0]
                or ist[I_KLEN] - ist[I_KPOS] < 16 + (2 * tn if ist[I_LDIRTY] == 1 else 0)
            ):  # fmt: skip
                return EV_GROW
            if ist[I_LDIRTY] == 1:
                ist[I_LDIRTY] = 0
                _rebound(st)
            fb = fs[F_FBEST]
            may = ist[I_HASL] == 1 or ist[I_N] - ist[I_NONFIN] >= 10 * (W.shape[1] + 1)
            if math.isfinite(fb) and may and fb - lower_bound(st) <= fs[F_TOL]:
                ist[I_STATUS] = 0
                return EV_STOP
            if ist[I_NIT] >= fs[F_MAXITER]:
                ist[I_STATUS] = 3
                return EV_STOP
            if ist[I_BQ] == 1:
                return EV_BRANCH
            leaf = _peek(st)
            if leaf < 0 or TF[TF_BOUND, leaf] > _fh(st[FS_], st[IST_], st[X_].shape[1]):
                ist[I_STATUS] = 0 if fb - lower_bound(st) <= fs[F_TOL] else 1
                return EV_STOP
            if ist[I_STRAT] == 0:
                pend = st[PEND_]
                while ist[I_PEND] > 0 and TI[TI_STATE, pend[ist[I_PEND] - 1]] != _LEAF:
                    ist[I_PEND] -= 1
                if ist[I_PEND] == 0:
                    ist[I_PEND] = _hull(st)
                if ist[I_PEND] > 0:
                    ist[I_PEND] -= 1
                    leaf = pend[ist[I_PEND]]
            if TF[TF_BOUND, leaf] > _fh(st[FS_], st[IST_], st[X_].shape[1]):
                TI[TI_STATE, leaf] = _PRUNED
                if TF[TF_BOUND, leaf] < fs[F_PMIN]:
                    fs[F_PMIN] = TF[TF_BOUND, leaf]
            else:
                if TI[TI_CENTER, leaf] < 0:
                    y = 0.5 * (st[TLO_][leaf] + st[THI_][leaf])
                    thr = _pl(st[FS_], st[IST_], st[X_].shape[1])
                    if not lower_above(st, y, thr) > thr:
                        ist[I_LEAF] = leaf
                        return _request(st, y, PH_REEVAL, st[IST_][I_WANT])
                r = _split_cell(st, leaf)
                if r == EV_PART:
                    ist[I_PHASE] = PH_PART
                    return EV_PART
                if r == -1:
                    ev = _ball_children(st)
                    if ev >= 0:
                        return ev
                    # no new samples: nothing to do after sampling
            ist[I_NIT] += 1
            if ist[I_CALLBACK] == 1:
                return EV_ITER

    def usable(d: int) -> bool:
        """Whether the engine may run in dimension d: the kernels of ``_accel`` may (numba,
        einsum's order), and its dot products round like ``@`` (BLAS) on random rows of width
        d. From 16 coordinates on the BLAS kernel sums in blocks, which ``_dot`` does not."""
        if not _accel.kernels_for(d) or d >= 16:
            return False
        ok = _dot_checked.get(d)
        if ok is None:
            rng = np.random.default_rng(54321)
            A = rng.standard_normal((2048, d)) * np.exp(rng.uniform(-20, 20, (2048, d)))
            want = np.array([float(r @ r) for r in A])
            ok = _dot_checked[d] = bool(np.array_equal(dot_rows(A), want))
        return ok

else:

    def usable(d: int) -> bool:
        return False
