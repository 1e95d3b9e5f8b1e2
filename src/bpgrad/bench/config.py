"""Configuration of a ``bpgrad compare`` run: TOML files, command-line overrides, trial expansion.

A TOML file holds the same keys as the command line (dashes or underscores)::

    problem = "mnist_lenet"              # or problems = ["mnist_lenet", "fmnist_2c2d"]
    optimizers = ["bpgrad", "sgd", "adam"]
    seeds = 3                            # a count (0..2) or a list [0, 1, 2]
    epochs = 5
    out = "runs/paper_mnist"
    threads = 2
    limit_train_batches = 100            # optional smoke-size budget
    lr_grid = "log:1e-4:1e-1:4"          # or a list [1e-4, 1e-3]
    [set]                                # overrides: all optimizers having the key, or one
    weight_decay = 5e-4
    "sgd.momentum" = 0.0
    [sweep]                              # any hyperparameter, for every optimizer having it
    lipschitz = [10, 50, 200]

Values given on the command line win over the file. Relative ``out`` and ``data_dir`` in a file
are taken relative to the current directory (the repository root for the shipped configs).
"""

from __future__ import annotations

import itertools
import math
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bpgrad.bench.optimizers import (
    HyperparameterError,
    ResolvedOptimizer,
    format_value,
    get_optimizer_spec,
    parse_value,
    resolve_optimizer,
)


class ConfigError(ValueError):
    """A configuration file or option is invalid."""


@dataclass
class CompareConfig:
    """Everything ``bpgrad compare`` needs; defaults are the command line's."""

    problems: list[str] = field(default_factory=list)
    optimizers: list[str] = field(
        default_factory=lambda: ["bpgrad", "sgd", "adam", "adagrad", "adadelta", "rmsprop"]
    )
    seeds: list[int] = field(default_factory=lambda: [0])
    #: None: each problem's default
    epochs: int | None = None
    out: Path = Path("runs/compare")
    threads: int | None = None
    device: str = "cpu"
    limit_train_batches: int | None = None
    batch_size: int | None = None
    lr_grid: list[float] | None = None
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    #: "key" (every optimizer that has it) or "optimizer.key"
    overrides: dict[str, Any] = field(default_factory=dict)
    data_dir: Path | None = None
    validation_size: int | None = None
    #: None: the problem's default
    eval_batch_size: int | None = None
    log_interval: int = 50
    quiet: bool = False
    #: test accuracy (or loss, for problems without accuracy) that "steps to target" uses
    target: float | None = None
    report: bool = True
    #: the TOML file this came from, if any (for the report's regenerating command)
    config_file: Path | None = None

    def to_command(self) -> str:
        """A ``bpgrad compare`` command line that reproduces this configuration exactly."""
        args = ["bpgrad", "compare", "--problem", ",".join(self.problems),
                "--optimizers", ",".join(self.optimizers),
                "--seeds", _seeds_text(self.seeds)]
        if self.epochs is not None:
            args += ["--epochs", str(self.epochs)]
        args += ["--out", str(self.out)]
        for flag, value in (("--threads", self.threads),
                            ("--limit-train-batches", self.limit_train_batches),
                            ("--batch-size", self.batch_size),
                            ("--validation-size", self.validation_size),
                            ("--target", self.target),
                            ("--data-dir", self.data_dir)):
            if value is not None:
                args += [flag, str(value)]
        if self.device != "cpu":
            args += ["--device", self.device]
        if self.lr_grid:
            args += ["--lr-grid", ",".join(format_value(v) for v in self.lr_grid)]
        for key, values in self.sweep.items():
            args += ["--sweep", f"{key}=" + ",".join(format_value(v) for v in values)]
        for key, value in self.overrides.items():
            args += ["--set", f"{key}={_value_text(value)}"]
        if self.eval_batch_size is not None:
            args += ["--eval-batch-size", str(self.eval_batch_size)]
        return shlex.join(args)


def _seeds_text(seeds: Sequence[int]) -> str:
    if list(seeds) == list(range(len(seeds))):
        return str(len(seeds))
    # A trailing comma marks a one-element list (a bare number would be a count).
    return ",".join(str(s) for s in seeds) + ("," if len(seeds) == 1 else "")


def _value_text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_value_text(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return format_value(value)


# ---------------------------------------------------------------------------------------------
# Parsing helpers


def parse_list(text: str) -> list[str]:
    """Split ``a,b , c`` into names, dropping empties."""
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_seeds(value: Any) -> list[int]:
    """``3`` -> [0, 1, 2]; ``"0,5"`` or ``[0, 5]`` -> [0, 5]; ``"4,"`` -> [4]."""
    if isinstance(value, bool):
        raise ConfigError(f"seeds must be a count or a list of integers, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"seeds must be >= 1, got {value}")
        return list(range(value))
    if isinstance(value, str):
        if "," not in value:
            try:
                count = int(value)
            except ValueError:
                raise ConfigError(f"seeds: {value!r} is not an integer count") from None
            return parse_seeds(count)
        value = parse_list(value)
    try:
        seeds = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"seeds must be a count or a list of integers, got {value!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be non-empty and distinct, got {seeds}")
    return seeds


def parse_grid(value: Any) -> list[float]:
    """``"1e-4,1e-3"``, ``[1e-4, 1e-3]`` or ``"log:1e-5:1e0:6"`` (6 log-spaced points, ends
    included) -> floats."""
    if isinstance(value, str) and value.startswith("log:"):
        parts = value.split(":")
        if len(parts) != 4:
            raise ConfigError(f"log grid must look like log:LOW:HIGH:N, got {value!r}")
        try:
            low, high, n = float(parts[1]), float(parts[2]), int(parts[3])
        except ValueError:
            raise ConfigError(f"log grid must look like log:LOW:HIGH:N, got {value!r}") from None
        if low <= 0 or high <= low or n < 2:
            raise ConfigError(f"log grid needs 0 < LOW < HIGH and N >= 2, got {value!r}")
        a, b = math.log10(low), math.log10(high)
        # Round to 12 significant digits so 10**-3 prints as 0.001 in folder names.
        return [float(f"{10 ** (a + (b - a) * i / (n - 1)):.12g}") for i in range(n)]
    items = parse_list(value) if isinstance(value, str) else list(value)
    try:
        grid = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"a grid must be numbers, got {value!r}") from None
    if not grid:
        raise ConfigError("a grid needs at least one value")
    return grid


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, parsed value)."""
    if "=" not in text:
        raise ConfigError(f"expected KEY=VALUE, got {text!r}")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"expected KEY=VALUE, got {text!r}")
    return key, parse_value(raw)


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``lipschitz=10,50,200`` -> ("lipschitz", [10, 50, 200])."""
    key, _, raw = text.partition("=")
    if not key.strip() or not raw.strip():
        raise ConfigError(f"expected --sweep KEY=V1,V2,..., got {text!r}")
    if raw.strip().startswith("log:"):
        return key.strip(), list(parse_grid(raw.strip()))
    return key.strip(), [parse_value(v) for v in parse_list(raw)]


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
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from exc
    return data


_KNOWN_KEYS = {f.name for f in fields(CompareConfig)} | {"problem", "set"}


def config_from_mapping(data: Mapping[str, Any], *, base: CompareConfig | None = None,
                        source: str = "config") -> CompareConfig:
    """Apply the keys of ``data`` (TOML or CLI) onto ``base`` (or the defaults)."""
    cfg = base or CompareConfig()
    norm = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(norm) - _KNOWN_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN_KEYS))}"
        )
    for key, value in norm.items():
        if value is None:
            continue
        if key in ("problem", "problems"):
            cfg.problems = parse_list(value) if isinstance(value, str) else [str(v) for v in value]
        elif key == "optimizers":
            cfg.optimizers = (
                parse_list(value) if isinstance(value, str) else [str(v) for v in value]
            )
        elif key == "seeds":
            cfg.seeds = parse_seeds(value)
        elif key == "lr_grid":
            cfg.lr_grid = parse_grid(value)
        elif key == "sweep":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: [sweep] must be a table of lists")
            for k, v in value.items():
                cfg.sweep[str(k)] = (
                    parse_grid(v) if isinstance(v, str) and v.startswith("log:") else list(v)
                )
        elif key in ("set", "overrides"):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: [set] must be a table of key = value")
            cfg.overrides.update({str(k): v for k, v in value.items()})
        elif key in ("out", "data_dir", "config_file"):
            setattr(cfg, key, Path(value))
        elif key in ("epochs", "threads", "limit_train_batches", "batch_size",
                     "validation_size", "eval_batch_size", "log_interval"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
            setattr(cfg, key, value)
        elif key == "target":
            cfg.target = float(value)
        elif key in ("quiet", "report"):
            setattr(cfg, key, bool(value))
        else:
            setattr(cfg, key, value)
    return cfg


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
    for key, value in cfg.overrides.items():
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
                raise ConfigError(str(exc)) from None
    return variants


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
