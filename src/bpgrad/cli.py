"""The ``bpgrad`` command line: one entry point, one subcommand per part of the project.

Each part registers its own subcommands through a ``register(subparsers)`` function in its own
module, so the parts stay independent and a missing optional dependency only disables the
subcommands that need it (with a message saying which extra to install).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that contribute subcommands. Each exposes ``register(subparsers) -> None`` and sets
# ``func`` on its parsers (``func(args) -> int``).
_SUBCOMMAND_MODULES: tuple[str, ...] = (
    "bpgrad.bench.cli",
    "bpgrad.globalopt.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the full argument parser with every available subcommand."""
    from bpgrad import __version__

    parser = argparse.ArgumentParser(
        prog="bpgrad",
        description="BPGrad: solver, global minimizer and comparison harness.",
    )
    parser.add_argument("--version", action="version", version=f"bpgrad {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and exc.name.startswith("bpgrad"):
                continue  # that part of the project is not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
