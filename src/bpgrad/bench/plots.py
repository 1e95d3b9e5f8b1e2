"""Figures for the report. The only module of bpgrad that imports matplotlib.

Every function takes :class:`~bpgrad.bench.analysis.Curve` lists and returns a Figure; saving is
:func:`save_figure` (PNG and SVG). The Agg backend is forced so that plotting works headless.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

# The backend is chosen before pyplot is imported.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bpgrad.bench.analysis import Curve


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(arr) < window:
        return arr
    # Moving average over a trailing window; the first points average what exists so far.
    finite = np.where(np.isfinite(arr), arr, 0.0)
    weights = np.isfinite(arr).astype(np.float64)
    csum, cw = np.cumsum(finite), np.cumsum(weights)
    out = np.empty_like(arr)
    for i in range(len(arr)):
        lo = i - window
        s = csum[i] - (csum[lo] if lo >= 0 else 0.0)
        w = cw[i] - (cw[lo] if lo >= 0 else 0.0)
        out[i] = s / w if w else np.nan
    return out


def _draw(ax: plt.Axes, curves: Sequence[Curve], *, smooth: int = 1, marker: str = "") -> None:
    for curve in curves:
        x = np.asarray(curve.x)
        mean = _smooth(curve.mean, smooth)
        std = _smooth(curve.std, smooth)
        label = curve.label + (f" (n={curve.n_seeds})" if curve.n_seeds > 1 else "")
        (line,) = ax.plot(x, mean, label=label, linewidth=1.4, marker=marker, markersize=3)
        if curve.n_seeds > 1:
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2,
                            linewidth=0)


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, plt.Axes]:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def train_loss_figure(curves: Sequence[Curve], *, title: str = "training loss",
                      log_y: bool = True) -> Figure:
    """Minibatch training loss against step (moving average, band = ± std over seeds)."""
    fig, ax = _figure(title, "step", "training loss (minibatch, moving average)")
    longest = max((len(c.x) for c in curves), default=0)
    _draw(ax, curves, smooth=max(1, longest // 50))
    if log_y and all(v > 0 for c in curves for v in c.mean if np.isfinite(v)):
        ax.set_yscale("log")
    if curves:
        ax.legend(fontsize="small")
    return fig


def test_error_figure(curves: Sequence[Curve], *, title: str = "test error",
                      ylabel: str = "test error (1 - accuracy)", xlabel: str = "epoch") -> Figure:
    """Test error (or test loss) per evaluation, band = ± std over seeds; epoch/step 0 is the
    init. ``xlabel`` ``"step"`` for evaluations inside epochs (markers only while sparse)."""
    fig, ax = _figure(title, xlabel, ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    longest = max((len(c.x) for c in curves), default=0)
    _draw(ax, curves, marker="o" if longest <= 40 else "")
    if curves:
        ax.legend(fontsize="small")
    return fig


def eta_figure(curves: Sequence[Curve], *, title: str = "BPGrad step size eta_t") -> Figure:
    """The adaptive step size against step (log scale)."""
    fig, ax = _figure(title, "step", "eta_t")
    _draw(ax, curves)
    if curves and all(v > 0 for c in curves for v in c.mean if np.isfinite(v)):
        ax.set_yscale("log")
    if curves:
        ax.legend(fontsize="small")
    return fig


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg``; returns both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=120)
    # SVG ids and dates made deterministic so reruns on the same data give the same file.
    fig.savefig(paths[1], metadata={"Date": None})
    return paths
