"""Registry of named optimizer specs: BPGrad, the paper's torch.optim baselines, optional peers.

A spec says how to build the optimizer (a factory over resolved hyperparameters) and how the
runner must drive it, so the runner needs no optimizer-specific code:

* ``needs_loss``: ``step`` takes the minibatch loss (``opt.step(loss=loss.detach())``, BPGrad);
* ``needs_closure``: ``step`` requires a closure returning the loss (ALI-G);
* ``epoch_hook``: call ``opt.start_epoch()`` before each epoch (BPGrad's epoch-mean objective);
* ``train_eval``: call ``opt.train()`` before training and ``opt.eval()`` before evaluating or
  checkpointing (Schedule-Free keeps different points in the parameters in the two modes).

Weight decay is 5e-4 for every solver that has it (the paper's value), overridable per run.
Imports of BPGrad and of the peers are lazy: a missing package only fails the specs that need it,
with a message that names the extra to install.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

PAPER_WEIGHT_DECAY = 5e-4

Factory = Callable[..., torch.optim.Optimizer]


class MissingExtraError(ModuleNotFoundError):
    """An optional optimizer's package is not installed."""


class UnknownOptimizerError(KeyError):
    """No optimizer of that name is registered."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class HyperparameterError(ValueError):
    """A hyperparameter override names a key the optimizer does not have, or a bad value."""


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build and drive one named optimizer."""

    name: str
    description: str
    #: ``factory(params, **hyperparameters) -> Optimizer``; imports its package lazily
    factory: Factory
    #: every tunable hyperparameter with its default (only these keys may be overridden)
    defaults: Mapping[str, Any]
    #: import name of the module the optimizer lives in (checked before a run starts)
    module: str
    #: distribution whose version is recorded with the results
    distribution: str
    #: pip extra that provides it (None: always installed)
    extra: str | None = None
    needs_loss: bool = False
    needs_closure: bool = False
    epoch_hook: bool = False
    train_eval: bool = False
    #: the hyperparameter ``--lr-grid`` sweeps; None for learning-rate-free solvers
    lr_key: str | None = "lr"
    #: one of the six solvers of the paper's comparison
    paper: bool = False
    notes: str = ""

    def check_available(self) -> None:
        """Raise :class:`MissingExtraError` naming what to install if the package is absent."""
        try:
            importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if self.extra is None:
                raise
            raise MissingExtraError(
                f"optimizer {self.name!r} needs the package {self.distribution!r}, which is not "
                f"installed: pip install 'bpgrad[{self.extra}]' (or pip install "
                f"{self.distribution})"
            ) from exc

    def version(self) -> str | None:
        """Installed version of the optimizer's distribution, if known."""
        return _distribution_version(self.distribution)


@functools.cache
def _distribution_version(distribution: str) -> str | None:
    # Cached: reading package metadata costs milliseconds, and versions do not change mid-run.
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


_REGISTRY: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"optimizer {spec.name!r} is registered twice")
    if spec.lr_key is not None and spec.lr_key not in spec.defaults:
        raise ValueError(f"{spec.name}: lr_key {spec.lr_key!r} is not a hyperparameter")
    _REGISTRY[spec.name] = spec
    return spec


def get_optimizer_spec(name: str) -> OptimizerSpec:
    """The spec registered as ``name``; unknown names list the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownOptimizerError(
            f"unknown optimizer {name!r}; known optimizers: {', '.join(optimizer_names())}"
        ) from None


def optimizer_names(*, paper_only: bool = False) -> list[str]:
    """Registered names in registration order (the paper's six first)."""
    return [n for n, s in _REGISTRY.items() if s.paper or not paper_only]


# ---------------------------------------------------------------------------------------------
# Values and labels


def parse_value(text: str) -> Any:
    """Parse a command-line hyperparameter value: JSON (numbers, true/false, null, lists) first,
    then a Python-style ``True``/``False``/``None``, else the string itself."""
    lowered = text.strip()
    if lowered in {"True", "False", "None"}:
        return {"True": True, "False": False, "None": None}[lowered]
    try:
        value = json.loads(lowered)
    except json.JSONDecodeError:
        # Plain words stay strings ("epoch_mean"); numbers like "1e-3" parse as JSON above.
        try:
            return float(lowered)
        except ValueError:
            return lowered
    return tuple(value) if isinstance(value, list) else value


def format_value(value: Any) -> str:
    """Compact, folder-name-safe text for a hyperparameter value (``0.001``, ``1e-05``)."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "+".join(format_value(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class ResolvedOptimizer:
    """A spec plus concrete hyperparameters: what one trial runs."""

    spec: OptimizerSpec
    hyperparameters: dict[str, Any]
    #: keys whose values distinguish this variant in a sweep (they appear in the label)
    swept: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Registry name."""
        return self.spec.name

    @property
    def label(self) -> str:
        """Folder name: the registry name, plus ``@key=value,...`` for sweep variants."""
        if not self.swept:
            return self.spec.name
        parts = ",".join(f"{k}={format_value(v)}" for k, v in sorted(self.swept.items()))
        return f"{self.spec.name}@{parts}"

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """Instantiate the optimizer over ``params``."""
        self.spec.check_available()
        return self.spec.factory(params, **self.hyperparameters)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the results header."""
        return {
            "name": self.spec.name,
            "label": self.label,
            "hyperparameters": dict(self.hyperparameters),
            "swept": dict(self.swept),
            "distribution": self.spec.distribution,
            "version": self.spec.version(),
            "needs_loss": self.spec.needs_loss,
            "needs_closure": self.spec.needs_closure,
        }


def resolve_optimizer(
    name: str,
    overrides: Mapping[str, Any] | None = None,
    swept: Mapping[str, Any] | None = None,
) -> ResolvedOptimizer:
    """Merge ``overrides`` and ``swept`` values into the spec's defaults, checking the keys."""
    spec = get_optimizer_spec(name)
    hyper = dict(spec.defaults)
    for source in (overrides or {}), (swept or {}):
        for key, value in source.items():
            if key not in spec.defaults:
                raise HyperparameterError(
                    f"optimizer {name!r} has no hyperparameter {key!r}; "
                    f"it has: {', '.join(sorted(spec.defaults))}"
                )
            default = spec.defaults[key]
            # Keep the default's type where the override is a compatible number (2 -> 2.0).
            if isinstance(default, float) and isinstance(value, int) and not isinstance(
                value, bool
            ):
                value = float(value)
            hyper[key] = value
    return ResolvedOptimizer(spec=spec, hyperparameters=hyper, swept=dict(swept or {}))


# ---------------------------------------------------------------------------------------------
# Factories (lazy imports keep optional packages optional)


def _torch_factory(cls_name: str) -> Factory:
    def build(params: Iterable[torch.nn.Parameter], **hyper: Any) -> torch.optim.Optimizer:
        cls = getattr(torch.optim, cls_name)
        opt: torch.optim.Optimizer = cls(params, **hyper)
        return opt

    build.__name__ = f"build_{cls_name.lower()}"
    return build


def _import_factory(module: str, attr: str) -> Factory:
    def build(params: Iterable[torch.nn.Parameter], **hyper: Any) -> torch.optim.Optimizer:
        cls = getattr(importlib.import_module(module), attr)
        opt: torch.optim.Optimizer = cls(params, **hyper)
        return opt

    build.__name__ = f"build_{attr.lower()}"
    return build


def _register_builtin() -> None:
    wd = PAPER_WEIGHT_DECAY
    register_optimizer(OptimizerSpec(
        name="bpgrad",
        description="BPGrad with the paper's settings (L=50, rho=0.1, mu=0.9, wd=5e-4)",
        factory=_import_factory("bpgrad.optim", "BPGrad"),
        # objective/momentum_style: the solver's defaults, recorded so that every trial file
        # says which variant ran; objective="epoch_mean" is the official MatConvNet code's.
        defaults={"lipschitz": 50.0, "rho": 0.1, "momentum": 0.9, "weight_decay": wd,
                  "objective": "minibatch", "momentum_style": "matconvnet"},
        module="bpgrad.optim", distribution="bpgrad",
        needs_loss=True, epoch_hook=True, lr_key=None, paper=True,
        notes="learning-rate free; sweep `lipschitz` with --sweep lipschitz=10,50,200; "
              "--set bpgrad.objective=epoch_mean for the official code's objective",
    ))
    # torch.optim documented defaults (2.13), plus the paper's momentum 0.9 for SGD.
    torch_specs: list[tuple[str, str, str, dict[str, Any]]] = [
        ("sgd", "SGD", "SGD, heavy-ball momentum 0.9, torch default lr",
         {"lr": 1e-3, "momentum": 0.9, "weight_decay": wd}),
        ("adam", "Adam", "Adam at torch defaults",
         {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": wd}),
        ("adagrad", "Adagrad", "Adagrad at torch defaults",
         {"lr": 1e-2, "eps": 1e-10, "weight_decay": wd}),
        ("adadelta", "Adadelta", "Adadelta at torch defaults",
         {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": wd}),
        ("rmsprop", "RMSprop", "RMSprop at torch defaults",
         {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": wd}),
    ]
    for name, cls_name, description, defaults in torch_specs:
        register_optimizer(OptimizerSpec(
            name=name, description=description, factory=_torch_factory(cls_name),
            defaults=defaults, module="torch.optim", distribution="torch", paper=True,
        ))
    peer = "peers"
    register_optimizer(OptimizerSpec(
        name="prodigy", description="Prodigy (prodigyopt), lr=1, decoupled weight decay",
        factory=_import_factory("prodigyopt", "Prodigy"),
        defaults={"lr": 1.0, "d_coef": 1.0, "weight_decay": wd},
        module="prodigyopt", distribution="prodigyopt", extra=peer, lr_key=None,
    ))
    register_optimizer(OptimizerSpec(
        name="dadapt_sgd", description="D-Adaptation SGD, momentum 0.9",
        factory=_import_factory("dadaptation", "DAdaptSGD"),
        defaults={"lr": 1.0, "momentum": 0.9, "weight_decay": wd},
        module="dadaptation", distribution="dadaptation", extra=peer, lr_key=None,
    ))
    register_optimizer(OptimizerSpec(
        name="dadapt_adam", description="D-Adaptation Adam",
        factory=_import_factory("dadaptation", "DAdaptAdam"),
        defaults={"lr": 1.0, "weight_decay": wd},
        module="dadaptation", distribution="dadaptation", extra=peer, lr_key=None,
    ))
    register_optimizer(OptimizerSpec(
        name="schedulefree_sgd", description="Schedule-Free SGD (train/eval switched by the runner)",
        factory=_import_factory("schedulefree", "SGDScheduleFree"),
        defaults={"lr": 1.0, "momentum": 0.9, "weight_decay": wd, "warmup_steps": 0},
        module="schedulefree", distribution="schedulefree", extra=peer, train_eval=True,
    ))
    register_optimizer(OptimizerSpec(
        name="schedulefree_adamw",
        description="Schedule-Free AdamW (train/eval switched by the runner)",
        factory=_import_factory("schedulefree", "AdamWScheduleFree"),
        defaults={"lr": 0.0025, "weight_decay": wd, "warmup_steps": 0},
        module="schedulefree", distribution="schedulefree", extra=peer, train_eval=True,
    ))
    register_optimizer(OptimizerSpec(
        name="dog", description="DoG (dog-optimizer), without the recommended iterate averaging",
        factory=_import_factory("dog", "DoG"),
        defaults={"lr": 1.0, "reps_rel": 1e-6, "weight_decay": wd},
        module="dog", distribution="dog-optimizer", extra=peer, lr_key=None,
        notes="the authors recommend PolynomialDecayAverager; the harness evaluates the iterate",
    ))
    register_optimizer(OptimizerSpec(
        name="alig", description="ALI-G (pytorch-optimizer), max_lr 0.1, momentum 0.9",
        factory=_import_factory("pytorch_optimizer", "AliG"),
        defaults={"max_lr": 0.1, "momentum": 0.9},
        module="pytorch_optimizer", distribution="pytorch-optimizer", extra=peer,
        needs_closure=True, lr_key="max_lr",
        notes="ALI-G has no weight decay (it regularises through a projection); none is applied",
    ))
    # The Polyak family (issue 12). Each takes the minibatch loss as `step(loss=...)` after the
    # runner's backward (read from the packages' sources: momo-opt 0.1.0 `step(closure=None,
    # loss=None)`, momsps 1.0.0 and sps-safe 1.0.0 `step(loss=None)`), so all are `needs_loss`.
    # Published defaults, except weight decay 5e-4 where the solver has one (the registry's rule).
    # Resuming them from a checkpoint is not exact: the packages keep step counters and loss
    # averages as Python attributes, outside state_dict().
    register_optimizer(OptimizerSpec(
        name="momo",
        description="MoMo (momo-opt): model-based Polyak step over EMAs, lr cap 1, beta 0.9, lb 0",
        factory=_import_factory("momo", "Momo"),
        defaults={"lr": 1.0, "beta": 0.9, "lb": 0.0, "weight_decay": wd,
                  "bias_correction": False, "use_fstar": False},
        module="momo", distribution="momo-opt", extra=peer, needs_loss=True,
        notes="Schaipp et al., ICML 2024; lr caps the adaptive step (recommended 1)",
    ))
    register_optimizer(OptimizerSpec(
        name="momo_adam",
        description="MoMo-Adam (momo-opt): MoMo step with Adam's preconditioner, lr cap 1e-2",
        factory=_import_factory("momo", "MomoAdam"),
        defaults={"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "lb": 0.0,
                  "weight_decay": wd, "divide": True, "use_fstar": False},
        module="momo", distribution="momo-opt", extra=peer, needs_loss=True,
        notes="Schaipp et al., ICML 2024; lr caps the adaptive step (recommended 1e-2)",
    ))
    register_optimizer(OptimizerSpec(
        name="momsps",
        description="MomSPS (momsps): SPS_max with heavy-ball momentum, c 1, gamma_max 10, beta 0.9",
        factory=_import_factory("momsps", "MomSPS"),
        defaults={"c": 1.0, "gamma_max": 10.0, "beta": 0.9},
        module="momsps", distribution="momsps", extra=peer, needs_loss=True,
        lr_key="gamma_max",
        notes="Oikonomou & Loizou; no weight decay in the package, none applied",
    ))
    register_optimizer(OptimizerSpec(
        name="sps_safe",
        description="SPS_safe (sps-safe): (f - ell*) / max(||g||^2, M), ell* 0, M 1",
        factory=_import_factory("sps_safe", "SPS_safe"),
        defaults={"ell_star": 0.0, "M": 1.0, "weight_decay": wd},
        module="sps_safe", distribution="sps-safe", extra=peer, needs_loss=True, lr_key=None,
        notes="Oikonomou & Loizou 2026, for convex Lipschitz non-smooth objectives",
    ))
    register_optimizer(OptimizerSpec(
        name="bpgrad_auto",
        description="BPGrad with lipschitz='auto' (online L estimate), rho=0.1, mu=0.9, wd=5e-4",
        factory=_import_factory("bpgrad.optim", "BPGrad"),
        # lr multiplies the step, i.e. divides the estimate: --sweep lr=... is the
        # multiplier study (L_used = L_hat / lr).
        defaults={"lipschitz": "auto", "rho": 0.1, "momentum": 0.9, "weight_decay": wd,
                  "objective": "minibatch", "momentum_style": "matconvnet", "lr": 1.0,
                  "auto_warmup": 1e-3, "auto_warmup_decay": 0.95, "auto_max_step": 1e-2},
        module="bpgrad.optim", distribution="bpgrad",
        needs_loss=True, epoch_hook=True, lr_key=None,
        notes="learning-rate free; L estimated online (docs/lipschitz.md)",
    ))


_register_builtin()
