"""Configuration of a ``bpgrad compare`` run: every option declared once.

Each option is one field of :class:`CompareConfig`; its metadata (an :class:`Option`) holds the
help text, the command-line flag, how a value is parsed (command-line text or a TOML value) and
how it is written back. Everything else is derived from those declarations:

* the argparse options (:func:`add_arguments`) and :func:`config_from_args`,
* TOML parsing (:func:`config_from_mapping`) and writing (:meth:`CompareConfig.to_toml`),
* the reproducing command (:meth:`CompareConfig.to_command`) and the argv of launched ranks
  (:meth:`CompareConfig.to_argv`),
* the runner's :class:`~bpgrad.bench.runner.Budget` and :class:`~bpgrad.bench.runner.RunOptions`
  (:meth:`CompareConfig.budget`, :meth:`CompareConfig.run_options`).

``tests/bench/test_config.py`` round-trips every option (its declared ``example``) through all of
them, so a new option cannot be half wired.

A TOML file holds the same keys as the command line (dashes or underscores)::

    problem = "mnist_lenet"              # or problems = ["mnist_lenet", "fmnist_2c2d"]
    optimizers = ["bpgrad", "sgd", "adam"]
    seeds = 3                            # a count (0..2) or a list [0, 1, 2]
    epochs = 5
    out = "runs/paper_mnist"
    threads = 2
    jobs = 2                             # trials in parallel processes
    eval_interval = 50                   # also evaluate every 50 steps, not only at epoch ends
    limit_train_batches = 100            # optional smoke-size budget
    lr_grid = "log:1e-4:1e-1:4"          # or a list [1e-4, 1e-3]
    [set]                                # overrides: all optimizers having the key, or one
    weight_decay = 5e-4
    "sgd.momentum" = 0.0
    [sweep]                              # any hyperparameter, for every optimizer having it
    lipschitz = [10, 50, 200]

Values given on the command line win over the file (``[set]`` and ``[sweep]`` entries are
merged, the command line's winning per key). Relative ``out`` and ``data_dir`` in a file are
taken relative to the current directory (the repository root for the shipped configs).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bpgrad.bench.distributed import DEFAULT_TIMEOUT_S as DEFAULT_DIST_TIMEOUT_S
from bpgrad.bench.optimizers import (
    HyperparameterError,
    ResolvedOptimizer,
    format_value,
    get_optimizer_spec,
    parse_value,
    resolve_optimizer,
)

if TYPE_CHECKING:
    from bpgrad.bench.problems.base import Problem
    from bpgrad.bench.runner import Budget, RunOptions


class ConfigError(ValueError):
    """A configuration file or option is invalid (the message says which and what to do)."""


# ---------------------------------------------------------------------------------------------
# Value parsers (command-line text or TOML value -> field value) and printers (the inverse).
# A parser raises ValueError("must be ..., got ...") and the caller prefixes the option's name.


def parse_list(text: str) -> list[str]:
    """Split ``a,b , c`` into names, dropping empties."""
    return [p.strip() for p in text.split(",") if p.strip()]


def _names(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return parse_list(raw)
    if isinstance(raw, (list, tuple)) and all(isinstance(v, str) for v in raw):
        return [v.strip() for v in raw]
    raise ValueError(f"must be names separated by commas (or a TOML list), got {raw!r}")


def _int_at_least(low: int) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        value: int | None = None
        if isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str):
            try:
                value = int(raw.strip())
            except ValueError:
                value = None
        if value is None or value < low:
            raise ValueError(f"must be a whole number >= {low}, got {raw!r}")
        return value

    return parse


def _float(positive: bool) -> Callable[[Any], float]:
    def parse(raw: Any) -> float:
        try:
            value = float(raw) if not isinstance(raw, bool) else math.nan
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or (positive and value <= 0):
            need = "a number > 0" if positive else "a finite number"
            raise ValueError(f"must be {need}, got {raw!r}")
        return value

    return parse


def _path(raw: Any) -> Path:
    if not isinstance(raw, (str, Path)) or not str(raw).strip():
        raise ValueError(f"must be a folder path, got {raw!r}")
    return Path(str(raw)).expanduser()


def _device(raw: Any) -> str:
    import torch

    text = str(raw).strip()
    try:
        kind = torch.device(text).type
    except (RuntimeError, ValueError):
        kind = ""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"must be cpu, cuda or cuda:N, got {raw!r}")
    return text


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    raise ValueError(f"must be true or false, got {raw!r}")


def parse_seeds(value: Any) -> list[int]:
    """``3`` -> [0, 1, 2]; ``"0,5"`` or ``[0, 5]`` -> [0, 5]; ``"4,"`` -> [4]."""
    if isinstance(value, bool):
        raise ValueError(f"must be a count or a list of integers, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return list(range(value))
    if isinstance(value, str):
        if "," not in value:
            try:
                count = int(value)
            except ValueError:
                raise ValueError(f"must be a count or a list like 0,3,7, got {value!r}") from None
            return parse_seeds(count)
        value = parse_list(value)
    try:
        seeds = [int(v) for v in value if not isinstance(v, bool)]
    except (TypeError, ValueError):
        raise ValueError(f"must be a count or a list of integers, got {value!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or len(seeds) != len(value):
        raise ValueError(f"must be non-empty, distinct integers, got {value!r}")
    return seeds


def _seeds_text(seeds: Sequence[int]) -> str:
    if list(seeds) == list(range(len(seeds))):
        return str(len(seeds))
    # A trailing comma marks a one-element list (a bare number would be a count).
    return ",".join(str(s) for s in seeds) + ("," if len(seeds) == 1 else "")


def parse_grid(value: Any) -> list[float]:
    """``"1e-4,1e-3"``, ``[1e-4, 1e-3]`` or ``"log:1e-5:1e0:6"`` (6 log-spaced points, ends
    included) -> floats."""
    if isinstance(value, str) and value.startswith("log:"):
        parts = value.split(":")
        bad = f"must look like log:LOW:HIGH:N with 0 < LOW < HIGH and N >= 2, got {value!r}"
        if len(parts) != 4:
            raise ValueError(bad)
        try:
            low, high, n = float(parts[1]), float(parts[2]), int(parts[3])
        except ValueError:
            raise ValueError(bad) from None
        if low <= 0 or high <= low or n < 2:
            raise ValueError(bad)
        a, b = math.log10(low), math.log10(high)
        # Round to 12 significant digits so 10**-3 prints as 0.001 in folder names.
        return [float(f"{10 ** (a + (b - a) * i / (n - 1)):.12g}") for i in range(n)]
    items = parse_list(value) if isinstance(value, str) else list(value)
    try:
        grid = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"must be numbers like 1e-4,1e-3 or log:1e-4:1e-1:4, got {value!r}") \
            from None
    if not grid:
        raise ValueError("needs at least one value")
    return grid


def _grid_text(grid: Sequence[float]) -> str:
    return ",".join(format_value(v) for v in grid)


def _hyper(value: Any) -> Any:
    """One hyperparameter value, TOML lists made tuples as on the command line."""
    if isinstance(value, list):
        return tuple(_hyper(v) for v in value)
    return value


def _value_text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_value_text(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return format_value(value)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, parsed value)."""
    key, sep, raw = str(text).partition("=")
    if not sep or not key.strip():
        raise ValueError(f"must look like KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(raw)


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``lipschitz=10,50,200`` -> ("lipschitz", [10, 50, 200])."""
    key, _, raw = str(text).partition("=")
    if not key.strip() or not raw.strip():
        raise ValueError(f"must look like KEY=V1,V2,..., got {text!r}")
    if raw.strip().startswith("log:"):
        return key.strip(), list(parse_grid(raw.strip()))
    return key.strip(), [parse_value(v) for v in parse_list(raw)]


def _overrides(raw: Any) -> dict[str, Any]:
    if isinstance(raw, Mapping):  # a TOML [set] table
        return {str(k): _hyper(v) for k, v in raw.items()}
    if isinstance(raw, (list, tuple)):  # repeated --set KEY=VALUE
        return dict(parse_assignment(t) for t in raw)
    raise ValueError(f"must be a table of key = value, got {raw!r}")


def _sweeps(raw: Any) -> dict[str, list[Any]]:
    if isinstance(raw, Mapping):  # a TOML [sweep] table
        out: dict[str, list[Any]] = {}
        for k, v in raw.items():
            if isinstance(v, str) and v.startswith("log:"):
                out[str(k)] = list(parse_grid(v))
            elif isinstance(v, list) and v:
                out[str(k)] = [_hyper(x) for x in v]
            else:
                raise ValueError(f"{k} must be a non-empty list or log:LOW:HIGH:N, got {v!r}")
        return out
    if isinstance(raw, (list, tuple)):  # repeated --sweep KEY=V1,V2
        return dict(parse_sweep(t) for t in raw)
    raise ValueError(f"must be a table of lists, got {raw!r}")


# ---------------------------------------------------------------------------------------------
# The declarations


Action = Literal["store", "store_true", "store_false", "append"]


@dataclass(frozen=True)
class Option:
    """How one :class:`CompareConfig` field is given, parsed and written back."""

    #: one line for ``--help``
    help: str
    #: a valid, non-default command-line value (empty for switches): shown in error messages
    #: and round-tripped by the tests
    example: str
    #: command-line text or TOML value -> field value; raises ValueError("must be ...")
    parse: Callable[[Any], Any] = str
    #: field value -> command-line text (a list: one ``flag value`` pair per item)
    show: Callable[[Any], Any] = str
    #: field value -> TOML value (default: ``show``'s text)
    toml: Callable[[Any], Any] | None = None
    #: default ``--<name-with-dashes>``
    flag: str = ""
    metavar: str | None = None
    action: Action = "store"
    #: other TOML keys accepted for this field (``problem`` for ``problems``)
    aliases: tuple[str, ...] = ()
    #: the key :meth:`CompareConfig.to_toml` writes (default: the field name)
    toml_key: str = ""
    #: written into the reproducing command even at its default (it reads better)
    always: bool = False
    #: a table: command-line entries are added to the file's (winning per key)
    merge: bool = False


def _opt(**kwargs: Any) -> dict[str, Option]:
    """``field`` metadata declaring an option."""
    return {"option": Option(**kwargs)}


_PAPER_SIX = ["bpgrad", "sgd", "adam", "adagrad", "adadelta", "rmsprop"]


def _str_list(value: Sequence[str]) -> str:
    return ",".join(value)


def _opt_float(value: float) -> str:
    return format_value(float(value))


@dataclass
class CompareConfig:
    """Everything ``bpgrad compare`` needs; the defaults are the command line's."""

    problems: list[str] = field(default_factory=list, metadata=_opt(
        flag="--problem", aliases=("problem",), always=True, metavar="NAMES",
        help="problem name(s), comma-separated (see --list)", example="toy_blobs,mnist_lenet",
        parse=_names, show=_str_list, toml=list))
    optimizers: list[str] = field(default_factory=lambda: list(_PAPER_SIX), metadata=_opt(
        always=True, metavar="NAMES",
        help="optimizer names, comma-separated (default: the paper's six; see --list)",
        example="adam,sgd", parse=_names, show=_str_list, toml=list))
    seeds: list[int] = field(default_factory=lambda: [0], metadata=_opt(
        always=True,
        help="a count N (seeds 0..N-1) or a list like 0,3,7 (4, is the one seed 4)",
        example="0,3,7", parse=parse_seeds, show=_seeds_text, toml=list))
    #: None: each problem's default
    epochs: int | None = field(default=None, metadata=_opt(
        help="epochs per trial, >= 1 (default: the problem's)", example="3",
        parse=_int_at_least(1), show=str, toml=int))
    out: Path = field(default=Path("runs/compare"), metadata=_opt(
        always=True, metavar="DIR",
        help="run folder (default runs/compare)", example="runs/example", parse=_path, show=str))
    threads: int | None = field(default=None, metadata=_opt(
        metavar="N", example="2", parse=_int_at_least(1), show=str, toml=int,
        help="torch intra-op threads in all (with --jobs, split between the processes)"))
    jobs: int = field(default=1, metadata=_opt(
        metavar="N", example="2", parse=_int_at_least(1), show=str, toml=int,
        help="run independent trials in N processes (default 1); the results are those of a "
             "sequential run"))
    device: str = field(default="cpu", metadata=_opt(
        help="cpu (default), cuda or cuda:N", example="cuda", parse=_device, show=str))
    limit_train_batches: int | None = field(default=None, metadata=_opt(
        metavar="N", example="20", parse=_int_at_least(1), show=str, toml=int,
        help="train on at most this many minibatches per epoch (smoke runs)"))
    batch_size: int | None = field(default=None, metadata=_opt(
        metavar="N", example="64", parse=_int_at_least(1), show=str, toml=int,
        help="minibatch size (default: the problem's); per process with --nproc-per-node"))
    eval_interval: int | None = field(default=None, metadata=_opt(
        metavar="STEPS", example="25", parse=_int_at_least(1), show=str, toml=int,
        help="also evaluate on the validation and test splits every STEPS steps (default: "
             "only before training and at each epoch's end)"))
    lr_grid: list[float] | None = field(default=None, metadata=_opt(
        metavar="GRID", example="1e-4,0.001", parse=parse_grid, show=_grid_text,
        toml=list, help="sweep each tunable optimizer's learning rate: 1e-4,1e-3 or "
                        "log:1e-5:1e0:6; the best is chosen on the validation split"))
    sweep: dict[str, list[Any]] = field(default_factory=dict, metadata=_opt(
        action="append", merge=True, metavar="KEY=V1,V2", example="rho=0.1,0.2",
        parse=_sweeps, toml=dict,
        show=lambda d: [f"{k}=" + ",".join(_value_text(v) for v in vs) for k, vs in d.items()],
        help="sweep any hyperparameter for the optimizers that have it (repeatable)"))
    #: "key" (every optimizer that has it) or "optimizer.key"
    overrides: dict[str, Any] = field(default_factory=dict, metadata=_opt(
        flag="--set", aliases=("set",), toml_key="set", action="append",
        merge=True, metavar="[OPT.]KEY=VALUE", example="adam.lr=0.0003", parse=_overrides,
        toml=lambda d: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()},
        show=lambda d: [f"{k}={_value_text(v)}" for k, v in d.items()],
        help="override a hyperparameter for all optimizers that have it, or for one "
             "(adam.lr=3e-4) (repeatable)"))
    weight_decay: float | None = field(default=None, metadata=_opt(
        example="0.0001", parse=_float(positive=False), show=_opt_float, toml=float,
        help="weight decay for every optimizer that has one (default 5e-4, the paper's; "
             "--set OPT.weight_decay wins for that optimizer)"))
    data_dir: Path | None = field(default=None, metadata=_opt(
        metavar="DIR", example="data_cache", parse=_path, show=str,
        help="data cache folder (default $BPGRAD_DATA_DIR, else ~/.cache/bpgrad/data)"))
    validation_size: int | None = field(default=None, metadata=_opt(
        metavar="N", example="500", parse=_int_at_least(0), show=str, toml=int,
        help="examples carved from the training set for selection (default: the problem's)"))
    #: None: the problem's default
    eval_batch_size: int | None = field(default=None, metadata=_opt(
        metavar="N", example="500", parse=_int_at_least(1), show=str, toml=int,
        help="batch size for evaluation (default: the problem's)"))
    log_interval: int = field(default=50, metadata=_opt(
        metavar="STEPS", example="10", parse=_int_at_least(1), show=str, toml=int,
        help="steps between host copies of the step losses and divergence checks (default 50)"))
    #: test accuracy (or loss, for problems without accuracy) that "steps to target" uses
    target: float | None = field(default=None, metadata=_opt(
        example="0.95", parse=_float(positive=False), show=_opt_float, toml=float,
        help="test accuracy (loss for loss-only problems) for 'steps to target'"))
    imports: list[str] = field(default_factory=list, metadata=_opt(
        flag="--import", metavar="MODULES", example="json,math",
        parse=_names, show=_str_list, toml=list,
        help="Python modules to import first, comma-separated: they may register their own "
             "problems and optimizers (the current folder is on the import path)"))
    quiet: bool = field(default=False, metadata=_opt(
        action="store_true", example="", parse=_bool, show=str, toml=bool,
        help="no progress bars"))
    report: bool = field(default=True, metadata=_opt(
        flag="--no-report", action="store_false", example="", parse=_bool, show=str,
        toml=bool, help="do not write report.md and plots"))
    nproc_per_node: int | None = field(default=None, metadata=_opt(
        metavar="N", example="2", parse=_int_at_least(1), show=str, toml=int,
        help="train data-parallel on N processes of this machine, started by torch's elastic "
             "launcher (the same as torchrun --standalone --nproc-per-node N -m bpgrad "
             "compare ...); Gloo on cpu, NCCL on cuda (one GPU per process)"))
    dist_timeout: float = field(default=DEFAULT_DIST_TIMEOUT_S, metadata=_opt(
        metavar="SECONDS", example="30.5", parse=_float(positive=True),
        show=_opt_float, toml=float,
        help="with several processes: how long a rank waits for the others before the run "
             f"stops with an error (default {DEFAULT_DIST_TIMEOUT_S:g})"))
    #: the TOML file this came from, if any (for the report's regenerating command); not an
    #: option of its own: ``--config`` sets it
    config_file: Path | None = None

    def to_argv(self, *, drop: Sequence[str] = (),
                base: CompareConfig | None = None) -> list[str]:
        """Command-line words (without ``bpgrad compare``) that give exactly this config; with
        ``base`` (the config of a ``--config`` file), only the options that differ from it."""
        words: list[str] = []
        for f, opt in option_fields():
            value = getattr(self, f.name)
            same = (value == getattr(base, f.name) if base is not None
                    else value == _default(f) and not opt.always)
            if f.name in drop or same or value is None:
                continue
            flag = flag_of(f)
            if opt.action in ("store_true", "store_false"):
                words.append(flag)
            elif opt.action == "append":
                for item in opt.show(value):
                    words += [flag, item]
            else:
                words += [flag, opt.show(value)]
        return words

    def to_command(self) -> str:
        """A ``bpgrad compare`` command line that reproduces this configuration exactly."""
        return shlex.join(["bpgrad", "compare", *self.to_argv()])

    def to_toml(self) -> str:
        """A TOML file (for ``--config``) that gives exactly this configuration."""
        top: list[str] = []
        tables: list[str] = []
        for f, opt in option_fields():
            value = getattr(self, f.name)
            if value is None or (value == _default(f) and not opt.always):
                continue
            key = opt.toml_key or f.name
            data = (opt.toml or opt.show)(value)
            if isinstance(data, Mapping):
                tables.append(f"\n[{key}]")
                tables += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items()]
            else:
                top.append(f"{key} = {_toml_value(data)}")
        return "\n".join(top + tables) + "\n"

    def budget(self, problem: Problem) -> Budget:
        """The runner's budget for one of the config's problems."""
        from bpgrad.bench.runner import Budget

        return Budget(epochs=self.epochs if self.epochs is not None else problem.epochs,
                      limit_train_batches=self.limit_train_batches,
                      batch_size=self.batch_size, eval_interval=self.eval_interval)

    def run_options(self, *, device: str | None = None, threads: int | None = None,
                    quiet: bool | None = None) -> RunOptions:
        """The runner's options; ``device``/``threads``/``quiet`` replace the config's (a rank's
        own GPU, a job's share of the threads, silent ranks)."""
        from bpgrad.bench.runner import RunOptions

        return RunOptions(device=device or self.device,
                          threads=threads if threads is not None else self.threads,
                          quiet=self.quiet if quiet is None else quiet,
                          eval_batch_size=self.eval_batch_size, log_interval=self.log_interval)


def option_fields() -> list[tuple[Field[Any], Option]]:
    """Every declared option, in declaration order."""
    return [(f, f.metadata["option"]) for f in fields(CompareConfig) if "option" in f.metadata]


def flag_of(f: Field[Any]) -> str:
    """The command-line flag of an option field."""
    opt: Option = f.metadata["option"]
    return opt.flag or "--" + f.name.replace("_", "-")


def _default(f: Field[Any]) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # inf, nan, 1e-05 and 0.001 are all TOML
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # JSON string escapes are TOML basic-string escapes
    raise ConfigError(f"{value!r} cannot be written to TOML")


# ---------------------------------------------------------------------------------------------
# Reading: TOML files, mappings, the command line


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file (tomllib on 3.11+, the ``tomli`` package on 3.10)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised only on 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(
                "reading TOML configs on Python 3.10 needs the 'tomli' package: pip install tomli"
            ) from None
    try:
        with open(path, "rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; pass a .toml file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc}); fix the file") from None
    return data


def _set_option(cfg: CompareConfig, f: Field[Any], raw: Any, where: str) -> None:
    opt: Option = f.metadata["option"]
    try:
        value = opt.parse(raw)
    except (ValueError, TypeError) as exc:
        hint = f" (e.g. {flag_of(f)} {opt.example})" if opt.example else ""
        raise ConfigError(f"{where} {exc}{hint}") from None
    if opt.merge:
        value = {**getattr(cfg, f.name), **value}
    setattr(cfg, f.name, value)


def _toml_keys() -> dict[str, Field[Any]]:
    keys: dict[str, Field[Any]] = {}
    for f, opt in option_fields():
        for key in (f.name, opt.toml_key, *opt.aliases):
            if key:
                keys[key] = f
    return keys


def config_from_mapping(data: Mapping[str, Any], *, base: CompareConfig | None = None,
                        source: str = "config") -> CompareConfig:
    """Apply the keys of ``data`` (a TOML document) onto ``base`` (or the defaults)."""
    cfg = base or CompareConfig()
    known = _toml_keys()
    norm = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(norm) - set(known))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    for key, value in norm.items():
        _set_option(cfg, known[key], value, f"{source}: {key}")
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one command-line option per declared field (values parsed later, by
    :func:`config_from_args`, so that errors say what to do and keep the file's values)."""
    for f, opt in option_fields():
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": opt.help}
        if opt.action in ("store_true", "store_false"):
            kwargs["action"] = opt.action
        else:
            kwargs["metavar"] = opt.metavar or f.name.upper()
            if opt.action == "append":
                kwargs["action"] = "append"
        parser.add_argument(flag_of(f), **kwargs)


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """The run's configuration: defaults, then ``args.config`` (TOML), then the options."""
    cfg = CompareConfig()
    config_file = getattr(args, "config", None)
    if config_file is not None:
        cfg = config_from_mapping(load_toml(config_file), base=cfg, source=str(config_file))
        cfg.config_file = Path(config_file)
    for f, _opt in option_fields():
        raw = getattr(args, f.name, None)
        if raw is not None:
            _set_option(cfg, f, raw, flag_of(f))
    return cfg


def import_modules(names: Sequence[str]) -> None:
    """Import the ``--import`` modules (they register problems or optimizers)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # "the current folder is on the import path", as with -m
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"--import {name}: cannot import it ({type(exc).__name__}: {exc}); check the "
                "name and that its folder is on PYTHONPATH"
            ) from exc


# ---------------------------------------------------------------------------------------------
# Expansion into trials


@dataclass(frozen=True)
class TrialSpec:
    """One (problem, optimizer variant, seed) to run."""

    problem: str
    optimizer: ResolvedOptimizer
    seed: int


def resolve_variants(cfg: CompareConfig) -> list[ResolvedOptimizer]:
    """Every optimizer variant the config asks for (sweeps expanded), hyperparameters checked."""
    if not cfg.optimizers:
        raise ConfigError("no optimizers given; e.g. --optimizers bpgrad,sgd,adam")
    specs = [get_optimizer_spec(name) for name in cfg.optimizers]
    names = {s.name for s in specs}
    if len(names) != len(specs):
        raise ConfigError(f"an optimizer is listed twice: {cfg.optimizers}")

    per_opt: dict[str, dict[str, Any]] = {s.name: {} for s in specs}
    # --weight-decay is an unscoped override that wins over --set weight_decay=...; a scoped
    # --set OPT.weight_decay=... wins over both for its optimizer.
    overrides = dict(cfg.overrides)
    if cfg.weight_decay is not None:
        overrides = {"weight_decay": cfg.weight_decay,
                     **{k: v for k, v in overrides.items() if k != "weight_decay"}}
    for key, value in overrides.items():
        if "." in key:
            opt_name, _, hp = key.partition(".")
            if opt_name not in per_opt:
                raise ConfigError(
                    f"--set {key}: optimizer {opt_name!r} is not among {', '.join(per_opt)}"
                )
            per_opt[opt_name][hp] = value
        else:
            takers = [s.name for s in specs if key in s.defaults]
            if not takers:
                raise ConfigError(
                    f"--set {key}: none of the optimizers {', '.join(per_opt)} has a "
                    f"hyperparameter {key!r}"
                )
            for name in takers:
                per_opt[name].setdefault(key, value)
    for key in cfg.sweep:
        if not any(key in s.defaults for s in specs):
            raise ConfigError(f"--sweep {key}: no selected optimizer has a hyperparameter {key!r}")

    variants: list[ResolvedOptimizer] = []
    for spec in specs:
        axes: dict[str, list[Any]] = {}
        if cfg.lr_grid and spec.lr_key is not None:
            axes[spec.lr_key] = list(cfg.lr_grid)
        for key, values in cfg.sweep.items():
            if key in spec.defaults:
                axes[key] = list(values)
        keys = sorted(axes)
        combos = itertools.product(*(axes[k] for k in keys)) if keys else [()]
        for combo in combos:
            try:
                variants.append(resolve_optimizer(spec.name, per_opt[spec.name],
                                                  dict(zip(keys, combo, strict=True))))
            except HyperparameterError as exc:
                raise ConfigError(f"{exc}; fix the --set/--sweep value") from None
    return variants


def check_hyperparameters(variants: Sequence[ResolvedOptimizer]) -> None:
    """Build every variant once on a dummy parameter, so that a value its constructor rejects
    (``--set bpgrad.lipschitz=-5``) stops the run before any trial, with the constructor's reason.

    Call after the optimizers' packages are known to be installed.
    """
    import torch

    for variant in variants:
        try:
            variant.build([torch.nn.Parameter(torch.zeros(1))])
        except (ValueError, TypeError) as exc:
            settings = ", ".join(f"{k}={format_value(v)}"
                                 for k, v in variant.hyperparameters.items())
            raise ConfigError(
                f"optimizer {variant.label!r} rejects its hyperparameters ({settings}): {exc}; "
                "fix the --set/--sweep value"
            ) from None


def expand_trials(cfg: CompareConfig) -> list[TrialSpec]:
    """Trials in run order: problem, then seed, then optimizer variant (so a partial run already
    compares every optimizer on the first seeds)."""
    if not cfg.problems:
        raise ConfigError("no problem given; e.g. --problem mnist_lenet")
    variants = resolve_variants(cfg)
    return [
        TrialSpec(problem, variant, seed)
        for problem in cfg.problems
        for seed in cfg.seeds
        for variant in variants
    ]


def describe(cfg: CompareConfig) -> dict[str, Any]:
    """JSON-ready view of the config for ``run.json``."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def split_command(command: str) -> Sequence[str]:
    """Inverse of :meth:`CompareConfig.to_command` minus the program name (for tests)."""
    return shlex.split(command)[1:]
