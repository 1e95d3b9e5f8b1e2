"""Pure analysis over result files: per-optimizer statistics, sweep selection, curves, tables.

Nothing here knows optimizer or problem names: rows are keyed by what the trial files say
(problem, optimizer label, registry name, swept hyperparameters). Functions take parsed
:class:`~bpgrad.bench.results.Trial` objects (or a run folder) and return plain data.

Definitions
-----------
* *final* metrics are the last epoch's; *best test accuracy* is the maximum over epochs >= 1.
* Statistics are over the seeds that **finished**; diverged seeds are counted, not averaged (their
  last metrics predate the divergence). ``std`` is the sample standard deviation (0 for one seed).
* *Steps / time to target*: the first evaluation (epoch end, or ``eval`` record with an
  evaluation interval) whose test accuracy reaches the target (test loss at or below it for
  problems without accuracy), as global step count and cumulative wall time.
  Averaged over the seeds that reached it. The default target is 95% of the best optimizer's mean
  final test accuracy (105% of the best mean final test loss), so it is always reachable by one.
* *Selection* (learning-rate or any other sweep): among the variants of one optimizer on one
  problem, the one with the best mean final **validation** accuracy (lowest validation loss
  without accuracy); variants with a diverged seed rank below all others. Test data never
  influence the choice.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bpgrad.bench.results import (
    RUN_MANIFEST,
    SchemaError,
    Trial,
    find_trial_files,
    parse_trial,
    read_manifest,
)
from bpgrad.bench.validation import read_checked


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation and count of a metric over seeds."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        """Statistics of the finite values (None and NaN are left out)."""
        vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not vals:
            return cls(None, None, 0)
        arr = np.asarray(vals, dtype=np.float64)
        std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
        return cls(float(arr.mean()), std, len(arr))

    def format(self, digits: int = 4, *, scale: float = 1.0) -> str:
        """``0.9812 ± 0.0013`` (or ``-`` without data)."""
        if self.mean is None or self.std is None:
            return "-"
        if self.n == 1:
            return f"{self.mean * scale:.{digits}f}"  # one seed: a spread of 0 would mislead
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


@dataclass
class Row:
    """One (problem, optimizer label) over its seeds."""

    problem: str
    label: str
    name: str
    swept: dict[str, Any]
    has_accuracy: bool
    seeds: list[int]
    n_diverged: int
    n_incomplete: int
    final_test_accuracy: Stat
    final_test_loss: Stat
    final_train_loss: Stat
    final_valid_accuracy: Stat
    final_valid_loss: Stat
    best_test_accuracy: Stat
    steps_to_target: Stat
    time_to_target: Stat
    wall_time: Stat
    target: float | None = None
    n_reached: int = 0
    #: set by :func:`select` when the row is its sweep's choice
    selected: bool = False

    @property
    def n_finished(self) -> int:
        """Seeds that finished without diverging."""
        return len(self.seeds) - self.n_diverged - self.n_incomplete


@dataclass
class Selection:
    """The chosen variant of one swept optimizer on one problem."""

    problem: str
    name: str
    chosen: str
    #: selection metric name (``final_valid_accuracy`` or ``final_valid_loss``)
    metric: str
    #: label -> mean validation metric (None when unusable)
    scores: dict[str, float | None]


@dataclass
class Curve:
    """Mean and band over seeds of one series, for one label."""

    label: str
    x: list[float]
    mean: list[float]
    std: list[float]
    n_seeds: int


@dataclass
class Analysis:
    """Everything a report needs, as plain data."""

    run_dir: Path
    rows: list[Row]
    selections: list[Selection]
    manifest: dict[str, Any] | None
    trials: list[Trial] = field(repr=False, default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Problems in the run, in first-seen order."""
        return list(dict.fromkeys(r.problem for r in self.rows))

    def rows_for(self, problem: str, *, selected_only: bool = False) -> list[Row]:
        """Rows of ``problem``; with ``selected_only``, one row per optimizer (sweep choices)."""
        rows = [r for r in self.rows if r.problem == problem]
        if selected_only:
            swept = {s.name for s in self.selections if s.problem == problem}
            rows = [r for r in rows if r.name not in swept or r.selected]
        return rows


def _final(trial: Trial, key: str) -> float | None:
    if not trial.epochs:
        return None
    value = trial.epochs[-1].get(key)
    return None if value is None else float(value)


def _reach(trial: Trial, target: float) -> tuple[float, float] | None:
    # Every evaluation counts: with an evaluation interval the target is located to within
    # that many steps rather than to within an epoch.
    for rec in evaluations(trial):
        if trial.has_accuracy:
            value = rec.get("test_accuracy")
            hit = value is not None and value >= target
        else:
            value = rec.get("test_loss")
            hit = value is not None and value <= target
        if hit:
            return float(rec["step"]), float(rec.get("wall_time") or 0.0)
    return None


def default_target(trials: Sequence[Trial]) -> float | None:
    """95% of the best label's mean final test accuracy (105% of the best mean test loss)."""
    finished = [t for t in trials if t.status == "finished"]
    if not finished:
        return None
    has_acc = finished[0].has_accuracy
    key = "test_accuracy" if has_acc else "test_loss"
    by_label: dict[str, list[float | None]] = {}
    for t in finished:
        by_label.setdefault(t.label, []).append(_final(t, key))
    means = [m for m in (Stat.of(v).mean for v in by_label.values()) if m is not None]
    if not means:
        return None
    return 0.95 * max(means) if has_acc else 1.05 * min(means)


def summarize(trials: Sequence[Trial], *, target: float | None = None,
              targets: Mapping[str, float] | None = None) -> list[Row]:
    """One :class:`Row` per (problem, label), in first-seen order.

    ``targets`` maps problem -> target; ``target`` applies to every problem not in it; problems
    with neither get :func:`default_target`.
    """
    groups: dict[tuple[str, str], list[Trial]] = {}
    for t in trials:
        groups.setdefault((t.problem, t.label), []).append(t)
    per_problem: dict[str, float | None] = {}
    for problem in dict.fromkeys(p for p, _ in groups):
        if targets and problem in targets:
            per_problem[problem] = targets[problem]
        elif target is not None:
            per_problem[problem] = target
        else:
            per_problem[problem] = default_target([t for t in trials if t.problem == problem])

    rows = []
    for (problem, label), group in groups.items():
        group = sorted(group, key=lambda t: t.seed)
        ok = [t for t in group if t.status == "finished"]
        tgt = per_problem[problem]
        reached = [r for r in (_reach(t, tgt) for t in ok) if r is not None] if tgt is not None \
            else []
        first = group[0]
        rows.append(Row(
            problem=problem, label=label, name=first.base, swept=first.swept,
            has_accuracy=first.has_accuracy, seeds=[t.seed for t in group],
            n_diverged=sum(t.status == "diverged" for t in group),
            n_incomplete=sum(t.status == "incomplete" for t in group),
            final_test_accuracy=Stat.of(_final(t, "test_accuracy") for t in ok),
            final_test_loss=Stat.of(_final(t, "test_loss") for t in ok),
            final_train_loss=Stat.of(_final(t, "train_loss") for t in ok),
            final_valid_accuracy=Stat.of(_final(t, "valid_accuracy") for t in ok),
            final_valid_loss=Stat.of(_final(t, "valid_loss") for t in ok),
            best_test_accuracy=Stat.of(
                max((e["test_accuracy"] for e in t.epochs[1:]
                     if e.get("test_accuracy") is not None), default=None)
                for t in ok
            ),
            steps_to_target=Stat.of(r[0] for r in reached),
            time_to_target=Stat.of(r[1] for r in reached),
            wall_time=Stat.of(
                (t.summary or {}).get("wall_time") for t in ok
            ),
            target=tgt, n_reached=len(reached),
        ))
    return rows


def select(rows: Sequence[Row]) -> list[Selection]:
    """Pick each swept optimizer's best variant on validation data; marks ``Row.selected``."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.swept:
            groups.setdefault((r.problem, r.name), []).append(r)
    selections = []
    for (problem, name), group in groups.items():
        use_acc = group[0].has_accuracy and any(
            r.final_valid_accuracy.mean is not None for r in group
        )
        metric = "final_valid_accuracy" if use_acc else "final_valid_loss"

        def score(r: Row, metric: str = metric) -> float | None:
            stat: Stat = getattr(r, metric)
            return stat.mean

        def rank(r: Row, use_acc: bool = use_acc) -> tuple[int, float]:
            s = score(r)
            if s is None:
                return (2, 0.0)
            return (1 if r.n_diverged else 0, -s if use_acc else s)

        usable = [r for r in group if score(r) is not None]
        if not usable:
            continue  # no validation data: nothing can be chosen without peeking at test
        best = min(group, key=rank)
        best.selected = True
        selections.append(Selection(problem, name, best.label, metric,
                                    {r.label: score(r) for r in group}))
    return selections


def load_checked(run_dir: Path) -> tuple[list[Trial], dict[str, Any] | None]:
    """Every trial under ``run_dir`` (unfinished ones too) and ``run.json``, values checked.

    Raises :class:`~bpgrad.bench.results.SchemaError` (a
    :class:`~bpgrad.bench.validation.RecordError` for out-of-range values), naming the file and
    line, for anything no run can have written: the report refuses rather than prints it.
    """
    run_dir = Path(run_dir)
    trials = [parse_trial(p, read_checked(p)) for p in find_trial_files(run_dir)]
    try:
        manifest = read_manifest(run_dir)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise SchemaError(f"{run_dir / RUN_MANIFEST}: not valid JSON ({exc}); delete it (it only "
                          "records the command) or rerun `bpgrad compare`") from None
    return trials, manifest


def analyse(run_dir: Path, *, target: float | None = None) -> Analysis:
    """Load every finished or diverged trial under ``run_dir`` and analyse it."""
    trials, manifest = load_checked(Path(run_dir))
    rows = summarize(trials, target=target)
    # List optimizers in the order the run named them (when known), sweep variants by label.
    config = (manifest or {}).get("config")
    named = [str(n) for n in config.get("optimizers", [])] if isinstance(config, dict) else []
    problems = list(dict.fromkeys(r.problem for r in rows))
    rows.sort(key=lambda r: (problems.index(r.problem),
                             named.index(r.name) if r.name in named else len(named), r.label))
    selections = select(rows)
    return Analysis(Path(run_dir), rows, selections, manifest, trials)


# ---------------------------------------------------------------------------------------------
# Curves


def _band(label: str, xs: Sequence[Sequence[float]], ys: Sequence[Sequence[float | None]]
          ) -> Curve | None:
    """Mean and std over seeds, point by point, on the union of the seeds' x values.

    Seeds are aligned by x, not by position: a seed that stopped early (diverged) or evaluated
    at other steps contributes where it has values and nowhere else.
    """
    grid = np.unique(np.concatenate([np.asarray(x, dtype=np.float64) for x in xs])) if xs \
        else np.empty(0)
    if grid.size == 0:
        return None
    arr = np.full((len(ys), grid.size), np.nan, dtype=np.float64)
    for row, (x, y) in enumerate(zip(xs, ys, strict=True)):
        n = min(len(x), len(y))
        cols = np.searchsorted(grid, np.asarray(x[:n], dtype=np.float64))
        arr[row, cols] = [np.nan if v is None else float(v) for v in y[:n]]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        # Points where every seed is missing (a diverged run) give NaN, on purpose.
        warnings.simplefilter("ignore", RuntimeWarning)
        # nanmean: a seed's missing value at one point does not erase the others
        mean = np.nanmean(arr, axis=0) if arr.shape[0] > 1 else arr[0]
        std = np.nanstd(arr, axis=0, ddof=1) if arr.shape[0] > 1 else np.zeros(grid.size)
    return Curve(label, grid.tolist(), mean.tolist(), np.nan_to_num(std).tolist(), len(ys))


def _by_label(trials: Iterable[Trial], labels: Sequence[str] | None) -> dict[str, list[Trial]]:
    out: dict[str, list[Trial]] = {} if labels is None else {label: [] for label in labels}
    for t in trials:
        if labels is None or t.label in labels:
            out.setdefault(t.label, []).append(t)
    return {label: group for label, group in out.items() if group}


def loss_curves(trials: Iterable[Trial], *, labels: Sequence[str] | None = None) -> list[Curve]:
    """Training minibatch loss against step, mean and std over each label's seeds."""
    curves = []
    for label, group in _by_label(trials, labels).items():
        group = [t for t in group if t.steps]
        curve = _band(label, [t.steps for t in group], [t.loss for t in group])
        if curve is not None:
            curves.append(curve)
    return curves


def evaluations(trial: Trial) -> list[dict[str, Any]]:
    """A trial's evaluation records in step order: epoch ends and any evaluations inside epochs.

    Reads however many evaluations a file holds (schema 1: one per epoch; schema 2 adds ``eval``
    records every ``eval_interval`` steps).
    """
    found = getattr(trial, "evaluations", None)
    return list(found) if found is not None else list(trial.epochs)


def evaluation_axis(trials: Iterable[Trial]) -> str:
    """``"epoch"`` when every evaluation ends an epoch, else ``"step"`` (epochs would repeat)."""
    for t in trials:
        epochs = [e["epoch"] for e in evaluations(t)]
        if len(set(epochs)) != len(epochs):
            return "step"
    return "epoch"


def epoch_curves(trials: Iterable[Trial], key: str, *, labels: Sequence[str] | None = None,
                 x: str = "epoch") -> list[Curve]:
    """An evaluation metric (``test_error`` = 1 - test accuracy, or any record key).

    ``x`` is ``"epoch"`` or ``"step"``; every evaluation record counts (see :func:`evaluations`),
    so with an evaluation interval the curve has a point every interval, not only per epoch.
    """
    if x not in ("epoch", "step"):
        raise ValueError(f"x must be 'epoch' or 'step', got {x!r}")
    curves = []
    for label, group in _by_label(trials, labels).items():
        xs, ys = [], []
        for t in group:
            recs = [e for e in evaluations(t) if key == "test_error" or key in e]
            xs.append([float(e[x]) for e in recs])
            if key == "test_error":
                ys.append([None if e.get("test_accuracy") is None else 1.0 - e["test_accuracy"]
                           for e in recs])
            else:
                ys.append([e.get(key) for e in recs])
        curve = _band(label, xs, ys)
        if curve is not None and any(math.isfinite(v) for v in curve.mean):
            curves.append(curve)
    return curves


def series_curves(trials: Iterable[Trial], key: str, *, labels: Sequence[str] | None = None
                  ) -> list[Curve]:
    """A per-step optimizer series (``eta``, ``grad_norm``) for labels that logged it."""
    curves = []
    for label, group in _by_label(trials, labels).items():
        group = [t for t in group if key in t.series]
        if group:
            curve = _band(label, [t.steps for t in group], [t.series[key] for t in group])
            if curve is not None:
                curves.append(curve)
    return curves


# ---------------------------------------------------------------------------------------------
# Tables


def _fmt_int_stat(s: Stat) -> str:
    if s.mean is None or s.std is None:
        return "-"
    return f"{s.mean:.0f}" if s.n == 1 else f"{s.mean:.0f} ± {s.std:.0f}"


def table_rows(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table (accuracy columns only where meaningful)."""
    has_acc = any(r.has_accuracy for r in rows)
    header = ["optimizer", "seeds", "diverged"]
    if has_acc:
        header += ["final test acc (%)", "best test acc (%)"]
    header += ["final test loss", "final train loss", "steps to target", "time to target (s)",
               "wall time (s)"]
    cells = []
    for r in rows:
        label = r.label + (" (selected)" if r.selected else "")
        line = [label, str(len(r.seeds)), str(r.n_diverged)]
        if has_acc:
            line += [r.final_test_accuracy.format(2, scale=100.0),
                     r.best_test_accuracy.format(2, scale=100.0)]
        reached = f"{_fmt_int_stat(r.steps_to_target)} ({r.n_reached}/{r.n_finished})"
        line += [r.final_test_loss.format(4), r.final_train_loss.format(4), reached,
                 r.time_to_target.format(1), r.wall_time.format(1)]
        cells.append(line)
    return header, cells


def format_table(header: Sequence[str], cells: Sequence[Sequence[str]], *,
                 style: str = "markdown") -> str:
    """Render a table as GitHub markdown or aligned plain text."""
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    if style != "text":
        raise ValueError(f"style must be 'markdown' or 'text', got {style!r}")
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*c) for c in cells]
    return "\n".join(lines)


def selection_table(selection: Selection) -> tuple[list[str], list[list[str]]]:
    """Header and cells listing a sweep's validation scores, the choice marked."""
    header = ["variant", selection.metric.replace("_", " "), "chosen"]
    cells = [[label, "-" if s is None else f"{s:.4f}", "yes" if label == selection.chosen else ""]
             for label, s in selection.scores.items()]
    return header, cells


def format_run_tables(analysis: Analysis, *, style: str = "text") -> str:
    """All problems' results tables (sweeps reduced to their validation choice) as text."""
    blocks = []
    for problem in analysis.problems:
        rows = analysis.rows_for(problem, selected_only=True)
        header, cells = table_rows(rows)
        target = rows[0].target if rows else None
        what = "test accuracy" if rows and rows[0].has_accuracy else "test loss"
        title = f"{problem}" + (f" (target {what} {target:.4g})" if target is not None else "")
        blocks.append(title + "\n" + format_table(header, cells, style=style))
        for sel in analysis.selections:
            if sel.problem == problem:
                h, c = selection_table(sel)
                blocks.append(f"{problem}: {sel.name} sweep, chosen on the validation split\n"
                              + format_table(h, c, style=style))
    return "\n\n".join(blocks) if blocks else f"no finished trials under {analysis.run_dir}"
