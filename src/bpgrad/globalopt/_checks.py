"""Checks of :func:`bpgrad.globalopt.minimize`'s arguments (bounds, counts, L) and of the values
``func`` returns; each failure says what was wrong and what to pass instead."""

from __future__ import annotations

import decimal
import math
import numbers
from collections.abc import Callable
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "as_gradient", "as_value", "check_callable", "lipschitz_arg", "parse_bounds", "positive_int",
    "real_arg", "seed_arg",
]  # fmt: skip

# Shortest and longest side accepted: the search squares distances down to 1e-13 of a side
# (cells are divided to 1e-12 of the box, the polish steps to 1e-13 of its diagonal), and those
# squares must neither underflow nor overflow in float64.
MIN_SIDE, MAX_SIDE = 1e-100, 1e100


def parse_bounds(bounds: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Return ``(lb, ub)`` as float arrays from a sequence of pairs or a ``Bounds``-like object.

    A ``Bounds``-like object is anything with ``lb`` and ``ub`` attributes (duck typing, so scipy
    is not required); a generator of pairs is read once. Every bound must be finite, ``lb < ub``
    in every coordinate, and each side ``ub - lb`` between ``MIN_SIDE`` and ``MAX_SIDE``.

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
        if hasattr(bounds, "__iter__") and not hasattr(bounds, "__len__"):
            bounds = list(bounds)  # a generator of pairs
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
        side = float(ub[i]) - float(lb[i])  # Python floats: inf without a NumPy warning
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(
                f"bounds for coordinate {i} are ({lb[i]}, {ub[i]}), a side of {side:.3g}: each "
                f"side must be between {MIN_SIDE:g} and {MAX_SIDE:g} long (the search's squared "
                "distances would underflow or overflow). Rescale the variable: minimize "
                "func(s * y) over y in the bounds divided by s."
            )
    return lb, ub


def real_arg(name: str, value: Any, valid: Callable[[float], bool], requirement: str) -> float:
    """``value`` as a float if it is a real number (also a NumPy scalar or a one-element array
    or tensor) that passes ``valid``; else TypeError or ValueError naming ``name``."""
    try:
        if isinstance(value, (str, bytes, bool, np.bool_)):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be {requirement}, got {value!r} of type {type(value).__name__}."
        ) from None
    if not valid(number):
        raise ValueError(f"{name} must be {requirement}, got {number}.")
    return number


def lipschitz_arg(value: Any) -> float | None:
    """``lipschitz``: a finite positive number, or ``None`` / ``"auto"`` (estimate it)."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return None
    return real_arg(
        "lipschitz", value, lambda v: 0 < v < math.inf,
        "a finite number > 0, or None or 'auto' to estimate L from the data",
    )  # fmt: skip


def _short_repr(value: Any) -> str:
    """repr(value), cut to 80 characters: error messages name the value, not a whole array."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _untensor(value: Any) -> Any:
    """A torch tensor (possibly requiring grad) as a NumPy array; anything else unchanged."""
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


def as_value(value: Any) -> float:
    """``func``'s value as a float, or TypeError naming what came back."""
    if type(value) is float:
        return value
    if isinstance(value, (numbers.Real, decimal.Decimal, np.integer, np.floating)) and not (
        isinstance(value, (bool, np.bool_))
    ):
        try:
            return float(value)
        except OverflowError:  # an int beyond float64: the value a float overflows to
            return math.inf if cast(int, value) > 0 else -math.inf
    arr = None
    value = _untensor(value)
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        arr = np.asarray(value)
    if arr is not None and arr.dtype.kind in "iuf" and arr.size == 1:
        return float(arr.reshape(-1)[0])
    hint = ""
    if value is None:
        hint = " (does func end without a return statement?)"
    elif arr is not None and arr.size != 1:
        hint = (
            f" (an array of shape {arr.shape}: return one number; with jac=True return "
            "(value, gradient))"
        )
    raise TypeError(
        f"func must return a real number, got {_short_repr(value)} of type "
        f"{type(value).__name__}{hint}."
    )


def as_gradient(value: Any, d: int) -> NDArray[np.float64]:
    """A gradient from ``jac`` as a float array of d entries, or an error naming what came
    back."""
    value = _untensor(value)
    try:
        if value is None:
            raise TypeError
        g = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        hint = " (does it end without a return statement?)" if value is None else ""
        raise TypeError(
            f"the gradient must be {d} real numbers, got {_short_repr(value)} of type "
            f"{type(value).__name__}{hint}."
        ) from None
    if g.size != d:
        raise ValueError(
            f"the gradient has {g.size} entries but x has {d}: jac must return one partial "
            "derivative per coordinate."
        )
    return g


def seed_arg(seed: Any) -> int:
    """``seed`` as the search's 64-bit integer: ``None`` is 0; an int is taken modulo 2**64; a
    NumPy ``Generator``, ``BitGenerator`` or ``SeedSequence`` gives one drawn integer."""
    if seed is None:
        return 0
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        return int(seed) & (2**64 - 1)
    try:
        return int(np.random.default_rng(seed).integers(2**63))
    except (TypeError, ValueError):
        raise TypeError(
            f"seed must be None, an int, or a numpy Generator, BitGenerator or SeedSequence, "
            f"got {seed!r} of type {type(seed).__name__}."
        ) from None


def check_callable(name: str, obj: Any) -> None:
    if not callable(obj):
        raise TypeError(f"{name} must be callable, got {type(obj).__name__}.")


def positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}.")
    if value < 0 or (value == 0 and not allow_zero):
        need = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {need} integer, got {value}.")
    return int(value)
