"""Old and foreign checkpoints load: group keys added since the first release take their default,
and numbers where BPGrad keeps 0-dim tensors become tensors (as torch's optimizers do)."""

from __future__ import annotations

import copy
import importlib
import inspect

import pytest
import torch

from bpgrad import BPGrad

# The optimizer's own list of group options (the module is shadowed by the function `bpgrad`).
OPTION_KEYS: tuple[str, ...] = importlib.import_module("bpgrad.optim.bpgrad")._OPTION_KEYS
# Keys a parameter group has gained over time; an old checkpoint lacks any of them. Derived,
# so that an option added later (auto_max_step was missed here when it came) is tested too.
FIRST_RELEASE_KEYS = ("lipschitz", "rho", "momentum", "weight_decay")
LATER_GROUP_KEYS = [key for key in OPTION_KEYS if key not in FIRST_RELEASE_KEYS]


def test_every_constructor_option_is_a_group_option() -> None:
    # _OPTION_KEYS fills the groups of old checkpoints: an option missing there would load as
    # a KeyError in step(); one listed there but not taken by the constructor is dead.
    params = inspect.signature(BPGrad.__init__).parameters
    assert set(params) - {"self", "params"} == set(OPTION_KEYS)


def trained(steps: int = 3) -> tuple[torch.nn.Module, BPGrad]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = BPGrad(model.parameters(), lipschitz=8.0, weight_decay=1e-3)
    for _ in range(steps):
        step(model, opt)
    return model, opt


def step(model: torch.nn.Module, opt: BPGrad) -> None:
    gen = torch.Generator().manual_seed(int(float(opt.stats.get("steps", torch.tensor(0.0)))))
    x = torch.randn(8, 4, generator=gen)
    opt.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    opt.step(loss=loss)


def continue_both(saved: dict) -> None:
    model, opt = trained()
    twin_model = copy.deepcopy(model)
    twin = BPGrad(twin_model.parameters(), lipschitz=1.0)
    twin.load_state_dict(saved)
    for _ in range(3):
        step(model, opt)
        step(twin_model, twin)
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("key", LATER_GROUP_KEYS)
def test_state_dict_without_a_later_group_key_loads_and_steps(key: str) -> None:
    _, opt = trained()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group[key]
    continue_both(saved)


def test_state_dict_with_numbers_for_tensors_loads_and_steps() -> None:
    _, opt = trained()
    saved = copy.deepcopy(opt.state_dict())
    first = saved["state"][0]
    for key, value in list(first.items()):
        if key != "momentum_buffer":
            first[key] = float(value)  # e.g. "step": 3.0, as hand-made or foreign dicts have
    continue_both(saved)


def test_state_dict_missing_later_global_state_starts_it_fresh() -> None:
    # A checkpoint from before lipschitz="auto" existed has no auto-L state at all.
    _, opt = trained()
    saved = copy.deepcopy(opt.state_dict())
    for key in ("grad_norm_max", "lipschitz_floor", "lipschitz_estimate"):
        del saved["state"][0][key]
    continue_both(saved)
