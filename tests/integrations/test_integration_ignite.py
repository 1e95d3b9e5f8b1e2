"""BPGrad under Ignite's ``create_supervised_trainer`` equals the plain loop.

Ignite's update function calls ``loss_fn``, divides the loss by ``gradient_accumulation_steps``,
back-propagates it and calls a bare ``optimizer.step()`` at the end of each window. The glue
(docs/integrations/ignite.md): a ``LossHook`` whose ``wrap_loss_fn(loss_fn, 1 / accum)`` is the
loss function handed to Ignite.
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from ignite.engine import create_supervised_trainer
from integ_helpers import OPT_KWARGS, assert_same_training, batches, make_data, make_net, plain_loop

from bpgrad import BPGrad, MissingLossError
from bpgrad.integrations import LossHook


@pytest.mark.parametrize("accum", [1, 4])
def test_create_supervised_trainer_with_loss_hook_equals_plain_loop(accum: int) -> None:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    hook = LossHook(opt)
    trainer = create_supervised_trainer(
        net, opt, hook.wrap_loss_fn(F.cross_entropy, 1 / accum),
        gradient_accumulation_steps=accum,
    )
    trainer.run(batches(*make_data()), max_epochs=2)
    assert_same_training(net, opt, plain_loop(epochs=2, accum=accum))


def test_windows_that_span_epochs() -> None:
    # Ignite counts iterations over the whole run: with 12 batches per epoch and windows of 5,
    # a window starts in one epoch and ends in the next. The hook sums exactly what went into
    # backward, so BPGrad still gets the loss of each window (the plain loop over the 24
    # batches as one stream: 4 full windows, the last 4 batches never stepped).
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    hook = LossHook(opt)
    trainer = create_supervised_trainer(net, opt, hook.wrap_loss_fn(F.cross_entropy, 1 / 5),
                                        gradient_accumulation_steps=5)
    data = batches(*make_data())
    trainer.run(data, max_epochs=2)
    ref_net = make_net()
    ref = BPGrad(ref_net.parameters(), **OPT_KWARGS)
    stream = data + data
    for start in range(0, len(stream) - 4, 5):
        total = 0.0
        for xb, yb in stream[start:start + 5]:
            loss = F.cross_entropy(ref_net(xb), yb) / 5
            loss.backward()
            total = total + loss.detach()
        ref.step(loss=total)
        ref.zero_grad()
    for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
        assert p.detach().allclose(q.detach(), atol=1e-6, rtol=1e-5)
    assert float(opt.stats["steps"]) == 4


def test_without_the_glue_the_first_step_fails_loudly() -> None:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    trainer = create_supervised_trainer(net, opt, F.cross_entropy)
    with pytest.raises(MissingLossError):
        trainer.run(batches(*make_data()), max_epochs=1)
    assert float(opt.stats.get("steps", 0)) == 0
