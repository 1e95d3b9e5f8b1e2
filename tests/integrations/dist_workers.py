"""Workers for tests that spawn processes: kept apart so a spawned process imports little."""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
import torch.nn.functional as F
from integ_helpers import OPT_KWARGS, batches, make_data, make_net
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from bpgrad import BPGrad


def zero_vs_ddp(rank: int, world: int, port: int, out: Any) -> None:
    """Train 6 steps over ``world`` gloo ranks under DDP and under ZeRO; rank 0 puts the max
    parameter difference on ``out``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        params = {}
        for mode in ("ddp", "zero"):
            net = make_net()
            model = DistributedDataParallel(net)
            opt: Any = (ZeroRedundancyOptimizer(model.parameters(), optimizer_class=BPGrad,
                                                **OPT_KWARGS) if mode == "zero"
                        else BPGrad(model.parameters(), **OPT_KWARGS))
            for x, y in batches(*make_data())[rank::world]:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step(loss=loss)
                opt.zero_grad()
            params[mode] = [p.detach().clone() for p in net.parameters()]
        if rank == 0:
            out.put(max(float((a - b).abs().max())
                        for a, b in zip(params["ddp"], params["zero"], strict=True)))
    finally:
        dist.destroy_process_group()
