"""BPGrad with the HF Transformers Trainer: a tiny GPT-2 built from a config (no download),
gradient accumulation, bf16 on CPU if asked, BPGrad's step size in the Trainer's logs.
CPU-only, synthetic tokens; runs in well under a minute.

    python examples/transformers_bpgrad.py [--bf16] [--accum 4] [--report-to tensorboard]

See docs/integrations/transformers.md.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from bpgrad import BPGrad
from bpgrad.integrations.transformers import BPGradTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--report-to", default="none", help="none, tensorboard, wandb, ...")
    parser.add_argument("--output-dir", default="hf_runs")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # lets the Trainer count the shifted label tokens exactly
    # A learnable toy language: each sequence counts up modulo 64 from a random start.
    starts = torch.randint(0, 64, (512, 1))
    ids = (starts + torch.arange(24)) % 64
    train = [{"input_ids": row, "labels": row} for row in ids]

    # The 5 lines: BPGrad, constant schedule (lr multiplies BPGrad's step), BPGradTrainer.
    opt = BPGrad(model.parameters(), lipschitz=20.0, rho=0.1, momentum=0.9)
    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=args.accum, lr_scheduler_type="constant",
        max_grad_norm=0.0, bf16=args.bf16, use_cpu=not torch.cuda.is_available(),
        logging_steps=5, report_to=args.report_to, save_strategy="no", disable_tqdm=True,
    )
    trainer = BPGradTrainer(model=model, args=targs, train_dataset=train, optimizers=(opt, None))
    trainer.train()
    print(f"BPGrad took {int(opt.stats['steps'])} steps; last eta {float(opt.stats['eta']):.4f}, "
          f"running min {float(opt.stats['running_min']):.4f}")


if __name__ == "__main__":
    main()
