"""report.md and plots from the committed fixture run."""

from __future__ import annotations

import shutil
from pathlib import Path

from bpgrad.bench.analysis import epoch_curves, loss_curves
from bpgrad.bench.report import write_report
from bpgrad.bench.results import load_trials

RUN = Path(__file__).parent / "fixtures" / "run_small"


def test_report_has_tables_plots_and_regenerating_command(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    path = write_report(run)
    text = path.read_text()
    assert path == run / "report.md"
    assert f"bpgrad report {run}" in text
    assert "| alpha | 2 | 0 | 85.00 ± 7.07 |" in text
    assert "beta@lr=0.01 (selected)" in text and "gamma`: 1 of 2 seed(s) diverged" in text
    page = (run / "report.html").read_text()  # its content: test_report_html.py
    assert page.startswith("<!DOCTYPE html>") and "| alpha |" not in page and "85.00 ± 7.07" in page
    for stem in ("train_loss", "test_error", "eta"):
        assert f"(plots/fixture_problem_{stem}.png)" in text
        for ext in ("png", "svg"):
            assert (run / "plots" / f"fixture_problem_{stem}.{ext}").stat().st_size > 1000


def test_plot_functions_return_figures() -> None:
    from matplotlib.figure import Figure

    from bpgrad.bench import plots

    trials = load_trials(RUN)
    fig = plots.train_loss_figure(loss_curves(trials))
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 5
    fig = plots.test_error_figure(epoch_curves(trials, "test_error", labels=["alpha"]))
    assert fig.axes[0].get_xlabel() == "epoch"
