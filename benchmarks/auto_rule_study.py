"""Issue 12, part 3: candidate online rules for ``lipschitz="auto"`` on the whole suite.

Each candidate is a prototype: a fixed-L BPGrad whose ``lipschitz`` is set before every step from
host-side statistics of the gradient norm ``n_t`` and the objective ``F_t`` (it syncs; only the
rule that wins is written into the optimizer's zero-sync scalar rule). Every trial runs through the
harness (``run_trial``: the problem's data order, augmentation, metrics and budget) and writes the
usual trial file, plus ``trace_seed_<s>.json`` with ``n_t`` and ``L_t`` per step.

    nice -n 10 .venv/bin/python benchmarks/auto_rule_study.py run --out runs/rules \\
        --rules max smax0.9 --problems fortunes_lstm segment_mlp --seeds 0 1
    .venv/bin/python benchmarks/auto_rule_study.py report --out runs/rules

Rules (``W_t`` is the shipped warm-up floor ``F_0 / (1e-3 (1 + ||x_0||)) * 0.95^t``; every rule
below takes ``max(W_t, .)``):

* ``max``         running max of ``n_t`` (the shipped rule, re-implemented)
* ``smax<b>``     running max of the bias-corrected EMA (factor b) of ``n_t``
* ``spw<b>``      ``smax<b>`` over the steps where the floor no longer decides
* ``postwarm``    running max of ``n_t`` over the steps where the floor no longer decides
* ``decmax<g>``   decaying max ``max(g L_{t-1}, n_t)``
* ``ema<b>``      bias-corrected EMA of ``n_t`` (a smoothed Polyak denominator)
* ``fixed<L>``    a constant (no floor)
* ``prog``        ``max``, but the floor decays only on steps where the smoothed objective (EMA 0.9)
                  reaches a new minimum: the warm-up ends on loss progress, not on a clock
* ``progpw``      ``prog`` with the running max of ``postwarm``
* ``cap<k>``      ``postwarm`` plus a cap on the step length, ``eta_t <= k (1 + ||x_0||)``: ``L_t >=
                  (F_t - rho m_t) / (k (1 + ||x_0||))``; a norm counts only above floor and cap
* ``capw<k>``     the same cap, a norm counts once above the warm-up floor (as in ``postwarm``)

A suffix ``/wd<value>`` sets the weight decay (default: the registry's 5e-4).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from bpgrad import BPGrad
from bpgrad.bench.optimizers import OptimizerSpec, ResolvedOptimizer, resolve_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_study import BUDGET, METRIC, run_trials, seed_values, trial_finals


class RuleBPGrad(BPGrad):
    """BPGrad whose L is set every step by a host-side candidate rule (a prototype)."""

    def __init__(self, params: Any, rule: str, warmup: float = 1e-3, decay: float = 0.95,
                 **kwargs: Any) -> None:
        super().__init__(params, lipschitz=1.0, **kwargs)
        self.rule, self.warmup, self.decay = rule, warmup, decay
        self.t = 0
        self.floor = 0.0
        self.peak = 0.0
        self.ema = 0.0
        self.loss_ema = 0.0
        self.loss_best = math.inf
        self.x0 = 0.0
        self.running_min = math.inf
        #: per step: n_t, L_t, F_t, ||x_t||
        self.trace: list[tuple[float, ...]] = []

    def _norm(self) -> float:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return math.sqrt(sum(float(n) ** 2 for n in torch._foreach_norm(grads)))

    def _param_norm(self) -> float:
        params = [p.detach() for g in self.param_groups for p in g["params"]]
        return math.sqrt(sum(float(n) ** 2 for n in torch._foreach_norm(params)))

    def step(self, closure: Any = None, *, loss: Any = None) -> Any:  # type: ignore[override]
        n, f = self._norm(), float(loss)
        if not (math.isfinite(n) and math.isfinite(f) and n > 0):
            return super().step(loss=loss)
        x_norm = self._param_norm()  # before this step's update: ||x_0|| at t = 0
        rule = self.rule
        # smoothed objective (bias-corrected EMA, factor 0.9) and whether it made progress
        self.loss_ema = 0.9 * self.loss_ema + 0.1 * f
        smoothed = self.loss_ema / (1 - 0.9 ** (self.t + 1))
        progress = smoothed < self.loss_best
        self.loss_best = min(self.loss_best, smoothed)
        self.running_min = min(self.running_min, f)
        if self.t == 0:
            self.x0 = x_norm
            self.floor = f / (self.warmup * (1.0 + x_norm))
        elif not rule.startswith("prog") or progress:
            self.floor *= self.decay
        self.t += 1
        # cap<k>: the step-length cap eta_t <= k (1 + ||x_0||): L >= (F - rho m) / (k (1 + ||x_0||))
        cap = 0.0
        if m := re.fullmatch(r"capw?([\d.e-]+)", rule):
            rho = self.param_groups[0]["rho"]
            cap = (f - rho * self.running_min) / (float(m[1]) * (1.0 + self.x0))
        if rule.startswith("fixed"):
            lip = float(rule[5:])
        elif rule.startswith("cap"):
            # cap: counts only when it would decide the step; capw: once above the warm-up floor
            if n > (self.floor if rule.startswith("capw") else max(self.floor, cap)):
                self.peak = max(self.peak, n)
            lip = max(self.floor, cap, self.peak)
        else:
            if rule in ("max", "prog"):
                self.peak = max(self.peak, n)
            elif rule in ("postwarm", "progpw"):
                if n > self.floor:
                    self.peak = max(self.peak, n)
            elif m := re.fullmatch(r"(smax|spw)([\d.]+)", rule):
                b = float(m[2])
                self.ema = b * self.ema + (1 - b) * n
                smooth = self.ema / (1 - b ** self.t)
                if m[1] == "smax" or smooth > self.floor:
                    self.peak = max(self.peak, smooth)
            elif m := re.fullmatch(r"decmax([\d.]+)", rule):
                self.peak = max(float(m[1]) * self.peak, n)
            elif m := re.fullmatch(r"ema([\d.]+)", rule):
                b = float(m[1])
                self.ema = b * self.ema + (1 - b) * n
                self.peak = self.ema / (1 - b ** self.t)
            else:
                raise SystemExit(f"unknown rule {rule!r}")
            lip = max(self.floor, self.peak)
        for group in self.param_groups:
            group["lipschitz"] = lip
        self.trace.append((n, lip, f, x_norm))
        return super().step(loss=loss)


_BUILT: dict[str, list[RuleBPGrad]] = {}


def candidate(label: str) -> ResolvedOptimizer:
    base = resolve_optimizer("bpgrad_auto")
    # the shipped rule's own options do not apply: the prototype sets a fixed L every step
    hyper = {k: v for k, v in base.hyperparameters.items()
             if k != "lipschitz" and not k.startswith("auto_")}
    rule, _, wd = label.partition("/wd")
    if wd:
        hyper["weight_decay"] = float(wd)
    built: list[RuleBPGrad] = []

    def factory(params: Any, **kw: Any) -> RuleBPGrad:
        opt = RuleBPGrad(params, rule, **kw)
        built.append(opt)
        return opt

    spec = OptimizerSpec(name=f"rule_{label.replace('/', '_')}",
                         description=f"prototype auto-L rule {label}",
                         factory=factory, defaults=hyper, module="bpgrad.optim",
                         distribution="bpgrad", needs_loss=True, epoch_hook=True, lr_key=None)
    _BUILT[spec.name] = built
    return ResolvedOptimizer(spec=spec, hyperparameters=hyper)


def run(args: argparse.Namespace) -> None:
    def save_trace(problem: str, opt: ResolvedOptimizer, seed: int, outcome: Any) -> None:
        built = _BUILT.get(opt.name, [])
        if built and not outcome.skipped:
            trace = Path(args.out) / problem / opt.label / f"trace_seed_{seed}.json"
            trace.write_text(json.dumps(built[-1].trace))

    optimizers = [resolve_optimizer("bpgrad_auto") if rule == "shipped" else candidate(rule)
                  for rule in args.rules]
    run_trials(args.problems, args.seeds, optimizers, out=Path(args.out), epochs=args.epochs,
               after=save_trace)


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for problem, metric in METRIC.items():
        if not (out / problem).is_dir():
            continue
        print(f"\n{problem} ({metric.test})")
        for label, per_seed in sorted(trial_finals(out, problem).items()):
            vals = seed_values(per_seed, metric.test)
            lips = [json.loads(trace.read_text())[-1][1]
                    for trace in sorted((out / problem / label).glob("trace_seed_*.json"))]
            lip = f" L_end {statistics.fmean(lips):.3g}" if lips else ""
            print(f"  {label:24s} {statistics.fmean(vals):.4g} "
                  f"({', '.join(f'{v:.4g}' for v in vals)}){lip}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--out", default="runs/rules")
    p_run.add_argument("--rules", nargs="+", required=True)
    p_run.add_argument("--problems", nargs="+", default=list(BUDGET), choices=list(BUDGET))
    p_run.add_argument("--seeds", nargs="+", type=int, default=[0])
    p_run.add_argument("--epochs", type=int, default=None)
    p_rep = sub.add_parser("report")
    p_rep.add_argument("--out", default="runs/rules")
    args = parser.parse_args()
    (run if args.cmd == "run" else report)(args)


if __name__ == "__main__":
    main()
