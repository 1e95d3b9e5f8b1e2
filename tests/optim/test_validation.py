"""Validation that cannot be bypassed: numbers and 0-dim tensors alike, NaN included, in the
constructor and in add_param_group, and a rejected group leaves the optimizer as it was."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpgrad import BPGrad

NAN, INF = math.nan, math.inf

BAD = [
    ("lipschitz", NAN, "lipschitz must be a finite number > 0"),
    ("lipschitz", torch.tensor(NAN), "lipschitz must be a finite number > 0"),
    ("lipschitz", torch.tensor(-10.0), r"lipschitz must be .* got tensor\(-10.0\)"),
    ("lipschitz", 0.0, "lipschitz must be a finite number > 0"),
    ("lipschitz", INF, "lipschitz must be a finite number > 0"),
    ("lipschitz", "automatic", "lipschitz must be a number, a 0-dim tensor or 'auto'"),
    ("lipschitz", torch.ones(2), r"lipschitz must be a number or a 0-dim tensor, got a tensor "
                                 r"of shape \(2,\)"),
    ("lr", NAN, "lr must be a finite number >= 0"),
    ("lr", torch.tensor(-1.0), "lr must be a finite number >= 0"),
    ("rho", torch.tensor(1.5), r"rho must be a number in \[0, 1\), got tensor\(1.5\)"),
    ("rho", NAN, r"rho must be a number in \[0, 1\)"),
    ("momentum", NAN, r"momentum must be a number in \[0, 1\)"),
    ("momentum", torch.tensor(1.0), r"momentum must be a number in \[0, 1\)"),
    ("weight_decay", INF, "weight_decay must be a finite number >= 0"),
    ("weight_decay", torch.tensor(NAN), "weight_decay must be a finite number >= 0"),
    ("weight_decay", "5e-4", "weight_decay must be a number, got '5e-4'"),
    ("weight_decay", True, "weight_decay must be a number, got True"),
    ("eps", -1e-8, "eps must be a finite number >= 0"),
    ("loss_lower_bound", NAN, "loss_lower_bound must be a finite number"),
    ("auto_warmup", NAN, "auto_warmup must be a finite number >= 0"),
    ("auto_warmup_decay", 1.0, r"auto_warmup_decay must be a number in \[0, 1\)"),
    ("rho", torch.tensor(0.1j), "rho must be a real number"),
    ("maximize", "yes", "maximize must be one of True, False"),
    ("strict", None, "strict must be one of True, False"),
    ("objective", "mean", "objective must be one of 'minibatch', 'epoch_mean'"),
    ("momentum_style", "nesterov", "momentum_style must be one of 'matconvnet', 'port'"),
    ("foreach", "yes", "foreach must be one of None, True, False"),
]


def snapshot(opt: BPGrad) -> Any:
    groups = [{k: (v if k != "params" else [id(p) for p in v]) for k, v in g.items()}
              for g in opt.param_groups]
    state = {index: {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for index, s in opt.state_dict()["state"].items()}
    return repr(groups), state


@pytest.mark.parametrize(("name", "value", "message"), BAD,
                         ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_constructor_and_add_param_group_refuse_bad_values(name, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        BPGrad([torch.nn.Parameter(torch.ones(2))], **{name: value})
    kept = torch.nn.Parameter(torch.ones(2))
    opt = BPGrad([kept], lipschitz=10.0)
    kept.grad = torch.ones(2)
    opt.step(loss=1.0)
    before = snapshot(opt)
    rejected = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [rejected], name: value})
    assert snapshot(opt) == before
    rejected.grad = torch.ones(3)
    opt.step(loss=1.0)
    assert torch.equal(rejected.detach(), torch.ones(3)), "a rejected group was trained"


def test_rejected_group_for_a_negative_lipschitz_never_moves() -> None:
    # The case from the issue: the group refused for L = -10 used to be appended anyway.
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = BPGrad([a], lipschitz=10.0)
    with pytest.raises(ValueError, match="lipschitz"):
        opt.add_param_group({"params": [b], "lipschitz": -10.0})
    assert len(opt.param_groups) == 1
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step(loss=1.0)
    assert torch.equal(b.detach(), torch.ones(2))


def test_optimizer_wide_option_mismatch_and_duplicates_leave_groups_unchanged() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = BPGrad([a])
    before = snapshot(opt)
    with pytest.raises(ValueError, match="optimizer-wide"):
        opt.add_param_group({"params": [b], "objective": "epoch_mean"})
    with pytest.raises(ValueError, match="optimizer-wide"):
        opt.add_param_group({"params": [b], "maximize": True})
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [a]})
    assert snapshot(opt) == before


def test_zero_dim_tensor_options_are_checked_once_and_stored_as_numbers() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    lr = torch.tensor(0.5)
    opt = BPGrad([p], lipschitz=torch.tensor(4.0), rho=torch.tensor(0.25),
                 momentum=torch.tensor(0.5), weight_decay=torch.tensor(0.0), lr=lr)
    group = opt.param_groups[0]
    assert group["rho"] == 0.25 and group["momentum"] == 0.5 and group["weight_decay"] == 0.0
    assert group["lr"] is lr  # lr and lipschitz stay tensors: schedulers change them in place
    p.grad = torch.tensor([3.0, 4.0])
    opt.step(loss=1.0)
    # eta = 0.5 * (1 - 0.25 * 1) / 4, along -g/|g|
    torch.testing.assert_close(p.detach(), torch.ones(2) - 0.09375 * torch.tensor([0.6, 0.8]))


# ------------------------------------------------------------------ property tests
# Values a user (or a buggy config loader) might pass. Magnitudes stay within [1e-6, 1e6]: a valid
# but astronomical step (lr = 1e114, or lipschitz = 1e-114) legitimately overflows float32
# parameters, as it would with torch's SGD; that is not a validation matter.
special = st.sampled_from([NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 0.999, 1.0 - 1e-12, 1e-6])
reals = st.floats(min_value=-1e6, max_value=1e6).filter(lambda v: v == 0 or abs(v) >= 1e-6) | special
values = (reals | reals.map(torch.tensor) | st.sampled_from(["auto", "1.0", None, True, False])
          | st.sampled_from([torch.ones(2), torch.tensor([0.5])]))
NUMERIC = ["lipschitz", "lr", "rho", "momentum", "weight_decay", "eps", "loss_lower_bound",
           "auto_warmup", "auto_warmup_decay"]
options = st.dictionaries(st.sampled_from(NUMERIC), values, max_size=4)


def one_step_keeps_parameters_finite(opt: BPGrad, params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    opt.step(loss=opt.param_groups[0]["loss_lower_bound"] + 2.0)  # loss - bound = 2 >= 0
    assert all(torch.isfinite(p).all() for p in params)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=options)
def test_fuzzed_constructor_rejects_or_takes_a_finite_step(kwargs) -> None:
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    try:
        opt = BPGrad(params, **kwargs)
    except ValueError as err:
        named = [k for k in kwargs if k in str(err)]
        assert named, f"the message {err} names none of {list(kwargs)}"
        return
    one_step_keeps_parameters_finite(opt, params)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(group=options)
def test_fuzzed_add_param_group_rejects_cleanly_or_takes_a_finite_step(group) -> None:
    kept = torch.nn.Parameter(torch.ones(3))
    opt = BPGrad([kept], lipschitz=10.0)
    kept.grad = torch.ones(3)
    opt.step(loss=1.0)
    before = snapshot(opt)
    added = torch.nn.Parameter(torch.ones(2))
    try:
        opt.add_param_group({"params": [added], **group})
    except ValueError as err:
        assert snapshot(opt) == before
        assert any(k in str(err) for k in group), str(err)
        return
    one_step_keeps_parameters_finite(opt, [kept, added])
