"""Algorithm 1 of BPGrad as a bounded global minimizer: branch along the gradient, prune balls.

Everything here is NumPy only. The maths is in :func:`minimize`'s docstring and in
``docs/globalopt.md``; comments below say why, not what.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bpgrad.globalopt import _accel, _engine
from bpgrad.globalopt._bounds import parse_bounds
from bpgrad.globalopt._result import STATUS_MESSAGES, SUCCESS_STATUSES, OptimizeResult

__all__ = ["KIND_NAMES", "minimize"]

FloatArray = NDArray[np.float64]

# Why each sample was taken (``res.history_kind`` holds these codes).
GLOBAL, BRANCH, POLISH, FD = 0, 1, 2, 3
KIND_NAMES: tuple[str, ...] = ("global", "branch", "polish", "fd")

_LEAF, _SPLIT, _PRUNED, _RETIRED = 0, 1, 2, 3
_K_TERMS = 4  # samples kept per cell to recompute its bound cheaply when L changes
_L_GRID = 1.1  # estimated L is rounded up to a power of this, so the cell bounds rarely change
_LEAF_CAP = 32  # samples per leaf of the spatial index
_SCAN_MAX = 256  # below this many samples a plain O(n d) scan is cheaper than the index
_KEY_CHUNK = 1024  # random tie-break keys drawn per call of the generator
_ROWS = np.arange(3)[:, None]  # row index of the three new cells of a division


class _Stop(Exception):
    """Internal: unwinds the search with a status code."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _as_scalar(value: Any) -> float:
    if isinstance(value, float):  # float or np.float64: the common case, no array needed
        return float(value)
    arr = np.asarray(value, dtype=np.float64)
    if arr.size != 1:
        raise ValueError(
            f"func must return a scalar, got an array of shape {arr.shape}. With jac=True it "
            "must return (value, gradient)."
        )
    return float(arr.reshape(-1)[0])


def _terms_of(
    cand: NDArray[np.int64], vals: FloatArray
) -> tuple[FloatArray, NDArray[np.int64], FloatArray | None]:
    """Bounds (b,), kept terms (b, K) and their values (b, K; None when fewer than K samples)
    from the values (b, m) of the samples ``cand`` on b boxes."""
    b, m = vals.shape
    terms = np.full((b, _K_TERMS), -1, dtype=np.int64)
    tv = None
    if m <= _K_TERMS:
        terms[:, :m] = cand
    else:
        part = np.argpartition(vals, m - _K_TERMS, axis=1)[:, m - _K_TERMS :]
        terms[:] = cand[part]
        tv = vals[_ROWS[:b], part]
    return vals.max(axis=1), terms, tv


class _Index:
    """Spatial index of the samples for exact maximum queries over all of them.

    Every query of the search is a maximum over the samples of a per-sample expression
    (``f_i - L ||y - x_i||``, ``f_i - L far(x_i, cell)``, ``|f - f_i| / ||x - x_i||``) compared
    with a threshold. The samples sit in the leaves of a k-d tree: a leaf holds at most
    ``_LEAF_CAP`` samples and a full leaf is split at the median of its widest coordinate, so
    leaves stay small where the search concentrates (DIRECT-style division piles thousands of
    samples into a tiny region around a minimizer, which defeats a uniform grid). Each leaf
    keeps the tight bounding box of its samples, their largest finite value and their smallest
    finite value. A query bounds, for all leaves at once, what any sample of a leaf can
    contribute, and evaluates the exact per-sample formula only on the samples of leaves whose
    bound reaches the threshold. Those per-sample values use the same expression as a full scan,
    so every decision is bit-identical to scanning all samples; the leaf bounds carry a relative
    safety margin so rounding can only add candidates, never drop one.
    """

    def __init__(self, d: int) -> None:
        self.m = 0
        cap = 64
        self.lo = np.full((cap, d), math.inf)
        self.hi = np.full((cap, d), -math.inf)
        self.fb = np.full(cap, -math.inf)  # largest finite value in the leaf
        self.fmin = np.full(cap, math.inf)  # smallest finite value (for slopes)
        self.members = np.full((cap, _LEAF_CAP), -1, dtype=np.int64)
        # Samples per leaf: a list for the Python descent, an array for the compiled one.
        self.count: list[int] = []
        self.count_a = np.zeros(cap, dtype=np.int64)
        # Tree nodes (Python lists: the descent reads scalars). leaf[v] >= 0: the leaf slot of v.
        self.node_dim: list[int] = [0]
        self.node_val: list[float] = [0.0]
        self.node_left: list[int] = [-1]
        self.node_leaf: list[int] = [self._new_leaf()]
        # The same tree as arrays, for the compiled insertion (written only when a leaf splits).
        self.nodes = np.zeros((4, 64), dtype=np.int64)  # rows: dim, left, leaf, and unused
        self.nodes[2, 0] = 0
        self.node_split = np.zeros(64)
        # Leaf distances of the last query point, valid until the next insert: a new cell
        # centre is asked whether it lies in a ball and, when evaluated, for its slopes.
        self.dist_key: bytes | None = None
        self.dist_val: FloatArray = self.fb[:0]

    def _new_leaf(self) -> int:
        if self.m == self.lo.shape[0]:
            cap = 2 * self.m
            for name, fill in (
                ("lo", math.inf),
                ("hi", -math.inf),
                ("fb", -math.inf),
                ("fmin", math.inf),
                ("members", -1),
                ("count_a", 0),
            ):
                old = getattr(self, name)
                new = np.full((cap, *old.shape[1:]), fill, dtype=old.dtype)
                new[: self.m] = old[: self.m]
                setattr(self, name, new)
        self.count.append(0)
        self.m += 1
        return self.m - 1

    def _fill(self, s: int, mem: NDArray[np.int64], X: FloatArray, F: FloatArray) -> None:
        self.members[s] = -1
        self.members[s, : mem.size] = mem
        self.count[s] = self.count_a[s] = mem.size
        P = X[mem]
        self.lo[s], self.hi[s] = P.min(axis=0), P.max(axis=0)
        f = F[mem]
        fin = np.isfinite(f)
        self.fb[s] = float(f[fin].max()) if fin.any() else -math.inf
        self.fmin[s] = float(f[fin].min()) if fin.any() else math.inf

    def _split(self, v: int, X: FloatArray, F: FloatArray) -> None:
        s = self.node_leaf[v]
        mem = self.members[s].copy()
        k = int(np.argmax(self.hi[s] - self.lo[s]))
        order = np.argsort(X[mem, k], kind="stable")
        half = _LEAF_CAP // 2
        t = self._new_leaf()
        self._fill(s, mem[order[:half]], X, F)
        self._fill(t, mem[order[half:]], X, F)
        left = len(self.node_leaf)
        self.node_dim += [0, 0]
        self.node_val += [0.0, 0.0]
        self.node_left += [-1, -1]
        self.node_leaf += [s, t]
        self.node_dim[v] = k
        self.node_val[v] = float(X[mem[order[half - 1]], k])
        self.node_left[v] = left
        self.node_leaf[v] = -1
        if left + 2 > self.nodes.shape[1]:
            grown = np.zeros((4, 2 * self.nodes.shape[1]), dtype=np.int64)
            grown[:, :left] = self.nodes[:, :left]
            self.nodes = grown
            split = np.zeros(2 * self.node_split.size)
            split[:left] = self.node_split[:left]
            self.node_split = split
        for u in (v, left, left + 1):
            self.nodes[:3, u] = self.node_dim[u], self.node_left[u], self.node_leaf[u]
            self.node_split[u] = self.node_val[u]

    def insert(self, i: int, X: FloatArray, F: FloatArray, fast: bool = False) -> None:
        """Add sample i (already stored in X[i], F[i]); X and F are the sample arrays."""
        self.dist_key = None
        if fast:
            while True:
                v = _accel.index_insert(
                    i, X, F, self.lo, self.hi, self.fb, self.fmin, self.members, self.count_a,
                    self.nodes, self.node_split,
                )  # fmt: skip
                if v < 0:
                    return
                self._split(v, X, F)
        x = X[i]
        xs = x.tolist()
        v = 0
        while True:
            if self.node_leaf[v] < 0:
                v = self.node_left[v] + (xs[self.node_dim[v]] > self.node_val[v])
                continue
            if self.count[self.node_leaf[v]] < _LEAF_CAP:
                break
            self._split(v, X, F)
        s = self.node_leaf[v]
        self.members[s, self.count[s]] = i
        self.count[s] += 1
        np.minimum(self.lo[s], x, out=self.lo[s])
        np.maximum(self.hi[s], x, out=self.hi[s])
        f = float(F[i])
        if math.isfinite(f):
            if f > self.fb[s]:
                self.fb[s] = f
            if f < self.fmin[s]:
                self.fmin[s] = f

    def points(self, leaves: NDArray[np.int64]) -> NDArray[np.int64]:
        mem = self.members[leaves].ravel()
        return mem[mem >= 0]

    def dists(self, y: FloatArray) -> FloatArray:
        """Per leaf, the Euclidean distance from y to the leaf's bounding box: (m,)."""
        key = y.tobytes()
        if key != self.dist_key:
            gap = self.gaps(y)
            self.dist_val = np.sqrt(np.einsum("ij,ij->i", gap, gap))
            self.dist_key = key
        return self.dist_val

    def gaps(self, y: FloatArray) -> FloatArray:
        """Per leaf and coordinate, the distance from y to the leaf's bounding box: (m, d)."""
        m = self.m
        return np.maximum(np.maximum(self.lo[:m] - y, y - self.hi[:m]), 0.0)


class _Samples:
    """Evaluated points, values, gradients, and the Lipschitz bookkeeping over them.

    Every query is exact: below ``_SCAN_MAX`` samples it scans them all, above it asks the
    spatial index for the few samples that can matter and applies the same per-sample formula.
    """

    def __init__(self, d: int, lb: FloatArray, ub: FloatArray) -> None:
        self.d = d
        self.lb, self.ub = lb, ub
        self.diag = float(np.linalg.norm(ub - lb))
        self.n = 0
        cap = 256
        self.X = np.empty((cap, d))
        self.F = np.empty(cap)
        self.Fb = np.empty(cap)  # F where finite, -inf elsewhere: a NaN sample bounds nothing
        self.G = np.full((cap, d), np.nan)
        self.kind = np.empty(cap, dtype=np.int8)
        self.best = -1
        self.f_best = math.inf
        self.f_abs = 0.0  # largest finite |f|: scales the index's rounding margin
        self.slope_max = 0.0
        self.n_nonfinite = 0
        self.index = _Index(d)
        # The compiled kernels answer the same queries with the same operations (optional).
        self.fast = _accel.kernels_for(d)

    def _grow(self) -> None:
        cap = 2 * self.X.shape[0]
        for name in ("X", "F", "Fb", "G", "kind"):
            old = getattr(self, name)
            new = (
                np.full((cap, *old.shape[1:]), np.nan, dtype=old.dtype)
                if name == "G"
                else (np.empty((cap, *old.shape[1:]), dtype=old.dtype))
            )
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def _margin(self, thr: float, L: float) -> float:
        """Slack on a leaf bound so that its rounding never hides a sample above ``thr``."""
        return 1e-9 * (abs(thr) + self.f_abs + L * self.diag) + 1e-300

    def add(self, x: FloatArray, f: float, g: FloatArray | None, kind: int) -> int:
        if self.n == self.X.shape[0]:
            self._grow()
        i = self.n
        finite = math.isfinite(f)
        if finite and self.n > 0 and self.fast:
            ix = self.index
            self.slope_max = _accel.slope_max(
                self.X, self.Fb, i, x, f, self.slope_max, i <= _SCAN_MAX,
                ix.lo, ix.hi, ix.fb, ix.fmin, ix.members, ix.m,
            )  # fmt: skip
        elif finite and self.n > 0:
            # Largest observed slope |f_i - f_j| / ||x_i - x_j||: the data's lower bound on L.
            # Only samples that could beat the current maximum are looked at.
            if i <= _SCAN_MAX:
                cand = None
            else:
                ix = self.index
                dist = ix.dists(x)
                df = np.maximum(f - ix.fmin[: ix.m], ix.fb[: ix.m] - f)
                cand = ix.points((df >= self.slope_max * (1 - 1e-9) * dist).nonzero()[0])
            Xc = self.X[:i] if cand is None else self.X[cand]
            Fbc = self.Fb[:i] if cand is None else self.Fb[cand]
            diff = Xc - x
            dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
            # Fb is finite or -inf, and equals F where finite.
            ok = (Fbc > -math.inf) & (dist > 0)
            sl = np.abs(Fbc[ok] - f) / dist[ok]
            if sl.size:
                self.slope_max = max(self.slope_max, float(sl.max()))
        if g is not None and np.all(np.isfinite(g)):
            self.G[i] = g
            self.slope_max = max(self.slope_max, float(np.linalg.norm(g)))
        self.X[i] = x
        self.F[i] = f
        self.Fb[i] = f if finite else -math.inf
        self.kind[i] = kind
        self.n += 1
        self.index.insert(i, self.X, self.F, self.fast)
        if not finite:
            self.n_nonfinite += 1
        else:
            self.f_abs = max(self.f_abs, abs(f))
            if f < self.f_best:
                self.f_best = f
                self.best = i
        return i

    def lower_above(self, y: FloatArray, L: float, thr: float) -> float:
        """``max_i f_i - L ||y - x_i||`` if it exceeds ``thr``, else some value <= ``thr``.

        y lies in a pruning ball iff the exact maximum exceeds f̂*; the caller only needs that
        answer, so samples that cannot exceed ``thr`` are never looked at.
        """
        n = self.n
        if n == 0 or not thr < math.inf:
            return -math.inf
        if self.fast:
            ix = self.index
            scan = n <= _SCAN_MAX
            cut = 0.0 if scan else thr - self._margin(thr, L)
            return float(
                _accel.ball_max(
                    self.X, self.Fb, n, y, L, thr, cut, scan,
                    ix.lo, ix.hi, ix.fb, ix.members, ix.m,
                )
            )  # fmt: skip
        if n <= _SCAN_MAX:
            X, Fb = self.X[:n], self.Fb[:n]
        else:
            ix = self.index
            top = ix.fb[: ix.m] - L * ix.dists(y)
            cand = ix.points((top >= thr - self._margin(thr, L)).nonzero()[0])
            if cand.size == 0:
                return -math.inf
            X, Fb = self.X[cand], self.Fb[cand]
        diff = X - y
        vals = Fb - L * np.sqrt(np.einsum("ij,ij->i", diff, diff))
        return float(vals.max())

    def box_terms(
        self, lo: FloatArray, hi: FloatArray, L: float
    ) -> tuple[float, NDArray[np.int64]]:
        """Lower bound of f over [lo, hi] from every sample, and the samples that give it.

        f(x) >= f_i - L ||x - x_i|| >= f_i - L * far_i, far_i the distance from x_i to the
        box's farthest corner; the bound is the max over i. Exact per sample, O(n d).
        """
        n = self.n
        if n == 0:
            return -math.inf, np.full(_K_TERMS, -1, dtype=np.int64)
        bound, terms, _ = self._top_terms(np.arange(n, dtype=np.int64), lo[None], hi[None], L)
        return float(bound[0]), terms[0]

    def _top_terms(
        self,
        cand: NDArray[np.int64],
        los: FloatArray,
        his: FloatArray,
        L: float,
        k: int | None = None,
    ) -> tuple[FloatArray, NDArray[np.int64], FloatArray | None]:
        """``_terms_of`` the b boxes [los[j], his[j]] from samples cand.

        With ``k`` given the boxes differ only along coordinate k, so the other coordinates of
        far are computed once. Every element of far is the same expression as for one box, and
        the rows of the stacked (b m, d) array reduce like the rows of one (m, d) array, so
        batching changes no bit.
        """
        b, m, d = los.shape[0], cand.size, self.d
        X = self.X[cand]
        if k is None or b == 1:
            far = np.maximum(np.abs(X - los[:, None, :]), np.abs(X - his[:, None, :]))
        else:
            far = np.empty((b, m, d))
            far[:] = np.maximum(np.abs(X - los[0]), np.abs(X - his[0]))
            xk = X[:, k]
            far[:, :, k] = np.maximum(np.abs(xk - los[:, k, None]), np.abs(xk - his[:, k, None]))
        far = far.reshape(b * m, d)
        vals = self.Fb[cand] - L * np.sqrt(np.einsum("ij,ij->i", far, far)).reshape(b, m)
        return _terms_of(cand, vals)

    def split_terms(
        self,
        los: FloatArray,
        his: FloatArray,
        k: int,
        L: float,
        seeds: list[int],
    ) -> tuple[FloatArray, NDArray[np.int64], FloatArray | None]:
        """``box_terms`` of the cells [los[j], his[j]] that split a parent along k, at once.

        The K-th best value of the ``seeds`` (the parent's kept samples) on each new cell is a
        lower limit of that cell's K-th best term, so only samples in leaves whose bound reaches
        it can be among the terms. far_j(x) = |x_j - c_j| + h_j for a box with centre c and
        half-widths h; the leaf bound takes |x_j - c_j| at the leaf's nearest point and, along
        k, the nearest of the new cells.
        """
        n = self.n
        ix = self.index
        if self.fast:
            cand, vals = _accel.split_vals(
                self.X, self.Fb, n, los, his, k, L,
                np.array(sorted({j for j in seeds if j >= 0}), dtype=np.int64), _K_TERMS,
                self.f_abs, self.diag, n <= _SCAN_MAX, ix.lo, ix.hi, ix.fb, ix.members, ix.m,
            )  # fmt: skip
            ok, bound, terms, tv = _accel.top_terms(vals, cand, _K_TERMS)
            return (bound, terms, tv) if ok else _terms_of(cand, vals)
        if n <= _SCAN_MAX:
            return self._top_terms(np.arange(n, dtype=np.int64), los, his, L, k)
        uniq = sorted({j for j in seeds if j >= 0})
        thr = -math.inf
        if len(uniq) >= _K_TERMS:
            ns, b, d = len(uniq), los.shape[0], self.d
            X, Fb = self.X[uniq], self.Fb[uniq]
            far = np.maximum(np.abs(X - los[:, None, :]), np.abs(X - his[:, None, :]))
            far = far.reshape(b * ns, d)
            sv = Fb - L * np.sqrt(np.einsum("ij,ij->i", far, far)).reshape(b, ns)
            sv.partition(ns - _K_TERMS, axis=1)
            thr = float(sv[:, ns - _K_TERMS].min())
        if thr > -math.inf:
            lo0, hi0 = los[0], his[0]
            y0 = 0.5 * (lo0 + hi0)
            gap = ix.gaps(y0)
            # y0 is the first new cell's centre, asked next whether it lies in a ball.
            ix.dist_key, ix.dist_val = y0.tobytes(), np.sqrt(np.einsum("ij,ij->i", gap, gap))
            gap += 0.5 * (hi0 - lo0)
            lk, hk = ix.lo[: ix.m, k, None], ix.hi[: ix.m, k, None]
            ck, hw = 0.5 * (los[1:, k] + his[1:, k]), 0.5 * (his[1:, k] - los[1:, k])
            gk = np.maximum(np.maximum(lk - ck, ck - hk), 0.0) + hw
            np.minimum(gap[:, k], gk.min(axis=1), out=gap[:, k])
            top = ix.fb[: ix.m] - L * np.sqrt(np.einsum("ij,ij->i", gap, gap))
            cand = ix.points((top >= thr - self._margin(thr, L)).nonzero()[0])
        else:
            cand = ix.points(np.arange(ix.m, dtype=np.int64))
        return self._top_terms(cand, los, his, L, k)


class _Tree:
    """The trisection partition of the box: cells, their lower bounds, a lazy min-heap."""

    def __init__(self, d: int, rng: np.random.Generator, key_chunk: int = _KEY_CHUNK) -> None:
        cap = 256
        self.d = d
        self.n = 0
        self.lo = np.empty((cap, d))
        self.hi = np.empty((cap, d))
        self.bound = np.full(cap, -math.inf)
        self.terms = np.full((cap, _K_TERMS), -1, dtype=np.int64)
        self.child = np.full(cap, -1, dtype=np.int64)
        self.sdim = np.zeros(cap, dtype=np.int64)
        self.state = np.zeros(cap, dtype=np.int8)
        self.center = np.full(cap, -1, dtype=np.int64)
        self.value = np.full(cap, math.inf)  # centre value, or its Lipschitz lower estimate
        # Values of the kept terms as the split computed them, valid while tval_L equals L
        # (any change of a cell's terms sets its tval_L to NaN).
        self.tval = np.zeros((cap, _K_TERMS))
        self.tval_L = np.full(cap, math.nan)
        self.size = np.zeros(cap)  # half-diagonal in box-normalised coordinates
        self.heap: list[tuple[float, float, int]] = []
        # One min-heap of (value, tie, cell) per cell size: DIRECT-style selection reads the
        # best cell of every size.
        self.by_size: dict[int, list[tuple[float, float, int]]] = {}
        self.rng = rng
        # Tie-break keys come from one stream, drawn ``key_chunk`` at a time: rng.random(n)
        # yields the same doubles as n calls of rng.random(), so the keys are unchanged.
        self.key_chunk = key_chunk
        self.keys: list[float] = []
        self.kpos = 0
        self.pruned_min = math.inf

    def _grow(self) -> None:
        cap = 2 * self.lo.shape[0]
        for name, fill in (
            ("lo", 0.0),
            ("hi", 0.0),
            ("bound", -math.inf),
            ("terms", -1),
            ("child", -1),
            ("sdim", 0),
            ("state", 0),
            ("center", -1),
            ("value", math.inf),
            ("size", 0.0),
            ("tval", 0.0),
            ("tval_L", math.nan),
        ):
            old = getattr(self, name)
            new = np.full((cap, *old.shape[1:]), fill, dtype=old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def add(self, lo: FloatArray, hi: FloatArray) -> int:
        if self.n == self.lo.shape[0]:
            self._grow()
        i = self.n
        self.lo[i], self.hi[i] = lo, hi
        self.n += 1
        return i

    def add_many(self, los: FloatArray, his: FloatArray) -> int:
        """Add the cells [los[j], his[j]] as consecutive indices; returns the first."""
        b = los.shape[0]
        while self.n + b > self.lo.shape[0]:
            self._grow()
        i = self.n
        self.lo[i : i + b], self.hi[i : i + b] = los, his
        self.n += b
        return i

    def key(self) -> float:
        if self.kpos == len(self.keys):
            self.keys = self.rng.random(self.key_chunk).tolist()
            self.kpos = 0
        self.kpos += 1
        return self.keys[self.kpos - 1]

    def take_keys(self, n: int) -> list[float]:
        out = self.keys[self.kpos : self.kpos + n]
        self.kpos += len(out)
        if len(out) < n:
            out += self.rng.random(n - len(out)).tolist()
        return out

    def push(self, i: int) -> None:
        # Ties in the bound are broken by a seeded random key: the only use of ``seed``.
        heapq.heappush(self.heap, (float(self.bound[i]), self.key(), i))

    def push_size(self, i: int) -> None:
        key = round(float(self.size[i]) * 1e12)
        heap = self.by_size.setdefault(key, [])
        heapq.heappush(heap, (float(self.value[i]), self.key(), i))

    def hull(self) -> list[int]:
        """Cells on the lower-right convex hull of (size, value): DIRECT's potentially optimal
        cells, i.e. those with the lowest value - K * size for some K > 0."""
        pts: list[tuple[float, float, int]] = []
        for key in list(self.by_size):
            heap = self.by_size[key]
            while heap and (
                self.state[heap[0][2]] != _LEAF or self.value[heap[0][2]] != heap[0][0]
            ):
                heapq.heappop(heap)
            if not heap:
                del self.by_size[key]
                continue
            i = heap[0][2]
            pts.append((float(self.size[i]), heap[0][0], i))
        if not pts:
            return []
        pts.sort()
        unknown = [p[2] for p in pts if p[1] == -math.inf]
        if unknown:  # cells with no finite information anywhere: look at them first
            return unknown
        # start at the lowest value (largest size among ties), walk to the largest size
        j0 = min(range(len(pts)), key=lambda j: (pts[j][1], -pts[j][0]))
        chain: list[tuple[float, float, int]] = []
        for p in pts[j0:]:
            while len(chain) >= 2:
                (x1, y1, _), (x2, y2, _) = chain[-2], chain[-1]
                # drop the middle point if it lies on or above the segment to p
                if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                    chain.pop()
                else:
                    break
            chain.append(p)
        return [c[2] for c in chain]

    def peek(self) -> int:
        """The live leaf with the lowest bound, or -1; drops stale heap entries."""
        heap = self.heap
        while heap:
            b, _, i = heap[0]
            if self.state[i] == _LEAF and self.bound[i] == b:
                return i
            heapq.heappop(heap)
        return -1

    def leaf_of(self, x: FloatArray) -> int:
        i = 0
        while self.state[i] == _SPLIT:
            k = int(self.sdim[i])
            lo, hi = self.lo[i, k], self.hi[i, k]
            t = (x[k] - lo) / (hi - lo)
            i = int(self.child[i]) + (0 if t < 1 / 3 else 1 if t < 2 / 3 else 2)
        return i

    def add_term(self, leaf: int, idx: int, S: _Samples, L: float) -> None:
        """Tighten a cell's bound with one more sample (the weakest kept term is replaced)."""
        fb = S.Fb[idx]
        if not math.isfinite(fb):
            return
        x, lo, hi = S.X[idx], self.lo[leaf], self.hi[leaf]
        far = np.maximum(np.abs(x - lo), np.abs(x - hi))
        val = float(fb - L * math.sqrt(float(far @ far)))
        terms = self.terms[leaf]
        if val > self.bound[leaf]:
            self.bound[leaf] = val
            if self.state[leaf] == _LEAF:
                self.push(leaf)
        tl = terms.tolist()
        if -1 in tl:
            terms[tl.index(-1)] = idx
            self.tval_L[leaf] = math.nan
            return
        # All K terms are set: their values, row by row as _term_values computes them.
        if self.tval_L[leaf] == L:
            tv = self.tval[leaf]
        else:
            X = S.X[terms]
            far = np.maximum(np.abs(X - lo), np.abs(X - hi))
            tv = S.Fb[terms] - L * np.sqrt(np.einsum("kd,kd->k", far, far))
        j = int(tv.argmin())
        if val > tv[j]:
            terms[j] = idx
            self.tval_L[leaf] = math.nan

    def _term_values(self, cells: NDArray[np.int64], S: _Samples, L: float) -> FloatArray:
        t = self.terms[cells]  # (m, K)
        valid = t >= 0
        tt = np.where(valid, t, 0)
        X = S.X[tt]  # (m, K, d)
        far = np.maximum(
            np.abs(X - self.lo[cells][:, None, :]), np.abs(X - self.hi[cells][:, None, :])
        )
        vals = S.Fb[tt] - L * np.sqrt(np.einsum("mkd,mkd->mk", far, far))
        return np.where(valid, vals, -math.inf)

    def rebound(self, S: _Samples, L: float) -> None:
        """Recompute every leaf's bound for a new L from its kept terms; rebuild the heap."""
        n = self.n
        cells = np.flatnonzero(self.state[:n] != _SPLIT)
        if cells.size:
            self.bound[cells] = self._term_values(cells, S, L).max(axis=1)
        # A cell pruned under a smaller L may be live again: every non-split cell re-enters,
        # the pop decides again.
        self.state[cells[self.state[cells] == _PRUNED]] = _LEAF
        retired = cells[self.state[cells] == _RETIRED]
        self.pruned_min = float(self.bound[retired].min()) if retired.size else math.inf
        live = cells[self.state[cells] == _LEAF]
        keys = self.take_keys(live.size)
        self.heap = list(zip(self.bound[live].tolist(), keys, live.tolist(), strict=True))
        heapq.heapify(self.heap)
        self.by_size = {}
        for i in live:
            c = int(self.center[i])
            if c >= 0 and math.isfinite(S.F[c]):
                self.push_size(int(i))

    def lower_bound(self) -> float:
        top = self.peek()
        live = float(self.bound[top]) if top >= 0 else math.inf
        return min(live, self.pruned_min)


def _check_callable(name: str, obj: Any) -> None:
    if not callable(obj):
        raise TypeError(f"{name} must be callable, got {type(obj).__name__}.")


def minimize(
    func: Callable[..., Any],
    bounds: Any,
    *,
    args: tuple[Any, ...] = (),
    jac: Callable[..., ArrayLike] | bool | None = None,
    lipschitz: float | None = None,
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
    strategy: str = "hull",
    callback: Callable[[OptimizeResult], Any] | None = None,
    seed: int | np.random.Generator | None = None,
) -> OptimizeResult:
    r"""Globally minimize ``func`` over a box with BPGrad's branch-and-prune (Algorithm 1).

    **Model.** ``f`` is L-Lipschitz on the box X: :math:`|f(x)-f(y)| \le L\|x-y\|_2`. Every
    evaluated sample :math:`(x_i, f_i)` then gives :math:`f(x) \ge f_i - L\|x - x_i\|`, so the
    ball :math:`B(x_i, r_i)`, :math:`r_i = (f_i - \hat f^*)/L`, holds no point with
    :math:`f \le \hat f^*` and is *pruned*.

    **Pruning level** :math:`\hat f^*`. BPGrad uses :math:`\rho\,\min_i f_i`, which assumes
    :math:`f \ge 0`. For any sign, with :math:`f_b` the best value so far,

    .. math:: \hat f^* = f_b - \max\bigl(\mathrm{tol},\ (1-\rho)(f_b - f_\mathrm{lower})\bigr),

    which is BPGrad's :math:`\rho f_b` when ``f_lower=0`` (and the gap exceeds ``tol``). Without
    ``f_lower`` (default) the level is :math:`f_b - \mathrm{tol}`: a ball then holds no point that
    improves the best value by more than ``tol``.

    **Branch (BPGrad step).** From a sample :math:`x_t` with gradient :math:`g_t`, the next
    sample is on the boundary of its own ball along the normalised negative gradient, projected
    onto the box: :math:`x_{t+1} = \Pi_X(x_t - r_t g_t/\|g_t\|)`. It is evaluated only if it lies
    outside every pruning ball; a chain follows at most ``branch_steps`` steps.

    **Re-sampling rule** (when the branch is pruned, unavailable, or its chain ends): the box is
    kept as a partition into cells (trisection of a cell's longest side, normalised by the box).
    A cell's lower bound is :math:`\max_i f_i - L\,\mathrm{far}(x_i, \text{cell})`, with far the
    distance to the cell's farthest corner; it is a valid bound on f over the cell. The cell with
    the lowest bound - the most promising unpruned region - is divided and the centres of the
    new cells are evaluated **only if they lie outside every pruning ball**. A cell whose bound
    exceeds :math:`\hat f^*` lies inside one ball and is pruned. Every branch or re-sampling
    evaluation is outside all balls, whose radii exceed tol/L while the gap exceeds tol, so those
    samples are tol/L apart and their number is finite (at most the packing number of X).

    **Local polish** (``polish=True``): from each new best point found by the branch or
    re-sampling steps, a projected BFGS descent with Armijo backtracking runs for at most
    ``polish_maxfev`` evaluations (default ``50 (d + 1)``). It is not part of the finite-iteration
    argument (its samples may lie in pruned balls) but is bounded per new best point. Its samples
    tighten the cell bounds.

    **Lower bound.** ``res.lower_bound`` is the minimum over all cells (live and pruned) of
    their bounds: :math:`\min_X f \ge` ``lower_bound`` whenever ``lipschitz`` is a true
    Lipschitz constant and every value was finite; ``res.certified`` says whether that holds
    (False when L was estimated, when an observed slope exceeded ``lipschitz``, or when a value
    was not finite).

    **Unknown L** (``lipschitz=None``): :math:`\hat L = s \cdot 1.1^{\lceil\log_{1.1} m\rceil}`
    with :math:`m` the largest slope :math:`|f_i - f_j|/\|x_i - x_j\|` (and gradient norm) seen
    so far and :math:`s` = ``lipschitz_safety``; it only grows. No certificate is claimed.

    Args:
        func: ``func(x, *args) -> float`` for a 1-D float array ``x``; with ``jac=True`` it
            returns ``(value, gradient)``. Exceptions from ``func`` propagate unchanged.
        bounds: a sequence of ``(low, high)`` pairs or an object with ``lb`` and ``ub``
            (``scipy.optimize.Bounds``). Finite, ``low < high``.
        args: extra positional arguments for ``func`` and ``jac``.
        jac: gradient callable ``jac(x, *args)`` (counted in ``njev``), ``True`` when ``func``
            returns the gradient too, or ``None``: then the polish uses forward differences
            (``d`` calls each, counted in ``nfev``, kind ``"fd"``) and the branch is off unless
            ``branch=True`` (then its direction also comes from forward differences).
        lipschitz: a Lipschitz constant L of ``func`` on the box (Euclidean norm); ``None``
            estimates it from the data (no certificate).
        rho: BPGrad's ratio in [0, 1): only used together with ``f_lower``.
        f_lower: a known lower bound on f (BPGrad assumes 0); with ``rho`` it sets how
            aggressively balls prune (see the pruning level above).
        tol: absolute gap: stop when best value minus lower bound is at most ``tol``.
        maxfev: budget of ``func`` calls (default ``1000 d``).
        maxiter: budget of iterations (one cell division, one branch step, one polish run, or
            one re-evaluated cell centre each); default unlimited.
        f_target: stop as soon as a value ``<= f_target`` is seen.
        polish: run the local polish from each new best point.
        polish_maxfev: evaluations per polish run (default ``50 (d + 1)``).
        branch: take BPGrad branch steps; default True when ``jac`` is given.
        branch_steps: longest chain of branch steps from one re-sampled point.
        lipschitz_safety: the factor s of the L estimate (>= 1).
        callback: ``callback(intermediate_result)`` after every iteration, with ``x, fun,
            nfev, njev, nit, lower_bound, lipschitz``; returning ``True`` or raising
            ``StopIteration`` ends the run with status 4. It gets a copy: changing it has no
            effect.
        seed: seeds the only random choice, the order of cells with exactly equal bounds;
            ``None`` means 0, so a run is reproducible by default.

    Returns:
        An :class:`OptimizeResult` with ``x, fun, nfev, njev, nit, status, success, message``,
        ``lower_bound, gap, certified, lipschitz, lipschitz_estimated, fhat`` (the final pruning
        level), ``nonfinite`` (count of NaN/inf values), and the history ``history_x`` (n, d),
        ``history_f`` (n,), ``history_kind`` (n,) codes into ``kind_names``. Status codes and
        messages: :data:`bpgrad.globalopt.STATUS_MESSAGES`. Non-finite values (NaN, ±inf) are
        recorded and counted but never become the best point and carry no bound information.
    """
    # ---- validation: every argument checked before the first evaluation ----
    _check_callable("func", func)
    lb, ub = parse_bounds(bounds)
    d = lb.size
    if not isinstance(args, tuple):
        args = (args,)
    if jac is not None and jac is not True and not callable(jac):
        raise TypeError("jac must be a callable, True (func returns (value, gradient)) or None.")
    if jac is False:
        jac = None
    if lipschitz is not None:
        lipschitz = float(lipschitz)
        if not (math.isfinite(lipschitz) and lipschitz > 0):
            raise ValueError(
                f"lipschitz must be a finite positive number, got {lipschitz}; pass None to "
                "estimate it from the data."
            )
    rho = float(rho)
    if not 0 <= rho < 1:
        raise ValueError(f"rho must lie in [0, 1), got {rho}.")
    if f_lower is not None and not math.isfinite(float(f_lower)):
        raise ValueError(f"f_lower must be a finite number or None, got {f_lower}.")
    tol = float(tol)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite positive number, got {tol}.")
    maxfev = 1000 * d if maxfev is None else _positive_int("maxfev", maxfev)
    maxiter_v = math.inf if maxiter is None else _positive_int("maxiter", maxiter)
    if f_target is not None and math.isnan(float(f_target)):
        raise ValueError("f_target must be a number or None, not NaN.")
    polish_maxfev = (
        50 * (d + 1) if polish_maxfev is None else _positive_int("polish_maxfev", polish_maxfev)
    )
    branch_steps = _positive_int("branch_steps", branch_steps, allow_zero=True)
    lipschitz_safety = float(lipschitz_safety)
    if not (math.isfinite(lipschitz_safety) and lipschitz_safety >= 1):
        raise ValueError(f"lipschitz_safety must be a finite number >= 1, got {lipschitz_safety}.")
    if strategy not in ("hull", "bound"):
        raise ValueError(f"strategy must be 'hull' or 'bound', got {strategy!r}.")
    if callback is not None:
        _check_callable("callback", callback)
    use_branch = (jac is not None) if branch is None else bool(branch)
    rng = np.random.default_rng(0 if seed is None else seed)

    # The compiled search loop when numba is there and its sums round like NumPy's here; a
    # caller's own Generator keeps the Python loop, which draws each tie-break key on demand.
    user_rng = isinstance(seed, (np.random.Generator, np.random.BitGenerator))
    cls = _EngineRun if not user_rng and _engine.usable(d) else _Run
    run = cls(
        func=func,
        args=args,
        jac=jac,
        lb=lb,
        ub=ub,
        lipschitz=lipschitz,
        rho=rho,
        f_lower=None if f_lower is None else float(f_lower),
        tol=tol,
        maxfev=maxfev,
        maxiter=maxiter_v,
        f_target=None if f_target is None else float(f_target),
        polish=bool(polish),
        polish_maxfev=polish_maxfev,
        branch=use_branch,
        branch_steps=branch_steps,
        safety=lipschitz_safety,
        strategy=strategy,
        callback=callback,
        rng=rng,
        user_rng=user_rng,
    )
    return run.solve()


def _positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}.")
    if value < 0 or (value == 0 and not allow_zero):
        need = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {need} integer, got {value}.")
    return int(value)


class _Run:
    """State of one call of :func:`minimize`."""

    def __init__(
        self,
        *,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        jac: Any,
        lb: FloatArray,
        ub: FloatArray,
        lipschitz: float | None,
        rho: float,
        f_lower: float | None,
        tol: float,
        maxfev: int,
        maxiter: float,
        f_target: float | None,
        polish: bool,
        polish_maxfev: int,
        branch: bool,
        branch_steps: int,
        safety: float,
        strategy: str,
        callback: Callable[[OptimizeResult], Any] | None,
        rng: np.random.Generator,
        user_rng: bool = False,
    ) -> None:
        self.func, self.args, self.jac = func, args, jac
        self.lb, self.ub = lb, ub
        self.width = ub - lb
        self.diag = float(np.linalg.norm(self.width))
        self.d = lb.size
        self.known_L = lipschitz
        self.rho, self.f_lower, self.tol = rho, f_lower, tol
        self.maxfev, self.maxiter, self.f_target = maxfev, maxiter, f_target
        self.do_polish, self.polish_maxfev = polish, polish_maxfev
        self.do_branch, self.branch_steps = branch, branch_steps
        self.safety = safety
        self.strategy = strategy
        self.callback = callback
        self.S = _Samples(self.d, lb, ub)
        # A caller's own Generator is advanced exactly as far as the keys used (one draw per
        # key); a generator made here from an integer seed is free to run ahead in chunks.
        self.T = _Tree(self.d, rng, 1 if user_rng else _KEY_CHUNK)
        self.nfev = 0
        self.njev = 0
        self.nit = 0
        self.L = lipschitz if lipschitz is not None else 1.0
        self.L_dirty = False
        self.fd_step = 1.5e-8 * np.maximum(np.maximum(np.abs(lb), np.abs(ub)), self.width)

    # ---- evaluation: the only place that calls user code ----
    def evaluate(self, x: FloatArray, kind: int, want_grad: bool) -> int:
        if self.nfev >= self.maxfev:
            raise _Stop(2)
        x = np.array(x, dtype=np.float64)
        self.nfev += 1
        f, g = self._call(x, want_grad)
        i = self._record(x, f, g, kind)
        if self.f_target is not None and f <= self.f_target:
            raise _Stop(5)
        return i

    def _record(self, x: FloatArray, f: float, g: FloatArray | None, kind: int) -> int:
        """Store a new sample and update L from it; returns the sample's index."""
        i = self.S.add(x, f, g, kind)
        self._update_L()
        return i

    def _call(self, x: FloatArray, want_grad: bool) -> tuple[float, FloatArray | None]:
        """func (and jac when asked) at x: the value and the gradient or None."""
        g: FloatArray | None = None
        if self.jac is True:
            out = self.func(x.copy(), *self.args)
            try:
                fv, gv = out
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    "with jac=True, func must return a pair (value, gradient)."
                ) from exc
            f = _as_scalar(fv)
            g = self._as_grad(gv)
        else:
            f = _as_scalar(self.func(x.copy(), *self.args))
            if want_grad and callable(self.jac) and math.isfinite(f):
                self.njev += 1
                g = self._as_grad(self.jac(x.copy(), *self.args))
        return f, g

    def _as_grad(self, gv: Any) -> FloatArray:
        g = np.asarray(gv, dtype=np.float64).reshape(-1)
        if g.size != self.d:
            raise ValueError(
                f"the gradient has {g.size} entries but x has {self.d}: jac must return one "
                "partial derivative per coordinate."
            )
        return g

    def _update_L(self) -> None:
        if self.known_L is not None:
            return
        m = self.S.slope_max
        if m <= 0:
            # No slope seen yet (one point, or a constant function): a tiny L, so bounds
            # follow the data until a slope appears.
            scale = max(1.0, abs(self.S.f_best)) if math.isfinite(self.S.f_best) else 1.0
            new = 1e-9 * scale / self.diag
        else:
            new = self.safety * _L_GRID ** math.ceil(math.log(m) / math.log(_L_GRID))
        if new > self.L * (1 + 1e-12) or self.S.n == 1:
            self.L = new
            self.L_dirty = True

    def gradient(self, i: int) -> FloatArray | None:
        """Gradient at sample i: stored, from ``jac``, or by forward differences (counted)."""
        g = self.S.G[i]
        if np.all(np.isfinite(g)):
            return g.copy()
        if not math.isfinite(self.S.F[i]):
            return None
        x = self.S.X[i].copy()
        if callable(self.jac):
            self.njev += 1
            gv = self._as_grad(self.jac(x.copy(), *self.args))
            if np.all(np.isfinite(gv)):
                self.S.G[i] = gv
                return gv
            return None
        f0 = float(self.S.F[i])
        g = np.empty(self.d)
        for j in range(self.d):
            h = float(self.fd_step[j])
            xj = x.copy()
            if x[j] + h > self.ub[j]:
                h = -h
            xj[j] = x[j] + h
            k = self.evaluate(xj, FD, False)
            self._insert(k)
            g[j] = (self.S.F[k] - f0) / h
        if not np.all(np.isfinite(g)):
            return None
        self.S.G[i] = g
        return g

    # ---- pruning level and bounds ----
    def fhat(self) -> float:
        fb = self.S.f_best
        if not math.isfinite(fb):
            return math.inf
        if not self._may_conclude():
            return math.inf  # nothing is pruned while an estimated L rests on few samples
        delta = self.tol
        if self.f_lower is not None:
            delta = max(delta, (1 - self.rho) * (fb - self.f_lower))
        return fb - delta

    def _prune_level(self) -> float:
        """A point is in a pruning ball iff its Lipschitz lower estimate exceeds this."""
        fh = self.fhat()
        return fh + 1e-12 * (1 + abs(fh))

    def pruned_point(self, y: FloatArray) -> bool:
        thr = self._prune_level()
        return self.S.lower_above(y, self.L, thr) > thr

    def _insert(self, i: int) -> None:
        """Put a non-centre sample into the partition as a bound term of its cell."""
        self.T.add_term(self.T.leaf_of(self.S.X[i]), i, self.S, self.L)

    def _place(
        self, c: int, center_lower: float | None, fh: float, rel: FloatArray | None = None
    ) -> None:
        """Set a new cell's ranking value and size; prune it or make it live.

        ``fh`` is the current f̂*; ``rel`` the cell's widths over the box widths if known.
        """
        T = self.T
        i = int(T.center[c])
        fc = float(self.S.F[i]) if i >= 0 else math.nan
        finite = math.isfinite(fc)
        if finite:
            T.value[c] = fc
        elif center_lower is not None:
            T.value[c] = center_lower
        else:
            y = 0.5 * (T.lo[c] + T.hi[c])
            T.value[c] = self.S.lower_above(y, self.L, -math.inf)
        if rel is None:
            rel = (T.hi[c] - T.lo[c]) / self.width
        # The same sqrt(rel . rel) as np.linalg.norm(rel), without its overhead.
        T.size[c] = 0.5 * math.sqrt(float(rel @ rel))
        bound = float(T.bound[c])
        if bound > fh:
            T.state[c] = _PRUNED
            T.pruned_min = min(T.pruned_min, bound)
        else:
            T.push(c)
            # Only cells with a finite centre value compete in the DIRECT-style hull; the others
            # (centre inside a ball, or NaN) are divided only when the hull is empty, so a
            # known L never spends time dividing cells that it cannot evaluate.
            if finite:
                T.push_size(c)

    def _refresh_L(self) -> None:
        if self.L_dirty:
            self.L_dirty = False
            self.T.rebound(self.S, self.L)

    # ---- the search ----
    def solve(self) -> OptimizeResult:
        status = -1
        branch_queue: list[tuple[int, int]] = []
        pending: list[int] = []
        try:
            root = self.T.add(self.lb.copy(), self.ub.copy())
            c = self.evaluate(0.5 * (self.lb + self.ub), GLOBAL, self.do_branch)
            self.T.center[root] = c
            self._refresh_L()
            self.T.bound[root], self.T.terms[root] = self.S.box_terms(self.lb, self.ub, self.L)
            self._place(root, None, self.fhat())
            self._after_sample(c, branch_queue, 0)
            while True:
                self._refresh_L()
                status = self._check_stop()
                if status >= 0:
                    break
                if branch_queue:
                    i, depth = branch_queue.pop()
                    self._branch(i, depth, branch_queue)
                else:
                    leaf = self.T.peek()
                    if leaf < 0 or self.T.bound[leaf] > self.fhat():
                        status = 0 if self._gap() <= self.tol else 1
                        break
                    if self.strategy == "hull":
                        while pending and self.T.state[pending[-1]] != _LEAF:
                            pending.pop()
                        if not pending:
                            pending = self.T.hull()[::-1]
                        leaf = pending.pop() if pending else leaf
                    if self.T.bound[leaf] > self.fhat():
                        self.T.state[leaf] = _PRUNED
                        self.T.pruned_min = min(self.T.pruned_min, float(self.T.bound[leaf]))
                    else:
                        self._divide(leaf, branch_queue)
                self.nit += 1
                if self._call_back():
                    status = 4
                    break
        except _Stop as stop:
            status = stop.status
        if self.S.n_nonfinite == self.S.n:
            status = 6
        return self._result(status)

    def _gap(self) -> float:
        return self.S.f_best - self.T.lower_bound()

    def _may_conclude(self) -> bool:
        # An estimated L rests on the data: too few samples can make it tiny and the gap
        # vanish. With an estimated L the gap and cover stops wait for 10 (d + 1) finite values.
        finite = self.S.n - self.S.n_nonfinite
        return self.known_L is not None or finite >= 10 * (self.d + 1)

    def _check_stop(self) -> int:
        if math.isfinite(self.S.f_best) and self._may_conclude() and self._gap() <= self.tol:
            return 0
        if self.nit >= self.maxiter:
            return 3
        return -1

    def _after_sample(self, i: int, branch_queue: list[tuple[int, int]], depth: int) -> None:
        """A branch or re-sampling evaluation: polish a new best point, else branch from it."""
        if not math.isfinite(self.S.F[i]):
            return
        if i == self.S.best and self.do_polish:
            self._polish(i)
        elif self.do_branch and depth < self.branch_steps:
            branch_queue.append((i, depth))

    def _branch(self, i: int, depth: int, branch_queue: list[tuple[int, int]]) -> None:
        g = self.gradient(i)
        if g is None:
            return
        gn = float(np.linalg.norm(g))
        r = (float(self.S.F[i]) - self.fhat()) / self.L
        if gn == 0 or not math.isfinite(r) or r <= 0:
            return
        x = self.S.X[i]
        y = np.clip(x - (r / gn) * g, self.lb, self.ub)
        if np.linalg.norm(y - x) <= 1e-9 * self.diag or self.pruned_point(y):
            return
        k = self.evaluate(y, BRANCH, True)
        self._insert(k)
        self._after_sample(k, branch_queue, depth + 1)

    def _divide(self, leaf: int, branch_queue: list[tuple[int, int]]) -> None:
        T, S = self.T, self.S
        lo, hi = T.lo[leaf].copy(), T.hi[leaf].copy()
        if T.center[leaf] < 0:
            # The centre was in a pruning ball when the cell was made; balls move with f̂* and L.
            y = 0.5 * (lo + hi)
            if not self.pruned_point(y):
                c = self.evaluate(y, GLOBAL, self.do_branch)
                T.center[leaf] = c
                T.add_term(leaf, c, S, self.L)
                if math.isfinite(S.F[c]):
                    T.value[leaf] = S.F[c]
                    T.push_size(leaf)
                self._after_sample(c, branch_queue, 0)
                return
        w = hi - lo
        rel = w / self.width
        if float(rel.max()) < 1e-12:
            # Too small to divide in floating point: keep its (valid) bound in the certificate.
            T.state[leaf] = _RETIRED
            T.pruned_min = min(T.pruned_min, float(T.bound[leaf]))
            return
        k = int(rel.argmax())
        a, b = lo[k] + w[k] / 3, lo[k] + 2 * w[k] / 3
        los, his = lo[None].repeat(3, axis=0), hi[None].repeat(3, axis=0)
        los[1, k], los[2, k] = a, b
        his[0, k], his[1, k] = a, b
        k0 = T.add_many(los, his)
        kids = (k0, k0 + 1, k0 + 2)
        ctr = int(T.center[leaf])
        T.child[leaf] = k0
        T.sdim[leaf] = k
        T.state[leaf] = _SPLIT
        T.center[k0 + 1] = ctr
        seeds = T.terms[leaf].tolist()
        seeds.append(ctr)
        T.bound[k0 : k0 + 3], T.terms[k0 : k0 + 3], tv = S.split_terms(los, his, k, self.L, seeds)
        if tv is not None:
            T.tval[k0 : k0 + 3] = tv
            T.tval_L[k0 : k0 + 3] = self.L
        new = []
        lowers: list[float | None] = [None, None, None]
        if ctr < 0:
            lowers[1] = float(T.value[leaf])
        for j in (0, 2):
            c = kids[j]
            y = 0.5 * (los[j] + his[j])
            thr = self._prune_level()
            lower = S.lower_above(y, self.L, thr)
            lowers[j] = lower
            if not lower > thr:
                s = self.evaluate(y, GLOBAL, self.do_branch)
                T.center[c] = s
                T.add_term(c, s, S, self.L)
                new.append(s)
        fh = self.fhat()
        rels = (his - los) / self.width
        for j in range(3):
            self._place(kids[j], lowers[j], fh, rels[j])
        for s in new:
            self._after_sample(s, branch_queue, 0)

    def _polish(self, i0: int) -> None:
        """Projected BFGS with Armijo backtracking from sample i0, at most polish_maxfev calls."""
        S = self.S
        stop_at = self.nfev + self.polish_maxfev
        x = S.X[i0].copy()
        f = float(S.F[i0])
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
            if gnorm <= 1e-14 * (1 + abs(f)) * self.L:
                return
            p = -pg * (step0 / gnorm) if H is None else np.where(free, -(H @ pg), 0.0)
            if float(p @ pg) >= 0:
                H = None
                p = -pg * (step0 / gnorm)
            alpha = 1.0
            accepted = -1
            for _ls in range(40):
                if self.nfev >= stop_at:
                    return
                xn = np.clip(x + alpha * p, self.lb, self.ub)
                s = xn - x
                if float(np.linalg.norm(s)) <= 1e-13 * self.diag:
                    return
                k = self.evaluate(xn, POLISH, want)
                self._insert(k)
                fn = float(S.F[k])
                if math.isfinite(fn) and fn <= f + 1e-4 * float(g @ s):
                    accepted = k
                    break
                alpha *= 0.25 if not math.isfinite(fn) else 0.5
            if accepted < 0:
                return
            if self.nfev >= stop_at:
                return
            gn = self.gradient(accepted)
            if gn is None:
                return
            s = S.X[accepted] - x
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
            x, f, g = S.X[accepted].copy(), float(S.F[accepted]), gn
            if f_old - f <= 1e-15 * (1 + abs(f)):
                return

    def _snapshot(self) -> OptimizeResult:
        S = self.S
        has = S.best >= 0
        return OptimizeResult(
            x=S.X[S.best].copy() if has else 0.5 * (self.lb + self.ub),
            fun=float(S.f_best) if has else math.nan,
            nfev=self.nfev,
            njev=self.njev,
            nit=self.nit,
            lower_bound=self.T.lower_bound() if has else -math.inf,
            lipschitz=self.L,
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
        S = self.S
        res = self._snapshot()
        n = S.n
        violated = self.known_L is not None and S.slope_max > self.known_L * (1 + 1e-9)
        certified = self.known_L is not None and not violated and S.n_nonfinite == 0 and S.best >= 0
        lower = res.lower_bound
        gap = res.fun - lower if S.best >= 0 else math.inf
        message = STATUS_MESSAGES[status]
        if status in (0, 1) and not certified:
            message += " The lower bound rests on an estimated or violated L: not a certificate."
        if violated:
            message += (
                f" Warning: an observed slope {S.slope_max:.4g} exceeds lipschitz={self.known_L}."
            )
        res.update(
            status=status,
            success=status in SUCCESS_STATUSES,
            message=message,
            gap=gap,
            certified=certified,
            lipschitz_estimated=self.known_L is None,
            max_slope=S.slope_max,
            fhat=self.fhat(),
            nonfinite=S.n_nonfinite,
            history_x=S.X[:n].copy(),
            history_f=S.F[:n].copy(),
            history_kind=S.kind[:n].copy(),
            kind_names=KIND_NAMES,
        )
        return res


class _SampleView:
    """The engine's samples under the names ``_Run``'s Python steps read (polish, branch,
    gradients, the result)."""

    def __init__(self, st: list[Any]) -> None:
        self.st = st

    X = property(lambda self: self.st[_engine.X_])
    G = property(lambda self: self.st[_engine.G_])
    F = property(lambda self: self.st[_engine.SF_][0])
    kind = property(lambda self: self.st[_engine.KIND_])
    n = property(lambda self: int(self.st[_engine.IST_][_engine.I_N]))
    best = property(lambda self: int(self.st[_engine.IST_][_engine.I_BEST]))
    n_nonfinite = property(lambda self: int(self.st[_engine.IST_][_engine.I_NONFIN]))
    f_best = property(lambda self: float(self.st[_engine.FS_][_engine.F_FBEST]))
    slope_max = property(lambda self: float(self.st[_engine.FS_][_engine.F_SLOPE]))


class _TreeView:
    def __init__(self, run: _EngineRun) -> None:
        self.run = run

    def lower_bound(self) -> float:
        return float(_engine.lower_bound(self.run.tup))


class _EngineRun(_Run):
    """``_Run`` with the search loop in the compiled engine (``_engine.step``).

    The objective, the polish, the branch steps and the callback stay in Python: the engine
    returns to :meth:`solve` for each of them and their bookkeeping goes through the engine's
    compiled primitives, so both paths take the same decisions.
    """

    def __init__(self, **kw: Any) -> None:
        # The properties below write into the engine's arrays: they must exist first.
        self.st = _engine.new_state(kw["lb"].size, kw["lb"], kw["ub"])
        self.tup = tuple(self.st)
        super().__init__(**kw)
        self.rng = kw["rng"]
        E, fs, ist = _engine, self.st[_engine.FS_], self.st[_engine.IST_]
        fs[E.F_FBEST] = math.inf
        fs[E.F_PMIN] = math.inf
        fs[E.F_TOL], fs[E.F_RHO], fs[E.F_SAFETY] = self.tol, self.rho, self.safety
        fs[E.F_FLOWER] = math.nan if self.f_lower is None else self.f_lower
        fs[E.F_KNOWNL] = math.nan if self.known_L is None else self.known_L
        fs[E.F_DIAG] = self.diag
        fs[E.F_MAXITER] = self.maxiter
        fs[E.F_FTARGET] = math.nan if self.f_target is None else self.f_target
        ist[E.I_BEST] = -1
        ist[E.I_MAXFEV] = self.maxfev
        ist[E.I_M] = 1  # the index starts as one empty leaf (node 0)
        ist[E.I_NN] = 1
        ist[E.I_FN] = 1  # the query tree starts as one empty leaf
        ist[E.I_HASL] = self.known_L is not None
        ist[E.I_STRAT] = 0 if self.strategy == "hull" else 1
        ist[E.I_AFTER] = self.do_polish or self.do_branch
        ist[E.I_CALLBACK] = self.callback is not None
        ist[E.I_WANT] = self.do_branch
        self.S = _SampleView(self.st)  # type: ignore[assignment]
        self.T = _TreeView(self)  # type: ignore[assignment]

    L = property(
        lambda self: float(self.st[_engine.FS_][_engine.F_L]),
        lambda self, v: self.st[_engine.FS_].__setitem__(_engine.F_L, v),
    )
    nfev = property(
        lambda self: int(self.st[_engine.IST_][_engine.I_NFEV]),
        lambda self, v: self.st[_engine.IST_].__setitem__(_engine.I_NFEV, v),
    )
    nit = property(
        lambda self: int(self.st[_engine.IST_][_engine.I_NIT]),
        lambda self, v: self.st[_engine.IST_].__setitem__(_engine.I_NIT, v),
    )

    def _ensure(self) -> None:
        if not _engine.capacity_ok(self.st):
            _engine.grow(self.st, _engine.keys_needed(self.st), self.rng)
            self.tup = tuple(self.st)

    def _record(self, x: FloatArray, f: float, g: FloatArray | None, kind: int) -> int:
        # The engine's arrays hold the samples (and update L) instead of _Samples.
        self._ensure()
        W = self.st[_engine.W_]
        W[_engine.W_XQ] = x
        if g is not None:
            W[_engine.W_GQ] = g
        return int(_engine.add_sample(self.tup, f, g is not None, kind))

    def _update_L(self) -> None:  # the engine updates L with every sample
        pass

    def _insert(self, i: int) -> None:
        self._ensure()
        _engine.insert_term(self.tup, i)

    def fhat(self) -> float:
        return float(_engine.fhat(self.tup))

    def pruned_point(self, y: FloatArray) -> bool:
        thr = self._prune_level()
        return float(_engine.lower_above(self.tup, np.ascontiguousarray(y), thr)) > thr

    def solve(self) -> OptimizeResult:
        E, st = _engine, self.st
        ist = st[E.IST_]
        branch_queue: list[tuple[int, int]] = []
        status = -1
        f, has_g = 0.0, False
        step = E.step
        self._ensure()  # the first keys
        W = st[E.W_]  # grow() keeps W, so W and its rows stay valid for the whole run
        # Without jac a centre's evaluation is a plain call of func (what _call does then).
        plain = self.jac is None
        func, args, xq, EV_EVAL = self.func, self.args, W[E.W_XQ], E.EV_EVAL
        try:
            while True:
                ev = step(self.tup, f, has_g)
                if ev == EV_EVAL and plain:
                    out = func(xq.copy(), *args)
                    f = out if type(out) is float else _as_scalar(out)
                    continue
                if ev == E.EV_EVAL:
                    f, g = self._call(W[E.W_XQ].copy(), bool(ist[E.I_WANT]))
                    has_g = g is not None
                    if has_g:
                        W[E.W_GQ] = g
                elif ev == E.EV_STOP:
                    status = int(ist[E.I_STATUS])
                    break
                elif ev == E.EV_GROW:
                    E.grow(st, E.keys_needed(st), self.rng)  # W keeps its size
                    self.tup = tuple(st)
                elif ev == E.EV_AFTER:
                    self._after_sample(int(ist[E.I_EVIDX]), branch_queue, 0)
                    ist[E.I_BQ] = bool(branch_queue)
                elif ev == E.EV_BRANCH:
                    i, depth = branch_queue.pop()
                    self._branch(i, depth, branch_queue)
                    ist[E.I_BQ] = bool(branch_queue)
                    self.nit += 1
                    if self._call_back():
                        status = 4
                        break
                elif ev == E.EV_ITER:
                    if self._call_back():
                        status = 4
                        break
                elif ev == E.EV_PART:
                    # Ties among the best values: np.argpartition chooses, as in _Samples.
                    m, k0 = int(ist[E.I_NPART]), int(ist[E.I_K0])
                    bound, terms, tv = _terms_of(st[E.CAND_][:m].copy(), st[E.VALS_][:, :m].copy())
                    st[E.TF_][E.TF_BOUND, k0 : k0 + 3] = bound
                    st[E.TTERMS_][k0 : k0 + 3] = terms
                    if tv is not None:
                        st[E.TVAL_][k0 : k0 + 3] = tv
                        st[E.TF_][E.TF_TVL, k0 : k0 + 3] = self.L
        except _Stop as stop:
            status = stop.status
        if self.S.n_nonfinite == self.S.n:
            status = 6
        return self._result(status)
