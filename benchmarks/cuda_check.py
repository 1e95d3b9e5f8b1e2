"""CUDA checks for BPGrad that CI (CPU only) cannot run. Prints one line per check; exit 1 on failure.

    python benchmarks/cuda_check.py

1. Every kernel (fused, foreach, loop) on CUDA in float64 matches the literal reference oracle.
2. ``step`` performs no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``), for
   every kernel, with weight decay, under ``GradScaler`` + fp16 autocast, and on a skipped step.
3. A ``GradScaler`` step whose gradients overflow leaves parameters and state untouched.
4. ``torch.compile(opt.step, fullgraph=True)`` (inductor) matches eager on CUDA.
"""

from __future__ import annotations

import copy
import math
import sys

import torch

from bpgrad import BPGrad
from bpgrad.optim._reference import ReferenceBPGrad

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def kernels() -> dict[str, dict[str, bool]]:
    return {"fused": dict(fused=True), "foreach": dict(foreach=True),
            "loop": dict(foreach=False, fused=False)}


def oracle_check() -> None:
    # CUDA's _fused_sgd_ reads lr in float32, so the fused kernel is not a float64 kernel there
    # (the default picks foreach for float64 on CUDA); it is checked in float32 below.
    for name, kw in kernels().items():
        if name == "fused":
            continue
        gen = torch.Generator().manual_seed(0)
        shapes = [(64, 32), (32,), (10, 64), (10,)]
        cpu = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        gpu = [p.clone().cuda() for p in cpu]
        opt = BPGrad(gpu, lipschitz=7.0, rho=0.1, momentum=0.9, weight_decay=1e-3, **kw)
        ref = ReferenceBPGrad([{"params": cpu, "lipschitz": 7.0, "rho": 0.1, "momentum": 0.9,
                                "weight_decay": 1e-3}])
        worst = 0.0
        for _ in range(20):
            loss = 0.1 + float(torch.rand((), generator=gen, dtype=torch.float64))
            for c, g in zip(cpu, gpu, strict=True):
                grad = torch.randn(c.shape, generator=gen, dtype=torch.float64)
                c.grad, g.grad = grad.clone(), grad.clone().cuda()
            opt.step(loss=torch.tensor(loss, dtype=torch.float64, device="cuda"))
            ref.step(loss)
            worst = max(worst, max(float((g.cpu() - c).abs().max())
                                   for c, g in zip(cpu, gpu, strict=True)))
        check(f"oracle float64 cuda [{name}]", worst < 1e-10, f"max |diff| {worst:.2e}")


def fused_float32_check() -> None:
    gen = torch.Generator().manual_seed(0)
    cpu = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(64, 32), (32,)]]
    gpu = [p.float().cuda() for p in cpu]
    opt = BPGrad(gpu, lipschitz=7.0, weight_decay=1e-3, fused=True)
    ref = ReferenceBPGrad([{"params": cpu, "lipschitz": 7.0, "rho": 0.1, "momentum": 0.9,
                            "weight_decay": 1e-3}])
    for _ in range(20):
        loss = 0.1 + float(torch.rand((), generator=gen, dtype=torch.float64))
        for c, g in zip(cpu, gpu, strict=True):
            grad = torch.randn(c.shape, generator=gen, dtype=torch.float64)
            c.grad, g.grad = grad.clone(), grad.float().cuda()
        opt.step(loss=loss)
        ref.step(loss)
    worst = max(float((g.double().cpu() - c).abs().max()) for c, g in zip(cpu, gpu, strict=True))
    check("oracle float32 cuda [fused]", worst < 1e-4, f"max |diff| {worst:.2e}")


def no_sync_check() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10)).cuda()
    x = torch.randn(64, 128, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    for name, kw in kernels().items():
        opt = BPGrad(model.parameters(), lipschitz=50.0, weight_decay=5e-4, **kw)
        error = ""
        try:
            for i in range(4):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                if i == 3:  # a skipped step must not sync either
                    loss = loss * math.nan
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    opt.step(loss=loss)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        except RuntimeError as exc:
            error = str(exc).splitlines()[0]
        check(f"no host sync in step [{name}]", not error and float(opt.stats["steps"]) == 3
              and float(opt.stats["skipped_steps"]) == 1, error)


def amp_check() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 4)).cuda()
    opt = BPGrad(model.parameters(), lipschitz=20.0, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(16, 32, device="cuda")
    y = torch.randint(0, 4, (16,), device="cuda")
    error = ""
    for i in range(5):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        if i == 4:
            snapshot = copy.deepcopy((list(model.parameters()), opt.state_dict()))
            scaler.scale(loss * 1e30 * 1e30).backward()  # overflows to inf in fp16/fp32
        else:
            scaler.scale(loss).backward()
        opt.set_loss(loss)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
        except RuntimeError as exc:
            error = str(exc).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
    check("GradScaler + fp16 autocast: no host sync in scaler.step(opt)", not error, error)
    params_before, state_before = snapshot
    same = all(torch.equal(a, b) for a, b in zip(params_before, model.parameters(), strict=True))
    bufs_before = [v["momentum_buffer"] for v in state_before["state"].values()
                   if "momentum_buffer" in v]
    bufs_after = [v["momentum_buffer"] for v in opt.state_dict()["state"].values()
                  if "momentum_buffer" in v]
    same = same and all(torch.equal(a, b) for a, b in zip(bufs_before, bufs_after, strict=True))
    check("GradScaler overflow step leaves params and buffers untouched",
          same and float(opt.stats["skipped_steps"]) == 1.0,
          f"steps={float(opt.stats['steps'])} skipped={float(opt.stats['skipped_steps'])}")


def compile_check() -> None:
    def run(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 8).cuda()
        opt = BPGrad(model.parameters(), lipschitz=5.0, weight_decay=1e-3)

        def step(loss: torch.Tensor) -> None:
            opt.step(loss=loss)

        stepper = torch.compile(step, fullgraph=True) if compiled else step
        x = torch.randn(32, 64, device="cuda")
        for _ in range(4):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            stepper(loss.detach())
        return [p.detach().clone() for p in model.parameters()]

    eager, compiled = run(False), run(True)
    worst = max(float((a - b).abs().max()) for a, b in zip(eager, compiled, strict=True))
    check("torch.compile(fullgraph, inductor) matches eager on cuda", worst < 1e-5,
          f"max |diff| {worst:.2e}")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing checked")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    oracle_check()
    fused_float32_check()
    no_sync_check()
    amp_check()
    compile_check()
    print(f"{len(FAILURES)} failed" if FAILURES else "all CUDA checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
