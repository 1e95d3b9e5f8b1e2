"""Sensitivity table and plot for docs/results.md §3a from `bpgrad compare` run folders.

Usage: python benchmarks/lipschitz_sensitivity.py runs/lip_mnist_lenet runs/lip_fmnist_2c2d
       python benchmarks/lipschitz_sensitivity.py --no-plot runs/lip1ep_mnist_lenet runs/lip1ep_fmnist_2c2d

Diverged trials count with the accuracy the harness recorded for them (chance level).
Prints one markdown row per (problem, variant): seeds, mean final valid and test accuracy (test
± sample std over seeds), and writes docs/img/lipschitz_sensitivity.png: final test accuracy
against a multiplier on L (BPGrad fixed: L/4; BPGrad auto: c with L = c * L_hat, run as lr = 1/c)
or on the inverse learning rate (Adam: 1e-3/lr; SGD: 1e-2/lr), so that every curve moves the
step size the same way along the x axis.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# name -> (swept key, reference value, label); x = ref/value for lr-like keys, value/ref for L
CURVES = {
    "bpgrad": ("lipschitz", 4.0, "BPGrad fixed L (x = L/4)"),
    "bpgrad_auto": ("lr", 1.0, "BPGrad auto (x = c, L = c L_hat)"),
    "adam": ("lr", 1e-3, "Adam (x = 1e-3/lr)"),
    "sgd": ("lr", 1e-2, "SGD (x = 1e-2/lr)"),
}


def collect(runs: list[str]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for run in runs:
        for f in sorted(Path(run).glob("*/*/seed_*.jsonl")):
            summary = None
            for line in f.read_text().splitlines():
                record = json.loads(line)
                if record.get("kind") == "summary":
                    summary = record
            if summary is None or summary.get("status") not in ("finished", "diverged"):
                continue
            final = summary["final"]
            key = (f.parent.parent.name, f.parent.name)
            rows.setdefault(key, []).append((final["valid_accuracy"], final["test_accuracy"]))
    return rows


#: learning-rate-free peers, run at their defaults (the "peers" part of lipschitz_study.sh)
PEERS = ("prodigy", "dadapt_adam", "dog", "schedulefree_adamw", "dadapt_sgd", "schedulefree_sgd",
         "alig")
AUTO_DEFAULT = "bpgrad_auto@lr=1"


def _best_on_valid(
    stats: dict[tuple[str, str], tuple[float, float, float, int]], problem: str, name: str
) -> tuple[str, tuple[float, float, float, int]] | None:
    """The variant of ``name`` with the best mean validation accuracy (how the harness selects)."""
    variants = [(label, v) for (p, label), v in stats.items()
                if p == problem and (label == name or label.startswith(name + "@"))]
    return max(variants, key=lambda item: item[1][0]) if variants else None


def _ranks(values: dict[str, float]) -> dict[str, float]:
    """Rank 1 = highest value; ties share the mean of their ranks."""
    ordered = sorted(values, key=lambda k: -values[k])
    ranks: dict[str, float] = {}
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and values[ordered[j + 1]] == values[ordered[i]]:
            j += 1
        for k in ordered[i:j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _auto_default(
    stats: dict[tuple[str, str], tuple[float, float, float, int]], problem: str
) -> tuple[float, float, float, int] | None:
    """Auto at its defaults: ``bpgrad_auto@lr=1`` in a multiplier sweep, ``bpgrad_auto`` alone."""
    return stats.get((problem, AUTO_DEFAULT)) or stats.get((problem, "bpgrad_auto"))


def _lookup(
    stats: dict[tuple[str, str], tuple[float, float, float, int]], problem: str, name: str
) -> tuple[float, float, float, int] | None:
    return _auto_default(stats, problem) if name == AUTO_DEFAULT else stats.get((problem, name))


def headline(stats: dict[tuple[str, str], tuple[float, float, float, int]]) -> None:
    """Issue 7's headline: auto at its defaults vs best-grid Adam/SGD and the peers' defaults."""
    problems = sorted({p for p, _ in stats})

    def cell(v: tuple[float, float, float, int] | None, label: str = "") -> str:
        if v is None:
            return "not run"
        tag = f" ({label})" if label else ""
        return f"{100 * v[1]:.2f} ± {100 * v[2]:.2f}{tag} [{v[3]}]"

    print("\n| problem | BPGrad auto (defaults) | Adam best grid | SGD best grid | gap to best of "
          "Adam/SGD | BPGrad fixed L best grid |")
    print("|---|---|---|---|---|---|")
    for problem in problems:
        auto = _auto_default(stats, problem)
        best = {n: _best_on_valid(stats, problem, n) for n in ("adam", "sgd", "bpgrad")}
        tuned = [b[1][1] for n, b in best.items() if b is not None and n != "bpgrad"]
        gap = (f"{100 * (auto[1] - max(tuned)):+.2f}" if auto is not None and tuned else "-")
        fixed = best["bpgrad"]
        print(f"| {problem} | {cell(auto)} | "
              + " | ".join(cell(b[1], b[0].split("@", 1)[1]) if b else "not run"
                           for b in (best["adam"], best["sgd"]))
              + f" | {gap} | {cell(fixed[1], fixed[0].split('@', 1)[1]) if fixed else 'not run'} |")
    names = [AUTO_DEFAULT, *PEERS]
    print("\n| learning-rate-free | " + " | ".join(problems) + " | average rank |")
    print("|---|" + "---|" * (len(problems) + 1))
    per_problem = {}
    for problem in problems:
        values = {n: v[1] for n in names if (v := _lookup(stats, problem, n)) is not None}
        per_problem[problem] = _ranks(values)
    for n in names:
        cells = []
        ranks = []
        for problem in problems:
            v = _lookup(stats, problem, n)
            if v is None:
                cells.append("not run")
                continue
            r = per_problem[problem][n]
            ranks.append(r)
            cells.append(f"{cell(v)} (rank {r:g})")
        avg = f"{statistics.fmean(ranks):.2f}" if len(ranks) == len(problems) else "-"
        label = "BPGrad auto" if n == AUTO_DEFAULT else n
        print(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
    print("\nCells: mean ± sample std of final test accuracy (%) over seeds [seeds]; Adam/SGD/fixed L "
          "selected by mean final validation accuracy.")


def main(runs: list[str], out: Path | None = Path("docs/img/lipschitz_sensitivity.png")) -> None:
    rows = collect(runs)
    stats = {}
    for (problem, label), values in sorted(rows.items()):
        valid = [v for v, _ in values]
        test = [t for _, t in values]
        sd = statistics.stdev(test) if len(test) > 1 else 0.0
        stats[(problem, label)] = (statistics.fmean(valid), statistics.fmean(test), sd, len(test))
        print(f"| {problem} | {label} | {len(values)} | {100 * statistics.fmean(valid):.2f} | "
              f"{100 * statistics.fmean(test):.2f} ± {100 * sd:.2f} |")
    if out is None:
        headline(stats)
        return
    problems = sorted({p for p, _ in stats})
    fig, axes = plt.subplots(1, len(problems), figsize=(5.5 * len(problems), 4), squeeze=False)
    for ax, problem in zip(axes[0], problems, strict=True):
        for name, (key, ref, label) in CURVES.items():
            points = []
            for (p, variant), (_, test, sd, _n) in stats.items():
                match = re.fullmatch(rf"{name}@{key}=([0-9.e+-]+)", variant)
                if p != problem or match is None:
                    continue
                value = float(match.group(1))
                x = value / ref if key == "lipschitz" else ref / value
                points.append((x, 100 * test, 100 * sd))
            if points:
                points.sort()
                ax.errorbar([q[0] for q in points], [q[1] for q in points],
                            yerr=[q[2] for q in points], marker="o", capsize=3, label=label)
        peers = [(stats[(problem, n)][1], n) for n in PEERS if (problem, n) in stats]
        if peers:
            # The best learning-rate-free peer at its defaults: the bar auto has to clear.
            acc, name = max(peers)
            ax.axhline(100 * acc, color="grey", linestyle="--", linewidth=1,
                       label=f"best LR-free peer ({name}, defaults)")
        ax.set_xscale("log")
        ax.set_xlabel("multiplier on L  (larger = smaller steps)")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(problem)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    headline(stats)


if __name__ == "__main__":
    args = sys.argv[1:]
    plot: Path | None = Path("docs/img/lipschitz_sensitivity.png")
    if "--no-plot" in args:
        args.remove("--no-plot")
        plot = None
    main(args, plot)
