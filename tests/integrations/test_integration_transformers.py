"""BPGrad under the HF Transformers Trainer equals the plain loop.

Needs the ``integrations`` extra; a missing ``transformers`` is an import error, not a skip.
No network: the models are built from code / configs, never downloaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from integ_helpers import OPT_KWARGS, assert_same_training, make_data, make_net, plain_loop
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import bpgrad
from bpgrad import BPGrad, MissingLossError
from bpgrad.integrations.transformers import BPGradTrainer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = make_data()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def args(tmp_path: Path, **kwargs: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True,
        train_sampling_strategy="sequential", report_to="none", save_strategy="no",
        logging_steps=1, max_grad_norm=0.0, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    base.update(kwargs)
    return TrainingArguments(**base)


def step_lr(opt: BPGrad) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def test_trainer_accumulation_scheduler_and_logging(tmp_path: Path) -> None:
    # 12 batches per epoch, accumulation 5: windows of 5, 5 and 2 (divided by 2: HF's rule).
    model = Net()
    opt = BPGrad(model.parameters(), **OPT_KWARGS)
    trainer = BPGradTrainer(
        model=model, train_dataset=Rows(), optimizers=(opt, step_lr(opt)),
        args=args(tmp_path, num_train_epochs=2, gradient_accumulation_steps=5,
                  report_to="tensorboard"),
    )
    trainer.train()
    ref = plain_loop(epochs=2, accum=5, scheduler=step_lr, short_window_divisor="len")
    assert_same_training(model.net, opt, ref)
    assert opt.param_groups[0]["lr"] == ref.opt.param_groups[0]["lr"] < 1.0
    # the Trainer's logs (log_history and TensorBoard) carry BPGrad's eta of every step
    logged = [row["bpgrad/eta"] for row in trainer.state.log_history if "bpgrad/eta" in row]
    assert logged == pytest.approx(ref.etas, rel=1e-5)
    assert logged[-1] == float(opt.stats["eta"])
    last = [row for row in trainer.state.log_history if "bpgrad/eta" in row][-1]
    assert last["bpgrad/running_min"] == float(opt.stats["running_min"])
    assert last["bpgrad/grad_norm"] == float(opt.stats["grad_norm"])
    event_file = next(tmp_path.glob("**/events.out.tfevents.*"))
    events = EventAccumulator(str(event_file))
    events.Reload()
    tag = next(t for t in events.Tags()["scalars"] if t.endswith("bpgrad/eta"))
    assert [e.value for e in events.Scalars(tag)] == pytest.approx(ref.etas, rel=1e-5)


def test_trainer_bf16(tmp_path: Path) -> None:
    model = Net()
    opt = BPGrad(model.parameters(), **OPT_KWARGS)
    trainer = BPGradTrainer(model=model, train_dataset=Rows(), optimizers=(opt, None),
                            args=args(tmp_path, num_train_epochs=1, bf16=True,
                                      gradient_accumulation_steps=2,
                                      lr_scheduler_type="constant"))
    trainer.train()
    ref = plain_loop(epochs=1, accum=2, autocast=torch.bfloat16, short_window_divisor="len")
    assert_same_training(model.net, opt, ref, atol=1e-5, rtol=1e-4)


def test_trainer_resume_continues_identically(tmp_path: Path) -> None:
    def trainer_for(out: Path) -> tuple[Net, BPGrad, BPGradTrainer]:
        model = Net()
        opt = BPGrad(model.parameters(), **OPT_KWARGS)
        trainer = BPGradTrainer(
            model=model, train_dataset=Rows(), optimizers=(opt, step_lr(opt)),
            args=args(out, max_steps=8, gradient_accumulation_steps=2, save_strategy="steps",
                      save_steps=3, logging_steps=100),
        )
        return model, opt, trainer

    full_model, full_opt, full = trainer_for(tmp_path / "full")
    full.train()
    model, opt, trainer = trainer_for(tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for p, q in zip(model.parameters(), full_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    for key in ("steps", "running_min", "eta", "skipped_steps"):
        torch.testing.assert_close(opt.stats[key], full_opt.stats[key], atol=0, rtol=0)
    assert float(opt.stats["steps"]) == 8.0
    assert opt.param_groups[0]["lr"] == full_opt.param_groups[0]["lr"]


def test_token_averaged_loss_of_a_language_model(tmp_path: Path) -> None:
    # A tiny GPT-2 takes the Trainer's num_items_in_batch: each micro-batch loss is its token-loss
    # sum over the token count of the whole accumulated batch. The sum BPGrad gets is then the
    # mean token loss of the effective batch: that of one forward pass over all 8 sequences.
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    # transformers 5.24 derives loss_type from the class name, which for GPT2LMHeadModel is None:
    # the Trainer then does not know that the loss shifts the labels and counts position 0 too,
    # so gradient and loss come out 11/12 of the token mean. Tell it, as a real user should.
    model.loss_type = "ForCausalLM"
    ids = torch.randint(0, 50, (16, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "labels": r} for r in ids]
    initial = GPT2LMHeadModel(config)
    initial.load_state_dict(model.state_dict())
    opt = BPGrad(model.parameters(), lipschitz=50.0)
    trainer = BPGradTrainer(model=model, train_dataset=rows, optimizers=(opt, None),
                            args=args(tmp_path, max_steps=1, gradient_accumulation_steps=4,
                                      per_device_train_batch_size=2,
                                      lr_scheduler_type="constant"))
    trainer.train()
    assert trainer.model_accepts_loss_kwargs
    with torch.no_grad():
        expected = initial(input_ids=ids[:8], labels=ids[:8]).loss
    assert float(opt.stats["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(opt.stats["steps"]) == 1.0


def test_trainer_builds_bpgrad_from_optimizer_cls_and_kwargs(tmp_path: Path) -> None:
    # The Trainer's own optimizer hook: it builds BPGrad with its decay / no-decay groups.
    model = Net()
    trainer = BPGradTrainer(
        model=model, train_dataset=Rows(), optimizer_cls_and_kwargs=(BPGrad, dict(OPT_KWARGS)),
        args=args(tmp_path, max_steps=3, gradient_accumulation_steps=2, weight_decay=1e-4,
                  lr_scheduler_type="constant"),
    )
    trainer.train()
    opt = trainer.optimizer.optimizer  # inside Accelerate's AcceleratedOptimizer
    assert isinstance(opt, BPGrad)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert float(opt.stats["steps"]) == 3.0
    ref = plain_loop(epochs=1, accum=2, max_steps=3)
    # same losses (the decay groups differ from the reference, so compare the first step only)
    first = next(row for row in trainer.state.log_history if "bpgrad/loss" in row)
    assert first["bpgrad/loss"] == pytest.approx(ref.losses[0], rel=1e-6)


def bpgrad_warnings(trainer: BPGradTrainer, runs: int = 1) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(runs):
            trainer.train()
    return [str(w.message) for w in caught if str(w.message).startswith("BPGradTrainer")]


def test_trainer_warns_once_when_its_defaults_change_bpgrads_step(tmp_path: Path) -> None:
    # The Trainer's defaults: a linear schedule to 0 and max_grad_norm=1.0; with weight decay
    # the clipping changes BPGrad's direction. One warning each, naming the setting to use,
    # also over two train() calls.
    model = Net()
    opt = BPGrad(model.parameters(), **OPT_KWARGS)
    trainer = BPGradTrainer(model=model, train_dataset=Rows(), optimizers=(opt, None),
                            args=args(tmp_path, max_steps=2, max_grad_norm=1.0,
                                      lr_scheduler_type="linear"))
    messages = bpgrad_warnings(trainer, runs=2)
    assert len(messages) == 2, messages
    schedule, clipping = sorted(messages, key=lambda m: "max_grad_norm=1.0" in m)
    assert "'linear'" in schedule and 'lr_scheduler_type="constant"' in schedule
    assert "optimizers=(opt, scheduler)" in schedule
    assert "weight_decay > 0" in clipping and "max_grad_norm=0.0" in clipping
    assert opt.param_groups[0]["lr"] < 1.0  # the schedule did change BPGrad's step


def test_trainer_warns_about_warmup_and_auto_lipschitz_clipping(tmp_path: Path) -> None:
    model = Net()
    opt = BPGrad(model.parameters(), lipschitz="auto")  # no weight decay
    trainer = BPGradTrainer(model=model, train_dataset=Rows(), optimizers=(opt, None),
                            args=args(tmp_path, max_steps=2, max_grad_norm=1.0,
                                      lr_scheduler_type="constant_with_warmup", warmup_steps=1))
    messages = bpgrad_warnings(trainer)
    assert any("'constant_with_warmup'" in m and "warmup 1 steps" in m for m in messages)
    assert any('lipschitz="auto"' in m for m in messages)


def test_trainer_is_silent_when_bpgrads_step_is_unchanged(tmp_path: Path) -> None:
    # Constant schedule, or the user's own scheduler, and clipping that cancels out (no weight
    # decay, fixed L, eps=0): no warning, and clipping indeed leaves the training unchanged.
    def run(out: Path, **kwargs: Any) -> tuple[Net, list[str], BPGradTrainer]:
        model = Net()
        opt = BPGrad(model.parameters(), lipschitz=20.0, rho=0.1, momentum=0.9)
        sched = kwargs.pop("scheduler", None)
        trainer = BPGradTrainer(model=model, train_dataset=Rows(),
                                optimizers=(opt, sched(opt) if sched else None),
                                args=args(out, max_steps=4, **kwargs))
        return model, bpgrad_warnings(trainer), trainer

    clipped, messages, trainer = run(tmp_path / "a", max_grad_norm=0.5,
                                     lr_scheduler_type="constant")
    assert messages == []
    # the Trainer logs the norm before clipping: it did clip
    assert max(row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row) > 0.5
    unclipped, messages, _ = run(tmp_path / "b", max_grad_norm=0.0, lr_scheduler_type="constant")
    assert messages == []
    for p, q in zip(clipped.parameters(), unclipped.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    _, messages, _ = run(tmp_path / "c", max_grad_norm=0.0, lr_scheduler_type="linear",
                      scheduler=step_lr)  # the user's own scheduler is deliberate
    assert messages == []


class SetLossTrainer(transformers.Trainer):
    """The obvious hand-written glue: right without accumulation only (transformers.md)."""

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss: torch.Tensor = super().training_step(*args, **kwargs)
        bpgrad.set_loss(self.optimizer, loss)  # self.optimizer: Accelerate's wrapper
        return loss


def test_training_step_override_with_bpgrad_set_loss_without_accumulation(tmp_path: Path) -> None:
    model = Net()
    opt = BPGrad(model.parameters(), **OPT_KWARGS)
    SetLossTrainer(model=model, train_dataset=Rows(), optimizers=(opt, None),
                   args=args(tmp_path, num_train_epochs=1, lr_scheduler_type="constant")).train()
    assert_same_training(model.net, opt, plain_loop(epochs=1))


def test_plain_trainer_fails_on_the_first_step(tmp_path: Path) -> None:
    model = Net()
    opt = BPGrad(model.parameters(), **OPT_KWARGS)
    trainer = transformers.Trainer(model=model, train_dataset=Rows(), optimizers=(opt, None),
                                   args=args(tmp_path, max_steps=2))
    with pytest.raises(MissingLossError):
        trainer.train()
    assert "steps" not in opt.stats or float(opt.stats["steps"]) == 0
