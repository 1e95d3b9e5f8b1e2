"""Issue 12's short study on the wider suite: every new problem x {BPGrad auto at its defaults,
BPGrad fixed-L grid, Adam and SGD learning-rate grids, every learning-rate-free peer at its
defaults}, a short budget per problem. Resumable (finished trials are skipped, unfinished ones
resume from their checkpoint); loops seed-major so that an interrupted run leaves whole seeds.

    nice -n 10 .venv/bin/python benchmarks/suite_study.py run --out runs/suite \\
        --problems teacher_student segment_mlp --seeds 0 1 2
    .venv/bin/python benchmarks/suite_study.py report --out runs/suite

``report`` prints markdown: per problem the metric of record (mean ± std over the seeds found),
the grid point of Adam / SGD / fixed-L BPGrad chosen on the validation split, and the average rank
of the learning-rate-free optimizers across the problems that have results.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bpgrad.bench.optimizers import ResolvedOptimizer, resolve_optimizer
from bpgrad.bench.problems import get_problem
from bpgrad.bench.runner import Budget, RunOptions, run_trial

#: short budgets (epochs) sized for the shared 2-core CPU
BUDGET = {"teacher_student": 60, "segment_mlp": 20, "fortunes_lstm": 1, "mnist_canvas_fcn": 3,
          "mnist_lenet": 1, "fmnist_2c2d": 1}
LR_FREE = ["bpgrad_auto", "prodigy", "dadapt_sgd", "dadapt_adam", "schedulefree_sgd",
           "schedulefree_adamw", "dog", "alig", "momo", "momo_adam", "momsps", "sps_safe"]
GRIDS: dict[str, tuple[str, tuple[float, ...]]] = {
    "bpgrad": ("lipschitz", (1.0, 4.0, 16.0)),
    "adam": ("lr", (1e-4, 1e-3, 1e-2)),
    "sgd": ("lr", (1e-3, 1e-2, 1e-1)),
}
#: one more point beyond each end the core grids were seen to pick (``run --edges``)
EDGES: dict[str, tuple[float, ...]] = {"bpgrad": (0.25, 64.0), "adam": (1e-1,), "sgd": (1.0,)}


@dataclass(frozen=True)
class Metric:
    """The metric of record of a problem: valid key (selection), test key (report), direction."""

    valid: str
    test: str
    higher_is_better: bool
    label: str


METRIC = {
    "teacher_student": Metric("valid_loss", "valid_loss", False,
                              "final full-batch training loss (MSE)"),
    "segment_mlp": Metric("valid_accuracy", "test_accuracy", True, "test accuracy"),
    "fortunes_lstm": Metric("valid_loss", "test_loss", False, "test loss (nats/char)"),
    "mnist_canvas_fcn": Metric("valid_mean_iu", "test_mean_iu", True, "test mean IU"),
    "mnist_lenet": Metric("valid_accuracy", "test_accuracy", True, "test accuracy"),
    "fmnist_2c2d": Metric("valid_accuracy", "test_accuracy", True, "test accuracy"),
}


def variants(edges: bool = False) -> list[ResolvedOptimizer]:
    """Every optimizer variant of the study, learning-rate-free ones first (``edges``: also the
    grid points of :data:`EDGES`)."""
    out = [resolve_optimizer(name) for name in LR_FREE]
    for name, (key, grid) in GRIDS.items():
        points = grid + (EDGES[name] if edges else ())
        out += [resolve_optimizer(name, swept={key: value}) for value in points]
    return out


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    for problem_name in args.problems:
        problem = get_problem(problem_name)
        splits = problem.load(seed=0)
        budget = Budget(BUDGET[problem_name])
        for seed in args.seeds:
            for opt in variants(args.edges):
                outcome = run_trial(problem, opt, seed, budget, out=Path(args.out), splits=splits,
                                    options=RunOptions(quiet=True, threads=1, checkpoint=False))
                final = outcome.summary.get("final", {})
                metric = METRIC[problem_name]
                print(f"{problem_name} {opt.label} seed {seed}: {outcome.status}"
                      f"{' (skipped)' if outcome.skipped else ''} "
                      f"{metric.test}={final.get(metric.test)}", flush=True)


def _finals(out: Path, problem: str) -> dict[str, dict[int, dict[str, Any]]]:
    """label -> seed -> (final metrics + status) of every finished trial file."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted((out / problem).glob("*/seed_*.jsonl")):
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        if not lines or lines[-1].get("kind") != "summary":
            continue
        seed = int(path.stem.split("_")[1])
        found.setdefault(path.parent.name, {})[seed] = {
            **lines[-1].get("final", {}), "status": lines[-1]["status"]}
    return found


def _value(final: dict[str, Any], key: str, higher: bool) -> float:
    """A metric, with a diverged or missing value as the worst possible one."""
    v = final.get(key)
    if final.get("status") != "finished" or v is None or not math.isfinite(v):
        return -math.inf if higher else math.inf
    return float(v)


def _mean_std(values: list[float]) -> str:
    if any(not math.isfinite(v) for v in values):
        return f"diverged ({sum(not math.isfinite(v) for v in values)} of {len(values)})"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4g} ± {std:.2g}"


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    scores: dict[str, dict[str, float]] = {}  # problem -> LR-free label -> signed mean
    for problem in METRIC:
        finals = _finals(out, problem)
        if not finals:
            continue
        m = METRIC[problem]
        # the seeds every variant found has finished (a run in progress adds seeds one by one);
        # with none in common, the first seed and the variants that finished it
        seeds = sorted(set.intersection(*(set(per) for per in finals.values())))
        if not seeds:
            seeds = [min(s for per in finals.values() for s in per)]
        complete = {lab: per for lab, per in finals.items() if set(seeds) <= set(per)}
        sign = 1.0 if m.higher_is_better else -1.0

        def mean_of(lab: str, key: str, complete: dict[str, dict[int, dict[str, Any]]] = complete,
                    seeds: list[int] = seeds, higher: bool = m.higher_is_better) -> float:
            vals = [_value(complete[lab][s], key, higher) for s in seeds]
            return statistics.fmean(vals) if all(math.isfinite(v) for v in vals) else (
                -math.inf if higher else math.inf)

        print(f"\n#### {problem}: {m.label}, {BUDGET[problem]} epoch(s), seeds {seeds}\n")
        print("| optimizer | " + m.label + (" | reached global (< 1e-4)" if problem ==
                                            "teacher_student" else "") + " |")
        print("|---|---|" + ("---|" if problem == "teacher_student" else ""))
        rows: list[tuple[str, str]] = []
        for base in GRIDS:
            labs = [lab for lab in complete if lab.split("@")[0] == base]
            if labs:
                best = max(labs, key=lambda lab: sign * mean_of(lab, m.valid))
                rows.append((f"{base} best grid ({best.split('@')[1]})", best))
        rows += [(lab, lab) for lab in LR_FREE if lab in complete]
        for shown, lab in rows:
            vals = [_value(complete[lab][s], m.test, m.higher_is_better) for s in seeds]
            cell = _mean_std(vals)
            if problem == "teacher_student":
                hits = sum(_value(complete[lab][s], "valid_loss", False) < 1e-4 for s in seeds)
                cell += f" | {hits}/{len(seeds)}"
            print(f"| {shown} | {cell} |")
        grid_lines = []
        for base, (key, _) in GRIDS.items():
            labs = sorted((lab for lab in complete if lab.split("@")[0] == base),
                          key=lambda lab: float(lab.split("=")[1]))
            cells = [f"{lab.split('=')[1]}: {mean_of(lab, m.valid):.4g}" for lab in labs]
            if cells:
                grid_lines.append(f"{base} {key} → {'; '.join(cells)}")
        if grid_lines:
            print(f"\nGrids, validation {m.valid} (mean over seeds; ±inf = diverged): "
                  + " · ".join(grid_lines))
        scores[problem] = {lab: sign * mean_of(lab, m.test) for lab in LR_FREE if lab in complete}
    # rank only the optimizers that have results on every problem, among themselves
    common = [lab for lab in LR_FREE if all(lab in sc for sc in scores.values())]
    ranks: dict[str, list[float]] = {lab: [] for lab in common}
    for sc in scores.values():
        for lab in common:  # 1 = best; ties share the mean of their positions
            better = sum(sc[o] > sc[lab] for o in common)
            equal = sum(sc[o] == sc[lab] for o in common)
            ranks[lab].append(better + (equal + 1) / 2)
    if common and scores:
        print(f"\n#### Average rank among the learning-rate-free optimizers ({len(scores)} "
              f"problems: {', '.join(scores)}; {len(common)} optimizers)\n")
        print("| optimizer | average rank | per problem |")
        print("|---|---|---|")
        for lab, r in sorted(ranks.items(), key=lambda kv: statistics.fmean(kv[1])):
            print(f"| {lab} | {statistics.fmean(r):.2f} | {', '.join(f'{x:g}' for x in r)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--out", default="runs/suite")
    p_run.add_argument("--problems", nargs="+", default=list(BUDGET), choices=list(BUDGET))
    p_run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p_run.add_argument("--edges", action="store_true",
                       help="also run the grid points beyond the core grids' ends (EDGES)")
    p_rep = sub.add_parser("report")
    p_rep.add_argument("--out", default="runs/suite")
    args = parser.parse_args()
    (run if args.cmd == "run" else report)(args)


if __name__ == "__main__":
    main()
