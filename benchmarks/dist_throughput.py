"""Data-parallel throughput of the harness's training step on 1, 2, ... processes.

For every process count the script starts the processes through torch's own elastic launcher
(``torch.distributed.run``, as ``bpgrad compare --nproc-per-node`` does) and, in each, times the
harness's step (forward, backward, optimizer step; DDP over Gloo on the CPU, NCCL on CUDA) on the
problem's real data, each rank taking its slice of the global batch. It reports:

* ``samples/s``: global examples per second (per-process batch x processes / step time);
* ``step ms``: wall time of one step (the slowest rank);
* ``exposed AR``: share of the step that the gradient all-reduce adds, i.e. step time with DDP
  minus step time under ``no_sync()`` (no gradient all-reduce; the step is otherwise the same),
  divided by the step time; DDP overlaps its all-reduce with the backward pass, so this is the
  part that is not hidden;
* ``AR ms``, ``AR share``: one all-reduce of a buffer the size of the gradients, alone, and that
  time as a share of the step (the communication cost if nothing overlapped);
* ``scalar AR us``: one scalar all-reduce, the extra collective BPGrad adds per step (the
  same for every optimizer row: it is measured, not taken from the step).

    python benchmarks/dist_throughput.py                                # CPU: 1 and 2 processes
    python benchmarks/dist_throughput.py --nproc 1,2 --threads 1 --steps 200
    python benchmarks/dist_throughput.py --device cuda --nproc 1,2,4,8  # NCCL, one GPU each

The GPU variant is the same script with ``--device cuda``: rank ``r`` uses ``cuda:<LOCAL_RANK>``,
so ``--nproc`` must not exceed the number of GPUs (NCCL refuses two ranks on one GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bpgrad.bench.distributed import DistContext, init_from_env
from bpgrad.bench.optimizers import resolve_optimizer
from bpgrad.bench.problems.base import Problem, get_problem
from bpgrad.bench.runner import epoch_order, seed_everything

# toy_blobs, the tests' synthetic problem, lives in tests/bench (not in the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "bench"))
import toy_problem  # noqa: F401  (registers toy_blobs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(ctx: DistContext, device: torch.device, fn: Any, repeats: int) -> float:
    """Seconds per call of ``fn`` on the slowest rank (all ranks start together)."""
    ctx.barrier()
    _sync(device)
    t0 = time.perf_counter()
    for i in range(repeats):
        fn(i)
    _sync(device)
    elapsed = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
    if ctx.enabled:
        # Gloo reduces CPU tensors; NCCL needs them on the GPU.
        elapsed = elapsed.to(device)
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    return float(elapsed) / repeats


def _measure(ctx: DistContext, device: torch.device, problem: Problem, name: str,
             data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], per_rank: int,
             args: argparse.Namespace) -> dict[str, Any]:
    """Time one optimizer's step with and without the gradient all-reduce."""
    inputs, targets, order = data
    global_batch = per_rank * ctx.world_size
    n_batches = len(inputs) // global_batch
    seed_everything(0)
    model = problem.make_model(0).to(device)
    net: nn.Module = model
    if ctx.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    spec = resolve_optimizer(name)
    opt = spec.build(model.parameters())

    def step(i: int, *, sync: bool = True) -> None:
        b = i % n_batches
        idx = order[b * global_batch:(b + 1) * global_batch]
        idx = idx[ctx.shard(int(idx.shape[0]))] if ctx.enabled else idx
        opt.zero_grad(set_to_none=True)
        if sync or not ctx.enabled:
            loss = problem.loss(net(inputs[idx]), targets[idx])
            loss.backward()
        else:
            with net.no_sync():  # type: ignore[operator]
                loss = problem.loss(net(inputs[idx]), targets[idx])
                loss.backward()
        if spec.spec.needs_loss:
            opt.step(loss=loss.detach())  # type: ignore[call-overload]
        else:
            opt.step()

    for i in range(args.warmup):
        step(i)
    with_ar, without_ar = [], []
    for _ in range(args.repeats):  # alternate, medians: the machine may be shared
        with_ar.append(_timed(ctx, device, step, args.steps))
        without_ar.append(_timed(ctx, device, lambda i: step(i, sync=False), args.steps))
    t_step, t_local = statistics.median(with_ar), statistics.median(without_ar)
    n_params = sum(p.numel() for p in model.parameters())
    t_ar = t_loss = 0.0
    if ctx.enabled:
        flat = torch.zeros(n_params, device=device, dtype=torch.float32)
        scalar = torch.zeros((), device=device, dtype=torch.float32)
        t_ar = _timed(ctx, device, lambda i: torch.distributed.all_reduce(flat), args.steps)
        t_loss = _timed(ctx, device, lambda i: torch.distributed.all_reduce(scalar), args.steps)
    return {
        "optimizer": name, "processes": ctx.world_size, "backend": ctx.backend,
        "threads_per_process": torch.get_num_threads(), "per_process_batch": per_rank,
        "global_batch": global_batch, "parameters": n_params,
        "samples_per_s": global_batch / t_step, "step_ms": 1e3 * t_step,
        "step_no_sync_ms": 1e3 * t_local,
        "exposed_allreduce_share": max(0.0, (t_step - t_local) / t_step) if ctx.enabled
        else 0.0,
        "allreduce_ms": 1e3 * t_ar, "allreduce_share": t_ar / t_step,
        "loss_allreduce_us": 1e6 * t_loss,
    }


def worker(args: argparse.Namespace) -> None:
    ctx, dev_name = init_from_env(args.device, timeout_s=300)
    device = torch.device(dev_name)
    torch.set_num_threads(args.threads)
    problem = get_problem(args.problem)
    if ctx.local_rank != 0:
        ctx.barrier()
    splits = problem.load(validation_size=0)
    if ctx.enabled and ctx.local_rank == 0:
        ctx.barrier()
    inputs, targets = splits.train.inputs.to(device), splits.train.targets.to(device)
    order = epoch_order(len(inputs), 0, 1, device)
    per_rank = args.batch_size or problem.batch_size
    rows = [_measure(ctx, device, problem, name, (inputs, targets, order), per_rank, args)
            for name in args.optimizers.split(",")]
    if ctx.is_main and args.result:
        Path(args.result).write_text(json.dumps(rows))
    if ctx.enabled:
        ctx.barrier()
        torch.distributed.destroy_process_group()


def launch(args: argparse.Namespace, nproc: int, result: Path) -> None:
    from torch.distributed import run as torch_run

    forwarded = ["--worker", "--result", str(result), "--problem", args.problem,
                 "--optimizers", args.optimizers, "--device", args.device,
                 "--threads", str(args.threads), "--steps", str(args.steps),
                 "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.batch_size:
        forwarded += ["--batch-size", str(args.batch_size)]
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch_run.main(["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc),
                    "--max-restarts", "0", os.path.abspath(__file__), *forwarded])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="mnist_lenet")
    parser.add_argument("--optimizers", default="bpgrad,sgd")
    parser.add_argument("--nproc", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--batch-size", type=int, help="per process (default: the problem's)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (int(n) for n in args.nproc.split(",")):
            result = Path(tmp) / f"n{nproc}.json"
            launch(args, nproc, result)
            rows += json.loads(result.read_text())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    base = {r["optimizer"]: r["samples_per_s"] for r in rows if r["processes"] == 1}
    print(f"\n{args.problem} on {args.device}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{args.threads} thread(s) per process, batch {rows[0]['per_process_batch']} per "
          "process\n")
    print("| optimizer | processes | samples/s | speed-up | step ms | exposed AR | AR ms | "
          "AR share | scalar AR us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = r["samples_per_s"] / base[r["optimizer"]] if r["optimizer"] in base else 0.0
        print(f"| {r['optimizer']} | {r['processes']} | {r['samples_per_s']:.0f} | "
              f"{speedup:.2f} | {r['step_ms']:.2f} | {100 * r['exposed_allreduce_share']:.0f}% | "
              f"{r['allreduce_ms']:.3f} | {100 * r['allreduce_share']:.0f}% | "
              f"{r['loss_allreduce_us']:.0f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
