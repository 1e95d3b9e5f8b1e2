"""HF Transformers ``Trainer`` glue: the loss of every optimizer step reaches BPGrad, and its
statistics land in the Trainer's logs.

Usage::

    from bpgrad import BPGrad
    from bpgrad.integrations.transformers import BPGradTrainer

    opt = BPGrad(model.parameters(), lipschitz=50.0)
    args = TrainingArguments(..., lr_scheduler_type="constant", gradient_accumulation_steps=4)
    trainer = BPGradTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
    trainer.train()

Why: the Trainer calls ``optimizer.step()`` with nothing. :class:`BPGradTrainerMixin` overrides
``training_step``, whose return value is exactly the loss the Trainer back-propagated (divided
for gradient accumulation, by the number of micro-batches or by the token count of the
accumulated batch, unscaled), and adds it to a :class:`~bpgrad.integrations.LossHook`; at the
Trainer's bare ``step()`` BPGrad receives their sum: the loss of the accumulated batch. It also
overrides ``log`` so that ``bpgrad/eta``, ``bpgrad/grad_norm``, ``bpgrad/running_min``, ... are
added to every training log *before* the reporting integrations (TensorBoard, W&B, ...) see it.
Both are no-ops when the optimizer is not a BPGrad.

Already subclassing ``Trainer`` (or TRL's ``SFTTrainer``)? Put the mixin first:
``class MyTrainer(BPGradTrainerMixin, SFTTrainer): ...``.

Importing this module imports ``transformers``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import transformers

from bpgrad.integrations._core import DEFAULT_METRICS, LossHook, bpgrad_metrics, find_bpgrad

__all__ = ["BPGradTrainer", "BPGradTrainerMixin"]


class BPGradTrainerMixin:
    """Mixin for ``transformers.Trainer`` subclasses; see the module docstring.

    Class attributes to tune logging: ``bpgrad_log`` (default ``True``), ``bpgrad_prefix``
    (``"bpgrad/"``) and ``bpgrad_keys`` (:data:`~bpgrad.integrations.DEFAULT_METRICS`).
    """

    bpgrad_log: bool = True
    bpgrad_prefix: str = "bpgrad/"
    bpgrad_keys: Iterable[str] = DEFAULT_METRICS

    _bpgrad_hook: LossHook | None = None

    @property
    def bpgrad_hook(self) -> LossHook | None:
        """The :class:`LossHook` on the Trainer's BPGrad (``None`` if it has none)."""
        optimizer = find_bpgrad(getattr(self, "optimizer", None))
        if optimizer is None:
            return None
        hook = self._bpgrad_hook
        if hook is None or hook.optimizer is not optimizer:
            if hook is not None:
                hook.remove()  # the Trainer built a new optimizer (a new train() call)
            hook = self._bpgrad_hook = LossHook(optimizer)
        return hook

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss: torch.Tensor = super().training_step(*args, **kwargs)  # type: ignore[misc]
        hook = self.bpgrad_hook
        if hook is not None:
            hook.add(loss)
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.bpgrad_log and "loss" in logs:  # a training log, not an evaluation's
            optimizer = find_bpgrad(getattr(self, "optimizer", None))
            if optimizer is not None:
                metrics = bpgrad_metrics(optimizer, prefix=self.bpgrad_prefix,
                                         keys=self.bpgrad_keys)
                # The Trainer writes floats; this is where the logger's host sync happens.
                logs.update({name: float(value) for name, value in metrics.items()})
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class BPGradTrainer(BPGradTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with :class:`BPGradTrainerMixin`."""
