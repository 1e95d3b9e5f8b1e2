"""A literal, loop-only transcription of the BPGrad update rule: the test oracle.

It is deliberately naive: Python floats for every scalar (so it syncs with the host freely), one
tensor at a time, the momentum buffer stored exactly as the pseudo-code's ``v``. The fast
implementation in :mod:`bpgrad.optim.bpgrad` is tested against it; nothing else should use it.

Per step t, with f_t the objective value::

    m_t   = min(m_{t-1}, F_t)                           m_0 = +inf, never reset
    n_t   = || concat of all raw gradients ||_2          one norm over every group
    eta_t = lr * (F_t - rho * m_t) / lipschitz
    d     = (grad + weight_decay * p) / n_t
    matconvnet style:  v = momentum * v - d;        p = p + eta_t * v
    port style:        v = momentum * v - eta_t d;  p = p + v

With ``lipschitz="auto"`` the constant is the online estimate (steps t = 0, 1, ... counted over
the steps taken)::

    W_t   = F_0 / (auto_warmup * (1 + ||x_0||))   t = 0    x_0 = parameters at the first call
          = auto_warmup_decay * W_{t-1}           t > 0    (W = 0 when auto_warmup = 0)
    M_t   = max(M_{t-1}, n_t)   if n_t > W_t   else M_{t-1}      M_{-1} = 0
    C_t   = F_t / (auto_max_step * (1 + ||x_0||))            (C = 0 when auto_max_step = 0)
    L_t   = max(M_t, W_t, C_t)

where F_t is f_t (``objective="minibatch"``) or the mean of the f values since the last
``start_epoch()`` (``objective="epoch_mean"``). A step whose loss or gradient norm is not finite,
or whose gradient norm is zero, changes nothing but the skipped-step counter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class ReferenceBPGrad:
    """Oracle implementation over plain lists of parameter groups (dicts with ``params``)."""

    def __init__(self, param_groups: Iterable[dict], *, objective: str = "minibatch",
                 loss_lower_bound: float = 0.0, auto_warmup: float = 1e-3,
                 auto_warmup_decay: float = 0.95, auto_max_step: float = 1e-2) -> None:
        self.param_groups = [dict(g) for g in param_groups]
        for g in self.param_groups:
            g["params"] = list(g["params"])
            g.setdefault("lr", 1.0)
            g.setdefault("momentum_style", "matconvnet")
        self.objective = objective
        self.loss_lower_bound = loss_lower_bound
        self.v: dict[int, torch.Tensor] = {}
        self.running_min = math.inf
        self.epoch_sum = 0.0
        self.epoch_count = 0
        self.steps = 0
        self.skipped = 0
        self.last_eta: list[float] = []
        self.last_norm = math.nan
        self.auto_warmup = auto_warmup
        self.auto_warmup_decay = auto_warmup_decay
        self.auto_max_step = auto_max_step
        self.grad_norm_max = 0.0
        self.floor = 0.0
        self.x0_norm: float | None = None
        self.lipschitz_estimate = 0.0

    def start_epoch(self) -> None:
        self.epoch_sum = 0.0
        self.epoch_count = 0

    @torch.no_grad()
    def step(self, loss: float) -> None:
        f = float(loss) - self.loss_lower_bound
        if math.isfinite(f) and f < 0.0:
            raise ValueError("negative loss")
        if self.x0_norm is None:
            self.x0_norm = math.sqrt(sum(
                float((p.detach().double().abs() ** 2).sum())
                for g in self.param_groups for p in g["params"]))
        squares = 0.0
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    squares += float((p.grad.double() ** 2).sum())
        norm = math.sqrt(squares)
        if not (math.isfinite(f) and math.isfinite(norm) and norm > 0.0):
            self.skipped += 1
            return
        if self.objective == "epoch_mean":
            self.epoch_sum += f
            self.epoch_count += 1
            big_f = self.epoch_sum / self.epoch_count
        else:
            big_f = f
        self.running_min = min(self.running_min, big_f)
        self.last_norm = norm
        if self.auto_warmup > 0.0:
            if self.steps == 0:
                self.floor = big_f / (self.auto_warmup * (1.0 + self.x0_norm))
            else:
                self.floor = self.auto_warmup_decay * self.floor
        if norm > self.floor:  # observations count once the floor no longer decides the step
            self.grad_norm_max = max(self.grad_norm_max, norm)
        cap = 0.0
        if self.auto_max_step > 0.0:  # the step-length cap eta_t <= auto_max_step (1 + ||x_0||)
            cap = big_f / (self.auto_max_step * (1.0 + self.x0_norm))
        self.lipschitz_estimate = max(self.grad_norm_max, self.floor, cap)
        self.last_eta = []
        for g in self.param_groups:
            lipschitz = g["lipschitz"]
            if lipschitz == "auto":
                lipschitz = self.lipschitz_estimate
            eta = g["lr"] * (big_f - g["rho"] * self.running_min) / lipschitz
            self.last_eta.append(eta)
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = (p.grad + g["weight_decay"] * p) / norm
                mu = g["momentum"]
                if mu == 0.0:
                    p.add_(d, alpha=-eta)
                    continue
                v = self.v.get(id(p))
                if v is None:
                    v = torch.zeros_like(p)
                if g["momentum_style"] == "port":
                    v = mu * v - eta * d
                    p.add_(v)
                else:
                    v = mu * v - d
                    p.add_(v, alpha=eta)
                self.v[id(p)] = v
        self.steps += 1
