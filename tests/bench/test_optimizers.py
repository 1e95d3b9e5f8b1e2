"""Optimizer registry: the paper's six, their defaults, overrides, labels, optional peers."""

from __future__ import annotations

import sys

import pytest
import torch

from bpgrad.bench.optimizers import (
    HyperparameterError,
    MissingExtraError,
    UnknownOptimizerError,
    format_value,
    get_optimizer_spec,
    optimizer_names,
    parse_value,
    resolve_optimizer,
)

PAPER = ["bpgrad", "sgd", "adam", "adagrad", "adadelta", "rmsprop"]
PEERS = ["prodigy", "dadapt_sgd", "dadapt_adam", "schedulefree_sgd", "schedulefree_adamw", "dog",
         "alig", "momo", "momo_adam", "momsps", "sps_safe"]
#: the Polyak family added for issue 12: each needs the loss passed to `step`
POLYAK = ["momo", "momo_adam", "momsps", "sps_safe"]


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3))]


def test_paper_six_are_registered_first_with_weight_decay_5e_4() -> None:
    assert optimizer_names(paper_only=True) == PAPER
    assert set(PEERS) <= set(optimizer_names())
    for name in PAPER:
        assert get_optimizer_spec(name).defaults["weight_decay"] == 5e-4


@pytest.mark.parametrize(
    ("name", "cls", "expected"),
    [
        ("sgd", torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}),
        ("adam", torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}),
        ("adagrad", torch.optim.Adagrad, {"lr": 1e-2, "eps": 1e-10}),
        ("adadelta", torch.optim.Adadelta, {"lr": 1.0, "rho": 0.9, "eps": 1e-6}),
        ("rmsprop", torch.optim.RMSprop, {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8}),
    ],
)
def test_torch_baselines_build_at_documented_defaults(name: str, cls: type,
                                                      expected: dict) -> None:
    opt = resolve_optimizer(name).build(_params())
    assert type(opt) is cls
    for key, value in expected.items():
        assert opt.param_groups[0][key] == value


def test_bpgrad_spec_uses_the_paper_settings_and_needs_the_loss() -> None:
    from bpgrad import BPGrad

    resolved = resolve_optimizer("bpgrad")
    opt = resolved.build(_params())
    assert isinstance(opt, BPGrad)
    group = opt.param_groups[0]
    assert (group["lipschitz"], group["rho"], group["momentum"], group["weight_decay"]) == (
        50.0, 0.1, 0.9, 5e-4)
    assert resolved.spec.needs_loss and resolved.spec.epoch_hook and resolved.spec.lr_key is None


def test_overrides_sweeps_and_labels() -> None:
    r = resolve_optimizer("adam", {"weight_decay": 0}, {"lr": 3e-4})
    assert r.hyperparameters["weight_decay"] == 0.0 and isinstance(
        r.hyperparameters["weight_decay"], float)
    assert r.label == "adam@lr=0.0003"
    assert resolve_optimizer("adam").label == "adam"
    b = resolve_optimizer("bpgrad", swept={"lipschitz": 10.0, "rho": 0.0})
    assert b.label == "bpgrad@lipschitz=10.0,rho=0.0"
    assert b.describe()["swept"] == {"lipschitz": 10.0, "rho": 0.0}


def test_unknown_names_and_keys_say_what_exists() -> None:
    with pytest.raises(UnknownOptimizerError, match="known optimizers: bpgrad, sgd"):
        get_optimizer_spec("adamw")
    with pytest.raises(HyperparameterError, match=r"it has: .*momentum"):
        resolve_optimizer("sgd", {"betas": (0.9, 0.99)})


def test_parse_and_format_values() -> None:
    assert parse_value("1e-3") == 1e-3
    assert parse_value("3") == 3
    assert parse_value("true") is True and parse_value("False") is False
    assert parse_value("[0.9, 0.99]") == (0.9, 0.99)
    assert parse_value("epoch_mean") == "epoch_mean"
    assert format_value(1e-5) == "1e-05" and format_value((0.9, 0.99)) == "0.9+0.99"


def test_missing_peer_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dadaptation", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'bpgrad\[peers\]'"):
        resolve_optimizer("dadapt_sgd").build(_params())


@pytest.mark.parametrize("name", PEERS)
def test_installed_peers_build_and_step(name: str) -> None:
    spec = get_optimizer_spec(name)
    pytest.importorskip(spec.module)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = resolve_optimizer(name).build([p])
    if spec.train_eval:
        opt.train()
    loss = (p ** 2).sum()
    loss.backward()
    if spec.needs_closure:
        opt.step(lambda: float(loss))
    elif spec.needs_loss:
        opt.step(loss=loss.detach())
    else:
        opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), torch.tensor([1.0, -2.0]))


@pytest.mark.parametrize(
    ("name", "cls", "expected"),
    [
        ("momo", "Momo", {"lr": 1.0, "weight_decay": 5e-4}),
        ("momo_adam", "MomoAdam", {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8,
                                   "weight_decay": 5e-4}),
        ("momsps", "MomSPS", {"c": 1.0, "gamma_max": 10.0, "beta": 0.9}),
        ("sps_safe", "SPS_safe", {"ell_star": 0.0, "M": 1.0, "weight_decay": 5e-4}),
    ],
)
def test_polyak_peers_build_at_published_defaults(name: str, cls: str, expected: dict) -> None:
    spec = get_optimizer_spec(name)
    module = pytest.importorskip(spec.module)
    opt = resolve_optimizer(name).build(_params())
    assert type(opt) is getattr(module, cls)
    assert spec.needs_loss and not spec.needs_closure and spec.extra == "peers"
    for key, value in expected.items():
        assert opt.param_groups[0][key] == value


def test_sps_safe_takes_the_safeguarded_polyak_step() -> None:
    # One step by hand: f = ||p||^2 = 5 at p = (1, -2), g = (2, -4), ||g||^2 = 20 > M = 1, so
    # gamma = 5 / 20 = 0.25 and, without weight decay, p <- p - 0.25 g = (0.5, -1).
    pytest.importorskip("sps_safe")
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = resolve_optimizer("sps_safe", {"weight_decay": 0.0}).build([p])
    loss = (p ** 2).sum()
    loss.backward()
    opt.step(loss=loss.detach())
    torch.testing.assert_close(p.detach(), torch.tensor([0.5, -1.0]))
