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

Two Trainer defaults change BPGrad's step, and the mixin warns once (a ``UserWarning`` naming the
setting to use) when the Trainer applies them to a BPGrad: the learning-rate schedule it builds
from ``lr_scheduler_type`` (default ``"linear"``, which anneals BPGrad's step to 0; use
``"constant"``, or pass your own scheduler in ``optimizers=(opt, scheduler)``), and gradient
clipping at ``max_grad_norm`` (default 1.0) when it matters to BPGrad (weight decay,
``lipschitz="auto"`` or ``eps > 0``; use ``max_grad_norm=0``).

Already subclassing ``Trainer`` (or TRL's ``SFTTrainer``)? Put the mixin first:
``class MyTrainer(BPGradTrainerMixin, SFTTrainer): ...``.

Importing this module imports ``transformers``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import transformers

from bpgrad.integrations._core import (
    DEFAULT_METRICS,
    LossHook,
    _clipping_effects,
    bpgrad_metrics,
    find_bpgrad,
)

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
    _bpgrad_warned: frozenset[str] = frozenset()

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

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        built = getattr(self, "lr_scheduler", None) is None  # else: the user's own scheduler
        scheduler = super().create_scheduler(  # type: ignore[misc]
            num_training_steps=num_training_steps, optimizer=optimizer)
        target = optimizer if optimizer is not None else getattr(self, "optimizer", None)
        found = find_bpgrad(target)
        if found is not None:
            self._bpgrad_check_arguments(found, built_scheduler=built,
                                         num_training_steps=num_training_steps)
        return scheduler

    def _bpgrad_check_arguments(self, bpgrad: Any, *, built_scheduler: bool,
                                num_training_steps: int) -> None:
        # Runs once per train() (where the Trainer builds its scheduler); warns once per Trainer.
        args = self.args  # type: ignore[attr-defined]
        kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
        warmup = int(args.get_warmup_steps(num_training_steps))
        constant = kind == "constant" or (kind == "constant_with_warmup" and warmup == 0)
        if built_scheduler and not constant:
            self._bpgrad_warn(
                "schedule",
                f"BPGradTrainer: the Trainer built a {kind!r} learning-rate schedule "
                f"(TrainingArguments.lr_scheduler_type, warmup {warmup} steps) on BPGrad; it "
                f"multiplies BPGrad's step size (BPGrad's lr), e.g. 'linear' anneals it to 0 over "
                f"training. For plain BPGrad set TrainingArguments(lr_scheduler_type=\"constant\"); "
                f"to keep a schedule on purpose, pass it as optimizers=(opt, scheduler).",
            )
        max_norm = args.max_grad_norm
        reasons = _clipping_effects(bpgrad)
        if max_norm is not None and max_norm > 0 and reasons:
            self._bpgrad_warn(
                "clipping",
                f"BPGradTrainer: TrainingArguments.max_grad_norm={max_norm} clips the gradient "
                f"before BPGrad's step. BPGrad normalises the gradient itself, so clipping is "
                f"redundant, but here it changes BPGrad's step: {'; '.join(reasons)}. Set "
                f"TrainingArguments(max_grad_norm=0.0).",
            )

    def _bpgrad_warn(self, key: str, message: str) -> None:
        if key not in self._bpgrad_warned:
            self._bpgrad_warned = self._bpgrad_warned | {key}
            warnings.warn(message, UserWarning, stacklevel=3)

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
