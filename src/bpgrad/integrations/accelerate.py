"""HF Accelerate glue: one call replaces ``accelerator.backward(loss)``.

Usage::

    from bpgrad.integrations import LossHook
    from bpgrad.integrations.accelerate import backward

    model, opt, loader = accelerator.prepare(model, BPGrad(model.parameters()), loader)
    hook = LossHook(opt)                      # finds BPGrad inside the AcceleratedOptimizer
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = criterion(model(x), y)
            backward(accelerator, loss, hook)  # instead of accelerator.backward(loss)
            opt.step()                         # no-op until the accumulation window is full
            opt.zero_grad()

``accelerator.backward`` divides the loss by ``gradient_accumulation_steps`` (also for a window
that the end of the data cuts short) and, under fp16, scales it for the ``GradScaler``;
:func:`backward` adds ``loss / gradient_accumulation_steps`` (unscaled, detached) to the hook,
so BPGrad's bare ``step()`` gets the loss of the accumulated batch. Importing this module does
not import ``accelerate``.
"""

from __future__ import annotations

from typing import Any

import torch

from bpgrad.integrations._core import LossHook

__all__ = ["backward"]


def backward(accelerator: Any, loss: torch.Tensor, hook: LossHook, **kwargs: Any) -> None:
    """``accelerator.backward(loss, **kwargs)`` and hand the same (unscaled) loss to ``hook``."""
    hook.add(loss, 1.0 / accelerator.gradient_accumulation_steps)
    accelerator.backward(loss, **kwargs)
