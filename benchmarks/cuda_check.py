"""CUDA checks for BPGrad that CI (CPU only) cannot run. Prints one line per check; exit 1 on failure.

    python benchmarks/cuda_check.py

1. Every kernel (fused, foreach, loop) on CUDA in float64 matches the literal reference oracle.
2. ``step`` performs no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``), for
   every kernel, with weight decay, under ``GradScaler`` + fp16 autocast, and on a skipped step.
3. A ``GradScaler`` step whose gradients overflow leaves parameters and state untouched.
4. ``torch.compile(opt.step, fullgraph=True)`` (inductor) matches eager on CUDA.
5. CUDA work launched by one step (``torch.profiler``: kernel, memset and memcpy launches), fixed
   and auto L, 2c2d and ResNet-18 shapes: at most 8 (no process group, so no all-reduce).
6. A whole training step (forward, backward, BPGrad) captured in a ``torch.cuda.CUDAGraph`` and
   replayed equals the same steps run eagerly; so does ``torch.compile(mode="reduce-overhead")``.
7. The step's time against torch's fused SGD-momentum step, side by side: at most 2x.

Usage: ``python benchmarks/cuda_check.py`` (about two minutes on an H200, most of it the one-time
compilation of BPGrad's scalar rule and of the compiled training steps).
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path

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


LAUNCH_BUDGET = 8
RATIO_TARGET = 2.0


def _shapes() -> dict[str, list[tuple[int, ...]]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from step_overhead import shapes_2c2d, shapes_resnet18

    return {"2c2d": shapes_2c2d(), "ResNet-18": shapes_resnet18()}


def _cuda_params(shapes: list[tuple[int, ...]]) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.01).cuda())
        p.grad = torch.randn(shape, generator=gen).cuda()
        params.append(p)
    return params


def _launches_per_step(step: Callable[[], object], steps: int = 5) -> float:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):  # lazy state and the compiled scalar rule are made here
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    names = ("LaunchKernel", "MemsetAsync", "MemcpyAsync", "cuLaunch")
    calls = sum(e.count for e in prof.key_averages() if any(n in e.key for n in names))
    return calls / steps


def launches_check() -> None:
    for shape_name, shapes in _shapes().items():
        sgd = torch.optim.SGD(_cuda_params(shapes), lr=1e-3, momentum=0.9, weight_decay=5e-4,
                              fused=True)
        reference = _launches_per_step(sgd.step)
        for lipschitz in (50.0, "auto"):
            opt = BPGrad(_cuda_params(shapes), lipschitz=lipschitz, weight_decay=5e-4)
            loss = torch.tensor(1.5, device="cuda")
            per_step = _launches_per_step(lambda opt=opt, loss=loss: opt.step(loss=loss))
            check(f"CUDA launches per step [{shape_name}, lipschitz={lipschitz}]",
                  per_step <= LAUNCH_BUDGET,
                  f"{per_step:.1f} (budget {LAUNCH_BUDGET}; torch fused SGD {reference:.1f})")


def _train_setup(seed: int) -> tuple[torch.nn.Module, BPGrad, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10)).cuda()
    opt = BPGrad(model.parameters(), lipschitz="auto", weight_decay=5e-4)
    x = torch.randn(32, 64, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    return model, opt, x, y


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(32, 64, generator=gen).cuda(),
             torch.randint(0, 10, (32,), generator=gen).cuda()) for _ in range(n)]


def graph_capture_check(warmup: int = 3, replays: int = 10) -> None:
    batches = _batches(warmup + replays)

    def make_step(model, opt, x, y):  # type: ignore[no-untyped-def]
        def train_step() -> torch.Tensor:
            opt.zero_grad(set_to_none=False)  # the graph reuses the same .grad tensors
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step(loss=loss)
            return loss.detach()
        return train_step

    # Eager reference.
    model, opt, x, y = _train_setup(0)
    eager_step = make_step(model, opt, x, y)
    for bx, by in batches:
        x.copy_(bx)
        y.copy_(by)
        eager_step()
    eager = [p.detach().clone() for p in model.parameters()]

    # The recipe of docs/optimizer.md: warm up on a side stream, capture one step, replay.
    model, opt, x, y = _train_setup(0)
    graph_step = make_step(model, opt, x, y)
    error = ""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for bx, by in batches[:warmup]:
                x.copy_(bx)
                y.copy_(by)
                graph_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_step()
        for bx, by in batches[warmup:]:
            x.copy_(bx)
            y.copy_(by)
            graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # report, do not crash the other checks
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if error:
        check("CUDA graph: captured step replays like eager", False, error)
    else:
        worst = max(float((a - b).abs().max())
                    for a, b in zip(eager, model.parameters(), strict=True))
        check("CUDA graph: captured step replays like eager", worst < 1e-5,
              f"max |diff| {worst:.2e} after {replays} replays; "
              f"steps counted {float(opt.stats['steps']):.0f}")

    # torch.compile(mode="reduce-overhead") over the whole training step (cudagraph trees).
    model, opt, x, y = _train_setup(0)
    compiled_step = torch.compile(make_step(model, opt, x, y), mode="reduce-overhead")
    error = ""
    try:
        for bx, by in batches:
            x.copy_(bx)
            y.copy_(by)
            compiled_step()
        torch.cuda.synchronize()
    except Exception as exc:
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    worst = math.inf if error else max(float((a - b).abs().max()) for a, b in
                                       zip(eager, model.parameters(), strict=True))
    check('torch.compile(mode="reduce-overhead") training step matches eager', worst < 1e-4,
          error or f"max |diff| {worst:.2e}")


def ratio_check(steps: int = 50, rounds: int = 3) -> None:
    import statistics
    import time

    def median_time(step: Callable[[], object]) -> float:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        samples = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    for shape_name, shapes in _shapes().items():
        times: dict[str, list[float]] = {"bpgrad": [], "bpgrad auto": [], "sgd": []}
        for _ in range(rounds):  # interleaved, so drift hits all three alike
            for label in times:
                params = _cuda_params(shapes)
                if label == "sgd":
                    step: Callable[[], object] = torch.optim.SGD(
                        params, lr=1e-3, momentum=0.9, weight_decay=5e-4, fused=True).step
                else:
                    opt = BPGrad(params, lipschitz="auto" if "auto" in label else 1e4,
                                 weight_decay=5e-4)
                    loss = torch.tensor(1.5, device="cuda")
                    step = functools.partial(opt.step, loss=loss)
                times[label].append(median_time(step))
        med = {k: statistics.median(v) for k, v in times.items()}
        for label in ("bpgrad", "bpgrad auto"):
            ratio = med[label] / med["sgd"]
            check(f"step time / fused SGD [{shape_name}, {label}]", ratio <= RATIO_TARGET,
                  f"{ratio:.2f}x ({med[label] * 1e3:.3f} ms vs {med['sgd'] * 1e3:.3f} ms)")


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
    launches_check()
    graph_capture_check()
    ratio_check()
    print(f"{len(FAILURES)} failed" if FAILURES else "all CUDA checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
