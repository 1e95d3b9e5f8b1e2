r"""BPGrad (Zhang, Wu, Wang, CVPR 2018) as a ``torch.optim.Optimizer``.

The update, per step :math:`t` (the official MatConvNet code's rule)::

    f_t   = loss passed to step (mean over ranks under torch.distributed) - loss_lower_bound
    F_t   = f_t                                   objective="minibatch"  (default)
          = mean of f since start_epoch()         objective="epoch_mean" (the official code)
    m_t   = min(m_{t-1}, F_t)                     m_0 = +inf, never reset
    n_t   = ||concat of all raw gradients||_2 + eps      one norm over every group
    eta_t = lr * (F_t - rho * m_t) / lipschitz           per group
    lipschitz="auto": L_t = max(max_{tau<=t} n_tau, W_0 gamma^t)   (docs/lipschitz.md)
    d     = (grad + weight_decay * p) / n_t              per parameter
    matconvnet style: v = momentum v - d;      p = p + eta_t v
    port style:       v = momentum v - eta_t d; p = p + v

Three layers as in ``torch.optim``: the class validates and keeps state, :func:`bpgrad` dispatches,
private kernels (loop / foreach / fused) update flat tensor lists with keyword-only scalars. Every
per-step scalar (loss, norm, running min, step size) stays a 0-dim tensor on the parameters'
device: ``step`` never reads a tensor's value on the host unless ``strict=True``.

Momentum buffers follow ``torch.optim.SGD``'s sign convention (``beta = -v``). For the matconvnet
style the buffer is stored multiplied by the gradient norm of its latest step,
``state["momentum_buffer"] = n * beta`` with ``n`` in the optimizer-wide ``buffer_scale`` entry:
that makes the update exactly ``torch._fused_sgd_`` after one rescaling multiplication, so the fused
kernel runs in one pass and never touches ``p.grad``. Use :meth:`BPGrad.momentum_direction` to read
``beta`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, cast

import torch
from torch.optim import Optimizer

from bpgrad.optim.distributed import reduce_loss, squared_norm

__all__ = ["BPGrad", "BPGradError", "MissingLossError", "bpgrad"]

Objective = Literal["minibatch", "epoch_mean"]
MomentumStyle = Literal["matconvnet", "port"]

# Optimizer-wide options: they must agree across parameter groups because the quantities they
# shape (the objective value, its running min, the gradient norm) are global, not per group.
_GLOBAL_OPTIONS = (
    "objective", "loss_lower_bound", "distributed_loss", "eps", "strict", "auto_warmup",
    "auto_warmup_decay",
)

# Keys of the optimizer-wide state, kept in the state of the first parameter so that one
# ``state_dict()`` (keyed by parameter index, as FSDP/DCP tools expect) restores everything.
_GLOBAL_STATE_KEYS = (
    "step", "skipped_steps", "running_min", "epoch_loss_sum", "epoch_loss_count", "buffer_scale",
    "grad_norm_max", "lipschitz_floor", "lipschitz_estimate", "param_norm_init",
)


class BPGradError(RuntimeError):
    """A BPGrad step could not be carried out (raised in ``strict`` mode, or for bad input)."""


class MissingLossError(BPGradError):
    """``step()`` was called without any way to know the loss value."""


def _host_readable(t: torch.Tensor) -> bool:
    # A CPU tensor's value can be read without synchronising with any device; under
    # torch.compile a Python branch on it would break the graph, so it is not read there.
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _scalar(value: float | torch.Tensor, *, like: torch.Tensor) -> torch.Tensor:
    # torch.full fills on the device; torch.tensor(value, device=cuda) would copy from pageable
    # host memory, which synchronises.
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return torch.full((), float(value), device=like.device, dtype=like.dtype)


class BPGrad(Optimizer):
    r"""BPGrad: step size from the Lipschitz branch-and-pruning bound, direction the normalised gradient.

    From the Lipschitz continuity of the loss, ``|f(x) - f(y)| <= L ||x - y||``, every evaluated
    point :math:`x_t` rules out the ball of radius :math:`(F_t - \rho\,m_t)/L` around it, where
    :math:`\rho\,m_t = \rho \min_{\tau \le t} F_\tau` estimates the global minimum. The step
    :math:`\eta_t = (F_t - \rho m_t)/L` along :math:`-g/\|g\|` reaches exactly the boundary of
    that ball: the smallest step that can still reach the global optimum. Momentum and weight decay
    follow the official MatConvNet code (see the module docstring for the full update).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lipschitz: :math:`L`, the Lipschitz constant of the loss w.r.t. the parameters (a bound on
            ``||grad f||``, not the smoothness constant). Acts like an inverse learning rate. The
            official CIFAR-10 code uses 50. Per group. ``"auto"`` estimates it online, on the
            device, as :math:`\hat L_t = \max(\max_{\tau \le t} n_\tau,\ W_0 \gamma^t)`: the
            running max of the global gradient norm :math:`n_\tau` (the smallest L consistent
            with the observed gradients), floored during warm-up by
            :math:`W_0 = F_0 / (\varepsilon (1 + \|x_0\|))`, which bounds the first step to
            :math:`(1-\rho)\,\varepsilon (1 + \|x_0\|)`. One estimate shared by all auto groups,
            identical on every DDP rank, kept in ``state_dict``; see docs/lipschitz.md.
        rho: :math:`\rho \in [0, 1)`, turns the best objective seen into the estimate
            :math:`\hat f^* = \rho\, m_t` of the global minimum. 0 gives the guaranteed lower bound
            0 (for ``f >= 0``); the official code uses 0.1. Per group.
        momentum: heavy-ball momentum :math:`\mu \in [0, 1)` (official: 0.9). Per group.
        weight_decay: :math:`\lambda \ge 0`, L2 term added to the direction and divided by the
            loss-gradient norm, as in the official code. Not part of ``f``. Per group.
        lr: multiplier on the step size, 1 by default. This is the knob LR schedulers turn:
            ``lr = s`` is the same as ``lipschitz = L / s``, so a scheduler on ``lr`` reproduces the
            official per-epoch schedule of ``L``. Per group; may be a 0-dim tensor.
        objective: ``"minibatch"`` uses the current loss as :math:`F_t`; ``"epoch_mean"`` uses the
            running mean of the losses since the last :meth:`start_epoch`, which is what the
            official MatConvNet code feeds the rule (its cumulative per-epoch statistics).
        momentum_style: ``"matconvnet"`` (official code: step size outside the buffer) or
            ``"port"`` (the oval-group/dfw PyTorch port: step size inside the buffer). Per group.
        eps: added to the gradient norm (official code: 0; the port: 1e-5).
        loss_lower_bound: a known lower bound :math:`f_{lb}` of the loss; BPGrad uses
            ``f - f_lb``, which must be ``>= 0``. Use it for losses that can be negative (e.g. a
            log-likelihood) or that carry a constant offset (label smoothing's entropy).
        distributed_loss: under ``torch.distributed`` with world size > 1, average the loss over
            ranks with one scalar all-reduce so every replica takes the same step (``True``, the
            default), keep the local loss (``False``; pass an already global loss), or a process
            group to reduce over.
        foreach, fused: kernel choice as in ``torch.optim`` (``None`` picks the fused kernel,
            ``torch._fused_sgd_``, for the matconvnet style on cpu/cuda/mps/xpu, else foreach;
            under ``torch.compile`` foreach, which inductor fuses). Per group.
        auto_warmup: :math:`\varepsilon \ge 0` of the ``"auto"`` warm-up floor (0 disables it).
        auto_warmup_decay: :math:`\gamma \in [0, 1)`, per-step decay of the warm-up floor.
        strict: check every step on the host and raise :class:`BPGradError` for a non-finite or
            negative loss, a non-finite gradient or a zero gradient norm. Costs one host sync per
            step; by default such steps are skipped on the device and counted instead.

    Passing the loss (one of):
        * ``opt.step(closure)``: the closure re-evaluates the model, calls ``backward`` and
          returns the loss;
        * ``opt.step(loss=loss)`` after your own ``backward``;
        * ``opt.set_loss(loss)`` then ``opt.step()``: for loops and wrappers that call ``step()``
          with no arguments (HF Trainer, ``GradScaler.step``, Lightning under AMP).
        Under AMP pass the *unscaled* loss; ``GradScaler`` hands BPGrad its scale and inf flag
        (``_step_supports_amp_scaling``) so a step with inf/NaN gradients is skipped on the device
        without touching any state.

    Observability: after each step :attr:`stats` holds 0-dim tensors ``eta`` (group 0),
    ``eta_groups``, ``grad_norm``, ``objective``, ``running_min``, ``lipschitz`` (the L used by
    group 0, the estimate under ``"auto"``), ``lipschitz_groups``, ``steps`` and
    ``skipped_steps``; reading them costs nothing until you convert them to Python numbers.

    Bad input: a non-finite loss or gradient, or a zero gradient norm, skips the step (no
    parameter or state change except ``skipped_steps``). A negative loss is a usage error: it
    raises ``ValueError`` at once when the loss lives on the CPU (free to check) and, on an
    accelerator, is skipped and counted (``strict=True`` raises there too).

    Note:
        Gradients are never modified, except under ``GradScaler`` with the fused kernel, which
        unscales them in place (as ``torch.optim``'s fused optimizers do).
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lipschitz: float | torch.Tensor | Literal["auto"] = 50.0,
        rho: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        lr: float | torch.Tensor = 1.0,
        objective: Objective = "minibatch",
        momentum_style: MomentumStyle = "matconvnet",
        eps: float = 0.0,
        loss_lower_bound: float = 0.0,
        distributed_loss: bool | Any = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        strict: bool = False,
        auto_warmup: float = 1e-3,
        auto_warmup_decay: float = 0.95,
    ) -> None:
        defaults = dict(
            lipschitz=lipschitz, rho=rho, momentum=momentum, weight_decay=weight_decay, lr=lr,
            momentum_style=momentum_style, foreach=foreach, fused=fused, objective=objective,
            loss_lower_bound=loss_lower_bound, distributed_loss=distributed_loss, eps=eps,
            strict=strict, auto_warmup=auto_warmup, auto_warmup_decay=auto_warmup_decay,
        )
        _validate_group(defaults)
        # A dict, mutated in place: torch.compile traces dict mutations inside a compiled step,
        # while rebinding an optimizer attribute there fails on some torch versions.
        self._pending: dict[str, torch.Tensor | float] = {}
        self._last: dict[str, torch.Tensor] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ configuration
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; per-group options are validated, global ones must match group 0."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group)
        first = self.param_groups[0]
        for key in _GLOBAL_OPTIONS:
            if group[key] != first[key]:
                raise ValueError(
                    f"BPGrad option {key!r} is optimizer-wide (it shapes the global objective or "
                    f"gradient norm) and cannot differ between parameter groups: got "
                    f"{group[key]!r}, group 0 has {first[key]!r}"
                )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_pending", {})
        self.__dict__.setdefault("_last", {})

    # ------------------------------------------------------------------ loss plumbing
    def set_loss(self, loss: torch.Tensor | float) -> None:
        """Give the loss for the next ``step()``; for trainers that call ``step()`` bare.

        The value is consumed by the next step (so a stale loss is never reused) and is taken
        detached: BPGrad needs the value, not the graph.
        """
        self._pending["loss"] = loss.detach() if isinstance(loss, torch.Tensor) else loss

    def start_epoch(self) -> None:
        """Start a new epoch for ``objective="epoch_mean"`` (resets the running mean, not the min).

        Harmless with ``objective="minibatch"``. Runs on the device; no host sync.
        """
        anchor = self._anchor()
        state = self.state[anchor]
        if "epoch_loss_sum" in state:
            state["epoch_loss_sum"].zero_()
            state["epoch_loss_count"].zero_()

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """0-dim tensors describing the last step (see the class docstring); no host sync."""
        out = dict(self._last)
        state = self.state.get(self._anchor(), {})
        for key in ("running_min", "step", "skipped_steps"):
            if key in state:
                out["steps" if key == "step" else key] = state[key]
        return out

    def momentum_direction(self, param: torch.Tensor) -> torch.Tensor | None:
        """The momentum buffer of ``param`` as the paper's ``-v`` (``None`` before its first step).

        For the matconvnet style this undoes the storage scaling described in the module
        docstring; for the port style the buffer is returned as stored.
        """
        buf = self.state.get(param, {}).get("momentum_buffer")
        if buf is None:
            return None
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                if group["momentum_style"] == "matconvnet":
                    return buf / self._global_state()["buffer_scale"]
                return buf
        raise KeyError("param is not optimized by this BPGrad instance")

    # ------------------------------------------------------------------ state
    def _anchor(self) -> torch.Tensor:
        for group in self.param_groups:
            if group["params"]:
                return cast(torch.Tensor, group["params"][0])
        raise BPGradError("BPGrad has no parameters")

    def _scalar_dtype(self) -> torch.dtype:
        dtype = torch.float32
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype in (torch.float64, torch.complex128):
                    return torch.float64
        return dtype

    def _global_state(self) -> dict[str, torch.Tensor]:
        anchor = self._anchor()
        state = self.state[anchor]
        # Per key, so that a checkpoint written before a key existed (e.g. the auto-L state)
        # still loads and starts that key fresh.
        device, dtype = anchor.device, self._scalar_dtype()
        for key in _GLOBAL_STATE_KEYS:
            if key not in state:
                start = {"running_min": math.inf, "buffer_scale": 1.0}.get(key, 0.0)
                state[key] = torch.full((), start, device=device, dtype=dtype)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim`` does, but keep the global scalars in their saved precision.

        ``torch.optim`` casts floating state to each parameter's dtype; for the running minimum
        and the epoch mean that would round them to, e.g., bfloat16 on a bf16 model.
        """
        saved = state_dict.get("state", {}).get(0, {})
        keep = {k: v for k, v in saved.items() if k in _GLOBAL_STATE_KEYS}
        super().load_state_dict(state_dict)
        if keep:
            anchor = self._anchor()
            for key, value in keep.items():
                if isinstance(value, torch.Tensor):
                    self.state[anchor][key] = value.detach().clone().to(anchor.device)

    # ------------------------------------------------------------------ step
    def _collect_group(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
        bufs: list[torch.Tensor], idle_bufs: list[torch.Tensor],
    ) -> None:
        def real(t: torch.Tensor) -> torch.Tensor:
            # The norm of the real view equals the complex norm and the update is linear, so
            # complex parameters are updated through their real views.
            return torch.view_as_real(t) if torch.is_complex(t) else t

        with_momentum = group["momentum"] != 0.0
        for p in group["params"]:
            state = self.state.get(p, {}) if with_momentum else {}
            buf = state.get("momentum_buffer")
            if p.grad is None:
                if buf is not None:
                    idle_bufs.append(real(buf))
                continue
            if p.grad.is_sparse:
                raise BPGradError("BPGrad does not support sparse gradients; use dense ones")
            params.append(real(p))
            grads.append(real(p.grad))
            if with_momentum:
                if buf is None:
                    buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.state[p]["momentum_buffer"] = buf
                bufs.append(real(buf))

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], torch.Tensor | float] | None = None,
        *,
        loss: torch.Tensor | float | None = None,
    ) -> torch.Tensor | float | None:
        """Take one BPGrad step.

        Args:
            closure: re-evaluates the model, calls ``backward`` and returns the loss. A closure
                that returns ``None`` (wrappers such as Lightning's manual optimization pass one)
                is run, and the loss is then taken from ``loss=`` or ``set_loss``.
            loss: the loss of the current minibatch (after you called ``backward``).

        Returns the loss that was used (the closure's return value, or ``loss``).

        Raises:
            MissingLossError: no closure, no ``loss=`` and no ``set_loss`` since the last step.
            ValueError: a closure that returns a loss and ``loss=`` both given, or a non-scalar
                loss.
        """
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        if closure_loss is not None:
            if loss is not None:
                raise ValueError("pass either a closure that returns the loss or loss=, not both")
            loss = closure_loss
        elif loss is None:
            # Also reached when a wrapper's closure returns None (Lightning's manual
            # optimization passes one): the loss then comes from set_loss.
            loss = self._pending.get("loss")
        self._pending.pop("loss", None)
        if loss is None:
            raise MissingLossError(
                "BPGrad needs the loss value to set its step size. Call opt.step(closure) with a "
                "closure that returns the loss, opt.step(loss=loss) after backward(), or "
                "opt.set_loss(loss) before a trainer's bare opt.step() (see the BPGrad docstring)."
            )
        with torch.no_grad():
            self._update(loss)
        return loss

    def _update(self, loss: torch.Tensor | float) -> None:
        first = self.param_groups[0]
        fresh = "param_norm_init" not in self.state.get(self._anchor(), {})
        gstate = self._global_state()
        if fresh:
            # ||x_0|| for the auto-L warm-up floor, read once (on the device) at the first step.
            every = [p for group in self.param_groups for p in group["params"]]
            gstate["param_norm_init"].copy_(
                squared_norm([torch.view_as_real(p.detach()) if torch.is_complex(p)
                              else p.detach() for p in every], gstate["running_min"].device,
                             gstate["running_min"].dtype).sqrt())
        like = gstate["running_min"]
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"BPGrad needs a scalar loss, got shape {tuple(loss.shape)}; reduce it "
                    "(e.g. .mean()) before passing it"
                )
            f = loss.detach().reshape(()).to(device=like.device, dtype=like.dtype)
        else:
            f = _scalar(float(loss), like=like)
        f = reduce_loss(f, first["distributed_loss"])
        if first["loss_lower_bound"] != 0.0:
            f = f - first["loss_lower_bound"]
        if _host_readable(f):
            value = float(f)
            if math.isfinite(value) and value < 0.0:
                raise ValueError(
                    f"BPGrad assumes a non-negative loss but got {value:.6g} (after subtracting "
                    f"loss_lower_bound={first['loss_lower_bound']}). Pass loss_lower_bound=<a "
                    "known lower bound of your loss> so that BPGrad uses loss - lower_bound."
                )

        params_per_group: list[list[torch.Tensor]] = []
        grads_per_group: list[list[torch.Tensor]] = []
        bufs_per_group: list[list[torch.Tensor]] = []
        idle_per_group: list[list[torch.Tensor]] = []
        all_grads: list[torch.Tensor] = []
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            idle: list[torch.Tensor] = []
            self._collect_group(group, params, grads, bufs, idle)
            params_per_group.append(params)
            grads_per_group.append(grads)
            bufs_per_group.append(bufs)
            idle_per_group.append(idle)
            all_grads.extend(grads)

        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        norm = squared_norm(all_grads, like.device, like.dtype).sqrt()
        if grad_scale is not None:
            norm = norm / grad_scale.to(like.device, like.dtype)
        norm = norm + first["eps"]
        ok = torch.isfinite(f) & torch.isfinite(norm) & (norm > 0) & (f >= 0)
        if found_inf is not None:
            ok = ok & (found_inf.to(like.device) == 0)
        if first["strict"] and not torch.compiler.is_compiling() and not bool(ok):
            raise BPGradError(
                f"BPGrad strict mode: refusing a step with loss={float(f):.6g} and gradient "
                f"norm={float(norm):.6g} (need a finite loss >= 0 and a finite, non-zero norm)"
            )

        okf = ok.to(like.dtype)
        if first["objective"] == "epoch_mean":
            gstate["epoch_loss_sum"].add_(torch.where(ok, f, 0.0))
            gstate["epoch_loss_count"].add_(okf)
            objective = gstate["epoch_loss_sum"] / gstate["epoch_loss_count"].clamp(min=1.0)
        else:
            objective = f
        running_min = torch.where(ok, torch.minimum(gstate["running_min"], objective),
                                  gstate["running_min"])
        gstate["running_min"].copy_(running_min)
        gstate["step"].add_(okf)
        gstate["skipped_steps"].add_(1.0 - okf)
        # matconvnet-style buffers are stored times the norm of their last step (see bpgrad());
        # moving them to this step's norm is one multiplication.
        rescale = torch.where(ok, norm / gstate["buffer_scale"], 1.0)
        gstate["buffer_scale"].copy_(torch.where(ok, norm, gstate["buffer_scale"]))

        # The estimate costs a few device ops per step: only groups with lipschitz="auto" pay.
        uses_auto = any(isinstance(g["lipschitz"], str) for g in self.param_groups)
        lipschitz_hat = (self._auto_lipschitz(gstate, ok=ok, norm=norm, objective=objective)
                         if uses_auto else None)
        etas = []
        lipschitzes = []
        for group, params, grads, bufs, idle in zip(
            self.param_groups, params_per_group, grads_per_group, bufs_per_group,
            idle_per_group, strict=True,
        ):
            lr, lipschitz = group["lr"], group["lipschitz"]
            if isinstance(lipschitz, str):  # "auto" (validated)
                assert lipschitz_hat is not None
                lipschitz = lipschitz_hat
            lipschitzes.append(_scalar(lipschitz, like=like))
            eta = (objective - group["rho"] * running_min)
            if isinstance(lr, torch.Tensor) or isinstance(lipschitz, torch.Tensor):
                eta = eta * _scalar(lr, like=like) / _scalar(lipschitz, like=like)
            else:
                eta = eta * (lr / lipschitz)
            etas.append(eta)
            if not params and not idle:
                continue
            bpgrad(
                params, grads, bufs, eta=eta, grad_norm=norm, ok=ok, rescale=rescale,
                grad_scale=grad_scale, weight_decay=group["weight_decay"],
                momentum=group["momentum"], momentum_style=group["momentum_style"],
                foreach=group["foreach"], fused=group["fused"], idle_buffers=idle,
            )
        # Updated in place: torch.compile replays in-place dict mutations reliably, while a
        # rebinding of an optimizer attribute inside a compiled step is not reflected outside.
        self._last.update(
            eta=etas[0], eta_groups=torch.stack(etas), grad_norm=norm, objective=objective, loss=f,
            lipschitz=lipschitzes[0], lipschitz_groups=torch.stack(lipschitzes),
        )

    def _auto_lipschitz(
        self, gstate: dict[str, torch.Tensor], *, ok: torch.Tensor, norm: torch.Tensor,
        objective: torch.Tensor,
    ) -> torch.Tensor:
        r"""Update and return the online estimate :math:`\hat L_t` (``lipschitz="auto"``).

        .. math::

            M_t = \max(M_{t-1}, n_t), \qquad
            W_t = W_0\,\gamma^{t}, \quad W_0 = \frac{F_0}{\varepsilon\,(1 + \|x_0\|)}, \qquad
            \hat L_t = \max(M_t, W_t)

        with :math:`n_t` this step's (global, unscaled, eps-free) gradient norm,
        :math:`\varepsilon` = ``auto_warmup`` and :math:`\gamma` = ``auto_warmup_decay``. See
        docs/lipschitz.md for the derivation. All on the device; skipped steps change nothing.
        """
        first = self.param_groups[0]
        raw_norm = norm - first["eps"]
        started = gstate["step"] > 1.0  # "step" already counts this step when ok
        grad_norm_max = torch.where(ok, torch.maximum(gstate["grad_norm_max"], raw_norm),
                                    gstate["grad_norm_max"])
        if first["auto_warmup"] > 0.0:
            w0 = objective / (first["auto_warmup"] * (1.0 + gstate["param_norm_init"]))
            floor = torch.where(started, gstate["lipschitz_floor"] * first["auto_warmup_decay"],
                                w0)
            gstate["lipschitz_floor"].copy_(torch.where(ok, floor, gstate["lipschitz_floor"]))
        estimate = torch.maximum(grad_norm_max, gstate["lipschitz_floor"])
        gstate["grad_norm_max"].copy_(grad_norm_max)
        gstate["lipschitz_estimate"].copy_(torch.where(ok, estimate, gstate["lipschitz_estimate"]))
        return gstate["lipschitz_estimate"]


def _validate_group(group: dict[str, Any]) -> None:
    def number(name: str) -> float:
        value = group[name]
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a number or a 0-dim tensor")
            return math.nan  # a tensor's value is not checked (it would cost a host sync)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)

    if isinstance(group["lipschitz"], str):
        if group["lipschitz"] != "auto":
            raise ValueError(
                f"lipschitz must be a number, a 0-dim tensor or 'auto', got {group['lipschitz']!r}"
            )
    else:
        lipschitz = number("lipschitz")
        if not math.isnan(lipschitz) and not (lipschitz > 0 and math.isfinite(lipschitz)):
            raise ValueError(f"lipschitz must be a finite number > 0, got {group['lipschitz']!r}")
    warmup = number("auto_warmup")
    if not (warmup >= 0.0 and math.isfinite(warmup)):
        raise ValueError(f"auto_warmup must be a finite number >= 0, got {group['auto_warmup']!r}")
    decay = number("auto_warmup_decay")
    if not 0.0 <= decay < 1.0:
        raise ValueError(
            f"auto_warmup_decay must lie in [0, 1), got {group['auto_warmup_decay']!r}"
        )
    rho = number("rho")
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must lie in [0, 1), got {group['rho']!r}")
    momentum = number("momentum")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {group['momentum']!r}")
    weight_decay = number("weight_decay")
    if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {group['weight_decay']!r}")
    lr = number("lr")
    if not math.isnan(lr) and not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number >= 0, got {group['lr']!r}")
    eps = number("eps")
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {group['eps']!r}")
    bound = number("loss_lower_bound")
    if not math.isfinite(bound):
        raise ValueError(f"loss_lower_bound must be finite, got {group['loss_lower_bound']!r}")
    if group["objective"] not in ("minibatch", "epoch_mean"):
        raise ValueError(
            f"objective must be 'minibatch' or 'epoch_mean', got {group['objective']!r}"
        )
    if group["momentum_style"] not in ("matconvnet", "port"):
        raise ValueError(
            f"momentum_style must be 'matconvnet' or 'port', got {group['momentum_style']!r}"
        )
    if group["fused"] and group["foreach"]:
        raise ValueError("fused=True and foreach=True cannot both be set")
    if group["fused"] and group["momentum_style"] == "port":
        raise ValueError("momentum_style='port' has no fused kernel; leave fused=None")


# ---------------------------------------------------------------------- functional API + kernels
def _fused_supported(params: list[torch.Tensor]) -> bool:
    # DTensor (FSDP2) has no sharding rule for _fused_sgd_; its foreach ops are supported.
    return all(
        p.device.type in ("cpu", "cuda", "mps", "xpu") and p.dtype.is_floating_point
        and type(p).__name__ != "DTensor"
        for p in params
    )


def _default_fused(params: list[torch.Tensor], momentum_style: MomentumStyle) -> bool:
    # Under torch.compile the foreach kernel is chosen: _fused_sgd_ with a tensor lr has no fake
    # kernel, and inductor fuses the foreach ops into one loop anyway. The port's placement of
    # the step size has no fused form.
    # CUDA's _fused_sgd_ reads lr in float32, which would round the step of a float64 model.
    return (
        momentum_style == "matconvnet"
        and _fused_supported(params)
        and not torch.compiler.is_compiling()
        and not any(p.is_cuda and p.dtype == torch.float64 for p in params)
    )


def bpgrad(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    eta: torch.Tensor,
    grad_norm: torch.Tensor,
    ok: torch.Tensor,
    rescale: torch.Tensor,
    weight_decay: float,
    momentum: float,
    momentum_style: MomentumStyle = "matconvnet",
    grad_scale: torch.Tensor | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
    idle_buffers: list[torch.Tensor] | None = None,
) -> None:
    r"""Functional BPGrad update of one parameter group (the step size is already computed).

    With :math:`S` the AMP gradient scale (1 without AMP), :math:`n` = ``grad_norm`` and
    :math:`d = (g/S + \lambda p)/n` the paper's direction:

    * ``"matconvnet"`` style, :math:`\beta = \mu\beta + d,\ p \mathrel{-}= \eta\beta`. The
      buffer is stored as :math:`b = n\,\beta` (times the norm of its latest step), which
      turns the update into ``b = rescale*b; b = mu*b + (g/S + wd*p); p -= (eta/n)*b`` with
      ``rescale = n_t / n_{t-1}``: exactly ``torch._fused_sgd_`` after one multiplication, with the
      gradients left untouched. ``idle_buffers`` (parameters without a gradient this step) are
      only rescaled, so their :math:`\beta` stays as it was, as in ``torch.optim.SGD``.
    * ``"port"`` style, :math:`\beta = \mu\beta + \eta d,\ p \mathrel{-}= \beta`, stored as is.

    (:math:`\beta = -v` of the paper's notation.) When ``ok`` is false nothing is changed.
    ``momentum_buffers`` is empty when ``momentum == 0``. ``foreach``/``fused`` as in
    ``torch.optim``; ``None`` picks fused for the matconvnet style on cpu/cuda/mps/xpu,
    else foreach.
    """
    idle = idle_buffers or []
    if fused is None and foreach is None:
        fused = _default_fused(params, momentum_style)
        foreach = not fused
    if fused:
        if momentum_style != "matconvnet" or not _fused_supported(params):
            raise BPGradError("the fused BPGrad kernel needs momentum_style='matconvnet' and "
                              "floating-point params on cpu/cuda/mps/xpu; pass fused=False")
        kernel = _fused_bpgrad
    elif foreach:
        kernel = _foreach_bpgrad
    else:
        kernel = _single_tensor_bpgrad
    if momentum_style == "matconvnet" and idle:
        torch._foreach_mul_(idle, rescale.to(idle[0].device))
    if params:
        kernel(params, grads, momentum_buffers, eta=eta, grad_norm=grad_norm, ok=ok,
               rescale=rescale, weight_decay=weight_decay, momentum=momentum,
               momentum_style=momentum_style, grad_scale=grad_scale)


class _Coefficients:
    """The per-step scalars of one group, masked by ``ok`` so that a skipped step is a no-op."""

    def __init__(self, eta: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor,
                 rescale: torch.Tensor, momentum: float, grad_scale: torch.Tensor | None) -> None:
        zero = torch.zeros_like(grad_norm)
        one = torch.ones_like(grad_norm)
        inv_scale = one if grad_scale is None else 1.0 / grad_scale.to(grad_norm)
        self.ok = ok
        self.grad = torch.where(ok, inv_scale, zero)  # g -> g/S
        self.step = torch.where(ok, eta / grad_norm, zero)  # matconvnet: p -= (eta/n) b
        self.eta = torch.where(ok, eta, zero)
        self.inv_norm = torch.where(ok, 1.0 / grad_norm, zero)
        self.decay_momentum = torch.where(ok, torch.full_like(grad_norm, momentum) * rescale, one)
        self.momentum = torch.where(ok, torch.full_like(grad_norm, momentum), one)

    def on(self, device: torch.device, dtype: torch.dtype) -> _Coefficients:
        # Attributes listed explicitly: torch.compile (2.11) cannot trace vars(self).items().
        out = object.__new__(_Coefficients)
        out.ok = self.ok.to(device)
        out.grad = self.grad.to(device, dtype)
        out.step = self.step.to(device, dtype)
        out.eta = self.eta.to(device, dtype)
        out.inv_norm = self.inv_norm.to(device, dtype)
        out.decay_momentum = self.decay_momentum.to(device, dtype)
        out.momentum = self.momentum.to(device, dtype)
        return out


def _single_tensor_bpgrad(
    params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], *,
    eta: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor, rescale: torch.Tensor,
    weight_decay: float, momentum: float, momentum_style: MomentumStyle,
    grad_scale: torch.Tensor | None,
) -> None:
    coefs = _Coefficients(eta, grad_norm, ok, rescale, momentum, grad_scale)
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        c = coefs.on(p.device, p.dtype)
        u = g.to(p.dtype) * c.grad  # g/S, or 0 on a skipped step
        if weight_decay != 0.0:
            u.add_(p, alpha=weight_decay)
        u = torch.where(c.ok, u, 0.0)  # a non-finite gradient must not leak into the state
        if momentum_style == "port":
            d = u * c.inv_norm
            if momentum == 0.0:
                p.addcmul_(d, -c.eta)
                continue
            bufs[i].mul_(c.momentum).addcmul_(d, c.eta)
            p.addcmul_(bufs[i], -c.ok.to(p.dtype))
        elif momentum == 0.0:
            p.addcmul_(u, -c.step)
        else:
            bufs[i].mul_(c.decay_momentum).add_(u)
            p.addcmul_(bufs[i], -c.step)


def _device_groups(
    *lists: list[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], ...]]:
    out: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], ...]] = {}
    for i, p in enumerate(lists[0]):
        bucket = out.setdefault((p.device, p.dtype), tuple([] for _ in lists))
        for j, lst in enumerate(lists):
            if lst:
                bucket[j].append(lst[i])
    return out


def _foreach_bpgrad(
    params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], *,
    eta: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor, rescale: torch.Tensor,
    weight_decay: float, momentum: float, momentum_style: MomentumStyle,
    grad_scale: torch.Tensor | None,
) -> None:
    coefs = _Coefficients(eta, grad_norm, ok, rescale, momentum, grad_scale)
    for (device, dtype), (ps, gs, bs) in _device_groups(params, grads, bufs).items():
        c = coefs.on(device, dtype)
        u = torch._foreach_mul([g if g.dtype == dtype else g.to(dtype) for g in gs], c.grad)
        if weight_decay != 0.0:
            torch._foreach_add_(u, ps, alpha=weight_decay)
        # There is no foreach `where`: one masked copy per tensor keeps a non-finite gradient
        # out of the state on a skipped step (multiplying by 0 would turn inf into NaN).
        u = tuple(torch.where(c.ok, t, 0.0) for t in u)
        if momentum_style == "port":
            torch._foreach_mul_(u, c.inv_norm)
            if momentum == 0.0:
                torch._foreach_add_(ps, torch._foreach_mul(u, -c.eta))
                continue
            torch._foreach_mul_(bs, c.momentum)
            torch._foreach_add_(bs, torch._foreach_mul(u, c.eta))
            torch._foreach_add_(ps, torch._foreach_mul(bs, -c.ok.to(dtype)))
        elif momentum == 0.0:
            torch._foreach_add_(ps, torch._foreach_mul(u, -c.step))
        else:
            torch._foreach_mul_(bs, c.decay_momentum)
            torch._foreach_add_(bs, u)
            torch._foreach_add_(ps, torch._foreach_mul(bs, -c.step))


def _fused_bpgrad(
    params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], *,
    eta: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor, rescale: torch.Tensor,
    weight_decay: float, momentum: float, momentum_style: MomentumStyle,
    grad_scale: torch.Tensor | None,
) -> None:
    # torch._fused_sgd_ computes, in one pass, u = g/grad_scale + wd*p; buf = momentum*buf + u;
    # p -= lr*buf, and does nothing when found_inf != 0. With the buffer stored times the norm,
    # that is BPGrad with lr = eta/n after the buffer has been moved to this step's norm.
    del momentum_style  # always "matconvnet" here (checked by the dispatcher)
    skip = (~ok).to(torch.float32)
    lr = torch.where(ok, eta / grad_norm, 0.0)
    for (device, _), (ps, gs, bs) in _device_groups(params, grads, bufs).items():
        if momentum != 0.0:
            torch._foreach_mul_(bs, rescale.to(device, bs[0].dtype))
        torch._fused_sgd_(
            ps, gs, bs if momentum != 0.0 else [], weight_decay=weight_decay, momentum=momentum,
            # CUDA's kernel reads lr as float32 (the CPU one in the params' dtype).
            lr=lr.to(device, torch.float32 if device.type == "cuda" else lr.dtype), dampening=0.0, nesterov=False, maximize=False, is_first_step=False,
            grad_scale=None if grad_scale is None else grad_scale.to(device, torch.float32),
            found_inf=skip.to(device),
        )
