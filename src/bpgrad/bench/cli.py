"""``bpgrad compare`` and ``bpgrad report`` (plus the data layer's ``bpgrad data``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bpgrad.bench.config import (
    CompareConfig,
    ConfigError,
    config_from_mapping,
    describe,
    expand_trials,
    load_toml,
    parse_assignment,
    parse_sweep,
)
from bpgrad.bench.distributed import (
    DEFAULT_TIMEOUT_S,
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

# Registers the synthetic ``toy_blobs`` problem, so smoke runs and the commands written into
# their reports work from the command line too.
from bpgrad.bench import testing as _testing  # noqa: F401  isort: skip

_EPILOG = """examples:
  bpgrad compare --problem mnist_lenet --optimizers bpgrad,sgd,adam,adagrad,adadelta,rmsprop \\
      --seeds 3 --epochs 5 --out runs/mnist
  bpgrad compare --config benchmarks/demo.toml
  bpgrad compare --problem mnist_lenet --optimizers adam,sgd --lr-grid log:1e-4:1e-1:4 --out runs/lr
  bpgrad compare --problem mnist_lenet --optimizers bpgrad --sweep lipschitz=10,50,200
  bpgrad report runs/mnist
  bpgrad compare --problem mnist_lenet --optimizers bpgrad,adam --nproc-per-node 2 --out runs/ddp
  torchrun --nproc-per-node 2 -m bpgrad compare --problem mnist_lenet --out runs/ddp
A rerun of the same command skips finished trials and resumes interrupted ones. Under torchrun
(or --nproc-per-node) --batch-size is per process: a step uses batch size x processes examples.
See docs/distributed.md."""


def register(subparsers: Any) -> None:
    """Add ``compare``, ``report`` and (when present) ``data`` to the ``bpgrad`` command."""
    p = subparsers.add_parser(
        "compare",
        help="train several optimizers on a problem and compare them",
        description="Run every (problem, optimizer, seed) trial, then print the table and write "
                    "report.md with plots. Command-line values override --config.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="TOML file with the same keys as these options")
    p.add_argument("--problem", help="problem name(s), comma-separated (see --list)")
    p.add_argument("--optimizers", help="optimizer names, comma-separated (see --list)")
    p.add_argument("--seeds", help="a count N (seeds 0..N-1) or a list like 0,3,7")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the problem's)")
    p.add_argument("--out", type=Path, help="run folder (default runs/compare)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--limit-train-batches", type=int,
                   help="train on at most this many minibatches per epoch (smoke runs)")
    p.add_argument("--batch-size", type=int, help="minibatch size (default: the problem's)")
    p.add_argument("--lr-grid",
                   help="sweep each tunable optimizer's learning rate: 1e-4,1e-3 or log:1e-5:1e0:6;"
                        " the best is chosen on the validation split")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep any hyperparameter for the optimizers that have it (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="[OPT.]KEY=VALUE",
                   help="override a hyperparameter for all optimizers that have it, or for one "
                        "(adam.lr=3e-4) (repeatable)")
    p.add_argument("--weight-decay", type=float,
                   help="weight decay for every optimizer that has one (default 5e-4, the paper's)")
    p.add_argument("--data-dir", type=Path, help="data cache folder (default ~/.cache/bpgrad/data)")
    p.add_argument("--validation-size", type=int,
                   help="examples carved from the training set for selection")
    p.add_argument("--eval-batch-size", type=int, help="batch size for evaluation (default 1000)")
    p.add_argument("--target", type=float,
                   help="test accuracy (loss for loss-only problems) for 'steps to target'")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bars")
    p.add_argument("--no-report", dest="report", action="store_false", default=None,
                   help="do not write report.md and plots")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="train data-parallel on N processes of this machine, started by torch's "
                        "elastic launcher (the same as torchrun --standalone --nproc-per-node N "
                        "-m bpgrad compare ...); Gloo on cpu, NCCL on cuda (one GPU per process)")
    p.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="with several processes: how long a rank waits for the others before the "
                        f"run stops with an error (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--list", action="store_true", help="list problems and optimizers, then exit")
    p.set_defaults(func=cmd_compare, compare_parser=p)

    r = subparsers.add_parser(
        "report", help="write report.md, tables and plots for a run folder",
        description="Analyse the result files under RUN_DIR and (re)write RUN_DIR/report.md "
                    "and RUN_DIR/plots/.",
    )
    r.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    r.add_argument("--target", type=float,
                   help="test accuracy (loss for loss-only problems) for 'steps to target'")
    r.add_argument("--quiet", action="store_true", help="do not print the table")
    r.set_defaults(func=cmd_report)

    try:
        from bpgrad.bench.data import cli as data_cli
    except ModuleNotFoundError as exc:
        # The data layer is optional while it is being built; anything else missing is a bug.
        if exc.name is None or not exc.name.startswith("bpgrad"):
            raise
    else:
        data_cli.register(subparsers)


def build_config(args: argparse.Namespace) -> CompareConfig:
    """The run's configuration: defaults, then ``--config``, then command-line options."""
    cfg = CompareConfig()
    if args.config is not None:
        data = load_toml(args.config)
        cfg = config_from_mapping(data, base=cfg, source=str(args.config))
        cfg.config_file = args.config
    cli: dict[str, Any] = {
        key: getattr(args, key)
        for key in ("problem", "optimizers", "seeds", "epochs", "out", "threads", "device",
                    "limit_train_batches", "batch_size", "lr_grid", "data_dir",
                    "validation_size", "eval_batch_size", "target", "quiet", "report")
    }
    cfg = config_from_mapping(cli, base=cfg, source="command line")
    for text in args.set:
        key, value = parse_assignment(text)
        cfg.overrides[key] = value
    if args.weight_decay is not None:
        cfg.overrides["weight_decay"] = args.weight_decay
    for text in args.sweep:
        key, values = parse_sweep(text)
        cfg.sweep[key] = values
    return cfg


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


def _argv_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    drop: set[str]) -> list[str]:
    """The options of ``args`` as command-line words again (for the launched processes)."""
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in drop or action.dest == "help":
            continue
        flag = next((o for o in action.option_strings if o.startswith("--")),
                    action.option_strings[0])
        value = getattr(args, action.dest, None)
        if isinstance(action, argparse._StoreConstAction):
            if value is not None and value == action.const:
                out.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value or []:
                out += [flag, str(item)]
        elif value is not None:
            out += [flag, str(value)]
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the comparison; returns the exit status."""
    if args.list:
        return _list()
    try:
        cfg = build_config(args)
        trials = expand_trials(cfg)
        for variant in {t.optimizer.name: t.optimizer for t in trials}.values():
            variant.spec.check_available()
        from bpgrad.bench.problems.base import get_problem

        problems = {name: get_problem(name) for name in cfg.problems}
        if cfg.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(
                    f"--device {cfg.device}: torch {torch.__version__} sees no CUDA device; "
                    "use --device cpu or install a CUDA build of torch"
                )
    except (ConfigError, HyperparameterError, MissingExtraError, UnknownOptimizerError) as exc:
        return _error("compare", str(exc))
    except KeyError as exc:  # unknown problem
        return _error("compare", str(exc.args[0]) if exc.args else str(exc))

    timeout = args.dist_timeout if args.dist_timeout is not None else DEFAULT_TIMEOUT_S
    if timeout <= 0:
        return _error("compare", f"--dist-timeout must be > 0 seconds, got {timeout:g}")
    if args.nproc_per_node is not None:
        if args.nproc_per_node < 1:
            return _error("compare", f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
        if cfg.device.startswith("cuda"):
            import torch

            visible = torch.cuda.device_count()
            if args.nproc_per_node > visible:
                return _error("compare", (
                    f"--nproc-per-node {args.nproc_per_node} with --device {cfg.device}: this "
                    f"machine has {visible} visible GPU(s) and NCCL needs one per process; use "
                    f"--nproc-per-node {visible} or fewer, or --device cpu (Gloo)"))
        if env_ranks() is None:
            # Start the processes through torch's elastic launcher; each runs this command
            # without --nproc-per-node and finds itself in a process group.
            argv = _argv_from_args(args.compare_parser, args, drop={"nproc_per_node"})
            return launch(args.nproc_per_node, ["compare", *argv], threads=cfg.threads)
        if env_rank() == 0:
            print("bpgrad compare: already under a launcher; --nproc-per-node is ignored",
                  file=sys.stderr)

    ctx, device = init_from_env(cfg.device, timeout)
    if not ctx.enabled:
        return run_compare(cfg, problems, trials)
    try:
        rc = run_compare(cfg, problems, trials, dist=ctx, device=device)
        # Leave together: rank 0 writes the report meanwhile, and a rank that tears its group
        # down while a peer still holds connections can abort at exit.
        ctx.barrier()
    except BaseException as exc:  # any failure must end this rank, never hang it
        fail_fast(ctx, exc)
    finish_rank(ctx, rc)


def run_compare(cfg: CompareConfig, problems: dict[str, Any], trials: list[Any], *,
                dist: DistContext = SINGLE, device: str | None = None) -> int:
    """Run ``trials`` of a resolved config, then print the table and write the report.

    With a process group (``dist``) every rank runs every trial data-parallel; rank 0 alone
    writes files, prints and writes the report.
    """
    from bpgrad.bench.runner import Budget, RunOptions, run_trial

    command = (
        f"bpgrad compare --config {cfg.config_file}" if cfg.config_file is not None
        else cfg.to_command()
    )
    full_command = cfg.to_command()
    if dist.enabled:
        if dist.world_size == dist.local_world_size:
            launcher = f" --nproc-per-node {dist.world_size}"
            command, full_command = command + launcher, full_command + launcher
        else:
            note = "  # under torchrun on several nodes, see docs/distributed.md"
            command, full_command = command + note, full_command + note
    if dist.is_main:
        write_manifest(cfg.out, {
            "command": command,
            "full_command": full_command,
            "config": describe(cfg),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"distributed": dist.describe()} if dist.enabled else {}),
        })
    quiet = cfg.quiet or not dist.is_main
    options = RunOptions(
        device=device or cfg.device, threads=cfg.threads, quiet=quiet,
        eval_batch_size=cfg.eval_batch_size, log_interval=cfg.log_interval,
    )
    t_start = time.perf_counter()
    counts = {"finished": 0, "diverged": 0, "skipped": 0, "resumed": 0}
    for name, problem in problems.items():
        todo = [t for t in trials if t.problem == name]
        budget = Budget(
            epochs=cfg.epochs or problem.epochs,
            limit_train_batches=cfg.limit_train_batches,
            batch_size=cfg.batch_size,
        )
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
            outcome = run_trial(problem, trial.optimizer, trial.seed, budget, out=cfg.out,
                                splits=splits, options=options, dist=dist)
            counts["skipped" if outcome.skipped else outcome.status] += 1
            counts["resumed"] += int(outcome.resumed)
            if not quiet:
                final = outcome.summary.get("final", {})
                acc = final.get("test_accuracy")
                loss = final.get("test_loss")
                what = "skipped (already finished)" if outcome.skipped else outcome.status
                metric = f"test_accuracy {acc:.4f}" if acc is not None else (
                    f"test_loss {loss:.4g}" if loss is not None else "")
                print(f"  {name} {trial.optimizer.label} seed {trial.seed}: {what}, {metric}, "
                      f"{outcome.summary.get('wall_time', 0.0):.1f} s", file=sys.stderr)
    elapsed = time.perf_counter() - t_start
    if not dist.is_main:
        return 0
    print(f"{len(trials)} trials in {elapsed:.1f} s: " +
          ", ".join(f"{v} {k}" for k, v in counts.items() if v), file=sys.stderr)
    return _finish(cfg.out, target=cfg.target, write=cfg.report, quiet=False)


def _finish(run_dir: Path, *, target: float | None, write: bool, quiet: bool) -> int:
    from bpgrad.bench.analysis import analyse, format_run_tables

    try:
        analysis = analyse(run_dir, target=target)
    except SchemaError as exc:
        return _error("report", str(exc))
    if not quiet:
        print(format_run_tables(analysis, style="text"))
    if write:
        from bpgrad.bench.report import write_report

        path = write_report(run_dir, analysis=analysis)
        print(f"report: {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report of an existing run folder."""
    if not Path(args.run_dir).is_dir():
        return _error("report", f"{args.run_dir} is not a folder; pass a `bpgrad compare --out` dir")
    return _finish(args.run_dir, target=args.target, write=True, quiet=args.quiet)
