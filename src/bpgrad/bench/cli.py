"""``bpgrad compare`` and ``bpgrad report`` (plus the data layer's ``bpgrad data``).

Error contract: a user error (a bad value, a path that cannot be written, a result folder from
another configuration, a corrupt data cache, ...) ends the command with one line on stderr that
names what is wrong and what to do, and exit status 2; ``--debug`` shows the traceback instead.
Corrupt result files and checkpoints are not errors: the runner moves them aside, says so, and
runs the trial again.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpgrad.bench.config import (
    CompareConfig,
    ConfigError,
    TrialSpec,
    add_arguments,
    check_hyperparameters,
    config_from_args,
    config_from_mapping,
    describe,
    expand_trials,
    import_modules,
    load_toml,
)
from bpgrad.bench.data.errors import DataError
from bpgrad.bench.distributed import (
    SINGLE,
    DistContext,
    env_rank,
    env_ranks,
    fail_fast,
    finish_rank,
    init_from_env,
    launch,
)
from bpgrad.bench.optimizers import (
    HyperparameterError,
    MissingExtraError,
    UnknownOptimizerError,
    get_optimizer_spec,
    optimizer_names,
)
from bpgrad.bench.results import SchemaError, write_manifest
from bpgrad.bench.runner import ResultMismatchError, TrialHooks

#: exceptions that are the user's to fix: one line and exit 2, never a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, HyperparameterError, MissingExtraError, UnknownOptimizerError,
    ResultMismatchError, DataError, SchemaError,
)

_EPILOG = """examples:
  bpgrad compare --problem mnist_lenet --optimizers bpgrad,sgd,adam,adagrad,adadelta,rmsprop \\
      --seeds 3 --epochs 5 --out runs/mnist
  bpgrad compare --config benchmarks/demo.toml
  bpgrad compare --problem mnist_lenet --optimizers adam,sgd --lr-grid log:1e-4:1e-1:4 --out runs/lr
  bpgrad compare --problem mnist_lenet --optimizers bpgrad --sweep lipschitz=10,50,200
  bpgrad compare --problem mnist_lenet --seeds 3 --jobs 3 --threads 6 --out runs/par
  bpgrad report runs/mnist
  bpgrad compare --problem mnist_lenet --optimizers bpgrad,adam --nproc-per-node 2 --out runs/ddp
  torchrun --nproc-per-node 2 -m bpgrad compare --problem mnist_lenet --out runs/ddp
A rerun of the same command skips finished trials and resumes interrupted ones. Under torchrun
(or --nproc-per-node) --batch-size is per process: a step uses batch size x processes examples.
Every option can also be given in the --config file (same names, with underscores).
See docs/harness.md and docs/distributed.md."""


def register(subparsers: Any) -> None:
    """Add ``compare``, ``report`` and ``data`` to the ``bpgrad`` command."""
    p = subparsers.add_parser(
        "compare",
        help="train several optimizers on a problem and compare them",
        description="Run every (problem, optimizer, seed) trial, then print the table and write "
                    "report.md with plots. Command-line values override --config.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="TOML file with the same keys as these options")
    add_arguments(p)
    p.add_argument("--list", action="store_true", help="list problems and optimizers, then exit")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error instead of a one-line message")
    p.set_defaults(func=cmd_compare)

    r = subparsers.add_parser(
        "report", help="write report.md, tables and plots for a run folder",
        description="Analyse the result files under RUN_DIR and (re)write RUN_DIR/report.md "
                    "and RUN_DIR/plots/.",
    )
    r.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    r.add_argument("--target", type=float,
                   help="test accuracy (loss for loss-only problems) for 'steps to target'")
    r.add_argument("--quiet", action="store_true", help="do not print the table")
    r.add_argument("--debug", action="store_true",
                   help="show the traceback of an error instead of a one-line message")
    r.set_defaults(func=cmd_report)

    from bpgrad.bench.data import cli as data_cli

    data_cli.register(subparsers)


def _list() -> int:
    from bpgrad.bench.problems.base import get_problem, problem_names

    print("problems:")
    for name in problem_names():
        prob = get_problem(name)
        print(f"  {name:<18} {prob.description}")
    print("optimizers:")
    for name in optimizer_names():
        spec = get_optimizer_spec(name)
        extra = f"  [needs bpgrad[{spec.extra}]]" if spec.extra else ""
        print(f"  {name:<18} {spec.description}{extra}")
    return 0


def _error(command: str, message: str) -> int:
    if env_rank() == 0:  # under a launcher every rank finds the same error; rank 0 says it
        print(f"bpgrad {command}: error: {message}", file=sys.stderr)
    return 2


def _user_error(command: str, exc: BaseException, debug: bool) -> int:
    """The error contract: one line and exit 2, or the traceback with ``--debug``."""
    if debug:
        raise exc
    return _error(command, " ".join(str(exc).split()))  # one line, whatever the message holds


def check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file in it, so that a bad --out fails before training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".bpgrad-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"--out {out}: cannot write there ({exc.strerror or exc}); choose a folder you "
            "can write to"
        ) from None


@dataclass(frozen=True)
class _Plan:
    """A checked configuration: what ``run_compare`` needs."""

    cfg: CompareConfig
    problems: dict[str, Any]
    trials: list[TrialSpec]


def prepare(cfg: CompareConfig) -> _Plan:
    """Check everything that can be checked before a trial runs; raise a user error if not."""
    from bpgrad.bench.problems.base import get_problem

    trials = expand_trials(cfg)
    variants = list({t.optimizer.label: t.optimizer for t in trials}.values())
    for variant in variants:
        variant.spec.check_available()
    check_hyperparameters(variants)
    try:
        problems = {name: get_problem(name) for name in cfg.problems}
    except KeyError as exc:  # unknown problem: the message lists the known ones
        raise ConfigError(f"{exc.args[0]}; see bpgrad compare --list") from None
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {cfg.device}: torch {torch.__version__} sees no CUDA device; "
                "use --device cpu or install a CUDA build of torch"
            )
        if cfg.nproc_per_node is not None and env_ranks() is None \
                and cfg.nproc_per_node > torch.cuda.device_count():
            visible = torch.cuda.device_count()
            raise ConfigError(
                f"--nproc-per-node {cfg.nproc_per_node} with --device {cfg.device}: this "
                f"machine has {visible} visible GPU(s) and NCCL needs one per process; use "
                f"--nproc-per-node {visible} or fewer, or --device cpu (Gloo)")
    if cfg.jobs > 1 and (cfg.nproc_per_node is not None or env_ranks() is not None):
        raise ConfigError("--jobs runs trials side by side and --nproc-per-node (or torchrun) "
                          "runs each trial on several processes; use one of them")
    check_writable(cfg.out)
    return _Plan(cfg, problems, trials)


def cmd_compare(args: argparse.Namespace, *, hooks: TrialHooks | None = None,
                entry: Sequence[str] = ("--module", "bpgrad")) -> int:
    """Run the comparison; returns the exit status.

    ``hooks`` go to every trial (tests inject faults with them); ``entry`` is what the
    launcher runs in each process for ``--nproc-per-node`` (``--module bpgrad``, or a test's
    script that passes its own hooks).
    """
    debug = bool(getattr(args, "debug", False))
    try:
        cfg = config_from_args(args)
        import_modules(cfg.imports)
        if args.list:
            return _list()
        plan = prepare(cfg)
    except USER_ERRORS as exc:
        return _user_error("compare", exc, debug)

    if cfg.nproc_per_node is not None:
        if env_ranks() is None:
            # Start the processes through torch's elastic launcher; each runs this command
            # without --nproc-per-node and finds itself in a process group.
            argv = cfg.to_argv(drop=("nproc_per_node",))
            if cfg.config_file is not None:
                argv = ["--config", str(cfg.config_file), *argv]
            return launch(cfg.nproc_per_node, ["compare", *argv], threads=cfg.threads,
                          entry=entry)
        if env_rank() == 0:
            print("bpgrad compare: already under a launcher; --nproc-per-node is ignored",
                  file=sys.stderr)

    ctx, device = init_from_env(cfg.device, cfg.dist_timeout)
    if not ctx.enabled:
        try:
            return run_compare(plan, hooks=hooks)
        except USER_ERRORS as exc:
            return _user_error("compare", exc, debug)
    try:
        rc = run_compare(plan, dist=ctx, device=device, hooks=hooks)
        # Leave together: rank 0 writes the report meanwhile, and a rank that tears its group
        # down while a peer still holds connections can abort at exit.
        ctx.barrier()
    except BaseException as exc:  # any failure must end this rank, never hang it
        fail_fast(ctx, exc)
    finish_rank(ctx, rc)


def _manifest_commands(cfg: CompareConfig, dist: DistContext) -> tuple[str, str]:
    full_command = cfg.to_command()
    command = full_command
    if cfg.config_file is not None:
        # The file plus the command-line options that changed it: exact, and short.
        in_file = config_from_mapping(load_toml(cfg.config_file), source=str(cfg.config_file))
        command = shlex.join(["bpgrad", "compare", "--config", str(cfg.config_file),
                              *cfg.to_argv(base=in_file)])
    if dist.enabled:
        if dist.world_size == dist.local_world_size:
            launcher = f" --nproc-per-node {dist.world_size}"
            command, full_command = command + launcher, full_command + launcher
        else:
            note = "  # under torchrun on several nodes, see docs/distributed.md"
            command, full_command = command + note, full_command + note
    return command, full_command


def run_compare(plan: _Plan, *, dist: DistContext = SINGLE, device: str | None = None,
                hooks: TrialHooks | None = None) -> int:
    """Run the trials of a checked config, then print the table and write the report.

    With a process group (``dist``) every rank runs every trial data-parallel; rank 0 alone
    writes files, prints and writes the report. With ``jobs > 1`` the trials run in that many
    processes (:mod:`bpgrad.bench.jobs`).
    """
    cfg = plan.cfg
    command, full_command = _manifest_commands(cfg, dist)
    if dist.is_main:
        write_manifest(cfg.out, {
            "command": command,
            "full_command": full_command,
            "config": describe(cfg),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"distributed": dist.describe()} if dist.enabled else {}),
        })
    quiet = cfg.quiet or not dist.is_main
    t_start = time.perf_counter()
    if cfg.jobs > 1 and len(plan.trials) > 1:
        from bpgrad.bench.jobs import run_parallel

        counts = run_parallel(cfg, plan.trials, hooks=hooks,
                              report=None if quiet else _report_trial)
    else:
        counts = _run_sequential(plan, dist=dist, device=device, hooks=hooks, quiet=quiet)
    elapsed = time.perf_counter() - t_start
    if not dist.is_main:
        return 0
    print(f"{len(plan.trials)} trials in {elapsed:.1f} s: " +
          ", ".join(f"{v} {k}" for k, v in counts.items() if v), file=sys.stderr)
    return _finish(cfg.out, target=cfg.target, write=cfg.report, quiet=False)


def _run_sequential(plan: _Plan, *, dist: DistContext, device: str | None,
                    hooks: TrialHooks | None, quiet: bool) -> dict[str, int]:
    from bpgrad.bench.runner import run_trial

    cfg = plan.cfg
    options = cfg.run_options(device=device, quiet=quiet)
    counts = {"finished": 0, "diverged": 0, "skipped": 0, "resumed": 0}
    for name, problem in plan.problems.items():
        todo = [t for t in plan.trials if t.problem == name]
        t_load = time.perf_counter()
        # One process per node loads (and downloads) first; the others then read its cache.
        if dist.local_rank != 0:
            dist.barrier()
        splits = problem.load(data_dir=cfg.data_dir, validation_size=cfg.validation_size,
                              seed=options.data_seed)
        if dist.enabled and dist.local_rank == 0:
            dist.barrier()
        if not quiet:
            print(f"{name}: {len(splits.train)} train / {len(splits.valid)} valid / "
                  f"{len(splits.test)} test examples, loaded in "
                  f"{time.perf_counter() - t_load:.1f} s; {len(todo)} trials", file=sys.stderr)
        for trial in todo:
            outcome = run_trial(problem, trial.optimizer, trial.seed, cfg.budget(problem),
                                out=cfg.out, splits=splits, options=options, dist=dist,
                                hooks=hooks)
            counts["skipped" if outcome.skipped else outcome.status] += 1
            counts["resumed"] += int(outcome.resumed)
            if not quiet:
                _report_trial(trial, outcome.status, outcome.skipped, outcome.summary)
    return counts


def _report_trial(trial: TrialSpec, status: str, skipped: bool,
                  summary: dict[str, Any]) -> None:
    """One line per finished trial on stderr."""
    final = summary.get("final", {})
    acc, loss = final.get("test_accuracy"), final.get("test_loss")
    what = "skipped (already finished)" if skipped else status
    metric = f"test_accuracy {acc:.4f}" if acc is not None else (
        f"test_loss {loss:.4g}" if loss is not None else "")
    print(f"  {trial.problem} {trial.optimizer.label} seed {trial.seed}: {what}, {metric}, "
          f"{summary.get('wall_time', 0.0):.1f} s", file=sys.stderr)


def _finish(run_dir: Path, *, target: float | None, write: bool, quiet: bool) -> int:
    from bpgrad.bench.analysis import analyse, format_run_tables

    analysis = analyse(run_dir, target=target)
    if not quiet:
        print(format_run_tables(analysis, style="text"))
    if write:
        from bpgrad.bench.report import write_report

        path = write_report(run_dir, analysis=analysis)
        print(f"report: {path} and {path.with_name('report.html')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report of an existing run folder."""
    if not Path(args.run_dir).is_dir():
        return _error("report", f"{args.run_dir} is not a folder; pass a `bpgrad compare --out` dir")
    try:
        return _finish(args.run_dir, target=args.target, write=True, quiet=args.quiet)
    except USER_ERRORS as exc:
        return _user_error("report", exc, bool(getattr(args, "debug", False)))
