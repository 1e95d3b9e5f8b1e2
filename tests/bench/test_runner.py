"""Runner: schema-valid records, exact resume, divergence recorded, skipping, data order."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from toy_problem import ToyBlobs

from bpgrad.bench.optimizers import resolve_optimizer
from bpgrad.bench.results import (
    SchemaError,
    checkpoint_path,
    parse_trial,
    read_records,
    validate_records,
)
from bpgrad.bench.runner import (
    Budget,
    ResultMismatchError,
    RunOptions,
    TrialHooks,
    epoch_order,
    run_trial,
)

QUIET = RunOptions(quiet=True, log_interval=5)


class Killed(RuntimeError):
    """Stands in for SIGKILL in the resume tests."""


@pytest.fixture(scope="module")
def problem() -> ToyBlobs:
    return ToyBlobs()


@pytest.fixture(scope="module")
def splits(problem: ToyBlobs):
    return problem.load()


def test_two_step_smoke_trial_writes_schema_valid_records(tmp_path: Path, problem, splits) -> None:
    outcome = run_trial(problem, resolve_optimizer("sgd"), 0, Budget(1, limit_train_batches=2),
                        out=tmp_path, splits=splits, options=QUIET)
    assert outcome.path == tmp_path / "toy_blobs" / "sgd" / "seed_0.jsonl"
    records = read_records(outcome.path)
    validate_records(records)
    assert [r["kind"] for r in records] == ["config", "epoch", "steps", "epoch", "summary"]
    config = records[0]
    assert config["optimizer"]["hyperparameters"] == {"lr": 1e-3, "momentum": 0.9,
                                                      "weight_decay": 5e-4}
    assert config["environment"]["torch"] == torch.__version__
    assert config["threads"] >= 1 and "git_commit" in config["environment"]
    assert config["budget"]["steps_per_epoch"] == 2
    assert records[2]["step"] == [1, 2] and len(records[2]["loss"]) == 2
    final_epoch = records[3]
    assert final_epoch["epoch"] == 1 and final_epoch["step"] == 2
    assert 0.0 <= final_epoch["test_accuracy"] <= 1.0
    assert final_epoch["valid_loss"] > 0 and final_epoch["train_loss"] > 0
    summary = records[-1]
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert summary["final"]["test_accuracy"] == final_epoch["test_accuracy"]
    assert not checkpoint_path(outcome.path).exists()


def _series(path: Path) -> tuple[list[float | None], list[dict]]:
    trial = parse_trial(path)
    drop = ("wall_time", "train_time")
    return trial.loss, [{k: v for k, v in e.items() if k not in drop} for e in trial.epochs]


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path, problem, splits,
                                                     name: str) -> None:
    opt, budget = resolve_optimizer(name), Budget(3)
    ref = run_trial(problem, opt, 1, budget, out=tmp_path / "ref", splits=splits, options=QUIET)

    def kill_after_first(epoch: int) -> None:
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        run_trial(problem, opt, 1, budget, out=tmp_path / "cut", splits=splits, options=QUIET,
                  hooks=TrialHooks(on_epoch_end=kill_after_first))
    path = tmp_path / "cut" / "toy_blobs" / name / "seed_1.jsonl"
    assert checkpoint_path(path).exists()
    assert read_records(path)[-1]["kind"] == "epoch"  # no summary: unfinished

    resumed = run_trial(problem, opt, 1, budget, out=tmp_path / "cut", splits=splits,
                        options=QUIET)
    assert resumed.resumed and not resumed.skipped and resumed.summary["resumes"] == 1
    # Bit-exact: every step loss and every epoch metric (dropout draws from the restored RNG).
    assert _series(resumed.path) == _series(ref.path)
    assert resumed.summary["final"]["test_loss"] == ref.summary["final"]["test_loss"]
    validate_records(read_records(resumed.path))


def test_resume_discards_records_written_after_the_checkpoint(tmp_path: Path, problem,
                                                              splits) -> None:
    # A kill between "records of epoch 2 written" and "checkpoint of epoch 2 saved" leaves a file
    # one epoch ahead of the checkpoint; the resume must redo epoch 2, not duplicate it.
    opt, budget = resolve_optimizer("rmsprop"), Budget(3)
    ref = run_trial(problem, opt, 2, budget, out=tmp_path / "ref", splits=splits, options=QUIET)
    path = tmp_path / "cut" / "toy_blobs" / "rmsprop" / "seed_2.jsonl"
    saved = tmp_path / "epoch1.ckpt.pt"

    def kill(epoch: int) -> None:
        if epoch == 1:
            shutil.copy(checkpoint_path(path), saved)
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        run_trial(problem, opt, 2, budget, out=tmp_path / "cut", splits=splits, options=QUIET,
                  hooks=TrialHooks(on_epoch_end=kill))
    shutil.copy(saved, checkpoint_path(path))
    assert max(r.get("epoch", 0) for r in read_records(path)) == 2
    resumed = run_trial(problem, opt, 2, budget, out=tmp_path / "cut", splits=splits,
                        options=QUIET)
    assert resumed.resumed
    assert _series(resumed.path) == _series(ref.path)


def test_diverging_optimizer_is_recorded_not_raised(tmp_path: Path, problem, splits) -> None:
    wild = resolve_optimizer("sgd", {"lr": 1e12})
    outcome = run_trial(problem, wild, 0, Budget(3), out=tmp_path, splits=splits, options=QUIET)
    assert outcome.status == "diverged"
    records = read_records(outcome.path)
    validate_records(records)
    summary = records[-1]
    assert summary["status"] == "diverged" and summary["diverged_at_step"] >= 1
    # The non-finite loss is stored as null, the file stays strict JSON.
    losses = [v for r in records if r["kind"] == "steps" for v in r["loss"]]
    assert None in losses
    # The sweep goes on: the next trial in the same folder runs normally.
    ok = run_trial(problem, resolve_optimizer("adam"), 0, Budget(1), out=tmp_path, splits=splits,
                   options=QUIET)
    assert ok.status == "finished"


def test_finished_trial_is_skipped_and_mismatched_config_refused(tmp_path: Path, problem,
                                                                 splits) -> None:
    opt = resolve_optimizer("adagrad")
    first = run_trial(problem, opt, 0, Budget(1), out=tmp_path, splits=splits, options=QUIET)
    before = first.path.read_bytes()
    again = run_trial(problem, opt, 0, Budget(1), out=tmp_path, splits=splits, options=QUIET)
    assert again.skipped and again.status == "finished"
    assert first.path.read_bytes() == before
    changed = resolve_optimizer("adagrad", {"lr": 0.5})  # same label, other settings
    with pytest.raises(ResultMismatchError, match="different configuration"):
        run_trial(problem, changed, 0, Budget(1), out=tmp_path, splits=splits, options=QUIET)


def test_data_order_depends_only_on_seed_and_epoch() -> None:
    a, b = epoch_order(100, 3, 1), epoch_order(100, 3, 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, epoch_order(100, 3, 2))
    assert not torch.equal(a, epoch_order(100, 4, 1))
    assert sorted(a.tolist()) == list(range(100))


def test_same_seed_gives_same_initial_evaluation_for_every_optimizer(tmp_path: Path, problem,
                                                                     splits) -> None:
    epoch0 = []
    for name in ("sgd", "adadelta"):
        out = run_trial(problem, resolve_optimizer(name), 5, Budget(1, limit_train_batches=1),
                        out=tmp_path, splits=splits, options=QUIET)
        epoch0.append(parse_trial(out.path).epochs[0]["test_loss"])
    assert epoch0[0] == epoch0[1]


def test_schedulefree_switches_train_and_eval_and_resumes(tmp_path: Path, problem,
                                                          splits) -> None:
    pytest.importorskip("schedulefree")
    opt, budget = resolve_optimizer("schedulefree_sgd"), Budget(2)
    ref = run_trial(problem, opt, 0, budget, out=tmp_path / "ref", splits=splits, options=QUIET)
    assert ref.status == "finished"

    def kill(epoch: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        run_trial(problem, opt, 0, budget, out=tmp_path / "cut", splits=splits, options=QUIET,
                  hooks=TrialHooks(on_epoch_end=kill))
    resumed = run_trial(problem, opt, 0, budget, out=tmp_path / "cut", splits=splits,
                        options=QUIET)
    assert _series(resumed.path) == _series(ref.path)


def test_closure_optimizer_runs(tmp_path: Path, problem, splits) -> None:
    pytest.importorskip("pytorch_optimizer")
    out = run_trial(problem, resolve_optimizer("alig"), 0, Budget(1), out=tmp_path,
                    splits=splits, options=QUIET)
    assert out.status == "finished"
    assert out.summary["final"]["train_loss"] is not None


def test_bpgrad_eta_log_matches_a_bare_training_loop(tmp_path: Path, problem, splits) -> None:
    # The runner's trajectory must be the one a plain loop produces: same init, same data
    # order, same steps; its logged eta_t and grad norm are the optimizer's own stats.
    from bpgrad import BPGrad
    from bpgrad.bench.runner import seed_everything

    resolved = resolve_optimizer("bpgrad", swept={"objective": "epoch_mean"})
    budget = Budget(2, limit_train_batches=4)
    out = run_trial(problem, resolved, 3, budget, out=tmp_path, splits=splits, options=QUIET)
    trial = parse_trial(out.path)

    seed_everything(3)
    model = problem.make_model(3)
    opt = BPGrad(model.parameters(), lipschitz=50.0, rho=0.1, momentum=0.9, weight_decay=5e-4,
                 objective="epoch_mean")
    etas, norms, losses = [], [], []
    for epoch in (1, 2):
        opt.start_epoch()
        model.train()
        order = epoch_order(len(splits.train), 3, epoch)
        for b in range(4):
            idx = order[b * problem.batch_size:(b + 1) * problem.batch_size]
            opt.zero_grad()
            loss = problem.loss(model(splits.train.inputs[idx]), splits.train.targets[idx])
            loss.backward()
            opt.step(loss=loss.detach())
            losses.append(float(loss.detach()))
            etas.append(float(opt.stats["eta"]))
            norms.append(float(opt.stats["grad_norm"]))
    assert trial.loss == losses
    assert trial.series["eta"] == etas
    assert trial.series["grad_norm"] == norms
    assert all(e > 0 for e in etas)


@pytest.mark.parametrize("name", ["prodigy", "dadapt_adam", "schedulefree_adamw", "dog", "alig"])
def test_peers_resume_exactly_from_weights_only_checkpoints(tmp_path: Path, problem, splits,
                                                            name: str) -> None:
    from bpgrad.bench.optimizers import get_optimizer_spec

    pytest.importorskip(get_optimizer_spec(name).module)
    opt, budget = resolve_optimizer(name), Budget(2, limit_train_batches=4)
    ref = run_trial(problem, opt, 0, budget, out=tmp_path / "ref", splits=splits, options=QUIET)

    def kill(epoch: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        run_trial(problem, opt, 0, budget, out=tmp_path / "cut", splits=splits, options=QUIET,
                  hooks=TrialHooks(on_epoch_end=kill))
    resumed = run_trial(problem, opt, 0, budget, out=tmp_path / "cut", splits=splits,
                        options=QUIET)
    assert resumed.resumed
    assert _series(resumed.path) == _series(ref.path)


def test_eval_interval_adds_evaluations_inside_epochs_without_changing_training(
        tmp_path: Path, problem, splits) -> None:
    # toy_blobs: 12 steps per epoch. Every 5 steps: 5, 10 | 15, 20; 12 and 24 are epoch ends,
    # evaluated by their epoch records and never twice.
    opt = resolve_optimizer("adam")
    plain = run_trial(problem, opt, 0, Budget(2), out=tmp_path / "plain", splits=splits,
                      options=QUIET)
    dense = run_trial(problem, opt, 0, Budget(2, eval_interval=5), out=tmp_path / "dense",
                      splits=splits, options=QUIET)
    records = read_records(dense.path)
    validate_records(records)
    assert records[0]["schema_version"] == 2 and records[0]["budget"]["eval_interval"] == 5
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["epoch"], r["step"]) for r in evals] == [(1, 5), (1, 10), (2, 15), (2, 20)]
    for r in evals:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["valid_loss"] > 0
        assert 0.0 <= r["train_time"] <= r["wall_time"]
    trial = parse_trial(dense.path)
    assert [e["step"] for e in trial.evaluations] == [0, 5, 10, 12, 15, 20, 24]
    # Evaluating is read-only: the same steps, the same epoch metrics as without it.
    assert _series(dense.path) == _series(plain.path)
    # Its evaluation at step 12 is the epoch record's, as in the plain run.
    assert trial.evaluations[3]["kind"] == "epoch"
    # A file from before eval records (schema 1) still reads; schema 1 with eval records not.
    old = [{**records[0], "schema_version": 1}] + [r for r in records[1:] if r["kind"] != "eval"]
    assert parse_trial(dense.path, old).evals == []
    with pytest.raises(SchemaError, match="eval records need schema_version 2"):
        validate_records([{**records[0], "schema_version": 1}, *records[1:]])


def test_eval_interval_resumes_exactly(tmp_path: Path, problem, splits) -> None:
    opt, budget = resolve_optimizer("sgd"), Budget(3, eval_interval=7)
    ref = run_trial(problem, opt, 4, budget, out=tmp_path / "ref", splits=splits, options=QUIET)

    def kill(epoch: int) -> None:
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        run_trial(problem, opt, 4, budget, out=tmp_path / "cut", splits=splits, options=QUIET,
                  hooks=TrialHooks(on_epoch_end=kill))
    resumed = run_trial(problem, opt, 4, budget, out=tmp_path / "cut", splits=splits,
                        options=QUIET)
    assert resumed.resumed

    def evals(path: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("wall_time", "train_time")}
                for r in parse_trial(path).evals]

    assert evals(resumed.path) == evals(ref.path) and len(evals(ref.path)) == 5
    assert _series(resumed.path) == _series(ref.path)


def test_a_stale_checkpoint_without_results_is_moved_aside(tmp_path: Path, problem,
                                                           splits) -> None:
    opt = resolve_optimizer("sgd")
    path = tmp_path / "toy_blobs" / "sgd" / "seed_0.jsonl"
    path.parent.mkdir(parents=True)
    checkpoint_path(path).write_bytes(b"left over")
    outcome = run_trial(problem, opt, 0, Budget(1), out=tmp_path, splits=splits, options=QUIET)
    assert outcome.status == "finished" and not outcome.resumed
    assert len(list(path.parent.glob("seed_0.ckpt.pt.orphan-*"))) == 1
