"""``report.md`` and ``report.html`` for a run folder: setup, tables, sweep choices, curves.

Both files are rendered from one list of :class:`Block` (:func:`report_blocks`), so they hold
the same text and tables; they differ only in the curves: PNG/SVG plots drawn by matplotlib in
the markdown, interactive SVG charts in the page (:mod:`bpgrad.bench.html_report`).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpgrad.bench.analysis import (
    Analysis,
    analyse,
    epoch_curves,
    evaluation_axis,
    format_table,
    loss_curves,
    selection_table,
    series_curves,
    table_rows,
)
from bpgrad.bench.results import Trial, atomic_write_text

REPORT_NAME = "report.md"
PLOTS_DIR = "plots"


@dataclass(frozen=True)
class Block:
    """One piece of the report, rendered to markdown or HTML.

    ``kind`` is ``h1``/``h2``/``h3`` (``text``; ``anchor`` for the page), ``p`` (``text`` with
    inline markdown: code, strong, em), ``ul`` (``items``), ``code`` (``text``, a shell
    snippet), ``table`` (``header``, ``cells``; ``text`` is an optional bold title) or
    ``curves`` (``text`` = the problem whose curves go here).
    """

    kind: str
    text: str = ""
    items: tuple[str, ...] = ()
    header: tuple[str, ...] = ()
    cells: tuple[tuple[str, ...], ...] = ()
    anchor: str = ""


def _table(header: Sequence[str], cells: Sequence[Sequence[str]], title: str = "") -> Block:
    return Block("table", text=title, header=tuple(header),
                 cells=tuple(tuple(row) for row in cells))


def _setup_lines(trials: list[Trial]) -> list[str]:
    first = trials[0].config
    budget, data = first["budget"], first.get("data", {})
    env = first["environment"]
    commits = sorted({str(t.config["environment"].get("git_commit")) for t in trials})
    torches = sorted({str(t.config["environment"].get("torch")) for t in trials})
    seeds = sorted({t.seed for t in trials})
    limit = budget.get("limit_train_batches")
    lines = [
        f"problem: `{first['problem']['name']}` — {first['problem'].get('description', '')}",
        f"budget: {budget['epochs']} epoch(s) × {budget['steps_per_epoch']} steps, batch "
        f"{budget['batch_size']}"
        + (f" ({budget['world_size']} processes × {budget['per_rank_batch_size']})"
           if budget.get("world_size") else "")
        + (f" (limited to {limit} minibatches per epoch)" if limit else "")
        + (f", evaluated every {budget['eval_interval']} steps and at epoch ends"
           if budget.get("eval_interval") else ""),
        f"data: {data.get('train_size')} train / {data.get('valid_size')} validation (carved "
        f"from the training set, seed {data.get('data_seed')}) / {data.get('test_size')} test",
        f"seeds: {', '.join(str(s) for s in seeds)}",
        f"device: {first.get('device')}, {first.get('threads')} torch thread(s), host "
        f"`{env.get('hostname')}`, {env.get('cpu_count')} CPUs",
        f"versions: torch {', '.join(torches)}, numpy {env.get('numpy')}, bpgrad "
        f"{env.get('bpgrad')}, Python {env.get('python')}; git commit(s) "
        + ", ".join(f"`{c[:12]}`" for c in commits),
    ]
    return lines


def _hyper_table(trials: list[Trial], labels: list[str]) -> Block:
    seen: dict[str, dict[str, Any]] = {}
    for t in trials:
        if t.label in labels and t.label not in seen:
            opt = t.config["optimizer"]
            seen[t.label] = {"hp": opt.get("hyperparameters", {}),
                             "pkg": f"{opt.get('distribution')} {opt.get('version') or ''}"}
    cells = [[label, ", ".join(f"{k}={v}" for k, v in seen[label]["hp"].items()),
              seen[label]["pkg"].strip()] for label in labels if label in seen]
    return _table(["optimizer", "hyperparameters", "package"], cells)


def _intro_blocks(an: Analysis, generated: str) -> list[Block]:
    run_dir, manifest = an.run_dir, an.manifest or {}
    out = [Block("h1", f"bpgrad comparison: `{run_dir.name}`"),
           Block("p", f"Generated {generated} from the result files under `{run_dir}`."),
           Block("p", "Regenerate the results (finished trials are skipped, interrupted ones "
                 "resumed) and this report:"),
           Block("code", str(manifest["command"]) if manifest.get("command")
                 else "# (no run.json: the run command was not recorded)"),
           Block("p", "Only this report and its plots, from the existing results:"),
           Block("code", f"bpgrad report {run_dir}")]
    if manifest.get("full_command") and manifest.get("full_command") != manifest.get("command"):
        out += [Block("p", "The same run spelled out without the config file:"),
                Block("code", str(manifest["full_command"]))]
    if not an.rows:
        out.append(Block("p", "No finished trials yet."))
    return out


def _problem_blocks(an: Analysis, problem: str) -> list[Block]:
    trials = [t for t in an.trials if t.problem == problem]
    rows = an.rows_for(problem, selected_only=True)
    labels = [r.label for r in rows]
    has_acc = rows[0].has_accuracy
    out = [Block("h2", problem, anchor=problem), Block("h3", "Setup"),
           Block("ul", items=tuple(_setup_lines(trials))), _hyper_table(trials, labels),
           Block("h3", "Results")]
    target_value = rows[0].target
    what = "test accuracy" if has_acc else "test loss"
    out.append(Block("p", (
        "Mean ± sample std over the seeds that finished. *Final* = after the last epoch; "
        "*final train loss* = mean minibatch loss over the last epoch (train mode); *best "
        "test acc* = best epoch. *Steps/time to target*: first evaluation with "
        + (f"{what} {'≥' if has_acc else '≤'} {target_value:.4g}"
           if target_value is not None else "the target")
        + " (reached by k of n seeds). Diverged seeds (non-finite loss) are counted, not "
        "averaged.")))
    out.append(_table(*table_rows(rows)))
    sels = [s for s in an.selections if s.problem == problem]
    if sels:
        out += [Block("h3", "Sweeps: selection on the validation split"),
                Block("p", "Each swept optimizer is represented above by the variant with the "
                      "best mean final validation metric (validation examples are carved from "
                      "the training set; the test set plays no part in the choice). The test "
                      "metrics above are those of the selected variant.")]
        out += [_table(*selection_table(sel), title=f"**{sel.name}**") for sel in sels]
        out += [Block("p", "All variants:"), _table(*table_rows(an.rows_for(problem)))]
    diverged = [r for r in an.rows_for(problem) if r.n_diverged]
    incomplete = [r for r in an.rows_for(problem) if r.n_incomplete]
    if diverged or incomplete:
        notes = [f"`{r.label}`: {r.n_diverged} of {len(r.seeds)} seed(s) diverged"
                 for r in diverged]
        notes += [f"`{r.label}`: {r.n_incomplete} seed(s) not finished (rerun the command to "
                  "resume)" for r in incomplete]
        out += [Block("p", "Notes:"), Block("ul", items=tuple(notes))]
    out += [Block("h3", "Plots"), Block("curves", problem)]
    return out


def report_blocks(an: Analysis, *, generated: str | None = None) -> list[Block]:
    """The report's content, for both renderers (``generated``: timestamp, default now)."""
    if generated is None:
        generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = _intro_blocks(an, generated)
    for problem in an.problems:
        out += _problem_blocks(an, problem)
    return out


def render_markdown(blocks: Sequence[Block], curves: Callable[[str], list[str]]) -> str:
    """Markdown of ``blocks``; ``curves(problem)`` gives the lines that stand for its curves."""
    out: list[str] = []
    hashes = {"h1": "#", "h2": "##", "h3": "###"}
    for b in blocks:
        if b.kind in hashes:
            out += [f"{hashes[b.kind]} {b.text}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "ul":
            out += [f"- {item}" for item in b.items] + [""]
        elif b.kind == "code":
            out += ["```sh", b.text, "```", ""]
        elif b.kind == "table":
            out += ([b.text, ""] if b.text else []) + [format_table(b.header, b.cells), ""]
        elif b.kind == "curves":
            out += curves(b.text)
        else:
            raise ValueError(f"unknown report block kind {b.kind!r}")
    return "\n".join(out).rstrip() + "\n"


def _markdown_plots(an: Analysis, problem: str, plot_dir: Path) -> list[str]:
    """Draw the problem's PNG/SVG plots; returns the markdown that shows them."""
    from bpgrad.bench import plots  # matplotlib only when a report is written

    trials = [t for t in an.trials if t.problem == problem]
    rows = an.rows_for(problem, selected_only=True)
    labels = [r.label for r in rows]
    axis = evaluation_axis(trials)
    figures: list[tuple[str, str, Any]] = [
        ("train_loss", "training loss against step",
         plots.train_loss_figure(loss_curves(trials, labels=labels),
                                 title=f"{problem}: training loss")),
    ]
    if rows[0].has_accuracy:
        figures.append(("test_error", f"test error against {axis}", plots.test_error_figure(
            epoch_curves(trials, "test_error", labels=labels, x=axis),
            title=f"{problem}: test error", xlabel=axis)))
    else:
        figures.append(("test_loss", f"test loss against {axis}", plots.test_error_figure(
            epoch_curves(trials, "test_loss", labels=labels, x=axis),
            title=f"{problem}: test loss", ylabel="test loss", xlabel=axis)))
    eta = series_curves(trials, "eta", labels=labels)
    if eta:
        figures.append(("eta", "BPGrad's step size eta_t against step",
                        plots.eta_figure(eta, title=f"{problem}: eta_t")))
    out: list[str] = []
    for stem, caption, fig in figures:
        plots.save_figure(fig, plot_dir / f"{problem}_{stem}")
        out += [f"![{caption}]({PLOTS_DIR}/{problem}_{stem}.png)", "",
                f"*{caption.capitalize()}* ([SVG]({PLOTS_DIR}/{problem}_{stem}.svg)); bands: "
                "± std over seeds.", ""]
    return out


def write_report(run_dir: Path, *, analysis: Analysis | None = None,
                 target: float | None = None) -> Path:
    """Analyse ``run_dir`` (unless ``analysis`` is given) and write ``report.md`` (with its
    plots) and ``report.html`` beside it; returns the markdown's path."""
    from bpgrad.bench.html_report import HTML_NAME, write_html

    run_dir = Path(run_dir)
    an = analysis if analysis is not None else analyse(run_dir, target=target)
    blocks = report_blocks(an)
    text = render_markdown(blocks, lambda p: _markdown_plots(an, p, run_dir / PLOTS_DIR))
    path = run_dir / REPORT_NAME
    atomic_write_text(path, text)
    write_html(run_dir / HTML_NAME, f"bpgrad comparison: {run_dir.name}", blocks, an)
    return path
