"""Picture of a 2-D :func:`bpgrad.globalopt.minimize` run (matplotlib imported lazily here)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bpgrad.globalopt._checks import parse_bounds
from bpgrad.globalopt._result import OptimizeResult

__all__ = ["plot_run"]

_COLORS = {"global": "tab:blue", "branch": "tab:orange", "polish": "tab:green", "fd": "tab:gray"}


def plot_run(
    func: Callable[..., Any],
    bounds: Any,
    res: OptimizeResult,
    *,
    args: tuple[Any, ...] = (),
    path: str | Path | None = None,
    grid: int = 120,
    max_balls: int = 400,
) -> Any:
    """Contours of ``func``, the samples in order, the pruning balls and the best point.

    The balls are drawn with the run's final pruning level ``res.fhat`` and constant
    ``res.lipschitz``: radius ``(f_i - fhat) / L`` (the ``max_balls`` largest). Sample colour says
    why it was taken (global re-sampling, BPGrad branch, local polish, finite difference); a
    thin line joins samples in evaluation order. Needs matplotlib (``pip install
    bpgrad[globalopt]``). Returns the matplotlib Figure and writes it to ``path`` (PNG, SVG, ...,
    by suffix) when given.
    """
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.collections import PatchCollection
        from matplotlib.patches import Circle
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'bpgrad[globalopt]'.") from exc
    lb, ub = parse_bounds(bounds)
    if lb.size != 2:
        raise ValueError(f"plot_run draws 2-D problems only; these bounds have {lb.size} dims.")
    gx = np.linspace(lb[0], ub[0], grid)
    gy = np.linspace(lb[1], ub[1], grid)
    Z = np.array([[float(func(np.array([a, b]), *args)) for a in gx] for b in gy])
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    finite = Z[np.isfinite(Z)]
    levels = np.quantile(finite, np.linspace(0, 1, 25)) if finite.size else 10
    cs = ax.contourf(gx, gy, Z, levels=np.unique(levels), cmap="viridis", alpha=0.85)
    fig.colorbar(cs, ax=ax, shrink=0.85)
    X, F = np.asarray(res.history_x), np.asarray(res.history_f)
    kinds = np.asarray(res.history_kind)
    names = res.kind_names
    L, fhat = float(res.lipschitz), float(res.fhat)
    ok = np.isfinite(F)
    radii = np.where(ok, (F - fhat) / L, 0.0)
    order = np.argsort(-radii)[:max_balls]
    balls = [Circle((X[i, 0], X[i, 1]), radii[i]) for i in order if radii[i] > 0]
    ax.add_collection(
        PatchCollection(balls, facecolor="white", edgecolor="white", alpha=0.12, lw=0.4)
    )
    ax.plot(X[:, 0], X[:, 1], "-", color="white", lw=0.3, alpha=0.5)
    for code, name in enumerate(names):
        sel = kinds == code
        if sel.any():
            ax.scatter(
                X[sel, 0], X[sel, 1], s=7, color=_COLORS.get(name, "k"), label=name, zorder=3
            )
    ax.scatter(
        [res.x[0]],
        [res.x[1]],
        marker="*",
        s=220,
        color="red",
        edgecolor="k",
        zorder=4,
        label=f"best f={res.fun:.6g}",
    )
    ax.set_xlim(lb[0], ub[0])
    ax.set_ylim(lb[1], ub[1])
    ax.set_aspect("equal" if 0.2 < (ub[1] - lb[1]) / (ub[0] - lb[0]) < 5 else "auto")
    cert = "certified" if res.certified else "not certified"
    ax.set_title(
        f"bpgrad.minimize: {res.nfev} evaluations, lower bound {res.lower_bound:.4g} ({cert})",
        fontsize=9,
    )
    ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
