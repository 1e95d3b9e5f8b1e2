"""The harness on ``torch.distributed``: process group, rank-aware helpers, launcher, faults.

Nothing here is a transport of its own. Processes are started by torch's elastic launcher
(``torchrun``, or :func:`launch` which calls the same ``torch.distributed.run``), which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` (or a rendezvous);
:func:`init_from_env` reads them and creates the default process group with Gloo on the CPU and
NCCL on CUDA. Everything the runner exchanges between ranks goes through that group:

* the trial decision (skip, resume with rank 0's checkpoint, start) by ``broadcast_object_list``,
  so a rank never reads a file rank 0 may still be writing and no shared file system is needed;
* gradients by DDP; BPGrad's loss by its own all-reduce (``distributed_loss``);
* metric sums, the step losses (once per ``log_interval``) and a replica-agreement check by
  ``all_reduce``; the RNG states of all ranks for checkpoints by ``all_gather_object``.

Seeds per rank: the model is built from the trial seed on every rank (and DDP broadcasts rank 0's
weights anyway), the data order of an epoch is the single-process one, a function of
(seed, epoch) only. The global RNGs that dropout uses, and the augmentation generator, are seeded
with :func:`rank_seed` (the trial seed itself on rank 0), so ranks draw independent masks and a
one-process run is exactly the run it was before.

Faults: the process group gets a timeout (``--dist-timeout``); a rank that raises prints a message
naming itself and leaves at once (``os._exit``), so its peers' next collective fails (connection
closed) or times out, and they leave too; the launcher names the failed rank. Finished trials are
on disk (rank 0 writes each trial's file before the next starts); a rerun resumes.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

#: default seconds a collective may wait for the other ranks before the run stops
DEFAULT_TIMEOUT_S = 600.0

#: offset between the per-rank seeds of the global RNGs (rank 0 keeps the trial seed)
_RANK_SEED_STRIDE = 1_000_000_007


def env_ranks() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` set by torchrun, or None outside a launcher."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local


def env_rank() -> int:
    """This process's rank per the launcher's environment (0 outside a launcher)."""
    ranks = env_ranks()
    return ranks[0] if ranks else 0


def rank_seed(seed: int, rank: int) -> int:
    """Seed of the global RNGs (dropout, augmentation) on ``rank`` for trial ``seed``."""
    return (seed + _RANK_SEED_STRIDE * rank) % 2**63


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run; ``world_size == 1`` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: processes on this node (``LOCAL_WORLD_SIZE``)
    local_world_size: int = 1
    backend: str | None = None
    timeout_s: float | None = None

    @property
    def enabled(self) -> bool:
        """True when there are several ranks (a process group exists)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files, prints progress and writes the report."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for the result header and run.json."""
        nodes = max(1, self.world_size // max(1, self.local_world_size))
        return {"world_size": self.world_size, "backend": self.backend, "nodes": nodes,
                "processes_per_node": self.local_world_size, "timeout_s": self.timeout_s}

    # -- collectives (no-ops for a single process) -------------------------------------------

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place (sum over ranks) and return it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of ``tensor`` (a new tensor; Gloo has no AVG, so sum and divide)."""
        if not self.enabled:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def spread(self, tensor: torch.Tensor) -> float:
        """Largest absolute difference of ``tensor`` between any two ranks (0.0 = identical)."""
        if not self.enabled:
            return 0.0
        hi, lo = tensor.detach().clone(), tensor.detach().clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return float((hi - lo).abs().max()) if hi.numel() else 0.0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_all(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_tensors_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values."""
        if self.enabled:
            for t in tensors:
                dist.broadcast(t, src=0)

    def barrier(self) -> None:
        """Wait for every rank (bounded by the process group's timeout)."""
        if self.enabled:
            dist.barrier()

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of ``range(n)`` (sizes differ by at most one)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


SINGLE = DistContext()


def backend_for(device: str) -> str:
    """NCCL for CUDA devices, Gloo otherwise."""
    return "nccl" if device.startswith("cuda") else "gloo"


def init_from_env(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[DistContext, str]:
    """Create the default process group from torchrun's environment.

    Returns the context and the device this rank trains on (``cuda:<LOCAL_RANK>`` for CUDA).
    Outside a launcher, or with ``WORLD_SIZE=1``, returns the single-process context and
    ``device`` unchanged without creating a group.
    """
    ranks = env_ranks()
    if ranks is None or ranks[1] <= 1:
        return SINGLE, device
    rank, world, local = ranks
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = backend_for(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: torch sees no CUDA device on rank {rank}")
        visible = torch.cuda.device_count()
        if local >= visible:
            # NCCL cannot run two ranks on one GPU; failing here names the fix instead of a
            # CUDA "invalid device ordinal" (or an NCCL duplicate-GPU error) deep in init.
            raise RuntimeError(
                f"--device {device}: rank {rank} has LOCAL_RANK {local} but this node has only "
                f"{visible} visible GPU(s); NCCL needs one GPU per process: start at most "
                f"{visible} process(es) per node, or use --device cpu (Gloo)"
            )
        device = f"cuda:{local}"
        torch.cuda.set_device(torch.device(device))
    if not (dist.is_available() and dist.is_initialized()):
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = torch.device(device)
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s), **kwargs)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local,
                      local_world_size=local_world, backend=backend, timeout_s=timeout_s)
    return ctx, device


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group created by :func:`init_from_env` (after a clean run)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def finish_rank(ctx: DistContext, status: int) -> NoReturn:
    """End a launched rank after a clean run: free the process group, then exit at once.

    Exiting without interpreter finalisation avoids an abort seen now and then at exit on the
    non-zero ranks with torch 2.13 and Gloo ("terminate called without an active exception",
    SIGABRT), when C++ communication objects are torn down with the interpreter. Everything the
    rank owns is on disk or flushed by then.
    """
    import gc

    gc.collect()  # DDP wrappers of finished trials hold the group; free them while Python lives
    shutdown(ctx)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def fail_fast(ctx: DistContext, exc: BaseException, *, command: str = "compare") -> NoReturn:
    """Report ``exc`` as this rank's failure and leave the process at once (exit status 1).

    Leaving without waiting in a collective is what keeps the other ranks from hanging: their
    next collective sees the closed connection (or times out) and they fail fast too. Under
    torch's launcher the message also goes to the rank's error file, so the launcher's summary
    shows it. A rank that only lost its peers waits a moment before leaving, so that the
    launcher sees the rank that failed first.
    """
    text_lower = str(exc).lower()
    timeout = "timeout" in text_lower or "timed out" in text_lower
    secondary = isinstance(exc, dist.DistError) or timeout or any(
        marker in text_lower for marker in _LOST_PEER_MARKERS
    )
    if secondary:
        why = (f"timed out after {ctx.timeout_s:g} s waiting for the other ranks" if timeout
               else "lost contact with another rank")
        head = (f"bpgrad {command}: rank {ctx.rank} of {ctx.world_size} {SECONDARY_MARK} {why} "
                "(another rank failed, died or hangs; see its message and the launcher's "
                f"summary): {type(exc).__name__}: {str(exc)[:300]}")
    else:
        head = (f"bpgrad {command}: rank {ctx.rank} of {ctx.world_size} failed: "
                f"{type(exc).__name__}: {exc}")
    tail = ("finished trials are written; rerun the same command to resume the others "
            f"(--dist-timeout bounds how long ranks wait for each other, now {ctx.timeout_s:g} s)")
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"{text}{head}\n{tail}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(RuntimeError(head))  # no-op outside the launcher
    except Exception:  # reporting must never keep a failed rank alive
        pass
    if secondary:
        import time

        time.sleep(_SECONDARY_DELAY_S)
    os._exit(1)


#: words in a rank's failure message that say it only lost its peers (not the root cause)
SECONDARY_MARK = "stopped:"
_LOST_PEER_MARKERS = ("connection closed", "connection reset", "broken pipe", "remote worker")
_SECONDARY_DELAY_S = 2.0


# ---------------------------------------------------------------------------------------------
# Launcher


#: what each launched process runs: ``python -m bpgrad``
BPGRAD_ENTRY: tuple[str, ...] = ("--module", "bpgrad")


def launcher_args(nproc_per_node: int, argv: Sequence[str],
                  entry: Sequence[str] = BPGRAD_ENTRY) -> list[str]:
    """``torch.distributed.run`` arguments that start ``python -m bpgrad <argv>`` on this node.

    The same as ``torchrun --standalone --nproc-per-node N -m bpgrad <argv>`` (one node, a
    local c10d rendezvous on a free port, no restarts: a failed rank fails the run). ``entry``
    replaces ``--module bpgrad`` (tests start a script that passes fault hooks in).
    """
    return ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc_per_node),
            "--max-restarts", "0", *entry, *argv]


def launch(nproc_per_node: int, argv: Sequence[str], *, threads: int | None = None,
           command: str = "compare", entry: Sequence[str] = BPGRAD_ENTRY) -> int:
    """Run ``bpgrad <argv>`` on ``nproc_per_node`` local processes through torch's launcher.

    ``threads`` sets ``OMP_NUM_THREADS`` for the processes when it is not set already (torchrun
    otherwise sets 1 and warns). Returns the exit status: 0, or 1 with a message naming the
    failed rank(s).
    """
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    saved = os.environ.get("OMP_NUM_THREADS")
    if saved is None:
        os.environ["OMP_NUM_THREADS"] = str(threads or 1)
    try:
        torch_run.main(launcher_args(nproc_per_node, argv, entry))
    except ChildFailedError as exc:
        rank, failure = min(exc.failures.items(), key=_root_cause_key)
        others = sorted(set(exc.failures) - {rank})
        names = ", ".join(map(str, others))
        if failure.exitcode < 0 and others:
            # It did not fail by itself: the others gave up waiting for it (a hang) and the
            # launcher then stopped it.
            waited = _failure_text(exc.failures[others[0]].message)
            text = (f"rank {rank} stopped answering (it was still running and the launcher "
                    f"stopped it); rank(s) {names} gave up waiting: {waited}")
        else:
            text = (f"rank {rank} failed (local rank {failure.local_rank}, pid {failure.pid}, "
                    f"exit code {failure.exitcode}): {_failure_text(failure.message)}"
                    + (f"; then rank(s) {names} stopped" if others else ""))
        print(f"bpgrad {command}: {text}. Finished trials are written; rerun the same command "
              "to resume.", file=sys.stderr)
        return 1
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0


def _root_cause_key(item: tuple[int, Any]) -> tuple[int, int, int]:
    """Order launcher failures by how likely each is the root cause (smallest first).

    A rank that exited by itself with its own error comes first; then a rank killed by a signal
    (the launcher stops ranks that are still running: a hung rank, or one that was about to
    report a lost peer); last a rank that only reported losing its peers or timing out.
    """
    rank, failure = item
    if SECONDARY_MARK in _failure_text(failure.message):
        kind = 2
    elif failure.exitcode < 0:
        kind = 1
    else:
        kind = 0
    return kind, int(failure.timestamp), rank


def _failure_text(message: Any) -> str:
    """The one-line message of a launcher failure record (a string or torch's JSON dict)."""
    if isinstance(message, dict):
        message = message.get("message", message)
    text = str(message) if message else "no message (killed by a signal?)"
    return text.removeprefix("RuntimeError: ")
