"""One rank of the two-rank ZeRO check, started by torch's launcher (torchrun --standalone).

Rank 0 writes the largest parameter difference between BPGrad under DDP and under
ZeroRedundancyOptimizer to the file named by the first argument.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist
import torch.nn.functional as F
from integ_helpers import OPT_KWARGS, batches, make_data, make_net
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from bpgrad import BPGrad


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        params = {}
        for mode in ("ddp", "zero"):
            net = make_net()
            model = DistributedDataParallel(net)
            opt = (ZeroRedundancyOptimizer(model.parameters(), optimizer_class=BPGrad,
                                           **OPT_KWARGS) if mode == "zero"
                   else BPGrad(model.parameters(), **OPT_KWARGS))
            for x, y in batches(*make_data())[rank::world]:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step(loss=loss)
                opt.zero_grad()
            params[mode] = [p.detach().clone() for p in net.parameters()]
        if rank == 0:
            diff = max(float((a - b).abs().max())
                       for a, b in zip(params["ddp"], params["zero"], strict=True))
            Path(sys.argv[1]).write_text(repr(diff))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing anything down: destroying the DDP reducer and ZeRO after the gloo
    # group (or with it) sometimes blocked for ever in C++ on the loaded 2-core machine
    # (faulthandler: both ranks past the training, the result already written).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
