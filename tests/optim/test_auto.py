"""BPGrad with lipschitz="auto": exact against the reference rule, state, DDP, no host sync."""

from __future__ import annotations

import copy
import importlib
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bpgrad import BPGrad
from bpgrad.optim._reference import ReferenceBPGrad

bpgrad_module = importlib.import_module("bpgrad.optim.bpgrad")

KERNELS = {
    "loop": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
}


def make_params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in [(4, 3), (5,), (2, 2)]]


def spec(params: list[torch.Tensor]) -> list[dict]:
    # An auto group, a fixed-L group and an auto group with an lr multiplier.
    return [
        {"params": params[:1], "lipschitz": "auto", "rho": 0.1, "momentum": 0.9,
         "weight_decay": 1e-2},
        {"params": params[1:2], "lipschitz": 4.0, "rho": 0.2, "momentum": 0.5,
         "weight_decay": 0.0},
        {"params": params[2:], "lipschitz": "auto", "rho": 0.0, "momentum": 0.0,
         "weight_decay": 5e-4, "lr": 0.5},
    ]


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize(("warmup", "decay", "max_step"),
                         [(1e-3, 0.95, 1e-2), (1e-3, 0.95, 0.0), (0.0, 0.5, 0.0), (0.3, 0.0, 0.0),
                          (0.0, 0.5, 1.0)])
def test_auto_matches_reference_every_step(kernel: str, warmup: float, decay: float,
                                           max_step: float) -> None:
    params = make_params()
    ref_params = [p.clone() for p in params]
    opt = BPGrad(spec(params), auto_warmup=warmup, auto_warmup_decay=decay,
                 auto_max_step=max_step, **KERNELS[kernel])
    ref = ReferenceBPGrad(spec(ref_params), auto_warmup=warmup, auto_warmup_decay=decay,
                          auto_max_step=max_step)
    gen = torch.Generator().manual_seed(1)
    for t in range(25):
        loss = 0.05 + float(torch.rand((), generator=gen, dtype=torch.float64))
        # Gradient norms that rise and fall, so that both the floor and the max decide L.
        scale = 0.01 * 3.0 ** (t % 7)
        nan_step = t == 11  # a skipped step must leave the estimate alone
        for p, r in zip(params, ref_params, strict=True):
            p.grad = scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if nan_step:
                p.grad[0] = math.nan
            r.grad = p.grad.clone()
        opt.step(loss=torch.tensor(loss, dtype=torch.float64))
        ref.step(loss)
        for p, r in zip(params, ref_params, strict=True):
            torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
        assert math.isclose(float(opt.stats["lipschitz"]), ref.lipschitz_estimate,
                            rel_tol=1e-12)
        groups = opt.stats["lipschitz_groups"]
        assert float(groups[1]) == 4.0
        if nan_step:  # the reference keeps the last taken step's eta
            continue
        torch.testing.assert_close(
            opt.stats["eta_groups"], torch.tensor(ref.last_eta, dtype=torch.float64),
            rtol=1e-12, atol=0.0)
    assert float(opt.stats["skipped_steps"]) == ref.skipped == 1


def test_estimate_is_the_smallest_l_consistent_with_observed_gradients() -> None:
    # Without warm-up the estimate is exactly the running max of the global gradient norm, and
    # eta * L_hat = F - rho*m: the step never exceeds the Polyak step (F - rho m)/||g||.
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = BPGrad([p], lipschitz="auto", auto_warmup=0.0, auto_max_step=0.0, rho=0.0, momentum=0.0)
    norms = [2.0, 5.0, 1.0, 3.0]
    for n in norms:
        p.grad = torch.tensor([n, 0.0, 0.0], dtype=torch.float64)
        opt.step(loss=1.0)
        assert float(opt.stats["eta"]) * float(opt.stats["grad_norm"]) <= 1.0 + 1e-12
    assert float(opt.stats["lipschitz"]) == max(norms)


def test_slopes_seen_while_the_floor_decides_do_not_lock_the_estimate() -> None:
    # A transient spike during warm-up (a norm below the floor W_t) must not become L for good;
    # once the floor has decayed below the observed norms, they set the estimate as before.
    p = torch.nn.Parameter(torch.full((2,), 1.0, dtype=torch.float64))  # ||x_0|| = sqrt(2)
    opt = BPGrad([p], lipschitz="auto", rho=0.1, momentum=0.0, auto_warmup=1e-3,
                 auto_warmup_decay=0.5, auto_max_step=0.0)
    floor = 1.0 / (1e-3 * (1.0 + math.sqrt(2.0)))  # W_0 = F_0 / (eps (1 + ||x_0||)), ~414
    norms = [1.0, 150.0, 2.0] + [2.0] * 12 + [3.0]  # the spike 150 < W_1 ~ 207
    for t, n in enumerate(norms):
        p.grad = torch.tensor([n, 0.0], dtype=torch.float64)
        opt.step(loss=1.0)
        w_t = floor * 0.5 ** t
        if t < 8:  # the floor decides: the spike is not remembered
            assert float(opt.stats["lipschitz"]) == pytest.approx(w_t, rel=1e-12)
    # after the floor fell below 2, the estimate is the largest norm seen since: 3, not 150
    assert float(opt.stats["lipschitz"]) == 3.0
    # the old rule (every observation counts) would have kept 150
    assert floor * 0.5 ** 1 > 150.0


def test_the_step_length_never_exceeds_the_cap_and_the_cap_decides_on_small_gradients() -> None:
    # eta_t <= kappa (1 + ||x_0||) on every step, whatever the gradients; with gradients far
    # smaller than F_t / (kappa (1 + ||x_0||)), the cap is the estimate once the warm-up floor has
    # decayed: eta_t = kappa (1 + ||x_0||) (F_t - rho m_t) / F_t exactly.
    kappa = 0.02
    for tiny in (False, True):
        p = torch.nn.Parameter(torch.full((4,), 1.5, dtype=torch.float64))  # ||x_0|| = 3
        opt = BPGrad([p], lipschitz="auto", rho=0.1, momentum=0.9, auto_max_step=kappa)
        gen = torch.Generator().manual_seed(3)
        running_min = math.inf
        for t in range(200):
            loss = 1.0 + float(torch.rand((), generator=gen, dtype=torch.float64))
            running_min = min(running_min, loss)
            exponent = float(torch.empty(()).uniform_(-3, 1, generator=gen))
            scale = 1e-4 if tiny else 10.0 ** exponent
            p.grad = scale * torch.randn(4, generator=gen, dtype=torch.float64)
            opt.step(loss=loss)
            eta = float(opt.stats["eta"])
            assert eta <= kappa * 4.0 * (1 + 1e-12)
            if tiny and t >= 150:  # the floor is at 0.95^150 ~ 5e-4 of W_0, below the cap
                expected = kappa * 4.0 * (loss - 0.1 * running_min) / loss
                assert eta == pytest.approx(expected, rel=1e-12)
                assert float(opt.stats["lipschitz"]) == pytest.approx(loss / (kappa * 4.0),
                                                                      rel=1e-12)


def test_warmup_bounds_the_first_step_relative_to_the_weights() -> None:
    # A flat start (tiny gradient) must not give a giant first step: eta_0 <= eps*(1+||x_0||).
    p = torch.nn.Parameter(torch.full((4,), 3.0, dtype=torch.float64))  # ||x_0|| = 6
    opt = BPGrad([p], lipschitz="auto", rho=0.1, momentum=0.9)
    p.grad = torch.full((4,), 1e-6, dtype=torch.float64)
    opt.step(loss=2.0)
    assert float(opt.stats["eta"]) == pytest.approx((1 - 0.1) * 1e-3 * 7.0, rel=1e-12)
    assert torch.linalg.vector_norm(p.detach() - 3.0) == pytest.approx(0.9e-3 * 7.0, rel=1e-9)


def test_validation() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="auto"):
        BPGrad([p], lipschitz="automatic")
    with pytest.raises(ValueError, match="auto_warmup"):
        BPGrad([p], lipschitz="auto", auto_warmup=-1.0)
    with pytest.raises(ValueError, match="auto_warmup_decay"):
        BPGrad([p], lipschitz="auto", auto_warmup_decay=1.0)
    with pytest.raises(ValueError, match="auto_max_step"):
        BPGrad([p], lipschitz="auto", auto_max_step=-0.1)
    with pytest.raises(ValueError, match="optimizer-wide"):
        opt = BPGrad([p], lipschitz="auto")
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))],
                             "auto_warmup": 0.5})


def train(model: torch.nn.Module, opt: BPGrad, batches: list) -> None:
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)


def test_state_dict_round_trip_continues_in_lockstep() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = BPGrad(model.parameters(), lipschitz="auto", weight_decay=1e-3)
    data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(12)]
    train(model, opt, data[:5])
    model2 = copy.deepcopy(model)
    opt2 = BPGrad(model2.parameters(), lipschitz="auto")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch.equal(opt2.stats["steps"], opt.stats["steps"])
    train(model, opt, data[5:])
    train(model2, opt2, data[5:])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.stats["lipschitz"], opt2.stats["lipschitz"])
    saved = opt.state_dict()["state"][0]
    for key in ("grad_norm_max", "lipschitz_floor", "lipschitz_estimate", "param_norm_init"):
        assert key in saved


def test_checkpoint_without_auto_state_still_loads() -> None:
    # A checkpoint written before the auto-L keys existed: they start fresh, nothing raises.
    model = torch.nn.Linear(3, 2)
    opt = BPGrad(model.parameters(), lipschitz="auto")
    model(torch.randn(4, 3)).square().mean().backward()
    opt.step(loss=1.0)
    sd = copy.deepcopy(opt.state_dict())
    for key in ("grad_norm_max", "lipschitz_floor", "lipschitz_estimate", "param_norm_init"):
        del sd["state"][0][key]
    opt2 = BPGrad(model.parameters(), lipschitz="auto")
    opt2.load_state_dict(sd)
    opt2.step(loss=1.0)
    assert math.isfinite(float(opt2.stats["lipschitz"]))


# ------------------------------------------------------------------ DDP, 2 Gloo processes
STEPS, PER_RANK = 6, 6


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
    ).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2 * PER_RANK, 5, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (2 * PER_RANK,), generator=gen))
        for _ in range(STEPS)
    ]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        opt = BPGrad(model.parameters(), lipschitz="auto", weight_decay=1e-3)
        lipschitz = []
        for x, y in batches():
            part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[part]), y[part])
            loss.backward()
            opt.step(loss=loss)
            lipschitz.append(opt.stats["lipschitz"].clone())
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save((flat, torch.stack(lipschitz)), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_share_one_estimate_and_match_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    (x0, l0), (x1, l1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(l0, l1)
    assert torch.equal(x0, x1)
    model = make_model()
    opt = BPGrad(model.parameters(), lipschitz="auto", weight_decay=1e-3)
    single = []
    for x, y in batches():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step(loss=torch.nn.functional.cross_entropy(model(x), y).detach())
        single.append(opt.stats["lipschitz"].clone())
    torch.testing.assert_close(l0, torch.stack(single), rtol=1e-9, atol=0.0)
    torch.testing.assert_close(x0, torch.cat([p.detach().flatten() for p in model.parameters()]),
                               rtol=0, atol=1e-6)
