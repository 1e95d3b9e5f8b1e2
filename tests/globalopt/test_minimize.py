"""Tests for bpgrad.globalopt.minimize (scipy's test_direct is the model)."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from bpgrad.globalopt import STATUS_MESSAGES, OptimizeResult, Status, minimize


def branin(x: np.ndarray) -> float:
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return float((x[1] - b * x[0] ** 2 + c * x[0] - 6) ** 2 + 10 * (1 - t) * math.cos(x[0]) + 10)


BRANIN_BOUNDS = [(-4.0, 10.0), (0.5, 15.0)]
BRANIN_MIN = 0.397887357729739


def sphere_shift(x: np.ndarray) -> float:
    return float(np.sum((x - 0.3) ** 2))


def sphere_grad(x: np.ndarray) -> np.ndarray:
    return 2 * (x - 0.3)


def problem02(x: np.ndarray) -> float:
    return float(np.sin(x[0]) + np.sin(10 * x[0] / 3))


class Counter:
    def __init__(self, f: Any) -> None:
        self.f, self.n = f, 0

    def __call__(self, x: np.ndarray) -> Any:
        self.n += 1
        return self.f(x)


def test_finds_branin_global_minimum_inside_bounds() -> None:
    res = minimize(branin, BRANIN_BOUNDS, maxfev=400)
    assert isinstance(res, OptimizeResult)
    assert res.fun == pytest.approx(BRANIN_MIN, abs=1e-6)
    lb, ub = np.array(BRANIN_BOUNDS).T
    assert np.all(res.x >= lb) and np.all(res.x <= ub)
    for key in ("x", "fun", "nfev", "njev", "nit", "status", "success", "message"):
        assert key in res
    assert res.message.startswith(STATUS_MESSAGES[res.status])


def test_1d_with_known_lipschitz_is_certified_and_reaches_gap() -> None:
    # |f'| <= 1 + 10/3 on the whole line.
    res = minimize(problem02, [(2.7, 7.5)], lipschitz=13 / 3, tol=1e-5, maxfev=5000)
    assert res.status == 0 and res.success and res.certified
    assert res.fun == pytest.approx(-1.899599349152113, abs=1e-5)
    assert res.lower_bound <= -1.899599349152113 + 1e-12
    assert res.gap <= 1e-5


@pytest.mark.parametrize("strategy", ["balanced", "hull", "bound"])
def test_lower_bound_never_above_true_minimum(strategy: str) -> None:
    # Branin's gradient norm on this box is below 190 (checked on a dense grid).
    seen: list[float] = []
    res = minimize(
        branin,
        BRANIN_BOUNDS,
        lipschitz=190.0,
        maxfev=600,
        strategy=strategy,
        callback=lambda r: seen.append(r.lower_bound),
    )
    assert res.certified
    assert res.lower_bound <= BRANIN_MIN
    assert max(seen) <= BRANIN_MIN
    assert np.all(np.diff(seen) >= -1e-9) or strategy != "bound"


def test_nfev_equals_counted_calls_and_njev_counts_jac() -> None:
    f = Counter(sphere_shift)
    g = Counter(sphere_grad)
    res = minimize(f, [(-1, 2), (-2, 1)], jac=g, maxfev=150)
    assert res.nfev == f.n
    assert res.njev == g.n > 0
    assert len(res.history_f) == res.nfev


def test_jac_true_returns_value_and_gradient() -> None:
    f = Counter(lambda x: (sphere_shift(x), sphere_grad(x)))
    res = minimize(f, [(-1, 2), (-2, 1)], jac=True, maxfev=100)
    assert res.nfev == f.n and res.njev == 0
    assert np.allclose(res.x, 0.3, atol=1e-5)


def test_without_gradient_finite_differences_are_counted() -> None:
    f = Counter(sphere_shift)
    res = minimize(f, [(-1, 2), (-2, 1)], maxfev=200)
    kinds = list(res.kind_names)
    assert (res.history_kind == kinds.index("fd")).sum() > 0
    assert res.nfev == f.n
    assert np.allclose(res.x, 0.3, atol=1e-4)


def test_status_covered_with_f_lower() -> None:
    # BPGrad's setting: f >= 0 known, rho = 0.5 -> f̂* = 0.5 * f_best.
    res = minimize(
        lambda x: float(1.0 + x[0] ** 2),
        [(-1.0, 2.0)],
        lipschitz=4.0,
        f_lower=0.0,
        rho=0.5,
        maxfev=500,
    )
    assert res.status == 1 and res.success
    assert res.lower_bound >= 0.5 - 1e-9  # the cover certifies f > rho * f_best


def test_status_maxfev_and_maxiter() -> None:
    r = minimize(branin, BRANIN_BOUNDS, maxfev=37)
    assert r.status == 2 and r.nfev == 37 and not r.success
    r = minimize(branin, BRANIN_BOUNDS, maxiter=5, polish=False)
    assert r.status == 3 and r.nit == 5


def test_callback_stops_and_does_not_change_result() -> None:
    base = minimize(branin, BRANIN_BOUNDS, maxfev=300)

    def cb(r: OptimizeResult) -> None:
        r.x[:] = 0.0  # mutating the copy must not matter
        r.fun = -1e9

    again = minimize(branin, BRANIN_BOUNDS, maxfev=300, callback=cb)
    assert np.array_equal(base.x, again.x) and base.fun == again.fun and base.nfev == again.nfev

    calls: list[int] = []

    def stop(r: OptimizeResult) -> bool:
        calls.append(r.nfev)
        return len(calls) >= 3

    r = minimize(branin, BRANIN_BOUNDS, maxfev=300, callback=stop)
    assert r.status == 4 and not r.success and len(calls) == 3

    def raise_stop(r: OptimizeResult) -> None:
        raise StopIteration

    assert minimize(branin, BRANIN_BOUNDS, callback=raise_stop).status == 4


def test_f_target_status() -> None:
    r = minimize(branin, BRANIN_BOUNDS, f_target=0.5)
    assert r.status == 5 and r.success and r.fun <= 0.5


def test_all_nonfinite_status() -> None:
    r = minimize(lambda x: float("nan"), [(0, 1)], maxfev=20)
    assert r.status == 6 and not r.success and math.isnan(r.fun) and r.nonfinite == 20


def test_every_status_code_is_reachable() -> None:
    reached: set[int] = set()
    reached.add(minimize(problem02, [(2.7, 7.5)], lipschitz=13 / 3, tol=1e-4).status)
    reached.add(
        minimize(
            lambda x: float(1 + x[0] ** 2), [(-1, 2)], lipschitz=4.0, f_lower=0.0, rho=0.5
        ).status
    )
    reached.add(minimize(branin, BRANIN_BOUNDS, maxfev=10).status)
    reached.add(minimize(branin, BRANIN_BOUNDS, maxiter=2, polish=False).status)
    reached.add(minimize(branin, BRANIN_BOUNDS, callback=lambda r: True).status)
    reached.add(minimize(branin, BRANIN_BOUNDS, f_target=10.0).status)
    reached.add(minimize(lambda x: math.inf, [(0, 1)], maxfev=5).status)
    assert reached == set(STATUS_MESSAGES)


def test_nan_values_are_skipped_not_fatal() -> None:
    def f(x: np.ndarray) -> float:
        return float("nan") if x[0] > 0.8 else float((x[0] - 0.2) ** 2 + (x[1] - 0.1) ** 2)

    r = minimize(f, [(0, 1), (-1, 1)], maxfev=300)
    assert r.nonfinite > 0 and math.isfinite(r.fun)
    assert np.allclose(r.x, [0.2, 0.1], atol=1e-4)
    assert not r.certified


def test_exceptions_from_func_propagate() -> None:
    class Boom(RuntimeError):
        pass

    def f(x: np.ndarray) -> float:
        raise Boom("inside func")

    with pytest.raises(Boom, match="inside func"):
        minimize(f, [(0, 1)])


def test_bounds_as_pairs_and_as_bounds_object_agree() -> None:
    scipy_optimize = pytest.importorskip("scipy.optimize")
    a = minimize(branin, BRANIN_BOUNDS, maxfev=250)
    lb, ub = np.array(BRANIN_BOUNDS).T
    b = minimize(branin, scipy_optimize.Bounds(lb, ub), maxfev=250)
    assert np.array_equal(a.history_x, b.history_x) and a.fun == b.fun


def test_duck_typed_bounds_without_scipy() -> None:
    class B:
        lb = (-4.0, 0.5)
        ub = (10.0, 15.0)

    a = minimize(branin, BRANIN_BOUNDS, maxfev=100)
    b = minimize(branin, B(), maxfev=100)
    assert np.array_equal(a.history_x, b.history_x)


def test_fixed_seed_is_deterministic() -> None:
    a = minimize(branin, BRANIN_BOUNDS, maxfev=300, seed=3)
    b = minimize(branin, BRANIN_BOUNDS, maxfev=300, seed=3)
    assert np.array_equal(a.history_x, b.history_x) and np.array_equal(a.history_f, b.history_f)


def test_estimated_lipschitz_is_not_certified() -> None:
    r = minimize(branin, BRANIN_BOUNDS, maxfev=200)
    assert r.lipschitz_estimated and not r.certified
    assert r.lipschitz >= r.max_slope


def test_wrong_lipschitz_is_detected() -> None:
    r = minimize(branin, BRANIN_BOUNDS, lipschitz=1.0, maxfev=200)
    assert not r.certified and "exceeds lipschitz" in r.message


def test_branch_steps_are_taken_with_gradients() -> None:
    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        return float(np.sum(np.sin(3 * x) + 0.1 * x**2)), 3 * np.cos(3 * x) + 0.2 * x

    r = minimize(f, [(-3, 4), (-2, 5)], jac=True, maxfev=300)
    assert (r.history_kind == r.kind_names.index("branch")).sum() > 0


def test_result_attribute_access_and_repr() -> None:
    r = OptimizeResult(x=np.zeros(3), fun=1.0)
    assert r.fun == 1.0 and r["x"].shape == (3,)
    r.nit = 2
    assert r["nit"] == 2
    assert "fun" in repr(r)
    with pytest.raises(AttributeError):
        _ = r.missing


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"bounds": [(1, 0)]}, ValueError, "strictly below"),
        ({"bounds": [(0, np.inf)]}, ValueError, "finite"),
        ({"bounds": [(0, 1, 2)]}, ValueError, "shape"),
        ({"bounds": []}, ValueError, "shape|empty"),
        ({"bounds": "abc"}, TypeError, "pairs"),
        ({"lipschitz": -1.0}, ValueError, "lipschitz"),
        ({"lipschitz": math.nan}, ValueError, "lipschitz"),
        ({"rho": 1.0}, ValueError, "rho"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"maxfev": 0}, ValueError, "maxfev"),
        ({"maxfev": 2.5}, TypeError, "maxfev"),
        ({"maxiter": -3}, ValueError, "maxiter"),
        ({"jac": "yes"}, TypeError, "jac"),
        ({"callback": 3}, TypeError, "callback"),
        ({"strategy": "random"}, ValueError, "strategy"),
        ({"lipschitz_safety": 0.5}, ValueError, "lipschitz_safety"),
        ({"f_lower": math.inf}, ValueError, "f_lower"),
        # not numbers at all: the error names the argument (not float()'s own message)
        ({"lipschitz": "fast"}, TypeError, "lipschitz must be a finite number > 0, or None"),
        ({"rho": "0.1"}, TypeError, "rho must be"),
        ({"tol": None}, TypeError, "tol must be"),
        ({"f_target": "low"}, TypeError, "f_target must be"),
        ({"f_lower": [0.0, 1.0]}, TypeError, "f_lower must be"),
        # sides whose squared distances would underflow or overflow: rescale, says the error
        ({"bounds": [(0.0, 1e-300), (0.0, 1.0)]}, ValueError, "side.*Rescale"),
        ({"bounds": [(-1e300, 1e300)]}, ValueError, "side.*Rescale"),
        ({"bounds": [(-1e308, 1e308)]}, ValueError, "side of inf"),
    ],
)
def test_invalid_arguments_raise_clear_errors(
    kwargs: dict[str, Any], exc: type[Exception], pattern: str
) -> None:
    calls = Counter(branin)
    args: dict[str, Any] = {"bounds": BRANIN_BOUNDS, **kwargs}
    bounds = args.pop("bounds")
    with pytest.raises(exc, match=pattern):
        minimize(calls, bounds, **args)
    assert calls.n == 0  # validated before the first evaluation


def test_func_returning_array_or_bad_gradient() -> None:
    with pytest.raises(TypeError, match="real number"):
        minimize(lambda x: np.ones(2), [(0, 1)])
    with pytest.raises(ValueError, match="gradient"):
        minimize(lambda x: (1.0, np.ones(3)), [(0, 1)], jac=True)
    r = minimize(lambda x: np.array([float(x[0] ** 2)]), [(-1, 2)], maxfev=50)
    assert abs(r.x[0]) < 1e-4


def test_lipschitz_auto_is_the_estimate_and_numbers_may_be_numpy_scalars() -> None:
    # "auto" is the optimizer's spelling of "estimate L": the same run as None
    a = minimize(branin, BRANIN_BOUNDS, lipschitz="auto", maxfev=120)
    b = minimize(branin, BRANIN_BOUNDS, lipschitz=None, maxfev=120)
    assert a.lipschitz_estimated and np.array_equal(a.history_x, b.history_x)
    c = minimize(branin, BRANIN_BOUNDS, lipschitz=np.float32(200.0), tol=np.array(1e-3), maxfev=80)
    assert c.lipschitz == 200.0 and not c.lipschitz_estimated


def test_gradients_and_values_of_other_real_types() -> None:
    # jac forgetting its return: a TypeError that says so, not "the gradient has 1 entries"
    with pytest.raises(TypeError, match="return statement"):
        minimize(branin, BRANIN_BOUNDS, jac=lambda x: None, maxfev=20)
    with pytest.raises(TypeError, match="gradient must be 2 real numbers"):
        minimize(branin, BRANIN_BOUNDS, jac=lambda x: "up", maxfev=20)
    # Fraction and Decimal are real numbers; an int beyond float64 is +inf (counted, never best)
    r = minimize(lambda x: Fraction(int(x[0] > 5), 3), BRANIN_BOUNDS, maxfev=30)
    assert r.fun == 0.0 and r.x[0] <= 5
    r = minimize(lambda x: Decimal(float(x[0]) ** 2), [(-1, 2)], maxfev=40)
    assert abs(r.x[0]) < 1e-3
    r = minimize(lambda x: 10**400 if x[0] > 0 else -(10**400), [(-1, 2)], maxfev=20)
    assert r.nonfinite == 20 and r.status == Status.NONFINITE


def test_seed_and_bounds_in_other_forms() -> None:
    with pytest.raises(TypeError, match="seed must be None, an int"):
        minimize(branin, BRANIN_BOUNDS, seed=1.5)
    a = minimize(branin, (pair for pair in BRANIN_BOUNDS), maxfev=40)  # a generator of pairs
    b = minimize(branin, BRANIN_BOUNDS, maxfev=40)
    assert np.array_equal(a.history_x, b.history_x)
