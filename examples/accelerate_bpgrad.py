"""BPGrad with HF Accelerate: prepare(), accumulate(), mixed precision, save/load_state and
BPGrad's statistics through accelerator.log (TensorBoard if installed).
CPU-only and synthetic data; runs in a few seconds.

    python examples/accelerate_bpgrad.py [--mixed-precision bf16] [--accum 2]
    accelerate launch examples/accelerate_bpgrad.py --mixed-precision fp16   # on GPUs

See docs/integrations/accelerate.md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bpgrad import BPGrad
from bpgrad.integrations import LossHook, bpgrad_metrics
from bpgrad.integrations.accelerate import backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--project-dir", default=None, help="log BPGrad stats to TensorBoard here")
    args = parser.parse_args()

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.accum,
        log_with="tensorboard" if args.project_dir else None, project_dir=args.project_dir,
    )
    if args.project_dir:
        accelerator.init_trackers("bpgrad")
    torch.manual_seed(0)
    x = torch.randn(2048, 20)
    y = (x @ torch.randn(20, 5)).argmax(dim=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    opt = BPGrad(model.parameters(), lipschitz=10.0, rho=0.1, momentum=0.9)

    model, opt, loader = accelerator.prepare(model, opt, loader)
    hook = LossHook(opt)  # finds BPGrad inside the AcceleratedOptimizer

    step = 0
    for epoch in range(args.epochs):
        for xb, yb in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(xb), yb)
                backward(accelerator, loss, hook)  # = accelerator.backward(loss) + the hook
                opt.step()  # a no-op until the accumulation window is complete
                opt.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                accelerator.log(bpgrad_metrics(opt), step=step)
        s = bpgrad_metrics(opt)
        accelerator.print(f"epoch {epoch}: {step} steps, eta {float(s['bpgrad/eta']):.4f}, "
                          f"running min {float(s['bpgrad/running_min']):.4f}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
