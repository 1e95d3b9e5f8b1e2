"""One declaration per option: every ``bpgrad compare`` option round-trips through the command
line, TOML, ``to_command`` and the launched ranks' argv, and reaches the runner's options."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import toy_problem

from bpgrad.bench.config import (
    CompareConfig,
    ConfigError,
    config_from_args,
    config_from_mapping,
    flag_of,
    load_toml,
    option_fields,
    split_command,
)
from bpgrad.cli import build_parser

DEFAULT = CompareConfig()


def _parse(argv: list[str]) -> CompareConfig:
    return config_from_args(build_parser().parse_args(["compare", *argv]))


def _from_toml(text: str, tmp_path: Path) -> CompareConfig:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return config_from_mapping(load_toml(path), source=str(path))


def _example_argv(f: Any) -> list[str]:
    opt = f.metadata["option"]
    return [flag_of(f), *([opt.example] if opt.example else [])]


def _round_trips(cfg: CompareConfig, tmp_path: Path) -> None:
    words = split_command(cfg.to_command())
    assert words[0] == "compare"
    assert _parse(words[1:]) == cfg, cfg.to_command()
    assert _parse(cfg.to_argv()) == cfg
    assert _from_toml(cfg.to_toml(), tmp_path) == cfg, cfg.to_toml()


@pytest.mark.parametrize("name", [f.name for f, _ in option_fields()])
def test_each_option_round_trips_cli_toml_and_command(name: str, tmp_path: Path) -> None:
    f = next(f for f, _ in option_fields() if f.name == name)
    cfg = _parse(_example_argv(f))
    # The declared example is a real change, and nothing else changed.
    assert getattr(cfg, name) != getattr(DEFAULT, name)
    for other in fields(CompareConfig):
        if other.name != name:
            assert getattr(cfg, other.name) == getattr(DEFAULT, other.name), other.name
    _round_trips(cfg, tmp_path)
    # The command line and the TOML file agree on the value.
    assert getattr(_from_toml(cfg.to_toml(), tmp_path), name) == getattr(cfg, name)


def test_all_options_together_round_trip(tmp_path: Path) -> None:
    argv = [word for f, _ in option_fields() for word in _example_argv(f)]
    cfg = _parse(argv)
    for f, _ in option_fields():
        assert getattr(cfg, f.name) == getattr(_parse(_example_argv(f)), f.name), f.name
    _round_trips(cfg, tmp_path)
    # A launched rank gets everything but --nproc-per-node.
    rank = _parse(cfg.to_argv(drop=("nproc_per_node",)))
    assert rank.nproc_per_node is None
    rank.nproc_per_node = cfg.nproc_per_node
    assert rank == cfg


def test_every_field_is_an_option_with_a_flag_in_the_help() -> None:
    declared = {f.name for f, _ in option_fields()}
    assert declared == {f.name for f in fields(CompareConfig)} - {"config_file"}
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    help_text = sub.choices["compare"].format_help()
    for f, _ in option_fields():
        assert flag_of(f) in help_text, f.name


def test_the_options_that_had_drifted(tmp_path: Path) -> None:
    # log_interval on the command line; nproc_per_node and dist_timeout in TOML; to_command
    # carries all three.
    assert _parse(["--log-interval", "7"]).log_interval == 7
    cfg = _from_toml("nproc_per_node = 2\ndist_timeout = 30\nlog_interval = 7\n", tmp_path)
    assert (cfg.nproc_per_node, cfg.dist_timeout, cfg.log_interval) == (2, 30.0, 7)
    command = cfg.to_command()
    assert "--nproc-per-node 2" in command and "--dist-timeout 30.0" in command
    assert "--log-interval 7" in command


def test_command_line_wins_over_the_file_and_tables_merge(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('epochs = 4\nthreads = 3\n[set]\nweight_decay = 0.0\n"sgd.momentum" = 0.5\n')
    cfg = _parse(["--config", str(path), "--epochs", "2", "--set", "sgd.momentum=0.7"])
    assert cfg.epochs == 2 and cfg.threads == 3 and cfg.config_file == path
    assert cfg.overrides == {"weight_decay": 0.0, "sgd.momentum": 0.7}


def test_runner_options_and_budget_come_from_the_config() -> None:
    cfg = _parse(["--epochs", "3", "--limit-train-batches", "4", "--batch-size", "8",
                  "--eval-interval", "2", "--threads", "2", "--eval-batch-size", "16",
                  "--log-interval", "5", "--quiet"])
    problem = toy_problem.ToyBlobs()
    budget = cfg.budget(problem)
    assert (budget.epochs, budget.limit_train_batches, budget.batch_size,
            budget.eval_interval) == (3, 4, 8, 2)
    opts = cfg.run_options()
    assert (opts.threads, opts.eval_batch_size, opts.log_interval, opts.quiet,
            opts.device) == (2, 16, 5, True, "cpu")
    assert _parse([]).budget(problem).epochs == problem.epochs  # None: the problem's default


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs must be a whole number >= 1, got '0' (e.g. --epochs 3)"),
        (["--epochs", "-2"], "--epochs must be a whole number >= 1"),
        (["--limit-train-batches", "0"], "--limit-train-batches must be a whole number >= 1"),
        (["--batch-size", "-1"], "--batch-size must be a whole number >= 1"),
        (["--threads", "0"], "--threads must be a whole number >= 1"),
        (["--jobs", "0"], "--jobs must be a whole number >= 1"),
        (["--eval-interval", "x"], "--eval-interval must be a whole number >= 1"),
        (["--dist-timeout", "0"], "--dist-timeout must be a number > 0"),
        (["--device", "gpu"], "--device must be cpu, cuda or cuda:N"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--lr-grid", "log:1:0.1:3"], "0 < LOW < HIGH"),
        (["--set", "lr"], "--set must look like KEY=VALUE"),
    ],
)
def test_bad_values_name_the_option_and_the_fix(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(argv)
    assert message in str(info.value)


def test_bad_values_in_a_file_name_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("epochs = 0\n")
    with pytest.raises(ConfigError, match=r"c\.toml: epochs must be"):
        config_from_mapping(load_toml(path), source=str(path))
    with pytest.raises(ConfigError, match="unknown key"):
        _from_toml("epoch = 3\n", tmp_path)


def test_the_harness_docs_list_every_option() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "harness.md").read_text()
    for f, _ in option_fields():
        assert f"`{flag_of(f)}" in docs, f"docs/harness.md does not mention {flag_of(f)}"


def test_a_config_file_command_adds_only_what_the_command_line_changed(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('problem = "toy_blobs"\nepochs = 4\n[set]\n"sgd.momentum" = 0.5\n')
    cfg = _parse(["--config", str(path), "--epochs", "2", "--set", "adam.lr=0.1", "--quiet"])
    extra = cfg.to_argv(base=config_from_mapping(load_toml(path)))
    assert extra == ["--epochs", "2", "--set", "sgd.momentum=0.5", "--set", "adam.lr=0.1",
                     "--quiet"]
    assert _parse(["--config", str(path), *extra]) == cfg
    assert cfg.to_argv(base=config_from_mapping(load_toml(path), base=CompareConfig())) == extra
