r"""Empirical Lipschitz constants: the calibration the official BPGrad code sketched, done right.

BPGrad's :math:`L` is the Lipschitz constant of the loss itself,
:math:`|f(x) - f(y)| \le L \|x - y\|_2`, equivalently :math:`\sup \|\nabla f\|`. Every evaluated
point gives a *lower* bound on it, from two kinds of observations:

* gradient norms, :math:`L \ge \|\nabla f(x_i)\|` (a directional derivative never exceeds
  :math:`L`);
* secant slopes, :math:`L \ge |f(x_i) - f(x_j)| / \|x_i - x_j\|` for every pair :math:`i \ne j`
  (the official ``Estimate_L``, which took their *mean* and set the diagonal to 1/1).

The maximum over all observations is the smallest :math:`L` consistent with them: any smaller
value is contradicted by a measurement. That is the default statistic here. The official code's
mean (and the median, or any quantile) are available for comparison; they are not lower bounds
and, with the diagonal excluded, the mean of the secants is what ``Estimate_L`` meant to compute.

Noise under minibatching (why the defaults are what they are):

* A minibatch gradient is :math:`g = \nabla f + \xi` with :math:`E\|g\|^2 = \|\nabla f\|^2 +
  \operatorname{tr}\Sigma / B`: gradient norms are biased *upward* by the sampling noise, by
  about :math:`\sqrt{\operatorname{tr}\Sigma/B}` when the true gradient is small. The bias is of
  the order of the gradient itself late in training, so the max of minibatch norms is a slight
  over-estimate of :math:`\sup\|\nabla f\|` -- the safe side for BPGrad's pruning argument.
* A secant between losses measured on *different* minibatches carries the difference of two
  sampling errors, :math:`|\Delta f| \approx |\Delta f_{true}| + O(\sigma_f)`, divided by
  :math:`\|\Delta x\|`. For nearby points (small steps, late training) that noise dominates and
  the ratio grows like :math:`\sigma_f/\|\Delta x\|` without bound. The max of such secants is
  therefore meaningless; either measure the losses on one fixed batch (``record_trajectory``'s
  ``eval_batch``, which removes the :math:`\sigma_f` term), or use ``secants="none"``.

Cost: gradient norms are free (the optimizer computes them anyway). All-pairs secants need the
stored points, :math:`T \times d` numbers (``T = 100`` points of a 431k-parameter LeNet are
172 MB in float32), and :math:`O(T^2 d)` flops for the distances (one Gram matrix);
``pairs="consecutive"`` needs :math:`O(T d)` and only consecutive differences.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["LipschitzEstimate", "Trajectory", "estimate_lipschitz", "record_trajectory"]

Statistic = Literal["max", "mean", "median"]
Pairs = Literal["all", "consecutive", "none"]


@dataclass(frozen=True)
class Trajectory:
    """Points of a run with their loss values and (optionally) gradient norms.

    ``points`` is ``(T, d)`` (flattened parameters; ``None`` if not stored), ``losses`` and
    ``grad_norms`` are ``(T,)``. ``losses[i]`` must be the loss *at* ``points[i]``.
    """

    points: torch.Tensor | None
    losses: torch.Tensor
    grad_norms: torch.Tensor | None = None


@dataclass(frozen=True)
class LipschitzEstimate:
    """Result of :func:`estimate_lipschitz`.

    ``value`` is the estimate (the chosen ``statistic`` over every observation used);
    ``from_grad_norms`` and ``from_secants`` are the same statistic over each kind alone
    (``nan`` when that kind was not used); ``n_secants`` counts the pairs.
    """

    value: float
    statistic: str
    from_grad_norms: float
    from_secants: float
    n_secants: int


def _reduce(values: torch.Tensor, statistic: Statistic) -> float:
    if values.numel() == 0:
        return math.nan
    if statistic == "max":
        return float(values.max())
    if statistic == "mean":
        return float(values.mean())
    if statistic == "median":
        return float(values.median())
    raise ValueError(f"statistic must be 'max', 'mean' or 'median', got {statistic!r}")


def _secants(points: torch.Tensor, losses: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    x = points.to(torch.float64).reshape(points.shape[0], -1)
    f = losses.to(torch.float64).reshape(-1)
    if pairs == "consecutive":
        dist = (x[1:] - x[:-1]).norm(dim=1)
        df = (f[1:] - f[:-1]).abs()
    else:
        # One Gram matrix: ||xi - xj||^2 = |xi|^2 + |xj|^2 - 2 xi.xj, O(T^2 d). Centering first
        # keeps the cancellation small when the points are far from the origin but close together.
        xc = x - x.mean(dim=0, keepdim=True)
        sq = (xc * xc).sum(dim=1)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * (xc @ xc.T)).clamp(min=0.0)
        i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
        dist = d2[i, j].sqrt()
        df = (f[i] - f[j]).abs()
    keep = dist > 0  # repeated points say nothing about L (the official code put 1/1 there)
    return df[keep] / dist[keep]


def estimate_lipschitz(
    trajectory: Trajectory | torch.Tensor,
    losses: torch.Tensor | Sequence[float] | None = None,
    grad_norms: torch.Tensor | Sequence[float] | None = None,
    *,
    statistic: Statistic = "max",
    pairs: Pairs = "all",
) -> LipschitzEstimate:
    r"""Estimate the Lipschitz constant :math:`L` of a loss from evaluated points.

    .. math::

        \hat L = \operatorname{stat}\Big(\{\|g_i\|\}_i \cup
                 \{|f_i - f_j| / \|x_i - x_j\|\}_{i<j}\Big)

    With ``statistic="max"`` (default) :math:`\hat L` is the smallest constant consistent with
    every observation, a lower bound on the true :math:`L` when the losses and gradients are
    exact; ``"mean"`` over the secants alone is the official code's ``Estimate_L`` (without its
    1/1 diagonal). See the module docstring for the noise under minibatching and the cost.

    Args:
        trajectory: a :class:`Trajectory`, or the points ``(T, d)`` (then give ``losses``).
        losses: the loss at each point (only with a points tensor).
        grad_norms: gradient norms at the points (only with a points tensor; optional).
        statistic: ``"max"``, ``"mean"`` or ``"median"``.
        pairs: which secants to use: ``"all"`` pairs (``O(T^2 d)``), ``"consecutive"`` ones
            (``O(T d)``), or ``"none"`` (gradient norms only; points may then be ``None``).

    Returns:
        A :class:`LipschitzEstimate`; raises ``ValueError`` when there is nothing to estimate
        from.
    """
    if isinstance(trajectory, Trajectory):
        if losses is not None or grad_norms is not None:
            raise ValueError("pass losses/grad_norms inside the Trajectory, not separately")
        traj = trajectory
    else:
        if losses is None:
            raise ValueError("losses are required with a points tensor")
        traj = Trajectory(
            points=trajectory,
            losses=torch.as_tensor(losses, dtype=torch.float64),
            grad_norms=None if grad_norms is None
            else torch.as_tensor(grad_norms, dtype=torch.float64),
        )
    if pairs not in ("all", "consecutive", "none"):
        raise ValueError(f"pairs must be 'all', 'consecutive' or 'none', got {pairs!r}")
    parts: list[torch.Tensor] = []
    norms = torch.empty(0, dtype=torch.float64)
    if traj.grad_norms is not None:
        norms = traj.grad_norms.detach().to(torch.float64).reshape(-1)
        norms = norms[torch.isfinite(norms)]
        parts.append(norms)
    secants = torch.empty(0, dtype=torch.float64)
    if pairs != "none" and traj.points is not None:
        if traj.points.shape[0] != traj.losses.numel():
            raise ValueError(
                f"{traj.points.shape[0]} points but {traj.losses.numel()} losses"
            )
        secants = _secants(traj.points.detach(), traj.losses.detach(), pairs)
        secants = secants[torch.isfinite(secants)]
        parts.append(secants)
    every = torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)
    if every.numel() == 0:
        raise ValueError("nothing to estimate L from: give gradient norms or >= 2 distinct points")
    return LipschitzEstimate(
        value=_reduce(every, statistic),
        statistic=statistic,
        from_grad_norms=_reduce(norms, statistic),
        from_secants=_reduce(secants, statistic),
        n_secants=int(secants.numel()),
    )


def record_trajectory(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    batches: Iterable[object],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    steps: int | None = None,
    eval_batch: object | None = None,
    store_points: bool = True,
) -> Trajectory:
    """Run a short probe and record the points, losses and gradient norms it visits.

    For each batch: ``loss = loss_fn(model, batch)``, ``backward``, record the point, the loss
    and the gradient norm, then ``optimizer.step()`` (the optimizer defaults to SGD with
    momentum 0.9 and lr 1e-2, as the official code calibrated on an SGD run; BPGrad works too
    and receives the loss). With ``eval_batch`` the recorded loss and gradient are those of that
    one fixed batch at every point (one more forward/backward per step), which removes the
    minibatch noise from the secants; the probe still steps on ``batches``.

    The model's parameters are changed by the probe: run it on a copy
    (``copy.deepcopy(model)``) if you want to keep the start point.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    points: list[torch.Tensor] = []
    losses: list[float] = []
    norms: list[float] = []

    def measure(batch: object) -> torch.Tensor:
        for p in params:
            p.grad = None
        loss = loss_fn(model, batch)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads \
            else torch.zeros(())
        if store_points:
            points.append(torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params]))
        losses.append(float(loss.detach()))
        norms.append(float(norm))
        return loss

    for k, batch in enumerate(batches):
        if steps is not None and k >= steps:
            break
        if eval_batch is not None:
            measure(eval_batch)
            for p in params:
                p.grad = None
            loss = loss_fn(model, batch)
            loss.backward()
        else:
            loss = measure(batch)
        if getattr(optimizer, "_step_supports_amp_scaling", False) and hasattr(
            optimizer, "set_loss"
        ):
            optimizer.set_loss(loss.detach())  # BPGrad needs the loss value
        optimizer.step()
    return Trajectory(
        points=torch.stack(points) if points else None,
        losses=torch.tensor(losses, dtype=torch.float64),
        grad_norms=torch.tensor(norms, dtype=torch.float64),
    )
