"""``--jobs N``: trials in N spawned processes write the files a sequential run writes, and a
rerun resumes interrupted trials as a sequential rerun does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import toy_problem  # noqa: F401  (registers toy_blobs in this process)

from bpgrad.bench.cli import cmd_compare
from bpgrad.bench.config import CompareConfig
from bpgrad.bench.jobs import threads_per_job
from bpgrad.bench.results import checkpoint_path, find_trial_files, read_records
from bpgrad.bench.runner import TrialHooks
from bpgrad.cli import build_parser, main

# toy_blobs: 384 training examples, batch 32, so 12 steps per epoch. The spawned processes
# register it through --import (this folder is on their sys.path, inherited from pytest's).
COMMON = ["compare", "--problem", "toy_blobs", "--optimizers", "sgd,adam,bpgrad", "--seeds", "2",
          "--epochs", "2", "--eval-interval", "5", "--quiet", "--no-report",
          "--import", "toy_problem"]
#: what differs between two runs of the same trials: clock readings, how often it resumed, and
#: the commit (other work lands in a shared checkout while the test runs)
VOLATILE = {"start_time", "end_time", "wall_time", "train_time", "resumes", "git_commit"}


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _results(out: Path) -> dict[str, Any]:
    return {p.relative_to(out).as_posix(): _stable(read_records(p)) for p in find_trial_files(out)}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("seq")
    assert main([*COMMON, "--threads", "1", "--out", str(out)]) == 0
    return _results(out)


@pytest.mark.slow  # spawned processes import torch: ~10 s each on the 2-core machine
def test_jobs_write_the_results_of_a_sequential_run(tmp_path: Path, sequential) -> None:
    # 2 processes with 1 thread each: the same thread count per trial as the sequential run.
    assert main([*COMMON, "--jobs", "2", "--threads", "2", "--out", str(tmp_path)]) == 0
    parallel = _results(tmp_path)
    assert len(parallel) == 6
    assert parallel == sequential
    # Every write went through a temporary file and os.replace: nothing half-written is left.
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert leftovers == []


class Stop(RuntimeError):
    """Stands in for a kill inside one worker process."""


def stop_adam_in_epoch_two(rank: int, label: str, step: int) -> None:
    """Module level, so the spawned processes can unpickle it."""
    if label == "adam" and step == 17:
        raise Stop(f"stopped {label} before step {step}")


@pytest.mark.slow
def test_jobs_resume_interrupted_trials(tmp_path: Path, sequential) -> None:
    args = build_parser().parse_args([*COMMON, "--jobs", "2", "--threads", "2",
                                      "--out", str(tmp_path)])
    with pytest.raises(Stop):
        cmd_compare(args, hooks=TrialHooks(before_step=stop_adam_in_epoch_two))
    adam = tmp_path / "toy_blobs" / "adam" / "seed_0.jsonl"
    assert read_records(adam)[-1]["kind"] != "summary" and checkpoint_path(adam).exists()
    assert main([*COMMON, "--jobs", "2", "--threads", "2", "--out", str(tmp_path)]) == 0
    assert read_records(adam)[-1]["resumes"] == 1
    assert _results(tmp_path) == sequential


def test_threads_are_split_between_the_jobs() -> None:
    assert threads_per_job(CompareConfig(threads=8, jobs=3)) == 2
    assert threads_per_job(CompareConfig(threads=2, jobs=4)) == 1
    assert threads_per_job(CompareConfig(threads=None, jobs=1)) >= 1


def test_jobs_and_several_processes_per_trial_exclude_each_other(tmp_path: Path,
                                                                 capsys) -> None:
    assert main([*COMMON, "--jobs", "2", "--nproc-per-node", "2", "--out", str(tmp_path)]) == 2
    assert "use one of them" in capsys.readouterr().err
