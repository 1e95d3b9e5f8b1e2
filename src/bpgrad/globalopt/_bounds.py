"""Validation of ``bounds`` for :func:`bpgrad.globalopt.minimize` (pairs or ``Bounds``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["parse_bounds"]


def parse_bounds(bounds: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Return ``(lb, ub)`` as float arrays from a sequence of pairs or a ``Bounds``-like object.

    A ``Bounds``-like object is anything with ``lb`` and ``ub`` attributes (duck typing, so scipy
    is not required). Every bound must be finite and ``lb < ub`` in every coordinate.

    Raises:
        TypeError: if ``bounds`` is neither pairs nor has ``lb``/``ub``.
        ValueError: with a sentence naming the offending coordinate otherwise.
    """
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):
        try:
            lb = np.atleast_1d(np.asarray(bounds.lb, dtype=np.float64)).copy()
            ub = np.atleast_1d(np.asarray(bounds.ub, dtype=np.float64)).copy()
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"bounds.lb and bounds.ub must be numbers or arrays of numbers ({exc})."
            ) from exc
        if lb.ndim != 1 or ub.ndim != 1:
            raise ValueError("bounds.lb and bounds.ub must be scalars or 1-D arrays.")
        if lb.shape != ub.shape:
            if lb.size == 1:
                lb = np.full(ub.shape, lb[0])
            elif ub.size == 1:
                ub = np.full(lb.shape, ub[0])
            else:
                raise ValueError(
                    f"bounds.lb has {lb.size} entries but bounds.ub has {ub.size}: give one "
                    "lower and one upper bound per coordinate."
                )
    else:
        if isinstance(bounds, (str, bytes)):
            raise TypeError("bounds must be a sequence of (low, high) pairs or a Bounds object.")
        try:
            arr = np.asarray(bounds, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                "bounds must be a sequence of (low, high) pairs of numbers, e.g. "
                f"[(-5, 10), (0, 15)] ({exc})."
            ) from exc
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(
                f"bounds must have shape (n, 2), one (low, high) pair per coordinate; got shape "
                f"{arr.shape}. For one variable write [(low, high)]."
            )
        lb, ub = arr[:, 0].copy(), arr[:, 1].copy()
    if lb.size == 0:
        raise ValueError("bounds is empty: give at least one (low, high) pair.")
    for i in range(lb.size):
        if not (np.isfinite(lb[i]) and np.isfinite(ub[i])):
            raise ValueError(
                f"bounds for coordinate {i} are ({lb[i]}, {ub[i]}): both ends must be finite; "
                "bpgrad.minimize searches a bounded box."
            )
        if not lb[i] < ub[i]:
            raise ValueError(
                f"bounds for coordinate {i} are ({lb[i]}, {ub[i]}): the lower bound must be "
                "strictly below the upper bound."
            )
    return lb, ub
