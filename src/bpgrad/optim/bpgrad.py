r"""BPGrad (Zhang, Wu, Wang, CVPR 2018) as a ``torch.optim.Optimizer``.

The update, per step :math:`t` (the official MatConvNet code's rule)::

    f_t   = loss passed to step (mean over ranks under torch.distributed) - loss_lower_bound
    F_t   = f_t                                   objective="minibatch"  (default)
          = mean of f since start_epoch()         objective="epoch_mean" (the official code)
    m_t   = min(m_{t-1}, F_t)                     m_0 = +inf, never reset
    n_t   = ||concat of all raw gradients||_2 + eps      one norm over every group
    eta_t = lr * (F_t - rho * m_t) / lipschitz           per group
    d     = (grad + weight_decay * p) / n_t              per parameter
    matconvnet style: v = momentum v - d;      p = p + eta_t v
    port style:       v = momentum v - eta_t d; p = p + v

Three layers as in ``torch.optim``: the class validates and keeps state, :func:`bpgrad` dispatches,
private kernels (loop / foreach / fused) update flat tensor lists with keyword-only scalars. Every
per-step scalar (loss, norm, running min, step size) stays a 0-dim tensor on the parameters'
device: ``step`` never reads a tensor's value on the host unless ``strict=True``.

Momentum buffers are stored in ``torch.optim.SGD``'s sign convention,
``state["momentum_buffer"] = -v``, so the fused path can reuse ``torch._fused_sgd_``.
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
_GLOBAL_OPTIONS = ("objective", "loss_lower_bound", "distributed_loss", "eps", "strict")

# Keys of the optimizer-wide state, kept in the state of the first parameter so that one
# ``state_dict()`` (keyed by parameter index, as FSDP/DCP tools expect) restores everything.
_GLOBAL_STATE_KEYS = ("step", "skipped_steps", "running_min", "epoch_loss_sum", "epoch_loss_count")


class BPGradError(RuntimeError):
    """A BPGrad step could not be carried out (raised in ``strict`` mode, or for bad input)."""


class MissingLossError(BPGradError):
    """``step()`` was called without any way to know the loss value."""


def _host_readable(t: torch.Tensor) -> bool:
    # A CPU tensor's value can be read without synchronising with any device; under
    # torch.compile a Python branch on it would break the graph, so it is not read there.
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _scalar(value: float | torch.Tensor, *, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return torch.tensor(value, device=like.device, dtype=like.dtype)


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
            official CIFAR-10 code uses 50. Per group.
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
        foreach, fused: kernel choice as in ``torch.optim`` (``None`` picks: fused where
            ``torch._fused_sgd_`` supports the device, else foreach). Per group.
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
    ``eta_groups``, ``grad_norm``, ``objective``, ``running_min``, ``steps`` and
    ``skipped_steps``; reading them costs nothing until you convert them to Python numbers.

    Bad input: a non-finite loss or gradient, or a zero gradient norm, skips the step (no
    parameter or state change except ``skipped_steps``). A negative loss is a usage error: it
    raises ``ValueError`` at once when the loss lives on the CPU (free to check) and, on an
    accelerator, is skipped and counted (``strict=True`` raises there too).

    Note:
        The fused kernel (``torch._fused_sgd_``) divides the gradients in place: after a fused
        step ``p.grad`` holds the normalised direction ``d`` that was applied. Use
        ``foreach=True`` if your loop reads gradients after ``step``.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lipschitz: float | torch.Tensor = 50.0,
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
    ) -> None:
        defaults = dict(
            lipschitz=lipschitz, rho=rho, momentum=momentum, weight_decay=weight_decay, lr=lr,
            momentum_style=momentum_style, foreach=foreach, fused=fused, objective=objective,
            loss_lower_bound=loss_lower_bound, distributed_loss=distributed_loss, eps=eps,
            strict=strict,
        )
        _validate_group(defaults)
        self._pending_loss: torch.Tensor | float | None = None
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
        self.__dict__.setdefault("_pending_loss", None)
        self.__dict__.setdefault("_last", {})

    # ------------------------------------------------------------------ loss plumbing
    def set_loss(self, loss: torch.Tensor | float) -> None:
        """Give the loss for the next ``step()``; for trainers that call ``step()`` bare.

        The value is consumed by the next step (so a stale loss is never reused) and is taken
        detached: BPGrad needs the value, not the graph.
        """
        self._pending_loss = loss.detach() if isinstance(loss, torch.Tensor) else loss

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
        if "running_min" not in state:
            device, dtype = anchor.device, self._scalar_dtype()
            for key in _GLOBAL_STATE_KEYS:
                start = math.inf if key == "running_min" else 0.0
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
        bufs: list[torch.Tensor],
    ) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise BPGradError("BPGrad does not support sparse gradients; use dense ones")
            buf = None
            if group["momentum"] != 0.0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["momentum_buffer"] = buf
            if torch.is_complex(p):
                # The norm of the real view equals the complex norm and the update is linear,
                # so complex parameters are updated through their real views.
                params.append(torch.view_as_real(p))
                grads.append(torch.view_as_real(p.grad))
                if buf is not None:
                    bufs.append(torch.view_as_real(buf))
            else:
                params.append(p)
                grads.append(p.grad)
                if buf is not None:
                    bufs.append(buf)

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], torch.Tensor | float] | None = None,
        *,
        loss: torch.Tensor | float | None = None,
    ) -> torch.Tensor | float | None:
        """Take one BPGrad step.

        Args:
            closure: re-evaluates the model, calls ``backward`` and returns the loss.
            loss: the loss of the current minibatch (after you called ``backward``).

        Returns the loss that was used (the closure's return value, or ``loss``).

        Raises:
            MissingLossError: no closure, no ``loss=`` and no ``set_loss`` since the last step.
            ValueError: both a closure and ``loss=`` given, or a non-scalar loss.
        """
        if closure is not None and loss is not None:
            raise ValueError("pass either a closure or loss=, not both")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        elif loss is None:
            loss = self._pending_loss
        self._pending_loss = None
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
        gstate = self._global_state()
        like = gstate["running_min"]
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"BPGrad needs a scalar loss, got shape {tuple(loss.shape)}; reduce it "
                    "(e.g. .mean()) before passing it"
                )
            f = loss.detach().reshape(()).to(device=like.device, dtype=like.dtype)
        else:
            f = torch.tensor(float(loss), device=like.device, dtype=like.dtype)
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
        all_grads: list[torch.Tensor] = []
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._collect_group(group, params, grads, bufs)
            params_per_group.append(params)
            grads_per_group.append(grads)
            bufs_per_group.append(bufs)
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

        etas = []
        for group, params, grads, bufs in zip(self.param_groups, params_per_group,
                                              grads_per_group, bufs_per_group, strict=True):
            eta = _scalar(group["lr"], like=like) * (objective - group["rho"] * running_min)
            eta = eta / _scalar(group["lipschitz"], like=like)
            etas.append(eta)
            if not params:
                continue
            bpgrad(
                params, grads, bufs, eta=eta, grad_norm=norm, ok=ok, grad_scale=grad_scale,
                weight_decay=group["weight_decay"], momentum=group["momentum"],
                momentum_style=group["momentum_style"], foreach=group["foreach"],
                fused=group["fused"],
            )
        # Updated in place: torch.compile replays in-place dict mutations reliably, while a
        # rebinding of an optimizer attribute inside a compiled step is not reflected outside.
        self._last.update(
            eta=etas[0], eta_groups=torch.stack(etas), grad_norm=norm, objective=objective, loss=f,
        )


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

    lipschitz = number("lipschitz")
    if not math.isnan(lipschitz) and not (lipschitz > 0 and math.isfinite(lipschitz)):
        raise ValueError(f"lipschitz must be a finite number > 0, got {group['lipschitz']!r}")
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


# ---------------------------------------------------------------------- functional API + kernels
def _fused_supported(params: list[torch.Tensor]) -> bool:
    return all(
        p.device.type in ("cpu", "cuda", "mps", "xpu") and p.dtype.is_floating_point for p in params
    )


def _default_fused(params: list[torch.Tensor]) -> bool:
    # torch._fused_sgd_ takes its gradient scale in float32, which would round the norm of a
    # float64 model; float64 users get the exact foreach kernel by default. Under torch.compile
    # the foreach kernel is chosen too: _fused_sgd_ with a tensor lr has no fake kernel, and
    # inductor fuses the foreach ops into one loop anyway.
    return (
        _fused_supported(params)
        and all(p.dtype != torch.float64 for p in params)
        and not torch.compiler.is_compiling()
    )


def bpgrad(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    *,
    eta: torch.Tensor,
    grad_norm: torch.Tensor,
    ok: torch.Tensor,
    weight_decay: float,
    momentum: float,
    momentum_style: MomentumStyle = "matconvnet",
    grad_scale: torch.Tensor | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    r"""Functional BPGrad update of one parameter group (the step size is already computed).

    With :math:`S` the AMP gradient scale (1 without AMP) and :math:`n` = ``grad_norm``::

        d = (grad / S + weight_decay * p) / n
        matconvnet: buf = momentum * buf + d;       p -= eta * buf
        port:       buf = momentum * buf + eta * d; p -= buf

    (``buf = -v`` of the paper's notation). When ``ok`` is false nothing is changed.
    ``momentum_buffers`` is empty when ``momentum == 0``. ``foreach``/``fused`` as in
    ``torch.optim``; ``None`` picks fused where supported (float16/bfloat16/float32 on
    cpu/cuda/mps/xpu), else foreach.
    """
    if fused is None and foreach is None:
        fused = _default_fused(params)
        foreach = not fused
    if fused:
        if not _fused_supported(params):
            raise BPGradError("the fused BPGrad kernel needs floating-point params on "
                              "cpu/cuda/mps/xpu; pass fused=False")
        kernel = _fused_bpgrad
    elif foreach:
        kernel = _foreach_bpgrad
    else:
        kernel = _single_tensor_bpgrad
    kernel(params, grads, momentum_buffers, eta=eta, grad_norm=grad_norm, ok=ok,
           weight_decay=weight_decay, momentum=momentum, momentum_style=momentum_style,
           grad_scale=grad_scale)


def _coefficients(
    eta: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor, weight_decay: float,
    momentum: float, grad_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # All masked by ``ok`` so that a skipped step multiplies the buffer by 1 and moves nothing.
    scale = grad_norm if grad_scale is None else grad_norm * grad_scale.to(grad_norm)
    grad_coef = torch.where(ok, 1.0 / scale, 0.0)
    decay_coef = torch.where(ok, weight_decay / grad_norm, 0.0)
    # Python scalars in torch.where would be materialised in float32: build them in the norm's dtype.
    mom = torch.where(ok, torch.full_like(grad_norm, momentum), 1.0)
    eta_ok = torch.where(ok, eta, 0.0)
    return grad_coef, decay_coef, mom, eta_ok


def _single_tensor_bpgrad(
    params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], *,
    eta: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor, weight_decay: float,
    momentum: float, momentum_style: MomentumStyle, grad_scale: torch.Tensor | None,
) -> None:
    grad_coef, decay_coef, mom, eta_ok = _coefficients(
        eta, grad_norm, ok, weight_decay, momentum, grad_scale)
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        gc, dc, m, e, okd = (t.to(p.device) for t in (grad_coef, decay_coef, mom, eta_ok, ok))
        d = g * gc.to(g.dtype)
        if weight_decay != 0.0:
            d.addcmul_(p, dc.to(p.dtype))
        d = torch.where(okd, d, 0.0)  # a non-finite gradient must not leak into the state
        if momentum == 0.0:
            p.addcmul_(d, -e.to(p.dtype))
            continue
        buf = bufs[i]
        buf.mul_(m.to(buf.dtype))
        if momentum_style == "port":
            buf.addcmul_(d, e.to(buf.dtype))
            p.sub_(buf * okd.to(p.dtype))
        else:
            buf.add_(d)
            p.addcmul_(buf, -e.to(p.dtype))


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
    eta: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor, weight_decay: float,
    momentum: float, momentum_style: MomentumStyle, grad_scale: torch.Tensor | None,
) -> None:
    coefs = _coefficients(eta, grad_norm, ok, weight_decay, momentum, grad_scale)
    for (device, dtype), (ps, gs, bs) in _device_groups(params, grads, bufs).items():
        grad_coef, decay_coef, mom, eta_ok = (c.to(device=device, dtype=dtype) for c in coefs)
        okd = ok.to(device)
        d = torch._foreach_mul([g if g.dtype == dtype else g.to(dtype) for g in gs], grad_coef)
        if weight_decay != 0.0:
            torch._foreach_add_(d, torch._foreach_mul(ps, decay_coef))
        # No foreach `where`: one masked copy per tensor keeps a non-finite gradient out of the
        # state on skipped steps (a multiplication by 0 would turn inf into NaN).
        d = tuple(torch.where(okd, t, 0.0) for t in d)
        if momentum == 0.0:
            torch._foreach_add_(ps, torch._foreach_mul(d, -eta_ok))
            continue
        torch._foreach_mul_(bs, mom)
        if momentum_style == "port":
            torch._foreach_add_(bs, torch._foreach_mul(d, eta_ok))
            torch._foreach_add_(ps, torch._foreach_mul(bs, -okd.to(dtype)))
        else:
            torch._foreach_add_(bs, d)
            torch._foreach_add_(ps, torch._foreach_mul(bs, -eta_ok))


def _fused_bpgrad(
    params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], *,
    eta: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor, weight_decay: float,
    momentum: float, momentum_style: MomentumStyle, grad_scale: torch.Tensor | None,
) -> None:
    # torch._fused_sgd_ computes buf = momentum*buf + grad/grad_scale; p -= lr*buf in one pass
    # and skips everything when found_inf != 0. BPGrad's direction (g/S + wd p)/n is that with
    # grad_scale = S*n once wd*S*p has been added to the gradient.
    skip = (~ok).to(torch.float32)
    for (device, dtype), (ps, gs, bs) in _device_groups(params, grads, bufs).items():
        if weight_decay != 0.0:
            if grad_scale is None:
                torch._foreach_add_(gs, ps, alpha=weight_decay)
            else:
                torch._foreach_add_(gs, torch._foreach_mul(ps, grad_scale.to(device, dtype)
                                                          * weight_decay))
        denom = grad_norm if grad_scale is None else grad_norm * grad_scale.to(grad_norm)
        if momentum_style == "port" and momentum != 0.0:
            # buf = mu*buf + eta*d; p -= buf  ==  fused with grad_scale = S*n/eta and lr = 1.
            denom = denom / eta
            lr = torch.ones((), device=device, dtype=eta.dtype)
        else:
            lr = eta.to(device)
        torch._fused_sgd_(
            ps, gs, bs if momentum != 0.0 else [], weight_decay=0.0, momentum=momentum, lr=lr,
            dampening=0.0, nesterov=False, maximize=False, is_first_step=False,
            grad_scale=denom.to(device=device, dtype=torch.float32),
            found_inf=skip.to(device),
        )
