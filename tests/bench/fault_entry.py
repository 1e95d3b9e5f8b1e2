"""``bpgrad`` with a fault hook, for the launcher's fault tests (not part of the package).

    python tests/bench/fault_entry.py RANK STEP LABEL MODE compare ...

runs ``bpgrad compare ...`` with :class:`~bpgrad.bench.runner.TrialHooks` that make rank RANK
fail before global step STEP of the trial of optimizer LABEL (``-``: any trial): MODE ``raise``
raises, ``hang`` sleeps so the other ranks must time out. With ``--nproc-per-node`` the launcher
starts this same script (with the same fault) in every process, so the hook reaches the ranks
the way a callback does in-process: as an argument, never through the environment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import toy_problem  # noqa: F401  (registers toy_blobs)

from bpgrad.bench.cli import cmd_compare
from bpgrad.bench.runner import TrialHooks
from bpgrad.cli import build_parser


def fault_hooks(fail_rank: int, fail_step: int, label: str, mode: str) -> TrialHooks:
    """Hooks that make ``fail_rank`` fail before step ``fail_step`` of trial ``label``."""
    def before_step(rank: int, trial_label: str, step: int) -> None:
        if rank != fail_rank or step != fail_step or label not in ("-", trial_label):
            return
        if mode == "hang":
            time.sleep(3600)
        raise RuntimeError(f"test fault hook: rank {rank} fails at step {step} of {trial_label}")

    return TrialHooks(before_step=before_step)


def main(argv: list[str]) -> int:
    fault, rest = argv[:4], argv[4:]
    hooks = fault_hooks(int(fault[0]), int(fault[1]), fault[2], fault[3])
    args = build_parser().parse_args(rest)
    return cmd_compare(args, hooks=hooks, entry=[str(Path(__file__).resolve()), *fault])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
