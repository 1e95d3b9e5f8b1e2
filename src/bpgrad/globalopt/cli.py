"""``bpgrad minimize MODULE:FUNCTION --bounds ...``: run :func:`minimize` from the shell."""

from __future__ import annotations

import argparse
import importlib
import importlib.util as ilu
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_function", "parse_bounds_text", "register"]


def load_function(spec: str) -> Callable[..., Any]:
    """Import ``package.module:attr`` (or a ``path/to/file.py:attr``) and return the callable."""
    if ":" not in spec:
        raise ValueError(f"expected MODULE:FUNCTION, got {spec!r} (e.g. mypkg.funcs:branin).")
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise ValueError(f"no such file: {mod_name}")
        module_spec = ilu.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot import {mod_name}")
        module = ilu.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")
        module = importlib.import_module(mod_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable.")
    return obj


def parse_bounds_text(texts: list[str]) -> list[tuple[float, float]]:
    """``["-5,10", "0,15"]`` or ``["-5:10", "0:15"]`` -> ``[(-5, 10), (0, 15)]``.

    One item ``LOW,HIGH*D`` (e.g. ``-5,5*3``) repeats a pair D times; items may also be given
    in one string separated by spaces or ``;``.
    """
    out: list[tuple[float, float]] = []
    items = [t for text in texts for t in text.replace(";", " ").split()]
    for item in items:
        t, rep = item, 1
        if "*" in t:
            t, _, r = t.partition("*")
            if not r.isdigit() or int(r) < 1:
                raise ValueError(f"in {item!r}, LOW,HIGH*D needs a whole number D >= 1.")
            rep = int(r)
        parts = t.replace(":", ",").split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            pair = (float(parts[0]), float(parts[1]))
        except ValueError:
            raise ValueError(f"each bound is LOW,HIGH (two numbers); got {item!r}.") from None
        out += [pair] * rep
    return out


def _lipschitz_text(text: str) -> float | None:
    """``--lipschitz``: a number, or ``auto`` (estimate it, as when the option is left out)."""
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _run(args: argparse.Namespace) -> int:
    from bpgrad.globalopt import minimize

    try:
        func = load_function(args.function)
        bounds = parse_bounds_text(args.bounds)
    except (ValueError, ImportError, AttributeError) as exc:
        print(f"bpgrad minimize: {exc}", file=sys.stderr)
        return 2
    called = False

    def counted(x: Any) -> Any:
        nonlocal called
        called = True
        return func(x)

    try:
        res = minimize(
            counted, bounds, lipschitz=args.lipschitz, maxfev=args.maxfev, maxiter=args.maxiter,
            tol=args.tol, seed=args.seed, strategy=args.strategy,
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        if called:  # from the function or its value: the traceback helps its author
            raise
        print(f"bpgrad minimize: {exc}", file=sys.stderr)  # the options: checked before any call
        return 2
    summary = {
        k: (v.tolist() if isinstance(v, np.ndarray) else v)
        for k, v in res.items()
        if not k.startswith("history") and k != "kind_names"
    }
    if args.json:
        print(json.dumps(summary, default=float))
    else:
        for k, v in summary.items():
            if isinstance(v, float) and math.isfinite(v):
                v = f"{v:.10g}"
            print(f"{k:>20}: {v}")
    if args.plot is not None:
        if len(bounds) != 2:
            print("bpgrad minimize: --plot needs a 2-D problem.", file=sys.stderr)
            return 2
        from bpgrad.globalopt.plot import plot_run

        plot_run(func, bounds, res, path=args.plot)
        print(f"{'plot':>20}: {args.plot}")
    return 0 if res.success or res.status in (2, 3) else 1


def register(subparsers: Any) -> None:
    """Add the ``minimize`` subcommand to the ``bpgrad`` command line."""
    p = subparsers.add_parser(
        "minimize",
        help="globally minimize a Python function over a box (BPGrad Algorithm 1)",
        description="Globally minimize FUNCTION over a box with bpgrad.minimize and print the "
        "result. Example: bpgrad minimize mymod:branin --bounds -5,10 0,15 --plot run.png",
    )
    p.add_argument("function", help="MODULE:FUNCTION or path/to/file.py:FUNCTION; f(x) -> float")
    p.add_argument(
        "--bounds",
        nargs="+",
        required=True,
        metavar="LOW,HIGH",
        help="one LOW,HIGH pair per coordinate (LOW,HIGH*D repeats it D times)",
    )
    p.add_argument(
        "--lipschitz",
        type=_lipschitz_text,
        default=None,
        help="a Lipschitz constant of f (gives a certified lower bound); 'auto' or left out: "
        "estimated from the samples",
    )
    p.add_argument("--maxfev", type=int, default=None, help="evaluation budget (default 1000 d)")
    p.add_argument("--maxiter", type=int, default=None)
    p.add_argument("--tol", type=float, default=1e-6, help="absolute gap to stop at")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--strategy",
        choices=("balanced", "hull", "bound"),
        default="balanced",
        help="which cells to divide (docs/globalopt.md); default balanced",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write a picture of the run (2-D only; .png or .svg)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    # Let "-4,10" be a value, not an option: this parser has no options that look like numbers.
    p._negative_number_matcher = re.compile(r"^-[\d.]")
    p.set_defaults(func=_run)
