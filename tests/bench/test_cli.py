"""``bpgrad compare`` / ``bpgrad report`` end to end on the synthetic problem (fast, offline)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import toy_problem  # noqa: F401  (registers toy_blobs in this process)

from bpgrad.bench.results import find_trial_files, parse_trial
from bpgrad.cli import main

SMALL = ["--problem", "toy_blobs", "--epochs", "2", "--quiet"]


def test_compare_runs_trials_prints_table_and_writes_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    rc = main(["compare", *SMALL, "--optimizers", "sgd,adam,adagrad,adadelta,rmsprop",
               "--seeds", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "final test acc (%)" in printed and "adagrad" in printed
    assert len(find_trial_files(out)) == 10
    report = (out / "report.md").read_text()
    assert "bpgrad compare --problem toy_blobs" in report
    assert "bpgrad report" in report
    for stem in ("train_loss", "test_error"):
        for ext in ("png", "svg"):
            assert (out / "plots" / f"toy_blobs_{stem}.{ext}").stat().st_size > 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["config"]["seeds"] == [0, 1]

    # A rerun skips everything and reproduces the same table.
    before = {p: p.read_bytes() for p in find_trial_files(out)}
    assert main(["compare", *SMALL, "--optimizers", "sgd,adam,adagrad,adadelta,rmsprop",
                 "--seeds", "2", "--out", str(out)]) == 0
    assert {p: p.read_bytes() for p in find_trial_files(out)} == before

    (out / "report.md").unlink()
    assert main(["report", str(out), "--quiet"]) == 0
    assert (out / "report.md").exists()


def test_compare_from_toml_with_lr_grid_and_overrides(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    config = tmp_path / "sweep.toml"
    config.write_text(
        'problem = "toy_blobs"\n'
        'optimizers = ["sgd", "adam"]\n'
        "seeds = 1\n"
        "epochs = 1\n"
        f'out = "{out.as_posix()}"\n'
        'lr_grid = "log:1e-3:1e-1:3"\n'
        "quiet = true\n"
        "[set]\n"
        "weight_decay = 0.0\n"
        '"sgd.momentum" = 0.5\n'
    )
    assert main(["compare", "--config", str(config), "--weight-decay", "0.001"]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["command"] == f"bpgrad compare --config {config} --weight-decay 0.001"
    labels = sorted(p.name for p in (out / "toy_blobs").iterdir())
    assert labels == ["adam@lr=0.001", "adam@lr=0.01", "adam@lr=0.1",
                      "sgd@lr=0.001", "sgd@lr=0.01", "sgd@lr=0.1"]
    trial = parse_trial(out / "toy_blobs" / "sgd@lr=0.01" / "seed_0.jsonl")
    assert trial.config["optimizer"]["hyperparameters"] == {
        "lr": 0.01, "momentum": 0.5, "weight_decay": 0.001}
    assert trial.swept == {"lr": 0.01}
    report = (out / "report.md").read_text()
    assert "selection on the validation split" in report
    assert "(selected)" in report
    assert "bpgrad compare --config" in report


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizers", "nadamw"], "unknown optimizer 'nadamw'"),
        (["--optimizers", "adam", "--set", "lipschitz=3"], "has a hyperparameter 'lipschitz'"),
        (["--optimizers", "adam", "--set", "sgd.lr=3"], "not among"),
        (["--optimizers", "adam", "--seeds", "0"], "seeds must be >= 1"),
        (["--optimizers", "adam", "--lr-grid", "log:1:0.1:3"], "0 < LOW < HIGH"),
    ],
)
def test_compare_reports_configuration_errors(tmp_path: Path, capsys, args: list[str],
                                              message: str) -> None:
    rc = main(["compare", *SMALL, "--out", str(tmp_path / "x"), *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unknown_problem_lists_known_ones(tmp_path: Path, capsys) -> None:
    rc = main(["compare", "--problem", "nope", "--optimizers", "sgd",
               "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "toy_blobs" in capsys.readouterr().err


def test_missing_peer_package_names_the_extra(tmp_path: Path, capsys, monkeypatch) -> None:
    # A None entry in sys.modules makes `import prodigyopt` raise ModuleNotFoundError.
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    rc = main(["compare", *SMALL, "--optimizers", "prodigy", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "pip install 'bpgrad[peers]'" in capsys.readouterr().err


def test_list_shows_problems_and_optimizers_but_not_the_test_problem() -> None:
    # A fresh process: the toy problem of the tests is neither shipped nor listed, unless a
    # module that registers it is imported with --import.
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(here)}

    def listing(*extra: str) -> str:
        res = subprocess.run([sys.executable, "-m", "bpgrad", "compare", "--list", *extra],
                             capture_output=True, text=True, env=env, timeout=60, check=True)
        return res.stdout

    printed = listing()
    assert "mnist_lenet" in printed and "bpgrad" in printed and "rmsprop" in printed
    assert "toy_blobs" not in printed
    assert "toy_blobs" in listing("--import", "toy_problem")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("bpgrad.bench.testing")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[2] / "benchmarks").glob("*.toml")), ids=lambda p: p.name
)
def test_shipped_configs_parse_and_expand(path: Path) -> None:
    from bpgrad.bench.config import config_from_mapping, expand_trials, load_toml

    cfg = config_from_mapping(load_toml(path), source=str(path))
    trials = expand_trials(cfg)
    assert trials and str(cfg.out).startswith("runs/")
    assert {t.seed for t in trials} == set(cfg.seeds)


def test_demo_config_is_the_paper_six_at_a_small_budget() -> None:
    from bpgrad.bench.config import config_from_mapping, load_toml

    cfg = config_from_mapping(load_toml(Path(__file__).parents[2] / "benchmarks" / "demo.toml"))
    assert cfg.problems == ["mnist_lenet"] and cfg.out == Path("runs/demo")
    assert cfg.optimizers == ["bpgrad", "sgd", "adam", "adagrad", "adadelta", "rmsprop"]
    assert cfg.epochs == 1 and cfg.limit_train_batches is not None
    # Evaluations inside the epoch: the test-error curve has more than the two epoch points.
    assert cfg.eval_interval is not None
    assert cfg.limit_train_batches // cfg.eval_interval + 1 >= 4
