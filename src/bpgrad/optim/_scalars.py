r"""BPGrad's per-step scalar arithmetic, written once for every number type.

Everything BPGrad computes per step apart from the per-tensor update is a handful of scalars: the
gradient norm, the skip decision, the objective and its running minimum, the auto-L estimate, the
step size of every group and the momentum rescale factor. :func:`scalar_rule` computes them from
the loss, the squared gradient norm and the optimizer-wide state. It is written against a tiny
arithmetic interface (:class:`FloatMath` / :class:`TensorMath`) so that the same lines serve

* **Python floats** when every value lives in CPU memory: reading a CPU tensor costs no device
  synchronisation, and a dozen float operations cost microseconds where a dozen dispatched 0-dim
  tensor operations cost tens of them (this is what makes the CPU step as cheap as fused SGD);
* **0-dim tensors** on accelerators and under ``torch.compile``, where no value may be read on the
  host. On CUDA the tensor version is compiled once by inductor (:func:`device_rule`) into one or
  two kernels instead of ~40 tiny launches; elsewhere it runs eagerly.

The rule, with :math:`S` the AMP gradient scale, :math:`f` the loss minus its lower bound and
:math:`\epsilon` the norm offset::

    f      = loss - loss_lower_bound         (maximize: -loss - loss_lower_bound)
    n      = sqrt(sum of squared gradient norms) / S + eps
    ok     = f finite and f >= 0 and n finite and n > 0 and no AMP overflow
    F      = f, or (objective="epoch_mean") the mean of the ok f since start_epoch()
    m      = min(m, F)                       only when ok; m starts at +inf
    eta_g  = lr_g * (F - rho_g * m) / L_g    per group (unmasked, for the statistics)
    step_g = eta_g / n if ok else 0          what the fused kernel multiplies the buffer by
    r      = n / n_prev if ok else 1         moves the stored buffer n_prev*beta to n*beta
    auto:  W = W_0 (first step) or gamma W; M = max(M, n - eps) if n - eps > W;
           C = F / (kappa (1 + ||x_0||)); L = max(M, W, C)   (when ok)

with :math:`W_0 = F_0 / (\varepsilon_w (1 + \|x_0\|))` and :math:`\kappa` = ``auto_max_step``
(docs/lipschitz.md). A skipped step (``ok`` false) changes nothing but the ``skipped_steps``
counter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

__all__ = ["STATE_KEYS", "FloatMath", "RuleConfig", "RuleOutput", "TensorMath", "device_rule",
           "scalar_rule"]

# The optimizer-wide state, in the order the rule reads and returns it.
STATE_KEYS = (
    "step", "skipped_steps", "running_min", "epoch_loss_sum", "epoch_loss_count", "buffer_scale",
    "grad_norm_max", "lipschitz_floor", "lipschitz_estimate", "param_norm_init",
)

S = TypeVar("S")  # a scalar: float (host) or a 0-dim torch.Tensor (device)


class FloatMath:
    """Scalar arithmetic on Python floats (IEEE semantics: division by zero gives inf/NaN)."""

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return a if cond else b

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        return a if a <= b else b

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return a if a >= b else b

    @staticmethod
    def clamp_min(a: Any, low: float) -> Any:
        return a if a >= low else low

    @staticmethod
    def isfinite(a: Any) -> Any:
        return math.isfinite(a)

    @staticmethod
    def sqrt(a: Any) -> Any:
        return math.sqrt(a) if a >= 0.0 else math.nan

    @staticmethod
    def div(a: Any, b: Any) -> Any:
        if b != 0.0:
            return a / b
        if a != a or a == 0.0:  # 0/0 and NaN/0
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)

    @staticmethod
    def as_float(cond: Any) -> Any:
        return 1.0 if cond else 0.0


class TensorMath:
    """The same operations on 0-dim tensors; nothing is read on the host."""

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return torch.where(cond, a, b)

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        return torch.minimum(a, b)

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return torch.maximum(a, b)

    @staticmethod
    def clamp_min(a: Any, low: float) -> Any:
        return torch.clamp(a, min=low)

    @staticmethod
    def isfinite(a: Any) -> Any:
        return torch.isfinite(a)

    @staticmethod
    def sqrt(a: Any) -> Any:
        return torch.sqrt(a)

    @staticmethod
    def div(a: Any, b: Any) -> Any:
        return a / b

    @staticmethod
    def as_float(cond: Any) -> Any:
        return torch.where(cond, 1.0, 0.0)


@dataclass(frozen=True)
class RuleConfig:
    """Optimizer-wide settings of the rule (constant between steps)."""

    eps: float
    loss_lower_bound: float
    maximize: bool
    epoch_mean: bool
    auto: bool
    auto_warmup: float
    auto_warmup_decay: float
    auto_max_step: float = 0.0


@dataclass
class RuleOutput(Generic[S]):
    """What one step needs: the new state and the scalars of the update and of ``stats``."""

    state: dict[str, S]
    ok: Any  # bool or a 0-dim bool tensor
    norm: S
    objective: S
    loss: S
    rescale: S
    skip: S  # 1.0 for a skipped step, else 0.0
    etas: list[S]
    lipschitzes: list[S]
    steps: list[S]  # eta_g / n, 0 on a skipped step


def scalar_rule(
    m: type[FloatMath] | type[TensorMath], cfg: RuleConfig, *, loss: S, squared_norm: S,
    state: dict[str, S], lrs: Sequence[Any], lipschitzes: Sequence[Any], rhos: Sequence[Any],
    grad_scale: Any = None, found_inf: Any = None,
) -> RuleOutput[S]:
    """One step of BPGrad's scalar arithmetic (see the module docstring for the math).

    ``lipschitzes[g]`` is ``None`` for a group with ``lipschitz="auto"``. ``state`` is not
    modified; the new state is returned.
    """
    f: Any = loss
    if cfg.maximize:  # the value given is the objective J being maximised
        f = -f
    if cfg.loss_lower_bound != 0.0:
        f = f - cfg.loss_lower_bound
    norm: Any = m.sqrt(squared_norm)
    if grad_scale is not None:
        norm = m.div(norm, grad_scale)
    norm = norm + cfg.eps
    ok = m.isfinite(f) & m.isfinite(norm) & (norm > 0.0) & (f >= 0.0)
    if found_inf is not None:
        ok = ok & (found_inf == 0.0)
    okf: Any = m.as_float(ok)
    new = dict(state)
    if cfg.epoch_mean:
        new["epoch_loss_sum"] = state["epoch_loss_sum"] + m.where(ok, f, 0.0)
        new["epoch_loss_count"] = state["epoch_loss_count"] + okf
        count: Any = new["epoch_loss_count"]
        objective: Any = m.div(new["epoch_loss_sum"], m.clamp_min(count, 1.0))
    else:
        objective = f
    running_min = m.where(ok, m.minimum(state["running_min"], objective), state["running_min"])
    new["running_min"] = running_min
    new["step"] = state["step"] + okf
    new["skipped_steps"] = state["skipped_steps"] + (1.0 - okf)
    # matconvnet-style buffers are stored times the norm of their last step.
    new["buffer_scale"] = m.where(ok, norm, state["buffer_scale"])
    rescale = m.where(ok, m.div(norm, state["buffer_scale"]), 1.0)
    if cfg.auto:
        _auto_lipschitz(m, cfg, new, state, ok=ok, norm=norm, objective=objective)
    etas, used, steps = [], [], []
    for lr, lipschitz, rho in zip(lrs, lipschitzes, rhos, strict=True):
        lipschitz = new["lipschitz_estimate"] if lipschitz is None else lipschitz
        eta = m.div((objective - rho * running_min) * lr, lipschitz)
        etas.append(eta)
        used.append(lipschitz)
        steps.append(m.where(ok, m.div(eta, norm), 0.0))
    return RuleOutput(state=new, ok=ok, norm=norm, objective=objective, loss=f, rescale=rescale,
                      skip=1.0 - okf, etas=etas, lipschitzes=used, steps=steps)


def _auto_lipschitz(
    m: type[FloatMath] | type[TensorMath], cfg: RuleConfig, new: dict[str, Any],
    old: dict[str, Any], *, ok: Any, norm: Any, objective: Any,
) -> None:
    r"""The online estimate of ``lipschitz="auto"``, written into ``new``.

    .. math::

        W_t = W_0\,\gamma^{t}, \quad W_0 = \frac{F_0}{\varepsilon\,(1 + \|x_0\|)}, \qquad
        M_t = \begin{cases} \max(M_{t-1}, n_t) & n_t > W_t \\ M_{t-1} & \text{otherwise}
              \end{cases}, \qquad
        C_t = \frac{F_t}{\kappa\,(1 + \|x_0\|)}, \qquad
        \hat L_t = \max(M_t, W_t, C_t)

    with :math:`n_t` this step's eps-free gradient norm, :math:`\varepsilon` = ``auto_warmup``,
    :math:`\gamma` = ``auto_warmup_decay`` and :math:`\kappa` = ``auto_max_step``; skipped
    steps change nothing. An observation enters the running max only once the warm-up floor no
    longer decides the step: the slopes of the initial transient, which the floor already guards
    against, do not bound L for the rest of training. :math:`C_t` caps the step length,
    :math:`\eta_t \le \kappa (1 + \|x_0\|)`: a slope observed at :math:`x_t` is trusted over a
    ball at most that large (docs/lipschitz.md).
    """
    started = new["step"] > 1.0  # "step" already counts this step when ok
    floor = old["lipschitz_floor"]
    if cfg.auto_warmup > 0.0:
        w0 = m.div(objective, cfg.auto_warmup * (1.0 + old["param_norm_init"]))
        floor = m.where(started, old["lipschitz_floor"] * cfg.auto_warmup_decay, w0)
        new["lipschitz_floor"] = m.where(ok, floor, old["lipschitz_floor"])
    slope = norm - cfg.eps
    decides = ok & (slope > floor)
    new["grad_norm_max"] = m.where(decides, m.maximum(old["grad_norm_max"], slope),
                                   old["grad_norm_max"])
    estimate = m.maximum(new["grad_norm_max"], new["lipschitz_floor"])
    if cfg.auto_max_step > 0.0:
        cap = m.div(objective, cfg.auto_max_step * (1.0 + old["param_norm_init"]))
        estimate = m.maximum(estimate, cap)
    new["lipschitz_estimate"] = m.where(ok, estimate, old["lipschitz_estimate"])


def _tensor_step(
    cfg: RuleConfig, loss: torch.Tensor, norms: list[torch.Tensor], state: list[torch.Tensor],
    lrs: list[torch.Tensor], lipschitzes: list[torch.Tensor], rhos: list[float],
    auto_groups: list[bool], grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
) -> list[torch.Tensor]:
    # The tensor rule over flat lists (what torch.compile traces): writes the new state into
    # ``state`` in place and returns [ok, norm, objective, loss, rescale, skip, *etas, *Ls,
    # *steps].
    squared = torch.stack(norms).square().sum()
    old = dict(zip(STATE_KEYS, state, strict=True))
    out = scalar_rule(
        TensorMath, cfg, loss=loss, squared_norm=squared, state=old, lrs=lrs,
        lipschitzes=[None if a else L for a, L in zip(auto_groups, lipschitzes, strict=True)],
        rhos=rhos, grad_scale=grad_scale, found_inf=found_inf)
    for key, tensor in zip(STATE_KEYS, state, strict=True):
        if out.state[key] is not old[key]:
            tensor.copy_(out.state[key])
    return [out.ok, out.norm, out.objective, out.loss, out.rescale, out.skip, *out.etas,
            *out.lipschitzes, *out.steps]


_COMPILED: dict[RuleConfig, Callable[..., list[torch.Tensor]]] = {}
_COMPILE_FAILED: set[RuleConfig] = set()


def device_rule(cfg: RuleConfig, compile_cuda: bool) -> Callable[..., list[torch.Tensor]]:
    """The tensor rule, compiled by inductor for CUDA when ``compile_cuda`` (one kernel or two).

    A failed compilation falls back to eager tensor operations with a warning (same values,
    about 40 small kernel launches instead of one or two).
    """
    if not compile_cuda or cfg in _COMPILE_FAILED:
        return _eager(cfg)
    fn = _COMPILED.get(cfg)
    if fn is None:
        compiled = torch.compile(_tensor_step, dynamic=False, fullgraph=True)

        def fn(*args: Any) -> list[torch.Tensor]:
            try:
                return compiled(cfg, *args)
            except Exception as exc:  # pragma: no cover - depends on the CUDA toolchain
                import warnings
                warnings.warn(f"BPGrad could not compile its scalar step for CUDA ({exc!r}); "
                              "using eager tensor operations instead", stacklevel=3)
                _COMPILE_FAILED.add(cfg)
                _COMPILED.pop(cfg, None)
                return _tensor_step(cfg, *args)

        _COMPILED[cfg] = fn
    return fn


def _eager(cfg: RuleConfig) -> Callable[..., list[torch.Tensor]]:
    def fn(*args: Any) -> list[torch.Tensor]:
        return _tensor_step(cfg, *args)
    return fn
