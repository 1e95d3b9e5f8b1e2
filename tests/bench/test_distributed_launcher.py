"""``bpgrad compare`` on 2 local Gloo processes: the launcher path, torchrun, faults, timeouts.

Each command runs in a subprocess (torch's elastic launcher and 2 ranks), on the synthetic
problem (``--import toy_problem``, this folder on PYTHONPATH), 1 torch thread per rank. Faults
come from ``fault_entry.py``, which passes a fault hook into ``cmd_compare``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bpgrad.bench.config import config_from_args
from bpgrad.bench.distributed import launcher_args
from bpgrad.bench.results import find_trial_files, read_records
from bpgrad.cli import build_parser

HERE = Path(__file__).resolve().parent
SMALL = ["--problem", "toy_blobs", "--epochs", "2", "--quiet", "--threads", "1",
         "--import", "toy_problem"]
FAULT = [str(HERE / "fault_entry.py")]
VOLATILE = {"start_time", "end_time", "wall_time", "train_time", "git_commit"}


def _run(args: list[str], *, env: dict[str, str] | None = None,
         timeout: float = 55) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, check=False)


def _stable(value: Any) -> Any:
    """A record without the fields that differ between two identical runs (times)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _results(out: Path) -> dict[str, list[Any]]:
    return {p.relative_to(out).as_posix(): _stable(read_records(p)) for p in find_trial_files(out)}


def test_rank_argv_round_trip_and_launcher_arguments() -> None:
    parser = build_parser()
    argv = ["compare", "--problem", "toy_blobs", "--optimizers", "bpgrad,adam", "--seeds", "0,3",
            "--set", "adam.lr=3e-4", "--set", "weight_decay=0", "--sweep", "lipschitz=10,50",
            "--quiet", "--no-report", "--nproc-per-node", "2", "--dist-timeout", "9",
            "--out", "runs/x"]
    cfg = config_from_args(parser.parse_args(argv))
    again = cfg.to_argv(drop=("nproc_per_node",))
    assert "--nproc-per-node" not in again
    ranks = config_from_args(parser.parse_args(["compare", *again]))
    assert ranks.nproc_per_node is None and ranks.dist_timeout == 9.0
    ranks.nproc_per_node = cfg.nproc_per_node
    assert ranks == cfg
    assert launcher_args(2, ["compare", "--quiet"]) == [
        "--standalone", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "0",
        "--module", "bpgrad", "compare", "--quiet"]
    assert launcher_args(2, ["compare"], entry=["t.py", "1"])[-3:] == ["t.py", "1", "compare"]


def test_nproc_per_node_writes_what_the_torchrun_command_writes(tmp_path: Path) -> None:
    launcher, torchrun = tmp_path / "launcher", tmp_path / "torchrun"
    common = [*SMALL, "--optimizers", "bpgrad,sgd"]
    a = _run(["-m", "bpgrad", "compare", *common, "--out", str(launcher),
              "--nproc-per-node", "2"])
    assert a.returncode == 0, a.stderr[-3000:]
    b = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "bpgrad", "compare", *common, "--out", str(torchrun)])
    assert b.returncode == 0, b.stderr[-3000:]
    first, second = _results(launcher), _results(torchrun)
    assert sorted(first) == ["toy_blobs/bpgrad/seed_0.jsonl", "toy_blobs/sgd/seed_0.jsonl"]
    assert first == second
    header = read_records(launcher / "toy_blobs" / "bpgrad" / "seed_0.jsonl")[0]
    assert header["distributed"]["world_size"] == 2
    assert header["budget"]["batch_size"] == 2 * 32  # toy_blobs' 32 per rank
    # The same kind of report as a one-process run; its command reproduces the run.
    report = (launcher / "report.md").read_text()
    assert "--nproc-per-node 2" in report
    assert (launcher / "plots" / "toy_blobs_train_loss.png").stat().st_size > 0
    assert "final test acc" in a.stdout and a.stdout.count("report:") == 1


def test_a_failing_rank_stops_the_run_and_a_rerun_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = ["compare", *SMALL, "--optimizers", "sgd,adam", "--out", str(out),
           "--nproc-per-node", "2", "--dist-timeout", "30"]
    # Rank 1 raises at step 9 of the second trial (adam): 6 steps per epoch, so mid epoch 2,
    # after the sgd trial finished and adam's epoch-1 checkpoint was written.
    t0 = time.monotonic()
    failed = _run([*FAULT, "1", "9", "adam", "raise", *cmd], timeout=60)
    assert time.monotonic() - t0 < 60
    assert failed.returncode != 0
    assert "rank 1 of 2 failed: RuntimeError: test fault hook" in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("bpgrad compare: rank 1 failed"), last
    sgd = read_records(out / "toy_blobs" / "sgd" / "seed_0.jsonl")
    assert sgd[-1]["kind"] == "summary" and sgd[-1]["status"] == "finished"
    adam = read_records(out / "toy_blobs" / "adam" / "seed_0.jsonl")
    assert adam[-1]["kind"] != "summary"
    assert (out / "toy_blobs" / "adam" / "seed_0.ckpt.pt").exists()

    rerun = _run(["-m", "bpgrad", *cmd], timeout=60)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_records(out / "toy_blobs" / "sgd" / "seed_0.jsonl") == sgd  # skipped
    adam = read_records(out / "toy_blobs" / "adam" / "seed_0.jsonl")
    assert adam[-1]["status"] == "finished" and adam[-1]["resumes"] == 1
    assert not (out / "toy_blobs" / "adam" / "seed_0.ckpt.pt").exists()


def test_a_hanging_rank_makes_the_others_time_out(tmp_path: Path) -> None:
    out = tmp_path / "run"
    t0 = time.monotonic()
    res = _run([*FAULT, "1", "3", "-", "hang", "compare", *SMALL, "--optimizers", "sgd",
                "--out", str(out), "--nproc-per-node", "2", "--dist-timeout", "4"], timeout=55)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    assert elapsed < 45
    assert "rank 0 of 2 stopped: timed out after 4 s waiting for the other ranks" in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("bpgrad compare: rank 1 stopped answering"), last


def _failure(rank: int, exitcode: int, message: str, timestamp: int) -> Any:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failure = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode,
                             error_file="/nonexistent")
    failure.message, failure.timestamp = message, timestamp
    return failure


def test_the_launcher_summary_names_the_root_cause(monkeypatch, capsys) -> None:
    # Deterministic versions of the races the process tests can hit: which rank the launcher
    # saw first, and whether a peer was killed before it could say it lost contact.
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from bpgrad.bench.distributed import launch

    cases = {
        "raise, peer reported": ({
            0: _failure(0, 1, "bpgrad compare: rank 0 of 2 stopped: lost contact", 100),
            1: _failure(1, 1, "bpgrad compare: rank 1 of 2 failed: RuntimeError: boom", 101)},
            "bpgrad compare: rank 1 failed (local rank 1, pid 1001, exit code 1): bpgrad "
            "compare: rank 1 of 2 failed: RuntimeError: boom; then rank(s) 0 stopped"),
        "raise, peer killed first": ({
            0: _failure(0, -15, "Signal 15 (SIGTERM) received by PID 1000", 100),
            1: _failure(1, 1, "bpgrad compare: rank 1 of 2 failed: RuntimeError: boom", 101)},
            "bpgrad compare: rank 1 failed (local rank 1"),
        "hang": ({
            0: _failure(0, 1, "bpgrad compare: rank 0 of 2 stopped: timed out after 4 s", 100),
            1: _failure(1, -15, "Signal 15 (SIGTERM) received by PID 1001", 100)},
            "bpgrad compare: rank 1 stopped answering"),
    }
    for name, (failures, expected) in cases.items():
        def fake_main(args: list[str], failures: dict[int, Any] = failures) -> None:
            raise ChildFailedError("bpgrad", failures)

        monkeypatch.setattr(torch_run, "main", fake_main)
        assert launch(2, ["compare"]) == 1, name
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(expected), (name, line)
        assert line.endswith("rerun the same command to resume."), (name, line)
