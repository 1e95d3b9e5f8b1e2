"""Harness overhead: ``run_trial`` against a bare training loop doing the same work.

Both sides train the same model from the same seed on the same data order for the same steps and
evaluate the validation and test splits at the same points (before training and after each
epoch), so the difference is the harness's own bookkeeping: per-step metric sums, the batched
step log, JSONL rewrites, checkpoints, the progress machinery (quiet here). Runs alternate
(runner, bare, runner, bare, ...) and the medians are compared, because the development machines
are shared and noisy. Target: ratio <= 1.10.

    python benchmarks/harness_overhead.py                          # mnist_lenet, sgd and bpgrad
    python benchmarks/harness_overhead.py --problem toy_blobs --repeats 5
    python benchmarks/harness_overhead.py --optimizers adam --limit-train-batches 200 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bpgrad.bench.optimizers import ResolvedOptimizer, resolve_optimizer
from bpgrad.bench.problems.base import Problem, Splits, get_problem
from bpgrad.bench.runner import (
    Budget,
    RunOptions,
    epoch_order,
    evaluate,
    run_trial,
    seed_everything,
)

# toy_blobs, the tests' synthetic problem, lives in tests/bench (not in the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "bench"))
import toy_problem  # noqa: F401  (registers toy_blobs)


def bare_loop(problem: Problem, splits: Splits, opt_spec: ResolvedOptimizer, seed: int,
              budget: Budget) -> tuple[float, float]:
    """The same trial as a plain loop; returns (total seconds, training-only seconds)."""
    t0 = time.perf_counter()
    seed_everything(seed)
    model = problem.make_model(seed)
    opt = opt_spec.build(model.parameters())
    bs = budget.batch_size or problem.batch_size
    n = len(splits.train)
    steps = min(n // bs if problem.drop_last else -(-n // bs), budget.limit_train_batches or n)
    ebs = problem.eval_batch_size
    evaluate(problem, model, splits.valid, ebs)
    evaluate(problem, model, splits.test, ebs)
    train_s = 0.0
    for epoch in range(1, budget.epochs + 1):
        t_train = time.perf_counter()
        if opt_spec.spec.epoch_hook:
            opt.start_epoch()  # type: ignore[attr-defined]
        model.train()
        order = epoch_order(n, seed, epoch)
        for b in range(steps):
            idx = order[b * bs:(b + 1) * bs]
            opt.zero_grad(set_to_none=True)
            loss = problem.loss(model(splits.train.inputs[idx]), splits.train.targets[idx])
            loss.backward()
            if opt_spec.spec.needs_loss:
                opt.step(loss=loss.detach())  # type: ignore[call-arg]
            else:
                opt.step()
        train_s += time.perf_counter() - t_train
        evaluate(problem, model, splits.valid, ebs)
        evaluate(problem, model, splits.test, ebs)
    return time.perf_counter() - t0, train_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="mnist_lenet")
    parser.add_argument("--optimizers", default="sgd,bpgrad")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit-train-batches", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    problem = get_problem(args.problem)
    splits = problem.load()
    budget = Budget(args.epochs, limit_train_batches=args.limit_train_batches)
    print(f"{problem.name}: {budget.epochs} epoch(s) x <= {budget.limit_train_batches} steps, "
          f"{args.threads} thread(s), {args.repeats} alternating repeats, torch "
          f"{torch.__version__}")
    for name in args.optimizers.split(","):
        opt = resolve_optimizer(name)
        runner_s, bare_s, runner_train, bare_train = [], [], [], []
        for rep in range(args.repeats + 1):  # the first pair warms up and is dropped
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                outcome = run_trial(problem, opt, 0, budget, out=Path(tmp), splits=splits,
                                    options=RunOptions(quiet=True, threads=args.threads))
                r = time.perf_counter() - t0
            b, b_train = bare_loop(problem, splits, opt, 0, budget)
            if rep:
                runner_s.append(r)
                bare_s.append(b)
                runner_train.append(float(outcome.summary["train_time"]))
                bare_train.append(b_train)
        r_med, b_med = statistics.median(runner_s), statistics.median(bare_s)
        rt_med, bt_med = statistics.median(runner_train), statistics.median(bare_train)
        print(f"  {name:<10} whole trial: runner {r_med:7.2f} s, bare {b_med:7.2f} s, "
              f"ratio {r_med / b_med:.3f} | training only: runner {rt_med:7.2f} s, bare "
              f"{bt_med:7.2f} s, ratio {rt_med / bt_med:.3f}")
        print(f"  {'':<10} runs: runner {', '.join(f'{x:.2f}' for x in runner_s)}; bare "
              f"{', '.join(f'{x:.2f}' for x in bare_s)}")


if __name__ == "__main__":
    main()
