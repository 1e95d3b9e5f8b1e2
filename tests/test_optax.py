"""bpgrad.optax: the JAX transformation in lockstep with bpgrad.BPGrad and the reference oracle,
under jit (no recompilation, no host callback), sharded, composed with optax, and on bad input."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

# jax and optax are imported, not importorskip'ed: the `jax` extra is part of the dev install
# (Makefile), and a missing JAX must fail CI rather than skip these tests silently.
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from bpgrad import BPGrad, MissingLossError
from bpgrad.optax import BPGradState, bpgrad, start_epoch
from bpgrad.optim._reference import ReferenceBPGrad

jax.config.update("jax_enable_x64", True)  # the float64 oracle comparisons

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-12
SHAPES = {"w": (4, 3), "b": (5,), "c": (2, 2)}


def _init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def _events(t: int) -> str | None:
    # Awkward steps: a NaN loss, an inf gradient, an all-zero gradient (each skipped), and the
    # start of an epoch for objective="epoch_mean".
    return {3: "nan_loss", 5: "inf_grad", 8: "zero_grad"}.get(t)


def _stream(n: int, seed: int, maximize: bool, shift: float) -> list[tuple[dict, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        g = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
        loss = shift + 0.05 + float(rng.random())
        event = _events(t)
        if event == "nan_loss":
            loss = math.nan
        elif event == "inf_grad":
            g["b"][2] = math.inf
        elif event == "zero_grad":
            g = {k: np.zeros(s) for k, s in SHAPES.items()}
        out.append((g, -loss if maximize else loss))
    return out


VARIANTS: dict[str, dict[str, Any]] = {
    f"{lname}-{style}-{objective}": dict(
        lipschitz=lip, momentum_style=style, objective=objective, rho=0.2, weight_decay=1e-2)
    for lname, lip in (("fixed", 7.0), ("auto", "auto"))
    for style in ("matconvnet", "port")
    for objective in ("minibatch", "epoch_mean")
}
VARIANTS.update({
    "maximize": dict(lipschitz=5.0, maximize=True, weight_decay=1e-3),
    "eps-lower-bound-auto": dict(lipschitz="auto", eps=1e-3, loss_lower_bound=-0.5,
                                 auto_warmup=1e-2, auto_warmup_decay=0.5),
    "no-momentum-matconvnet": dict(lipschitz=3.0, momentum=0.0),
    "no-momentum-port": dict(lipschitz=3.0, momentum=0.0, momentum_style="port"),
    "lr-schedule": dict(lipschitz=4.0, lr="schedule", objective="epoch_mean"),
})
# Powers of two: the same value whatever precision the schedule is evaluated in.
SCHEDULE = optax.exponential_decay(1.0, transition_steps=2, decay_rate=0.5, staircase=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lockstep_with_torch_and_the_oracle(variant: str) -> None:
    kw = dict(VARIANTS[variant])
    scheduled = kw.pop("lr", None) == "schedule"
    rng = np.random.default_rng(0)
    init = _init_params(rng)
    tparams = {k: torch.tensor(v) for k, v in init.items()}
    opt = BPGrad(list(tparams.values()), **kw)
    # The oracle covers everything but maximize and eps.
    with_ref = not kw.get("maximize") and not kw.get("eps")
    rparams = {k: torch.tensor(v) for k, v in init.items()}
    ref = ReferenceBPGrad(
        [{"params": list(rparams.values()), "lipschitz": kw.get("lipschitz", 50.0),
          "rho": kw.get("rho", 0.1), "momentum": kw.get("momentum", 0.9),
          "weight_decay": kw.get("weight_decay", 0.0),
          "momentum_style": kw.get("momentum_style", "matconvnet")}],
        objective=kw.get("objective", "minibatch"),
        loss_lower_bound=kw.get("loss_lower_bound", 0.0),
        auto_warmup=kw.get("auto_warmup", 1e-3),
        auto_warmup_decay=kw.get("auto_warmup_decay", 0.95))
    tx = bpgrad(**kw, lr=SCHEDULE if scheduled else 1.0)
    params = {k: jnp.asarray(v) for k, v in init.items()}
    state = tx.init(params)
    step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    skipped = 0
    # With a lower bound of -0.5 the losses go down to -0.45: negative, yet valid.
    shift = kw.get("loss_lower_bound", 0.0)
    for t, (g, loss) in enumerate(_stream(12, 1, bool(kw.get("maximize")), shift)):
        if t in (4, 9):
            opt.start_epoch()
            ref.start_epoch()
            state = start_epoch(state)
        if scheduled:  # torch: a scheduler sets lr from the number of steps taken
            lr = float(SCHEDULE(int(state.step_count)))
            opt.param_groups[0]["lr"] = lr
            ref.param_groups[0]["lr"] = lr
        for k in SHAPES:
            tparams[k].grad = torch.tensor(g[k])
            rparams[k].grad = torch.tensor(g[k])
        opt.step(loss=loss)
        if with_ref:
            ref.step(loss)
        updates, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, params, loss)
        params = optax.apply_updates(params, updates)
        # With eps > 0 a zero gradient has the norm eps and is a step like any other.
        skipped += _events(t) is not None and not (_events(t) == "zero_grad" and kw.get("eps"))
        for k in SHAPES:
            got = np.asarray(params[k])
            np.testing.assert_allclose(got, tparams[k].numpy(), rtol=0, atol=TOL, err_msg=k)
            if with_ref:
                np.testing.assert_allclose(got, rparams[k].numpy(), rtol=0, atol=TOL)
            if kw.get("momentum", 0.9) != 0.0:
                beta = opt.momentum_direction(tparams[k])
                assert beta is not None
                np.testing.assert_allclose(np.asarray(state.momentum[k]), beta.numpy(),
                                           rtol=1e-12, atol=TOL)
        stats = opt.stats
        # torch's stats describe the last call, the JAX state the last step taken.
        names = ["running_min", "steps", "skipped_steps"]
        if _events(t) is None:
            names += ["eta", "grad_norm", "lipschitz", "objective"]
        for name in names:
            assert float(getattr(state, name)) == pytest.approx(float(stats[name]), rel=1e-12), name
        assert float(state.skipped_steps) == skipped
        assert int(state.step_count) == t + 1 - skipped
    assert step._cache_size() == 1  # one compilation for the whole run, skips and epochs included


def test_one_step_by_hand() -> None:
    # g = (3, 4): n = 5; F = m = 2, eta = (2 - 0.5 * 2) / 4 = 0.25; d = g/5 = (0.6, 0.8).
    tx = bpgrad(lipschitz=4.0, rho=0.5, momentum=0.9)
    params = jnp.array([1.0, -1.0])
    state = tx.init(params)
    updates, state = tx.update(jnp.array([3.0, 4.0]), state, params, value=2.0)
    np.testing.assert_allclose(np.asarray(updates), [-0.15, -0.2], rtol=1e-15)
    assert (float(state.eta), float(state.grad_norm), float(state.running_min)) == (0.25, 5.0, 2.0)
    # Second step, same gradient, F = 1: m = 1, eta = (1 - 0.5) / 4; beta = 0.9 d + d.
    updates, state = tx.update(jnp.array([3.0, 4.0]), state, params, value=1.0)
    np.testing.assert_allclose(np.asarray(updates), [-0.125 * 1.9 * 0.6, -0.125 * 1.9 * 0.8],
                               rtol=1e-15)


def test_the_scalar_rule_is_the_torch_optimizers(monkeypatch: pytest.MonkeyPatch) -> None:
    # The per-step scalars come from bpgrad.optim._scalars, not from a JAX copy of the rule.
    from bpgrad.optax import JaxMath
    from bpgrad.optim import _scalars

    calls = []
    original = _scalars.scalar_rule

    def spy(m: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(m)
        return original(m, *args, **kwargs)

    monkeypatch.setattr(_scalars, "scalar_rule", spy)
    tx = bpgrad(lipschitz="auto")
    params = jnp.ones(2)
    tx.update(jnp.ones(2), tx.init(params), params, value=1.0)
    assert calls == [JaxMath]


def test_complex_parameters_match_torch() -> None:
    rng = np.random.default_rng(3)
    init = rng.standard_normal(4) + 1j * rng.standard_normal(4)
    tp = torch.tensor(init)
    opt = BPGrad([tp], lipschitz="auto", weight_decay=1e-2)
    tx = bpgrad(lipschitz="auto", weight_decay=1e-2)
    params = jnp.asarray(init)
    state = tx.init(params)
    for _ in range(3):
        g = rng.standard_normal(4) + 1j * rng.standard_normal(4)
        loss = 0.5 + float(rng.random())
        tp.grad = torch.tensor(g)
        opt.step(loss=loss)
        updates, state = tx.update(jnp.asarray(g), state, params, value=loss)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params), tp.numpy(), rtol=0, atol=TOL)


@pytest.mark.parametrize("lipschitz", [50.0, "auto"])
def test_jit_traces_once_and_never_calls_the_host(lipschitz: float | str) -> None:
    tx = bpgrad(lipschitz=lipschitz, weight_decay=1e-3, objective="epoch_mean")
    traces = []

    # Donating the parameters and the state (buffers reused in place) works too.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params: Any, state: Any, x: jax.Array) -> tuple[Any, Any]:
        traces.append(1)  # runs only while tracing
        loss, grads = jax.value_and_grad(lambda p: jnp.sum((p["w"] * x - 1.0) ** 2))(params)
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.ones(3, jnp.float32)}
    state = tx.init(params)
    for i in range(4):
        params, state = train_step(params, state, jnp.full(3, 0.5 + i, jnp.float32))
        if i == 1:
            state = start_epoch(state)
    assert len(traces) == 1 and train_step._cache_size() == 1
    leaves = jax.tree_util.tree_leaves(state)
    assert len({id(x) for x in leaves}) == len(leaves)
    assert float(state.steps) == 4.0 and params["w"].dtype == jnp.float32
    assert state.running_min.dtype == jnp.float32  # float32 model, float32 scalars
    hlo = train_step.lower(params, state, jnp.ones(3, jnp.float32)).as_text()
    assert "callback" not in hlo.lower()  # nothing goes back to the host


def test_dtypes_are_preserved() -> None:
    params = {"w": jnp.array([1.0, -2.0, 0.5], jnp.bfloat16)}
    grads = {"w": jnp.array([0.25, 3.0, -1.5], jnp.bfloat16)}
    tx = bpgrad(lipschitz=2.0)
    state = tx.init(params)
    updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, value=1.5))(grads, state, params)
    assert updates["w"].dtype == jnp.bfloat16 and state.momentum["w"].dtype == jnp.bfloat16
    assert state.eta.dtype == jnp.float32  # the scalars are never bf16
    assert optax.apply_updates(params, updates)["w"].dtype == jnp.bfloat16
    # The step is computed in float32 and rounded once: the float32 run, cast to bf16.
    f32 = {"w": params["w"].astype(jnp.float32)}
    ref, _ = bpgrad(lipschitz=2.0).update(
        {"w": grads["w"].astype(jnp.float32)}, bpgrad(lipschitz=2.0).init(f32), f32, value=1.5)
    assert jnp.array_equal(updates["w"], ref["w"].astype(jnp.bfloat16))
    wide = bpgrad(lipschitz=2.0, accumulator_dtype=jnp.float32)
    _, wstate = wide.update(grads, wide.init(params), params, value=1.5)
    assert wstate.momentum["w"].dtype == jnp.float32


def test_sharded_on_four_cpu_devices_equals_unsharded() -> None:
    # XLA_FLAGS must be set before jax is imported, so this runs in its own process.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("optax_sharded_entry.py"))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    assert result["sharded_leaves"] == 2  # the sharded inputs really were split over devices
    assert result["max_diff"] <= TOL, result
    assert result["cache_size"] == 1 and result["updates_keep_sharding"]


# ----------------------------------------------------------------------------- composability
def _run(tx: Any, stream: list[tuple[dict, float]], params: dict, jit: bool = True) -> Any:
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v)) if jit else (
        lambda g, s, p, v: tx.update(g, s, p, value=v))
    for g, loss in stream:
        updates, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params, loss)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_trees_close(a: Any, b: Any, tol: float = TOL) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=tol)


def _params() -> dict:
    return {k: jnp.asarray(v) for k, v in _init_params(np.random.default_rng(0)).items()}


def test_chain_after_clip_by_global_norm() -> None:
    stream = [(g, loss) for g, loss in _stream(6, 2, False, 0.0)[:3]]
    clipped = [({k: v * min(1.0, 0.5 / np.sqrt(sum(np.sum(x**2) for x in g.values())))
                 for k, v in g.items()}, loss) for g, loss in stream]
    kw = dict(lipschitz=5.0, weight_decay=0.1)
    chained, _ = _run(optax.chain(optax.clip_by_global_norm(0.5), bpgrad(**kw)), stream,
                      _params())
    by_hand, _ = _run(bpgrad(**kw), clipped, _params())
    plain, _ = _run(bpgrad(**kw), stream, _params())
    _assert_trees_close(chained, by_hand)
    # With weight decay the clip changes the step (the L2 term is divided by the clipped norm).
    assert not np.allclose(np.asarray(chained["w"]), np.asarray(plain["w"]))
    # Without it BPGrad normalises the gradient, so the clip changes nothing.
    _assert_trees_close(
        _run(optax.chain(optax.clip_by_global_norm(0.5), bpgrad(5.0)), stream, _params())[0],
        _run(bpgrad(5.0), stream, _params())[0])


def test_inject_hyperparams_equals_plain_and_changes_take_effect() -> None:
    stream = _stream(6, 4, False, 0.4)
    kw = dict(lipschitz=6.0, rho=0.3, momentum=0.8, weight_decay=1e-2, loss_lower_bound=0.2,
              eps=1e-4, objective="epoch_mean")
    injected = optax.inject_hyperparams(bpgrad)(**kw)
    got, istate = _run(injected, stream, _params())
    want, _ = _run(bpgrad(**kw), stream, _params())
    _assert_trees_close(got, want)
    # Halving L through the state doubles the next step size.
    g = {k: jnp.ones(s) for k, s in SHAPES.items()}
    update = jax.jit(lambda s, v: injected.update(g, s, got, value=v))
    _, same = update(istate, 1.0)
    istate.hyperparams["lipschitz"] = jnp.asarray(3.0)
    _, halved = update(istate, 1.0)
    assert float(halved.inner_state.eta) == pytest.approx(2 * float(same.inner_state.eta),
                                                          rel=1e-12)


def test_inject_hyperparams_with_auto_lipschitz() -> None:
    stream = _stream(5, 5, False, 0.0)
    # auto_warmup and auto_max_step shape the control flow: traced (jit) they must be static,
    # and the error says so, naming both.
    with pytest.raises(TypeError, match="static_args=\\('auto_warmup', 'auto_max_step'\\)"):
        _run(optax.inject_hyperparams(bpgrad)(lipschitz="auto"), stream, _params())
    with pytest.raises(TypeError, match="auto_max_step"):
        _run(optax.inject_hyperparams(bpgrad, static_args=("auto_warmup",))(lipschitz="auto"),
             stream, _params())
    injected = optax.inject_hyperparams(bpgrad, static_args=("auto_warmup", "auto_max_step"))(
        lipschitz="auto")
    _assert_trees_close(_run(injected, stream, _params())[0],
                        _run(bpgrad("auto"), stream, _params())[0])
    # Outside jit the values are concrete and no declaration is needed.
    _assert_trees_close(
        _run(optax.inject_hyperparams(bpgrad)(lipschitz="auto"), stream[:2], _params(),
             jit=False)[0],
        _run(bpgrad("auto"), stream[:2], _params())[0])


def test_multisteps_uses_the_mean_gradient_and_the_last_value() -> None:
    stream = _stream(13, 6, False, 0.0)[9:13]  # four steps without a skip
    # (MultiSteps accumulates in float32 unless told otherwise.)
    tx = optax.MultiSteps(bpgrad(lipschitz=5.0, weight_decay=1e-2), every_k_schedule=2,
                          accumulator_dtype=jnp.float64)
    got, state = _run(tx, stream, _params())
    mean = [({k: (a[0][k] + b[0][k]) / 2 for k in SHAPES}, b[1])
            for a, b in (stream[0:2], stream[2:4])]
    want, _ = _run(bpgrad(lipschitz=5.0, weight_decay=1e-2), mean, _params())
    _assert_trees_close(got, want)
    assert float(state.inner_opt_state.steps) == 2.0


def test_schedule_on_the_scale() -> None:
    # lr = s_t is lipschitz = L / s_t, step by step (rho = 0 and no momentum: no memory), and
    # the schedule reads the number of steps taken (the NaN loss at t = 3 is not counted).
    stream = _stream(5, 8, False, 0.0)
    schedule = optax.piecewise_constant_schedule(1.0, {1: 0.5, 3: 4.0})
    got, state = _run(bpgrad(lipschitz=6.0, rho=0.0, momentum=0.0, lr=schedule), stream,
                      _params())
    assert int(state.step_count) == 4
    params, taken = _params(), 0
    for g, loss in stream:
        lip = 6.0 / float(schedule(taken))
        params, s = _run(bpgrad(lipschitz=lip, rho=0.0, momentum=0.0), [(g, loss)], params)
        taken += int(s.step_count)
    _assert_trees_close(got, params)


# ----------------------------------------------------------------------------- bad input
BAD = [
    (dict(lipschitz=0.0), ValueError, "lipschitz must be a finite number > 0"),
    (dict(lipschitz=math.nan), ValueError, "lipschitz"),
    (dict(lipschitz="fast"), ValueError, "'auto'"),
    (dict(lipschitz=jnp.array([1.0, 2.0])), ValueError, "0-dim array"),
    (dict(rho=1.0), ValueError, r"rho must be a number in \[0, 1\)"),
    (dict(rho=jnp.array(math.nan)), ValueError, "rho"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay must be a finite number >= 0"),
    (dict(eps=math.inf), ValueError, "eps"),
    (dict(loss_lower_bound=math.nan), ValueError, "loss_lower_bound must be a finite number"),
    (dict(auto_warmup=-1.0), ValueError, "auto_warmup"),
    (dict(auto_warmup_decay=1.0), ValueError, "auto_warmup_decay"),
    (dict(lr=-1.0), ValueError, "lr must be a finite number >= 0"),
    (dict(objective="epoch"), ValueError, "objective must be one of"),
    (dict(momentum_style="nesterov"), ValueError, "momentum_style must be one of"),
    (dict(maximize="yes"), ValueError, "maximize must be one of"),
]


@pytest.mark.parametrize(("kwargs", "exc", "pattern"), BAD)
def test_bad_hyperparameters_are_refused_at_construction(kwargs: dict, exc: type,
                                                          pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        bpgrad(**kwargs)


def test_bad_update_input() -> None:
    tx = bpgrad(lipschitz=2.0, weight_decay=1e-3)
    params = jnp.ones(3)
    state = tx.init(params)
    g = jnp.ones(3)
    with pytest.raises(MissingLossError, match="value=loss"):
        tx.update(g, state, params)
    with pytest.raises(ValueError, match="scalar loss"):
        tx.update(g, state, params, value=jnp.ones(2))
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(g, state, value=1.0)
    with pytest.raises(ValueError, match="non-negative loss"):
        tx.update(g, state, params, value=-0.5)  # a host number: checked, as on torch's CPU
    with pytest.raises(ValueError, match="BPGradState"):
        start_epoch(optax.sgd(0.1).init(params))
    # A negative loss that lives in an array is skipped and counted, as on a torch accelerator.
    updates, new = jax.jit(lambda v: tx.update(g, state, params, value=v))(-0.5)
    assert float(jnp.abs(updates).max()) == 0.0 and float(new.skipped_steps) == 1.0
    assert float(new.steps) == 0.0 and jnp.array_equal(new.momentum, state.momentum)
    assert isinstance(new, BPGradState)


def test_import_guard_names_the_extra() -> None:
    code = ("import sys; sys.modules['jax'] = None; import bpgrad; print('bpgrad ok')\n"
            "try:\n    import bpgrad.optax\nexcept ImportError as e:\n    print(e)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "bpgrad ok" in proc.stdout and 'pip install "bpgrad[jax]"' in proc.stdout


def test_docs_example_trains() -> None:
    text = (ROOT / "docs" / "jax.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/jax.md has no python example"
    scope: dict[str, Any] = {}
    exec(compile(blocks[0], "docs/jax.md", "exec"), scope)
    assert scope["final_loss"] < 0.1 * scope["first_loss"]
