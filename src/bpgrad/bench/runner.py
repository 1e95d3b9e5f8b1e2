"""Run one trial: seed, train, evaluate, log, checkpoint, resume.

:func:`run_trial` is the only entry point. It knows nothing about particular optimizers: the
:class:`~bpgrad.bench.optimizers.OptimizerSpec` says whether ``step`` needs the loss or a closure,
whether to call ``start_epoch()``, and whether to switch ``train()``/``eval()``.

Costs kept off the hot path: per-step values (loss, and BPGrad's ``eta``/``grad_norm``) stay 0-dim
tensors on the device and are copied to the host once every ``log_interval`` steps, which is also
when divergence (a non-finite loss) is detected. Nothing else synchronises inside an epoch,
except the evaluations asked for with ``Budget.eval_interval`` (``eval`` records).

Phases (each a named function or method below): lay out the data (:func:`_layout`), write the
header (:func:`_header`), decide (:func:`_decide`: skip, resume, start; corrupt files are moved
aside), train (:meth:`_Trial.epoch_loop`), checkpoint (:meth:`_Trial.checkpoint`), summary
(:meth:`_Trial.finish`). Tests reach inside a trial through :class:`TrialHooks` callbacks.

Resume: after each epoch the result file is rewritten atomically and a checkpoint (model,
optimizer, RNG states, counters) is saved atomically next to it. A rerun skips a trial whose file
has a summary and continues an unfinished one from its checkpoint; because the data order of every
epoch is a function of (seed, epoch) only, the resumed run reaches the same final state as an
uninterrupted one, bit for bit on CPU.

Several processes (``torchrun``, ``bpgrad compare --nproc-per-node N``): pass the
:class:`~bpgrad.bench.distributed.DistContext`. The model is wrapped in DDP; every global step takes
the next ``batch_size * world_size`` examples of the single-process permutation and each rank its
contiguous slice (``batch_size`` per rank); metric sums are all-reduced; rank 0 alone reads and
writes files and decides (skip / resume / start), which it broadcasts with its checkpoint.
"""


from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bpgrad.bench.distributed import SINGLE, DistContext, rank_seed
from bpgrad.bench.optimizers import ResolvedOptimizer
from bpgrad.bench.problems.base import Problem, Split, Splits
from bpgrad.bench.results import (
    SCHEMA_VERSION,
    SchemaError,
    checkpoint_path,
    clean_json,
    read_records,
    trial_path,
    validate_records,
    write_records,
)

#: header fields that must match for an existing result file to be resumed or skipped
_FINGERPRINT_KEYS = ("problem", "optimizer", "seed", "budget", "data")


class ResultMismatchError(RuntimeError):
    """An existing result file was produced with a different configuration."""


@dataclass(frozen=True)
class Budget:
    """How much training a trial gets."""

    epochs: int
    #: train on at most this many minibatches per epoch (smoke runs); None = all
    limit_train_batches: int | None = None
    #: minibatch size; None = the problem's default
    batch_size: int | None = None
    #: also evaluate every this many steps (``eval`` records); None = before training and at
    #: epoch ends only
    eval_interval: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.limit_train_batches is not None and self.limit_train_batches < 1:
            raise ValueError(
                f"limit_train_batches must be >= 1 (or None), got {self.limit_train_batches}"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eval_interval is not None and self.eval_interval < 1:
            raise ValueError(f"eval_interval must be >= 1 (or None), got {self.eval_interval}")


@dataclass(frozen=True)
class RunOptions:
    """Execution settings that do not change what is computed (except ``device``)."""

    device: str = "cpu"
    #: torch intra-op threads; None leaves torch's setting alone
    threads: int | None = None
    quiet: bool = False
    #: None: the problem's ``eval_batch_size``
    eval_batch_size: int | None = None
    #: steps between host copies of the step series (and divergence checks)
    log_interval: int = 50
    #: seed of the train/valid split (the same for every trial so that selection is fair)
    data_seed: int = 0
    #: keep a resume checkpoint after each epoch
    checkpoint: bool = True


@dataclass(frozen=True)
class TrialOutcome:
    """What happened to one trial."""

    path: Path
    #: ``finished`` or ``diverged``
    status: str
    #: True when the trial had already finished and was not run again
    skipped: bool
    #: True when it continued from a checkpoint
    resumed: bool
    summary: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Environment and seeding


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the source tree bpgrad runs from, or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, Any]:
    """Versions, host and hardware facts recorded with every trial."""
    import bpgrad

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "bpgrad": bpgrad.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "git_commit": git_commit(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return env


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The training-set permutation of one epoch: a function of (seed, epoch) only.

    Every optimizer sees the same data order for the same seed, and a resumed trial sees the
    order it would have seen without the interruption.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


def _rng_state() -> dict[str, Any]:
    # Stored as tensors and plain numbers so the checkpoint loads with weights_only=True.
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    py_version, py_keys, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_version),
        "python_keys": torch.tensor(py_keys, dtype=torch.int64),
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state((
        "MT19937",
        state["numpy_keys"].numpy().astype(np.uint32),
        int(state["numpy_pos"]),
        int(state["numpy_has_gauss"]),
        float(state["numpy_gauss"]),
    ))
    random.setstate((
        int(state["python_version"]),
        tuple(int(k) for k in state["python_keys"].tolist()),
        state["python_gauss"],
    ))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(payload), tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    problem: Problem, model: nn.Module, split: Split, batch_size: int,
    dist: DistContext = SINGLE,
) -> dict[str, float | None]:
    """Mean loss and accuracy of ``model`` over ``split`` (None for an empty split).

    With several ranks each evaluates its contiguous part of the split and the sums are
    all-reduced, so every rank gets the metrics of the whole split.
    """
    n = len(split)
    if n == 0:
        return {"loss": None, "accuracy": None}
    was_training = model.training
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    part = dist.shard(n) if dist.enabled else slice(0, n)
    for start in range(part.start, part.stop, batch_size):
        stop = min(start + batch_size, part.stop)
        x = split.inputs[start:stop]
        y = split.targets[start:stop]
        for key, value in problem.batch_metrics(model(x), y).items():
            value = value.detach().to(torch.float64)
            totals[key] = totals[key] + value if key in totals else value
    model.train(was_training)
    if dist.enabled:
        totals = _reduce_sums(problem, totals, dist, split.inputs.device)
    values = {k: float(v) for k, v in totals.items()}
    count = values.get("count", float(n))
    return {
        "loss": values["loss_sum"] / count,
        "accuracy": values["correct"] / count if problem.has_accuracy and "correct" in values
        else None,
        **problem.split_metrics(values),  # whole-split ratios such as mean IU
    }


def _reduce_sums(problem: Problem, sums: Mapping[str, torch.Tensor], dist: DistContext,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Sum the per-rank metric sums over ranks: one all-reduce of a small vector.

    The keys are fixed (``loss_sum``, ``count``, ``correct`` and the problem's
    ``split_sum_keys``, e.g. mean IU's confusion counts) so that a rank with no examples still
    takes part.
    """
    keys = ("loss_sum", "count", "correct") if problem.has_accuracy else ("loss_sum", "count")
    keys = (*keys, *problem.split_sum_keys)
    vec = torch.stack([
        sums[k].to(device=device, dtype=torch.float64) if k in sums
        else torch.zeros((), dtype=torch.float64, device=device)
        for k in keys
    ])
    dist.sum_(vec)
    return {k: vec[i] for i, k in enumerate(keys)}


def _steps_per_epoch(n_train: int, global_batch: int, drop_last: bool, world: int) -> int:
    """Minibatches per epoch; with several ranks a last batch too small to give every rank an
    example is dropped."""
    full, rest = divmod(n_train, global_batch)
    if drop_last or rest == 0 or rest < world:
        return full
    return full + 1


def _split_to(split: Split, device: torch.device) -> Split:
    if split.inputs.device == device and split.targets.device == device:
        return split
    return Split(split.inputs.to(device), split.targets.to(device))


# ---------------------------------------------------------------------------------------------
# The trial, in named phases: lay out the data, write the header, decide (skip / resume /
# start), train epoch by epoch with evaluations and checkpoints, write the summary.


@dataclass(frozen=True)
class TrialHooks:
    """Callbacks into a running trial, the way tests stop or fail one at a chosen point.

    ``before_step(rank, label, step)`` runs before every optimizer step (``step`` counts from 1
    over the whole trial); ``on_epoch_end(epoch)`` runs once an epoch's records and checkpoint
    are on disk. An exception raised by either ends the trial the way a kill would: the files
    written so far stay, and a rerun resumes.
    """

    before_step: Callable[[int, str, int], None] | None = None
    on_epoch_end: Callable[[int], None] | None = None


def _fingerprint(header: Mapping[str, Any]) -> dict[str, Any]:
    fp = {k: header.get(k) for k in _FINGERPRINT_KEYS}
    if isinstance(fp["optimizer"], Mapping):
        # The installed version may change between a kill and a resume; the settings may not.
        fp["optimizer"] = {k: v for k, v in fp["optimizer"].items() if k != "version"}
    return fp


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(clean_json(value)))


def _check_same_config(existing: Mapping[str, Any], new: Mapping[str, Any], path: Path) -> None:
    old_fp, new_fp = _fingerprint(existing), _json_roundtrip(_fingerprint(new))
    if old_fp != new_fp:
        diffs = [k for k in _FINGERPRINT_KEYS if old_fp.get(k) != new_fp.get(k)]
        raise ResultMismatchError(
            f"{path} was written with a different configuration (differs in: "
            f"{', '.join(diffs)}); use another --out folder, or move the old results away"
        )


@dataclass(frozen=True)
class _Layout:
    """A trial's data on its device and its batch arithmetic."""

    train: Split
    valid: Split
    test: Split
    #: per rank; a step consumes ``global_batch = batch_size * world_size`` examples
    batch_size: int
    global_batch: int
    steps_per_epoch: int
    eval_batch_size: int


def _layout(problem: Problem, splits: Splits, budget: Budget, opts: RunOptions,
            device: torch.device, world: int) -> _Layout:
    train = _split_to(splits.train, device)
    batch_size = budget.batch_size or problem.batch_size
    global_batch = batch_size * world
    if len(train) == 0:
        raise ValueError(f"problem {problem.name!r} has an empty training split")
    # DeepOBS problems drop the last incomplete batch; the paper's nets keep it.
    steps = _steps_per_epoch(len(train), global_batch, problem.drop_last, world)
    if steps == 0:
        raise ValueError(
            f"batch size {global_batch} exceeds the {len(train)} training examples with "
            "drop_last; use a smaller --batch-size"
        )
    if budget.limit_train_batches is not None:
        steps = min(steps, budget.limit_train_batches)
    return _Layout(train, _split_to(splits.valid, device), _split_to(splits.test, device),
                   batch_size, global_batch, steps,
                   opts.eval_batch_size or problem.eval_batch_size)


def _header(problem: Problem, optimizer: ResolvedOptimizer, seed: int, budget: Budget,
            lay: _Layout, opts: RunOptions, ctx: DistContext, device: torch.device,
            extra_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``config`` record: what runs, with which settings, where."""
    budget_rec = {k: v for k, v in asdict(budget).items() if k != "eval_interval"}
    header: dict[str, Any] = {
        "kind": "config",
        "schema_version": SCHEMA_VERSION,
        "problem": {"name": problem.name, "description": problem.description,
                    "has_accuracy": problem.has_accuracy},
        "optimizer": optimizer.describe(),
        "seed": seed,
        "budget": {
            **budget_rec,
            "batch_size": lay.global_batch,
            "steps_per_epoch": lay.steps_per_epoch,
            "eval_batch_size": lay.eval_batch_size,
            "drop_last": problem.drop_last,
            # Only when set, so files written before it existed keep their fingerprint.
            **({"eval_interval": budget.eval_interval} if budget.eval_interval else {}),
            # Only in multi-process runs, so one-process files keep their fingerprint; a
            # different world size is a different trial (another global batch, other RNG draws).
            **({"world_size": ctx.world_size, "per_rank_batch_size": lay.batch_size}
               if ctx.enabled else {}),
        },
        "data": {"train_size": len(lay.train), "valid_size": len(lay.valid),
                 "test_size": len(lay.test), "data_seed": opts.data_seed},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "log_interval": opts.log_interval,
        "environment": environment(str(device)),
        "start_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra_config:
        header["run"] = dict(extra_config)
    if ctx.enabled:
        header["distributed"] = ctx.describe()
    return header


def _say(message: str) -> None:
    print(f"bpgrad: {message}", file=sys.stderr, flush=True)


def move_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to ``<name>.<why>-<UTC time>`` next to it (kept for inspection, out of
    the way of a rerun) and return the new path."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.{why}-{stamp}")
    os.replace(path, target)
    return target


CheckpointProbe = Callable[[Mapping[str, Any]], None]


def _decide(path: Path, header: Mapping[str, Any], probe: CheckpointProbe,
            ctx: DistContext) -> dict[str, Any]:
    """Skip a finished trial, resume an unfinished one from its checkpoint, or start.

    Rank 0 alone reads the files and decides; the others get its decision (and checkpoint).
    A result file that cannot be read, or a checkpoint that does not load, is moved aside with
    a message and the trial starts again; a file from a different configuration is an error.
    """
    decision: dict[str, Any] | None = None
    if ctx.is_main:
        try:
            decision = _decide_from_files(path, header, probe)
        except ResultMismatchError as exc:
            decision = {"action": "mismatch", "message": str(exc)}
    decision = ctx.broadcast(decision)
    assert decision is not None
    if decision["action"] == "mismatch":
        raise ResultMismatchError(decision["message"])
    return decision


def _decide_from_files(path: Path, header: Mapping[str, Any],
                       probe: CheckpointProbe) -> dict[str, Any]:
    ckpt_path = checkpoint_path(path)
    start = {"action": "start"}
    if not path.exists():
        if ckpt_path.exists():  # no results to resume into: it belongs to nothing
            moved = move_aside(ckpt_path, "orphan")
            _say(f"{ckpt_path} has no result file; moved it to {moved.name}")
        return start
    try:
        existing = read_records(path)
        validate_records(existing, where=str(path))
    except (SchemaError, UnicodeDecodeError) as exc:
        moved = move_aside(path, "corrupt")
        if ckpt_path.exists():
            move_aside(ckpt_path, "corrupt")
        _say(f"result file unreadable ({exc}); moved it to {moved.name} and running the "
             "trial again")
        return start
    _check_same_config(existing[0], header, path)
    if existing[-1].get("kind") == "summary":
        return {"action": "skip", "summary": dict(existing[-1])}
    if not ckpt_path.exists():
        return start  # killed before its first checkpoint: nothing to resume
    try:
        # Loaded to the CPU: RNG states must stay CPU tensors; load_state_dict moves the model
        # and optimizer tensors to the parameters' device.
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        probe(ckpt)
    except Exception as exc:  # any way a checkpoint can fail to load means: start over
        moved = move_aside(ckpt_path, "corrupt")
        move_aside(path, "partial")
        _say(f"checkpoint {ckpt_path} does not load ({type(exc).__name__}: "
             f"{str(exc)[:200]}); moved it to {moved.name} and running the trial again")
        return start
    done = int(ckpt["epoch"])
    # Keep the original header (its start time) and drop records of an epoch that ran past
    # the checkpoint: that epoch is recomputed identically.
    kept = [existing[0]] + [r for r in existing[1:]
                            if r.get("kind") in ("steps", "eval", "epoch") and r["epoch"] <= done]
    return {"action": "resume", "ckpt": ckpt, "records": kept}


def _checkpoint_probe(problem: Problem, optimizer: ResolvedOptimizer,
                      seed: int) -> CheckpointProbe:
    """Check that a checkpoint loads into a fresh model and optimizer of this trial."""
    def probe(ckpt: Mapping[str, Any]) -> None:
        model = problem.make_model(seed)
        model.load_state_dict(ckpt["model"])
        optimizer.build(model.parameters()).load_state_dict(ckpt["optimizer"])
        for key in ("epoch", "step", "wall_time", "train_time", "resumes", "rng"):
            if key not in ckpt:
                raise KeyError(f"no {key!r} entry")

    return probe


class _Trial:
    """A running trial: the model, the optimizer, the counters and the records so far."""

    def __init__(self, problem: Problem, optimizer: ResolvedOptimizer, seed: int,
                 budget: Budget, lay: _Layout, opts: RunOptions, ctx: DistContext,
                 hooks: TrialHooks, path: Path, device: torch.device) -> None:
        self.problem, self.optimizer, self.seed, self.budget = problem, optimizer, seed, budget
        self.lay, self.opts, self.ctx, self.hooks = lay, opts, ctx, hooks
        self.path, self.device, self.spec = path, device, optimizer.spec
        self.records: list[dict[str, Any]] = []
        self.first_epoch, self.last_epoch, self.step, self.resumes = 1, 0, 0, 0
        self.wall_time = self.train_time = 0.0
        self.resumed = False
        self.status: str = "finished"
        self.diverged_at: int | None = None
        seed_everything(seed)
        self.model = problem.make_model(seed).to(device)
        if ctx.rank:
            # Independent dropout draws per rank; rank 0 keeps the one-process stream.
            seed_everything(rank_seed(seed, ctx.rank))
        self.net: nn.Module = self.model
        if ctx.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.opt = optimizer.build(self.model.parameters())

    # -- phases ---------------------------------------------------------------------------

    def start(self, header: dict[str, Any], decision: Mapping[str, Any]) -> None:
        """Restore from the checkpoint, or record the metrics before training."""
        if decision["action"] == "resume":
            ckpt = decision["ckpt"]
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            rng_ranks = ckpt.get("rng_ranks")
            _set_rng_state(rng_ranks[self.ctx.rank] if rng_ranks is not None else ckpt["rng"])
            self.last_epoch = int(ckpt["epoch"])
            self.first_epoch, self.step = self.last_epoch + 1, int(ckpt["step"])
            self.wall_time, self.train_time = float(ckpt["wall_time"]), float(ckpt["train_time"])
            self.resumes, self.resumed = int(ckpt["resumes"]) + 1, True
            self.records = list(decision["records"])
            return
        self.records = [header]
        t0 = time.perf_counter()
        metrics = self.metrics()
        self.wall_time += time.perf_counter() - t0
        self.records.append({"kind": "epoch", "epoch": 0, "step": 0, "train_loss": None,
                             "train_accuracy": None, **metrics, "wall_time": self.wall_time,
                             "train_time": 0.0})
        self.write()

    def epoch_loop(self, progress: _Progress) -> None:
        """Train the remaining epochs, or until the loss stops being finite."""
        for epoch in range(self.first_epoch, self.budget.epochs + 1):
            t_epoch = time.perf_counter()
            sums, eval_s = self.train_epoch(epoch, progress, t_epoch)
            self.last_epoch = epoch
            self.train_time += time.perf_counter() - t_epoch - eval_s
            if self.status == "diverged":
                self.wall_time += time.perf_counter() - t_epoch
                return
            self.end_epoch(epoch, sums, t_epoch, progress)
            if self.status == "diverged":
                return
            if self.hooks.on_epoch_end is not None:
                self.hooks.on_epoch_end(epoch)

    def train_epoch(self, epoch: int, progress: _Progress,
                    t_epoch: float) -> tuple[dict[str, torch.Tensor], float]:
        """One epoch of steps; returns the summed batch metrics and the seconds spent in
        evaluations within the epoch (``eval_interval``)."""
        ctx, spec, opt, lay = self.ctx, self.spec, self.opt, self.lay
        if spec.epoch_hook:
            opt.start_epoch()  # type: ignore[attr-defined]
        if spec.train_eval:
            opt.train()  # type: ignore[attr-defined]
        self.model.train()
        order = epoch_order(len(lay.train), self.seed, epoch, self.device)
        # Augmentation draws from its own generator, re-seeded per epoch like the data order.
        aug_seed = self.seed * 1_000_003 + epoch + 7_777_777
        aug_gen = torch.Generator().manual_seed(
            rank_seed(aug_seed, ctx.rank) if ctx.rank else aug_seed)
        log = _StepLog(opt, self.opts.log_interval, reduce=ctx.mean if ctx.enabled else None)
        sums: dict[str, torch.Tensor] = {}
        eval_s, interval = 0.0, self.budget.eval_interval
        for b in range(lay.steps_per_epoch):
            if self.hooks.before_step is not None:
                self.hooks.before_step(ctx.rank, self.optimizer.label, self.step + 1)
            loss = self.train_step(order[b * lay.global_batch:(b + 1) * lay.global_batch], aug_gen,
                                   sums)
            bad = log.record(self.step, loss)
            if bad is None and interval and self.step % interval == 0 \
                    and b + 1 < lay.steps_per_epoch:
                eval_s += self.eval_point(epoch, t_epoch, eval_s)
            if bad is not None:
                self.status, self.diverged_at = "diverged", bad
                break
            if log.just_flushed:
                progress.update(log.flushed_steps, loss=log.last_loss)
        else:
            bad = log.flush()
            if bad is not None:
                self.status, self.diverged_at = "diverged", bad
        progress.update(log.flushed_steps, loss=log.last_loss)
        self.records.extend(log.records(epoch))
        return sums, eval_s

    def train_step(self, idx: torch.Tensor, aug_gen: torch.Generator,
                   sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step on the examples ``idx`` (the global batch); returns the loss."""
        ctx, spec, opt, problem = self.ctx, self.spec, self.opt, self.problem
        weight = 1.0
        if ctx.enabled:
            # This rank's slice of the global batch. Only a last, incomplete batch splits
            # unevenly; its loss is weighted by the slice's share so that DDP's gradient mean
            # and BPGrad's loss mean are those of the whole batch.
            n_global = int(idx.shape[0])
            idx = idx[ctx.shard(n_global)]
            weight = idx.shape[0] * ctx.world_size / n_global
        x, y = problem.augment(self.lay.train.inputs[idx], aug_gen), self.lay.train.targets[idx]
        opt.zero_grad(set_to_none=True)
        outputs = self.net(x)
        loss = problem.loss(outputs, y)
        if weight != 1.0:
            loss = loss * weight
        loss.backward()
        if spec.needs_loss:
            opt.step(loss=loss.detach())  # type: ignore[call-overload]
        elif spec.needs_closure:
            value = float(loss.detach())  # ALI-G syncs for the value anyway
            opt.step(lambda value=value: value)  # type: ignore[misc]
        else:
            opt.step()
        self.step += 1
        with torch.no_grad():
            for key, val in problem.batch_metrics(outputs.detach(), y).items():
                val = val.detach().to(torch.float64)
                sums[key] = sums[key] + val if key in sums else val
        return loss.detach()

    def metrics(self) -> dict[str, float | None]:
        """Loss and accuracy on the validation and test splits, now."""
        if self.spec.train_eval:
            self.opt.eval()  # type: ignore[attr-defined]
        if self.ctx.enabled:
            # Buffers (BatchNorm statistics) were last updated from each rank's own slice; every
            # rank evaluates with rank 0's, as DDP trains with them.
            self.ctx.broadcast_tensors_(
                [b for b in self.model.buffers() if b.is_floating_point()])
        v = evaluate(self.problem, self.model, self.lay.valid, self.lay.eval_batch_size, self.ctx)
        t = evaluate(self.problem, self.model, self.lay.test, self.lay.eval_batch_size, self.ctx)
        names = self.problem.split_metric_names  # whole-split ratios such as mean IU
        return {"valid_loss": v["loss"], "valid_accuracy": v["accuracy"],
                "test_loss": t["loss"], "test_accuracy": t["accuracy"],
                **{f"valid_{k}": v.get(k) for k in names},
                **{f"test_{k}": t.get(k) for k in names}}

    def eval_point(self, epoch: int, t_epoch: float, eval_s: float) -> float:
        """An ``eval`` record in the middle of an epoch; returns the seconds it took."""
        t0 = time.perf_counter()
        metrics = self.metrics()
        if self.spec.train_eval:
            self.opt.train()  # type: ignore[attr-defined]
        now = time.perf_counter()
        self.records.append({
            "kind": "eval", "epoch": epoch, "step": self.step, **metrics,
            "wall_time": self.wall_time + now - t_epoch,
            "train_time": self.train_time + t0 - t_epoch - eval_s,
        })
        return now - t0

    def end_epoch(self, epoch: int, sums: Mapping[str, torch.Tensor], t_epoch: float,
                  progress: _Progress) -> None:
        """The epoch's record (train sums, validation and test metrics), then a checkpoint."""
        problem, ctx = self.problem, self.ctx
        if ctx.enabled:
            sums = _reduce_sums(problem, sums, ctx, self.device)
        count = float(sums["count"]) if "count" in sums else 0.0
        train_loss = float(sums["loss_sum"]) / count if count else None
        train_acc = (float(sums["correct"]) / count
                     if count and problem.has_accuracy and "correct" in sums else None)
        metrics = self.metrics()
        extra: dict[str, Any] = {}
        if ctx.enabled:
            extra["replica_spread"] = _replica_spread(self.model, ctx, self.optimizer.label,
                                                      epoch)
        self.wall_time += time.perf_counter() - t_epoch
        self.records.append({
            "kind": "epoch", "epoch": epoch, "step": self.step, "train_loss": train_loss,
            "train_accuracy": train_acc, **metrics, "wall_time": self.wall_time,
            "train_time": self.train_time, **extra,
        })
        progress.epoch_done(epoch, train_loss, metrics)
        self.write()
        if self.opts.checkpoint and epoch < self.budget.epochs:
            self.checkpoint(epoch)
        if train_loss is not None and not math.isfinite(train_loss):
            # Non-finite metrics without a non-finite step loss (e.g. overflow in the sum).
            self.status, self.diverged_at = "diverged", self.step

    def checkpoint(self, epoch: int) -> None:
        """Save everything a resume needs, atomically (rank 0; every rank's RNG state)."""
        # Saved in eval mode for Schedule-Free (metrics() switched it), which is the mode its
        # authors require for checkpoints; train() is called again on resume.
        rng_ranks = self.ctx.gather_all(_rng_state()) if self.ctx.enabled else None
        if self.ctx.is_main:
            _save_checkpoint(checkpoint_path(self.path), {
                "epoch": epoch, "step": self.step, "wall_time": self.wall_time,
                "train_time": self.train_time, "resumes": self.resumes,
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "rng": _rng_state(), **({"rng_ranks": rng_ranks} if rng_ranks else {}),
            })

    def finish(self) -> dict[str, Any]:
        """Append the summary, write the file for good and drop the checkpoint."""
        last = [r for r in self.records if r["kind"] == "epoch"][-1]
        summary: dict[str, Any] = {
            "kind": "summary",
            "status": self.status,
            "epochs_completed": self.last_epoch - (self.status != "finished"),
            "steps": self.step,
            "final": {k: v for k, v in last.items() if k != "kind"},
            "wall_time": self.wall_time,
            "train_time": self.train_time,
            "diverged_at_step": self.diverged_at,
            "resumes": self.resumes,
            "end_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self.records.append(summary)
        self.write()
        if self.ctx.is_main:
            checkpoint_path(self.path).unlink(missing_ok=True)
        return summary

    def write(self) -> None:
        """Rewrite the result file (rank 0), atomically."""
        if self.ctx.is_main:
            write_records(self.path, self.records)


def run_trial(
    problem: Problem,
    optimizer: ResolvedOptimizer,
    seed: int,
    budget: Budget,
    *,
    out: Path,
    splits: Splits | None = None,
    data_dir: Path | None = None,
    options: RunOptions | None = None,
    hooks: TrialHooks | None = None,
    extra_config: Mapping[str, Any] | None = None,
    dist: DistContext | None = None,
) -> TrialOutcome:
    """Train ``optimizer`` on ``problem`` with ``seed`` for ``budget``; write the trial file.

    Args:
        problem: what to train (data, model, loss, metrics).
        optimizer: the optimizer and its resolved hyperparameters.
        seed: the trial's seed (initial weights, data order, dropout).
        budget: epochs, minibatches per epoch, batch size, evaluation interval.
        out: the run folder; the file is ``out/<problem>/<label>/seed_<seed>.jsonl``.
        splits: the problem's data, loaded once per problem (default: ``problem.load``).
        data_dir: data cache folder when ``splits`` is not given.
        options: device, threads, progress, evaluation batch size, log interval.
        hooks: callbacks (:class:`TrialHooks`) that tests use to stop or fail the trial.
        extra_config: recorded under ``run`` in the header.
        dist: a :class:`~bpgrad.bench.distributed.DistContext` to train data-parallel on every
            rank of the process group; every rank calls this with the same arguments and gets
            the same outcome.

    Returns:
        What happened. A finished trial found on disk is skipped, an unfinished one resumes from
        its checkpoint; a diverged trial is recorded and returned, never raised.

    Raises:
        ResultMismatchError: the result file on disk was written with another configuration.
    """
    opts, ctx = options or RunOptions(), dist or SINGLE
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device; use cpu")
    optimizer.spec.check_available()
    path = trial_path(Path(out), problem.name, optimizer.label, seed)
    if splits is None:
        splits = problem.load(data_dir=data_dir, seed=opts.data_seed)
    lay = _layout(problem, splits, budget, opts, device, ctx.world_size)
    header = _header(problem, optimizer, seed, budget, lay, opts, ctx, device, extra_config)

    decision = _decide(path, header, _checkpoint_probe(problem, optimizer, seed), ctx)
    if decision["action"] == "skip":
        summary = dict(decision["summary"])
        return TrialOutcome(path, str(summary["status"]), True, False, summary)

    trial = _Trial(problem, optimizer, seed, budget, lay, opts, ctx, hooks or TrialHooks(),
                   path, device)
    trial.start(header, decision)
    progress = _Progress(
        total=budget.epochs * lay.steps_per_epoch,
        initial=(trial.first_epoch - 1) * lay.steps_per_epoch,
        desc=f"{problem.name}/{optimizer.label} seed {seed}",
        quiet=opts.quiet or not ctx.is_main,
    )
    try:
        trial.epoch_loop(progress)
    finally:
        progress.close()
    summary = trial.finish()
    return TrialOutcome(path, trial.status, False, trial.resumed, summary)


def _replica_spread(model: nn.Module, ctx: DistContext, label: str, epoch: int) -> float:
    """Largest parameter difference between ranks (0.0 when the replicas agree, as they must)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in model.parameters()])
    spread = ctx.spread(flat)
    if spread != 0.0 and ctx.is_main:
        print(f"warning: {label}: the model replicas differ by up to {spread:.3g} after epoch "
              f"{epoch} (the optimizer steps with rank-local values); the metrics mix replicas",
              file=sys.stderr)
    return spread


class _StepLog:
    """Per-step loss (and optimizer stats) kept on the device, copied to the host in batches."""

    def __init__(self, opt: torch.optim.Optimizer, interval: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.opt = opt
        #: mean over ranks of the queued losses (one all-reduce per flush), so that every rank
        #: logs the global minibatch loss and detects divergence at the same step
        self.reduce = reduce
        self.interval = max(1, interval)
        self.pending_steps: list[int] = []
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.host: dict[str, list[float]] = {"step": [], "loss": []}
        self.flushed_steps = 0
        self.just_flushed = False
        self.last_loss: float | None = None

    def record(self, step: int, loss: torch.Tensor) -> int | None:
        """Queue this step's values; returns the first diverged step if a flush found one."""
        self.pending_steps.append(step)
        self.pending.setdefault("loss", []).append(loss)
        stats = getattr(self.opt, "stats", None)
        if isinstance(stats, Mapping):
            for key in ("eta", "grad_norm"):
                value = stats.get(key)
                if isinstance(value, torch.Tensor):
                    # clone: the optimizer may update its stats tensors in place next step
                    self.pending.setdefault(key, []).append(value.detach().clone())
        self.just_flushed = False
        if len(self.pending_steps) >= self.interval:
            return self.flush()
        return None

    def flush(self) -> int | None:
        """Copy queued values to the host (one sync); returns the first non-finite loss step."""
        self.flushed_steps = 0
        if not self.pending_steps:
            return None
        n = len(self.pending_steps)
        stacked = {k: torch.stack(v).double() for k, v in self.pending.items()}
        if self.reduce is not None:
            stacked["loss"] = self.reduce(stacked["loss"])
        values = {k: v.cpu().tolist() for k, v in stacked.items()}
        self.host["step"].extend(self.pending_steps)
        for key, vals in values.items():
            if len(vals) != n:
                continue  # a series that only some steps produced is dropped, not misaligned
            self.host.setdefault(key, []).extend(vals)
        bad = next(
            (s for s, v in zip(self.pending_steps, values["loss"], strict=True) if not math.isfinite(v)), None
        )
        self.flushed_steps = n
        self.last_loss = values["loss"][-1]
        self.pending_steps, self.pending = [], {}
        self.just_flushed = True
        return bad

    def records(self, epoch: int) -> list[dict[str, Any]]:
        """The epoch's ``steps`` record (empty list if no step ran)."""
        if not self.host["step"]:
            return []
        n = len(self.host["step"])
        rec: dict[str, Any] = {"kind": "steps", "epoch": epoch}
        rec.update({k: v for k, v in self.host.items() if len(v) == n})
        return [rec]


class _Progress:
    """A tqdm bar with loss, accuracy and ETA; silent in quiet mode or without tqdm."""

    def __init__(self, *, total: int, initial: int, desc: str, quiet: bool) -> None:
        self.bar: Any = None
        self.postfix: dict[str, str] = {}
        if quiet:
            return
        try:
            from tqdm.auto import tqdm
        except ModuleNotFoundError:
            print(f"{desc}: running (install tqdm for a progress bar)", file=sys.stderr)
            return
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False,
                        dynamic_ncols=True)

    def update(self, n: int, *, loss: float | None) -> None:
        if self.bar is None or n == 0:
            return
        if loss is not None:
            self.postfix["loss"] = f"{loss:.4g}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(n)

    def epoch_done(self, epoch: int, train_loss: float | None,
                   metrics: Mapping[str, float | None]) -> None:
        if self.bar is None:
            return
        acc = metrics.get("test_accuracy")
        if acc is not None:
            self.postfix["test_acc"] = f"{acc:.4f}"
        self.postfix["epoch"] = str(epoch)
        self.bar.set_postfix(self.postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
