"""BPGrad in the trainers people use: Lightning, HF Transformers, Accelerate, plain AMP.

This package imports no training framework. The framework glue lives in submodules that import
their framework only when they are imported themselves:

* :mod:`bpgrad.integrations.lightning`: ``BPGradCallback`` (loss plumbing + ``self.log``);
* :mod:`bpgrad.integrations.transformers`: ``BPGradTrainer`` / ``BPGradTrainerMixin``;
* :mod:`bpgrad.integrations.accelerate`: ``backward(accelerator, loss, hook)``.

The pieces shared by all of them (and enough on their own for plain loops, AMP and
Accelerate) are :class:`LossHook`, :func:`bpgrad_metrics` and :func:`log_tensorboard`.
See ``docs/integrations/``.
"""

from __future__ import annotations

from bpgrad.integrations._core import (
    DEFAULT_METRICS,
    LossHook,
    bpgrad_metrics,
    find_bpgrad,
    log_tensorboard,
    unwrap_bpgrad,
)

__all__ = [
    "DEFAULT_METRICS",
    "LossHook",
    "bpgrad_metrics",
    "find_bpgrad",
    "log_tensorboard",
    "unwrap_bpgrad",
]
