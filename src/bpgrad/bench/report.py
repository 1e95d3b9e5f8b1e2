"""``report.md`` for a run folder: setup, tables, sweep choices, plots, regenerating commands."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from bpgrad.bench.analysis import (
    Analysis,
    analyse,
    epoch_curves,
    format_table,
    loss_curves,
    selection_table,
    series_curves,
    table_rows,
)
from bpgrad.bench.results import Trial, atomic_write_text

REPORT_NAME = "report.md"
PLOTS_DIR = "plots"


def _setup_lines(trials: list[Trial]) -> list[str]:
    first = trials[0].config
    budget, data = first["budget"], first.get("data", {})
    env = first["environment"]
    commits = sorted({str(t.config["environment"].get("git_commit")) for t in trials})
    torches = sorted({str(t.config["environment"].get("torch")) for t in trials})
    seeds = sorted({t.seed for t in trials})
    limit = budget.get("limit_train_batches")
    lines = [
        f"- problem: `{first['problem']['name']}` — {first['problem'].get('description', '')}",
        f"- budget: {budget['epochs']} epoch(s) × {budget['steps_per_epoch']} steps, batch "
        f"{budget['batch_size']}"
        + (f" ({budget['world_size']} processes × {budget['per_rank_batch_size']})"
           if budget.get("world_size") else "")
        + (f" (limited to {limit} minibatches per epoch)" if limit else ""),
        f"- data: {data.get('train_size')} train / {data.get('valid_size')} validation (carved "
        f"from the training set, seed {data.get('data_seed')}) / {data.get('test_size')} test",
        f"- seeds: {', '.join(str(s) for s in seeds)}",
        f"- device: {first.get('device')}, {first.get('threads')} torch thread(s), host "
        f"`{env.get('hostname')}`, {env.get('cpu_count')} CPUs",
        f"- versions: torch {', '.join(torches)}, numpy {env.get('numpy')}, bpgrad "
        f"{env.get('bpgrad')}, Python {env.get('python')}; git commit(s) "
        + ", ".join(f"`{c[:12]}`" for c in commits),
    ]
    return lines


def _hyper_table(trials: list[Trial], labels: list[str]) -> str:
    seen: dict[str, dict[str, Any]] = {}
    for t in trials:
        if t.label in labels and t.label not in seen:
            opt = t.config["optimizer"]
            seen[t.label] = {"hp": opt.get("hyperparameters", {}),
                             "pkg": f"{opt.get('distribution')} {opt.get('version') or ''}"}
    cells = [[label, ", ".join(f"{k}={v}" for k, v in seen[label]["hp"].items()),
              seen[label]["pkg"].strip()] for label in labels if label in seen]
    return format_table(["optimizer", "hyperparameters", "package"], cells)


def write_report(run_dir: Path, *, analysis: Analysis | None = None,
                 target: float | None = None) -> Path:
    """Analyse ``run_dir`` (unless ``analysis`` is given), draw the plots, write ``report.md``."""
    from bpgrad.bench import plots  # matplotlib only when a report is written

    run_dir = Path(run_dir)
    an = analysis if analysis is not None else analyse(run_dir, target=target)
    manifest = an.manifest or {}
    out: list[str] = [f"# bpgrad comparison: `{run_dir.name}`", ""]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out += [f"Generated {now} from the result files under `{run_dir}`.", ""]
    out += ["Regenerate the results (finished trials are skipped, interrupted ones resumed) and "
            "this report:", "", "```sh"]
    if manifest.get("command"):
        out.append(str(manifest["command"]))
    else:
        out.append("# (no run.json: the run command was not recorded)")
    out += ["```", "", "Only this report and its plots, from the existing results:", "", "```sh",
            f"bpgrad report {run_dir}", "```", ""]
    if manifest.get("full_command") and manifest.get("full_command") != manifest.get("command"):
        out += ["The same run spelled out without the config file:", "", "```sh",
                str(manifest["full_command"]), "```", ""]

    if not an.rows:
        out += ["No finished trials yet.", ""]
    plot_dir = run_dir / PLOTS_DIR
    for problem in an.problems:
        trials = [t for t in an.trials if t.problem == problem]
        rows = an.rows_for(problem, selected_only=True)
        labels = [r.label for r in rows]
        has_acc = rows[0].has_accuracy
        out += [f"## {problem}", "", "### Setup", "", *_setup_lines(trials), ""]
        out += [_hyper_table(trials, labels), ""]
        out += ["### Results", ""]
        target_value = rows[0].target
        what = "test accuracy" if has_acc else "test loss"
        out += [
            "Mean ± sample std over the seeds that finished. *Final* = after the last epoch; "
            "*final train loss* = mean minibatch loss over the last epoch (train mode); *best "
            "test acc* = best epoch. *Steps/time to target*: first epoch with "
            + (f"{what} {'≥' if has_acc else '≤'} {target_value:.4g}"
               if target_value is not None else "the target")
            + " (reached by k of n seeds). Diverged seeds (non-finite loss) are counted, not "
            "averaged.", "",
        ]
        header, cells = table_rows(rows)
        out += [format_table(header, cells), ""]
        sels = [s for s in an.selections if s.problem == problem]
        if sels:
            out += ["### Sweeps: selection on the validation split", "",
                    "Each swept optimizer is represented above by the variant with the best mean "
                    "final validation metric (validation examples are carved from the training "
                    "set; the test set plays no part in the choice). The test metrics above are "
                    "those of the selected variant.", ""]
            for sel in sels:
                h, c = selection_table(sel)
                out += [f"**{sel.name}**", "", format_table(h, c), ""]
            all_rows = an.rows_for(problem)
            h, c = table_rows(all_rows)
            out += ["All variants:", "", format_table(h, c), ""]
        diverged = [r for r in an.rows_for(problem) if r.n_diverged]
        incomplete = [r for r in an.rows_for(problem) if r.n_incomplete]
        if diverged or incomplete:
            out += ["Notes:", ""]
            out += [f"- `{r.label}`: {r.n_diverged} of {len(r.seeds)} seed(s) diverged"
                    for r in diverged]
            out += [f"- `{r.label}`: {r.n_incomplete} seed(s) not finished (rerun the command "
                    "to resume)" for r in incomplete]
            out.append("")

        out += ["### Plots", ""]
        figures = [
            ("train_loss", "training loss against step",
             plots.train_loss_figure(loss_curves(trials, labels=labels),
                                     title=f"{problem}: training loss")),
        ]
        if has_acc:
            figures.append(("test_error", "test error against epoch", plots.test_error_figure(
                epoch_curves(trials, "test_error", labels=labels),
                title=f"{problem}: test error")))
        else:
            figures.append(("test_loss", "test loss against epoch", plots.test_error_figure(
                epoch_curves(trials, "test_loss", labels=labels),
                title=f"{problem}: test loss", ylabel="test loss")))
        eta = series_curves(trials, "eta", labels=labels)
        if eta:
            figures.append(("eta", "BPGrad's step size eta_t against step",
                            plots.eta_figure(eta, title=f"{problem}: eta_t")))
        for stem, caption, fig in figures:
            plots.save_figure(fig, plot_dir / f"{problem}_{stem}")
            out += [f"![{caption}]({PLOTS_DIR}/{problem}_{stem}.png)", "",
                    f"*{caption.capitalize()}* ([SVG]({PLOTS_DIR}/{problem}_{stem}.svg)); bands: "
                    "± std over seeds.", ""]
    path = run_dir / REPORT_NAME
    atomic_write_text(path, "\n".join(out).rstrip() + "\n")
    return path
