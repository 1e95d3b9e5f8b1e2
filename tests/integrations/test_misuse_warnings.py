"""No silent misuse (issue 16, item 4): the parts that need a change in ``bpgrad/optim/bpgrad.py``.

The unmarked "do not warn" tests guard the same changes against false alarms.

The behaviour:

* ``BPGrad.set_loss`` called a second time before a step warns once per optimizer (a
  ``UserWarning`` naming ``LossHook``): the second loss replaces the first, which is how the
  obvious per-micro-batch ``set_loss`` glue feeds BPGrad only the last micro-batch's loss.
* ``BPGrad(..., lr=x)`` with ``x != 1`` and a fixed ``lipschitz`` warns once at construction,
  naming the equivalent ``lipschitz`` and skorch's ``optimizer__lr=1``.
* ``MissingLossError``'s message names ``bpgrad.set_loss``, ``LossHook``, ``BPGradCallback`` and
  ``BPGradTrainer``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import create_supervised_trainer
from integ_helpers import BATCH, OPT_KWARGS, batches, make_data, make_net
from skorch import NeuralNetClassifier
from torch import nn

import bpgrad
from bpgrad import BPGrad, MissingLossError
from bpgrad.integrations import LossHook


@contextmanager
def recorded() -> Iterator[list[warnings.WarningMessage]]:
    # "always": a warning the optimizer emits twice must show up twice here, so "once" is
    # the optimizer's doing, not the warnings module's de-duplication.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def bpgrad_warnings(caught: list[warnings.WarningMessage], needle: str) -> list[str]:
    return [str(w.message) for w in caught
            if issubclass(w.category, UserWarning) and needle in str(w.message)]


def backward_once(net: nn.Module) -> torch.Tensor:
    x, y = make_data()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    return loss


# ---------------------------------------------------------------- set_loss twice before a step
def test_set_loss_twice_before_a_step_warns_once_naming_loss_hook() -> None:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    with recorded() as caught:
        for _ in range(2):  # two windows of two micro-batches, each fed the wrong way
            loss = backward_once(net)
            opt.set_loss(loss / 2)
            loss = backward_once(net)
            opt.set_loss(loss / 2)
            opt.step()
            opt.zero_grad()
    messages = bpgrad_warnings(caught, "LossHook")
    assert len(messages) == 1, messages
    assert "set_loss" in messages[0]


def test_obvious_set_loss_glue_with_accumulation_in_ignite_warns() -> None:
    # What a user writes first: set the loss in the loss function, as without accumulation.
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)

    def loss_fn(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(y_pred, y)
        bpgrad.set_loss(opt, loss / 2)
        return loss

    trainer = create_supervised_trainer(net, opt, loss_fn, gradient_accumulation_steps=2)
    with recorded() as caught:
        trainer.run(batches(*make_data()), max_epochs=1)
    assert len(bpgrad_warnings(caught, "LossHook")) == 1


def test_obvious_set_loss_glue_with_accumulation_in_fabric_warns() -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    net = make_net()
    model, opt = fabric.setup(net, BPGrad(net.parameters(), **OPT_KWARGS))
    with recorded() as caught:
        for i, (x, y) in enumerate(batches(*make_data())):
            loss = F.cross_entropy(model(x), y) / 3
            fabric.backward(loss)
            bpgrad.set_loss(opt, loss)
            if (i + 1) % 3 == 0:
                opt.step()
                opt.zero_grad()
    assert len(bpgrad_warnings(caught, "LossHook")) == 1


def test_one_set_loss_per_step_and_loss_hook_do_not_warn() -> None:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    hook = LossHook(opt)
    with recorded() as caught:
        for _ in range(3):
            opt.set_loss(backward_once(net))
            opt.step()
            opt.zero_grad()
        for _ in range(2):  # accumulation done right
            hook.add(backward_once(net) / 2)
        opt.step()
        opt.zero_grad()
        opt.set_loss(backward_once(net))
        opt.step()
    assert bpgrad_warnings(caught, "set_loss") == []
    assert float(opt.stats["steps"]) == 5


# ---------------------------------------------------------------- lr != 1 with a fixed lipschitz
def test_lr_other_than_one_with_fixed_lipschitz_warns_once_at_construction() -> None:
    net = make_net()
    with recorded() as caught:
        opt = BPGrad(net.parameters(), lipschitz=20.0, lr=0.01)
        opt.set_loss(backward_once(net))
        opt.step()
    messages = bpgrad_warnings(caught, "lr=0.01")
    assert len(messages) == 1, messages
    assert "lipschitz" in messages[0] and "optimizer__lr=1" in messages[0]


def test_skorch_default_lr_warns() -> None:
    x, y = make_data()
    net = NeuralNetClassifier(make_net(), criterion=nn.CrossEntropyLoss, optimizer=BPGrad,
                              optimizer__lipschitz=20.0, batch_size=BATCH, max_epochs=1,
                              train_split=None, verbose=0)
    with recorded() as caught:
        net.fit(x.numpy(), np.asarray(y.numpy()))
    assert len(bpgrad_warnings(caught, "optimizer__lr=1")) == 1


def test_lr_one_and_schedulers_do_not_warn() -> None:
    net = make_net()
    with recorded() as caught:
        opt = BPGrad(net.parameters(), lipschitz=20.0, lr=1.0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
        for _ in range(3):
            opt.step(loss=backward_once(net))
            opt.zero_grad()
            sched.step()
    assert opt.param_groups[0]["lr"] < 0.01
    assert bpgrad_warnings(caught, "lr=") == []


# ---------------------------------------------------------------- MissingLossError names the fixes
FIXES = ("bpgrad.set_loss", "LossHook", "BPGradCallback", "BPGradTrainer")


@pytest.mark.parametrize("fix", FIXES)
def test_missing_loss_error_names_the_fix(fix: str) -> None:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    backward_once(net)
    with pytest.raises(MissingLossError, match=fix.replace(".", r"\.")):
        opt.step()


@pytest.mark.parametrize("client", ["ignite", "lookahead"])
def test_wrapped_bare_step_error_names_bpgrad_set_loss(client: str) -> None:
    net = make_net()
    opt = BPGrad(net.parameters(), **OPT_KWARGS)
    run: Callable[[], object]
    if client == "ignite":
        trainer = create_supervised_trainer(net, opt, F.cross_entropy)
        def run() -> object:
            return trainer.run(batches(*make_data()), max_epochs=1)
    else:
        from pytorch_optimizer import Lookahead

        wrapped = Lookahead(opt)
        def run() -> object:
            backward_once(net)
            return wrapped.step()
    with pytest.raises(MissingLossError, match=r"bpgrad\.set_loss\(optimizer, loss\)"):
        run()


def test_obvious_set_loss_glue_with_accumulation_in_hf_training_step_warns(tmp_path: Any) -> None:
    from test_integration_transformers import Net, Rows, SetLossTrainer, args

    model = Net()
    opt = BPGrad(model.parameters(), **OPT_KWARGS)
    trainer = SetLossTrainer(model=model, train_dataset=Rows(), optimizers=(opt, None),
                             args=args(tmp_path, max_steps=2, gradient_accumulation_steps=2,
                                       lr_scheduler_type="constant"))
    with recorded() as caught:
        trainer.train()
    assert len(bpgrad_warnings(caught, "LossHook")) == 1


# ---------------------------------------------------------------- ZeRO over several ranks
@pytest.mark.slow
def test_zero_redundancy_optimizer_over_two_ranks_equals_ddp(tmp_path: Any) -> None:
    # Each rank's BPGrad holds a shard of the parameters; it detects the enclosing ZeRO and sums
    # its squared gradient norm over ZeRO's group (before: 6 steps ended 0.09 away from BPGrad
    # under DDP, silently). Two processes started by torch's launcher, as users run it
    # (multiprocessing.spawn children stalled now and then on the loaded 2-core machine).
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    result = tmp_path / "diff.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(here), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(here / "zero_ranks_entry.py"), str(result)],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(result.read_text()) < 1e-6
