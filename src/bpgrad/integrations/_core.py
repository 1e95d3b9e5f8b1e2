"""Framework-free glue: find BPGrad inside wrappers, hand it the loss, export its statistics.

Nothing here imports a training framework; the framework modules build on these pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from bpgrad.optim import BPGrad

__all__ = [
    "DEFAULT_METRICS",
    "LossHook",
    "bpgrad_metrics",
    "find_bpgrad",
    "log_tensorboard",
    "set_loss",
    "unwrap_bpgrad",
]

#: What the logging helpers export by default: the step size, the gradient norm, the running
#: minimum of the objective, the loss BPGrad saw, and how many steps it skipped.
DEFAULT_METRICS: tuple[str, ...] = ("eta", "grad_norm", "running_min", "loss", "skipped_steps")

# Attribute names under which wrappers keep the optimizer they wrap, tried in this order:
# accelerate.AcceleratedOptimizer.optimizer and pytorch_optimizer.Lookahead.optimizer;
# Lightning's LightningOptimizer._optimizer and Fabric's _FabricOptimizer._optimizer;
# torch.distributed.optim.ZeroRedundancyOptimizer.optim; SAM-style .base_optimizer and timm's
# Lookahead._base_optimizer.
_WRAPPED_ATTRS = ("optimizer", "_optimizer", "optim", "base_optimizer", "_base_optimizer")


def _looks_like_optimizer(obj: Any) -> bool:
    # A class (ZeRO keeps its optimizer_class too) or a plain value is not something to follow.
    return obj is not None and not isinstance(obj, type) and callable(getattr(obj, "step", None))


def _unwrap_chain(optimizer: Any) -> list[Any]:
    """``optimizer``, the object it wraps, the object that one wraps, ... (innermost last)."""
    chain: list[Any] = [optimizer]  # also None: callers ask about a Trainer's optimizer early
    seen: set[int] = {id(optimizer)}
    current = optimizer
    while current is not None:
        # Look at the instance's own attributes, not isinstance: LightningOptimizer and Fabric's
        # wrapper subclass the wrapped optimizer's class (so they pass an isinstance check) but
        # are not the optimizer that keeps the state.
        attrs = vars(current) if hasattr(current, "__dict__") else {}
        current = next((attrs[a] for a in _WRAPPED_ATTRS if _looks_like_optimizer(attrs.get(a))),
                       None)
        if current is None or id(current) in seen:
            break
        seen.add(id(current))
        chain.append(current)
    return chain


def find_bpgrad(optimizer: Any) -> BPGrad | None:
    """Return the :class:`~bpgrad.BPGrad` that ``optimizer`` is or wraps, else ``None``.

    Follows the wrappers of Accelerate (``AcceleratedOptimizer``, also inside the HF Trainer),
    Lightning (``LightningOptimizer``), Lightning Fabric (``setup``'s optimizer),
    ``torch.distributed.optim.ZeroRedundancyOptimizer`` (its ``optim``) and Lookahead- or
    SAM-style wrappers that keep the optimizer in ``.optimizer``, ``.base_optimizer`` or
    ``._base_optimizer``; any depth of nesting.
    """
    innermost = _unwrap_chain(optimizer)[-1]
    return innermost if isinstance(innermost, BPGrad) else None


def _check_supported(chain: list[Any]) -> None:
    for wrapper in chain:
        if getattr(wrapper, "pullback_momentum", None) == "pullback":
            # pytorch_optimizer.Lookahead interpolates the momentum buffers of its optimizer.
            raise NotImplementedError(
                f"{type(wrapper).__name__}(pullback_momentum=\"pullback\") interpolates BPGrad's "
                f"momentum buffers, which BPGrad stores multiplied by the gradient norm of their "
                f"latest step, so buffers of different scales would be mixed. Use "
                f"pullback_momentum=\"none\" (the default) or \"reset\"."
            )
        if type(wrapper).__name__ == "ZeroRedundancyOptimizer":
            inner = getattr(wrapper, "optim", None)
            groups = getattr(inner, "param_groups", None) or [{}]
            world = int(getattr(wrapper, "world_size", 1))
            if world > 1 and groups[0].get("shard_group", True) is False:
                raise NotImplementedError(
                    f"BPGrad inside a ZeroRedundancyOptimizer over {world} ranks was built with "
                    f"shard_group=False: each rank's BPGrad holds a shard of the parameters and "
                    f"would normalise it by the shard's own gradient norm. Leave shard_group at "
                    f"its default (BPGrad then sums the norm over ZeRO's process group)."
                )


def unwrap_bpgrad(optimizer: Any) -> BPGrad:
    """Like :func:`find_bpgrad` but raise ``TypeError`` when there is no BPGrad inside.

    Raises:
        TypeError: nothing in the chain of wrappers is a BPGrad.
        NotImplementedError: a ``ZeroRedundancyOptimizer`` over more than one rank (BPGrad
            would see only its shard's gradient norm), or a Lookahead with
            ``pullback_momentum="pullback"`` (it mixes BPGrad's norm-scaled momentum buffers).
    """
    chain = _unwrap_chain(optimizer)
    if not isinstance(chain[-1], BPGrad):
        path = " -> ".join(type(obj).__name__ for obj in chain)
        raise TypeError(
            f"expected a bpgrad.BPGrad or a wrapper around one, found no BPGrad in {path}. "
            f"Wrappers are followed through their .optimizer, ._optimizer, .optim, "
            f".base_optimizer and ._base_optimizer attributes (Accelerate, HF Trainer, "
            f"Lightning, Fabric, ZeroRedundancyOptimizer, Lookahead); pass the optimizer your "
            f"trainer steps, built as bpgrad.BPGrad(...)."
        )
    _check_supported(chain)
    return chain[-1]


def set_loss(optimizer: Any, loss: torch.Tensor | float) -> None:
    """Give the loss of the coming step to the BPGrad that ``optimizer`` is or wraps.

    :meth:`BPGrad.set_loss` for optimizers you only hold through a wrapper: Accelerate's
    ``AcceleratedOptimizer`` (and so the HF Trainer's ``trainer.optimizer``), Lightning's
    ``LightningOptimizer`` (``self.optimizers()``), Fabric's ``fabric.setup`` result,
    ``torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=BPGrad)`` and Lookahead- or
    SAM-style wrappers. Those wrappers' ``step`` takes no ``loss=`` and they have no
    ``set_loss`` of their own; after this call their bare ``step()`` reaches BPGrad with the loss.

    Pass the loss exactly as it went into ``backward`` but unscaled (not multiplied by an AMP
    ``GradScaler``). With gradient accumulation use a :class:`LossHook` instead, which sums the
    micro-batch losses of the step.

    Example::

        fabric_opt.zero_grad()
        loss = criterion(model(x), y)
        fabric.backward(loss)
        bpgrad.set_loss(fabric_opt, loss)
        fabric_opt.step()

    Raises:
        TypeError: there is no BPGrad inside ``optimizer``.
        NotImplementedError: a wrapper BPGrad cannot work in: a ``ZeroRedundancyOptimizer``
            over several ranks, a Lookahead with ``pullback_momentum="pullback"``.
    """
    unwrap_bpgrad(optimizer).set_loss(loss)


def _clipping_effects(optimizer: BPGrad) -> list[str]:
    """Why clipping the gradient's norm changes this BPGrad's step (empty: it does not).

    BPGrad moves along ``(g + wd * p) / (||g|| + eps)``: scaling ``g`` by a clipping factor
    cancels out unless weight decay or ``eps`` is non-zero, or the Lipschitz estimate (the
    running maximum of ``||g||`` under ``lipschitz="auto"``) sees the clipped norm.
    """
    reasons = []
    groups = optimizer.param_groups
    if any(isinstance(g["lipschitz"], str) for g in groups):
        reasons.append('lipschitz="auto" estimates L from the clipped gradient norm')
    if any(float(g.get("weight_decay", 0.0)) > 0 for g in groups):
        reasons.append("weight_decay > 0: the decay term is divided by the clipped norm")
    if any(float(g.get("eps", 0.0)) > 0 for g in groups):
        reasons.append("eps > 0 is added to the clipped norm")
    return reasons


class LossHook:
    """Collect the loss of every micro-batch of an optimizer step and hand it to BPGrad.

    Call :meth:`add` with the loss *exactly as it goes into* ``backward`` (already divided by
    the number of accumulation steps, if your loop divides) but *unscaled* (not multiplied by an
    AMP ``GradScaler``). The hook sums these detached values on the device. Since the
    accumulated gradient is the gradient of that same sum, BPGrad gets the loss that matches its
    gradient: with ``N`` equal micro-batches each divided by ``N``, the mean of the micro-batch
    losses, i.e. the loss of the effective batch.

    The hook registers a step pre-hook on the optimizer, so it works however ``step`` is called:

    * a bare ``step()`` (HF Trainer, Accelerate, ``GradScaler.step``, Lightning under
      ``16-mixed``): the sum is passed with :meth:`BPGrad.set_loss`;
    * ``step(closure)`` (Lightning in fp32/bf16, whose closure runs the forward and backward of
      the last micro-batch inside ``step``): the closure is wrapped so that it returns the sum
      once it has run;
    * ``step(loss=...)``: an explicit loss wins; the sum is discarded.

    Every step consumes the sum (also a step that BPGrad skips), so a loss never leaks into the
    next step. If nothing was added since the last step, the hook does nothing and BPGrad falls
    back to its own loss plumbing (``set_loss``/``closure``/``loss=``). Adding costs one device
    addition; nothing is read on the host.

    Example (plain loop with gradient accumulation and AMP)::

        hook = LossHook(opt)
        for i, (x, y) in enumerate(loader):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = criterion(model(x), y) / accum
            scaler.scale(loss).backward()
            hook.add(loss)                 # unscaled, divided like the gradient
            if (i + 1) % accum == 0:
                scaler.step(opt)           # BPGrad gets the mean micro-batch loss
                scaler.update()
                opt.zero_grad()
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer: BPGrad = unwrap_bpgrad(optimizer)
        self._total: torch.Tensor | None = None
        self._count = 0
        self._handle: Any = self.optimizer.register_step_pre_hook(self._pre_step)

    # ------------------------------------------------------------------ accumulation
    def add(self, loss: torch.Tensor | float, weight: float | torch.Tensor = 1.0) -> None:
        """Add ``weight * loss`` (detached) to the loss of the coming step.

        ``weight`` may be a 0-dim tensor (e.g. ``1 / scaler_scale``), which keeps the
        operation on the device.
        """
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"LossHook.add needs a scalar loss, got shape {tuple(loss.shape)}"
                )
            value = loss.detach().reshape(())
            if not value.is_floating_point() or value.dtype in (torch.float16, torch.bfloat16):
                value = value.to(torch.float32)
        else:
            value = torch.tensor(float(loss), dtype=torch.float32)
        if isinstance(weight, torch.Tensor):
            value = value * weight.detach().to(device=value.device)
        elif weight != 1.0:
            value = value * weight
        self._total = value if self._total is None else self._total + value.to(self._total)
        self._count += 1

    def wrap_loss_fn(
        self, loss_fn: Callable[..., torch.Tensor], weight: float | torch.Tensor = 1.0,
    ) -> Callable[..., torch.Tensor]:
        """``loss_fn`` that also :meth:`add`\\ s ``weight * loss`` for each loss it returns.

        For trainers that take a loss function and run ``backward`` themselves (Ignite's
        ``create_supervised_trainer``): ``weight`` is what the trainer multiplies the loss by
        before ``backward`` (``1 / gradient_accumulation_steps`` there). The returned loss is
        ``loss_fn``'s, untouched.
        """

        def loss_fn_feeding_bpgrad(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = loss_fn(*args, **kwargs)
            self.add(loss, weight)
            return loss

        return loss_fn_feeding_bpgrad

    @property
    def pending(self) -> torch.Tensor | None:
        """The sum added since the last step (a 0-dim tensor), or ``None`` if nothing was added."""
        return self._total

    @property
    def count(self) -> int:
        """How many losses were added since the last step."""
        return self._count

    def take(self) -> torch.Tensor | None:
        """Return the pending sum and clear it."""
        total, self._total, self._count = self._total, None, 0
        return total

    def clear(self) -> None:
        """Forget the pending sum (e.g. after an aborted accumulation window)."""
        self._total, self._count = None, 0

    def remove(self) -> None:
        """Unregister the step pre-hook; the optimizer behaves as if the hook never existed."""
        self._handle.remove()
        self.clear()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The pending sum, for checkpoints taken in the middle of an accumulation window."""
        return {"total": self._total, "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        total = state.get("total")
        self._total = total.detach().clone() if isinstance(total, torch.Tensor) else None
        self._count = int(state.get("count", 0))

    # ------------------------------------------------------------------ the step pre-hook
    def _pre_step(
        self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        # ``args`` holds ``self`` (the optimizer) first, as torch passes it to step pre-hooks.
        if kwargs.get("loss") is not None:
            self.clear()
            return None
        if kwargs.get("closure") is not None:
            closure = kwargs["closure"]
            new_kwargs = {**kwargs, "closure": self._wrap(closure)}
            return args, new_kwargs
        if len(args) > 1 and args[1] is not None:
            return (args[0], self._wrap(args[1]), *args[2:]), kwargs
        total = self.take()
        if total is not None:
            optimizer.set_loss(total)
        return None

    def _wrap(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        def closure_with_accumulated_loss() -> Any:
            out = closure()
            total = self.take()
            return out if total is None else total

        return closure_with_accumulated_loss


def bpgrad_metrics(
    optimizer: Any, *, prefix: str = "bpgrad/", keys: Iterable[str] = DEFAULT_METRICS,
) -> dict[str, torch.Tensor]:
    """BPGrad's statistics of the last step as ``{prefix + name: 0-dim tensor}``; no host sync.

    ``optimizer`` may be a wrapper (see :func:`find_bpgrad`). With several parameter groups the
    per-group step sizes are added as ``eta_group{i}``. Before the first step the dict is empty.
    Converting the values to Python numbers is what syncs; loggers do that when they write.
    """
    stats = unwrap_bpgrad(optimizer).stats
    out = {f"{prefix}{key}": stats[key] for key in keys if key in stats}
    if "eta" in keys and "eta_groups" in stats and stats["eta_groups"].numel() > 1:
        for i, eta in enumerate(stats["eta_groups"].unbind()):
            out[f"{prefix}eta_group{i}"] = eta
    return out


def log_tensorboard(
    writer: Any, optimizer: Any, step: int, *, prefix: str = "bpgrad/",
    keys: Iterable[str] = DEFAULT_METRICS,
) -> None:
    """Write :func:`bpgrad_metrics` to a TensorBoard ``SummaryWriter`` at ``step``.

    ``add_scalar`` reads each value on the host (that is the one sync, as for any scalar you log).
    """
    for name, value in bpgrad_metrics(optimizer, prefix=prefix, keys=keys).items():
        writer.add_scalar(name, value, global_step=step)
