"""estimate_lipschitz recovers known Lipschitz constants; record_trajectory feeds it."""

from __future__ import annotations

import copy

import pytest
import torch

from bpgrad import estimate_lipschitz
from bpgrad.optim.lipschitz import Trajectory, record_trajectory


def test_linear_function_exactly() -> None:
    # f(x) = a.x + b has L = ||a||: any pair along a attains it, every other pair is below it,
    # and every gradient norm equals it.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, generator=gen, dtype=torch.float64)
    points = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    points[1] = points[0] - 0.3 * a  # one pair along the gradient
    losses = points @ a + 1.5
    grad_norms = torch.full((20,), float(a.norm()), dtype=torch.float64)
    est = estimate_lipschitz(points, losses, grad_norms)
    assert est.value == pytest.approx(float(a.norm()), rel=1e-12)
    assert est.from_secants == pytest.approx(float(a.norm()), rel=1e-9)
    assert est.n_secants == 20 * 19 // 2
    # Secants alone never exceed the true constant.
    assert estimate_lipschitz(points, losses).value <= float(a.norm()) * (1 + 1e-12)


@pytest.mark.parametrize("radius", [0.5, 2.0])
def test_quadratic_on_a_ball(radius: float) -> None:
    # f(x) = |x|^2 / 2 on the ball |x| <= R has L = sup |grad f| = R.
    gen = torch.Generator().manual_seed(1)
    d, n = 5, 400
    directions = torch.randn(n, d, generator=gen, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    radii = radius * torch.rand(n, 1, generator=gen, dtype=torch.float64) ** (1 / d)
    points = directions * radii
    losses = 0.5 * (points**2).sum(dim=1)
    grads = points.norm(dim=1)
    est = estimate_lipschitz(Trajectory(points, losses, grads))
    assert est.value <= radius  # a lower bound from exact observations
    assert est.value >= 0.97 * radius
    secants = estimate_lipschitz(points, losses, pairs="all")
    assert secants.value <= radius
    assert secants.value >= 0.8 * radius
    # The official mean statistic is far below the constant: why max is the default.
    assert estimate_lipschitz(points, losses, statistic="mean").value < 0.6 * radius


def test_consecutive_pairs_and_statistics() -> None:
    points = torch.tensor([[0.0], [1.0], [3.0], [3.0]], dtype=torch.float64)
    losses = torch.tensor([0.0, 2.0, 3.0, 9.0], dtype=torch.float64)
    est = estimate_lipschitz(points, losses, pairs="consecutive")
    # Slopes 2 and 0.5; the repeated point (distance 0) is dropped, not counted as 1/1.
    assert est.n_secants == 2
    assert est.value == 2.0
    assert estimate_lipschitz(points, losses, pairs="consecutive", statistic="mean").value == 1.25
    only_norms = estimate_lipschitz(Trajectory(None, losses, torch.tensor([1.0, 4.0])),
                                    pairs="none", statistic="median")
    assert only_norms.value == 1.0
    with pytest.raises(ValueError, match="nothing"):
        estimate_lipschitz(Trajectory(None, losses))
    with pytest.raises(ValueError, match="statistic"):
        estimate_lipschitz(points, losses, statistic="mode")  # type: ignore[arg-type]


def test_probe_run_on_a_linear_model() -> None:
    # loss = w.a on a linear "model": the probe's trajectory recovers ||a||.
    torch.manual_seed(0)
    a = torch.tensor([3.0, -4.0])
    model = torch.nn.Linear(2, 1, bias=False)

    def loss_fn(m: torch.nn.Module, batch: object) -> torch.Tensor:
        del batch
        return (m.weight.reshape(-1) * a).sum() + 100.0

    traj = record_trajectory(copy.deepcopy(model), loss_fn, range(6))
    assert traj.points is not None and traj.points.shape == (6, 2)
    est = estimate_lipschitz(traj)
    assert est.value == pytest.approx(5.0, rel=1e-5)
    assert est.from_secants == pytest.approx(5.0, rel=1e-3)


def test_probe_with_a_fixed_eval_batch_and_bpgrad() -> None:
    from bpgrad import BPGrad

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(5)]

    def loss_fn(m: torch.nn.Module, batch: object) -> torch.Tensor:
        x, y = batch  # type: ignore[misc]
        return torch.nn.functional.cross_entropy(m(x), y)

    opt = BPGrad(model.parameters(), lipschitz="auto")
    traj = record_trajectory(model, loss_fn, data, optimizer=opt, eval_batch=data[0])
    assert traj.losses.shape == (5,)
    assert float(opt.stats["steps"]) == 5.0
    assert estimate_lipschitz(traj).value > 0
