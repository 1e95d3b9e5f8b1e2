"""Shared pieces of the integration tests: a tiny classifier, fixed data, and the plain loop.

The plain loop is the reference every framework is compared with: it drives BPGrad with
``opt.step(loss=...)`` (or ``set_loss`` + ``GradScaler.step``) and no glue from
``bpgrad.integrations``, so a bug in the glue cannot hide in the reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bpgrad import BPGrad

N_SAMPLES = 48
N_FEATURES = 6
N_CLASSES = 3
BATCH = 4
OPT_KWARGS: dict[str, Any] = dict(lipschitz=20.0, rho=0.1, momentum=0.9, weight_decay=1e-4)


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_FEATURES, 16), nn.Tanh(), nn.Linear(16, N_CLASSES))


def make_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=g)
    w = torch.randn(N_FEATURES, N_CLASSES, generator=g)
    y = (x @ w + 0.5 * torch.randn(N_SAMPLES, N_CLASSES, generator=g)).argmax(dim=1)
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, batch: int = BATCH) -> list[tuple[torch.Tensor, ...]]:
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


@dataclass
class Reference:
    net: nn.Module
    opt: BPGrad
    etas: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def plain_loop(
    *, epochs: int, accum: int = 1, autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: Callable[[BPGrad], Any] | None = None, max_steps: int | None = None,
    batch: int = BATCH, short_window_divisor: str = "accum",
) -> Reference:
    """Train ``make_net()`` on ``make_data()`` in order; BPGrad sees the mean micro-batch loss.

    A window that the epoch cuts short divides by ``accum`` (Lightning's and Accelerate's rule,
    ``short_window_divisor="accum"``) or by its own length (the HF Trainer's, ``"len"``); the
    loss handed to BPGrad is the sum of what went into ``backward``.
    """
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    sched = scheduler(opt) if scheduler is not None else None
    ref = Reference(net, opt)
    data = batches(*make_data(), batch=batch)
    steps = 0
    for _ in range(epochs):
        total: torch.Tensor | None = None
        for i, (xb, yb) in enumerate(data):
            start = i - i % accum
            divisor = accum
            if short_window_divisor == "len":
                divisor = min(accum, len(data) - start)
            ctx = (torch.autocast("cpu", dtype=autocast) if autocast is not None
                   else contextlib.nullcontext())
            with ctx:
                loss = F.cross_entropy(net(xb), yb) / divisor
            (scaler.scale(loss) if scaler is not None else loss).backward()
            part = loss.detach().float()
            total = part if total is None else total + part
            if (i + 1) % accum == 0 or i + 1 == len(data):
                if scaler is not None:
                    opt.set_loss(total)
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step(loss=total)
                ref.etas.append(float(opt.stats["eta"]))
                ref.losses.append(float(total))
                total = None
                if sched is not None:
                    sched.step()
                opt.zero_grad()
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    return ref
    return ref


def iter_params(net: nn.Module) -> Iterator[torch.Tensor]:
    return (p.detach() for p in net.parameters())


def assert_same_training(
    net: nn.Module, opt: Any, ref: Reference, *, atol: float = 1e-6, rtol: float = 1e-5,
) -> None:
    """Parameters, momentum buffers and BPGrad's global state equal the reference's."""
    from bpgrad.integrations import unwrap_bpgrad

    bp = unwrap_bpgrad(opt)
    for p, q in zip(iter_params(net), iter_params(ref.net), strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol)
    stats, ref_stats = bp.stats, ref.opt.stats
    # The loss reached BPGrad at every step: same number of (unskipped) steps, same running min.
    assert float(stats["steps"]) == float(ref_stats["steps"]) == len(ref.etas)
    assert float(stats["skipped_steps"]) == float(ref_stats["skipped_steps"])
    torch.testing.assert_close(stats["running_min"], ref_stats["running_min"], atol=atol,
                               rtol=rtol)
    # Keyed by the model's parameters, not the optimizer's group order (ZeRO reorders them).
    for p, q in zip(net.parameters(), ref.net.parameters(), strict=True):
        torch.testing.assert_close(bp.state[p]["momentum_buffer"],
                                   ref.opt.state[q]["momentum_buffer"], atol=atol, rtol=rtol)
