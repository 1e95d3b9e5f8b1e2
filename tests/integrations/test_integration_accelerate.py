"""BPGrad under HF Accelerate equals the plain loop.

Needs the ``integrations`` extra; a missing ``accelerate`` is an import error, not a skip.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from integ_helpers import BATCH, OPT_KWARGS, assert_same_training, make_data, make_net, plain_loop
from torch.utils.data import DataLoader, TensorDataset

from bpgrad import BPGrad
from bpgrad.integrations import LossHook, bpgrad_metrics
from bpgrad.integrations.accelerate import backward


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Any:
    # Accelerate keeps process-wide singletons; every test builds its own Accelerator.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run(accelerator: Accelerator, *, epochs: int, autocast: torch.dtype | None = None,
        scheduler: bool = False) -> tuple[torch.nn.Module, Any, list[float]]:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    loader = DataLoader(TensorDataset(*make_data()), batch_size=BATCH, shuffle=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    if sched is not None:
        net, opt, loader, sched = accelerator.prepare(net, opt, loader, sched)
    else:
        net, opt, loader = accelerator.prepare(net, opt, loader)
    hook = LossHook(opt)
    logged: list[float] = []
    for _ in range(epochs):
        for x, y in loader:
            with accelerator.accumulate(net):
                ctx = (torch.autocast("cpu", dtype=autocast) if autocast is not None
                       else contextlib.nullcontext())
                with ctx:
                    loss = F.cross_entropy(net(x), y)
                backward(accelerator, loss, hook)
                opt.step()
                if sched is not None:
                    sched.step()
                opt.zero_grad()
                if accelerator.sync_gradients:
                    accelerator.log({k: float(v) for k, v in bpgrad_metrics(opt).items()})
                    logged.append(float(bpgrad_metrics(opt)["bpgrad/eta"]))
    return net, opt, logged


def test_accumulation_and_scheduler() -> None:
    # 12 batches per epoch, accumulation 5: windows 5, 5, 2 (the short one divided by 5).
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=5)
    net, opt, logged = run(accelerator, epochs=2, scheduler=True)

    def step_lr(o: BPGrad) -> torch.optim.lr_scheduler.LRScheduler:
        # A prepared scheduler steps once per optimizer step (on one process).
        return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)

    ref = plain_loop(epochs=2, accum=5, scheduler=step_lr)
    assert_same_training(net, opt, ref)
    assert opt.param_groups[0]["lr"] == ref.opt.param_groups[0]["lr"] < 1.0
    assert logged == pytest.approx(ref.etas, rel=1e-6)


def test_bf16_mixed_precision() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    net, opt, _ = run(accelerator, epochs=1)  # Accelerate's own autocast (bf16 on CPU)
    ref = plain_loop(epochs=1, accum=2, autocast=torch.bfloat16)
    assert_same_training(net, opt, ref, atol=1e-5, rtol=1e-4)


def test_fp16_grad_scaler_path() -> None:
    # Accelerate enables fp16 + GradScaler only on accelerators (on CPU, mixed_precision="fp16"
    # silently trains in fp32). Give this CPU Accelerator a real CPU GradScaler before prepare()
    # so its GPU code path runs: backward scales, AcceleratedOptimizer.step calls
    # scaler.step(optimizer) with no loss, and BPGrad gets the unscaled loss from the hook.
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    net, opt, _ = run(accelerator, epochs=1, autocast=torch.float16)
    assert opt.scaler is accelerator.scaler  # the AcceleratedOptimizer used it
    ref = plain_loop(epochs=1, accum=3, autocast=torch.float16,
                     scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    assert_same_training(net, opt, ref, atol=1e-5, rtol=1e-4)
    assert float(opt.optimizer.stats["loss"]) == pytest.approx(ref.losses[-1], rel=1e-5)


def test_save_and_load_state(tmp_path: Any) -> None:
    # accelerator.save_state / load_state carry BPGrad's state: continuing from a saved state
    # equals never having stopped.
    def epoch(accelerator: Accelerator, net: Any, opt: Any, loader: Any, hook: LossHook) -> None:
        for x, y in loader:
            with accelerator.accumulate(net):
                backward(accelerator, F.cross_entropy(net(x), y), hook)
                opt.step()
                opt.zero_grad()

    def setup() -> tuple[Accelerator, Any, Any, Any, LossHook]:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        net = make_net(seed=7)  # differs from the saved weights until load_state
        opt = BPGrad(net.parameters(), **OPT_KWARGS)
        loader = DataLoader(TensorDataset(*make_data()), batch_size=BATCH, shuffle=False)
        net, opt, loader = accelerator.prepare(net, opt, loader)
        return accelerator, net, opt, loader, LossHook(opt)

    acc, net, opt, loader, hook = setup()
    epoch(acc, net, opt, loader, hook)
    acc.save_state(str(tmp_path / "state"))
    epoch(acc, net, opt, loader, hook)
    expected = [p.detach().clone() for p in net.parameters()]
    expected_stats = {k: v.clone() for k, v in opt.optimizer.stats.items()}

    acc, net, opt, loader, hook = setup()
    acc.load_state(str(tmp_path / "state"))
    epoch(acc, net, opt, loader, hook)
    for p, q in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    for key in ("steps", "running_min", "eta"):
        torch.testing.assert_close(opt.optimizer.stats[key], expected_stats[key], atol=0, rtol=0)
