"""``bpgrad compare --jobs N``: independent trials side by side in N processes.

Trials share nothing but the run folder, and each writes only its own files (atomically, through
a temporary file named after the writing process), so they can run in any order and in parallel:
a trial's numbers depend on its (problem, optimizer, seed, budget) alone, and the result files
are those of a sequential run apart from the times (a test checks this). A rerun skips finished
trials and resumes interrupted ones exactly as a sequential run does.

Processes are started with the ``spawn`` method (no fork of a process that holds torch threads
or a CUDA context). Each one imports the ``--import`` modules, loads a problem's data once, and
gets an equal share of the threads: ``--threads T`` (default: the CPU count) split into
``T // N`` per process, at least one. On a GPU every process trains on the same device, which
small models leave mostly idle.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from bpgrad.bench.config import CompareConfig, TrialSpec, import_modules
from bpgrad.bench.problems.base import Splits
from bpgrad.bench.runner import TrialHooks

#: ``report(trial, status, skipped, summary)``: called in the parent as each trial ends
TrialReport = Callable[[TrialSpec, str, bool, dict[str, Any]], None]


def threads_per_job(cfg: CompareConfig) -> int:
    """Each process's share of ``--threads`` (default: every CPU), at least one."""
    total = cfg.threads if cfg.threads is not None else (os.cpu_count() or 1)
    return max(1, total // cfg.jobs)


@dataclass(frozen=True)
class _Task:
    """One trial in a form that crosses a process boundary (optimizer factories do not
    pickle; their registry names do)."""

    problem: str
    optimizer: str
    hyperparameters: Mapping[str, Any]
    swept: Mapping[str, Any]
    seed: int


def run_parallel(cfg: CompareConfig, trials: list[TrialSpec], *,
                 hooks: TrialHooks | None = None,
                 report: TrialReport | None = None) -> dict[str, int]:
    """Run ``trials`` in ``cfg.jobs`` processes; returns the counts a sequential run returns.

    The first trial that raises stops the run: trials not yet started are cancelled, the
    running ones finish (their files are complete), and the exception is raised here.
    """
    threads = threads_per_job(cfg)
    counts = {"finished": 0, "diverged": 0, "skipped": 0, "resumed": 0}
    pool = ProcessPoolExecutor(
        max_workers=min(cfg.jobs, len(trials)), mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(list(cfg.imports), threads),
    )
    with pool:
        futures: dict[Future[tuple[str, bool, bool, dict[str, Any]]], TrialSpec] = {
            pool.submit(_run_task, cfg, _task(t), threads, hooks): t for t in trials
        }
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise fut.exception()  # type: ignore[misc]
                status, skipped, resumed, summary = fut.result()
                counts["skipped" if skipped else status] += 1
                counts["resumed"] += int(resumed)
                if report is not None:
                    report(futures[fut], status, skipped, summary)
    return counts


def _task(trial: TrialSpec) -> _Task:
    opt = trial.optimizer
    return _Task(trial.problem, opt.name, dict(opt.hyperparameters), dict(opt.swept), trial.seed)


def _init_worker(imports: list[str], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import_modules(imports)


#: a worker's loaded data, per (problem, data folder, validation size): loaded once per process
_SPLITS: dict[tuple[str, str, int | None], Splits] = {}


def _run_task(cfg: CompareConfig, task: _Task, threads: int,
              hooks: TrialHooks | None) -> tuple[str, bool, bool, dict[str, Any]]:
    from bpgrad.bench.optimizers import resolve_optimizer
    from bpgrad.bench.problems.base import get_problem
    from bpgrad.bench.runner import run_trial

    problem = get_problem(task.problem)
    options = cfg.run_options(threads=threads, quiet=True)
    key = (task.problem, str(cfg.data_dir), cfg.validation_size)
    if key not in _SPLITS:
        _SPLITS[key] = problem.load(data_dir=cfg.data_dir, validation_size=cfg.validation_size,
                                    seed=options.data_seed)
    optimizer = resolve_optimizer(task.optimizer, task.hyperparameters, task.swept)
    outcome = run_trial(problem, optimizer, task.seed, cfg.budget(problem), out=cfg.out,
                        splits=_SPLITS[key], options=options, hooks=hooks)
    return outcome.status, outcome.skipped, outcome.resumed, dict(outcome.summary)
