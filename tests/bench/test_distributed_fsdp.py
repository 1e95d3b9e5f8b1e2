"""BPGrad on a model sharded by FSDP2's ``fully_shard``: 2 Gloo processes on the CPU, float64.

torch 2.13 runs ``fully_shard`` on the CPU with Gloo. The parameters become DTensors sharded on
dim 0 (unevenly here: a 3-row weight over 2 ranks); BPGrad's gradient norm must be that of the full
gradient and its loss the global mean, so the sharded run takes the steps of one process on the
concatenated batch.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bpgrad import BPGrad

STEPS = 5
PER_RANK = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2 * PER_RANK, 6, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (2 * PER_RANK,), generator=gen))
        for _ in range(STEPS)
    ]


def _opt(model: nn.Module) -> BPGrad:
    return BPGrad(model.parameters(), lipschitz=6.0, weight_decay=1e-3)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = _model()
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        placements = {str(p.placements) for p in model.parameters()}  # type: ignore[attr-defined]
        opt = _opt(model)
        norms = []
        for x, y in _batches():
            part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[part]), y[part])
            loss.backward()
            opt.step(loss=loss)
            norms.append(opt.stats["grad_norm"].clone())
        full = torch.cat([p.full_tensor().detach().flatten()  # type: ignore[attr-defined]
                          for p in model.parameters()])
        torch.save({"params": full, "norms": torch.stack(norms), "placements": placements},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        del model, opt
    finally:
        gc.collect()
        dist.destroy_process_group()


def test_fully_shard_takes_the_steps_of_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model = _model()
    opt = _opt(model)
    norms = []
    for x, y in _batches():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
        norms.append(opt.stats["grad_norm"].clone())
    single = torch.cat([p.detach().flatten() for p in model.parameters()])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["placements"] == {"(Shard(dim=0),)"}
        torch.testing.assert_close(got["norms"], torch.stack(norms), rtol=1e-12, atol=0)
        torch.testing.assert_close(got["params"], single, rtol=0, atol=1e-6)
