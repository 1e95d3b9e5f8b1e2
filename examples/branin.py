"""The Branin function (three global minima, f* = 0.397887), for `bpgrad minimize` from the README."""

import math

import numpy as np


def branin(x: np.ndarray) -> float:
    """Branin-Hoo on [-5, 10] x [0, 15]."""
    x1, x2 = float(x[0]), float(x[1])
    b, c = 5.1 / (4 * math.pi**2), 5 / math.pi
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10
