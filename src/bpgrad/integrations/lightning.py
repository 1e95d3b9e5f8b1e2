"""PyTorch Lightning glue: one callback gets the loss to BPGrad and its statistics to the logger.

Usage::

    from bpgrad.integrations.lightning import BPGradCallback

    class Model(L.LightningModule):
        def configure_optimizers(self):
            return BPGrad(self.parameters(), lipschitz=50.0)

    L.Trainer(callbacks=[BPGradCallback()], precision="bf16-mixed", accumulate_grad_batches=4)

Why a callback is needed: under ``accumulate_grad_batches=N`` Lightning's closure returns only
the last micro-batch's loss divided by ``N``, and under ``16-mixed`` Lightning runs the closure
itself and then calls ``scaler.step(optimizer)`` with nothing. The callback sees every loss that
Lightning back-propagates (``on_before_backward``), divides out the ``GradScaler`` scale on the
device, and a :class:`~bpgrad.integrations.LossHook` hands BPGrad their sum at the real
optimizer step: the mean micro-batch loss, the loss whose gradient BPGrad normalises. Works with
automatic and manual optimization (``self.manual_backward(loss); opt.step()``).

Importing this module imports ``lightning`` (or ``pytorch_lightning`` if ``lightning`` is
missing).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from bpgrad.integrations._core import (
    DEFAULT_METRICS,
    LossHook,
    _clipping_effects,
    bpgrad_metrics,
    find_bpgrad,
)

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]

__all__ = ["BPGradCallback"]


class BPGradCallback(pl.Callback):
    """Feed BPGrad the loss of each optimizer step and log its step size.

    Warns once (``UserWarning``) when the Trainer's ``gradient_clip_val`` changes BPGrad's step:
    clipping by value always does; clipping by norm with weight decay, ``lipschitz="auto"`` or
    ``eps > 0``.

    Args:
        log: log :func:`~bpgrad.integrations.bpgrad_metrics` with ``pl_module.log_dict`` after
            every optimizer step (``on_step=True``), so they reach whatever logger the Trainer
            has, at the Trainer's ``log_every_n_steps``. The values are logged as 0-dim tensors:
            the logger syncs when it writes them, not the training step.
        prefix, keys: names of the logged metrics (default ``bpgrad/eta``,
            ``bpgrad/grad_norm``, ``bpgrad/running_min``, ``bpgrad/loss``,
            ``bpgrad/skipped_steps``).
        prog_bar: also show them in the progress bar.
    """

    def __init__(
        self, *, log: bool = True, prefix: str = "bpgrad/", keys: Iterable[str] = DEFAULT_METRICS,
        prog_bar: bool = False,
    ) -> None:
        super().__init__()
        self.log_stats = log
        self.prefix = prefix
        self.keys = tuple(keys)
        self.prog_bar = prog_bar
        self.hooks: list[LossHook] = []
        self._restored: list[dict[str, Any]] = []
        self._last_logged_step = -1
        self._warned_clipping = False

    # ------------------------------------------------------------------ wiring
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            if find_bpgrad(optimizer) is not None:
                self.hooks.append(LossHook(optimizer))
        for hook, state in zip(self.hooks, self._restored, strict=False):
            hook.load_state_dict(state)
        self._restored = []
        self._last_logged_step = trainer.global_step
        self._check_clipping(trainer)

    def _check_clipping(self, trainer: Any) -> None:
        clip = getattr(trainer, "gradient_clip_val", None)
        if not clip or not self.hooks or self._warned_clipping:
            return
        raw = getattr(trainer, "gradient_clip_algorithm", None) or "norm"
        algorithm = str(getattr(raw, "value", raw))  # an enum in Lightning 2.x
        if algorithm == "value":
            reasons = ["clipping by value changes the gradient's direction"]
        else:
            reasons = sorted({r for hook in self.hooks for r in _clipping_effects(hook.optimizer)})
        if reasons:
            self._warned_clipping = True
            warnings.warn(
                f"BPGradCallback: Trainer(gradient_clip_val={clip}, gradient_clip_algorithm="
                f"{algorithm!r}) clips the gradient before BPGrad's step. BPGrad normalises the "
                f"gradient itself, so clipping is redundant, but here it changes BPGrad's step: "
                f"{'; '.join(reasons)}. Leave gradient_clip_val unset.",
                UserWarning, stacklevel=2,
            )

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    # ------------------------------------------------------------------ the loss
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if not self.hooks:
            return
        # Lightning passes the loss divided by accumulate_grad_batches and, under 16-mixed,
        # multiplied by the GradScaler's scale: divide that out on the device (exact, the scale
        # is a power of two).
        weight: float | torch.Tensor = 1.0
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            weight = 1.0 / _scale_tensor(scaler)
        # Lightning supports one optimizer per backward in automatic optimization; in manual
        # optimization with several BPGrad optimizers, call hook.add yourself instead.
        for hook in self.hooks:
            hook.add(loss, weight)

    # ------------------------------------------------------------------ logging
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.log_stats or trainer.global_step == self._last_logged_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_logged_step = trainer.global_step
        metrics: dict[str, torch.Tensor] = {}
        for i, hook in enumerate(self.hooks):
            prefix = self.prefix if len(self.hooks) == 1 else f"{self.prefix}opt{i}/"
            metrics.update(bpgrad_metrics(hook.optimizer, prefix=prefix, keys=self.keys))
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=self.prog_bar,
                               batch_size=1)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"hooks": [hook.state_dict() for hook in self.hooks]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restored = list(state_dict.get("hooks", []))
        if self.hooks:  # strategies that restore callbacks after on_fit_start
            for hook, state in zip(self.hooks, restored, strict=False):
                hook.load_state_dict(state)
        else:
            self._restored = restored


def _scale_tensor(scaler: Any) -> torch.Tensor:
    # GradScaler keeps its scale as a device tensor; get_scale() would read it on the host.
    get_async = getattr(scaler, "_get_scale_async", None)
    scale = get_async() if get_async is not None else None
    if isinstance(scale, torch.Tensor):
        return scale
    return torch.tensor(float(scaler.get_scale()))
