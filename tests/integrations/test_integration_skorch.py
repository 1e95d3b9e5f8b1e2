"""BPGrad under skorch: the documented usage equals the plain loop; the naive one is 100x off.

skorch steps with a closure (``optimizer.step(step_fn)``), so BPGrad gets the loss with no glue.
But skorch passes its own ``lr`` (default 0.01) to every optimizer, and ``lr`` multiplies
BPGrad's step: docs/integrations/skorch.md says to pass ``optimizer__lr=1``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from integ_helpers import BATCH, OPT_KWARGS, assert_same_training, make_data, make_net, plain_loop
from skorch import NeuralNetClassifier
from torch import nn

from bpgrad import BPGrad
from bpgrad.integrations import LossHook

OPTIMIZER_ARGS = {f"optimizer__{k}": v for k, v in OPT_KWARGS.items()}


def numpy_data() -> tuple[np.ndarray, np.ndarray]:
    x, y = make_data()
    return x.numpy(), y.numpy()


def classifier(cls: type[NeuralNetClassifier] = NeuralNetClassifier, **kwargs: Any
               ) -> NeuralNetClassifier:
    return cls(make_net(), criterion=nn.CrossEntropyLoss, optimizer=BPGrad, batch_size=BATCH,
               train_split=None, iterator_train__shuffle=False, verbose=0, **OPTIMIZER_ARGS,
               **kwargs)


@pytest.mark.parametrize("lr_arg", ["optimizer__lr", "lr"])
def test_documented_usage_equals_plain_loop(lr_arg: str) -> None:
    net = classifier(max_epochs=2, **{lr_arg: 1.0})
    net.fit(*numpy_data())
    assert net.optimizer_.param_groups[0]["lr"] == 1.0
    assert_same_training(net.module_, net.optimizer_, plain_loop(epochs=2))


def test_skorch_default_lr_shrinks_every_step_100x() -> None:
    # What the docs warn about: without optimizer__lr=1 skorch passes lr=0.01, which BPGrad
    # takes as a multiplier on its step: same losses seen, steps 100x smaller.
    net = classifier(max_epochs=1)
    net.fit(*numpy_data())
    ref = plain_loop(epochs=1)
    opt = net.optimizer_
    assert opt.param_groups[0]["lr"] == 0.01
    assert float(opt.stats["steps"]) == len(ref.etas)
    assert float(opt.stats["eta"]) < 0.02 * ref.etas[-1]
    with pytest.raises(AssertionError):
        assert_same_training(net.module_, opt, ref)


class GradAccNet(NeuralNetClassifier):
    """skorch's documented gradient-accumulation recipe (its FAQ), plus the two BPGrad lines."""

    def __init__(self, *args: Any, acc_steps: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acc_steps = acc_steps

    def initialize_optimizer(self, *args: Any, **kwargs: Any) -> GradAccNet:
        super().initialize_optimizer(*args, **kwargs)
        self.bpgrad_hook_ = LossHook(self.optimizer_)  # BPGrad line 1
        return self

    def get_loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().get_loss(*args, **kwargs)
        return loss / self.acc_steps

    def train_step(self, batch: Any, **fit_params: Any) -> dict[str, Any]:
        step = self.train_step_single(batch, **fit_params)
        self.bpgrad_hook_.add(step["loss"])  # BPGrad line 2: the loss as back-propagated
        if len(self.history[-1, "batches"]) % self.acc_steps == 0:
            self.optimizer_.step()
            self.optimizer_.zero_grad()
        return step


def test_gradient_accumulation_recipe_equals_plain_loop() -> None:
    net = classifier(GradAccNet, max_epochs=2, acc_steps=4, optimizer__lr=1.0)
    net.fit(*numpy_data())
    assert_same_training(net.module_, net.optimizer_, plain_loop(epochs=2, accum=4))
