"""BPGrad inside ``torch.distributed.optim.ZeroRedundancyOptimizer`` equals the plain loop.

One process, a gloo group, DDP around the model as in real use. ZeRO forwards ``step``'s
keyword arguments to BPGrad, so ``zero.step(loss=loss)`` works; ``bpgrad.set_loss(zero, loss)``
and ``LossHook(zero)`` find BPGrad in ``zero.optim``. Over several ranks each rank's BPGrad holds a
shard and sums the shards' gradient norms over ZeRO's group (test_misuse_warnings.py).
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from integ_helpers import OPT_KWARGS, assert_same_training, batches, make_data, make_net, plain_loop
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import bpgrad
from bpgrad import BPGrad, MissingLossError
from bpgrad.integrations import LossHook

pytestmark = pytest.mark.usefixtures("gloo_group")


def setup() -> tuple[object, DistributedDataParallel, ZeroRedundancyOptimizer]:
    net = make_net()
    model = DistributedDataParallel(net)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=BPGrad, **OPT_KWARGS)
    return net, model, zero


@pytest.mark.parametrize("how", ["loss_kwarg", "bpgrad.set_loss"])
def test_step_with_the_loss_equals_plain_loop(how: str) -> None:
    net, model, zero = setup()
    for _ in range(2):
        for x, y in batches(*make_data()):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if how == "loss_kwarg":
                zero.step(loss=loss)
            else:
                bpgrad.set_loss(zero, loss)
                zero.step()
            zero.zero_grad()
    assert_same_training(net, zero.optim, plain_loop(epochs=2))


def test_accumulation_with_loss_hook_equals_plain_loop() -> None:
    net, model, zero = setup()
    hook = LossHook(zero)
    for i, (x, y) in enumerate(batches(*make_data())):
        loss = F.cross_entropy(model(x), y) / 4
        loss.backward()
        hook.add(loss)
        if (i + 1) % 4 == 0:
            zero.step()
            zero.zero_grad()
    assert_same_training(net, zero.optim, plain_loop(epochs=1, accum=4))


def test_bare_step_fails_on_the_first_step() -> None:
    _, model, zero = setup()
    x, y = batches(*make_data())[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(MissingLossError):
        zero.step()
