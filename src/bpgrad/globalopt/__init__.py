"""``bpgrad.globalopt``: BPGrad's Algorithm 1 as a scipy-shaped bounded global minimizer.

>>> from bpgrad.globalopt import minimize
>>> res = minimize(lambda x: float((x[0] - 0.3) ** 2), [(-1.0, 2.0)], lipschitz=6.0)
>>> bool(abs(res.x[0] - 0.3) < 1e-3) and res.lower_bound <= res.fun
True

The search is compiled with numba (the ``globalopt`` extra); scipy is optional
(``scipy.optimize.Bounds`` is accepted by duck typing) and matplotlib is imported lazily by
:mod:`bpgrad.globalopt.plot`.
"""

from __future__ import annotations

from bpgrad.globalopt._core import KIND_NAMES, minimize
from bpgrad.globalopt._result import STATUS_MESSAGES, SUCCESS_STATUSES, OptimizeResult, Status

__all__ = [
    "KIND_NAMES",
    "STATUS_MESSAGES",
    "SUCCESS_STATUSES",
    "OptimizeResult",
    "Status",
    "minimize",
]
