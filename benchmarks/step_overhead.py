"""Optimizer step overhead: BPGrad's kernels against torch's SGD/Adam and the dfw port's algorithm.

Measured side by side in one run (the machines are shared and noisy, so only ratios from the same
run are comparable), single thread by default, median of ``--steps`` timed steps after warm-up.

    python benchmarks/step_overhead.py                     # both parameter sets, 1 thread
    python benchmarks/step_overhead.py --device cuda       # on a GPU (synchronised timings)
    python benchmarks/step_overhead.py --weight-decay 0    # the optimizer's default
    python benchmarks/step_overhead.py --compile           # also torch.compile(opt.step)

``ops/step`` counts the ATen/custom operations one step dispatches (a ``TorchDispatchMode``;
torch's record_function markers included, so torch's fused SGD counts 3).

Parameter sets: the DeepOBS 2c2d network (3.27 M parameters, 8 tensors) and ResNet-18 (11.7 M,
62 tensors), gradients present. The port's algorithm is re-implemented here from its description
(per-parameter Python loop, host sync for the step size, weight decay added into ``p.grad``) for
comparison only; it is not part of bpgrad.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bpgrad import BPGrad


def shapes_2c2d() -> list[tuple[int, ...]]:
    return [(32, 1, 5, 5), (32,), (64, 32, 5, 5), (64,), (1024, 3136), (1024,), (10, 1024), (10,)]


def shapes_resnet18() -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first = block == 0
            out += [(c_out, c_in if first else c_out, 3, 3), (c_out,), (c_out,),
                    (c_out, c_out, 3, 3), (c_out,), (c_out,)]
            if first and (stride != 1 or c_in != c_out):
                out += [(c_out, c_in, 1, 1), (c_out,), (c_out,)]
        c_in = c_out
    out += [(1000, 512), (1000,)]
    return out


class PortBPGrad(torch.optim.Optimizer):
    """The oval-group/dfw port's algorithm, re-implemented from its description (anchors.md)."""

    def __init__(self, params, eta: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eps: float = 1e-5) -> None:
        super().__init__(params, dict(eta=eta, momentum=momentum, weight_decay=weight_decay))
        self.eps = eps

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if group["weight_decay"]:
                    p.grad.add_(p, alpha=group["weight_decay"])
        norm_sq = 0.0
        for group in self.param_groups:
            for p in group["params"]:
                norm_sq += float(p.grad.norm()) ** 2  # one host sync per tensor
        step = float(loss) / (norm_sq**0.5 + self.eps)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "buf" not in state:
                    state["buf"] = torch.zeros_like(p)
                buf = state["buf"]
                buf.mul_(group["momentum"]).add_(p.grad, alpha=-group["eta"] * step)
                p.add_(buf)
        return loss


def make_params(shapes: list[tuple[int, ...]], device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.01).to(device))
        p.grad = torch.randn(s, generator=gen).to(device)
        params.append(p)
    return params


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(step: Callable[[], object]) -> int:
    """ATen/custom operations one (warm) step dispatches, profiler markers included."""
    step()
    step()
    with _CountOps() as counter:
        step()
    return counter.count


def time_steps(step: Callable[[], object], device: str, warmup: int, steps: int) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


Factory = Callable[[list[torch.Tensor], float], Callable[[], object]]


def _bpgrad(**kw: object) -> Factory:
    kw.setdefault("lipschitz", 1e4)

    def make(params: list[torch.Tensor], wd: float) -> Callable[[], object]:
        opt = BPGrad(params, weight_decay=wd, **kw)  # type: ignore[arg-type]
        loss = torch.tensor(1.5, device=params[0].device)
        return lambda: opt.step(loss=loss)
    return make


def _bpgrad_compiled(params: list[torch.Tensor], wd: float) -> Callable[[], object]:
    opt = BPGrad(params, lipschitz=1e4, weight_decay=wd)
    loss = torch.tensor(1.5, device=params[0].device)
    # Warm-up steps (in time_steps) absorb the compilation.
    return torch.compile(lambda: opt.step(loss=loss), fullgraph=True)


def _torch(cls: type, **kw: object) -> Factory:
    def make(params: list[torch.Tensor], wd: float) -> Callable[[], object]:
        return cls(params, weight_decay=wd, **kw).step  # type: ignore[no-any-return]
    return make


def _port(params: list[torch.Tensor], wd: float) -> Callable[[], object]:
    port = PortBPGrad(params, eta=1e-4, weight_decay=wd)
    loss = torch.tensor(1.5, device=params[0].device)
    return lambda: port.step(lambda: loss)


CANDIDATES: dict[str, Factory] = {
    "bpgrad default": _bpgrad(),
    "bpgrad default, auto L": _bpgrad(lipschitz="auto"),
    "bpgrad fused": _bpgrad(fused=True),
    "bpgrad foreach": _bpgrad(foreach=True),
    "bpgrad loop": _bpgrad(foreach=False, fused=False),
    "torch SGD(momentum) fused": _torch(torch.optim.SGD, lr=1e-4, momentum=0.9, fused=True),
    "torch SGD(momentum) foreach": _torch(torch.optim.SGD, lr=1e-4, momentum=0.9, foreach=True),
    "torch Adam fused": _torch(torch.optim.Adam, lr=1e-6, fused=True),
    "dfw port algorithm": _port,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weight-decay", type=float, default=5e-4,
                        help="the same for every optimizer (the paper's 5e-4 by default)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(opt.step) (inductor; slow to build)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; the reported time is the median over rounds")
    parser.add_argument("--candidates", default="",
                        help="comma-separated substrings: time only matching optimizers (torch's "
                             "fused SGD, the reference, always runs)")
    parser.add_argument("--sets", default="2c2d,ResNet-18", help="parameter sets to time")
    parser.add_argument("--compare-module", default="",
                        help="a file defining another BPGrad class (e.g. an earlier version: "
                             "git show REV:src/bpgrad/optim/bpgrad.py > before.py), timed "
                             "side by side as 'bpgrad (before.py)'")
    args = parser.parse_args()
    if args.compare_module:
        spec = importlib.util.spec_from_file_location("bpgrad_compared", args.compare_module)
        assert spec is not None and spec.loader is not None
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)

        def _other(params: list[torch.Tensor], wd: float) -> Callable[[], object]:
            opt = other.BPGrad(params, lipschitz=1e4, weight_decay=wd)
            loss = torch.tensor(1.5, device=params[0].device)
            return lambda: opt.step(loss=loss)

        CANDIDATES[f"bpgrad ({Path(args.compare_module).name})"] = _other
    wanted = [w for w in args.candidates.split(",") if w]
    for label in list(CANDIDATES):
        if (wanted and label != "torch SGD(momentum) fused" and not label.startswith("bpgrad (")
                and not any(w in label for w in wanted)):
            del CANDIDATES[label]
    torch.set_num_threads(args.threads)
    if args.compile:
        CANDIDATES["bpgrad compiled (inductor)"] = _bpgrad_compiled
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, "
          f"median of {args.steps} steps x {args.rounds} interleaved rounds")
    sets = {"2c2d": ("2c2d (DeepOBS)", shapes_2c2d()), "ResNet-18": ("ResNet-18", shapes_resnet18())}
    for name, shapes in (sets[key] for key in args.sets.split(",")):
        n = sum(torch.Size(s).numel() for s in shapes)
        results: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for label, factory in CANDIDATES.items():
                # Fresh parameters per candidate: every step mutates them.
                step = factory(make_params(shapes, args.device), args.weight_decay)
                results.setdefault(label, []).append(
                    time_steps(step, args.device, args.warmup, args.steps))
        med = {k: statistics.median(v) for k, v in results.items()}
        ops = {label: dispatched_ops(factory(make_params(shapes, args.device), args.weight_decay))
               for label, factory in CANDIDATES.items() if "compiled" not in label}
        floor = med["torch SGD(momentum) fused"]
        print(f"\n{name}: {n / 1e6:.2f} M parameters in {len(shapes)} tensors, "
              f"weight_decay={args.weight_decay}")
        print(f"{'optimizer':32s} {'ms/step':>9s} {'x SGD fused':>12s} {'ops/step':>9s}")
        for label, sec in med.items():
            print(f"{label:32s} {sec * 1e3:9.3f} {sec / floor:12.2f} {ops.get(label, '-'):>9}")
        if "dfw port algorithm" in med and "bpgrad default" in med:
            print(f"port / bpgrad default: "
                  f"{med['dfw port algorithm'] / med['bpgrad default']:.2f}x")

if __name__ == "__main__":
    main()
