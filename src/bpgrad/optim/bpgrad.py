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
private kernels (loop / foreach / fused) update flat tensor lists with keyword-only scalars. The
per-step scalars (loss, norm, running min, auto-L, step sizes) come from one rule written once in
:mod:`bpgrad.optim._scalars`. On an accelerator they stay 0-dim tensors on the device (one
compiled kernel on CUDA) and ``step`` never reads a tensor's value on the host unless
``strict=True``. When every value already lives in CPU memory the rule runs on Python floats (a
CPU value costs no synchronisation to read), and the fused step is ``_foreach_norm``, ``stack`` and
``_fused_sgd_``: five dispatched operations per step where torch's fused SGD has three.

Momentum buffers follow ``torch.optim.SGD``'s sign convention (``beta = -v``). For the matconvnet
style the buffer is stored multiplied by the gradient norm of its latest step,
``state["momentum_buffer"] = n * beta`` with ``n`` in the optimizer-wide ``buffer_scale`` entry:
that makes the update exactly ``torch._fused_sgd_`` after one rescaling multiplication, so the fused
kernel runs in one pass and never touches ``p.grad``. Use :meth:`BPGrad.momentum_direction` to read
``beta`` itself.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.optim import Optimizer

from bpgrad.optim import _scalars
from bpgrad.optim.distributed import _world_size, reduce_loss, squared_norm

__all__ = ["BPGrad", "BPGradError", "MissingLossError", "bpgrad"]

Objective = Literal["minibatch", "epoch_mean"]
MomentumStyle = Literal["matconvnet", "port"]

# Optimizer-wide options: they must agree across parameter groups because the quantities they
# shape (the objective value, its running min, the gradient norm) are global, not per group.
_GLOBAL_OPTIONS = (
    "objective", "loss_lower_bound", "distributed_loss", "eps", "strict", "auto_warmup",
    "auto_warmup_decay", "auto_max_step", "maximize", "shard_group",
)

# Keys of the optimizer-wide state, kept in the state of the first parameter so that one
# ``state_dict()`` (keyed by parameter index, as FSDP/DCP tools expect) restores everything.
_GLOBAL_STATE_KEYS = _scalars.STATE_KEYS


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
            device, as :math:`\hat L_t = \max(\max_{\tau \le t,\ n_\tau > W_\tau} n_\tau,\ W_t)`:
            the running max of the global gradient norm :math:`n_\tau` (the smallest L consistent
            with the observed gradients) over the steps where it exceeds the warm-up floor
            :math:`W_t = W_0 \gamma^t`, :math:`W_0 = F_0 / (\varepsilon (1 + \|x_0\|))`, which
            bounds the first step to :math:`(1-\rho)\,\varepsilon (1 + \|x_0\|)`; slopes of the
            initial transient, while the floor decides, are not remembered. One estimate shared by
            all auto groups, identical on every DDP rank, kept in ``state_dict``; see
            docs/lipschitz.md.
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
        shard_group: this optimizer holds only a shard of the model's parameters, the rest being
            held by the other ranks of a process group, as inside
            ``torch.distributed.optim.ZeroRedundancyOptimizer``: ``True`` (the default group) or
            a process group. The squared gradient norm (and :math:`\|x_0\|` for ``"auto"``) is
            then summed over the group with one scalar all-reduce, so every rank steps with the
            norm of the whole model's gradient. ``None`` (default): detect the enclosing
            ``ZeroRedundancyOptimizer`` and use its group, else the parameters are the whole
            model (DDP replicas, one process; DTensor shards are handled anyway). ``False``: never.
        foreach, fused: kernel choice as in ``torch.optim`` (``None`` picks the fused kernel,
            ``torch._fused_sgd_``, for the matconvnet style on cpu/cuda/mps/xpu, else foreach;
            under ``torch.compile`` foreach, which inductor fuses). Per group.
        maximize: ascend instead of descend, as in ``torch.optim``: the gradients are those of
            an objective :math:`J` to maximise and the value passed as the loss is :math:`J`
            itself. BPGrad then works on :math:`f = -J - f_{lb}` (``loss_lower_bound`` is a lower
            bound of :math:`-J`, i.e. minus an upper bound of :math:`J`; the default 0 fits a
            log-likelihood of discrete data), so the pruned ball and the target
            :math:`\rho\, m_t` are those of :math:`-J`. Optimizer-wide.
        auto_warmup: :math:`\varepsilon \ge 0` of the ``"auto"`` warm-up floor (0 disables it).
        auto_warmup_decay: :math:`\gamma \in [0, 1)`, per-step decay of the warm-up floor.
        auto_max_step: :math:`\kappa \ge 0`, the ``"auto"`` step-length cap: the estimate is at
            least :math:`F_t / (\kappa (1 + \|x_0\|))`, so that
            :math:`\eta_t \le \kappa (1 + \|x_0\|)` (0 disables it).
        strict: check every step on the host and raise :class:`BPGradError` for a non-finite or
            negative loss, a non-finite gradient or a zero gradient norm. Costs one host sync per
            step; by default such steps are skipped on the device and counted instead.

    Validation: every numeric option, given as a number or a 0-dim tensor, is checked at
    construction and in :meth:`add_param_group` (NaN and infinities included) and a rejected group
    leaves the optimizer exactly as it was. A tensor's value is read once there (one device
    synchronisation), never in ``step``: ``lr`` and ``lipschitz`` stay tensors (a scheduler may
    change them in place, unchecked), every other tensor option is stored as a Python number.

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
        shard_group: bool | Any | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        maximize: bool = False,
        strict: bool = False,
        auto_warmup: float = 1e-3,
        auto_warmup_decay: float = 0.95,
        auto_max_step: float = 1e-2,
    ) -> None:
        defaults = dict(
            lipschitz=lipschitz, rho=rho, momentum=momentum, weight_decay=weight_decay, lr=lr,
            momentum_style=momentum_style, foreach=foreach, fused=fused, maximize=maximize,
            objective=objective, loss_lower_bound=loss_lower_bound,
            distributed_loss=distributed_loss, shard_group=shard_group, eps=eps, strict=strict,
            auto_warmup=auto_warmup,
            auto_warmup_decay=auto_warmup_decay, auto_max_step=auto_max_step,
        )
        defaults.update(_validate_group(defaults))
        if shard_group is None:
            defaults["shard_group"] = _enclosing_zero_group()
        # A dict, mutated in place: torch.compile traces dict mutations inside a compiled step,
        # while rebinding an optimizer attribute there fails on some torch versions.
        self._pending: dict[str, torch.Tensor | float] = {}
        self._last: dict[str, Any] = {}
        self._hyper_cache: dict[tuple[float, torch.device, torch.dtype], torch.Tensor] = {}
        self._host_views: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
        self._warned_set_loss_twice = False
        self._checked_closure = False
        super().__init__(params, defaults)
        _warn_scaled_step(lr, lipschitz)

    # ------------------------------------------------------------------ configuration
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating it; a rejected group leaves the optimizer unchanged.

        Per-group options are checked like the constructor's (numbers and 0-dim tensors alike,
        NaN refused; a tensor's value is read once, here); optimizer-wide options must match
        group 0. Everything is checked before the group is appended.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"a parameter group must be a dict, got {type(param_group).__name__}")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        normalised = _validate_group(merged)
        merged.update(normalised)
        if self.param_groups:
            first = self.param_groups[0]
            for key in _GLOBAL_OPTIONS:
                if not _same_option(merged[key], first[key]):
                    raise ValueError(
                        f"BPGrad option {key!r} is optimizer-wide (it shapes the global objective "
                        f"or gradient norm) and cannot differ between parameter groups: got "
                        f"{merged[key]!r}, group 0 has {first[key]!r}"
                    )
        param_group.update(normalised)
        super().add_param_group(param_group)  # raises (duplicates, bad params) before appending

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_pending", {})
        self.__dict__.setdefault("_last", {})
        self.__dict__.setdefault("_hyper_cache", {})
        self.__dict__.setdefault("_host_views", {})
        self.__dict__.setdefault("_warned_set_loss_twice", False)
        self.__dict__.setdefault("_checked_closure", False)
        _fill_group_defaults(self.param_groups, self.defaults)

    # ------------------------------------------------------------------ loss plumbing
    def set_loss(self, loss: torch.Tensor | float) -> None:
        """Give the loss for the next ``step()``; for trainers that call ``step()`` bare.

        The value is consumed by the next step (so a stale loss is never reused) and is taken
        detached: BPGrad needs the value, not the graph.
        """
        if "loss" in self._pending and not self.__dict__.get("_warned_set_loss_twice", False):
            self._warned_set_loss_twice = True
            warnings.warn(
                "BPGrad.set_loss was called again before step(): the new loss replaces the "
                "previous one, so under gradient accumulation BPGrad sees only the last "
                "micro-batch's loss while the gradient is their sum. Add every micro-batch's "
                "loss to a bpgrad.integrations.LossHook (hook.add(loss)), or pass the summed "
                "loss once (set_loss / step(loss=...)). This warning is shown once.",
                UserWarning, stacklevel=2)
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
        """0-dim tensors describing the last step (see the class docstring); no host sync.

        On CPU the step computes its scalars as Python numbers; they become tensors here, when
        read, so a step that nobody inspects pays nothing for them.
        """
        state = self.state.get(self._anchor(), {})
        like = state.get("running_min")
        out: dict[str, torch.Tensor] = {}
        for key, value in self._last.items():
            if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                out[key] = torch.stack(value)  # per-group values, stacked when read
            elif isinstance(value, torch.Tensor) or like is None:
                out[key] = value
            else:
                out[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
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
        # A number where a tensor belongs (a hand-made or foreign state dict, e.g. "step": 3)
        # becomes a 0-dim tensor, as torch's own optimizers do on load.
        for key in _GLOBAL_STATE_KEYS:
            value = state.get(key)
            if not isinstance(value, torch.Tensor):
                if value is None:
                    value = {"running_min": math.inf, "buffer_scale": 1.0}.get(key, 0.0)
                state[key] = torch.full((), float(value), device=anchor.device,
                                        dtype=self._scalar_dtype())
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
    ) -> _Facts:
        """Gather the group's tensors in one pass and note what the kernels would check each.

        Complex parameters are updated through their real views: the norm of the real view
        equals the complex norm and the update is linear.
        """
        with_momentum = group["momentum"] != 0.0
        state = self.state
        facts = _Facts()
        first: torch.Tensor | None = None
        first_dtype: torch.dtype | None = None
        for p in group["params"]:
            g = p.grad
            # One lookup: hashing a tensor runs Python code.
            p_state = state.get(p) if with_momentum else None
            buf = p_state.get("momentum_buffer") if p_state else None
            if g is None:
                if buf is not None:
                    idle_bufs.append(torch.view_as_real(buf) if buf.is_complex() else buf)
                continue
            if g.is_sparse:
                raise BPGradError("BPGrad does not support sparse gradients; use dense ones")
            if with_momentum and buf is None:
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[p]["momentum_buffer"] = buf
            if p.is_complex():
                p, g = torch.view_as_real(p), torch.view_as_real(g)
                buf = None if buf is None else torch.view_as_real(buf)
            params.append(p)
            grads.append(g)
            if buf is not None:
                bufs.append(buf)
            # One dtype and device for all (the kernels then need no bucketing), every tensor
            # contiguous (no layout for _fused_sgd_ to get wrong), plain CPU tensors (the
            # scalar rule may read them on the host). Each check is a cheap attribute read.
            dtype = p.dtype
            if first is None:
                first, first_dtype = p, dtype
                facts.plain_cpu = p.is_cpu and dtype.is_floating_point
            elif facts.uniform and (dtype is not first_dtype or p.is_cpu != first.is_cpu or (
                    not first.is_cpu and p.device != first.device)):
                facts.uniform = False
            if facts.uniform and g.dtype is not dtype:
                facts.uniform = False
            if facts.dense and not (p.is_contiguous() and g.is_contiguous()
                                    and (buf is None or buf.is_contiguous())):
                facts.dense = False
            if facts.plain_cpu and not (type(g) is torch.Tensor and g.is_cpu):
                facts.plain_cpu = False  # a sharded DTensor gradient, or another device
        return facts

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
            if not self.__dict__.get("_checked_closure", False):
                self._checked_closure = True
                _warn_lightning_accumulation(closure)
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
                "opt.set_loss(loss) before a trainer's bare opt.step(). Through a wrapper "
                "(Accelerate, Fabric, Lightning, ZeroRedundancyOptimizer, Lookahead, Ignite) "
                "call bpgrad.set_loss(optimizer, loss); with gradient accumulation use "
                "bpgrad.integrations.LossHook; in Lightning add "
                "bpgrad.integrations.BPGradCallback, in HF Trainer use "
                "bpgrad.integrations.BPGradTrainer (docs/integrations/index.md)."
            )
        with torch.no_grad():
            self._update(loss)
        return loss

    def _update(self, loss: torch.Tensor | float) -> None:
        first = self.param_groups[0]
        fresh = "param_norm_init" not in self.state.get(self._anchor(), {})
        gstate = self._global_state()
        like = gstate["running_min"]
        if fresh:
            # ||x_0|| for the auto-L warm-up floor, read once (on the device) at the first step.
            # Integer tensors (buffers some models register as parameters) have no norm here.
            every = [p for group in self.param_groups for p in group["params"]
                     if p.is_floating_point() or p.is_complex()]
            squares = squared_norm(
                [torch.view_as_real(p.detach()) if torch.is_complex(p) else p.detach()
                 for p in every], like.device, like.dtype)
            group = _shard_group(first)
            gstate["param_norm_init"].copy_(
                (squares if group is None else _sum_over(squares, group)).sqrt())
        if isinstance(loss, torch.Tensor) and loss.numel() != 1:
            raise ValueError(
                f"BPGrad needs a scalar loss, got shape {tuple(loss.shape)}; reduce it "
                "(e.g. .mean()) before passing it"
            )
        groups = []
        facts = []
        all_grads: list[torch.Tensor] = []
        for group in self.param_groups:
            lists: tuple[list[torch.Tensor], ...] = ([], [], [], [])
            facts.append(self._collect_group(group, *lists))
            groups.append(lists)
            all_grads.extend(lists[1])
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        cfg = _scalars.RuleConfig(
            eps=float(first["eps"]), loss_lower_bound=float(first["loss_lower_bound"]),
            maximize=bool(first["maximize"]),
            epoch_mean=first["objective"] == "epoch_mean",
            auto=any(isinstance(g["lipschitz"], str) for g in self.param_groups),
            auto_warmup=float(first["auto_warmup"]),
            auto_warmup_decay=float(first["auto_warmup_decay"]),
            auto_max_step=float(first["auto_max_step"]))
        if self._host_path(like, loss, facts, grad_scale, found_inf):
            out = self._host_scalars(cfg, loss, all_grads, gstate, grad_scale, found_inf)
        else:
            out = self._device_scalars(cfg, loss, all_grads, gstate, grad_scale, found_inf)
        if out.ok is False:  # known on the host: nothing to update
            return
        for group, (params, grads, bufs, idle), fact, eta, step in zip(
            self.param_groups, groups, facts, out.etas, out.steps, strict=True,
        ):
            if not params and not idle:
                continue
            bpgrad(
                params, grads, bufs, eta=eta, grad_norm=out.norm, ok=out.ok,
                rescale=out.rescale, grad_scale=grad_scale, weight_decay=group["weight_decay"],
                momentum=group["momentum"], momentum_style=group["momentum_style"],
                foreach=group["foreach"], fused=group["fused"], idle_buffers=idle,
                maximize=group["maximize"], _step=step, _skip=out.skip, _facts=fact,
            )

    @staticmethod
    def _host_path(like: torch.Tensor, loss: torch.Tensor | float, facts: list[_Facts],
                   *amp: torch.Tensor | None) -> bool:
        # Every value the scalar rule reads lives in CPU memory, so it is read directly (no device
        # to wait for) and the rule runs on Python floats. Sharded (DTensor) gradients need a
        # collective for their norm and take the tensor path.
        if not _host_readable(like):
            return False
        if isinstance(loss, torch.Tensor) and loss.device.type != "cpu":
            return False
        if any(t is not None and t.device.type != "cpu" for t in amp):
            return False
        return all(f.plain_cpu for f in facts)

    def _host_scalars(
        self, cfg: _scalars.RuleConfig, loss: torch.Tensor | float, grads: list[torch.Tensor],
        gstate: dict[str, torch.Tensor], grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
    ) -> _scalars.RuleOutput[Any]:
        first = self.param_groups[0]
        like = gstate["running_min"]
        setting = first["distributed_loss"]
        if setting is not False and _world_size(None if setting is True else setting) > 1:
            f = _read(reduce_loss(_scalar(loss, like=like), setting))
        else:
            # tolist() reads a CPU value without a dispatched operation (and, unlike float(),
            # without a warning for a tensor that requires grad).
            f = _read(loss) if isinstance(loss, torch.Tensor) else float(loss)
        _check_loss_sign(f, cfg)
        inf_found = found_inf is not None and _read(found_inf) != 0.0
        state = {key: _read(gstate[key]) for key in _scalars.STATE_KEYS}
        squared = _host_squared_norm(grads, like.dtype)
        if grad_scale is not None and not math.isfinite(squared):
            # Scaled gradients (GradScaler) can be finite while their squares overflow float32:
            # norm them again in float64 (4x slower on the CPU, so only when needed).
            squared = _host_squared_norm(grads, torch.float64)
        group = _shard_group(first)
        if group is not None:
            squared = _read(_sum_over(torch.tensor(squared, dtype=torch.float64), group))
        out = _scalars.scalar_rule(
            _scalars.FloatMath, cfg, loss=f, squared_norm=squared,
            state=state, lrs=[_host_value(g["lr"]) for g in self.param_groups],
            lipschitzes=[None if isinstance(g["lipschitz"], str) else _host_value(g["lipschitz"])
                         for g in self.param_groups],
            rhos=[g["rho"] for g in self.param_groups],
            grad_scale=None if grad_scale is None else _read(grad_scale),
            found_inf=None if found_inf is None else float(inf_found))
        if first["strict"] and not out.ok and not inf_found:  # GradScaler's skip is normal
            raise _strict_refusal(out.loss, out.norm)
        for key, value in out.state.items():
            if value != state[key] or math.isnan(value) != math.isnan(state[key]):
                self._host_view(key, gstate[key])[()] = value
        self._last.clear()
        self._last.update(
            eta=out.etas[0], eta_groups=out.etas, grad_norm=out.norm, objective=out.objective,
            loss=out.loss, lipschitz=out.lipschitzes[0], lipschitz_groups=out.lipschitzes)
        return out

    def _host_view(self, key: str, tensor: torch.Tensor) -> np.ndarray:
        # A NumPy view of a 0-dim CPU state tensor, kept while the tensor is the same object
        # (a loaded state dict brings new ones): a write through it dispatches no operation.
        cached = self._host_views.get(key)
        if cached is None or cached[0] is not tensor:
            cached = self._host_views[key] = (tensor, tensor.numpy())
        return cached[1]

    def _device_scalars(
        self, cfg: _scalars.RuleConfig, loss: torch.Tensor | float, grads: list[torch.Tensor],
        gstate: dict[str, torch.Tensor], grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
    ) -> _scalars.RuleOutput[Any]:
        first = self.param_groups[0]
        like = gstate["running_min"]
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().reshape(())
        f = reduce_loss(_scalar(loss, like=like), first["distributed_loss"])
        if _host_readable(f):  # e.g. DTensor parameters on the CPU
            _check_loss_sign(_read(f), cfg)
        group = _shard_group(first)
        if group is not None:  # this rank holds a shard of the model: sum over the group
            norms = [_sum_over(squared_norm(grads, like.device, like.dtype), group).sqrt()]
        elif any(type(g) is not torch.Tensor for g in grads):  # DTensor: needs a collective
            norms = [squared_norm(grads, like.device, like.dtype).sqrt()]
        else:
            # Under AMP the scaled gradients' squares can overflow float32 although the gradients
            # are finite, and nothing may be read here to notice: norm them in float64.
            norms = _grad_norms(grads, like.device,
                                like.dtype if grad_scale is None else torch.float64)
        args = (
            f, norms if norms else [torch.zeros_like(like)],
            [gstate[key] for key in _scalars.STATE_KEYS],
            [self._hyper(g["lr"], like) for g in self.param_groups],
            [self._hyper(1.0 if isinstance(g["lipschitz"], str) else g["lipschitz"], like)
             for g in self.param_groups],
            [g["rho"] for g in self.param_groups],
            [isinstance(g["lipschitz"], str) for g in self.param_groups],
            None if grad_scale is None else grad_scale.to(like.device, like.dtype),
            found_inf,
        )
        if torch.compiler.is_compiling():
            values = _scalars._tensor_step(cfg, *args)  # traced into the caller's graph
        else:
            compile_cuda = like.is_cuda and _COMPILE_CUDA_SCALARS and _has_triton()
            values = _scalars.device_rule(cfg, compile_cuda)(*args)
        n = len(self.param_groups)
        ok, norm, objective, f_used, rescale, skip = values[:6]
        etas, lipschitzes, steps = values[6:6 + n], values[6 + n:6 + 2 * n], values[6 + 2 * n:]
        if (first["strict"] and not torch.compiler.is_compiling() and not bool(ok)
                and not (found_inf is not None and bool(found_inf != 0))):  # AMP's skip is normal
            raise _strict_refusal(float(f_used), float(norm))
        # Updated in place: torch.compile replays in-place dict mutations reliably, while a
        # rebinding of an optimizer attribute inside a compiled step is not reflected outside.
        self._last.update(
            eta=etas[0], eta_groups=etas, grad_norm=norm, objective=objective,
            loss=f_used, lipschitz=lipschitzes[0], lipschitz_groups=lipschitzes)
        return _scalars.RuleOutput(state={}, ok=ok, norm=norm, objective=objective, loss=f_used,
                                   rescale=rescale, skip=skip, etas=etas,
                                   lipschitzes=lipschitzes, steps=steps)

    def _hyper(self, value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # A per-group number as a device tensor, made once per value: a fresh torch.full every
        # step would be one more kernel launch, and a changing Python constant would make the
        # compiled rule recompile.
        if isinstance(value, torch.Tensor):
            return value.reshape(()).to(device=like.device, dtype=like.dtype)
        key = (float(value), like.device, like.dtype)
        cached = self._hyper_cache.get(key)
        if cached is None:
            if len(self._hyper_cache) > 64:
                self._hyper_cache.clear()
            cached = self._hyper_cache[key] = torch.full((), key[0], device=like.device,
                                                         dtype=like.dtype)
        return cached


# Compile the tensor rule for CUDA (one kernel instead of ~40 launches); off switch for debugging.
_COMPILE_CUDA_SCALARS = os.environ.get("BPGRAD_COMPILE_SCALARS", "1") != "0"


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover - very old torch
        return False
    return bool(has_triton())


def _warn_lightning_accumulation(closure: Callable[..., Any]) -> None:
    # Lightning's precision plugins hand the optimizer functools.partial(_wrap_closure, model,
    # optimizer, closure), and that closure returns only the last micro-batch's loss / N while the
    # gradient is the sum of N micro-batches'. BPGradCallback's LossHook wraps the closure
    # before it reaches here, so an unwrapped Lightning closure with N > 1 means the callback is
    # missing. Checked once, at the first closure step.
    func = getattr(closure, "func", None)
    if not getattr(func, "__module__", "").startswith(("lightning", "pytorch_lightning")):
        return
    for arg in getattr(closure, "args", ()):
        trainer = getattr(arg, "_trainer", None)
        if trainer is not None and int(getattr(trainer, "accumulate_grad_batches", 1)) > 1:
            warnings.warn(
                f"BPGrad under Lightning with accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches} but without "
                "bpgrad.integrations.BPGradCallback: Lightning gives BPGrad only the last "
                "micro-batch's loss while the gradient sums all of them, so every step size is "
                "wrong. Add BPGradCallback() to the Trainer's callbacks (or return it from the "
                "LightningModule's configure_callbacks).", UserWarning, stacklevel=4)
            return


def _warn_scaled_step(lr: float | torch.Tensor, lipschitz: Any) -> None:
    # Wrappers that construct optimizers with their own default lr (skorch passes lr=0.01)
    # silently scale every BPGrad step; say so once, at construction.
    if isinstance(lr, torch.Tensor) or isinstance(lipschitz, (str, torch.Tensor)) or lr == 1.0:
        return
    warnings.warn(
        f"BPGrad(lr={lr!r}) with lipschitz={lipschitz!r} multiplies every step by {lr!r}: it is "
        f"the same as lipschitz={lipschitz / lr if lr else math.inf!r} with lr=1. If a wrapper "
        "set lr for you (skorch passes its default lr=0.01: use optimizer__lr=1), pass lr=1 and "
        "choose lipschitz instead. LR schedulers may change lr later without this warning.",
        UserWarning, stacklevel=3)


def _strict_refusal(loss: float, norm: float) -> BPGradError:
    return BPGradError(
        f"BPGrad strict mode: refusing a step with loss={loss:.6g} and gradient norm={norm:.6g} "
        "(need a finite loss >= 0 and a finite, non-zero norm)")


def _check_loss_sign(value: float, cfg: _scalars.RuleConfig) -> None:
    f = (-value if cfg.maximize else value) - cfg.loss_lower_bound
    if math.isfinite(f) and f < 0.0:
        given = "-objective" if cfg.maximize else "loss"
        raise ValueError(
            f"BPGrad assumes a non-negative loss but got {given} - loss_lower_bound = {f:.6g} "
            f"(loss_lower_bound={cfg.loss_lower_bound}). Pass loss_lower_bound=<a known lower "
            f"bound of the {given}> so that BPGrad uses {given} - loss_lower_bound >= 0."
        )


def _enclosing_zero_group() -> Any:
    # ZeroRedundancyOptimizer builds each rank's local optimizer inside its own __init__, over
    # that rank's shard of the parameters and after setting its process group: found there, the
    # group is the one to sum the gradient norm over. False when BPGrad is built elsewhere.
    frame: types.FrameType | None = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "ZeroRedundancyOptimizer":
            return getattr(owner, "process_group", None) or True
        frame = frame.f_back
    return False


def _shard_group(first: dict[str, Any]) -> Any:
    # The process group over which the parameters are sharded, or None (also for one rank).
    setting = first["shard_group"]
    if setting is False or setting is None:
        return None
    group = None if setting is True else setting
    return (group if group is not None else dist.group.WORLD) if _world_size(group) > 1 else None


def _sum_over(value: torch.Tensor, group: Any) -> torch.Tensor:
    out = value.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _read(t: torch.Tensor) -> float:
    # The value of a one-element CPU tensor; tolist() reads it without a dispatched operation.
    if t.dim():
        t = t.reshape(())
    return float(cast(float, t.tolist()))


def _host_value(value: float | torch.Tensor) -> float:
    return _read(value) if isinstance(value, torch.Tensor) else value


def _grad_norms(grads: list[torch.Tensor], device: torch.device,
                dtype: torch.dtype) -> list[torch.Tensor]:
    # One _foreach_norm per (device, dtype) bucket; a single bucket in every ordinary model.
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        buckets.setdefault((g.device, g.dtype), []).append(g)
    norms: list[torch.Tensor] = []
    for (dev, _), bucket in buckets.items():
        part = torch._foreach_norm(bucket, 2, dtype=dtype)
        norms.extend(part if dev == device else [n.to(device) for n in part])
    return norms


def _host_squared_norm(grads: list[torch.Tensor], dtype: torch.dtype) -> float:
    # The per-tensor norms in one stacked tensor, summed in float64 on the host.
    norms = _grad_norms(grads, torch.device("cpu"), dtype)
    return math.fsum(v * v for v in torch.stack(norms).tolist()) if norms else 0.0


def _same_option(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return bool(a == b)


def _fill_group_defaults(groups: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
    # Groups saved before an option existed (checkpoints of older versions) take its default.
    # Only BPGrad's own options: torch's base class adds keys of its own to ``defaults``
    # (``differentiable``) that must not appear in the groups of a loaded state dict.
    for group in groups:
        for key in _OPTION_KEYS:
            if key in defaults:
                group.setdefault(key, defaults[key])


# Numeric options: the test each value must pass and how the message states the requirement.
# NaN fails every test (all are comparisons). lr and lipschitz may stay 0-dim tensors (schedulers
# and users change them on the device); every other option is stored as a Python number.
_NUMERIC_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "lipschitz": (lambda v: 0.0 < v < math.inf, "a finite number > 0 (or 'auto')"),
    "lr": (lambda v: 0.0 <= v < math.inf, "a finite number >= 0"),
    "rho": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "momentum": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "weight_decay": (lambda v: 0.0 <= v < math.inf, "a finite number >= 0"),
    "eps": (lambda v: 0.0 <= v < math.inf, "a finite number >= 0"),
    "loss_lower_bound": (lambda v: -math.inf < v < math.inf, "a finite number"),
    "auto_warmup": (lambda v: 0.0 <= v < math.inf, "a finite number >= 0"),
    "auto_warmup_decay": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "auto_max_step": (lambda v: 0.0 <= v < math.inf, "a finite number >= 0"),
}
_TENSOR_OPTIONS = ("lr", "lipschitz")
_OPTION_KEYS = (
    "lipschitz", "rho", "momentum", "weight_decay", "lr", "momentum_style", "foreach", "fused",
    "maximize", "objective", "loss_lower_bound", "distributed_loss", "shard_group", "eps",
    "strict", "auto_warmup", "auto_warmup_decay", "auto_max_step",
)
_CHOICES: dict[str, tuple[Any, ...]] = {
    "objective": ("minibatch", "epoch_mean"),
    "momentum_style": ("matconvnet", "port"),
    "foreach": (None, True, False),
    "fused": (None, True, False),
    "maximize": (True, False),
    "strict": (True, False),
}


def _validate_group(group: dict[str, Any]) -> dict[str, Any]:
    """Check every option of a group; return the values to store (tensors made numbers).

    Numbers and 0-dim tensors are checked alike. A tensor's value is read once, here (one
    device synchronisation at construction or ``add_param_group``, never in ``step``); ``lr``
    and ``lipschitz`` tensors are kept as tensors, so a later in-place change of their value is
    not checked.
    """
    normalised: dict[str, Any] = {}
    for name, (valid, requirement) in _NUMERIC_RULES.items():
        value = group[name]
        if name == "lipschitz" and isinstance(value, str):
            if value != "auto":
                raise ValueError(f"lipschitz must be a number, a 0-dim tensor or 'auto', got "
                                 f"{value!r}")
            continue
        number = _option_number(name, value)
        if not valid(number):
            raise ValueError(f"{name} must be {requirement}, got {_describe(value)}")
        if isinstance(value, torch.Tensor) and name not in _TENSOR_OPTIONS:
            normalised[name] = number
    for name, choices in _CHOICES.items():
        value = group[name]
        if isinstance(value, torch.Tensor) or not any(
                value is c or (isinstance(c, str) and value == c) for c in choices):
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got "
                             f"{_describe(value)}")
    if group["fused"] and group["foreach"]:
        raise ValueError("fused=True and foreach=True cannot both be set")
    if group["fused"] and group["momentum_style"] == "port":
        raise ValueError("momentum_style='port' has no fused kernel; leave fused=None")
    return normalised


def _option_number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got a tensor of shape "
                             f"{tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a real number, got a {value.dtype} tensor")
        return float(value.detach().reshape(()).cpu())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_describe(value)}")
    return float(value)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return f"tensor({float(value.detach().reshape(()).cpu())!r})"
    return repr(value)


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
    eta: torch.Tensor | float,
    grad_norm: torch.Tensor | float,
    ok: torch.Tensor | bool,
    rescale: torch.Tensor | float,
    weight_decay: float,
    momentum: float,
    momentum_style: MomentumStyle = "matconvnet",
    grad_scale: torch.Tensor | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
    idle_buffers: list[torch.Tensor] | None = None,
    maximize: bool = False,
    _step: torch.Tensor | float | None = None,
    _skip: torch.Tensor | float | None = None,
    _facts: _Facts | None = None,
) -> None:
    r"""Functional BPGrad update of one parameter group (the step size is already computed).

    With :math:`S` the AMP gradient scale (1 without AMP), :math:`n` = ``grad_norm``,
    :math:`\sigma = -1` when ``maximize`` (else 1) and :math:`d = (\sigma g/S + \lambda p)/n`
    the paper's direction:

    * ``"matconvnet"`` style, :math:`\beta = \mu\beta + d,\ p \mathrel{-}= \eta\beta`. The
      buffer is stored as :math:`b = n\,\beta` (times the norm of its latest step), which
      turns the update into ``b = rescale*b; b = mu*b + (g/S + wd*p); p -= (eta/n)*b`` with
      ``rescale = n_t / n_{t-1}``: exactly ``torch._fused_sgd_`` after one multiplication, with the
      gradients left untouched. ``idle_buffers`` (parameters without a gradient this step) are
      only rescaled, so their :math:`\beta` stays as it was, as in ``torch.optim.SGD``.
    * ``"port"`` style, :math:`\beta = \mu\beta + \eta d,\ p \mathrel{-}= \beta`, stored as is.

    (:math:`\beta = -v` of the paper's notation.) The scalars are 0-dim tensors (nothing is read
    on the host; when ``ok`` is false nothing is changed) or, when their values are known on the
    host, Python numbers with ``ok`` a ``bool`` (a skipped step then returns at once, and the
    fused kernel folds ``rescale`` into its momentum argument: no extra pass over the buffers).
    ``momentum_buffers`` is empty when ``momentum == 0``. ``foreach``/``fused`` as in
    ``torch.optim``; ``None`` picks fused for the matconvnet style on cpu/cuda/mps/xpu,
    else foreach.
    """
    if ok is False:
        return
    idle = idle_buffers or []
    facts = _facts or _Facts.of(params, grads, momentum_buffers)
    if fused is None and foreach is None:
        fused = momentum_style == "matconvnet" and (
            (facts.plain_cpu and not torch.compiler.is_compiling())
            or _default_fused(params, momentum_style))
        foreach = not fused
    if fused:
        if momentum_style != "matconvnet" or not (facts.plain_cpu or _fused_supported(params)):
            raise BPGradError("the fused BPGrad kernel needs momentum_style='matconvnet' and "
                              "floating-point params on cpu/cuda/mps/xpu; pass fused=False")
        kernel = _fused_bpgrad
    elif foreach:
        kernel = _foreach_bpgrad
    else:
        kernel = _single_tensor_bpgrad
    coefs = _Coefficients(eta=eta, grad_norm=grad_norm, ok=ok, rescale=rescale, momentum=momentum,
                          grad_scale=grad_scale, maximize=maximize, step=_step, skip=_skip)
    if momentum_style == "matconvnet" and idle:
        torch._foreach_mul_(idle, coefs.get("rescale", idle[0].device, idle[0].dtype))
    if params:
        kernel(params, grads, momentum_buffers, coefs, weight_decay=weight_decay,
               momentum=momentum, momentum_style=momentum_style, grad_scale=grad_scale,
               maximize=maximize, facts=facts)


class _Facts:
    """What the kernels would otherwise check tensor by tensor, gathered in one pass."""

    __slots__ = ("dense", "plain_cpu", "uniform")

    def __init__(self, uniform: bool = True, dense: bool = True, plain_cpu: bool = False) -> None:
        self.uniform = uniform  # one device and dtype for params and grads
        self.dense = dense  # every param, grad and buffer contiguous
        self.plain_cpu = plain_cpu  # plain floating-point CPU tensors (not DTensor)

    @classmethod
    def of(cls, params: list[torch.Tensor], grads: list[torch.Tensor],
           bufs: list[torch.Tensor]) -> _Facts:
        keys = {(t.device, t.dtype) for t in (*params, *grads)}
        return cls(
            uniform=len(keys) <= 1,
            dense=all(t.is_contiguous() for t in (*params, *grads, *bufs)),
            plain_cpu=bool(params) and all(
                type(t) is torch.Tensor and t.is_cpu and t.dtype.is_floating_point
                for t in (*params, *grads)))


class _Coefficients:
    """The per-step scalars of one group, masked by ``ok`` so that a skipped step is a no-op.

    Python numbers when the values are known on the host (``ok`` is then ``True``: a skipped step
    never reaches a kernel), else 0-dim tensors. Each is computed when a kernel first asks for
    it, in the dtype and on the device it asks for, so a kernel pays only for what it reads.
    """

    def __init__(self, *, eta: Any, grad_norm: Any, ok: Any, rescale: Any, momentum: float,
                 grad_scale: torch.Tensor | None, maximize: bool, step: Any, skip: Any) -> None:
        self.host = isinstance(ok, bool)
        self._eta, self._norm, self._ok, self._rescale = eta, grad_norm, ok, rescale
        self._momentum, self._grad_scale = momentum, grad_scale
        self._sign = -1.0 if maximize else 1.0
        self._values: dict[str, Any] = {"ok": ok, "rescale": rescale}
        if step is not None:
            self._values["step"] = step
        if skip is not None:
            self._values["skip"] = skip
        self._converted: dict[tuple[str, torch.device, torch.dtype | None], Any] = {}

    def _compute(self, name: str) -> Any:
        ok, norm, eta = self._ok, self._norm, self._eta
        if self.host:  # ok is True here
            scale = 1.0 if self._grad_scale is None else _read(self._grad_scale.cpu())
            return {
                "grad": self._sign / scale,  # g -> sigma g/S
                "step": eta / norm,  # matconvnet: p -= (eta/n) b
                "eta": eta, "inv_norm": 1.0 / norm, "okf": 1.0, "skip": 0.0,
                "decay_momentum": self._momentum * self._rescale, "momentum": self._momentum,
            }[name]
        okf = ok.to(norm.dtype)
        if name == "grad":
            inv = okf if self._grad_scale is None else okf / self._grad_scale.to(norm)
            return inv * self._sign
        if name == "step":
            return torch.where(ok, eta / norm, 0.0)
        if name == "eta":
            return torch.where(ok, eta, 0.0)
        if name == "inv_norm":
            return torch.where(ok, 1.0 / norm, 0.0)
        if name == "okf":
            return okf
        if name == "skip":
            return 1.0 - okf
        if name == "decay_momentum":
            return torch.where(ok, self._rescale * self._momentum, 1.0)
        if name == "momentum":
            return torch.where(ok, torch.full_like(norm, self._momentum), 1.0)
        raise KeyError(name)

    def get(self, name: str, device: torch.device, dtype: torch.dtype | None = None) -> Any:
        if name not in self._values:
            self._values[name] = self._compute(name)
        value = self._values[name]
        if self.host:
            return value
        key = (name, device, dtype)
        if key not in self._converted:
            self._converted[key] = value.to(device=device, dtype=dtype or value.dtype)
        return self._converted[key]


def _single_tensor_bpgrad(
    params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
    c: _Coefficients, *, weight_decay: float, momentum: float, momentum_style: MomentumStyle,
    grad_scale: torch.Tensor | None, maximize: bool, facts: _Facts | None = None,
) -> None:
    del grad_scale, maximize, facts  # folded into c's "grad" coefficient; no bucketing here
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        dev, dt = p.device, p.dtype
        u = g.to(dt) * c.get("grad", dev, dt)  # sigma g/S, or 0 on a skipped step
        if weight_decay != 0.0:
            u.add_(p, alpha=weight_decay)
        if not c.host:
            u = torch.where(c.get("ok", dev), u, 0.0)  # a non-finite gradient must not leak
        if momentum_style == "port":
            d = u * c.get("inv_norm", dev, dt)
            if momentum == 0.0:
                _sub_scaled_(p, d, c.get("eta", dev, dt))
                continue
            bufs[i].mul_(c.get("momentum", dev, dt)).add_(d * c.get("eta", dev, dt))
            _sub_scaled_(p, bufs[i], c.get("okf", dev, dt))
        elif momentum == 0.0:
            _sub_scaled_(p, u, c.get("step", dev, dt))
        else:
            bufs[i].mul_(c.get("decay_momentum", dev, dt)).add_(u)
            _sub_scaled_(p, bufs[i], c.get("step", dev, dt))


def _sub_scaled_(p: torch.Tensor, x: torch.Tensor, coef: torch.Tensor | float) -> None:
    # p -= coef * x, without a temporary when coef is a host number.
    if isinstance(coef, torch.Tensor):
        p.addcmul_(x, coef, value=-1.0)
    else:
        p.add_(x, alpha=-coef)


def _foreach_sub_scaled_(ps: list[torch.Tensor], xs: Any, coef: torch.Tensor | float) -> None:
    if isinstance(coef, torch.Tensor):
        torch._foreach_sub_(ps, torch._foreach_mul(xs, coef))
    else:
        torch._foreach_add_(ps, xs, alpha=-coef)


def _device_groups(
    *lists: list[torch.Tensor], facts: _Facts | None = None,
) -> dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], ...]]:
    if facts is not None and facts.uniform and lists[0]:
        return {(lists[0][0].device, lists[0][0].dtype): lists}
    out: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], ...]] = {}
    for i, p in enumerate(lists[0]):
        bucket = out.setdefault((p.device, p.dtype), tuple([] for _ in lists))
        for j, lst in enumerate(lists):
            if lst:
                bucket[j].append(lst[i])
    return out


def _foreach_bpgrad(
    params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
    c: _Coefficients, *, weight_decay: float, momentum: float, momentum_style: MomentumStyle,
    grad_scale: torch.Tensor | None, maximize: bool, facts: _Facts | None = None,
) -> None:
    del grad_scale, maximize  # folded into c's "grad" coefficient
    for (dev, dt), (ps, gs, bs) in _device_groups(params, grads, bufs, facts=facts).items():
        u = list(torch._foreach_mul([g if g.dtype == dt else g.to(dt) for g in gs],
                               c.get("grad", dev, dt)))
        if weight_decay != 0.0:
            torch._foreach_add_(u, ps, alpha=weight_decay)
        if not c.host:
            # There is no foreach `where`: one masked copy per tensor keeps a non-finite gradient
            # out of the state on a skipped step (multiplying by 0 would turn inf into NaN).
            u = [torch.where(c.get("ok", dev), t, 0.0) for t in u]
        if momentum_style == "port":
            torch._foreach_mul_(u, c.get("inv_norm", dev, dt))
            if momentum == 0.0:
                _foreach_sub_scaled_(ps, u, c.get("eta", dev, dt))
                continue
            torch._foreach_mul_(bs, c.get("momentum", dev, dt))
            torch._foreach_add_(bs, torch._foreach_mul(u, c.get("eta", dev, dt)))
            _foreach_sub_scaled_(ps, bs, c.get("okf", dev, dt))
        elif momentum == 0.0:
            _foreach_sub_scaled_(ps, u, c.get("step", dev, dt))
        else:
            torch._foreach_mul_(bs, c.get("decay_momentum", dev, dt))
            torch._foreach_add_(bs, u)
            _foreach_sub_scaled_(ps, bs, c.get("step", dev, dt))


def _fused_layout_ok(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None) -> bool:
    # Same strides everywhere and no gaps: dense in the default or a channels-last order.
    if g.stride() != p.stride() or (buf is not None and buf.stride() != p.stride()):
        return False
    return bool(p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(
        memory_format=torch.channels_last)) or (p.dim() == 5 and p.is_contiguous(
            memory_format=torch.channels_last_3d)))


def _fused_bpgrad(
    params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
    c: _Coefficients, *, weight_decay: float, momentum: float, momentum_style: MomentumStyle,
    grad_scale: torch.Tensor | None, maximize: bool, facts: _Facts | None = None,
) -> None:
    # torch._fused_sgd_ computes, in one pass, u = g/grad_scale + wd*p; buf = momentum*buf + u;
    # p -= lr*buf, and does nothing when found_inf != 0. With the buffer stored times the norm,
    # that is BPGrad with lr = eta/n after the buffer has been moved to this step's norm: on the
    # host by passing momentum*rescale as the momentum (no extra pass), on a device by one
    # multiplication of the buffers.
    del momentum_style  # always "matconvnet" here (checked by the dispatcher)
    odd = [] if facts is not None and facts.dense else [
        i for i, (p, g) in enumerate(zip(params, grads, strict=True))
        if not _fused_layout_ok(p, g, bufs[i] if bufs else None)]
    if odd:
        # torch._fused_sgd_ walks parameter, gradient and buffer as one flat range each, which is
        # wrong when their strides differ or a parameter has gaps (a view such as w[:, ::2]):
        # those tensors take the foreach kernel, which honours every layout.
        pick = set(odd)
        _foreach_bpgrad(
            [params[i] for i in odd], [grads[i] for i in odd],
            [bufs[i] for i in odd] if bufs else [], c, weight_decay=weight_decay,
            momentum=momentum, momentum_style="matconvnet", grad_scale=grad_scale,
            maximize=maximize)
        params = [p for i, p in enumerate(params) if i not in pick]
        grads = [g for i, g in enumerate(grads) if i not in pick]
        bufs = [b for i, b in enumerate(bufs) if i not in pick]
    for (dev, dt), (ps, gs, bs) in _device_groups(params, grads, bufs, facts=facts).items():
        scale = None if grad_scale is None else grad_scale.to(dev, torch.float32)
        if c.host:
            torch._fused_sgd_(
                ps, gs, bs if momentum != 0.0 else [], weight_decay=weight_decay,
                momentum=c.get("decay_momentum", dev) if momentum != 0.0 else 0.0,
                lr=c.get("step", dev), dampening=0.0, nesterov=False, maximize=maximize,
                is_first_step=False, grad_scale=scale, found_inf=None)
            continue
        if momentum != 0.0:
            torch._foreach_mul_(bs, c.get("rescale", dev, bs[0].dtype))
        torch._fused_sgd_(
            ps, gs, bs if momentum != 0.0 else [], weight_decay=weight_decay, momentum=momentum,
            # CUDA's kernel reads lr as float32 (the CPU one in the params' dtype).
            lr=c.get("step", dev, torch.float32 if dev.type == "cuda" else dt), dampening=0.0,
            nesterov=False, maximize=maximize, is_first_step=False, grad_scale=scale,
            found_inf=c.get("skip", dev, torch.float32),
        )
