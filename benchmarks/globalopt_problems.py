"""Test functions for ``benchmarks/globalopt.py``: 25 standard problems in 1-6 dimensions.

Each function is written once against an array namespace ``xp`` (``numpy`` or ``torch``) so the
value path stays NumPy-fast and gradients come from torch autograd. Definitions, domains and
minima follow the standard surveys (Jamil & Yang 2013; Surjanovic & Bingham's Virtual Library of
Simulation Experiments; Dixon & Szegő 1978). The listed f* is refined at set-up (see
``globalopt.py``), because some published values are rounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Problem:
    name: str
    fn: Callable[[Any, Any], Any]  # fn(x, xp) -> scalar
    lb: tuple[float, ...]
    ub: tuple[float, ...]
    xstar: tuple[float, ...]
    fstar: float

    @property
    def dim(self) -> int:
        return len(self.lb)


def forrester(x: Any, xp: Any) -> Any:
    return xp.sum((6 * x - 2) ** 2 * xp.sin(12 * x - 4))


def gramacy_lee(x: Any, xp: Any) -> Any:
    return xp.sum(xp.sin(10 * math.pi * x) / (2 * x) + (x - 1) ** 4)


def problem02(x: Any, xp: Any) -> Any:
    return xp.sum(xp.sin(x) + xp.sin(10 * x / 3))


def branin(x: Any, xp: Any) -> Any:
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (x[1] - b * x[0] ** 2 + c * x[0] - 6) ** 2 + 10 * (1 - t) * xp.cos(x[0]) + 10


def six_hump(x: Any, xp: Any) -> Any:
    a, b = x[0], x[1]
    return (4 - 2.1 * a**2 + a**4 / 3) * a**2 + a * b + (-4 + 4 * b**2) * b**2


def goldstein_price(x: Any, xp: Any) -> Any:
    a, b = x[0], x[1]
    t1 = 1 + (a + b + 1) ** 2 * (19 - 14 * a + 3 * a**2 - 14 * b + 6 * a * b + 3 * b**2)
    t2 = 30 + (2 * a - 3 * b) ** 2 * (18 - 32 * a + 12 * a**2 + 48 * b - 36 * a * b + 27 * b**2)
    return t1 * t2


def rastrigin(x: Any, xp: Any) -> Any:
    return 10 * x.shape[0] + xp.sum(x**2 - 10 * xp.cos(2 * math.pi * x))


def ackley(x: Any, xp: Any) -> Any:
    d = x.shape[0]
    r = xp.sqrt(xp.sum(x**2) / d + 1e-300)
    return -20 * xp.exp(-0.2 * r) - xp.exp(xp.sum(xp.cos(2 * math.pi * x)) / d) + 20 + math.e


def rosenbrock(x: Any, xp: Any) -> Any:
    return xp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)


def griewank(x: Any, xp: Any) -> Any:
    i = xp.sqrt(xp.arange(1, x.shape[0] + 1, dtype=x.dtype))
    return xp.sum(x**2) / 4000 - xp.prod(xp.cos(x / i)) + 1


def levy(x: Any, xp: Any) -> Any:
    w = 1 + (x - 1) / 4
    head = xp.sin(math.pi * w[0]) ** 2
    mid = xp.sum((w[:-1] - 1) ** 2 * (1 + 10 * xp.sin(math.pi * w[:-1] + 1) ** 2))
    tail = (w[-1] - 1) ** 2 * (1 + xp.sin(2 * math.pi * w[-1]) ** 2)
    return head + mid + tail


def michalewicz(x: Any, xp: Any) -> Any:
    i = xp.arange(1, x.shape[0] + 1, dtype=x.dtype)
    return -xp.sum(xp.sin(x) * xp.sin(i * x**2 / math.pi) ** 20)


def styblinski_tang(x: Any, xp: Any) -> Any:
    return 0.5 * xp.sum(x**4 - 16 * x**2 + 5 * x)


def shubert(x: Any, xp: Any) -> Any:
    out = 1.0
    for k in range(x.shape[0]):
        out = out * sum(j * xp.cos((j + 1) * x[k] + j) for j in range(1, 6))
    return out


def holder_table(x: Any, xp: Any) -> Any:
    r = xp.sqrt(x[0] ** 2 + x[1] ** 2)
    return -xp.abs(xp.sin(x[0]) * xp.cos(x[1]) * xp.exp(xp.abs(1 - r / math.pi)))


def drop_wave(x: Any, xp: Any) -> Any:
    r2 = x[0] ** 2 + x[1] ** 2
    return -(1 + xp.cos(12 * xp.sqrt(r2 + 1e-300))) / (0.5 * r2 + 2)


def beale(x: Any, xp: Any) -> Any:
    a, b = x[0], x[1]
    return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2


_H3_A = np.array([[3.0, 10, 30], [0.1, 10, 35], [3.0, 10, 30], [0.1, 10, 35]])
_H3_P = 1e-4 * np.array(
    [[3689, 1170, 2673], [4699, 4387, 7470], [1091, 8732, 5547], [381, 5743, 8828]]
)
_H6_A = np.array(
    [
        [10, 3, 17, 3.5, 1.7, 8],
        [0.05, 10, 17, 0.1, 8, 14],
        [3, 3.5, 1.7, 10, 17, 8],
        [17, 8, 0.05, 10, 0.1, 14],
    ]
)
_H6_P = 1e-4 * np.array(
    [
        [1312, 1696, 5569, 124, 8283, 5886],
        [2329, 4135, 8307, 3736, 1004, 9991],
        [2348, 1451, 3522, 2883, 3047, 6650],
        [4047, 8828, 8732, 5743, 1091, 381],
    ]
)
_H_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
_SHEKEL_C = np.array([1, 2, 2, 4, 4, 6, 3, 7, 5, 5], dtype=float) / 10
_SHEKEL_A = np.array(
    [
        [4, 4, 4, 4],
        [1, 1, 1, 1],
        [8, 8, 8, 8],
        [6, 6, 6, 6],
        [3, 7, 3, 7],
        [2, 9, 2, 9],
        [5, 5, 3, 3],
        [8, 1, 8, 1],
        [6, 2, 6, 2],
        [7, 3.6, 7, 3.6],
    ],
    dtype=float,
)


def _const(xp: Any, arr: np.ndarray, like: Any) -> Any:
    if xp is np:
        return arr
    return xp.as_tensor(arr, dtype=like.dtype)


def _hartmann(A: np.ndarray, P: np.ndarray) -> Callable[[Any, Any], Any]:
    def f(x: Any, xp: Any) -> Any:
        a, p, al = _const(xp, A, x), _const(xp, P, x), _const(xp, _H_ALPHA, x)
        return -xp.sum(al * xp.exp(-xp.sum(a * (x - p) ** 2, 1)))

    return f


def _shekel(m: int) -> Callable[[Any, Any], Any]:
    def f(x: Any, xp: Any) -> Any:
        a, c = _const(xp, _SHEKEL_A[:m], x), _const(xp, _SHEKEL_C[:m], x)
        return -xp.sum(1 / (xp.sum((x - a) ** 2, 1) + c))

    return f


def colville(x: Any, xp: Any) -> Any:
    a, b, c, d = x[0], x[1], x[2], x[3]
    return (
        100 * (a**2 - b) ** 2
        + (a - 1) ** 2
        + (c - 1) ** 2
        + 90 * (c**2 - d) ** 2
        + 10.1 * ((b - 1) ** 2 + (d - 1) ** 2)
        + 19.8 * (b - 1) * (d - 1)
    )


def trid(x: Any, xp: Any) -> Any:
    return xp.sum((x - 1) ** 2) - xp.sum(x[1:] * x[:-1])


def _box(lo: float, hi: float, d: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (lo,) * d, (hi,) * d


def problems() -> list[Problem]:
    """The suite, in a fixed order."""
    P = Problem
    out = [
        P("Forrester", forrester, (0.0,), (1.0,), (0.757248757841856,), -6.020740055767083),
        P("GramacyLee", gramacy_lee, (0.5,), (2.5,), (0.548563444114526,), -0.869011134989500),
        P("Problem02", problem02, (2.7,), (7.5,), (5.145735285687302,), -1.899599349152113),
        P("Branin", branin, (-5.0, 0.0), (10.0, 15.0), (math.pi, 2.275), 0.397887357729739),
        P(
            "SixHumpCamel",
            six_hump,
            (-3.0, -2.0),
            (3.0, 2.0),
            (0.0898420131003, -0.7126564030207),
            -1.031628453489877,
        ),
        P("GoldsteinPrice", goldstein_price, *_box(-2, 2, 2), (0.0, -1.0), 3.0),
        P("Rastrigin2", rastrigin, *_box(-5.12, 5.12, 2), (0.0, 0.0), 0.0),
        P("Ackley2", ackley, *_box(-32.768, 32.768, 2), (0.0, 0.0), 0.0),
        P("Rosenbrock2", rosenbrock, *_box(-5, 10, 2), (1.0, 1.0), 0.0),
        P("Griewank2", griewank, *_box(-600, 600, 2), (0.0, 0.0), 0.0),
        P("Levy2", levy, *_box(-10, 10, 2), (1.0, 1.0), 0.0),
        P(
            "Michalewicz2",
            michalewicz,
            *_box(0, math.pi, 2),
            (2.202905520, 1.570796327),
            -1.8013034100985537,
        ),
        P(
            "StyblinskiTang2",
            styblinski_tang,
            *_box(-5, 5, 2),
            (-2.903534018185960,) * 2,
            -78.33233140754282,
        ),
        P("Shubert2", shubert, *_box(-10, 10, 2), (-7.083506407, 4.858056878), -186.7309088310239),
        P(
            "HolderTable",
            holder_table,
            *_box(-10, 10, 2),
            (8.05502347573655, 9.66459002642503),
            -19.208502567886743,
        ),
        P("DropWave", drop_wave, *_box(-5.12, 5.12, 2), (0.0, 0.0), -1.0),
        P("Beale", beale, *_box(-4.5, 4.5, 2), (3.0, 0.5), 0.0),
        P(
            "Hartmann3",
            _hartmann(_H3_A, _H3_P),
            *_box(0, 1, 3),
            (0.114614, 0.555649, 0.852547),
            -3.86278214782076,
        ),
        P("Ackley3", ackley, *_box(-32.768, 32.768, 3), (0.0,) * 3, 0.0),
        P(
            "Shekel5",
            _shekel(5),
            *_box(0, 10, 4),
            (4.00003715, 4.00013327, 4.00003715, 4.00013327),
            -10.1531996790582,
        ),
        P(
            "Shekel7",
            _shekel(7),
            *_box(0, 10, 4),
            (4.00057291, 4.00068966, 3.99948971, 3.99960641),
            -10.4029405668187,
        ),
        P(
            "Shekel10",
            _shekel(10),
            *_box(0, 10, 4),
            (4.00074671, 4.00059300, 3.99966277, 3.99950975),
            -10.5364098166920,
        ),
        P("Colville", colville, *_box(-10, 10, 4), (1.0,) * 4, 0.0),
        P("Rosenbrock4", rosenbrock, *_box(-5, 10, 4), (1.0,) * 4, 0.0),
        P(
            "Hartmann6",
            _hartmann(_H6_A, _H6_P),
            *_box(0, 1, 6),
            (0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573),
            -3.32236801141551,
        ),
        P("Trid6", trid, *_box(-36, 36, 6), (6.0, 10.0, 12.0, 12.0, 10.0, 6.0), -50.0),
    ]
    return out
