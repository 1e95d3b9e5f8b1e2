"""Compare candidate online rules for BPGrad's L (the table in docs/lipschitz.md).

Usage: python benchmarks/lipschitz_rules.py PROBLEM RULE STEPS [SEED]
  RULE: fixed<L> | max | decmax<gamma> | wdecmax<gamma> | ema | secant | mean | auto:<eps>:<gamma>

One thread, batch = the problem's, BPGrad with the paper's rho=0.1, mu=0.9, wd=5e-4. The
candidate rules set a fixed-L BPGrad's ``lipschitz`` every step from host-side statistics
(a prototype: it syncs); ``auto:<eps>:<gamma>`` runs the shipped ``lipschitz="auto"``.
``wdecmax``, ``secant`` and ``mean`` use the same warm-up floor as the shipped rule (eps=1e-3, gamma=0.95).
Prints the final validation accuracy and L at steps 0, 10, STEPS/4, STEPS/2 and the last one.
"""

from __future__ import annotations

import math
import sys

import torch

from bpgrad import BPGrad
from bpgrad.bench.problems import get_problem


def main(problem_name: str, rule: str, steps: int, seed: int = 0) -> None:
    torch.set_num_threads(1)
    problem = get_problem(problem_name)
    splits = problem.load(seed=0)
    model = problem.make_model(seed)
    params = list(model.parameters())
    if rule.startswith("auto"):
        _, eps, gamma = rule.split(":")
        opt = BPGrad(params, lipschitz="auto", rho=0.1, momentum=0.9, weight_decay=5e-4,
                     auto_warmup=float(eps), auto_warmup_decay=float(gamma))
    else:
        opt = BPGrad(params, lipschitz=5.0, rho=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    bs = problem.batch_size
    per_epoch = len(splits.train) // bs
    history: list[float] = []
    grad_max, ema, secant, mean, count, floor = 0.0, None, None, 0.0, 0, 0.0
    prev: tuple[float, torch.Tensor] | None = None
    perm = torch.randperm(len(splits.train), generator=gen)
    for i in range(steps):
        if i % per_epoch == 0:
            perm = torch.randperm(len(splits.train), generator=gen)
        idx = perm[(i % per_epoch) * bs:(i % per_epoch + 1) * bs]
        x = problem.augment(splits.train.inputs[idx], gen)
        model.train()
        model.zero_grad()
        loss = problem.loss(model(x), splits.train.targets[idx])
        loss.backward()
        if rule.startswith("auto"):
            opt.step(loss=loss.detach())
            history.append(float(opt.stats["lipschitz"]))
            continue
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))
        f = float(loss.detach())
        point = torch.cat([p.detach().flatten() for p in params])
        if i == 0:
            floor = 0.9 * f / (1e-3 * (1.0 + float(point.norm())))
        else:
            floor *= 0.95
        if rule.startswith("fixed"):
            lipschitz = float(rule[5:])
        elif rule == "max":
            grad_max = max(grad_max, norm)
            lipschitz = grad_max
        elif rule.startswith("wdecmax"):
            # A local constant: observations forget geometrically, the warm-up floor as shipped.
            grad_max = max(float(rule[7:]) * grad_max, norm)
            lipschitz = max(floor, grad_max)
        elif rule.startswith("decmax"):
            grad_max = max(float(rule[6:]) * grad_max, norm)
            lipschitz = grad_max
        elif rule == "ema":
            ema = norm if ema is None else 0.99 * ema + 0.01 * norm
            lipschitz = ema
        elif rule == "mean":
            count += 1
            mean += (norm - mean) / count
            lipschitz = max(floor, mean)
        elif rule == "secant":
            if prev is not None:
                dist = float((point - prev[1]).norm())
                if dist > 0:
                    s = abs(f - prev[0]) / dist
                    secant = s if secant is None else 0.99 * secant + 0.01 * s
            lipschitz = max(floor, secant or 0.0)
        else:
            raise SystemExit(f"unknown rule {rule!r}")
        prev = (f, point)
        opt.param_groups[0]["lipschitz"] = lipschitz
        opt.step(loss=loss.detach())
        history.append(lipschitz)
    model.eval()
    with torch.no_grad():
        out = model(splits.valid.inputs)
        acc = float((out.argmax(1) == splits.valid.targets).float().mean())
    marks = " ".join(f"{history[min(k, steps - 1)]:.3g}"
                     for k in (0, 10, steps // 4, steps // 2, steps - 1))
    print(f"{problem_name} {rule} seed={seed} steps={steps} valid_acc {acc:.4f} L {marks}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0)
