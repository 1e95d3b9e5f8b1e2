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
    "unwrap_bpgrad",
]

#: What the logging helpers export by default: the step size, the gradient norm, the running
#: minimum of the objective, the loss BPGrad saw, and how many steps it skipped.
DEFAULT_METRICS: tuple[str, ...] = ("eta", "grad_norm", "running_min", "loss", "skipped_steps")

# Attribute names under which wrappers keep the optimizer they wrap:
# accelerate.AcceleratedOptimizer.optimizer, lightning's LightningOptimizer._optimizer.
_WRAPPED_ATTRS = ("optimizer", "_optimizer")


def find_bpgrad(optimizer: Any) -> BPGrad | None:
    """Return the :class:`~bpgrad.BPGrad` that ``optimizer`` is or wraps, else ``None``.

    Follows the wrappers of Accelerate (``AcceleratedOptimizer``), Lightning
    (``LightningOptimizer``) and the HF Trainer (which holds an ``AcceleratedOptimizer``).
    """
    seen: set[int] = set()
    current = optimizer
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # Unwrap first: LightningOptimizer subclasses the optimizer's class (so it passes an
        # isinstance check) but holds copies of its attributes, not the optimizer itself.
        attrs = vars(current) if hasattr(current, "__dict__") else {}
        inner = next((attrs[a] for a in _WRAPPED_ATTRS if attrs.get(a) is not None), None)
        if inner is not None:
            current = inner
        elif isinstance(current, BPGrad):
            return current
        else:
            return None
    return None


def unwrap_bpgrad(optimizer: Any) -> BPGrad:
    """Like :func:`find_bpgrad` but raise ``TypeError`` when there is no BPGrad inside."""
    found = find_bpgrad(optimizer)
    if found is None:
        raise TypeError(
            f"expected a bpgrad.BPGrad or a wrapper around one (AcceleratedOptimizer, "
            f"LightningOptimizer), got {type(optimizer).__name__}"
        )
    return found


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
