"""``bpgrad.set_loss`` finds the BPGrad inside every wrapper a trainer puts around it.

Each wrapper is the real one (Accelerate, Fabric, torch's ZeroRedundancyOptimizer,
pytorch_optimizer's Lookahead); the outcome checked is that the wrapper's bare ``step()`` then
takes exactly the step ``BPGrad.step(loss=...)`` takes. Lightning's ``LightningOptimizer`` needs
a running Trainer to step; test_integration_lightning.py covers it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from integ_helpers import OPT_KWARGS, make_data, make_net
from torch import nn

import bpgrad
from bpgrad import BPGrad
from bpgrad.integrations import LossHook, find_bpgrad, unwrap_bpgrad


def one_step(opt: Any, net: nn.Module, feed: Callable[[Any, torch.Tensor], None]) -> None:
    x, y = make_data()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    feed(opt, loss)
    opt.step()
    opt.zero_grad()


def reference_params(steps: int) -> list[torch.Tensor]:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    x, y = make_data()
    for _ in range(steps):
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
    return [p.detach().clone() for p in net.parameters()]


def accelerate_wrap(net: nn.Module, opt: BPGrad) -> Any:
    from accelerate import Accelerator

    return Accelerator(cpu=True).prepare(opt)


def lightning_wrap(net: nn.Module, opt: BPGrad) -> Any:
    from lightning.pytorch.core.optimizer import LightningOptimizer

    return LightningOptimizer(opt)


def fabric_wrap(net: nn.Module, opt: BPGrad) -> Any:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    _, wrapped = fabric.setup(net, opt)
    return wrapped


def lookahead_wrap(net: nn.Module, opt: BPGrad) -> Any:
    from pytorch_optimizer import Lookahead

    return Lookahead(opt, k=1000)  # no slow-weight update within the test: BPGrad's steps only


class SamLike:
    """A SAM-style wrapper: keeps the optimizer as ``base_optimizer``, forwards ``step``."""

    def __init__(self, base_optimizer: BPGrad) -> None:
        self.base_optimizer = base_optimizer

    def step(self) -> None:
        self.base_optimizer.step()

    def zero_grad(self) -> None:
        self.base_optimizer.zero_grad()


def nested_wrap(net: nn.Module, opt: BPGrad) -> Any:
    return accelerate_wrap(net, SamLike(opt))  # type: ignore[arg-type]


WRAPPERS = {
    "bpgrad": lambda net, opt: opt,
    "accelerate": accelerate_wrap,
    "fabric": fabric_wrap,
    "lookahead": lookahead_wrap,
    "base_optimizer": lambda net, opt: SamLike(opt),
    "nested": nested_wrap,
}


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_set_loss_through_wrapper_equals_step_with_loss(name: str) -> None:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    wrapped = WRAPPERS[name](net, opt)
    assert find_bpgrad(wrapped) is opt
    for _ in range(3):
        one_step(wrapped, net, bpgrad.set_loss)
    assert float(opt.stats["steps"]) == 3
    for p, q in zip(net.parameters(), reference_params(3), strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=1e-5)


def test_zero_redundancy_optimizer(gloo_group: None) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    net = make_net()
    zero = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=BPGrad, **OPT_KWARGS)
    assert find_bpgrad(zero) is zero.optim
    one_step(zero, net, bpgrad.set_loss)
    # ZeRO forwards step's keyword arguments to BPGrad, so step(loss=...) works too.
    x, y = make_data()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    zero.step(loss=loss)
    zero.zero_grad()
    for p, q in zip(net.parameters(), reference_params(2), strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=1e-5)


def test_zero_detected_and_only_an_explicit_opt_out_is_refused(gloo_group: None) -> None:
    # BPGrad built by ZeroRedundancyOptimizer picks up ZeRO's process group (so over N > 1
    # ranks it sums the shards' gradient norms; the two-rank run is in test_misuse_warnings.py).
    # Only shard_group=False over several ranks is refused. (world_size is forced: one process.)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    net = make_net()
    zero = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=BPGrad, **OPT_KWARGS)
    assert zero.optim.param_groups[0]["shard_group"] is zero.process_group
    zero.world_size = 2
    bpgrad.set_loss(zero, torch.tensor(1.0))  # accepted
    opted_out = ZeroRedundancyOptimizer(make_net().parameters(), optimizer_class=BPGrad,
                                        shard_group=False, **OPT_KWARGS)
    opted_out.world_size = 2
    with pytest.raises(NotImplementedError, match="shard_group=False"):
        bpgrad.set_loss(opted_out, torch.tensor(1.0))
    with pytest.raises(NotImplementedError, match="ZeroRedundancyOptimizer over 2 ranks"):
        LossHook(opted_out)


def test_no_bpgrad_inside_is_a_type_error_naming_the_chain() -> None:
    net = make_net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"no BPGrad in SamLike -> SGD.*bpgrad\.BPGrad"):
        bpgrad.set_loss(SamLike(sgd), torch.tensor(1.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no BPGrad in int"):
        bpgrad.set_loss(3, 1.0)
    with pytest.raises(TypeError, match="LightningSGD -> SGD"):
        bpgrad.set_loss(lightning_wrap(net, sgd), 1.0)  # type: ignore[arg-type]
    assert find_bpgrad(sgd) is None
    assert find_bpgrad(None) is None  # e.g. a Trainer before it built its optimizer
    with pytest.raises(TypeError, match="no BPGrad in NoneType"):
        bpgrad.set_loss(None, 1.0)


def test_an_optimizer_class_attribute_is_not_followed() -> None:
    # ZeroRedundancyOptimizer-like objects keep optimizer *classes* too; only instances count.
    class KeepsAClass:
        optimizer = BPGrad

        def __init__(self) -> None:
            self.optimizer = BPGrad  # type: ignore[misc]

        def step(self) -> None:
            pass

    with pytest.raises(TypeError, match="no BPGrad in KeepsAClass"):
        unwrap_bpgrad(KeepsAClass())


def test_set_loss_is_exported() -> None:
    import bpgrad.integrations

    assert bpgrad.set_loss is bpgrad.integrations.set_loss
    assert "set_loss" in bpgrad.__all__


def test_loss_hook_wrap_loss_fn_feeds_the_weighted_loss() -> None:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    hook = LossHook(opt)
    loss_fn = hook.wrap_loss_fn(F.cross_entropy, weight=0.5)
    x, y = make_data()
    out = loss_fn(net(x), y)
    torch.testing.assert_close(out, F.cross_entropy(net(x), y))  # returned untouched
    loss_fn(net(x), y)
    assert hook.count == 2
    torch.testing.assert_close(hook.pending, out.detach())  # 0.5 * loss + 0.5 * loss
