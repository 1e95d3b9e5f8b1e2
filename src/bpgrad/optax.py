r"""BPGrad for JAX: an optax gradient transformation with exactly the rule of :class:`bpgrad.BPGrad`.

Install with ``pip install "bpgrad[jax]"``. Usage, as for ``optax.polyak_sgd``, passes the loss::

    tx = bpgrad.optax.bpgrad(lipschitz="auto")  # or the official lipschitz=50.0, weight_decay=5e-4
    state = tx.init(params)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, value=loss)
    params = optax.apply_updates(params, updates)

The per-step scalars (gradient norm, skip decision, objective and running minimum, the auto-L
estimate, the step size) are not re-implemented here: they come from the same function as in the
PyTorch optimizer, :func:`bpgrad.optim._scalars.scalar_rule`, run on ``jax.numpy`` through
:class:`JaxMath`. This module only adds the per-leaf update and the state pytree.

Everything is traced: the norm is one reduction over the whole pytree (XLA inserts the
collective for sharded ``jax.Array``\ s under ``jit``), a skipped step is a ``jnp.where`` mask, and
nothing is read on the host.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeVar, cast

try:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "bpgrad.optax needs JAX and optax, which are not installed. Install the `jax` extra: "
        "pip install \"bpgrad[jax]\" (or pip install jax optax)."
    ) from exc

from bpgrad.optim import _scalars
from bpgrad.optim.bpgrad import MissingLossError, _check_loss_sign, _validate_group

__all__ = ["BPGradState", "JaxMath", "bpgrad", "start_epoch"]

Objective = Literal["minibatch", "epoch_mean"]
MomentumStyle = Literal["matconvnet", "port"]
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class JaxMath:
    """The arithmetic interface of :mod:`bpgrad.optim._scalars` on ``jax.numpy`` scalars."""

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return jnp.where(cond, a, b)

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        return jnp.minimum(a, b)

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return jnp.maximum(a, b)

    @staticmethod
    def clamp_min(a: Any, low: float) -> Any:
        return jnp.maximum(a, low)

    @staticmethod
    def isfinite(a: Any) -> Any:
        return jnp.isfinite(a)

    @staticmethod
    def sqrt(a: Any) -> Any:
        return jnp.sqrt(a)

    @staticmethod
    def div(a: Any, b: Any) -> Any:
        return a / b  # IEEE: x/0 = +-inf, 0/0 = NaN, as FloatMath.div

    @staticmethod
    def as_float(cond: Any) -> Any:
        return jnp.where(cond, 1.0, 0.0)


class BPGradState(NamedTuple):
    """State of :func:`bpgrad`: plain arrays, a pytree.

    The scalars are float32, or float64 when a parameter is float64 (complex128). ``eta``,
    ``grad_norm``, ``lipschitz`` and ``objective`` describe the last step *taken* (0 before the
    first); a skipped step changes nothing but ``skipped_steps``.
    """

    step_count: jax.Array  # int32: steps taken; what a schedule on ``lr`` is evaluated at
    momentum: Any  # beta = -v (the paper's v negated) per leaf; None when momentum == 0
    steps: jax.Array
    skipped_steps: jax.Array
    running_min: jax.Array  # m_t, +inf before the first step, never reset
    epoch_loss_sum: jax.Array
    epoch_loss_count: jax.Array
    grad_norm_max: jax.Array  # auto L: running max of the eps-free gradient norms above the floor
    lipschitz_floor: jax.Array  # auto L: the warm-up floor W_t
    lipschitz_estimate: jax.Array  # auto L: the estimate used by the last step
    param_norm_init: jax.Array  # ||x_0||, taken by init, for the auto-L warm-up floor
    eta: jax.Array
    grad_norm: jax.Array
    lipschitz: jax.Array
    objective: jax.Array


# The scalar rule's state keys and the fields that hold them. "buffer_scale" is absent: the
# momentum buffer is stored as beta itself, not as n * beta as in the fused torch kernel.
_RULE_FIELDS = {
    "step": "steps", "skipped_steps": "skipped_steps", "running_min": "running_min",
    "epoch_loss_sum": "epoch_loss_sum", "epoch_loss_count": "epoch_loss_count",
    "grad_norm_max": "grad_norm_max", "lipschitz_floor": "lipschitz_floor",
    "lipschitz_estimate": "lipschitz_estimate", "param_norm_init": "param_norm_init",
}
assert set(_RULE_FIELDS) | {"buffer_scale"} == set(_scalars.STATE_KEYS)

# Valid stand-ins used to validate the other options when one arrives traced (under
# optax.inject_hyperparams inside jit its value cannot be read).
_STAND_INS = {"lipschitz": 1.0, "lr": 1.0, "rho": 0.0, "momentum": 0.0, "weight_decay": 0.0,
              "eps": 0.0, "loss_lower_bound": 0.0, "auto_warmup": 0.0, "auto_warmup_decay": 0.0,
              "auto_max_step": 0.0}

T = TypeVar("T")


def bpgrad(
    lipschitz: float | jax.Array | Literal["auto"] = 50.0,
    rho: float | jax.Array = 0.1,
    momentum: float | jax.Array = 0.9,
    weight_decay: float | jax.Array = 0.0,
    *,
    objective: Objective = "minibatch",
    momentum_style: MomentumStyle = "matconvnet",
    eps: float | jax.Array = 0.0,
    loss_lower_bound: float | jax.Array = 0.0,
    auto_warmup: float | jax.Array = 1e-3,
    auto_warmup_decay: float | jax.Array = 0.95,
    auto_max_step: float | jax.Array = 1e-2,
    maximize: bool = False,
    lr: ScalarOrSchedule = 1.0,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""BPGrad (Zhang, Wu, Wang, CVPR 2018) as an optax transformation; pass the loss as ``value``.

    The update, per step :math:`t`, with :math:`f_t` the ``value`` given to ``update`` minus
    ``loss_lower_bound`` and :math:`g_t` the incoming updates (the gradients)::

        F_t   = f_t                                 objective="minibatch"
              = mean of f since start_epoch(state)  objective="epoch_mean" (the official code)
        m_t   = min(m_{t-1}, F_t)                   m_0 = +inf, never reset
        n_t   = ||g_t||_2 + eps                     one norm over the whole pytree
        eta_t = lr_t * (F_t - rho * m_t) / L        L = lipschitz, or the online "auto" estimate
        d     = (g_t + weight_decay * x_t) / n_t
        matconvnet: beta = momentum beta + d;       update = -eta_t beta
        port:       beta = momentum beta + eta_t d; update = -beta

    exactly :class:`bpgrad.BPGrad`'s rule (docs/optimizer.md), with the same defaults and the
    same validation. A step with a non-finite or negative :math:`f_t`, a non-finite gradient or
    a zero gradient norm is skipped: the update is zero and the state is unchanged except
    ``skipped_steps``.

    Args:
        lipschitz: :math:`L`, the Lipschitz constant of the loss (a bound on ``||grad f||``); it
            acts as an inverse learning rate (official CIFAR-10 value: 50). ``"auto"``
            estimates it online as in ``BPGrad`` (docs/lipschitz.md). (default: 50.0)
        rho: :math:`\rho \in [0, 1)`: :math:`\rho\, m_t` estimates the global minimum.
            (default: 0.1)
        momentum: heavy-ball :math:`\mu \in [0, 1)`. (default: 0.9)
        weight_decay: :math:`\lambda \ge 0` in the direction, divided by :math:`n_t` as in the
            official code; needs ``params`` in ``update``. (default: 0.0)
        objective: ``"minibatch"`` or ``"epoch_mean"`` (call :func:`start_epoch` on the state at
            each epoch). (default: ``"minibatch"``)
        momentum_style: ``"matconvnet"`` (step size outside the buffer, the official code) or
            ``"port"`` (inside, the oval-group/dfw port). (default: ``"matconvnet"``)
        eps: added to the gradient norm. (default: 0.0)
        loss_lower_bound: BPGrad uses ``value - loss_lower_bound``, which must be ``>= 0``.
            (default: 0.0)
        auto_warmup: :math:`\varepsilon \ge 0` of the ``"auto"`` warm-up floor. (default: 1e-3)
        auto_warmup_decay: :math:`\gamma \in [0, 1)`, its per-step decay. (default: 0.95)
        auto_max_step: :math:`\kappa \ge 0`, the ``"auto"`` step-length cap
            :math:`\eta_t \le \kappa (1 + \|x_0\|)` (0 disables it). (default: 1e-2)
        maximize: the updates are gradients of an objective :math:`J` to maximise and ``value``
            is :math:`J`; BPGrad works on :math:`f = -J -` ``loss_lower_bound``.
            (default: False)
        lr: multiplies :math:`\eta_t`; a number or a schedule, a function of the number of steps
            taken (``state.step_count``). ``lr = s`` is the same as ``lipschitz = L / s``.
            (default: 1.0)
        accumulator_dtype: dtype of the momentum buffer (default: None, each parameter's dtype,
            as ``torch.optim``).

    Returns:
        An ``optax.GradientTransformationExtraArgs``; ``update(updates, state, params,
        value=loss)``. The state is a :class:`BPGradState`.

    Example::

        >>> import jax, jax.numpy as jnp, optax
        >>> from bpgrad.optax import bpgrad
        >>> tx = bpgrad(lipschitz="auto")
        >>> params = {"w": jnp.ones(3)}
        >>> state = tx.init(params)
        >>> loss, grads = jax.value_and_grad(lambda p: jnp.sum(p["w"] ** 2))(params)
        >>> updates, state = tx.update(grads, state, params, value=loss)
        >>> params = optax.apply_updates(params, updates)

    With ``optax.inject_hyperparams`` every numeric option may be changed through the state;
    ``auto_warmup`` and ``auto_max_step`` with ``lipschitz="auto"`` shape the rule's control
    flow and must be named in ``static_args``. Under ``optax.MultiSteps`` the value passed with
    the k-th micro-batch is the one used: pass the mean loss of the accumulated micro-batches
    there.

    .. warning::
        The step size is :math:`(F_t - \rho m_t)/L`, not a learning rate: an :math:`L` far below
        the true gradient scale, or a ``loss_lower_bound`` far below the loss's real minimum,
        makes the steps too large and training diverges (``lipschitz="auto"`` avoids the
        first). A clip before BPGrad (``optax.chain(optax.clip_by_global_norm(c), ...)``)
        changes nothing when ``weight_decay = eps = 0`` and ``L`` is fixed: the direction is
        normalised anyway.

    References:
        Zhang, Wu, Wang, "BPGrad: Towards Global Optimality in Deep Learning via Branch and
        Pruning", CVPR 2018, arXiv:1711.06959.
    """
    _validate(dict(
        lipschitz=lipschitz, rho=rho, momentum=momentum, weight_decay=weight_decay,
        objective=objective, momentum_style=momentum_style, eps=eps,
        loss_lower_bound=loss_lower_bound, auto_warmup=auto_warmup,
        auto_warmup_decay=auto_warmup_decay, auto_max_step=auto_max_step, maximize=maximize,
        lr=lr))
    auto = isinstance(lipschitz, str)
    lower_bound = _concrete(loss_lower_bound)
    warmup = _concrete(auto_warmup)
    max_step = _concrete(auto_max_step)
    if auto and (_is_traced(warmup) or _is_traced(max_step)):
        raise TypeError(
            "auto_warmup and auto_max_step decide the control flow of lipschitz='auto' and "
            "cannot be traced; under optax.inject_hyperparams name them in "
            "static_args=('auto_warmup', 'auto_max_step')")
    cfg = _scalars.RuleConfig(
        eps=_concrete(eps),
        # A traced lower bound cannot take the rule's Python branch; it is subtracted from the
        # loss before the rule instead (the same floating-point operations).
        loss_lower_bound=0.0 if _is_traced(lower_bound) else lower_bound,
        maximize=maximize, epoch_mean=objective == "epoch_mean", auto=auto,
        auto_warmup=warmup if auto else 0.0, auto_warmup_decay=_concrete(auto_warmup_decay),
        auto_max_step=max_step if auto else 0.0)
    pre_shift = lower_bound if _is_traced(lower_bound) else None
    # Decided by type, not value, so that init and update agree when inject_hyperparams turns a
    # number into an array (concrete at init, traced in a jitted update).
    has_buffer = not (_is_number(momentum) and float(momentum) == 0.0)
    has_decay = not (_is_number(weight_decay) and float(weight_decay) == 0.0)
    port = momentum_style == "port"
    sign = -1.0 if maximize else 1.0

    def init_fn(params: optax.Params) -> BPGradState:
        dtype = _scalar_dtype(params)
        param_norm = jnp.sqrt(_squared_norm(params, dtype))
        # Every scalar is made like ||x_0||, which lives where the parameters do (replicated
        # over their mesh): created apart, on one device, they would give the state a different
        # type after the first update, and jit would compile the step twice. One array per
        # field: a shared one could not be donated (jit(..., donate_argnums=...)).
        def zero() -> jax.Array:
            return jnp.zeros_like(param_norm)

        buffers = None
        if has_buffer:
            buffers = jax.tree_util.tree_map(
                lambda p: jnp.zeros_like(p, dtype=accumulator_dtype or p.dtype), params)
        return BPGradState(
            step_count=jnp.zeros_like(param_norm, dtype=jnp.int32), momentum=buffers,
            steps=zero(), skipped_steps=zero(), running_min=jnp.full_like(param_norm, math.inf),
            epoch_loss_sum=zero(), epoch_loss_count=zero(), grad_norm_max=zero(),
            lipschitz_floor=zero(), lipschitz_estimate=zero(), param_norm_init=param_norm,
            eta=zero(), grad_norm=zero(), lipschitz=zero(), objective=zero())

    def update_fn(
        updates: optax.Updates, state: BPGradState, params: optax.Params | None = None, *,
        value: Any = None, **extra_args: Any,
    ) -> tuple[optax.Updates, BPGradState]:
        del extra_args  # other transformations' arguments (optax.chain passes all of them)
        loss = _checked_loss(value, cfg)
        if has_decay and params is None:
            raise ValueError("BPGrad with weight_decay needs the parameters: "
                             "tx.update(grads, state, params, value=loss)")
        dtype = state.running_min.dtype
        loss = jnp.asarray(loss).astype(dtype)
        if pre_shift is not None:
            loss = loss + pre_shift if maximize else loss - pre_shift
        rule_state = {key: getattr(state, name) for key, name in _RULE_FIELDS.items()}
        rule_state["buffer_scale"] = jnp.ones((), dtype)  # unused: beta is stored unscaled
        out = _scalars.scalar_rule(
            _RULE_MATH, cfg, loss=loss, squared_norm=_squared_norm(updates, dtype),
            state=rule_state, lrs=[lr(state.step_count) if callable(lr) else lr],
            lipschitzes=[None if auto else lipschitz], rhos=[rho])
        ok, norm, eta = out.ok, out.norm.astype(dtype), out.etas[0].astype(dtype)

        leaves, treedef = jax.tree_util.tree_flatten(updates)
        treedef = cast(Any, treedef)  # jax's stubs lack flatten_up_to / unflatten
        ps = treedef.flatten_up_to(params) if has_decay else [None] * len(leaves)
        bs = treedef.flatten_up_to(state.momentum) if has_buffer else [None] * len(leaves)
        # A skipped step masks the direction to 0 (a select, so a NaN/inf gradient cannot
        # leak) and turns every coefficient into an identity: beta' = 1*beta + 0/1 and the
        # update 0*beta'. No select on the buffers themselves, which would cost XLA an extra
        # copy and pass over them: the update fuses into the same loops as optax.sgd's.
        norm_ok = jnp.where(ok, norm, 1.0)
        eta_ok = jnp.where(ok, eta, 0.0)
        mu_ok = jnp.where(ok, momentum, 1.0).astype(dtype) if has_buffer else None
        new_updates, new_buffers = [], []
        for g, p, b in zip(leaves, ps, bs, strict=True):
            ct = jnp.promote_types(g.dtype, dtype)  # bf16 leaves are computed in float32
            u = sign * g.astype(ct)
            if has_decay:
                u = u + weight_decay * p.astype(ct)
            d = jnp.where(ok, u, 0.0) / norm_ok
            if b is None:
                step = -eta_ok * d
            elif port:
                nb = mu_ok * b.astype(ct) + eta_ok * d
                step = -ok.astype(dtype) * nb
            else:
                nb = mu_ok * b.astype(ct) + d
                step = -eta_ok * nb
            new_updates.append(step.astype(g.dtype))
            if b is not None:
                new_buffers.append(nb.astype(b.dtype))

        def keep(new: Any, old: jax.Array) -> jax.Array:
            return jnp.where(ok, new, old).astype(old.dtype)

        new_state = BPGradState(
            step_count=state.step_count + ok.astype(jnp.int32),
            momentum=treedef.unflatten(new_buffers) if has_buffer else None,
            **{name: out.state[key].astype(dtype) for key, name in _RULE_FIELDS.items()},
            eta=keep(eta, state.eta), grad_norm=keep(norm, state.grad_norm),
            lipschitz=keep(out.lipschitzes[0], state.lipschitz),
            objective=keep(out.objective, state.objective))
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def start_epoch(state: T) -> T:
    """Start a new epoch for ``objective="epoch_mean"``: reset the running mean, not the min.

    Works on any optimizer state that contains a :class:`BPGradState` (inside ``optax.chain``,
    ``inject_hyperparams``, ``MultiSteps``...) and returns the new state; jittable.

    Raises:
        ValueError: ``state`` holds no :class:`BPGradState`.
    """
    found = []

    def reset(node: Any) -> Any:
        if not isinstance(node, BPGradState):
            return node
        found.append(True)
        return node._replace(epoch_loss_sum=jnp.zeros_like(node.epoch_loss_sum),
                             epoch_loss_count=jnp.zeros_like(node.epoch_loss_count))

    new = jax.tree_util.tree_map(reset, state, is_leaf=lambda x: isinstance(x, BPGradState))
    if not found:
        raise ValueError("start_epoch needs an optimizer state that contains a BPGradState "
                         "(the state of bpgrad.optax.bpgrad, possibly inside a chain)")
    return new


# scalar_rule is annotated for the two torch-side interfaces; JaxMath has the same methods.
_RULE_MATH: Any = JaxMath


def _checked_loss(value: Any, cfg: _scalars.RuleConfig) -> Any:
    if value is None:
        raise MissingLossError(
            "BPGrad needs the loss value to set its step size: call "
            "tx.update(grads, state, params, value=loss) (see bpgrad.optax.bpgrad)")
    if np.ndim(value) != 0:
        raise ValueError(f"BPGrad needs a scalar loss, got shape {tuple(np.shape(value))}; "
                         "reduce it (e.g. .mean()) before passing it")
    if isinstance(value, numbers.Real | np.ndarray | np.generic):
        # A host value is free to check, as a CPU loss is in torch; an array may live on an
        # accelerator (and is a tracer under jit): a negative one is skipped and counted.
        _check_loss_sign(float(value), cfg)
    return value


def _squared_norm(tree: Any, dtype: Any) -> jax.Array:
    # One sum over every leaf in the scalars' dtype (a bf16 gradient is squared in float32).
    # Under jit, jnp.sum of a sharded array is the global sum: XLA adds the all-reduce.
    total = jnp.zeros((), dtype)
    for leaf in jax.tree_util.tree_leaves(tree):
        x = jnp.asarray(leaf)
        if jnp.iscomplexobj(x):
            total = total + jnp.sum(jnp.square(x.real.astype(dtype)))
            x = x.imag
        total = total + jnp.sum(jnp.square(x.astype(dtype)))
    return total


def _scalar_dtype(params: Any) -> Any:
    # As the torch optimizer: float64 scalars when any parameter is double precision.
    for leaf in jax.tree_util.tree_leaves(params):
        if jnp.asarray(leaf).dtype in (jnp.float64, jnp.complex128):
            return jnp.float64
    return jnp.float32


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _concrete(value: Any) -> Any:
    # A concrete array (inject_hyperparams' init, a user's jnp.array) becomes a float; a traced
    # one stays as it is.
    if _is_traced(value) or isinstance(value, str) or callable(value):
        return value
    return float(value)


def _validate(options: dict[str, Any]) -> None:
    # The torch optimizer's checks and messages, on numbers; traced values cannot be read and a
    # schedule is checked by nobody (as a torch LR scheduler's values are not).
    group: dict[str, Any] = {"foreach": None, "fused": None, "strict": False,
                             "distributed_loss": True}
    for name, value in options.items():
        if name == "lr" and callable(value) and not isinstance(value, jax.Array):
            value = 1.0
        elif isinstance(value, jax.Array | np.ndarray | np.generic):
            if np.ndim(value) != 0:
                raise ValueError(f"{name} must be a number or a 0-dim array, got an array of "
                                 f"shape {tuple(np.shape(value))}")
            if not jnp.issubdtype(value.dtype, jnp.floating) and not jnp.issubdtype(
                    value.dtype, jnp.integer):
                raise ValueError(f"{name} must be a real number, got a {value.dtype} array")
            value = _STAND_INS[name] if _is_traced(value) else float(value)
        group[name] = value
    _validate_group(group)
