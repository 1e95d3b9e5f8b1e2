"""BPGrad inside ``pytorch_optimizer.Lookahead`` equals the plain loop plus Lookahead's rule.

Lookahead forwards only a closure to BPGrad, so a bare ``step()`` needs ``bpgrad.set_loss`` (or a
``LossHook`` with accumulation); ``step(closure)`` works as is. The reference is the plain BPGrad
loop with Lookahead's slow-weight update written out by hand: every ``k`` steps
``p <- slow + alpha * (p - slow)``, ``slow <- p`` (and, for ``pullback_momentum="reset"``, zero
momentum).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from integ_helpers import OPT_KWARGS, batches, make_data, make_net
from pytorch_optimizer import Lookahead

import bpgrad
from bpgrad import BPGrad, MissingLossError
from bpgrad.integrations import LossHook

K, ALPHA = 3, 0.5


def reference(*, accum: int, pullback: str, epochs: int = 2) -> list[torch.Tensor]:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    params = list(net.parameters())
    slow = [p.detach().clone() for p in params]
    steps = 0
    for _ in range(epochs):
        total = torch.zeros(())
        for i, (x, y) in enumerate(batches(*make_data())):
            loss = F.cross_entropy(net(x), y) / accum
            loss.backward()
            total = total + loss.detach()
            if (i + 1) % accum:
                continue
            opt.step(loss=total)
            opt.zero_grad()
            total = torch.zeros(())
            steps += 1
            if steps % K == 0:
                with torch.no_grad():
                    for p, s in zip(params, slow, strict=True):
                        p.copy_(s + ALPHA * (p - s))
                        s.copy_(p)
                        if pullback == "reset":
                            opt.state[p]["momentum_buffer"].zero_()
    return [p.detach() for p in params]


def check(net: torch.nn.Module, expected: list[torch.Tensor]) -> None:
    for p, q in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pullback", ["none", "reset"])
@pytest.mark.parametrize("how", ["bpgrad.set_loss", "closure"])
def test_lookahead_equals_reference(how: str, pullback: str) -> None:
    net = make_net()
    opt = Lookahead(BPGrad(net.parameters(), **OPT_KWARGS), k=K, alpha=ALPHA,
                    pullback_momentum=pullback)
    for _ in range(2):
        for x, y in batches(*make_data()):
            if how == "closure":
                def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                    opt.zero_grad()
                    loss = F.cross_entropy(net(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
            else:
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                bpgrad.set_loss(opt, loss)
                opt.step()
    check(net, reference(accum=1, pullback=pullback))


def test_accumulation_with_loss_hook() -> None:
    net = make_net()
    opt = Lookahead(BPGrad(net.parameters(), **OPT_KWARGS), k=K, alpha=ALPHA)
    hook = LossHook(opt)
    for _ in range(2):
        for i, (x, y) in enumerate(batches(*make_data())):
            loss = F.cross_entropy(net(x), y) / 2
            loss.backward()
            hook.add(loss)
            if (i + 1) % 2 == 0:
                opt.step()
                opt.zero_grad()
    check(net, reference(accum=2, pullback="none"))


def test_pullback_momentum_is_refused() -> None:
    # "pullback" interpolates BPGrad's momentum buffers, which BPGrad stores multiplied by the
    # gradient norm of their latest step: buffers of different scales would be mixed.
    net = make_net()
    opt = Lookahead(BPGrad(net.parameters(), **OPT_KWARGS), pullback_momentum="pullback")
    with pytest.raises(NotImplementedError, match='pullback_momentum="none"'):
        bpgrad.set_loss(opt, torch.tensor(1.0))


def test_bare_step_fails_on_the_first_step() -> None:
    net = make_net()
    opt = Lookahead(BPGrad(net.parameters(), **OPT_KWARGS))
    x, y = batches(*make_data())[0]
    F.cross_entropy(net(x), y).backward()
    with pytest.raises(MissingLossError):
        opt.step()
