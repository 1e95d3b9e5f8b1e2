"""BPGrad on sharded (DTensor) parameters, as FSDP2's fully_shard produces: 2 Gloo processes.

The gradient norm must be the norm of the full gradient (squared shard norms summed over the
shards' group), so a sharded run takes exactly the steps of an unsharded one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

from bpgrad import BPGrad

KERNELS = {"default": {}, "foreach": {"foreach": True}, "loop": {"foreach": False, "fused": False}}


def data() -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    grads = [(torch.randn(8, 3, generator=gen, dtype=torch.float64),
              torch.randn(3, generator=gen, dtype=torch.float64)) for _ in range(5)]
    return w, b, grads


def _worker(rank: int, world: int, init_file: str, out_dir: str, kernel: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        w, b, grads = data()
        pw = torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]))
        pb = torch.nn.Parameter(distribute_tensor(b, mesh, [Replicate()]))
        opt = BPGrad([pw, pb], lipschitz=3.0, weight_decay=1e-2, **KERNELS[kernel])
        for gw, gb in grads:
            pw.grad = distribute_tensor(gw, mesh, [Shard(0)])
            pb.grad = distribute_tensor(gb, mesh, [Replicate()])
            opt.step(loss=torch.tensor(0.7, dtype=torch.float64))
        result = {"w": pw.full_tensor().detach(), "b": pb.to_local().detach(),
                  "norm": opt.stats["grad_norm"]}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_sharded_parameters_step_like_unsharded(tmp_path: Path, kernel: str) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), kernel), nprocs=2,
             join=True)
    w, b, grads = data()
    ref = BPGrad([w, b], lipschitz=3.0, weight_decay=1e-2)
    for gw, gb in grads:
        w.grad, b.grad = gw, gb
        ref.step(loss=0.7)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["w"], w, rtol=0, atol=1e-12)
        torch.testing.assert_close(got["b"], b, rtol=0, atol=1e-12)
        torch.testing.assert_close(got["norm"], ref.stats["grad_norm"], rtol=1e-12, atol=0)
