"""Sensitivity table and plot for docs/results.md §3a from `bpgrad compare` run folders.

Usage: python benchmarks/lipschitz_sensitivity.py runs/lip_mnist_lenet runs/lip_fmnist_2c2d

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


def main(runs: list[str], out: Path = Path("docs/img/lipschitz_sensitivity.png")) -> None:
    rows = collect(runs)
    stats = {}
    for (problem, label), values in sorted(rows.items()):
        valid = [v for v, _ in values]
        test = [t for _, t in values]
        sd = statistics.stdev(test) if len(test) > 1 else 0.0
        stats[(problem, label)] = (statistics.fmean(valid), statistics.fmean(test), sd)
        print(f"| {problem} | {label} | {len(values)} | {100 * statistics.fmean(valid):.2f} | "
              f"{100 * statistics.fmean(test):.2f} ± {100 * sd:.2f} |")
    problems = sorted({p for p, _ in stats})
    fig, axes = plt.subplots(1, len(problems), figsize=(5.5 * len(problems), 4), squeeze=False)
    for ax, problem in zip(axes[0], problems, strict=True):
        for name, (key, ref, label) in CURVES.items():
            points = []
            for (p, variant), (_, test, sd) in stats.items():
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
        ax.set_xscale("log")
        ax.set_xlabel("multiplier on L  (larger = smaller steps)")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(problem)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:])
