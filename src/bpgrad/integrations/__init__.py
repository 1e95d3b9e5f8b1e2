"""BPGrad in the trainers people use: Lightning (Trainer, LightningCLI, Fabric), HF Transformers,
Accelerate, skorch, Ignite, plain AMP, ZeroRedundancyOptimizer and Lookahead.

This package imports no training framework. The framework glue lives in submodules that import
their framework only when they are imported themselves:

* :mod:`bpgrad.integrations.lightning`: ``BPGradCallback`` (loss plumbing + ``self.log``);
* :mod:`bpgrad.integrations.transformers`: ``BPGradTrainer`` / ``BPGradTrainerMixin``;
* :mod:`bpgrad.integrations.accelerate`: ``backward(accelerator, loss, hook)``.

``BPGradCallback``, ``BPGradTrainer`` and ``BPGradTrainerMixin`` can also be reached as
attributes of this package (``bpgrad.integrations.BPGradCallback``, e.g. for LightningCLI's
``--trainer.callbacks+=``); the first access imports the framework.

The pieces shared by all of them (and enough on their own for plain loops, AMP, Accelerate,
Fabric, Ignite, skorch) are :func:`set_loss` (also ``bpgrad.set_loss``), :class:`LossHook`,
:func:`bpgrad_metrics` and :func:`log_tensorboard`. See ``docs/integrations/``.
"""

from __future__ import annotations

import importlib
from typing import Any

from bpgrad.integrations._core import (
    DEFAULT_METRICS,
    LossHook,
    bpgrad_metrics,
    find_bpgrad,
    log_tensorboard,
    set_loss,
    unwrap_bpgrad,
)

__all__ = [
    "DEFAULT_METRICS",
    "LossHook",
    "bpgrad_metrics",
    "find_bpgrad",
    "log_tensorboard",
    "set_loss",
    "unwrap_bpgrad",
]

# Framework classes exported lazily, so that `import bpgrad.integrations` stays framework-free.
_LAZY = {
    "BPGradCallback": "bpgrad.integrations.lightning",
    "BPGradTrainer": "bpgrad.integrations.transformers",
    "BPGradTrainerMixin": "bpgrad.integrations.transformers",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

