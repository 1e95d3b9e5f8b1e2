"""BPGrad under Lightning Fabric equals the plain loop.

Fabric's optimizer wrapper has no ``step(loss=...)`` (a ``TypeError``) and, under ``16-mixed``,
calls ``scaler.step(optimizer)`` bare. The documented glue (docs/integrations/fabric.md):
``bpgrad.set_loss(opt, loss)`` before ``opt.step()``, or a ``LossHook`` with accumulation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from integ_helpers import OPT_KWARGS, assert_same_training, batches, make_data, make_net, plain_loop
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision

import bpgrad
from bpgrad import BPGrad, MissingLossError
from bpgrad.integrations import LossHook


def setup(precision: str = "32-true", scale: float | None = None) -> tuple[Fabric, ...]:
    if scale is None:
        fabric = Fabric(accelerator="cpu", devices=1, precision=precision)  # type: ignore[arg-type]
    else:
        # Fabric enables fp16 scaling only on GPUs; a CPU GradScaler takes the same code path.
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))
        fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    net = make_net()
    model, opt = fabric.setup(net, BPGrad(net.parameters(), **OPT_KWARGS))
    return fabric, model, opt, net


def test_set_loss_equals_plain_loop() -> None:
    fabric, model, opt, net = setup()
    for _ in range(2):
        for x, y in batches(*make_data()):
            loss = F.cross_entropy(model(x), y)
            fabric.backward(loss)
            bpgrad.set_loss(opt, loss)
            opt.step()
            opt.zero_grad()
    assert_same_training(net, opt, plain_loop(epochs=2))


def accumulate(fabric: Fabric, model: torch.nn.Module, opt: object, accum: int) -> None:
    hook = LossHook(opt)
    for i, (x, y) in enumerate(batches(*make_data())):
        is_accumulating = (i + 1) % accum != 0
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            loss = F.cross_entropy(model(x), y) / accum
            fabric.backward(loss)
            hook.add(loss)
        if not is_accumulating:
            opt.step()  # type: ignore[attr-defined]
            opt.zero_grad()  # type: ignore[attr-defined]


def test_accumulation_with_loss_hook_equals_plain_loop() -> None:
    fabric, model, opt, net = setup()
    accumulate(fabric, model, opt, accum=3)
    assert_same_training(net, opt, plain_loop(epochs=1, accum=3))


def test_16_mixed_grad_scaler_with_accumulation() -> None:
    scale = 2.0**10
    fabric, model, opt, net = setup(scale=scale)
    accumulate(fabric, model, opt, accum=2)
    ref = plain_loop(epochs=1, accum=2, autocast=torch.float16,
                     scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    # Same operations in the same order: tight tolerances, which an fp32 run (3e-5 away) fails.
    assert_same_training(net, opt, ref)
    assert float(opt.stats["grad_norm"]) == pytest.approx(float(ref.opt.stats["grad_norm"]))


def test_bf16_mixed() -> None:
    fabric, model, opt, net = setup("bf16-mixed")
    for x, y in batches(*make_data()):
        loss = F.cross_entropy(model(x), y)
        fabric.backward(loss)
        bpgrad.set_loss(opt, loss)
        opt.step()
        opt.zero_grad()
    assert_same_training(net, opt, plain_loop(epochs=1, autocast=torch.bfloat16))


def test_the_naive_ways_fail_on_the_first_step() -> None:
    fabric, model, opt, _ = setup()
    x, y = batches(*make_data())[0]
    loss = F.cross_entropy(model(x), y)
    fabric.backward(loss)
    with pytest.raises(TypeError, match="loss"):
        opt.step(loss=loss)  # Fabric's step takes only a closure
    with pytest.raises(MissingLossError):
        opt.step()
    assert "steps" not in opt.optimizer.stats or float(opt.optimizer.stats["steps"]) == 0
