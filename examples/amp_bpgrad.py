"""BPGrad in a plain PyTorch loop with torch.autocast, torch.amp.GradScaler, gradient
accumulation and TensorBoard logging. CPU-only and synthetic data; runs in a few seconds.

    python examples/amp_bpgrad.py [--device cuda] [--logdir runs/amp]

See docs/integrations/amp.md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from bpgrad import BPGrad
from bpgrad.integrations import LossHook, log_tensorboard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--logdir", default=None, help="TensorBoard log dir (optional)")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    # float16 autocast needs a GradScaler (bfloat16 would not, but the recipe is the same).
    amp_dtype = torch.float16
    x = torch.randn(2048, 20)
    y = (x @ torch.randn(20, 5)).argmax(dim=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,
                                         shuffle=True)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)).to(device)

    opt = BPGrad(model.parameters(), lipschitz=10.0, rho=0.1, momentum=0.9)
    hook = LossHook(opt)  # sums the micro-batch losses; hands BPGrad their mean at the step
    scaler = torch.amp.GradScaler(device.type)
    writer = None
    if args.logdir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.logdir)

    step = 0
    micro = 0
    while step < args.steps:
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            with torch.autocast(device.type, dtype=amp_dtype):
                loss = F.cross_entropy(model(xb), yb) / args.accum
            scaler.scale(loss).backward()
            hook.add(loss)  # the unscaled loss, divided like the gradient
            micro += 1
            if micro % args.accum:
                continue
            scaler.step(opt)  # bare step: BPGrad gets the loss from the hook
            scaler.update()
            opt.zero_grad()
            step += 1
            if writer is not None:
                log_tensorboard(writer, opt, step)
            if step % 10 == 0:
                s = opt.stats
                print(f"step {step:3d}  loss {float(s['loss']):.4f}  eta {float(s['eta']):.4f}  "
                      f"|g| {float(s['grad_norm']):.3f}  min {float(s['running_min']):.4f}  "
                      f"skipped {int(s['skipped_steps'])}")
            if step >= args.steps:
                break
    if writer is not None:
        writer.close()


if __name__ == "__main__":
    main()
