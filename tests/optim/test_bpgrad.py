"""BPGrad against its literal reference, by hand, on toy problems, and on every edge the issue names."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch

from bpgrad import BPGrad, BPGradError, MissingLossError
from bpgrad.optim._reference import ReferenceBPGrad

# The package re-exports the functional `bpgrad`, which shadows the module of the same name.
bpgrad_module = importlib.import_module("bpgrad.optim.bpgrad")

KERNELS = {
    "loop": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
}
TOL = 1e-12


def make_params(dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,), (0,), (2, 2), (3,)]
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def group_spec(params: list[torch.Tensor]) -> list[dict]:
    # Several groups with different per-group options, an empty group, a zero-size parameter
    # (params[2]) and a parameter that never gets a gradient (params[4]).
    return [
        {"params": params[:2], "lipschitz": 5.0, "rho": 0.1, "momentum": 0.9,
         "weight_decay": 1e-2},
        {"params": [], "lipschitz": 3.0, "rho": 0.0, "momentum": 0.5, "weight_decay": 0.0},
        {"params": params[2:4], "lipschitz": 9.0, "rho": 0.3, "momentum": 0.0,
         "weight_decay": 5e-4, "lr": 0.5},
        {"params": params[4:], "lipschitz": 2.0, "rho": 0.2, "momentum": 0.7,
         "weight_decay": 0.0},
    ]


def fill_grads(params: list[torch.Tensor], gen: torch.Generator, t: int) -> None:
    # params[4] never has a gradient; params[1] misses one every third step, so its momentum
    # buffer must stay as it was on those steps.
    for i, p in enumerate(params):
        missing = i == 4 or (i == 1 and t % 3 == 2)
        p.grad = None if missing else torch.randn(p.shape, generator=gen, dtype=p.dtype)


# The port style has no fused kernel (construction raises; see ERRORS).
KERNEL_STYLES = [(k, s) for k in KERNELS for s in ("matconvnet", "port")
                 if (k, s) != ("fused", "port")]


@pytest.mark.parametrize(("kernel", "style"), KERNEL_STYLES)
@pytest.mark.parametrize("objective", ["minibatch", "epoch_mean"])
def test_kernels_match_reference_every_step(kernel: str, style: str, objective: str) -> None:
    params = make_params()
    ref_params = [p.clone() for p in params]
    spec = group_spec(params)
    for g in spec:
        g["momentum_style"] = style
    opt = BPGrad(spec, objective=objective, **KERNELS[kernel])
    ref_spec = group_spec(ref_params)
    for g in ref_spec:
        g["momentum_style"] = style
        g.setdefault("lr", 1.0)
    ref = ReferenceBPGrad(ref_spec, objective=objective)
    gen = torch.Generator().manual_seed(1)
    for t in range(20):
        if t in (7, 14):
            opt.start_epoch()
            ref.start_epoch()
        loss = 0.05 + float(torch.rand((), generator=gen, dtype=torch.float64))
        fill_grads(params, gen, t)
        for p, r in zip(params, ref_params, strict=True):
            r.grad = None if p.grad is None else p.grad.clone()
        opt.step(loss=torch.tensor(loss, dtype=torch.float64))
        ref.step(loss)
        tol = TOL
        for p, r in zip(params, ref_params, strict=True):
            torch.testing.assert_close(p, r, rtol=tol, atol=tol)
        for i, p in enumerate(params):
            v = ref.v.get(id(ref_params[i]))
            buf = opt.momentum_direction(p)
            if v is None:
                assert buf is None or not torch.any(buf), f"unexpected buffer for param {i}"
            else:
                torch.testing.assert_close(buf, -v, rtol=tol, atol=tol)
        stats = opt.stats
        assert math.isclose(float(stats["running_min"]), ref.running_min, rel_tol=1e-12)
        assert float(stats["steps"]) == ref.steps == t + 1
        torch.testing.assert_close(
            stats["eta_groups"], torch.tensor(ref.last_eta, dtype=torch.float64),
            rtol=1e-12, atol=0.0)
        assert math.isclose(float(stats["grad_norm"]), ref.last_norm, rel_tol=1e-12)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_gradients_are_left_untouched(kernel: str) -> None:
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))]
    opt = BPGrad(params, lipschitz=3.0, weight_decay=0.1, **KERNELS[kernel])
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        before = [p.grad.clone() for p in params]
        opt.step(loss=0.7)
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))


def test_one_step_by_hand() -> None:
    # Two parameters, numbers chosen so every quantity is easy to verify on paper.
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([0.5], dtype=torch.float64)
    opt = BPGrad([w, b], lipschitz=10.0, rho=0.1, momentum=0.9, weight_decay=0.1,
                 foreach=False, fused=False)
    w.grad = torch.tensor([3.0, 0.0], dtype=torch.float64)
    b.grad = torch.tensor([4.0], dtype=torch.float64)
    opt.step(loss=2.0)
    # n = ||(3, 0, 4)|| = 5; m = 2; eta = (2 - 0.1*2)/10 = 0.18
    # d_w = ((3,0) + 0.1*(1,2))/5 = (0.62, 0.04); d_b = (4 + 0.05)/5 = 0.81
    # v = -d; p = p + eta*v
    torch.testing.assert_close(w, torch.tensor([1.0 - 0.18 * 0.62, 2.0 - 0.18 * 0.04],
                                               dtype=torch.float64))
    torch.testing.assert_close(b, torch.tensor([0.5 - 0.18 * 0.81], dtype=torch.float64))
    assert float(opt.stats["eta"]) == pytest.approx(0.18)
    assert float(opt.stats["grad_norm"]) == pytest.approx(5.0)
    # Second step: the buffer carries 0.9 of the first direction.
    w.grad = torch.tensor([0.0, 0.0], dtype=torch.float64)
    b.grad = torch.tensor([1.0], dtype=torch.float64)
    w1, b1 = w.clone(), b.clone()
    opt.step(loss=1.0)
    # m = 1; eta = (1 - 0.1)/10 = 0.09; n = 1
    d_w = 0.1 * w1
    d_b = torch.tensor([1.0], dtype=torch.float64) + 0.1 * b1
    v_w = -0.9 * torch.tensor([0.62, 0.04], dtype=torch.float64) - d_w
    v_b = -0.9 * torch.tensor([0.81], dtype=torch.float64) - d_b
    torch.testing.assert_close(w, w1 + 0.09 * v_w)
    torch.testing.assert_close(b, b1 + 0.09 * v_b)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_quadratic_loss_decreases(kernel: str) -> None:
    torch.manual_seed(0)
    a = torch.diag(torch.linspace(1.0, 10.0, 10))
    x = torch.nn.Parameter(torch.ones(10) * 3.0)
    opt = BPGrad([x], lipschitz=200.0, rho=0.0, momentum=0.5, **KERNELS[kernel])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * x @ a @ x
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(300):
        last = opt.step(closure)
    assert float(last) < 1e-3 * first


def test_rosenbrock_reaches_minimum_region() -> None:
    xy = torch.nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    opt = BPGrad([xy], lipschitz=200.0, rho=0.0, momentum=0.9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        x, y = xy
        loss = (1 - x) ** 2 + 100 * (y - x**2) ** 2
        loss.backward()
        return loss

    for _ in range(5000):
        opt.step(closure)
    assert float(closure().detach()) < 1e-2
    assert torch.allclose(xy.detach(), torch.ones(2, dtype=torch.float64), atol=0.1)


def test_loss_can_be_passed_three_ways() -> None:
    results = []
    for way in ("closure", "loss", "set_loss"):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = BPGrad(model.parameters(), lipschitz=5.0)
        x, y = torch.randn(8, 3), torch.randn(8, 1)

        def closure(model: torch.nn.Module = model, opt: BPGrad = opt, x: torch.Tensor = x,
                    y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        for _ in range(3):
            if way == "closure":
                opt.step(closure)
            else:
                loss = closure()
                if way == "loss":
                    opt.step(loss=loss)
                else:
                    opt.set_loss(loss)
                    opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    torch.testing.assert_close(results[0], results[2], rtol=0, atol=0)


def test_missing_loss_says_how_to_pass_it() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = BPGrad([p])
    p.grad = torch.ones(2)
    with pytest.raises(MissingLossError, match=r"step\(closure\).*loss=.*set_loss"):
        opt.step()
    # A loss given by set_loss is consumed by one step, never reused.
    opt.set_loss(torch.tensor(1.0))
    opt.step()
    with pytest.raises(MissingLossError):
        opt.step()


def snapshot(opt: BPGrad, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in params]
    for p in params:
        out.extend(v.clone() for v in opt.state[p].values() if isinstance(v, torch.Tensor))
    return out


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize(
    "bad", ["nan_loss", "inf_loss", "inf_grad", "nan_grad", "zero_grad"])
def test_bad_steps_change_nothing_but_the_counter(kernel: str, bad: str) -> None:
    params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))]
    opt = BPGrad(params, lipschitz=4.0, weight_decay=1e-2, **KERNELS[kernel])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step(loss=1.0)  # creates the state
    before = snapshot(opt, params)
    loss = {"nan_loss": math.nan, "inf_loss": math.inf}.get(bad, 0.5)
    for p in params:
        p.grad = torch.randn_like(p)
    if bad == "inf_grad":
        params[0].grad[1] = math.inf
    elif bad == "nan_grad":
        params[1].grad[0] = math.nan
    elif bad == "zero_grad":
        for p in params:
            p.grad.zero_()
    opt.step(loss=torch.tensor(loss))
    after = snapshot(opt, params)
    # the counters are the only entries allowed to move
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True))
               if not torch.equal(a, b)]
    assert all(after[i].dim() == 0 for i in changed)
    assert float(opt.stats["skipped_steps"]) == 1.0
    assert float(opt.stats["steps"]) == 1.0
    assert all(torch.isfinite(a).all() for a in after)


def test_strict_mode_raises_on_bad_step() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = BPGrad([p], strict=True)
    p.grad = torch.zeros(2)
    with pytest.raises(BPGradError, match="strict"):
        opt.step(loss=1.0)


def test_negative_loss_is_an_error_unless_a_lower_bound_is_given() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="loss_lower_bound"):
        BPGrad([p]).step(loss=torch.tensor(-0.5))
    opt = BPGrad([p], lipschitz=1.0, rho=0.0, momentum=0.0, loss_lower_bound=-1.0)
    opt.step(loss=torch.tensor(-0.5))
    # f - f_lb = 0.5; eta = 0.5; direction = (1,1)/sqrt(2)
    torch.testing.assert_close(p.detach(), torch.ones(2) - 0.5 / math.sqrt(2))


def test_negative_loss_on_accelerators_is_masked_not_synced(monkeypatch) -> None:
    # Simulate a device whose values cannot be read for free: the step must then skip on the
    # device and read no tensor value on the host.
    monkeypatch.setattr(bpgrad_module, "_host_readable", lambda t: False)
    p = torch.nn.Parameter(torch.ones(2))
    opt = BPGrad([p])
    p.grad = torch.ones(2)
    opt.step(loss=torch.tensor(-0.5))
    assert torch.equal(p.detach(), torch.ones(2))
    assert float(opt.stats["skipped_steps"]) == 1.0


@pytest.mark.parametrize("lipschitz", [10.0, "auto"])
def test_step_reads_no_tensor_value_on_the_host(monkeypatch, lipschitz: float | str) -> None:
    monkeypatch.setattr(bpgrad_module, "_host_readable", lambda t: False)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    for kernel in KERNELS.values():
        opt = BPGrad(model.parameters(), lipschitz=lipschitz, weight_decay=1e-3, **kernel)
        loss = model(torch.randn(5, 4)).square().mean()
        loss.backward()

        def forbidden(*args, **kwargs):
            raise AssertionError("host sync inside BPGrad.step")

        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
                m.setattr(torch.Tensor, name, forbidden)
            opt.step(loss=loss)
            opt.step(loss=loss)
            stats = opt.stats
        assert stats["lipschitz"].dim() == 0
        assert float(opt.stats["steps"]) == 2.0


def test_state_dict_round_trip_continues_in_lockstep() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = BPGrad(model.parameters(), lipschitz=8.0, weight_decay=1e-3, objective="epoch_mean")
    data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(12)]

    def train(model: torch.nn.Module, opt: BPGrad, batches) -> None:
        for x, y in batches:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step(loss=loss)

    opt.start_epoch()
    train(model, opt, data[:5])
    model2 = copy.deepcopy(model)
    opt2 = BPGrad(model2.parameters(), lipschitz=1.0, objective="epoch_mean")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["lipschitz"] == 8.0
    train(model, opt, data[5:])
    train(model2, opt2, data[5:])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    for key in ("running_min", "steps", "skipped_steps"):
        assert torch.equal(opt.stats[key], opt2.stats[key])


def test_global_scalars_keep_their_precision_on_low_precision_models() -> None:
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = BPGrad([p])
    p.grad = torch.ones(3, dtype=torch.bfloat16)
    opt.step(loss=1.2345678)
    opt2 = BPGrad([torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))])
    opt2.load_state_dict(opt.state_dict())
    assert opt2.stats["running_min"].dtype == torch.float32
    assert float(opt2.stats["running_min"]) == pytest.approx(1.2345678, rel=1e-7)


def test_lr_scheduler_scales_the_step_like_a_lipschitz_schedule() -> None:
    def run(lipschitz: float, use_scheduler: bool) -> torch.Tensor:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5))
        opt = BPGrad([p], lipschitz=lipschitz, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5) if use_scheduler else None
        for _ in range(4):
            p.grad = p.detach().clone()
            opt.step(loss=p.detach().square().sum())
            if sched is not None:
                sched.step()
        return p.detach()

    # LambdaLR sets lr = 0.5 from the start, so L=10 under the scheduler equals L=20 without it.
    torch.testing.assert_close(run(10.0, True), run(20.0, False))
    p = torch.nn.Parameter(torch.ones(1))
    opt = BPGrad([p])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


ERRORS = [
    (dict(lipschitz=0.0), ValueError, "lipschitz"),
    (dict(lipschitz=-1.0), ValueError, "lipschitz"),
    (dict(lipschitz=math.inf), ValueError, "lipschitz"),
    (dict(rho=1.0), ValueError, "rho"),
    (dict(rho=-0.1), ValueError, "rho"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(momentum=-0.5), ValueError, "momentum"),
    (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(objective="epoch"), ValueError, "objective"),
    (dict(momentum_style="nesterov"), ValueError, "momentum_style"),
    (dict(foreach=True, fused=True), ValueError, "fused"),
    (dict(fused=True, momentum_style="port"), ValueError, "port"),
    (dict(loss_lower_bound=math.nan), ValueError, "loss_lower_bound"),
    (dict(lipschitz="50"), ValueError, "lipschitz"),
]


@pytest.mark.parametrize(("kwargs", "exc", "pattern"), ERRORS)
def test_invalid_arguments(kwargs: dict, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        BPGrad([torch.nn.Parameter(torch.ones(1))], **kwargs)


def test_non_scalar_loss_and_closure_plus_loss_are_rejected() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    opt = BPGrad([p])
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(loss=torch.ones(3))
    with pytest.raises(ValueError, match="either a closure that returns the loss or loss="):
        opt.step(lambda: torch.tensor(1.0), loss=torch.tensor(1.0))


def test_closure_returning_none_falls_back_to_loss_or_set_loss() -> None:
    # Lightning's manual optimization wraps step with a closure that returns None.
    calls = []
    p = torch.nn.Parameter(torch.ones(2))
    opt = BPGrad([p], lipschitz=1.0, rho=0.0, momentum=0.0)
    p.grad = torch.ones(2)
    opt.step(lambda: calls.append(1), loss=0.5)
    opt.set_loss(0.5)
    opt.step(lambda: calls.append(1))
    assert calls == [1, 1] and float(opt.stats["steps"]) == 2.0
    with pytest.raises(MissingLossError):
        opt.step(lambda: None)


def test_param_groups_deepcopy_repr_and_global_options() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = BPGrad([a], lipschitz=7.0)
    opt.add_param_group({"params": [b], "lipschitz": 3.0})
    assert [g["lipschitz"] for g in opt.param_groups] == [7.0, 3.0]
    assert "BPGrad" in repr(opt) and "lipschitz: 3.0" in repr(opt)
    with pytest.raises(ValueError, match="optimizer-wide"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))],
                             "objective": "epoch_mean"})
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "rho": 2.0})
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.step(loss=1.0)
    clone = copy.deepcopy(opt)
    assert torch.equal(clone.stats["running_min"], opt.stats["running_min"])
    assert clone.stats["running_min"] is not opt.stats["running_min"]


def test_complex_parameters_follow_their_real_view() -> None:
    z = torch.nn.Parameter(torch.tensor([1 + 2j, -1j], dtype=torch.complex128))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    oz, orr = BPGrad([z], lipschitz=3.0), BPGrad([r], lipschitz=3.0)
    for _ in range(3):
        z.grad = z.detach().clone()
        r.grad = r.detach().clone()
        oz.step(loss=1.0)
        orr.step(loss=1.0)
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach())


def test_grad_scaler_steps_unscaled_and_skips_inf_without_touching_state() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    ref_model = copy.deepcopy(model)
    opt = BPGrad(model.parameters(), lipschitz=5.0, weight_decay=1e-2)
    ref = BPGrad(ref_model.parameters(), lipschitz=5.0, weight_decay=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for _ in range(3):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            if o is opt:
                scaler.scale(loss).backward()
                opt.set_loss(loss)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                o.step(loss=loss)
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    before = snapshot(opt, list(model.parameters()))
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss * math.inf).backward()
    opt.set_loss(loss)
    scaler.step(opt)
    scaler.update()
    after = snapshot(opt, list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True) if a.dim() > 0)
    assert float(opt.stats["skipped_steps"]) == 1.0


@pytest.mark.parametrize(("backend", "kernel"), [("eager", "foreach"), ("eager", "fused"),
                                                  ("inductor", "default")])
def test_compiled_step_fullgraph_matches_eager(backend: str, kernel: str) -> None:
    torch._dynamo.reset()
    kwargs = KERNELS.get(kernel, {})

    def run(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        opt = BPGrad(model.parameters(), lipschitz=4.0, weight_decay=1e-3, **kwargs)

        def step(loss: torch.Tensor) -> None:
            opt.step(loss=loss)

        stepper = torch.compile(step, fullgraph=True, backend=backend) if compiled else step
        x = torch.randn(10, 6)
        for _ in range(3):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            stepper(loss.detach())
        assert float(opt.stats["steps"]) == 3.0
        return [p.detach().clone() for p in model.parameters()] + [opt.stats["eta"].clone()]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(a, b)


def test_missing_loss_message_is_actionable() -> None:
    p = torch.nn.Parameter(torch.ones(1))
    p.grad = torch.ones(1)
    with pytest.raises(MissingLossError) as info:
        BPGrad([p]).step()
    assert "closure" in str(info.value) and "trainer" in str(info.value)
