"""BPGrad under DDP with 2 Gloo processes on the CPU: every replica takes the same step."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bpgrad import BPGrad

STEPS = 5
PER_RANK = 6


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
    ).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2 * PER_RANK, 5, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (2 * PER_RANK,), generator=gen))
        for _ in range(STEPS)
    ]


def _worker(rank: int, world: int, init_file: str, out_dir: str, reduce_loss: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        opt = BPGrad(model.parameters(), lipschitz=6.0, weight_decay=1e-3,
                     distributed_loss=reduce_loss)
        for x, y in batches():
            # Different data on each rank: its own half of the global batch.
            xs, ys = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs), ys)
            loss.backward()
            opt.step(loss=loss)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save(flat, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path: Path, reduce_loss: bool) -> list[torch.Tensor]:
    init_file = tmp_path / "init"
    mp.spawn(_worker, args=(2, str(init_file), str(tmp_path), reduce_loss), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def single_process() -> torch.Tensor:
    model = make_model()
    opt = BPGrad(model.parameters(), lipschitz=6.0, weight_decay=1e-3)
    for x, y in batches():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_ddp_replicas_agree_and_match_one_process(tmp_path: Path) -> None:
    rank0, rank1 = run_ranks(tmp_path, reduce_loss=True)
    assert torch.equal(rank0, rank1)
    torch.testing.assert_close(rank0, single_process(), rtol=0, atol=1e-6)


def test_rank_local_loss_makes_replicas_drift(tmp_path: Path) -> None:
    # The pitfall the all-reduce exists for: with the local loss the replicas diverge.
    rank0, rank1 = run_ranks(tmp_path, reduce_loss=False)
    assert not torch.allclose(rank0, rank1, rtol=0, atol=1e-9)
