"""Data parallelism with 2 Gloo processes on the CPU: replicas agree and match one process.

* a torch baseline (SGD) in a plain DDP loop, as tests/optim/test_distributed.py does for BPGrad;
* the harness's ``run_trial`` under DDP for BPGrad and SGD, float64, with an uneven last batch,
  against one process on the concatenated batches (global batch = per-rank batch x 2);
* resume under DDP (per-rank RNG states restored: the problem has dropout).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from toy_problem import ToyBlobs

from bpgrad.bench.distributed import DistContext
from bpgrad.bench.optimizers import resolve_optimizer
from bpgrad.bench.problems.base import Problem, Split, Splits
from bpgrad.bench.results import read_records
from bpgrad.bench.runner import Budget, RunOptions, TrialHooks, run_trial

STEPS = 5
PER_RANK = 6


# ---------------------------------------------------------------------------------------------
# A torch baseline in a plain DDP loop


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2 * PER_RANK, 5, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (2 * PER_RANK,), generator=gen))
        for _ in range(STEPS)
    ]


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=1e-3)


def _sgd_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_mlp())
        opt = _sgd(model.parameters())
        for x, y in _batches():
            part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[part]), y[part]).backward()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save(flat, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        gc.collect()  # free the DDP wrappers before the group goes
        dist.destroy_process_group()


def test_sgd_under_ddp_matches_one_process(tmp_path: Path) -> None:
    mp.spawn(_sgd_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    model = _mlp()
    opt = _sgd(model.parameters())
    for x, y in _batches():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    single = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(rank0, rank1)
    torch.testing.assert_close(rank0, single, rtol=0, atol=1e-6)
    assert not torch.equal(single, torch.cat([p.flatten() for p in _mlp().parameters()]))


# ---------------------------------------------------------------------------------------------
# The harness under DDP


class Blobs64(Problem):
    """float64 blobs, an MLP without dropout (so one process can reproduce the DDP run), and 101
    training examples: with 2 x 6 per step the last batch has 5, split 3 / 2 between the ranks."""

    name = "blobs64"
    description = "float64 blobs for the DDP equivalence test"
    batch_size = 6
    epochs = 2
    validation_size = 11

    def __init__(self) -> None:
        self.model: nn.Module | None = None

    def load(self, *, data_dir: Path | None = None, validation_size: int | None = None,
             seed: int = 0) -> Splits:
        gen = torch.Generator().manual_seed(5)
        centres = torch.randn(3, 4, generator=gen, dtype=torch.float64)

        def draw(n: int) -> Split:
            y = torch.randint(0, 3, (n,), generator=gen)
            return Split(centres[y] + torch.randn(n, 4, generator=gen, dtype=torch.float64), y)

        return Splits(train=draw(101), valid=draw(self.validation_size), test=draw(23))

    def make_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 3)).double()
        return self.model


OPTIMIZERS = {"bpgrad": {"lipschitz": 8.0}, "sgd": {"lr": 0.2}}


def _trials(out: Path, ctx: DistContext, batch_size: int) -> dict[str, torch.Tensor]:
    params = {}
    for name, overrides in OPTIMIZERS.items():
        problem = Blobs64()
        run_trial(problem, resolve_optimizer(name, overrides), 0,
                  Budget(epochs=2, batch_size=batch_size), out=out,
                  options=RunOptions(quiet=True, log_interval=4), dist=ctx)
        assert problem.model is not None
        params[name] = torch.cat([p.detach().flatten() for p in problem.model.parameters()])
    return params


def _runner_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        ctx = DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                          backend="gloo", timeout_s=60.0)
        params = _trials(Path(out_dir) / "ddp", ctx, PER_RANK)
        torch.save(params, os.path.join(out_dir, f"params{rank}.pt"))
    finally:
        gc.collect()  # free the DDP wrappers before the group goes
        dist.destroy_process_group()


def _series(path: Path) -> dict[str, list[Any]]:
    records = read_records(path)
    steps = [r for r in records if r["kind"] == "steps"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    out: dict[str, list[Any]] = {k: [v for r in steps for v in r[k]] for k in ("step", "loss")}
    for key in ("train_loss", "train_accuracy", "valid_loss", "test_loss", "test_accuracy"):
        out[key] = [r[key] for r in epochs]
    return out


def test_runner_under_ddp_matches_one_process_on_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(_runner_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"params{r}.pt") for r in range(2)]
    single = _trials(tmp_path / "single", DistContext(), 2 * PER_RANK)
    for name in OPTIMIZERS:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], single[name], rtol=0, atol=1e-6)
        ddp_file = tmp_path / "ddp" / "blobs64" / name / "seed_0.jsonl"
        header = read_records(ddp_file)[0]
        assert header["budget"]["batch_size"] == 12
        assert header["budget"]["world_size"] == 2
        assert header["budget"]["per_rank_batch_size"] == PER_RANK
        assert header["budget"]["steps_per_epoch"] == 9  # ceil(101 / 12)
        assert header["distributed"]["backend"] == "gloo"
        ddp = _series(ddp_file)
        one = _series(tmp_path / "single" / "blobs64" / name / "seed_0.jsonl")
        assert ddp["step"] == one["step"] == list(range(1, 19))
        for key, values in one.items():
            if key == "step":
                continue
            for got, want in zip(ddp[key], values, strict=True):
                if want is None:
                    assert got is None
                else:
                    assert abs(got - want) <= 1e-6, (name, key, got, want)
        epochs = [r for r in read_records(ddp_file) if r["kind"] == "epoch" and r["epoch"]]
        assert [r["replica_spread"] for r in epochs] == [0.0, 0.0]
    # Rank 0 alone wrote: one result file per trial, no checkpoint or temporary left behind.
    written = sorted(p.relative_to(tmp_path / "ddp").as_posix()
                     for p in (tmp_path / "ddp").rglob("*") if p.is_file())
    assert written == ["blobs64/bpgrad/seed_0.jsonl", "blobs64/sgd/seed_0.jsonl"]


class _Stop(Exception):
    pass


def _resume_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        ctx = DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                          backend="gloo", timeout_s=60.0)
        problem, opt = ToyBlobs(), resolve_optimizer("bpgrad")
        budget = Budget(epochs=3, batch_size=16)
        opts = RunOptions(quiet=True)
        run_trial(problem, opt, 1, budget, out=Path(out_dir) / "straight", options=opts,
                  dist=ctx)

        def stop(epoch: int) -> None:
            if epoch == 1:
                raise _Stop

        try:
            run_trial(problem, opt, 1, budget, out=Path(out_dir) / "resumed", options=opts,
                      dist=ctx, hooks=TrialHooks(on_epoch_end=stop))
        except _Stop:
            pass
        outcome = run_trial(problem, opt, 1, budget, out=Path(out_dir) / "resumed",
                            options=opts, dist=ctx)
        assert outcome.resumed
    finally:
        gc.collect()  # free the DDP wrappers before the group goes
        dist.destroy_process_group()


def test_resume_under_ddp_reaches_the_uninterrupted_state(tmp_path: Path) -> None:
    mp.spawn(_resume_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
             join=True)
    straight = _series(tmp_path / "straight" / "toy_blobs" / "bpgrad" / "seed_1.jsonl")
    resumed_file = tmp_path / "resumed" / "toy_blobs" / "bpgrad" / "seed_1.jsonl"
    # Bit for bit: rank 1's dropout stream is restored from the checkpoint too.
    assert _series(resumed_file) == straight
    assert read_records(resumed_file)[-1]["resumes"] == 1
