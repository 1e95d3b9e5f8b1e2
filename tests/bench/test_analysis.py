"""Analysis on the committed fixture run (numbers chosen by hand in make_fixtures.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bpgrad.bench.analysis import (
    Stat,
    analyse,
    epoch_curves,
    format_run_tables,
    loss_curves,
    series_curves,
)

RUN = Path(__file__).parent / "fixtures" / "run_small"


@pytest.fixture(scope="module")
def an():
    return analyse(RUN)


def _row(an, label: str):
    (row,) = [r for r in an.rows if r.label == label]
    return row


def test_mean_and_sample_std_over_seeds(an) -> None:
    alpha = _row(an, "alpha")
    assert alpha.seeds == [0, 1] and alpha.n_diverged == 0
    assert alpha.final_test_accuracy.mean == pytest.approx(0.85)
    assert alpha.final_test_accuracy.std == pytest.approx(math.sqrt(0.005))
    assert alpha.best_test_accuracy.mean == pytest.approx((0.92 + 0.80) / 2)
    assert alpha.final_train_loss.mean == pytest.approx(0.8)


def test_diverged_seeds_are_counted_not_averaged(an) -> None:
    gamma = _row(an, "gamma")
    assert gamma.n_diverged == 1 and gamma.n_finished == 1
    assert gamma.final_test_accuracy == Stat(0.6, 0.0, 1)


def test_default_target_and_steps_to_target(an) -> None:
    alpha = _row(an, "alpha")
    # best mean final test accuracy is beta@lr=0.1's 0.95 -> target 0.9025
    assert alpha.target == pytest.approx(0.95 * 0.95)
    assert alpha.n_reached == 1  # seed 0 at epoch 1 (0.92); seed 1 never
    assert alpha.steps_to_target.mean == 3 and alpha.time_to_target.mean == 11.0
    explicit = analyse(RUN, target=0.5)
    assert _row(explicit, "alpha").n_reached == 2


def test_sweep_selection_uses_validation_not_test(an) -> None:
    (sel,) = an.selections
    assert (sel.name, sel.chosen, sel.metric) == ("beta", "beta@lr=0.01", "final_valid_accuracy")
    assert sel.scores == {"beta@lr=0.1": pytest.approx(0.70), "beta@lr=0.01": pytest.approx(0.75)}
    labels = [r.label for r in an.rows_for("fixture_problem", selected_only=True)]
    assert "beta@lr=0.01" in labels and "beta@lr=0.1" not in labels
    assert len(an.rows_for("fixture_problem")) == 5


def test_curves(an) -> None:
    (alpha,) = loss_curves(an.trials, labels=["alpha"])
    assert alpha.x[:3] == [1, 2, 3] and alpha.mean[0] == 2.0 and alpha.std[0] == 0.0
    (gamma,) = loss_curves(an.trials, labels=["gamma"])
    assert gamma.mean[2] == 1.0  # the diverged seed's null is skipped, not propagated
    errors = {c.label: c for c in epoch_curves(an.trials, "test_error")}
    assert errors["alpha"].x == [0.0, 1.0, 2.0]
    assert errors["alpha"].mean[2] == pytest.approx(0.15)
    assert [c.label for c in series_curves(an.trials, "eta")] == ["delta"]


def test_text_table_lists_every_selected_row(an) -> None:
    text = format_run_tables(an, style="text")
    assert "85.00 ± 7.07" in text  # alpha, in percent
    assert "beta@lr=0.01 (selected)" in text
    assert "chosen on the validation split" in text


def test_curves_align_seeds_by_x_not_position(an) -> None:
    # gamma's seed 1 diverged after epoch 1: epoch 2 is seed 0's value alone, not dropped.
    errors = {c.label: c for c in epoch_curves(an.trials, "test_error")}
    assert errors["gamma"].x == [0.0, 1.0, 2.0]
    assert errors["gamma"].mean == pytest.approx([0.9, 0.6, 0.4])


def test_evaluations_inside_epochs_give_a_curve_over_steps(an) -> None:
    # Two evaluations per epoch (as with an evaluation interval): epochs repeat, so the axis is
    # the step, and every evaluation is a point of the curve.
    import copy

    from bpgrad.bench.analysis import evaluation_axis

    (trial,) = [t for t in an.trials if t.label == "delta"]
    assert evaluation_axis([trial]) == "epoch"
    dense = copy.deepcopy(trial)
    dense.epochs = [{**e, "epoch": e["epoch"], "step": 3 * e["epoch"]} for e in trial.epochs]
    dense.epochs[1:1] = [{"kind": "epoch", "epoch": 1, "step": 1, "test_accuracy": 0.5,
                          "test_loss": 0.5, "wall_time": 2.0}]
    if hasattr(dense, "evals"):
        dense.evals = []
    assert evaluation_axis([dense]) == "step"
    (curve,) = epoch_curves([dense], "test_error", x="step")
    assert curve.x == [0.0, 1.0, 3.0, 6.0]
    assert curve.mean == pytest.approx([0.9, 0.5, 0.12, 0.11])
    with pytest.raises(ValueError, match="x must be"):
        epoch_curves([dense], "test_error", x="time")


def test_eval_records_of_a_real_run_are_curve_points() -> None:
    # Committed result files of a real run with --eval-interval 20 (schema 2 `eval` records):
    # every evaluation is a point, the axis is the step, seeds are averaged point by point.
    import json
    import statistics

    from bpgrad.bench.analysis import evaluation_axis

    real = Path(__file__).parent / "fixtures" / "run_mnist_eval"
    an = analyse(real)
    assert evaluation_axis(an.trials) == "step"
    curves = {c.label: c for c in epoch_curves(an.trials, "test_error", x="step")}
    assert len(curves) == 6
    for label, curve in curves.items():
        seeds = []
        for path in sorted((real / "mnist_lenet" / label).glob("seed_*.jsonl")):
            records = [json.loads(line) for line in path.read_text().splitlines()]
            seeds.append({r["step"]: 1.0 - r["test_accuracy"] for r in records
                          if r["kind"] in ("eval", "epoch")})
        assert len(seeds) == 2 and curve.x == [0.0, 20.0, 40.0, 60.0, 80.0]
        assert curve.mean == pytest.approx([statistics.mean(s[x] for s in seeds)
                                            for x in curve.x])
    # Steps to target are located to the evaluation, not to the epoch end.
    target = 0.8
    for row in analyse(real, target=target).rows:
        firsts = []
        for path in sorted((real / "mnist_lenet" / row.label).glob("seed_*.jsonl")):
            records = [json.loads(line) for line in path.read_text().splitlines()]
            firsts += [next((r["step"] for r in records if r["kind"] in ("eval", "epoch")
                             and r["test_accuracy"] >= target), None)]
        reached = [f for f in firsts if f is not None]
        assert row.n_reached == len(reached)
        assert row.steps_to_target.mean == (statistics.mean(reached) if reached else None)
