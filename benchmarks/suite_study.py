"""Issue 12's short study on the wider suite: every new problem x {BPGrad auto at its defaults,
BPGrad fixed-L grid, Adam and SGD learning-rate grids, every learning-rate-free peer at its
defaults}, a short budget per problem. Resumable: finished trials are skipped, an unfinished one
starts again (the trials are short and write no checkpoint); loops seed-major so that an
interrupted run leaves whole seeds.

    nice -n 10 .venv/bin/python benchmarks/suite_study.py run --out runs/suite \\
        --problems teacher_student segment_mlp --seeds 0 1 2
    .venv/bin/python benchmarks/suite_study.py report --out runs/suite
    .venv/bin/python benchmarks/suite_study.py plot --out runs/suite \\
        --image docs/img/suite_study.png

``report`` prints markdown: per problem the metric of record (mean ± std over the seeds found),
the grid point of Adam / SGD / fixed-L BPGrad chosen on the validation split, and the average rank
of the learning-rate-free optimizers across the problems that have results.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bpgrad.bench.optimizers import ResolvedOptimizer, resolve_optimizer
from bpgrad.bench.problems import get_problem
from bpgrad.bench.runner import Budget, RunOptions, TrialOutcome, run_trial

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


def run_trials(problems: list[str], seeds: list[int], optimizers: list[ResolvedOptimizer], *,
               out: Path, epochs: int | None = None,
               after: Callable[[str, ResolvedOptimizer, int, TrialOutcome], None] | None = None,
               ) -> None:
    """Every problem x seed x optimizer (seed-major, so an interrupted run leaves whole seeds),
    one torch thread; finished trials are skipped. ``after`` sees each outcome."""
    torch.set_num_threads(1)
    for problem_name in problems:
        problem = get_problem(problem_name)
        splits = problem.load(seed=0)
        budget = Budget(epochs or BUDGET[problem_name])
        metric = METRIC[problem_name]
        for seed in seeds:
            for opt in optimizers:
                outcome = run_trial(problem, opt, seed, budget, out=out, splits=splits,
                                    options=RunOptions(quiet=True, threads=1, checkpoint=False))
                if after is not None:
                    after(problem_name, opt, seed, outcome)
                final = outcome.summary.get("final", {})
                print(f"{problem_name} {opt.label} seed {seed}: {outcome.status}"
                      f"{' (skipped)' if outcome.skipped else ''} "
                      f"{metric.test}={final.get(metric.test)}", flush=True)


def run(args: argparse.Namespace) -> None:
    optimizers = [opt for opt in variants(args.edges) if not args.only or opt.label in args.only]
    run_trials(args.problems, args.seeds, optimizers, out=Path(args.out), epochs=args.epochs)


def trial_finals(out: Path, problem: str) -> dict[str, dict[int, dict[str, Any]]]:
    """label -> seed -> (final metrics + status) of every finished trial file."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted((out / problem).glob("*/seed_*.jsonl")):
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        if not lines or lines[-1].get("kind") != "summary":
            continue
        seed = int(path.stem.split("_")[1])
        found.setdefault(path.parent.name, {})[seed] = {
            **lines[-1].get("final", {}), "status": lines[-1]["status"],
            "epochs": lines[0].get("budget", {}).get("epochs")}
    return found


def seed_values(per_seed: dict[int, dict[str, Any]], key: str) -> list[float]:
    """``key`` of each seed's trial in seed order (one entry of ``trial_finals``); NaN for a
    trial that did not finish or lacks the metric."""
    return [final.get(key, math.nan) if final["status"] == "finished" else math.nan
            for _, final in sorted(per_seed.items())]


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


@dataclass
class ProblemSummary:
    """One problem's finished trials: the seeds all rows share and each row's test values."""

    problem: str
    seeds: list[int]
    #: (shown label, trial folder label, test metric per seed), grid winners first
    rows: list[tuple[str, str, list[float]]]
    #: per grid base: (key, [(value, mean valid metric)])
    grids: dict[str, tuple[str, list[tuple[str, float]]]]
    #: LR-free label -> signed mean test metric (higher = better)
    scores: dict[str, float]
    #: the trials' budget in epochs (from their config records)
    epochs: int | None = None


def summarize(out: Path, problem: str) -> ProblemSummary | None:
    """Aggregate ``out/<problem>``: the grid point chosen on validation and every LR-free row."""
    finals = trial_finals(out, problem)
    if not finals:
        return None
    m = METRIC[problem]
    # the seeds every variant found has finished (a run in progress adds seeds one by one);
    # with none in common, the first seed and the variants that finished it
    seeds = sorted(set.intersection(*(set(per) for per in finals.values())))
    if not seeds:
        seeds = [min(s for per in finals.values() for s in per)]
    complete = {lab: per for lab, per in finals.items() if set(seeds) <= set(per)}
    sign = 1.0 if m.higher_is_better else -1.0

    def values(lab: str, key: str) -> list[float]:
        return [_value(complete[lab][s], key, m.higher_is_better) for s in seeds]

    def mean_of(lab: str, key: str) -> float:
        vals = values(lab, key)
        return statistics.fmean(vals) if all(math.isfinite(v) for v in vals) else (
            -math.inf if m.higher_is_better else math.inf)

    rows: list[tuple[str, str, list[float]]] = []
    grids: dict[str, tuple[str, list[tuple[str, float]]]] = {}
    for base, (key, _) in GRIDS.items():
        labs = sorted((lab for lab in complete if lab.split("@")[0] == base),
                      key=lambda lab: float(lab.split("=")[1]))
        if labs:
            best = max(labs, key=lambda lab: sign * mean_of(lab, m.valid))
            rows.append((f"{base} best grid ({best.split('@')[1]})", best, values(best, m.test)))
            grids[base] = (key, [(lab.split("=")[1], mean_of(lab, m.valid)) for lab in labs])
    rows += [(lab, lab, values(lab, m.test)) for lab in LR_FREE if lab in complete]
    scores = {lab: sign * mean_of(lab, m.test) for lab in LR_FREE if lab in complete}
    epochs = {per[s].get("epochs") for per in complete.values() for s in seeds}
    return ProblemSummary(problem, seeds, rows, grids, scores,
                          epochs.pop() if len(epochs) == 1 else None)


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    scores: dict[str, dict[str, float]] = {}  # problem -> LR-free label -> signed mean
    for problem in METRIC:
        summary = summarize(out, problem)
        if summary is None:
            continue
        m = METRIC[problem]
        ts = problem == "teacher_student"
        print(f"\n#### {problem}: {m.label}, {summary.epochs} epoch(s), seeds {summary.seeds}\n")
        print("| optimizer | " + m.label + (" | reached global (< 1e-4)" if ts else "") + " |")
        print("|---|---|" + ("---|" if ts else ""))
        for shown, _, vals in summary.rows:
            cell = _mean_std(vals)
            if ts:  # valid_loss is the metric of record here: hits of the known optimum 0
                cell += f" | {sum(v < 1e-4 for v in vals)}/{len(vals)}"
            print(f"| {shown} | {cell} |")
        grid_lines = [f"{base} {key} → " + "; ".join(f"{v}: {score:.4g}" for v, score in cells)
                      for base, (key, cells) in summary.grids.items()]
        if grid_lines:
            print(f"\nGrids, validation {m.valid} (mean over seeds; ±inf = diverged): "
                  + " · ".join(grid_lines))
        scores[problem] = summary.scores
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


def plot(args: argparse.Namespace) -> None:
    """One panel per problem: every row's test metric, the mean over the seeds with a bar over the
    seeds' range (a range, not ± std, so that it stays positive on the log axis of the
    known-optimum problem) and each seed as a dot; BPGrad auto in red, the grid winners in grey.
    Diverged seeds are listed, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    summaries = [s for s in (summarize(out, p) for p in METRIC) if s is not None]
    if not summaries:
        raise SystemExit(f"no finished trials under {out}")
    cols = 2
    nrows = (len(summaries) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(12, 4.2 * nrows), squeeze=False)
    for ax, summary in zip(axes.flat, summaries, strict=False):
        m = METRIC[summary.problem]
        for y, (shown, lab, vals) in enumerate(summary.rows):
            finite = [v for v in vals if math.isfinite(v)]
            color = "tab:red" if lab == "bpgrad_auto" else (
                "grey" if "best grid" in shown else "tab:blue")
            if finite:
                mean = statistics.fmean(finite)
                # (clamped: the mean of equal values can round a hair past them)
                xerr = [[max(mean - min(finite), 0.0)], [max(max(finite) - mean, 0.0)]]
                ax.errorbar(mean, y, xerr=xerr, fmt="o", color=color, capsize=3)
                ax.plot(finite, [y] * len(finite), ".", color=color, alpha=0.4)
            if len(finite) < len(vals):
                shown += f" ({len(vals) - len(finite)} diverged)"
            summary.rows[y] = (shown, lab, vals)
        ax.set_yticks(range(len(summary.rows)), [r[0] for r in summary.rows], fontsize=8)
        ax.invert_yaxis()
        if summary.problem == "teacher_student":
            ax.set_xscale("log")
        better = "higher" if m.higher_is_better else "lower"
        ax.set_title(f"{summary.problem}: {m.label} ({better} is better), "
                     f"{summary.epochs} ep, {len(summary.seeds)} seeds", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(summaries):]:
        ax.set_visible(False)
    fig.tight_layout()
    target = Path(args.image)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(target)  # atomic: a reader never sees half an image
    print(f"wrote {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--out", default="runs/suite")
    p_run.add_argument("--problems", nargs="+", default=list(BUDGET), choices=list(BUDGET))
    p_run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p_run.add_argument("--epochs", type=int, default=None,
                       help="override the problem's short budget (for the long-budget study; "
                       "give it its own --out)")
    p_run.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                       help="run only these variants (folder labels, e.g. bpgrad_auto)")
    p_run.add_argument("--edges", action="store_true",
                       help="also run the grid points beyond the core grids' ends (EDGES)")
    p_rep = sub.add_parser("report")
    p_rep.add_argument("--out", default="runs/suite")
    p_plot = sub.add_parser("plot")
    p_plot.add_argument("--out", default="runs/suite")
    p_plot.add_argument("--image", default="docs/img/suite_study.png")
    args = parser.parse_args()
    {"run": run, "report": report, "plot": plot}[args.cmd](args)


if __name__ == "__main__":
    main()
